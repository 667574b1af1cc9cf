//! The hyper-parameters of a Mipha checkpoint, read from `config.json` and
//! `preprocessor_config.json`.
//!
//! Optional keys default to the values of the transformers classes the checkpoint was
//! saved from (`PhiConfig`, `SiglipVisionConfig`, `SiglipImageProcessor`): a key that
//! `save_pretrained` always writes can only be missing from a hand-made config, and
//! there the class default is what transformers itself would use.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{ConvertError, Result};

/// Most layers accepted in either tower (Mipha-3B has 32 and 27): the tensor plan
/// lists every layer's tensors, so a hostile count must not drive it.
pub const MAX_LAYERS: usize = 4096;
/// Largest width, vocabulary or context accepted: far above any real model, and
/// small enough that the products the plan forms (rows x columns, patches x
/// width) cannot overflow.
pub const MAX_DIM: usize = 1 << 31;
/// Largest `vision_tower.image_size` (the runtime's limit on `image.size`), so
/// that `(image_size / patch_size)^2` patches cannot overflow.
pub const MAX_IMAGE_SIDE: usize = 8192;

/// Phi-2 language model hyper-parameters (top level of `config.json`).
#[derive(Clone, Debug, PartialEq)]
pub struct LmConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub partial_rotary_factor: f64,
    pub rotary_dims: usize,
    pub rope_theta: f64,
    pub layer_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub hidden_act: String,
}

/// SigLIP vision tower (`vision_config.vision_tower`).
#[derive(Clone, Debug, PartialEq)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    /// Layers in the checkpoint.
    pub num_hidden_layers: usize,
    /// Layers whose output reaches the selected hidden state; the rest are dropped.
    pub kept_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: String,
    pub select_layer: i64,
    pub select_feature: String,
}

impl VisionConfig {
    pub fn num_patches(&self) -> usize {
        let side = self.image_size / self.patch_size;
        side * side
    }
}

/// Multimodal projector (`vision_config.mm_projector`).
#[derive(Clone, Debug, PartialEq)]
pub struct ProjectorConfig {
    pub ty: String,
    pub input_size: usize,
    pub hidden_size: usize,
}

/// Everything the converter needs from `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub name: Option<String>,
    pub lm: LmConfig,
    pub vision: VisionConfig,
    pub projector: ProjectorConfig,
    pub image_aspect_ratio: String,
}

/// Image preprocessing (`preprocessor_config.json`).
#[derive(Clone, Debug, PartialEq)]
pub struct ImageConfig {
    /// `[height, width]` after resizing.
    pub size: [u64; 2],
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
    pub rescale_factor: f64,
    pub resample: String,
}

impl ImageConfig {
    /// SigLIP's processor defaults at the tower's resolution: used when a checkpoint
    /// ships no `preprocessor_config.json`.
    pub fn siglip_default(image_size: usize) -> Self {
        ImageConfig {
            size: [image_size as u64, image_size as u64],
            mean: vec![0.5; 3],
            std: vec![0.5; 3],
            rescale_factor: 1.0 / 255.0,
            resample: "bicubic".into(),
        }
    }

    /// Background of `expand2square`: `int(m * 255)` per channel, as the authors compute it.
    pub fn pad_color(&self) -> Vec<u64> {
        self.mean
            .iter()
            .map(|m| (m * 255.0).clamp(0.0, 255.0) as u64)
            .collect()
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let root = read_json(path)?;
        let j = Json {
            path,
            prefix: String::new(),
            v: &root,
        };
        let size = match j.opt("size") {
            Some(s) if s.v.get("height").is_some() || s.v.get("width").is_some() => {
                [s.u64("height")?, s.u64("width")?]
            }
            Some(s) if s.v.get("shortest_edge").is_some() => {
                // Only square SigLIP-style resizing is implemented by the runtime.
                return Err(ConvertError::Unsupported {
                    path: path.into(),
                    detail: format!(
                        "`size.shortest_edge` ({}) is not supported; expected `size.height`/`size.width`",
                        s.v["shortest_edge"]
                    ),
                });
            }
            Some(s) => {
                let n = s.as_u64()?;
                [n, n]
            }
            None => return Err(j.missing("size")),
        };
        let resample = match j.opt("resample") {
            None => "bicubic".to_string(),
            Some(r) => match r.as_u64()? {
                0 => "nearest".into(),
                1 => "lanczos".into(),
                2 => "bilinear".into(),
                3 => "bicubic".into(),
                4 => "box".into(),
                5 => "hamming".into(),
                n => return Err(j.bad("resample", &format!("is {n}, not a PIL filter (0..=5)"))),
            },
        };
        let mean = j.opt("image_mean").map(|m| m.f64_array()).transpose()?;
        let std = j.opt("image_std").map(|m| m.f64_array()).transpose()?;
        let cfg = ImageConfig {
            size,
            mean: mean.unwrap_or_else(|| vec![0.5; 3]),
            std: std.unwrap_or_else(|| vec![0.5; 3]),
            rescale_factor: j.opt_f64("rescale_factor")?.unwrap_or(1.0 / 255.0),
            resample,
        };
        if cfg.mean.len() != 3 || cfg.std.len() != 3 {
            return Err(j.bad("image_mean", "and `image_std` must have 3 entries (RGB)"));
        }
        if cfg.std.contains(&0.0) {
            return Err(j.bad("image_std", "must not contain 0"));
        }
        Ok(cfg)
    }
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let root = read_json(path)?;
        Self::from_value(path, &root)
    }

    /// `path` only labels errors.
    pub fn from_value(path: &Path, root: &Value) -> Result<Self> {
        let top = Json {
            path,
            prefix: String::new(),
            v: root,
        };
        if let Some(mt) = top.opt("model_type") {
            let mt = mt.as_str()?;
            if mt != "mipha_phi" {
                return Err(ConvertError::Unsupported {
                    path: path.into(),
                    detail: format!("model_type `{mt}`: only `mipha_phi` (Mipha-3B) is supported"),
                });
            }
        }
        if top.opt("qk_layernorm").map(|v| v.as_bool()).transpose()? == Some(true) {
            return Err(unsupported(path, "qk_layernorm = true is not supported"));
        }
        if top.opt("rope_scaling").is_some() {
            return Err(unsupported(path, "rope_scaling is not supported"));
        }
        if top
            .opt("tie_word_embeddings")
            .map(|v| v.as_bool())
            .transpose()?
            == Some(true)
        {
            return Err(unsupported(
                path,
                "tie_word_embeddings = true is not supported (Mipha-3B has a separate lm_head)",
            ));
        }

        let hidden_size = top.usize("hidden_size")?;
        let num_attention_heads = top.usize("num_attention_heads")?;
        if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
            return Err(top.bad(
                "num_attention_heads",
                &format!("({num_attention_heads}) must divide hidden_size ({hidden_size})"),
            ));
        }
        let head_dim = hidden_size / num_attention_heads;
        let num_key_value_heads = top
            .opt_usize("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(top.bad(
                "num_key_value_heads",
                &format!("({num_key_value_heads}) must divide num_attention_heads ({num_attention_heads})"),
            ));
        }
        let partial_rotary_factor = top.opt_f64("partial_rotary_factor")?.unwrap_or(0.5);
        if !(0.0..=1.0).contains(&partial_rotary_factor) {
            return Err(top.bad("partial_rotary_factor", "must be within [0, 1]"));
        }
        // transformers: int(head_dim * partial_rotary_factor), i.e. truncation.
        let rotary_dims = (head_dim as f64 * partial_rotary_factor) as usize;
        let lm = LmConfig {
            vocab_size: top.usize("vocab_size")?,
            hidden_size,
            intermediate_size: top.usize("intermediate_size")?,
            num_hidden_layers: top.usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            partial_rotary_factor,
            rotary_dims,
            rope_theta: top.opt_f64("rope_theta")?.unwrap_or(10000.0),
            layer_norm_eps: top.opt_f64("layer_norm_eps")?.unwrap_or(1e-5),
            max_position_embeddings: top.opt_usize("max_position_embeddings")?.unwrap_or(2048),
            hidden_act: top.opt_str("hidden_act")?.unwrap_or("gelu_new").to_string(),
        };
        for (key, v) in [
            ("vocab_size", lm.vocab_size),
            ("hidden_size", lm.hidden_size),
            ("intermediate_size", lm.intermediate_size),
            ("num_hidden_layers", lm.num_hidden_layers),
        ] {
            if v == 0 {
                return Err(top.bad(key, "must be positive"));
            }
        }
        top.at_most("num_hidden_layers", lm.num_hidden_layers, MAX_LAYERS)?;
        for (key, v) in [
            ("vocab_size", lm.vocab_size),
            ("hidden_size", lm.hidden_size),
            ("intermediate_size", lm.intermediate_size),
            ("max_position_embeddings", lm.max_position_embeddings),
        ] {
            top.at_most(key, v, MAX_DIM)?;
        }

        let vc = top.obj("vision_config")?;
        let vt = vc.obj("vision_tower")?;
        let mp = vc.obj("mm_projector")?;

        let v_hidden = vt.usize("hidden_size")?;
        let v_heads = vt.usize("num_attention_heads")?;
        if v_heads == 0 || v_hidden % v_heads != 0 {
            return Err(vt.bad(
                "num_attention_heads",
                &format!("({v_heads}) must divide hidden_size ({v_hidden})"),
            ));
        }
        vt.at_most("hidden_size", v_hidden, MAX_DIM)?;
        let v_layers = vt.usize("num_hidden_layers")?;
        vt.at_most("num_hidden_layers", v_layers, MAX_LAYERS)?;
        let select_layer = vt.i64("mm_vision_select_layer")?;
        // hidden_states has v_layers + 1 entries (embeddings, then each layer's output);
        // entry k is the output of layer k - 1, so layers 0..k are the ones that matter.
        // (v_layers is at most MAX_LAYERS; the sum is checked for a hostile select_layer.)
        let selected = if select_layer < 0 {
            (v_layers as i64 + 1)
                .checked_add(select_layer)
                .unwrap_or(-1)
        } else {
            select_layer
        };
        if selected < 0 || selected > v_layers as i64 {
            return Err(vt.bad(
                "mm_vision_select_layer",
                &format!(
                    "({select_layer}) is outside the {} hidden states of a {v_layers}-layer tower",
                    v_layers + 1
                ),
            ));
        }
        let select_feature = vt
            .opt_str("mm_vision_select_feature")?
            .unwrap_or("patch")
            .to_string();
        if select_feature != "patch" && select_feature != "cls_patch" {
            return Err(vt.bad(
                "mm_vision_select_feature",
                &format!("`{select_feature}` is not `patch` or `cls_patch`"),
            ));
        }
        let image_size = vt.usize("image_size")?;
        vt.at_most("image_size", image_size, MAX_IMAGE_SIDE)?;
        let patch_size = vt.usize("patch_size")?;
        if patch_size == 0 || patch_size > image_size {
            return Err(vt.bad(
                "patch_size",
                &format!("({patch_size}) must be within 1..=image_size ({image_size})"),
            ));
        }
        let v_intermediate = vt.usize("intermediate_size")?;
        vt.at_most("intermediate_size", v_intermediate, MAX_DIM)?;
        let num_channels = vt.opt_usize("num_channels")?.unwrap_or(3);
        vt.at_most("num_channels", num_channels, MAX_DIM)?;
        let vision = VisionConfig {
            hidden_size: v_hidden,
            intermediate_size: v_intermediate,
            num_hidden_layers: v_layers,
            kept_layers: selected as usize,
            num_attention_heads: v_heads,
            image_size,
            patch_size,
            num_channels,
            layer_norm_eps: vt.opt_f64("layer_norm_eps")?.unwrap_or(1e-6),
            hidden_act: vt
                .opt_str("hidden_act")?
                .unwrap_or("gelu_pytorch_tanh")
                .to_string(),
            select_layer,
            select_feature,
        };

        let ty = mp.str("mm_projector_type")?.to_string();
        if ty != "mlp2x_gelu" {
            return Err(ConvertError::Unsupported {
                path: path.into(),
                detail: format!(
                    "vision_config.mm_projector.mm_projector_type `{ty}`: only `mlp2x_gelu` is supported"
                ),
            });
        }
        let projector = ProjectorConfig {
            ty,
            input_size: mp.usize("mm_hidden_size")?,
            hidden_size: mp.usize("hidden_size")?,
        };
        if projector.input_size != vision.hidden_size {
            return Err(mp.bad(
                "mm_hidden_size",
                &format!(
                    "({}) differs from the vision tower's hidden_size ({})",
                    projector.input_size, vision.hidden_size
                ),
            ));
        }
        if projector.hidden_size != lm.hidden_size {
            return Err(mp.bad(
                "hidden_size",
                &format!(
                    "({}) differs from the language model's hidden_size ({})",
                    projector.hidden_size, lm.hidden_size
                ),
            ));
        }

        let name = top
            .opt_str("_name_or_path")?
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        // LLaVA's default: anything but `pad` is a plain resize.
        let image_aspect_ratio = top
            .opt_str("image_aspect_ratio")?
            .unwrap_or("square")
            .to_string();
        Ok(ModelConfig {
            name,
            lm,
            vision,
            projector,
            image_aspect_ratio,
        })
    }
}

fn unsupported(path: &Path, detail: &str) -> ConvertError {
    ConvertError::Unsupported {
        path: path.into(),
        detail: detail.into(),
    }
}

pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let bytes = std::fs::read(path).map_err(|e| ConvertError::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|source| ConvertError::Json {
        path: path.into(),
        source,
    })
}

/// A JSON node that knows its dotted path, so that errors name the exact key.
struct Json<'a> {
    path: &'a Path,
    prefix: String,
    v: &'a Value,
}

impl<'a> Json<'a> {
    fn key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    fn err(&self, key: String, problem: &str) -> ConvertError {
        ConvertError::ConfigKey {
            path: PathBuf::from(self.path),
            key,
            problem: problem.to_string(),
        }
    }

    fn missing(&self, key: &str) -> ConvertError {
        self.err(self.key(key), "is missing")
    }

    fn bad(&self, key: &str, problem: &str) -> ConvertError {
        self.err(self.key(key), problem)
    }

    /// Refuses `v` (the value of `key`) above `max`.
    fn at_most(&self, key: &str, v: usize, max: usize) -> Result<()> {
        if v > max {
            return Err(self.bad(key, &format!("({v}) is above the supported maximum {max}")));
        }
        Ok(())
    }

    /// `null` counts as absent, as transformers treats it.
    fn opt(&self, key: &str) -> Option<Json<'a>> {
        match self.v.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => Some(Json {
                path: self.path,
                prefix: self.key(key),
                v,
            }),
        }
    }

    fn req(&self, key: &str) -> Result<Json<'a>> {
        self.opt(key).ok_or_else(|| self.missing(key))
    }

    fn self_err(&self, problem: &str) -> ConvertError {
        self.err(self.prefix.clone(), problem)
    }

    fn as_u64(&self) -> Result<u64> {
        if let Some(n) = self.v.as_u64() {
            return Ok(n);
        }
        // Some exporters write integral floats (`2048.0`).
        match self.v.as_f64() {
            Some(f) if f >= 0.0 && f.fract() == 0.0 && f < 9.0e15 => Ok(f as u64),
            _ => Err(self.self_err(&format!("must be a non-negative integer, found {}", self.v))),
        }
    }

    fn as_i64(&self) -> Result<i64> {
        self.v
            .as_i64()
            .ok_or_else(|| self.self_err(&format!("must be an integer, found {}", self.v)))
    }

    fn as_f64(&self) -> Result<f64> {
        self.v
            .as_f64()
            .ok_or_else(|| self.self_err(&format!("must be a number, found {}", self.v)))
    }

    fn as_str(&self) -> Result<&'a str> {
        self.v
            .as_str()
            .ok_or_else(|| self.self_err(&format!("must be a string, found {}", self.v)))
    }

    fn as_bool(&self) -> Result<bool> {
        self.v
            .as_bool()
            .ok_or_else(|| self.self_err(&format!("must be a boolean, found {}", self.v)))
    }

    fn f64_array(&self) -> Result<Vec<f64>> {
        match self.v {
            Value::Array(items) => items
                .iter()
                .map(|x| {
                    x.as_f64().ok_or_else(|| {
                        self.self_err(&format!("must be an array of numbers, found {}", self.v))
                    })
                })
                .collect(),
            // A scalar mean/std applies to every channel (transformers accepts both).
            Value::Number(_) => Ok(vec![self.as_f64()?; 3]),
            _ => Err(self.self_err(&format!("must be an array of numbers, found {}", self.v))),
        }
    }

    fn obj(&self, key: &str) -> Result<Json<'a>> {
        let j = self.req(key)?;
        if j.v.is_object() {
            Ok(j)
        } else {
            Err(j.self_err("must be an object"))
        }
    }

    fn u64(&self, key: &str) -> Result<u64> {
        self.req(key)?.as_u64()
    }

    fn usize(&self, key: &str) -> Result<usize> {
        let n = self.u64(key)?;
        usize::try_from(n).map_err(|_| self.bad(key, "is too large"))
    }

    fn i64(&self, key: &str) -> Result<i64> {
        self.req(key)?.as_i64()
    }

    fn str(&self, key: &str) -> Result<&'a str> {
        self.req(key)?.as_str()
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.opt(key)
            .map(|j| {
                let n = j.as_u64()?;
                usize::try_from(n).map_err(|_| j.self_err("is too large"))
            })
            .transpose()
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.opt(key).map(|j| j.as_f64()).transpose()
    }

    fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        self.opt(key).map(|j| j.as_str()).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Value {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/tiny-a/checkpoint/config.json"
        );
        read_json(Path::new(p)).unwrap()
    }

    #[test]
    fn tiny_a_values() {
        let c = ModelConfig::from_value(Path::new("config.json"), &tiny()).unwrap();
        assert_eq!(c.lm.hidden_size, 64);
        assert_eq!(c.lm.head_dim, 16);
        assert_eq!(c.lm.rotary_dims, 8);
        assert_eq!(c.vision.num_hidden_layers, 2);
        assert_eq!(c.vision.kept_layers, 1);
        assert_eq!(c.vision.num_patches(), 9);
        assert_eq!(c.image_aspect_ratio, "pad");
        assert_eq!(c.name.as_deref(), Some("mipha-random-tiny-a-seed3"));
    }

    #[test]
    fn real_config_values() {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../assets/mipha-3b/config.json"
        );
        let c = ModelConfig::from_file(Path::new(p)).unwrap();
        assert_eq!(c.lm.rotary_dims, 32);
        assert_eq!(c.lm.head_dim, 80);
        assert_eq!(c.vision.kept_layers, 26);
        assert_eq!(c.vision.num_patches(), 729);
        assert_eq!(c.projector.input_size, 1152);
    }

    #[test]
    fn missing_nested_key_is_named() {
        let mut v = tiny();
        v["vision_config"]["vision_tower"]
            .as_object_mut()
            .unwrap()
            .remove("mm_vision_select_layer");
        let e = ModelConfig::from_value(Path::new("config.json"), &v)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`vision_config.vision_tower.mm_vision_select_layer` is missing"),
            "{e}"
        );
    }

    #[test]
    fn wrong_type_is_named() {
        let mut v = tiny();
        v["hidden_size"] = Value::String("64".into());
        let e = ModelConfig::from_value(Path::new("config.json"), &v)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`hidden_size` must be a non-negative integer"),
            "{e}"
        );
    }

    #[test]
    fn select_layer_variants() {
        let mut v = tiny();
        for (sel, kept) in [(-1, 2), (-2, 1), (-3, 0), (1, 1), (2, 2)] {
            v["vision_config"]["vision_tower"]["mm_vision_select_layer"] = sel.into();
            let c = ModelConfig::from_value(Path::new("c"), &v).unwrap();
            assert_eq!(c.vision.kept_layers, kept, "select {sel}");
        }
        for sel in [-4, 3] {
            v["vision_config"]["vision_tower"]["mm_vision_select_layer"] = sel.into();
            assert!(ModelConfig::from_value(Path::new("c"), &v).is_err());
        }
    }

    #[test]
    fn preprocessor() {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../assets/mipha-3b/preprocessor_config.json"
        );
        let c = ImageConfig::from_file(Path::new(p)).unwrap();
        assert_eq!(c.size, [384, 384]);
        assert_eq!(c.resample, "bicubic");
        assert_eq!(c.pad_color(), vec![127, 127, 127]);
        assert_eq!(c, ImageConfig::siglip_default(384));
    }
}
