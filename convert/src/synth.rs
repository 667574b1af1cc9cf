//! `synth`: a model in a config's real shapes with seeded random weights, written
//! straight to `.mqf` (no Python, no checkpoint).
//!
//! Scales (per tensor, see `plan::expected_tensors`), chosen so that a forward pass
//! through every layer keeps activations of order one:
//! * input-side matrices (q/k/v, fc1, projector, lm_head, patch embedding):
//!   normal(0, 1/sqrt(fan_in)), so a unit-variance input gives unit-variance outputs
//!   (LayerNorm precedes each of them; q.k/sqrt(head_dim) then has variance ~1);
//! * residual-branch outputs (`dense`, `fc2`, `out_proj`): normal(0, 1/sqrt(fan_in) /
//!   sqrt(2 L)) (GPT-2's rule), so the L layers together add variance ~1 to the
//!   residual stream instead of ~1 each; for Mipha-3B the stream stays near unit
//!   variance (|x| of a few units), far from f16's 65504;
//! * token and position embeddings: normal(0, 0.02);
//! * LayerNorm gains 1 + normal(0, 0.02); LayerNorm and linear biases normal(0, 0.01).
//!
//! Values come from xoshiro256++ streams seeded per (seed, tensor, block of rows), so
//! a file depends on the seed only, not on the thread count. The normal variates are
//! Irwin-Hall sums of four 16-bit uniforms (one u64 each): mean 0, variance 1, bounded
//! by ±3.46, cheap enough to synthesise Mipha-3B in seconds.

use std::path::{Path, PathBuf};
use std::time::Instant;

use mipha_kernels::quant::quantize_row;
use mipha_kernels::QuantType;
use mipha_runtime::{MqfWriter, TensorSpec};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::config::{ImageConfig, ModelConfig};
use crate::convert::hex;
use crate::error::{ConvertError, Result};
use crate::metadata::{self, Provenance};
use crate::plan::{self, Expected, Init};
use crate::progress;
use crate::tokenizer::TokenizerInfo;

#[derive(Clone, Debug)]
pub struct SynthOptions {
    /// A Mipha `config.json`; a `preprocessor_config.json` next to it is used if present.
    pub config: PathBuf,
    pub output: PathBuf,
    pub quant: QuantType,
    pub vision_quant: QuantType,
    pub seed: u64,
    pub progress: bool,
}

impl SynthOptions {
    pub fn new(config: impl Into<PathBuf>, output: impl Into<PathBuf>, quant: QuantType) -> Self {
        SynthOptions {
            config: config.into(),
            output: output.into(),
            quant,
            vision_quant: quant,
            seed: 0,
            progress: false,
        }
    }
}

#[derive(Clone, Debug)]
pub struct SynthReport {
    pub output: PathBuf,
    pub tensors: usize,
    pub params: u64,
    pub tensor_bytes: u64,
    pub file_size: u64,
    pub seconds: f64,
}

/// Elements generated per independent random stream.
const BLOCK_ELEMS: usize = 1 << 16;

pub fn synth(opts: &SynthOptions) -> Result<SynthReport> {
    let t0 = Instant::now();
    let cfg = ModelConfig::from_file(&opts.config)?;
    let dir = opts.config.parent().unwrap_or(Path::new("."));
    let pre = dir.join("preprocessor_config.json");
    let mut used = vec![opts.config.clone()];
    let image = if pre.is_file() {
        used.push(pre.clone());
        ImageConfig::from_file(&pre)?
    } else {
        ImageConfig::siglip_default(cfg.vision.image_size)
    };
    let mut source_files = Vec::new();
    let mut source_sha256 = Vec::new();
    for p in &used {
        let bytes = std::fs::read(p).map_err(|e| ConvertError::io(p, e))?;
        source_files.push(
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        source_sha256.push(hex(&Sha256::digest(&bytes)));
    }
    let tok = TokenizerInfo::reference();
    let expected = plan::expected_tensors(&cfg);
    let specs: Vec<TensorSpec> = expected
        .iter()
        .map(|e| TensorSpec {
            name: e.name.clone(),
            // Synthetic values are bounded (|x| < 4 std), so no type can overflow.
            ty: plan::choose_type(e, opts.quant, opts.vision_quant, 0.0).0,
            shape: e.shape.iter().map(|&d| d as u64).collect(),
        })
        .collect();
    let name = cfg.name.clone().unwrap_or_else(|| {
        dir.canonicalize()
            .ok()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "mipha".into())
    });
    let prov = Provenance {
        name: format!("{name} (synthetic)"),
        source_files,
        source_sha256,
        quant: opts.quant,
        vision_quant: opts.vision_quant,
        fallbacks: Vec::new(),
        dropped: Vec::new(),
        synth_seed: Some(opts.seed),
    };
    let meta = metadata::build(&cfg, &image, &tok, &prov);
    let params: u64 = expected
        .iter()
        .map(|e| e.shape.iter().product::<usize>() as u64)
        .sum();

    let mut writer = MqfWriter::create(&opts.output, meta, specs.clone())?;
    let pb = progress::bar(opts.progress, params * 4, "synth");
    let mut tensor_bytes = 0;
    for (i, (e, spec)) in expected.iter().zip(&specs).enumerate() {
        pb.set_message(format!("{}/{} tensors", i, expected.len()));
        let data = generate(e, spec.ty, opts.seed, i as u64);
        tensor_bytes += data.len() as u64;
        writer.write_tensor(i, &data)?;
        pb.inc(e.shape.iter().product::<usize>() as u64 * 4);
    }
    writer.finish()?;
    pb.finish_and_clear();
    let file_size = std::fs::metadata(&opts.output)
        .map_err(|e| ConvertError::io(&opts.output, e))?
        .len();
    Ok(SynthReport {
        output: opts.output.clone(),
        tensors: expected.len(),
        params,
        tensor_bytes,
        file_size,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// The stored bytes of one synthetic tensor.
fn generate(e: &Expected, ty: QuantType, seed: u64, tensor: u64) -> Vec<u8> {
    let cols = e.shape.last().copied().unwrap_or(1).max(1);
    let rows: usize = if e.shape.len() <= 1 {
        1
    } else {
        e.shape[..e.shape.len() - 1].iter().product()
    };
    let row_bytes = ty.row_bytes(cols);
    let mut out = vec![0u8; rows * row_bytes];
    if out.is_empty() {
        return out;
    }
    let rows_per_block = (BLOCK_ELEMS / cols).max(1);
    let (scale, offset) = match e.init {
        Init::Normal(s) => (s, 0.0),
        Init::OnePlusNormal(s) => (s, 1.0),
    };
    out.par_chunks_mut(rows_per_block * row_bytes)
        .enumerate()
        .for_each(|(block, chunk)| {
            let mut rng = Xoshiro256pp::new(
                seed ^ splitmix64(tensor.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ block as u64),
            );
            let mut row = vec![0f32; cols];
            for dst in chunk.chunks_mut(row_bytes) {
                for x in row.iter_mut() {
                    *x = offset + scale * rng.normal();
                }
                quantize_row(ty, &row, dst);
            }
        });
    out
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// xoshiro256++ (Blackman & Vigna), seeded through splitmix64 as its authors advise.
struct Xoshiro256pp {
    s: [u64; 4],
}

impl Xoshiro256pp {
    fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut s = [0u64; 4];
        for v in &mut s {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            *v = splitmix64(x);
        }
        Xoshiro256pp { s }
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = (s[0].wrapping_add(s[3])).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Approximately standard normal: the sum of four uniform 16-bit integers,
    /// centred and scaled to unit variance.
    fn normal(&mut self) -> f32 {
        const MEAN: f32 = 4.0 * 32767.5;
        // sqrt(4 * (65536^2 - 1) / 12)
        const INV_STD: f32 = 1.0 / 37_837.23;
        let r = self.next_u64();
        let sum = (r & 0xFFFF) + ((r >> 16) & 0xFFFF) + ((r >> 32) & 0xFFFF) + (r >> 48);
        (sum as f32 - MEAN) * INV_STD
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_moments() {
        let mut rng = Xoshiro256pp::new(7);
        let n = 1_000_000;
        let (mut s1, mut s2, mut max) = (0f64, 0f64, 0f32);
        for _ in 0..n {
            let x = rng.normal();
            s1 += x as f64;
            s2 += (x * x) as f64;
            max = max.max(x.abs());
        }
        let mean = s1 / n as f64;
        let var = s2 / n as f64 - mean * mean;
        assert!(mean.abs() < 0.005, "{mean}");
        assert!((var - 1.0).abs() < 0.01, "{var}");
        assert!(max < 3.47 && max > 3.0, "{max}");
    }

    #[test]
    fn deterministic_and_seed_dependent() {
        let e = Expected {
            name: "w".into(),
            shape: vec![300, 500],
            part: plan::Part::Lm,
            always_f32: false,
            init: Init::Normal(0.02),
        };
        let a = generate(&e, QuantType::Q8_0, 1, 3);
        assert_eq!(a, generate(&e, QuantType::Q8_0, 1, 3));
        assert_ne!(a, generate(&e, QuantType::Q8_0, 2, 3));
        assert_ne!(a, generate(&e, QuantType::Q8_0, 1, 4));
        let f = generate(&e, QuantType::F32, 1, 3);
        let v: Vec<f32> = f
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let var = v.iter().map(|x| (x * x) as f64).sum::<f64>() / v.len() as f64;
        assert!((var.sqrt() - 0.02).abs() < 0.001, "{}", var.sqrt());
    }
}
