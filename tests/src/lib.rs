//! Shared helpers for the conformance tests: fixture paths, golden files,
//! comparisons, and a capture sink for tapped activations.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use mipha_runtime::Capture;

/// `tests/fixtures/<name>` inside the repository (fixtures are copied in, so the
/// tests pass on a fresh clone without `../shared`).
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

/// A tensor of a golden file, as f32 (float tensors) or i64 (id tensors).
#[derive(Clone, Debug)]
pub struct GoldenTensor {
    pub shape: Vec<usize>,
    pub f32: Vec<f32>,
    pub i64: Vec<i64>,
}

pub struct Golden {
    pub tensors: HashMap<String, GoldenTensor>,
    pub json: serde_json::Value,
}

impl Golden {
    /// Loads `<path>.safetensors` and, if present, the `.json` beside it.
    pub fn load(path: &Path) -> Golden {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            let data = view.data();
            let (f, i) = match view.dtype() {
                safetensors::Dtype::F32 => (
                    data.chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                    Vec::new(),
                ),
                safetensors::Dtype::I64 => (
                    Vec::new(),
                    data.chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                ),
                other => panic!("{name}: unexpected golden dtype {other:?}"),
            };
            tensors.insert(
                name.to_string(),
                GoldenTensor {
                    shape: view.shape().to_vec(),
                    f32: f,
                    i64: i,
                },
            );
        }
        let json_path = path.with_extension("json");
        let json = std::fs::read_to_string(&json_path)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(serde_json::Value::Null);
        Golden { tensors, json }
    }

    pub fn get(&self, name: &str) -> &GoldenTensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("golden tensor `{name}` missing"))
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn ids(&self, name: &str) -> Vec<i64> {
        self.get(name).i64.clone()
    }
}

/// Largest absolute difference; panics on a length mismatch.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, |m: f32, d| if d.is_nan() { f32::INFINITY } else { m.max(d) })
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        ab += x as f64 * y as f64;
        aa += x as f64 * x as f64;
        bb += y as f64 * y as f64;
    }
    ab / (aa.sqrt() * bb.sqrt())
}

pub fn argmax(v: &[f32]) -> usize {
    mipha_models::sampling::argmax(v) as usize
}

/// Collects tapped buffers, appending the rows of successive steps.
#[derive(Default)]
pub struct Recorder {
    pub taps: HashMap<String, Vec<f32>>,
}

impl Capture for Recorder {
    fn tap(&mut self, name: &str, rows: &[f32], _width: usize) {
        self.taps
            .entry(name.to_string())
            .or_default()
            .extend_from_slice(rows);
    }
}

/// Converts a fixture checkpoint to `.mqf` in `dir` with the given quant types.
pub fn convert(checkpoint: &Path, dir: &Path, quant: &str, vision_quant: &str) -> PathBuf {
    let out = dir.join(format!("model-{quant}-{vision_quant}.mqf"));
    let status = mipha_convert_run(checkpoint, &out, quant, vision_quant);
    assert!(status, "conversion of {} failed", checkpoint.display());
    out
}

fn mipha_convert_run(checkpoint: &Path, out: &Path, quant: &str, vision_quant: &str) -> bool {
    let q = mipha_runtime::QuantType::from_name(quant).expect("quant name");
    let vq = mipha_runtime::QuantType::from_name(vision_quant).expect("quant name");
    let opts = mipha_convert::ConvertOptions {
        input: checkpoint.to_path_buf(),
        output: out.to_path_buf(),
        quant: q,
        vision_quant: vq,
        progress: false,
    };
    match mipha_convert::convert_checkpoint(&opts) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("convert: {e}");
            false
        }
    }
}
