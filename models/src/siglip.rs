//! The SigLIP vision tower and Mipha's `mlp2x_gelu` projector as one graph plan:
//! patches in, image embeddings (language-model width) out.
//!
//! Deviations from a stock SigLIP forward, after the authors' code: the output
//! is `hidden_states[select_layer]` (the converter keeps only the layers up to
//! it) with **no** post-LayerNorm, and there is no pooling head.

use mipha_runtime::{BufId, GeluKind, Op, Plan, PlanBuilder, WeightId};

use crate::config::VisionConfig;
use crate::phi::{LayerNorm, Linear};

pub const TAP_HIDDEN: &str = "vision.hidden_states";
pub const TAP_FC1_GELU: &str = "projector.fc1_gelu";

struct Scratch {
    ln: BufId,
    q: BufId,
    k: BufId,
    v: BufId,
    attn: BufId,
    mlp_hidden: BufId,
}

/// Conv2d(kernel = stride = patch, bias) over flattened patches plus learned
/// position embeddings; no CLS token.
pub struct SiglipVisionEmbeddings {
    patch_embedding: Linear,
    position_embedding: WeightId,
}

/// q/k/v/out projections with biases, full softmax (no mask, no rotary).
pub struct SiglipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    n_heads: usize,
    head_dim: usize,
}

/// fc1 → tanh-GELU (`gelu_pytorch_tanh`) → fc2.
pub struct SiglipMlp {
    fc1: Linear,
    fc2: Linear,
}

/// Pre-LN block: `h += attn(LN1(h))`, `h += mlp(LN2(h))`.
pub struct SiglipEncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: SiglipAttention,
    layer_norm2: LayerNorm,
    mlp: SiglipMlp,
}

/// `mm_projector`: Linear → **erf** GELU (`nn.GELU()`) → Linear.
pub struct MlpProjector {
    linear_0: Linear,
    linear_2: Linear,
}

pub struct SiglipVisionTower {
    embeddings: SiglipVisionEmbeddings,
    layers: Vec<SiglipEncoderLayer>,
    mm_projector: MlpProjector,
}

const PREFIX: &str = "model.vision_tower.vision_model";

impl SiglipVisionTower {
    /// The plan of one image: `num_patches` input rows (flattened patches),
    /// `projector_hidden`-wide output rows. Taps: `vision.hidden_states.{k}`
    /// (k = 0: embeddings), `projector.fc1_gelu`.
    pub fn plan(cfg: &VisionConfig) -> Plan {
        let d = cfg.hidden_size;
        let p = cfg.num_patches();
        let mut g = PlanBuilder::new(p, 1, cfg.patch_len());
        let eps = cfg.layer_norm_eps;
        let tower = SiglipVisionTower {
            embeddings: SiglipVisionEmbeddings {
                patch_embedding: Linear::new_with_shape(
                    &mut g,
                    &format!("{PREFIX}.embeddings.patch_embedding"),
                    &[d, cfg.num_channels, cfg.patch_size, cfg.patch_size],
                    d,
                ),
                position_embedding: g.weight(
                    format!("{PREFIX}.embeddings.position_embedding.weight"),
                    &[p, d],
                ),
            },
            layers: (0..cfg.num_hidden_layers)
                .map(|i| {
                    let l = format!("{PREFIX}.encoder.layers.{i}");
                    let a = format!("{l}.self_attn");
                    SiglipEncoderLayer {
                        layer_norm1: LayerNorm::new(&mut g, &format!("{l}.layer_norm1"), d, eps),
                        self_attn: SiglipAttention {
                            q_proj: Linear::new(&mut g, &format!("{a}.q_proj"), d, d),
                            k_proj: Linear::new(&mut g, &format!("{a}.k_proj"), d, d),
                            v_proj: Linear::new(&mut g, &format!("{a}.v_proj"), d, d),
                            out_proj: Linear::new(&mut g, &format!("{a}.out_proj"), d, d),
                            n_heads: cfg.num_attention_heads,
                            head_dim: cfg.head_dim,
                        },
                        layer_norm2: LayerNorm::new(&mut g, &format!("{l}.layer_norm2"), d, eps),
                        mlp: SiglipMlp {
                            fc1: Linear::new(
                                &mut g,
                                &format!("{l}.mlp.fc1"),
                                d,
                                cfg.intermediate_size,
                            ),
                            fc2: Linear::new(
                                &mut g,
                                &format!("{l}.mlp.fc2"),
                                cfg.intermediate_size,
                                d,
                            ),
                        },
                    }
                })
                .collect(),
            mm_projector: MlpProjector {
                linear_0: Linear::new(&mut g, "model.mm_projector.0", d, cfg.projector_hidden),
                linear_2: Linear::new(
                    &mut g,
                    "model.mm_projector.2",
                    cfg.projector_hidden,
                    cfg.projector_hidden,
                ),
            },
        };
        let s = Scratch {
            ln: g.buffer("ln", d),
            q: g.buffer("q", d),
            k: g.buffer("k", d),
            v: g.buffer("v", d),
            attn: g.buffer("attn", d),
            mlp_hidden: g.buffer("mlp_hidden", cfg.intermediate_size),
        };
        let patches = g.buffer("patches", cfg.patch_len());
        let hidden = g.buffer("hidden", d);
        let proj_hidden = g.buffer("projector_hidden", cfg.projector_hidden);
        let out = g.buffer("image_embeds", cfg.projector_hidden);
        tower.forward(&mut g, &s, patches, hidden, proj_hidden, out);
        g.finish(out)
    }

    fn forward(
        &self,
        g: &mut PlanBuilder,
        s: &Scratch,
        patches: BufId,
        hidden: BufId,
        proj_hidden: BufId,
        out: BufId,
    ) {
        g.push(Op::Input { out: patches });
        self.embeddings.patch_embedding.forward(g, patches, hidden);
        g.push(Op::AddRows {
            x: hidden,
            table: self.embeddings.position_embedding,
        });
        g.push(Op::Tap {
            x: hidden,
            name: format!("{TAP_HIDDEN}.0"),
        });
        for (i, layer) in self.layers.iter().enumerate() {
            layer.forward(g, s, hidden);
            g.push(Op::Tap {
                x: hidden,
                name: format!("{TAP_HIDDEN}.{}", i + 1),
            });
            // A layer is the unit the scheduler interleaves with decode steps.
            g.mark_break();
        }
        self.mm_projector.forward(g, hidden, proj_hidden, out);
    }
}

impl SiglipEncoderLayer {
    fn forward(&self, g: &mut PlanBuilder, s: &Scratch, h: BufId) {
        self.layer_norm1.forward(g, h, s.ln);
        self.self_attn.forward(g, s, s.ln, h);
        self.layer_norm2.forward(g, h, s.ln);
        self.mlp
            .fc1
            .forward_gelu(g, s.ln, s.mlp_hidden, GeluKind::Tanh);
        self.mlp.fc2.forward_residual(g, s.mlp_hidden, h);
    }
}

impl SiglipAttention {
    /// `h += out_proj(attention(x))`
    fn forward(&self, g: &mut PlanBuilder, s: &Scratch, x: BufId, h: BufId) {
        self.q_proj.forward(g, x, s.q);
        self.k_proj.forward(g, x, s.k);
        self.v_proj.forward(g, x, s.v);
        g.push(Op::SelfAttention {
            q: s.q,
            k: s.k,
            v: s.v,
            out: s.attn,
            n_heads: self.n_heads,
            head_dim: self.head_dim,
            causal: false,
            scale: 1.0 / (self.head_dim as f32).sqrt(),
        });
        self.out_proj.forward_residual(g, s.attn, h);
    }
}

impl MlpProjector {
    fn forward(&self, g: &mut PlanBuilder, x: BufId, hidden: BufId, out: BufId) {
        self.linear_0.forward_gelu(g, x, hidden, GeluKind::Erf);
        g.push(Op::Tap {
            x: hidden,
            name: TAP_FC1_GELU.into(),
        });
        self.linear_2.forward(g, hidden, out);
    }
}

/// Cuts CHW pixels into row-major patches (patch index = row * side + col), each
/// flattened in `[c, kh, kw]` order to match the conv weight. Pixels past the last
/// whole patch are ignored, as the "valid" convolution does.
pub fn patchify(cfg: &VisionConfig, pixels: &[f32], out: &mut Vec<f32>) {
    let (s, p, c) = (cfg.image_size, cfg.patch_size, cfg.num_channels);
    let side = cfg.patches_per_side();
    assert_eq!(
        pixels.len(),
        c * s * s,
        "pixels must be [channels, size, size]"
    );
    out.clear();
    out.reserve(cfg.num_patches() * cfg.patch_len());
    for pr in 0..side {
        for pc in 0..side {
            for ch in 0..c {
                for kh in 0..p {
                    let row = (ch * s + pr * p + kh) * s + pc * p;
                    out.extend_from_slice(&pixels[row..row + p]);
                }
            }
        }
    }
}
