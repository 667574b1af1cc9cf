//! Image input: decoding (JPEG, PNG, WebP, GIF, BMP) to RGB8 and the SigLIP
//! preprocessing of the reference (`process_images` with `image_aspect_ratio: pad`
//! feeding transformers 4.37's `SiglipImageProcessor`), bit-exact with PIL.
//!
//! ```text
//! file/bytes --decode--> RgbImage --expand2square(pad)--> PIL resize --> * rescale --> (x - mean) / std --> CHW f32
//! ```
//!
//! Every parameter comes from the model file's `image.*` metadata ([`ImageConfig`]).
//!
//! Where the result can differ from the reference (`PIL.Image.open(f).convert('RGB')`
//! + transformers' PIL path), on purpose or not:
//! * resize, rescale, normalise: bit-exact (the goldens match with difference 0);
//! * JPEG: decoded by zune-jpeg, not libjpeg-turbo, so pixels can differ by a few
//!   levels (measured: up to 4/255 with 4:2:0 chroma, mean 0.001 after normalising);
//!   PNG, GIF, BMP and lossless WebP decode exactly;
//! * EXIF orientation is applied (the reference ignores it), see [`DecodeOptions`];
//! * 16-bit grey keeps the high byte where PIL clips to white;
//! * a GIF whose first frame does not cover the whole screen is black outside it
//!   (PIL fills with the transparent/background palette colour).

mod decode;
mod resize;

use std::path::{Path, PathBuf};

use mipha_runtime::{Error, Metadata, Result};

pub use decode::{decode_bytes, decode_file, DecodeLimits, DecodeOptions, Decoded, ImageFormat};
pub use resize::Resample;

/// How a non-square image is made to fit the square model input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Aspect {
    /// LLaVA's `expand2square`: paste centred on a square of `pad_color`, then resize.
    Pad,
    /// Resize straight to the model size, ignoring the aspect ratio (what LLaVA does
    /// for any `image_aspect_ratio` other than `pad`; the converter writes `square`
    /// when config.json names none).
    Square,
}

impl Aspect {
    pub const NAMES: [&'static str; 2] = ["pad", "square"];

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "pad" => Some(Aspect::Pad),
            "square" => Some(Aspect::Square),
            _ => None,
        }
    }
}

/// Largest accepted `image.size` side: far above any vision tower, small enough that
/// a corrupt value cannot ask for gigabytes of output.
pub const MAX_MODEL_SIDE: usize = 8192;

/// Preprocessing parameters, read from the `image.*` metadata keys.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageConfig {
    height: usize,
    width: usize,
    mean: [f64; 3],
    std: [f64; 3],
    rescale_factor: f64,
    resample: Resample,
    aspect: Aspect,
    pad_color: [u8; 3],
}

impl ImageConfig {
    /// Checks the values; `size` is `[height, width]` after resizing.
    pub fn new(
        size: [usize; 2],
        mean: [f64; 3],
        std: [f64; 3],
        rescale_factor: f64,
        resample: Resample,
        aspect: Aspect,
        pad_color: [u8; 3],
    ) -> Result<Self> {
        let bad = |s: String| Err(Error::Config(s));
        let [height, width] = size;
        if !(1..=MAX_MODEL_SIDE).contains(&height) || !(1..=MAX_MODEL_SIDE).contains(&width) {
            return bad(format!(
                "image.size [{height}, {width}]: each side must be 1..={MAX_MODEL_SIDE}"
            ));
        }
        if mean.iter().any(|m| !m.is_finite()) {
            return bad(format!("image.mean {mean:?} is not finite"));
        }
        // The normalisation runs in f32, so the f32 value must be usable too.
        if std.iter().any(|s| !s.is_finite() || *s as f32 == 0.0) {
            return bad(format!("image.std {std:?} must be finite and non-zero"));
        }
        if !rescale_factor.is_finite() || rescale_factor <= 0.0 {
            return bad(format!(
                "image.rescale_factor {rescale_factor} must be a positive number"
            ));
        }
        Ok(ImageConfig {
            height,
            width,
            mean,
            std,
            rescale_factor,
            resample,
            aspect,
            pad_color,
        })
    }

    /// Reads `image.size`, `image.mean`, `image.std`, `image.rescale_factor`,
    /// `image.resample`, `image.aspect` and `image.pad_color` (all required).
    pub fn from_metadata(m: &Metadata) -> Result<Self> {
        fn three<T: Copy + std::fmt::Debug>(key: &str, v: Vec<T>) -> Result<[T; 3]> {
            <[T; 3]>::try_from(v.as_slice()).map_err(|_| {
                Error::Config(format!("`{key}` must have 3 values (RGB), found {v:?}"))
            })
        }
        let size = m.get_u64_array("image.size")?;
        let size: [u64; 2] = size.as_slice().try_into().map_err(|_| {
            Error::Config(format!(
                "`image.size` must be [height, width], found {size:?}"
            ))
        })?;
        let side = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        let mean = three("image.mean", m.get_f64_array("image.mean")?)?;
        let std = three("image.std", m.get_f64_array("image.std")?)?;
        let rescale_factor = m.get_f64("image.rescale_factor")?;
        let resample_name = m.get_str("image.resample")?;
        let resample = Resample::from_name(resample_name).ok_or_else(|| {
            Error::Config(format!(
                "`image.resample` = {resample_name:?} is not supported (supported: {})",
                Resample::NAMES.join(", ")
            ))
        })?;
        let aspect_name = m.get_str("image.aspect")?;
        let aspect = Aspect::from_name(aspect_name).ok_or_else(|| {
            Error::Config(format!(
                "`image.aspect` = {aspect_name:?} is not supported (supported: {})",
                Aspect::NAMES.join(", ")
            ))
        })?;
        let pad = three("image.pad_color", m.get_u64_array("image.pad_color")?)?;
        let mut pad_color = [0u8; 3];
        for (p, &v) in pad_color.iter_mut().zip(&pad) {
            *p = u8::try_from(v).map_err(|_| {
                Error::Config(format!("`image.pad_color` {pad:?}: values must be 0..=255"))
            })?;
        }
        Self::new(
            [side(size[0]), side(size[1])],
            mean,
            std,
            rescale_factor,
            resample,
            aspect,
            pad_color,
        )
    }

    pub fn height(&self) -> usize {
        self.height
    }
    pub fn width(&self) -> usize {
        self.width
    }
    pub fn mean(&self) -> [f64; 3] {
        self.mean
    }
    pub fn std(&self) -> [f64; 3] {
        self.std
    }
    pub fn rescale_factor(&self) -> f64 {
        self.rescale_factor
    }
    pub fn resample(&self) -> Resample {
        self.resample
    }
    pub fn aspect(&self) -> Aspect {
        self.aspect
    }
    pub fn pad_color(&self) -> [u8; 3] {
        self.pad_color
    }

    /// Length of the CHW pixel buffer a [`PreparedImage`] holds.
    pub fn pixel_len(&self) -> usize {
        3 * self.height * self.width
    }

    /// The float value of each u8 level per channel. transformers rescales in f64
    /// and casts to f32, then normalises in f32 against f32 mean/std; a table of the
    /// 256 results per channel is exactly that, done once.
    fn level_table(&self) -> [[f32; 256]; 3] {
        let mut t = [[0f32; 256]; 3];
        for (c, table) in t.iter_mut().enumerate() {
            let (mean, std) = (self.mean[c] as f32, self.std[c] as f32);
            for (v, out) in table.iter_mut().enumerate() {
                let x = (v as f64 * self.rescale_factor) as f32;
                *out = (x - mean) / std;
            }
        }
        t
    }
}

/// A decoded image: 8-bit RGB, row-major, no padding between rows.
#[derive(Clone, PartialEq, Eq)]
pub struct RgbImage {
    width: u32,
    height: u32,
    data: Vec<u8>,
}

impl std::fmt::Debug for RgbImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RgbImage({}x{})", self.width, self.height)
    }
}

impl RgbImage {
    /// `None` if `data` is not `width * height * 3` bytes.
    pub fn new(width: u32, height: u32, data: Vec<u8>) -> Option<Self> {
        let want = (width as usize)
            .checked_mul(height as usize)?
            .checked_mul(3)?;
        (data.len() == want).then_some(RgbImage {
            width,
            height,
            data,
        })
    }
    pub fn width(&self) -> u32 {
        self.width
    }
    pub fn height(&self) -> u32 {
        self.height
    }
    pub fn as_raw(&self) -> &[u8] {
        &self.data
    }
    pub fn into_raw(self) -> Vec<u8> {
        self.data
    }
    pub fn pixel(&self, x: u32, y: u32) -> [u8; 3] {
        let i = (y as usize * self.width as usize + x as usize) * 3;
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }

    /// 128 bits of a SHA-256 of the dimensions and pixels: equal images get
    /// equal keys whatever file they came from, and different ones never meet.
    pub fn content_hash(&self) -> u128 {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(b"mipha-rgb8\0");
        h.update(self.width.to_le_bytes());
        h.update(self.height.to_le_bytes());
        h.update(&self.data);
        u128::from_le_bytes(h.finalize()[..16].try_into().expect("32 bytes"))
    }

    /// `expand2square` materialised (preprocessing does the same without building it).
    pub fn expand_to_square(&self, pad: [u8; 3]) -> RgbImage {
        let sq = resize::PaddedSquare::new(self, pad);
        let side = resize::RowSource::width(&sq);
        let mut scratch = Vec::new();
        let mut data = Vec::with_capacity(side * side * 3);
        for y in 0..side {
            data.extend_from_slice(&resize::RowSource::row(&sq, y, &mut scratch)[..side * 3]);
        }
        RgbImage {
            width: side as u32,
            height: side as u32,
            data,
        }
    }

    /// PIL `Image.resize((width, height), resample=filter)` on an RGB image.
    pub fn resize(&self, width: u32, height: u32, filter: Resample) -> RgbImage {
        let data = resize::resample(self, width as usize, height as usize, filter);
        RgbImage {
            width,
            height,
            data,
        }
    }
}

/// Model-ready pixels of one image.
#[derive(Clone, Debug, PartialEq)]
pub struct PreparedImage {
    /// CHW, `3 * height * width` values, normalised.
    pub pixels: Vec<f32>,
    pub height: usize,
    pub width: usize,
    /// Size of the decoded (orientation-corrected) image before preprocessing.
    pub source_width: u32,
    pub source_height: u32,
}

/// expand2square, resize, rescale, normalise, CHW.
pub fn preprocess(image: &RgbImage, cfg: &ImageConfig) -> PreparedImage {
    let (h, w) = (cfg.height, cfg.width);
    let rgb = match cfg.aspect {
        Aspect::Pad => {
            let sq = resize::PaddedSquare::new(image, cfg.pad_color);
            resize::resample(&sq, w, h, cfg.resample)
        }
        Aspect::Square => resize::resample(image, w, h, cfg.resample),
    };
    let table = cfg.level_table();
    let plane = h * w;
    let mut pixels = vec![0f32; 3 * plane];
    let (r, gb) = pixels.split_at_mut(plane);
    let (g, b) = gb.split_at_mut(plane);
    for (i, p) in rgb.chunks_exact(3).enumerate() {
        r[i] = table[0][usize::from(p[0])];
        g[i] = table[1][usize::from(p[1])];
        b[i] = table[2][usize::from(p[2])];
    }
    PreparedImage {
        pixels,
        height: h,
        width: w,
        source_width: image.width,
        source_height: image.height,
    }
}

/// Decodes `path` (default limits, EXIF orientation applied) and preprocesses it.
pub fn load_image(path: impl AsRef<Path>, cfg: &ImageConfig) -> Result<PreparedImage, ImageError> {
    let decoded = decode_file(path.as_ref(), &DecodeOptions::default())?;
    Ok(preprocess(&decoded.image, cfg))
}

/// Why an image could not be used. Each message starts with the input's name (the
/// path, or the label given to [`decode_bytes`]).
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{input}: cannot read: {source}")]
    Io {
        input: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The bytes match no image signature we know.
    #[error("{input}: not a recognised image format ({detail})")]
    UnknownFormat { input: PathBuf, detail: String },
    /// A known format this build does not decode (TIFF, AVIF, HEIC, ...).
    #[error("{input}: {format} images are not supported (use JPEG, PNG, WebP, GIF or BMP)")]
    UnsupportedFormat { input: PathBuf, format: String },
    /// The file or the image it declares exceeds [`DecodeLimits`].
    #[error("{input}: refused: {detail}")]
    TooLarge { input: PathBuf, detail: String },
    #[error("{input}: {format} image has no pixels ({width}x{height})")]
    Empty {
        input: PathBuf,
        format: ImageFormat,
        width: u32,
        height: u32,
    },
    /// The data ends before the image does.
    #[error("{input}: truncated {format} file: {detail}")]
    Truncated {
        input: PathBuf,
        format: ImageFormat,
        detail: String,
    },
    /// Anything else the decoder rejects.
    #[error("{input}: invalid {format} data: {detail}")]
    Corrupt {
        input: PathBuf,
        format: ImageFormat,
        detail: String,
    },
}

impl From<ImageError> for Error {
    fn from(e: ImageError) -> Self {
        match e {
            ImageError::Io { input, source } => Error::Io {
                path: input,
                source,
            },
            other => Error::Other(other.to_string()),
        }
    }
}
