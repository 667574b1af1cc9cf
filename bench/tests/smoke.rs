//! `mipha-bench` end to end on a tiny model (synthesized from the tiny-a
//! fixture's config, so no full-size model is needed): every figure comes out,
//! as JSON lines with sane numbers.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

fn bench(args: &[&str]) -> Vec<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_mipha-bench"))
        .current_dir(root())
        .args(args)
        .output()
        .expect("mipha-bench runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "mipha-bench failed:\n{stderr}");
    let stdout = String::from_utf8(out.stdout).expect("UTF-8 output");
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: not JSON: {l}")))
        .collect()
}

/// The fields of every line, and min ≤ median ≤ max, all positive.
fn check_line(v: &Value) {
    for key in [
        "figure",
        "quant",
        "threads",
        "tokens",
        "median",
        "min",
        "max",
        "bound_fraction",
    ] {
        assert!(v.get(key).is_some(), "`{key}` missing: {v}");
    }
    let num = |k: &str| {
        v[k].as_f64()
            .unwrap_or_else(|| panic!("`{k}` is not a number: {v}"))
    };
    let (med, min, max) = (num("median"), num("min"), num("max"));
    assert!(
        min > 0.0 && min <= med && med <= max && max.is_finite(),
        "{v}"
    );
    assert!(v["threads"].as_u64().is_some_and(|t| t >= 1), "{v}");
    if let Some(f) = v["bound_fraction"].as_f64() {
        assert!(f > 0.0 && f.is_finite(), "{v}");
    }
}

fn find<'a>(lines: &'a [Value], figure: &str, threads: u64, tokens: Option<u64>) -> &'a Value {
    lines
        .iter()
        .find(|v| {
            v["figure"] == figure
                && v["threads"] == threads
                && (tokens.is_none() || v["tokens"].as_u64() == tokens)
        })
        .unwrap_or_else(|| panic!("no {figure} at {threads} threads, tokens {tokens:?}"))
}

#[test]
fn every_figure_on_a_tiny_synthesized_model() {
    let cache = tempfile::tempdir().expect("temp dir");
    let cache_dir = cache.path().to_str().expect("UTF-8 temp path");
    let lines = bench(&[
        "--config",
        "tests/fixtures/tiny-a/checkpoint/config.json",
        "--cache-dir",
        cache_dir,
        "--quant",
        "q8_0",
        "--vision-quant",
        "f32",
        "--threads",
        "1,2",
        "--reps",
        "2",
        "--prompt",
        "8,32",
        "--decode-ctx",
        "8,64",
        "--gen",
        "4",
        "--probe-mib",
        "16",
        "--probe-seconds",
        "0.02",
        "--json",
    ]);
    lines.iter().for_each(check_line);
    let names: HashSet<&str> = lines.iter().filter_map(|v| v["figure"].as_str()).collect();
    for name in [
        "mem_read_gb_s",
        "f32_fma_gflop_s",
        "int8_dot_gop_s",
        "load_ms",
        "image_preprocess_ms",
        "vision_encode_ms",
        "projector_ms",
        "prefill_tok_s",
        "ttft_image_ms",
        "decode_tok_s",
        "peak_rss_mb",
    ] {
        assert!(names.contains(name), "no `{name}` line");
    }
    for t in [1, 2] {
        for n in [8, 32] {
            let v = find(&lines, "prefill_tok_s", t, Some(n));
            assert!(v["bound_fraction"].is_number(), "{v}");
        }
        for c in [8, 64] {
            let v = find(&lines, "decode_tok_s", t, Some(c));
            assert_eq!(v["quant"], "q8_0");
            assert_eq!(v["vision_quant"], "f32");
            assert!(v["bound_fraction"].is_number(), "{v}");
        }
        // tiny-a: 3x3 patches, so the image prompt is the text plus 9 positions
        let ttft = find(&lines, "ttft_image_ms", t, None);
        let positions = ttft["tokens"].as_u64().expect("prompt length");
        assert!(positions > 9, "{ttft}");
        find(&lines, "prefill_tok_s", t, Some(positions));
        assert!(find(&lines, "vision_encode_ms", t, Some(9))["bound_fraction"].is_number());
        assert!(find(&lines, "ttft_image_ms", t, None)["bound_fraction"].is_null());
        assert!(find(&lines, "peak_rss_mb", t, None)["median"].as_f64() > Some(1.0));
        assert!(find(&lines, "mem_read_gb_s", t, None)["quant"].is_null());
    }

    // The synthesized file is cached; --quick and --model run on it as on any file.
    let cached: Vec<PathBuf> = std::fs::read_dir(cache.path())
        .expect("cache dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "mqf"))
        .collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    let model = cached[0].to_str().expect("UTF-8 path");
    let quick = bench(&["--model", model, "--quick", "--threads", "1", "--json"]);
    quick.iter().for_each(check_line);
    let v = find(&quick, "decode_tok_s", 1, Some(16));
    assert_eq!(v["quant"], "q8_0");
    find(&quick, "prefill_tok_s", 1, Some(64));
    find(&quick, "vision_encode_ms", 1, None);
    assert!(
        !quick.iter().any(|v| v["figure"] == "ttft_image_ms"),
        "--quick skips the image prompt"
    );
}
