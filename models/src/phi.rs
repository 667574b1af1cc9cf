//! Phi-2 as a graph plan. One struct per module of the checkpoint, built from its
//! weight prefix; each `forward` emits the module's math as plan ops.

use mipha_runtime::graph::KvShape;
use mipha_runtime::{BufId, Epilogue, GeluKind, Op, Plan, PlanBuilder, Rows, WeightId};

use crate::config::PhiConfig;

/// `nn.LayerNorm` with bias.
pub struct LayerNorm {
    weight: WeightId,
    bias: WeightId,
    eps: f32,
}

impl LayerNorm {
    pub fn new(g: &mut PlanBuilder, prefix: &str, dim: usize, eps: f32) -> Self {
        LayerNorm {
            weight: g.weight(format!("{prefix}.weight"), &[dim]),
            bias: g.weight(format!("{prefix}.bias"), &[dim]),
            eps,
        }
    }

    pub fn forward(&self, g: &mut PlanBuilder, x: BufId, out: BufId) {
        g.push(Op::LayerNorm {
            x,
            weight: self.weight,
            bias: self.bias,
            eps: self.eps,
            out,
        });
    }
}

/// `nn.Linear` with bias: `out = x · Wᵀ + b`.
pub struct Linear {
    weight: WeightId,
    bias: WeightId,
}

impl Linear {
    pub fn new(g: &mut PlanBuilder, prefix: &str, in_features: usize, out_features: usize) -> Self {
        Linear {
            weight: g.weight(format!("{prefix}.weight"), &[out_features, in_features]),
            bias: g.weight(format!("{prefix}.bias"), &[out_features]),
        }
    }

    /// A layer whose weight keeps another shape in the file (a conv kernel
    /// `[out, c, kh, kw]` read as `[out, c*kh*kw]`).
    pub fn new_with_shape(
        g: &mut PlanBuilder,
        prefix: &str,
        weight_shape: &[usize],
        out_features: usize,
    ) -> Self {
        Linear {
            weight: g.weight(format!("{prefix}.weight"), weight_shape),
            bias: g.weight(format!("{prefix}.bias"), &[out_features]),
        }
    }

    pub fn forward(&self, g: &mut PlanBuilder, x: BufId, out: BufId) {
        self.forward_rows(g, x, out, Rows::All);
    }

    pub fn forward_rows(&self, g: &mut PlanBuilder, x: BufId, out: BufId, rows: Rows) {
        self.push(g, x, out, rows, Epilogue::Store);
    }

    /// `out = gelu(x · wᵀ + b)`, the activation applied as the product is written.
    pub fn forward_gelu(&self, g: &mut PlanBuilder, x: BufId, out: BufId, kind: GeluKind) {
        let epilogue = match kind {
            GeluKind::Tanh => Epilogue::GeluTanh,
            GeluKind::Erf => Epilogue::GeluErf,
        };
        self.push(g, x, out, Rows::All, epilogue);
    }

    /// `h += x · wᵀ + b`: a residual branch's last layer writes into the stream.
    pub fn forward_residual(&self, g: &mut PlanBuilder, x: BufId, h: BufId) {
        self.push(g, x, h, Rows::All, Epilogue::Accumulate);
    }

    fn push(&self, g: &mut PlanBuilder, x: BufId, out: BufId, rows: Rows, epilogue: Epilogue) {
        g.push(Op::MatMul {
            x,
            w: self.weight,
            bias: Some(self.bias),
            out,
            rows,
            epilogue,
        });
    }
}

/// Activation buffers shared by every layer: a step allocates nothing.
struct Scratch {
    ln: BufId,
    q: BufId,
    k: BufId,
    v: BufId,
    attn: BufId,
    mlp_hidden: BufId,
}

/// Self-attention with partial rotary: q/k/v with biases, rotate-half RoPE on the
/// first `rotary_dims` of each head, softmax in f32, output projection `dense`.
pub struct PhiAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    dense: Linear,
    layer: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    rotary_dims: usize,
    rope_theta: f32,
}

impl PhiAttention {
    fn new(g: &mut PlanBuilder, prefix: &str, layer: usize, cfg: &PhiConfig) -> Self {
        let h = cfg.hidden_size;
        PhiAttention {
            q_proj: Linear::new(g, &format!("{prefix}.q_proj"), h, h),
            k_proj: Linear::new(g, &format!("{prefix}.k_proj"), h, cfg.kv_dim()),
            v_proj: Linear::new(g, &format!("{prefix}.v_proj"), h, cfg.kv_dim()),
            dense: Linear::new(g, &format!("{prefix}.dense"), h, h),
            layer,
            n_heads: cfg.num_attention_heads,
            n_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            rotary_dims: cfg.rotary_dims,
            rope_theta: cfg.rope_theta,
        }
    }

    /// `q, k, v = x W_q, x W_k, x W_v` (with biases)
    fn project(&self, g: &mut PlanBuilder, s: &Scratch, x: BufId) {
        self.q_proj.forward(g, x, s.q);
        self.k_proj.forward(g, x, s.k);
        self.v_proj.forward(g, x, s.v);
    }

    /// `h += dense(attention(rope(q), rope(k), v))`
    fn attend(&self, g: &mut PlanBuilder, s: &Scratch, h: BufId) {
        for (buf, heads) in [(s.q, self.n_heads), (s.k, self.n_kv_heads)] {
            g.push(Op::Rope {
                x: buf,
                n_heads: heads,
                head_dim: self.head_dim,
                rot_dims: self.rotary_dims,
                theta: self.rope_theta,
            });
        }
        g.push(Op::Attention {
            layer: self.layer,
            q: s.q,
            k: s.k,
            v: s.v,
            out: s.attn,
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            causal: true,
            // scale on the full head_dim, not the rotary slice
            scale: 1.0 / (self.head_dim as f32).sqrt(),
        });
        self.dense.forward_residual(g, s.attn, h);
    }
}

/// fc1 → tanh-GELU (`gelu_new`) → fc2.
pub struct PhiMlp {
    fc1: Linear,
    fc2: Linear,
}

impl PhiMlp {
    fn new(g: &mut PlanBuilder, prefix: &str, cfg: &PhiConfig) -> Self {
        PhiMlp {
            fc1: Linear::new(
                g,
                &format!("{prefix}.fc1"),
                cfg.hidden_size,
                cfg.intermediate_size,
            ),
            fc2: Linear::new(
                g,
                &format!("{prefix}.fc2"),
                cfg.intermediate_size,
                cfg.hidden_size,
            ),
        }
    }

    /// `hidden = gelu(fc1(x))`
    fn up(&self, g: &mut PlanBuilder, s: &Scratch, x: BufId) {
        self.fc1.forward_gelu(g, x, s.mlp_hidden, GeluKind::Tanh);
    }

    /// `h += fc2(hidden)`
    fn down(&self, g: &mut PlanBuilder, s: &Scratch, h: BufId) {
        self.fc2.forward_residual(g, s.mlp_hidden, h);
    }
}

/// Phi-2's parallel block: one shared input LayerNorm feeds both attention and
/// MLP, `h = h + dense(attn(LN(h))) + fc2(gelu(fc1(LN(h))))`.
pub struct PhiDecoderLayer {
    input_layernorm: LayerNorm,
    self_attn: PhiAttention,
    mlp: PhiMlp,
}

impl PhiDecoderLayer {
    fn new(g: &mut PlanBuilder, layer: usize, cfg: &PhiConfig) -> Self {
        let p = format!("model.layers.{layer}");
        PhiDecoderLayer {
            input_layernorm: LayerNorm::new(
                g,
                &format!("{p}.input_layernorm"),
                cfg.hidden_size,
                cfg.layer_norm_eps,
            ),
            self_attn: PhiAttention::new(g, &format!("{p}.self_attn"), layer, cfg),
            mlp: PhiMlp::new(g, &format!("{p}.mlp"), cfg),
        }
    }

    /// Both branches read `LN(h)`, so each adds into `h` as it finishes. The
    /// four matmuls that read `LN(h)` run back to back, so the CPU backend
    /// quantizes it to int8 once (fused into the LayerNorm) for all of them.
    fn forward(&self, g: &mut PlanBuilder, s: &Scratch, h: BufId) {
        self.input_layernorm.forward(g, h, s.ln);
        self.self_attn.project(g, s, s.ln);
        self.mlp.up(g, s, s.ln);
        self.self_attn.attend(g, s, h);
        self.mlp.down(g, s, h);
    }
}

/// Names of the buffers a Phi-2 plan taps, for conformance checks.
pub const TAP_LAYER_OUTPUT: &str = "lm.layer_outputs";
pub const TAP_FINAL_HIDDEN: &str = "lm.final_hidden";
pub const TAP_INPUTS_EMBEDS: &str = "inputs_embeds";

/// `PhiForCausalLM`: embeddings, decoder layers, final LayerNorm, untied lm_head
/// with bias.
pub struct PhiForCausalLM {
    embed_tokens: WeightId,
    layers: Vec<PhiDecoderLayer>,
    final_layernorm: LayerNorm,
    lm_head: Linear,
}

impl PhiForCausalLM {
    /// The plan of one step over up to `max_tokens` rows, computing logits for up
    /// to `max_outputs` of them. Taps: `inputs_embeds`, `lm.layer_outputs.{i}`,
    /// `lm.final_hidden`.
    pub fn plan(cfg: &PhiConfig, max_tokens: usize, max_outputs: usize) -> Plan {
        let h = cfg.hidden_size;
        let mut g = PlanBuilder::new(max_tokens, max_outputs, h);
        let model = PhiForCausalLM {
            embed_tokens: g.weight("model.embed_tokens.weight", &[cfg.vocab_size, h]),
            layers: (0..cfg.num_hidden_layers)
                .map(|i| PhiDecoderLayer::new(&mut g, i, cfg))
                .collect(),
            final_layernorm: LayerNorm::new(&mut g, "model.final_layernorm", h, cfg.layer_norm_eps),
            lm_head: Linear::new(&mut g, "lm_head", h, cfg.vocab_size),
        };
        let s = Scratch {
            ln: g.buffer("ln", h),
            q: g.buffer("q", h),
            k: g.buffer("k", cfg.kv_dim()),
            v: g.buffer("v", cfg.kv_dim()),
            attn: g.buffer("attn", h),
            mlp_hidden: g.buffer("mlp_hidden", cfg.intermediate_size),
        };
        g.set_kv(KvShape {
            n_layers: cfg.num_hidden_layers,
            kv_dim: cfg.kv_dim(),
        });
        let hidden = g.buffer("hidden", h);
        let logits = g.buffer("logits", cfg.vocab_size);
        model.forward(&mut g, &s, hidden, logits);
        g.finish(logits)
    }

    fn forward(&self, g: &mut PlanBuilder, s: &Scratch, hidden: BufId, logits: BufId) {
        g.push(Op::Embed {
            table: self.embed_tokens,
            out: hidden,
        });
        g.push(Op::Tap {
            x: hidden,
            name: TAP_INPUTS_EMBEDS.into(),
        });
        for (i, layer) in self.layers.iter().enumerate() {
            layer.forward(g, s, hidden);
            g.push(Op::Tap {
                x: hidden,
                name: format!("{TAP_LAYER_OUTPUT}.{i}"),
            });
        }
        self.final_layernorm.forward(g, hidden, s.ln);
        g.push(Op::Tap {
            x: s.ln,
            name: TAP_FINAL_HIDDEN.into(),
        });
        self.lm_head.forward_rows(g, s.ln, logits, Rows::Outputs);
    }
}
