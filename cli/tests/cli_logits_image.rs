//! `mipha-cli logits --image`: every position of the expanded sequence (image
//! patches included) and the authors' ids with -200 at the placeholder, against
//! the tiny-a image golden.

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_mipha-cli");

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/tiny-a")
        .join(rel)
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn logits_with_an_image_cover_the_expanded_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny-a.mqf");
    let opts = mipha_convert::ConvertOptions::new(
        fixture("checkpoint"),
        &model,
        mipha_runtime::QuantType::F32,
    );
    mipha_convert::convert_checkpoint(&opts).unwrap();
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("golden_image.json")).unwrap())
            .unwrap();
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
    let ids: Vec<i64> = st
        .tensor("input_ids")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let want: Vec<i64> = golden["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(ids, want);
    let logits = st.tensor("logits").unwrap();
    assert_eq!(logits.shape(), &[58, 51200], "49 ids + 9 patches");
    let gb = std::fs::read(fixture("golden_image.safetensors")).unwrap();
    let g = safetensors::SafeTensors::deserialize(&gb).unwrap();
    let last = f32s(g.tensor("prompt_logits_last").unwrap().data());
    let ours = f32s(&logits.data()[57 * 51200 * 4..]);
    let d = ours
        .iter()
        .zip(&last)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
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
