//! Which tensors a Mipha `.mqf` file holds, their shapes (from the config), and the
//! type each is stored in.

use mipha_kernels::QuantType;

use crate::config::ModelConfig;

pub const VISION_PREFIX: &str = "model.vision_tower.vision_model.";
pub const PROJECTOR_PREFIX: &str = "model.mm_projector.";

/// Which `--quant` option governs a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// The language model, embeddings and lm_head: `--quant`.
    Lm,
    /// The vision tower and the projector: `--vision-quant`.
    Vision,
}

/// How `synth` initialises a tensor (see [`crate::synth`] for the reasoning).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// normal(0, std)
    Normal(f32),
    /// 1 + normal(0, std): LayerNorm gains.
    OnePlusNormal(f32),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Expected {
    pub name: String,
    pub shape: Vec<usize>,
    pub part: Part,
    /// Stored F32 whatever the requested type: 1-D tensors, the conv patch embedding
    /// and the position embedding (added to activations, tiny, precision-sensitive).
    pub always_f32: bool,
    pub init: Init,
}

/// Std of a bias in `synth`: small against activations of unit scale.
const BIAS_STD: f32 = 0.01;
/// Embedding tables in `synth`: the customary 0.02 (GPT-2, Phi `initializer_range`).
const EMBED_STD: f32 = 0.02;

/// Every tensor the `.mqf` file holds, in the file's order: language model (embedding,
/// layers, final norm, lm_head), vision tower (kept layers only), projector.
pub fn expected_tensors(cfg: &ModelConfig) -> Vec<Expected> {
    let mut v = Vec::new();
    let lm = &cfg.lm;
    let h = lm.hidden_size;
    let kv = lm.num_key_value_heads * lm.head_dim;
    let lecun = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
    // Residual-branch outputs are scaled down by sqrt(2 * layers) (GPT-2's rule), so
    // the residual stream's variance grows by O(1) over the whole stack, not per layer.
    let resid = |fan_in: usize, layers: usize| lecun(fan_in) / ((2 * layers.max(1)) as f32).sqrt();

    let mut push = |name: String, shape: Vec<usize>, part: Part, init: Init| {
        let always_f32 = shape.len() == 1;
        v.push(Expected {
            name,
            shape,
            part,
            always_f32,
            init,
        });
    };
    let norm =
        |push: &mut dyn FnMut(String, Vec<usize>, Part, Init), base: &str, n: usize, part| {
            push(
                format!("{base}.weight"),
                vec![n],
                part,
                Init::OnePlusNormal(0.02),
            );
            push(
                format!("{base}.bias"),
                vec![n],
                part,
                Init::Normal(BIAS_STD),
            );
        };
    let linear = |push: &mut dyn FnMut(String, Vec<usize>, Part, Init),
                  base: &str,
                  out: usize,
                  inp: usize,
                  std: f32,
                  part| {
        push(
            format!("{base}.weight"),
            vec![out, inp],
            part,
            Init::Normal(std),
        );
        push(
            format!("{base}.bias"),
            vec![out],
            part,
            Init::Normal(BIAS_STD),
        );
    };

    push(
        "model.embed_tokens.weight".into(),
        vec![lm.vocab_size, h],
        Part::Lm,
        Init::Normal(EMBED_STD),
    );
    let n = lm.num_hidden_layers;
    for i in 0..n {
        let p = format!("model.layers.{i}");
        norm(&mut push, &format!("{p}.input_layernorm"), h, Part::Lm);
        linear(
            &mut push,
            &format!("{p}.self_attn.q_proj"),
            h,
            h,
            lecun(h),
            Part::Lm,
        );
        linear(
            &mut push,
            &format!("{p}.self_attn.k_proj"),
            kv,
            h,
            lecun(h),
            Part::Lm,
        );
        linear(
            &mut push,
            &format!("{p}.self_attn.v_proj"),
            kv,
            h,
            lecun(h),
            Part::Lm,
        );
        linear(
            &mut push,
            &format!("{p}.self_attn.dense"),
            h,
            h,
            resid(h, n),
            Part::Lm,
        );
        let im = lm.intermediate_size;
        linear(
            &mut push,
            &format!("{p}.mlp.fc1"),
            im,
            h,
            lecun(h),
            Part::Lm,
        );
        linear(
            &mut push,
            &format!("{p}.mlp.fc2"),
            h,
            im,
            resid(im, n),
            Part::Lm,
        );
    }
    norm(&mut push, "model.final_layernorm", h, Part::Lm);
    linear(&mut push, "lm_head", lm.vocab_size, h, lecun(h), Part::Lm);

    let vc = &cfg.vision;
    let vh = vc.hidden_size;
    let vp = VISION_PREFIX;
    let patch_fan_in = vc.num_channels * vc.patch_size * vc.patch_size;
    push(
        format!("{vp}embeddings.patch_embedding.weight"),
        vec![vh, vc.num_channels, vc.patch_size, vc.patch_size],
        Part::Vision,
        Init::Normal(lecun(patch_fan_in)),
    );
    push(
        format!("{vp}embeddings.patch_embedding.bias"),
        vec![vh],
        Part::Vision,
        Init::Normal(BIAS_STD),
    );
    push(
        format!("{vp}embeddings.position_embedding.weight"),
        vec![vc.num_patches(), vh],
        Part::Vision,
        Init::Normal(EMBED_STD),
    );
    let vn = vc.kept_layers;
    for i in 0..vn {
        let p = format!("{vp}encoder.layers.{i}");
        norm(&mut push, &format!("{p}.layer_norm1"), vh, Part::Vision);
        for proj in ["q_proj", "k_proj", "v_proj"] {
            linear(
                &mut push,
                &format!("{p}.self_attn.{proj}"),
                vh,
                vh,
                lecun(vh),
                Part::Vision,
            );
        }
        linear(
            &mut push,
            &format!("{p}.self_attn.out_proj"),
            vh,
            vh,
            resid(vh, vn),
            Part::Vision,
        );
        norm(&mut push, &format!("{p}.layer_norm2"), vh, Part::Vision);
        let vi = vc.intermediate_size;
        linear(
            &mut push,
            &format!("{p}.mlp.fc1"),
            vi,
            vh,
            lecun(vh),
            Part::Vision,
        );
        linear(
            &mut push,
            &format!("{p}.mlp.fc2"),
            vh,
            vi,
            resid(vi, vn),
            Part::Vision,
        );
    }

    let pc = &cfg.projector;
    let pp = PROJECTOR_PREFIX;
    linear(
        &mut push,
        &format!("{pp}0"),
        pc.hidden_size,
        pc.input_size,
        lecun(pc.input_size),
        Part::Vision,
    );
    linear(
        &mut push,
        &format!("{pp}2"),
        pc.hidden_size,
        pc.hidden_size,
        lecun(pc.hidden_size),
        Part::Vision,
    );

    for e in &mut v {
        if e.name.ends_with("patch_embedding.weight")
            || e.name.ends_with("position_embedding.weight")
        {
            e.always_f32 = true;
        }
    }
    v
}

/// Checkpoint tensors inference never reads: tower layers past the selected hidden
/// state, the post-layernorm and pooling head (only applied to the last hidden
/// state), and non-persistent buffers some exporters still save.
pub fn is_droppable(name: &str, cfg: &ModelConfig) -> bool {
    if let Some(rest) = name.strip_prefix(VISION_PREFIX) {
        if rest.starts_with("post_layernorm.") || rest.starts_with("head.") {
            return true;
        }
        if let Some(layer) = rest.strip_prefix("encoder.layers.") {
            if let Some(idx) = layer
                .split('.')
                .next()
                .and_then(|s| s.parse::<usize>().ok())
            {
                return idx >= cfg.vision.kept_layers && idx < cfg.vision.num_hidden_layers;
            }
        }
    }
    const BUFFERS: [&str; 5] = [
        ".position_ids",
        ".inv_freq",
        ".cos_cached",
        ".sin_cached",
        ".masked_bias",
    ];
    BUFFERS.iter().any(|b| name.ends_with(b))
}

/// The type a tensor is stored in, and the fallback line when that differs from the
/// request. `max_abs` is the largest finite magnitude in the tensor.
pub fn choose_type(
    e: &Expected,
    quant: QuantType,
    vision_quant: QuantType,
    max_abs: f32,
) -> (QuantType, Option<String>) {
    if e.always_f32 {
        return (QuantType::F32, None);
    }
    let requested = match e.part {
        Part::Lm => quant,
        Part::Vision => vision_quant,
    };
    match representable(requested, max_abs) {
        Ok(()) => (requested, None),
        Err(reason) => (
            QuantType::F32,
            Some(format!(
                "{}: {} -> {} ({reason})",
                e.name,
                requested,
                QuantType::F32
            )),
        ),
    }
}

/// Whether `ty` can store values up to `max_abs` without overflowing to infinity.
fn representable(ty: QuantType, max_abs: f32) -> Result<(), String> {
    const F16_MAX: f32 = 65504.0;
    let limit = match ty {
        QuantType::F32 => return Ok(()),
        // bf16 shares f32's exponent: only values rounding above its max overflow.
        QuantType::BF16 => 3.389_531_4e38,
        QuantType::F16 => F16_MAX,
        // The per-block scale is an f16: d = amax / 127.
        QuantType::Q8_0 => F16_MAX * 127.0,
        // d = max / -8.
        QuantType::Q4_0 => F16_MAX * 8.0,
    };
    if max_abs > limit {
        Err(format!(
            "max |x| = {max_abs:e} exceeds the {ty} range {limit:e}"
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use std::path::Path;

    fn cfg(p: &str) -> ModelConfig {
        ModelConfig::from_file(Path::new(p)).unwrap()
    }

    fn tiny() -> ModelConfig {
        cfg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/tiny-a/checkpoint/config.json"
        ))
    }

    #[test]
    fn full_model_counts() {
        let c = cfg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../assets/mipha-3b/config.json"
        ));
        let e = expected_tensors(&c);
        // LM: embed + 32 * 14 + final norm 2 + lm_head 2; vision: 3 + 26 * 16; projector 4
        // = the checkpoint's 905 tensors less the 29 dropped.
        assert_eq!(e.len(), 1 + 32 * 14 + 2 + 2 + 3 + 26 * 16 + 4);
        assert_eq!(e.len(), 905 - 29);
        let params: usize = e.iter().map(|t| t.shape.iter().product::<usize>()).sum();
        // 3,217,417,280 in the checkpoint less layer 26 (15,239,504), post_layernorm
        // (2,304) and the pooling head (15,238,352).
        assert_eq!(params, 3_186_937_120);
        let names: std::collections::HashSet<_> = e.iter().map(|t| &t.name).collect();
        assert_eq!(names.len(), e.len(), "duplicate names");
    }

    #[test]
    fn droppable() {
        let c = tiny();
        assert!(is_droppable(
            "model.vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight",
            &c
        ));
        assert!(!is_droppable(
            "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
            &c
        ));
        assert!(is_droppable(
            "model.vision_tower.vision_model.head.probe",
            &c
        ));
        assert!(is_droppable(
            "model.vision_tower.vision_model.post_layernorm.bias",
            &c
        ));
        assert!(!is_droppable("model.layers.1.mlp.fc1.weight", &c));
        assert!(!is_droppable(
            "model.vision_tower.vision_model.encoder.layers.7.mlp.fc1.weight",
            &c
        ));
    }

    #[test]
    fn types_and_fallbacks() {
        let c = tiny();
        let e = expected_tensors(&c);
        let find = |n: &str| e.iter().find(|t| t.name.ends_with(n)).unwrap().clone();
        let q = find("model.layers.0.self_attn.q_proj.weight");
        let vq = find("encoder.layers.0.self_attn.q_proj.weight");
        let patch = find("patch_embedding.weight");
        let bias = find("model.layers.0.self_attn.q_proj.bias");
        use QuantType::*;
        assert_eq!(choose_type(&q, Q4_0, Q8_0, 1.0), (Q4_0, None));
        assert_eq!(choose_type(&vq, Q4_0, Q8_0, 1.0), (Q8_0, None));
        assert_eq!(choose_type(&patch, Q4_0, Q4_0, 1.0), (F32, None));
        assert_eq!(choose_type(&bias, Q4_0, Q4_0, 1.0), (F32, None));
        let (ty, fb) = choose_type(&q, F16, F16, 70000.0);
        assert_eq!(ty, F32);
        let fb = fb.unwrap();
        assert!(
            fb.starts_with("model.layers.0.self_attn.q_proj.weight: f16 -> f32 (max |x| = 7e4"),
            "{fb}"
        );
        assert_eq!(choose_type(&q, Q8_0, Q8_0, 70000.0), (Q8_0, None));
        assert_eq!(choose_type(&q, Q4_0, Q4_0, 600000.0).0, F32);
        assert_eq!(choose_type(&q, BF16, BF16, 3.0e38), (BF16, None));
    }
}
