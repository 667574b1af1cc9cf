//! `mipha-cli run` and `mipha-cli logits` end to end on the tiny-a fixture.

use std::process::Command;

mod tiny_common;
use tiny_common::*;

#[test]
fn run_json_gives_the_golden_greedy_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_a(dir.path());
    let g = golden_json("golden_text.json");
    let out = Command::new(BIN)
        .args(["run", "--model"])
        .arg(&model)
        .args(["--prompt", g["prompt_question"].as_str().unwrap()])
        .args([
            "--max-tokens",
            "8",
            "--ignore-eos",
            "--json",
            "--threads",
            "2",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tokens"], g["gen_token_ids"]);
    assert_eq!(v["prompt_ids"], g["input_ids"]);
    assert_eq!(v["prompt_tokens"], g["input_ids"].as_array().unwrap().len());
    assert_eq!(v["text"], g["gen_text"]);
    assert_eq!(v["stop_reason"], "max_tokens");
    assert!(v["timings"]["decode_tok_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn run_streams_text_and_sampling_is_reproducible_by_seed() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_a(dir.path());
    let run = |seed: &str| {
        let out = Command::new(BIN)
            .args(["run", "--model"])
            .arg(&model)
            .args(["-p", "Hello", "-n", "12", "--ignore-eos", "--json"])
            .args(["--temperature", "0.9", "--top-k", "40", "--top-p", "0.95"])
            .args(["--min-p", "0.01", "--repeat-penalty", "1.1", "--seed", seed])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["tokens"].clone()
    };
    assert_eq!(run("7"), run("7"));
    assert_ne!(run("7"), run("8"));

    let out = Command::new(BIN)
        .args(["run", "--model"])
        .arg(&model)
        .args(["-p", "Hello", "-n", "4", "--ignore-eos"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!out.stdout.is_empty());
}

#[test]
fn logits_writes_every_position() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_a(dir.path());
    let g = golden_json("golden_text.json");
    let path = dir.path().join("logits.safetensors");
    let out = Command::new(BIN)
        .args(["logits", "--model"])
        .arg(&model)
        .args(["--prompt", g["prompt_question"].as_str().unwrap(), "--out"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids = st.tensor("input_ids").unwrap();
    let t = g["input_ids"].as_array().unwrap().len();
    assert_eq!(ids.shape(), &[t]);
    let logits = st.tensor("logits").unwrap();
    assert_eq!(logits.shape(), &[t, 51200]);

    // The golden's last-position logits.
    let last = golden_f32("golden_text.safetensors", "prompt_logits_last");
    let d = max_abs_diff(&f32s(&logits.data()[(t - 1) * 51200 * 4..]), &last);
    assert!(d < 1e-3, "last-position logits differ by {d}");

    // --raw skips the template.
    let raw = dir.path().join("raw.safetensors");
    let out = Command::new(BIN)
        .args(["logits", "--raw", "--model"])
        .arg(&model)
        .args(["--prompt", "a  b", "--out"])
        .arg(&raw)
        .output()
        .unwrap();
    assert!(out.status.success());
    let bytes = std::fs::read(&raw).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids = i64s(st.tensor("input_ids").unwrap().data());
    assert_eq!(ids, vec![64, 50286, 65]);
}

#[test]
fn bad_input_is_a_clear_error_with_a_failing_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.mqf");
    let out = Command::new(BIN)
        .args(["run", "--model"])
        .arg(&missing)
        .args(["-p", "hi"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing.mqf"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let model = tiny_a(dir.path());
    let out = Command::new(BIN)
        .args(["run", "--model"])
        .arg(&model)
        .args(["-p", "hi", "--top-p", "1.5"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("top-p"), "{err}");

    let long = "word ".repeat(3000);
    let out = Command::new(BIN)
        .args(["run", "--model"])
        .arg(&model)
        .args(["-p", &long])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("context"), "{err}");
}

#[test]
fn unbounded_values_and_budgets_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_a(dir.path());
    let fails = |args: &[&str], needle: &str| {
        let out = Command::new(BIN)
            .args(["run", "--model"])
            .arg(&model)
            .args(["-p", "hi", "-n", "1"])
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    };
    fails(&["--threads", "100000"], "--threads 100000");
    fails(&["--max-memory", "1M"], "max_memory");
    fails(&["--max-memory", "8Q"], "unknown size suffix");
    fails(&["--kv-cache-mb", "1000000"], "available now");
    fails(&["--max-images", "0"], "max-images");
    let ok = Command::new(BIN)
        .args(["run", "--model"])
        .arg(&model)
        .args(["-p", "hi", "-n", "1", "--verify", "--max-memory", "2G"])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

#[test]
fn prompt_text_spelling_a_control_token_is_text_unless_asked() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_a(dir.path());
    let ids = |extra: &[&str]| {
        let out = Command::new(BIN)
            .args(["run", "--model"])
            .arg(&model)
            .args(["-p", "a <|endoftext|> b", "-n", "1", "--json"])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success());
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["prompt_ids"].as_array().unwrap().clone()
    };
    let eos = serde_json::json!(50256);
    assert!(!ids(&[]).contains(&eos));
    assert!(ids(&["--parse-special"]).contains(&eos));
}
