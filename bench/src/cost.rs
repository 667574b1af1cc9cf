//! What one token or one image costs a model, read from a `.mqf` file's tensor
//! index and metadata: bytes streamed per decoded token, operations per
//! prefilled token and per image. Combined with the machine probes these give
//! the bound of every figure.

use mipha_models::{PhiConfig, VisionConfig};
use mipha_runtime::{MqfFile, QuantType, Result, TensorInfo};

const VISION_PREFIX: &str = "model.vision_tower.";
const PROJECTOR_PREFIX: &str = "model.mm_projector.";
const EMBED: &str = "model.embed_tokens.weight";
const LM_HEAD: &str = "lm_head.weight";

#[derive(Clone, Debug)]
pub struct ModelCost {
    /// storage type of most language-model matrix bytes
    pub lm_quant: QuantType,
    /// same for the vision tower and projector (`None`: text-only file)
    pub vision_quant: Option<QuantType>,
    pub file_bytes: u64,
    /// every language-model tensor's bytes except the embedding table, plus one
    /// embedding row: what a decode step must read
    pub lm_stream_bytes: u64,
    /// parameters of the language model's matmuls, lm_head excluded
    pub lm_matmul_params: u64,
    pub lm_head_params: u64,
    pub layers: u64,
    pub hidden: u64,
    pub kv_dim: u64,
    pub vision: Option<VisionCost>,
}

#[derive(Clone, Debug)]
pub struct VisionCost {
    /// matmul parameters of the tower (patch embedding and every layer)
    pub tower_params: u64,
    pub projector_params: u64,
    pub layers: u64,
    pub hidden: u64,
    pub patches: u64,
}

/// Peak rates the bounds divide by, in ops/s.
#[derive(Clone, Copy, Debug)]
pub struct Peaks {
    pub f32_flops: f64,
    pub int8_ops: f64,
}

impl Peaks {
    /// The rate a matmul with weights of type `q` can reach: the int8 dot for
    /// Q8_0/Q4_0 (their activations are quantized to int8), f32 FMA otherwise.
    pub fn for_weights(&self, q: QuantType) -> f64 {
        match q {
            QuantType::Q8_0 | QuantType::Q4_0 => self.int8_ops,
            _ => self.f32_flops,
        }
    }
}

fn is_matrix(t: &TensorInfo) -> bool {
    t.shape.len() >= 2 && t.name.ends_with(".weight") && !t.name.contains("position_embedding")
}

/// The type of most of `tensors` (the converter stores a few matrices, like the
/// patch embedding, as f32 whatever the requested type).
fn main_type<'a>(tensors: impl Iterator<Item = &'a TensorInfo>) -> Option<QuantType> {
    let mut by_type: Vec<(QuantType, usize)> = Vec::new();
    for t in tensors {
        match by_type.iter_mut().find(|(q, _)| *q == t.ty) {
            Some((_, n)) => *n += 1,
            None => by_type.push((t.ty, 1)),
        }
    }
    by_type.into_iter().max_by_key(|(_, n)| *n).map(|(q, _)| q)
}

impl ModelCost {
    pub fn of(file: &MqfFile) -> Result<Self> {
        let meta = file.metadata();
        let cfg = PhiConfig::from_metadata(meta)?;
        let vcfg = VisionConfig::from_metadata(meta)?;
        let tensors = file.tensors();
        let is_vision = |t: &TensorInfo| {
            t.name.starts_with(VISION_PREFIX) || t.name.starts_with(PROJECTOR_PREFIX)
        };
        let lm = || tensors.iter().filter(|t| !is_vision(t));
        let lm_quant =
            main_type(lm().filter(|t| is_matrix(t) && t.name != EMBED)).unwrap_or(QuantType::F32);
        let vision_quant = main_type(tensors.iter().filter(|t| is_vision(t) && is_matrix(t)));
        let mut lm_stream_bytes = 0;
        let mut lm_matmul_params = 0;
        let mut lm_head_params = 0;
        for t in lm() {
            if t.name == EMBED {
                lm_stream_bytes += t.row_stride;
                continue;
            }
            lm_stream_bytes += t.len;
            if t.name == LM_HEAD {
                lm_head_params += t.numel() as u64;
            } else if is_matrix(t) {
                lm_matmul_params += t.numel() as u64;
            }
        }
        let vision = vcfg.map(|v| {
            let mut tower_params = 0;
            let mut projector_params = 0;
            for t in tensors.iter().filter(|t| is_matrix(t)) {
                if t.name.starts_with(VISION_PREFIX) {
                    tower_params += t.numel() as u64;
                } else if t.name.starts_with(PROJECTOR_PREFIX) {
                    projector_params += t.numel() as u64;
                }
            }
            VisionCost {
                tower_params,
                projector_params,
                layers: v.num_hidden_layers as u64,
                hidden: v.hidden_size as u64,
                patches: v.num_patches() as u64,
            }
        });
        Ok(ModelCost {
            lm_quant,
            vision_quant,
            file_bytes: file.file_size(),
            lm_stream_bytes,
            lm_matmul_params,
            lm_head_params,
            layers: cfg.num_hidden_layers as u64,
            hidden: cfg.hidden_size as u64,
            kv_dim: cfg.kv_dim() as u64,
            vision,
        })
    }

    /// K and V bytes one stream reads per decoded token, averaged over `gen`
    /// tokens decoded after a context of `ctx` positions, with `kv_elem` bytes
    /// per cached value (the engine's KV element type).
    pub fn kv_bytes(&self, ctx: usize, gen: usize, kv_elem: usize) -> f64 {
        let avg_ctx = ctx as f64 + gen as f64 / 2.0;
        2.0 * (self.layers * self.kv_dim * kv_elem as u64) as f64 * avg_ctx
    }

    /// Decode bound (tokens/s, all streams together) at `bandwidth` bytes/s with
    /// `streams` sequences decoding in each step: a step reads the weights once
    /// and each stream's own K and V rows, and gives one token per stream.
    pub fn decode_bound(
        &self,
        bandwidth: f64,
        ctx: usize,
        gen: usize,
        streams: usize,
        kv_elem: usize,
    ) -> f64 {
        let k = streams.max(1) as f64;
        let step_bytes = self.lm_stream_bytes as f64 + k * self.kv_bytes(ctx, gen, kv_elem);
        k * bandwidth / step_bytes
    }

    /// Seconds `n` prompt positions (after `start` cached ones, logits of the last
    /// only) take at least: matmuls at the weights' peak, causal attention
    /// (QKᵀ and PV, 4 · context · hidden ops per position and layer) at the f32 peak.
    pub fn prefill_seconds(&self, n: usize, start: usize, peaks: &Peaks) -> f64 {
        let n = n as f64;
        let matmul = 2.0 * self.lm_matmul_params as f64 * n + 2.0 * self.lm_head_params as f64;
        // Σ_{i=1..n} (start + i) positions attended to
        let attended = n * start as f64 + n * (n + 1.0) / 2.0;
        let attention = 4.0 * self.hidden as f64 * self.layers as f64 * attended;
        matmul / peaks.for_weights(self.lm_quant) + attention / peaks.f32_flops
    }

    /// Prefill bound (positions/s).
    pub fn prefill_bound(&self, n: usize, peaks: &Peaks) -> f64 {
        n as f64 / self.prefill_seconds(n, 0, peaks)
    }

    /// Seconds the vision tower needs at least for one image (matmuls at the
    /// weights' peak, full attention over all patches at the f32 peak).
    pub fn tower_seconds(&self, peaks: &Peaks) -> Option<f64> {
        let v = self.vision.as_ref()?;
        let p = v.patches as f64;
        let matmul = 2.0 * v.tower_params as f64 * p;
        let attention = 4.0 * (v.hidden * v.layers) as f64 * p * p;
        let q = self.vision_quant.unwrap_or(QuantType::F32);
        Some(matmul / peaks.for_weights(q) + attention / peaks.f32_flops)
    }

    /// Seconds the projector needs at least for one image.
    pub fn projector_seconds(&self, peaks: &Peaks) -> Option<f64> {
        let v = self.vision.as_ref()?;
        let q = self.vision_quant.unwrap_or(QuantType::F32);
        Some(2.0 * v.projector_params as f64 * v.patches as f64 / peaks.for_weights(q))
    }
}
