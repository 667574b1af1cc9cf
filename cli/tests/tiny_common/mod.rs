//! What the CLI tests on the tiny-a fixture share: paths, a converted model,
//! golden files.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};

pub const BIN: &str = env!("CARGO_BIN_EXE_mipha-cli");

pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/tiny-a")
        .join(rel)
}

/// tiny-a converted to an F32 `.mqf` in `dir`.
pub fn tiny_a(dir: &Path) -> PathBuf {
    let out = dir.join("tiny-a.mqf");
    let opts = mipha_convert::ConvertOptions::new(
        fixture("checkpoint"),
        &out,
        mipha_runtime::QuantType::F32,
    );
    mipha_convert::convert_checkpoint(&opts).unwrap();
    out
}

pub fn golden_json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name)).unwrap()).unwrap()
}

pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

pub fn i64s(bytes: &[u8]) -> Vec<i64> {
    bytes
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// A golden tensor of `golden_*.safetensors` as f32.
pub fn golden_f32(file: &str, tensor: &str) -> Vec<f32> {
    let bytes = std::fs::read(fixture(file)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    f32s(st.tensor(tensor).unwrap().data())
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
