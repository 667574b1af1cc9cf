//! Hyper-parameters read from `.mqf` metadata (keys: `docs/mqf-keys.md`).

use mipha_runtime::{Error, Metadata, Result};

use crate::limits::ModelLimits;

/// The Phi-2 language model's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct PhiConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    /// leading dims of each head that get rotary embedding (`partial_rotary_factor`)
    pub rotary_dims: usize,
    pub rope_theta: f32,
    pub layer_norm_eps: f32,
    pub max_position_embeddings: usize,
}

/// A hyper-parameter in `1..=` its [`ModelLimits`] bound.
fn usize_key(m: &Metadata, key: &str, limits: &ModelLimits) -> Result<usize> {
    limits.count(m, key, limits.for_key(key))
}

/// A finite, positive float.
fn positive_f32(m: &Metadata, key: &str) -> Result<f32> {
    let v = m.get_f64(key)?;
    let f = v as f32;
    if !(f.is_finite() && f > 0.0) {
        return Err(Error::Config(format!(
            "`{key}` = {v} must be a finite positive number"
        )));
    }
    Ok(f)
}

impl PhiConfig {
    /// Reads and checks the `lm.*` keys against the default [`ModelLimits`].
    pub fn from_metadata(m: &Metadata) -> Result<Self> {
        Self::from_metadata_with(m, &ModelLimits::default())
    }

    pub fn from_metadata_with(m: &Metadata, limits: &ModelLimits) -> Result<Self> {
        let usize_key = |key: &str| usize_key(m, key, limits);
        let arch = m.get_str("general.architecture")?;
        if arch != "mipha-phi" {
            return Err(Error::Config(format!(
                "architecture `{arch}` is not supported (expected `mipha-phi`)"
            )));
        }
        let act = m.get_str("lm.hidden_act")?;
        if act != "gelu_new" && act != "gelu_pytorch_tanh" {
            return Err(Error::Config(format!(
                "lm.hidden_act `{act}` is not supported (Phi-2 uses gelu_new)"
            )));
        }
        let cfg = PhiConfig {
            vocab_size: usize_key("lm.vocab_size")?,
            hidden_size: usize_key("lm.hidden_size")?,
            intermediate_size: usize_key("lm.intermediate_size")?,
            num_hidden_layers: usize_key("lm.num_hidden_layers")?,
            num_attention_heads: usize_key("lm.num_attention_heads")?,
            num_key_value_heads: usize_key("lm.num_key_value_heads")?,
            head_dim: usize_key("lm.head_dim")?,
            rotary_dims: crate::limits::check_range(
                "lm.rotary_dims",
                m.get_u64("lm.rotary_dims")?,
                0,
                limits.max_head_dim,
            )?,
            rope_theta: positive_f32(m, "lm.rope_theta")?,
            layer_norm_eps: positive_f32(m, "lm.layer_norm_eps")?,
            max_position_embeddings: usize_key("lm.max_position_embeddings")?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        let bad = |s: String| Err(Error::Config(s));
        if self.num_attention_heads.checked_mul(self.head_dim) != Some(self.hidden_size) {
            return bad(format!(
                "{} heads x head_dim {} != hidden_size {}",
                self.num_attention_heads, self.head_dim, self.hidden_size
            ));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return bad(format!(
                "{} attention heads are not a multiple of {} key/value heads",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.rotary_dims > self.head_dim || !self.rotary_dims.is_multiple_of(2) {
            return bad(format!(
                "rotary_dims {} must be even and at most head_dim {}",
                self.rotary_dims, self.head_dim
            ));
        }
        if self.layer_norm_eps.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater)
            || self.rope_theta.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater)
        {
            return bad("layer_norm_eps and rope_theta must be positive".into());
        }
        Ok(())
    }

    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }
}

/// The SigLIP vision tower and the `mlp2x_gelu` projector.
#[derive(Clone, Debug, PartialEq)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    /// encoder layers in the file: those up to the selected one (the converter
    /// drops the rest), so the tower's output is the selected hidden state
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub head_dim: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub layer_norm_eps: f32,
    /// `mm_projector.0` input and output widths (`projector.input_size`, `projector.hidden_size`)
    pub projector_input: usize,
    pub projector_hidden: usize,
}

impl VisionConfig {
    /// `None` when the file has no vision tower (a text-only model). Checked
    /// against the default [`ModelLimits`].
    pub fn from_metadata(m: &Metadata) -> Result<Option<Self>> {
        Self::from_metadata_with(m, &ModelLimits::default())
    }

    pub fn from_metadata_with(m: &Metadata, limits: &ModelLimits) -> Result<Option<Self>> {
        let usize_key = |key: &str| usize_key(m, key, limits);
        if m.get("vision.hidden_size").is_none() {
            return Ok(None);
        }
        for (key, want) in [
            ("vision.hidden_act", &["gelu_pytorch_tanh", "gelu_new"][..]),
            ("vision.select_feature", &["patch", "cls_patch"][..]),
            ("projector.type", &["mlp2x_gelu"][..]),
        ] {
            let v = m.get_str(key)?;
            if !want.contains(&v) {
                return Err(Error::Config(format!("{key} `{v}` is not supported")));
            }
        }
        let hidden_size = usize_key("vision.hidden_size")?;
        let heads = usize_key("vision.num_attention_heads")?;
        if !hidden_size.is_multiple_of(heads) {
            return Err(Error::Config(format!(
                "vision hidden size {hidden_size} is not a multiple of {heads} heads"
            )));
        }
        let cfg = VisionConfig {
            hidden_size,
            intermediate_size: usize_key("vision.intermediate_size")?,
            // 0 is a tower cut before its first layer (the embeddings' output)
            num_hidden_layers: crate::limits::check_range(
                "vision.num_hidden_layers",
                m.get_u64("vision.num_hidden_layers")?,
                0,
                limits.max_layers,
            )?,
            num_attention_heads: heads,
            head_dim: hidden_size / heads,
            image_size: usize_key("vision.image_size")?,
            patch_size: usize_key("vision.patch_size")?,
            num_channels: usize_key("vision.num_channels")?,
            layer_norm_eps: positive_f32(m, "vision.layer_norm_eps")?,
            projector_input: usize_key("projector.input_size")?,
            projector_hidden: usize_key("projector.hidden_size")?,
        };
        if cfg.projector_input != cfg.hidden_size {
            return Err(Error::Config(format!(
                "projector input {} != vision hidden size {}",
                cfg.projector_input, cfg.hidden_size
            )));
        }
        if cfg.patch_size > cfg.image_size {
            return Err(Error::Config(format!(
                "`vision.patch_size` = {} is larger than `vision.image_size` = {}",
                cfg.patch_size, cfg.image_size
            )));
        }
        if cfg.head_dim > limits.max_head_dim {
            return Err(Error::Config(format!(
                "vision heads of {} dims (`vision.hidden_size` / `vision.num_attention_heads`) \
                 exceed the limit of {}",
                cfg.head_dim, limits.max_head_dim
            )));
        }
        if cfg.num_patches() > limits.max_patches {
            return Err(Error::Config(format!(
                "`vision.image_size` = {} in patches of `vision.patch_size` = {} makes {} \
                 positions a picture, the limit is {}",
                cfg.image_size,
                cfg.patch_size,
                cfg.num_patches(),
                limits.max_patches
            )));
        }
        Ok(Some(cfg))
    }

    /// Patches per side: the stride-`patch` "valid" convolution drops the remainder
    /// (27 for 384 px and 14 px patches).
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }

    pub fn num_patches(&self) -> usize {
        self.patches_per_side() * self.patches_per_side()
    }

    /// Values of one flattened patch, in the conv weight's `[c, kh, kw]` order.
    pub fn patch_len(&self) -> usize {
        self.num_channels * self.patch_size * self.patch_size
    }
}
