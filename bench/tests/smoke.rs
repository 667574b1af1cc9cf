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

/// The fields of every line, and min ≤ median ≤ max, all positive; for
/// distributions also min ≤ p50 ≤ p99 ≤ max.
fn check_line(v: &Value) {
    for key in [
        "figure",
        "quant",
        "threads",
        "tokens",
        "streams",
        "median",
        "min",
        "max",
        "p50",
        "p99",
        "bound_fraction",
        "cpu",
        "cpu_id",
        "level",
        "tuning",
    ] {
        assert!(v.get(key).is_some(), "`{key}` missing: {v}");
    }
    // The machine and the kernels it ran are named on every row.
    let level = v["level"].as_str().expect("level is a string");
    assert!(
        mipha_kernels::cpu::dispatch::Level::from_name(level).is_some(),
        "{v}"
    );
    assert!(v["cpu"].as_str().is_some_and(|c| !c.is_empty()), "{v}");
    assert!(
        v["tuning"]
            .as_str()
            .is_some_and(|t| t.contains("int8_prefetch=")),
        "{v}"
    );
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
    if v["p99"].is_number() {
        let (p50, p99) = (num("p50"), num("p99"));
        assert!(min <= p50 && p50 <= p99 && p99 <= max, "{v}");
        assert_eq!(p50, med, "p50 is the median: {v}");
    } else {
        assert!(v["p50"].is_null(), "{v}");
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

fn find_streams<'a>(lines: &'a [Value], figure: &str, threads: u64, streams: u64) -> &'a Value {
    lines
        .iter()
        .find(|v| v["figure"] == figure && v["threads"] == threads && v["streams"] == streams)
        .unwrap_or_else(|| panic!("no {figure} at {threads} threads and {streams} streams"))
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
        "8",
        "--streams",
        "1,2",
        "--image-streams",
        "3",
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
        "batch_decode_tok_s",
        "itl_ms",
        "ttft_ms",
        "clients_tok_s",
        "image_itl_ms",
        "ttft_image_under_load_ms",
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
        assert!(find(&lines, "mem_read_gb_s", t, None)["streams"].is_null());
        assert_eq!(find(&lines, "decode_tok_s", t, None)["streams"], 1);
        for k in [1, 2] {
            let b = find_streams(&lines, "batch_decode_tok_s", t, k);
            assert!(b["bound_fraction"].is_number(), "{b}");
            assert!(b["p99"].is_null(), "{b}");
            assert_eq!(b["tokens"], 16);
            assert!(find_streams(&lines, "itl_ms", t, k)["p99"].is_number());
            assert!(find_streams(&lines, "ttft_ms", t, k)["p99"].is_number());
            find_streams(&lines, "clients_tok_s", t, k);
        }
        // The aggregate bound grows with the streams (the weights are read once a step).
        let bound = |k| find_streams(&lines, "batch_decode_tok_s", t, k)["bound"].as_f64();
        assert!(bound(2) > bound(1));
        let image = find_streams(&lines, "image_itl_ms", t, 3);
        assert!(image["p99"].is_number(), "{image}");
        assert_eq!(image["tokens"], ttft["tokens"]);
        find_streams(&lines, "ttft_image_under_load_ms", t, 3);
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
    for k in [1, 4] {
        find_streams(&quick, "batch_decode_tok_s", 1, k);
        find_streams(&quick, "ttft_ms", 1, k);
    }
    find_streams(&quick, "image_itl_ms", 1, 4);
    assert!(
        !quick.iter().any(|v| v["figure"] == "ttft_image_ms"),
        "--quick skips the image prompt"
    );
}
