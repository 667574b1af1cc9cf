//! `mipha-cli logits --image`: every position of the expanded sequence (image
//! patches included) and the authors' ids with -200 at the placeholder, against
//! the tiny-a image golden.

use std::process::Command;

mod tiny_common;
use tiny_common::*;

#[test]
fn logits_with_an_image_cover_the_expanded_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_a(dir.path());
    let golden = golden_json("golden_image.json");
    let out = dir.path().join("l.safetensors");
    let run = Command::new(BIN)
        .args(["logits", "--model"])
        .arg(&model)
        .args(["--prompt", golden["prompt_question"].as_str().unwrap()])
        .arg("--image")
        .arg(fixture("chelsea.png"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids = i64s(st.tensor("input_ids").unwrap().data());
    let want: Vec<i64> = golden["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(ids, want);
    let logits = st.tensor("logits").unwrap();
    assert_eq!(logits.shape(), &[58, 51200], "49 ids + 9 patches");
    let last = golden_f32("golden_image.safetensors", "prompt_logits_last");
    let d = max_abs_diff(&f32s(&logits.data()[57 * 51200 * 4..]), &last);
    assert!(d < 1e-3, "last-position logits differ by {d}");

    // A raw prompt marks the picture itself; a count mismatch is an error.
    let bad = Command::new(BIN)
        .args(["logits", "--raw", "--model"])
        .arg(&model)
        .args(["--prompt", "no placeholder here", "--image"])
        .arg(fixture("chelsea.png"))
        .arg("--out")
        .arg(dir.path().join("x.safetensors"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("placeholder"));
}
