//! Helpers shared by the integration tests: reading fixture tensors, writing
//! checkpoints in other layouts, and the expected stored bytes of a tensor.
#![allow(dead_code)]

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use mipha_convert::QuantType;
use mipha_kernels::quant::quantize_row;
use safetensors::{Dtype, SafeTensors, View};

pub const TINY_A: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/tiny-a/checkpoint"
);
pub const BIN: &str = env!("CARGO_BIN_EXE_mipha-convert");

pub fn tiny_a() -> PathBuf {
    PathBuf::from(TINY_A)
}

/// One checkpoint tensor, decoded.
#[derive(Clone, Debug)]
pub struct Src {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

fn decode(dtype: Dtype, data: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => panic!("test helper: dtype {other:?}"),
    }
}

/// Every tensor of every `*.safetensors` file in `dir` (whole files are read: test
/// fixtures are small).
pub fn read_tensors(dir: &Path) -> BTreeMap<String, Src> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            continue;
        }
        let bytes = std::fs::read(&p).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in st.tensors() {
            out.insert(
                name,
                Src {
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    values: decode(view.dtype(), view.data()),
                },
            );
        }
    }
    out
}

pub fn encode(dtype: Dtype, values: &[f32]) -> Vec<u8> {
    match dtype {
        Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect(),
        Dtype::BF16 => values
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect(),
        other => panic!("test helper: dtype {other:?}"),
    }
}

/// A tensor to write: name, dtype, shape, raw little-endian bytes.
pub type Raw = (String, Dtype, Vec<usize>, Vec<u8>);

pub fn raw_from(tensors: &BTreeMap<String, Src>, dtype: Option<Dtype>) -> Vec<Raw> {
    tensors
        .iter()
        .map(|(n, s)| {
            let dt = dtype.unwrap_or(s.dtype);
            (n.clone(), dt, s.shape.clone(), encode(dt, &s.values))
        })
        .collect()
}

/// Copies tiny-a's non-weight files (config, tokenizer, preprocessor) into `dir`.
pub fn copy_side_files(from: &Path, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        if name.ends_with(".safetensors") || name == "model.safetensors.index.json" {
            continue;
        }
        std::fs::copy(&p, dir.join(&name)).unwrap();
    }
}

/// Writes `tensors` as `model.safetensors` (shards == 0) or as `shards` files plus an
/// index, tensors dealt round-robin so every shard holds a mix.
pub fn write_weights(dir: &Path, tensors: &[Raw], shards: usize) {
    fn view(t: &Raw) -> safetensors::tensor::TensorView<'_> {
        safetensors::tensor::TensorView::new(t.1, t.2.clone(), &t.3).unwrap()
    }
    if shards == 0 {
        let views: Vec<_> = tensors.iter().map(|t| (t.0.clone(), view(t))).collect();
        safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
        return;
    }
    let mut weight_map = serde_json::Map::new();
    for s in 0..shards {
        let file = format!("model-{:05}-of-{:05}.safetensors", s + 1, shards);
        let views: Vec<_> = tensors
            .iter()
            .enumerate()
            .filter(|(i, _)| i % shards == s)
            .map(|(_, t)| {
                weight_map.insert(t.0.clone(), file.clone().into());
                (t.0.clone(), view(t))
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index).unwrap(),
    )
    .unwrap();
}

/// The bytes the converter must store for `values` of `shape` in type `ty`.
pub fn expected_bytes(ty: QuantType, shape: &[usize], values: &[f32]) -> Vec<u8> {
    let cols = *shape.last().unwrap();
    let mut out = Vec::new();
    for row in values.chunks(cols) {
        let mut dst = vec![0u8; ty.row_bytes(cols)];
        quantize_row(ty, row, &mut dst);
        out.extend_from_slice(&dst);
    }
    out
}

/// Tensor names a converted tiny-a file must not contain: tower layer 1 (select -2
/// of 2 layers keeps layer 0 only), post_layernorm, the pooling head.
pub fn tiny_a_dropped(all: &BTreeMap<String, Src>) -> Vec<String> {
    all.keys()
        .filter(|n| {
            n.starts_with("model.vision_tower.vision_model.encoder.layers.1.")
                || n.starts_with("model.vision_tower.vision_model.post_layernorm.")
                || n.starts_with("model.vision_tower.vision_model.head.")
        })
        .cloned()
        .collect()
}

/// A tensor whose bytes are generated when the serializer asks for them, so a
/// test writing a large checkpoint never holds it either: uniform values in
/// `[-scale/2, scale/2)` from a seeded LCG, stored as `dtype`.
pub struct Lazy {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub seed: u64,
    pub scale: f32,
}

impl View for &Lazy {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let mut s = self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let n: usize = self.shape.iter().product();
        // encoded value by value: no f32 copy of the tensor besides its bytes
        let mut out = Vec::with_capacity(self.data_len());
        for _ in 0..n {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let x = ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * self.scale;
            match self.dtype {
                Dtype::F32 => out.extend_from_slice(&x.to_le_bytes()),
                Dtype::F16 => out.extend_from_slice(&f16::from_f32(x).to_le_bytes()),
                _ => out.extend_from_slice(&bf16::from_f32(x).to_le_bytes()),
            }
        }
        Cow::Owned(out)
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}
