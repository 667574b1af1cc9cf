//! Bounds on what a model file and a request may ask for. A `.mqf` can be
//! structurally sound and still claim 2^32 layers or a 2^32-position context;
//! everything the engine sizes from metadata is checked against
//! [`ModelLimits`] (and against the file's tensor table) before anything is
//! allocated. Pictures from callers are bounded by [`ImageLimits`].

use mipha_runtime::{Error, Metadata, MqfFile, Result};

/// Sane bounds on model hyper-parameters, far above any Phi-2 / SigLIP shape
/// (Phi-2: 32 layers, 2560 wide, 51200 ids, 2048 positions; SigLIP-so400m:
/// 27 layers, 1152 wide, 384 px, 14 px patches).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelLimits {
    /// `lm.num_hidden_layers`, `vision.num_hidden_layers`
    pub max_layers: usize,
    /// `lm.hidden_size`, `vision.hidden_size`, `projector.*`
    pub max_hidden_size: usize,
    /// `lm.intermediate_size`, `vision.intermediate_size`
    pub max_intermediate_size: usize,
    /// attention and key/value heads
    pub max_heads: usize,
    pub max_head_dim: usize,
    /// `lm.max_position_embeddings`
    pub max_context: usize,
    /// `lm.vocab_size`, and every tokenizer id
    pub max_vocab: usize,
    /// `vision.image_size` and `image.size`, per side
    pub max_image_size: usize,
    /// `vision.patch_size`
    pub max_patch_size: usize,
    /// patches (positions) one picture takes
    pub max_patches: usize,
    /// `vision.num_channels`
    pub max_channels: usize,
}

impl Default for ModelLimits {
    fn default() -> Self {
        ModelLimits {
            max_layers: 512,
            max_hidden_size: 1 << 16,
            max_intermediate_size: 1 << 18,
            max_heads: 1024,
            max_head_dim: 1024,
            max_context: 1 << 20,
            max_vocab: 1 << 20,
            max_image_size: 4096,
            max_patch_size: 256,
            max_patches: 1 << 14,
            max_channels: 4,
        }
    }
}

impl ModelLimits {
    /// `key`'s value as a count in `1..=max`; the error names the key, its
    /// value and the limit.
    pub fn count(&self, m: &Metadata, key: &str, max: usize) -> Result<usize> {
        let v = m.get_u64(key)?;
        check_range(key, v, 1, max)
    }

    /// The largest bound among the hyper-parameters a key could have.
    pub(crate) fn for_key(&self, key: &str) -> usize {
        let k = key.rsplit('.').next().unwrap_or(key);
        match k {
            "num_hidden_layers" => self.max_layers,
            "hidden_size" | "input_size" => self.max_hidden_size,
            "intermediate_size" => self.max_intermediate_size,
            "num_attention_heads" | "num_key_value_heads" => self.max_heads,
            "head_dim" => self.max_head_dim,
            "max_position_embeddings" => self.max_context,
            "vocab_size" => self.max_vocab,
            "image_size" => self.max_image_size,
            "patch_size" => self.max_patch_size,
            "num_channels" => self.max_channels,
            _ => u32::MAX as usize,
        }
    }
}

pub(crate) fn check_range(key: &str, v: u64, min: u64, max: usize) -> Result<usize> {
    if v < min || v > max as u64 {
        return Err(Error::Config(format!(
            "`{key}` = {v} is out of range ({min}..={max})"
        )));
    }
    Ok(v as usize)
}

/// Layers the tensor table holds under `prefix` (`{prefix}.{i}.…`): one more
/// than the highest index, 0 when none.
pub(crate) fn layers_in_file(file: &MqfFile, prefix: &str) -> usize {
    let p = format!("{prefix}.");
    file.tensors()
        .iter()
        .filter_map(|t| {
            t.name
                .strip_prefix(&p)?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .map(|i| i.saturating_add(1))
        .max()
        .unwrap_or(0)
}

/// Checks a layer count from metadata against the tensor table, so that a
/// metadata value never sizes a plan the file cannot fill.
pub(crate) fn check_layers(file: &MqfFile, key: &str, prefix: &str, n: usize) -> Result<()> {
    let found = layers_in_file(file, prefix);
    if found != n {
        return Err(Error::Config(format!(
            "`{key}` = {n}, but the file's tensors hold {found} layers (`{prefix}.N.*`)"
        )));
    }
    Ok(())
}

/// Checks that `name` is a tensor of shape `want` (outermost first), naming the
/// metadata keys its dimensions come from when it is not.
pub(crate) fn check_shape(file: &MqfFile, name: &str, want: &[usize], keys: &str) -> Result<()> {
    let Ok(t) = file.tensor(name) else {
        return Err(Error::Config(format!("the file has no tensor `{name}`")));
    };
    let info = t.info;
    let shape: Vec<u64> = want.iter().map(|&d| d as u64).collect();
    if info.shape != shape {
        return Err(Error::Config(format!(
            "`{name}` is {:?}, but {keys} make it {:?}",
            info.shape, shape
        )));
    }
    Ok(())
}

/// Bounds on pictures from callers: checked from the file's header before
/// decoding, and per request before any picture is encoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageLimits {
    /// most pixels (width x height) of a decoded picture
    pub max_pixels: u64,
    /// most bytes of an encoded picture file
    pub max_bytes: u64,
    /// most pictures in one request (a conversation)
    pub max_count: usize,
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits {
            // 32 Mpx (an 8K photo): a 16-bit RGBA decode of at most 256 MiB
            // plus its 96 MiB RGB copy while it is converted
            max_pixels: 1 << 25,
            max_bytes: 32 << 20,
            max_count: 16,
        }
    }
}

impl ImageLimits {
    pub fn validate(&self) -> Result<()> {
        if self.max_pixels == 0 || self.max_bytes == 0 {
            return Err(Error::Config(
                "image limits: max_pixels and max_bytes must be positive".into(),
            ));
        }
        Ok(())
    }

    /// The decoder's limits for these bounds: a side may be as long as the
    /// whole pixel budget, and 16-bit RGBA (8 bytes a pixel) is the widest
    /// layout a decoder fills.
    pub fn decode_limits(&self) -> crate::image::DecodeLimits {
        let side = u32::try_from(self.max_pixels).unwrap_or(u32::MAX);
        crate::image::DecodeLimits {
            max_width: side,
            max_height: side,
            max_pixels: self.max_pixels,
            max_decoded_bytes: self.max_pixels.saturating_mul(8),
            max_file_bytes: self.max_bytes,
        }
    }
}
