//! Untrusted bytes to [`RgbImage`], the way the reference's
//! `PIL.Image.open(f).convert('RGB')` sees them, with hard limits checked from
//! the header before any pixel buffer is allocated.

use std::fs::File;
use std::io::{Cursor, Read};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use ::image::metadata::Orientation;
use ::image::{DynamicImage, ImageDecoder, ImageReader};

use super::{ImageError, RgbImage};

/// Formats this build decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    Jpeg,
    Png,
    WebP,
    Gif,
    Bmp,
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ImageFormat::Jpeg => "JPEG",
            ImageFormat::Png => "PNG",
            ImageFormat::WebP => "WebP",
            ImageFormat::Gif => "GIF",
            ImageFormat::Bmp => "BMP",
        })
    }
}

impl ImageFormat {
    fn to_crate(self) -> ::image::ImageFormat {
        match self {
            ImageFormat::Jpeg => ::image::ImageFormat::Jpeg,
            ImageFormat::Png => ::image::ImageFormat::Png,
            ImageFormat::WebP => ::image::ImageFormat::WebP,
            ImageFormat::Gif => ::image::ImageFormat::Gif,
            ImageFormat::Bmp => ::image::ImageFormat::Bmp,
        }
    }
}

/// Hard limits on untrusted input. Dimensions and the decoded size are checked from
/// the header, so a small file claiming a huge image is refused without allocating.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    pub max_width: u32,
    pub max_height: u32,
    /// Pixels (width x height).
    pub max_pixels: u64,
    /// Bytes of the decoded pixel buffer in the file's own layout (e.g. 8 per pixel
    /// for 16-bit RGBA).
    pub max_decoded_bytes: u64,
    /// Bytes of the encoded file.
    pub max_file_bytes: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_width: 16384,
            max_height: 16384,
            max_pixels: 1 << 28,
            max_decoded_bytes: 512 << 20,
            max_file_bytes: 256 << 20,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeOptions {
    pub limits: DecodeLimits,
    /// Rotate/flip by the EXIF orientation tag (JPEG, WebP, PNG `eXIf`). The
    /// reference (`Image.open(..).convert('RGB')`) ignores it and sees phone photos
    /// sideways; we follow what the photo shows instead.
    pub apply_orientation: bool,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            limits: DecodeLimits::default(),
            apply_orientation: true,
        }
    }
}

/// A decoded image and what was learnt on the way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded {
    /// Upright (if orientation was applied), 8-bit RGB.
    pub image: RgbImage,
    pub format: ImageFormat,
    /// EXIF orientation tag value 1..=8 as found in the file (1 when absent).
    pub exif_orientation: u8,
    /// Size as stored in the file, before orientation.
    pub stored_width: u32,
    pub stored_height: u32,
}

/// Reads and decodes an image file. Errors name `path`.
pub fn decode_file(path: impl AsRef<Path>, opts: &DecodeOptions) -> Result<Decoded, ImageError> {
    let path = path.as_ref();
    let io = |source| ImageError::Io {
        input: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let max = opts.limits.max_file_bytes;
    let too_big = |len: u64| ImageError::TooLarge {
        input: path.to_path_buf(),
        detail: format!("the file is {len} bytes, the limit is {max}"),
    };
    if let Ok(meta) = file.metadata() {
        if meta.is_file() && meta.len() > max {
            return Err(too_big(meta.len()));
        }
    }
    // `take` bounds the read even for files whose size the metadata does not tell
    // (pipes, /dev/zero).
    let mut bytes = Vec::new();
    file.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > max {
        return Err(too_big(bytes.len() as u64));
    }
    decode_bytes(&bytes, path, opts)
}

/// Decodes an image held in memory. `input` names it in errors (a path or a label
/// such as `"upload #2"`).
pub fn decode_bytes(
    bytes: &[u8],
    input: impl AsRef<Path>,
    opts: &DecodeOptions,
) -> Result<Decoded, ImageError> {
    let input = input.as_ref().to_path_buf();
    let limits = &opts.limits;
    if bytes.len() as u64 > limits.max_file_bytes {
        return Err(ImageError::TooLarge {
            input,
            detail: format!(
                "the data is {} bytes, the limit is {}",
                bytes.len(),
                limits.max_file_bytes
            ),
        });
    }
    let format = detect_format(bytes, &input)?;
    if format == ImageFormat::WebP {
        webp_check_complete(bytes).map_err(|detail| ImageError::Truncated {
            input: input.clone(),
            format,
            detail,
        })?;
    }
    let ctx = Ctx {
        input: &input,
        format,
    };

    // Dimensions are checked below, right after the header is read and before any
    // pixel buffer exists, so the error can quote them; the crate only gets the
    // allocation cap (which the PNG decoder also applies to its metadata chunks).
    let mut crate_limits = ::image::Limits::no_limits();
    crate_limits.max_alloc = Some(limits.max_decoded_bytes);
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format.to_crate());
    reader.limits(crate_limits);

    // Where the header sits at a fixed place, judge the size before any decoder
    // runs (the BMP decoder, for one, has its own cap with a vaguer message).
    if let Some((width, height)) = peek_dimensions(bytes, format) {
        if width == 0 || height == 0 {
            return Err(ImageError::Empty {
                input,
                format,
                width,
                height,
            });
        }
        ctx.check_size(width, height, limits)?;
    }

    // Decoders can have bugs; a hostile file must not take the process down.
    let guarded = catch_unwind(AssertUnwindSafe(|| -> Result<_, ImageError> {
        let mut decoder = reader.into_decoder().map_err(|e| ctx.map(e))?;
        let (width, height) = decoder.dimensions();
        if width == 0 || height == 0 {
            return Err(ImageError::Empty {
                input: input.clone(),
                format,
                width,
                height,
            });
        }
        ctx.check_size(width, height, limits)?;
        let total = decoder.total_bytes();
        if total > limits.max_decoded_bytes {
            return Err(ImageError::TooLarge {
                input: input.clone(),
                detail: format!(
                    "{width}x{height} {format} image would decode to {total} bytes, the limit is {}",
                    limits.max_decoded_bytes
                ),
            });
        }
        if format == ImageFormat::Jpeg {
            jpeg_check_complete(bytes).map_err(|detail| ImageError::Truncated {
                input: input.clone(),
                format,
                detail,
            })?;
        }
        // Broken metadata only costs the orientation, not the image.
        let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
        let img = DynamicImage::from_decoder(decoder).map_err(|e| ctx.map(e))?;
        Ok((img, orientation, width, height))
    }));
    let (img, orientation, stored_width, stored_height) = match guarded {
        Ok(r) => r?,
        Err(_) => {
            return Err(ImageError::Corrupt {
                input,
                format,
                detail: "the decoder crashed on this file".into(),
            })
        }
    };

    let rgb = to_rgb8(img);
    let rgb = if opts.apply_orientation && orientation != Orientation::NoTransforms {
        let mut d = DynamicImage::ImageRgb8(rgb);
        d.apply_orientation(orientation);
        d.into_rgb8()
    } else {
        rgb
    };
    let (w, h) = rgb.dimensions();
    let image = RgbImage::new(w, h, rgb.into_raw()).ok_or_else(|| ImageError::Corrupt {
        input: input.clone(),
        format,
        detail: "decoder returned a buffer of the wrong size".into(),
    })?;
    Ok(Decoded {
        image,
        format,
        exif_orientation: exif_value(orientation),
        stored_width,
        stored_height,
    })
}

fn exif_value(o: Orientation) -> u8 {
    match o {
        Orientation::NoTransforms => 1,
        Orientation::FlipHorizontal => 2,
        Orientation::Rotate180 => 3,
        Orientation::FlipVertical => 4,
        Orientation::Rotate90FlipH => 5,
        Orientation::Rotate90 => 6,
        Orientation::Rotate270FlipH => 7,
        Orientation::Rotate270 => 8,
    }
}

/// PIL's `convert('RGB')`: alpha is dropped (not composited), grey is replicated,
/// and 16-bit colour keeps the high byte (PIL unpacks `RGB;16B` that way).
/// 16-bit grey also keeps the high byte; PIL instead opens it as `I;16` and clips
/// every value above 255 to white, which destroys the image, so we do not copy that.
fn to_rgb8(img: DynamicImage) -> ::image::RgbImage {
    use ::image::ImageBuffer;
    let (w, h) = (img.width(), img.height());
    let from_fn = |f: &dyn Fn(usize) -> [u8; 3]| {
        let mut data = Vec::with_capacity(w as usize * h as usize * 3);
        for i in 0..w as usize * h as usize {
            data.extend_from_slice(&f(i));
        }
        ImageBuffer::from_raw(w, h, data).expect("buffer sized for the image")
    };
    match img {
        DynamicImage::ImageRgb8(b) => b,
        DynamicImage::ImageRgba8(b) => {
            let s = b.as_raw();
            from_fn(&|i| [s[4 * i], s[4 * i + 1], s[4 * i + 2]])
        }
        DynamicImage::ImageLuma8(b) => {
            let s = b.as_raw();
            from_fn(&|i| [s[i]; 3])
        }
        DynamicImage::ImageLumaA8(b) => {
            let s = b.as_raw();
            from_fn(&|i| [s[2 * i]; 3])
        }
        DynamicImage::ImageRgb16(b) => {
            let s = b.as_raw();
            from_fn(&|i| [hi(s[3 * i]), hi(s[3 * i + 1]), hi(s[3 * i + 2])])
        }
        DynamicImage::ImageRgba16(b) => {
            let s = b.as_raw();
            from_fn(&|i| [hi(s[4 * i]), hi(s[4 * i + 1]), hi(s[4 * i + 2])])
        }
        DynamicImage::ImageLuma16(b) => {
            let s = b.as_raw();
            from_fn(&|i| [hi(s[i]); 3])
        }
        DynamicImage::ImageLumaA16(b) => {
            let s = b.as_raw();
            from_fn(&|i| [hi(s[2 * i]); 3])
        }
        other => other.to_rgb8(),
    }
}

fn hi(v: u16) -> u8 {
    (v >> 8) as u8
}

struct Ctx<'a> {
    input: &'a PathBuf,
    format: ImageFormat,
}

impl Ctx<'_> {
    fn check_size(&self, width: u32, height: u32, limits: &DecodeLimits) -> Result<(), ImageError> {
        if width > limits.max_width || height > limits.max_height {
            return Err(ImageError::TooLarge {
                input: self.input.clone(),
                detail: format!(
                    "{} header declares {width}x{height} pixels, the limit is {}x{}",
                    self.format, limits.max_width, limits.max_height
                ),
            });
        }
        let pixels = u64::from(width) * u64::from(height);
        if pixels > limits.max_pixels {
            return Err(ImageError::TooLarge {
                input: self.input.clone(),
                detail: format!(
                    "{} header declares {width}x{height} = {pixels} pixels, the limit is {}",
                    self.format, limits.max_pixels
                ),
            });
        }
        Ok(())
    }

    fn map(&self, e: ::image::ImageError) -> ImageError {
        use ::image::error::{ImageError as E, LimitErrorKind};
        let input = self.input.clone();
        let format = self.format;
        match e {
            E::Limits(l) => ImageError::TooLarge {
                input,
                detail: match l.kind() {
                    LimitErrorKind::DimensionError => {
                        format!("{format} image is larger than the dimension limits")
                    }
                    LimitErrorKind::InsufficientMemory => {
                        format!("{format} image needs more memory than the limit allows")
                    }
                    _ => format!("{format} image: {l}"),
                },
            },
            E::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
                ImageError::Truncated {
                    input,
                    format,
                    detail: io.to_string(),
                }
            }
            E::Unsupported(u) => ImageError::Corrupt {
                input,
                format,
                detail: format!("unsupported feature: {u}"),
            },
            other => {
                let detail = other.to_string().trim().to_string();
                if looks_truncated(&detail) {
                    ImageError::Truncated {
                        input,
                        format,
                        detail,
                    }
                } else {
                    ImageError::Corrupt {
                        input,
                        format,
                        detail,
                    }
                }
            }
        }
    }
}

/// Decoders report running out of data as ordinary decoding errors with these words.
fn looks_truncated(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    [
        "eof",
        "end of file",
        "unexpected end",
        "truncated",
        "not enough",
        "premature",
        "failed to fill whole buffer",
    ]
    .iter()
    .any(|w| m.contains(w))
}

/// Identifies the format from the content (never the file name), naming known
/// formats we do not decode.
fn detect_format(bytes: &[u8], input: &Path) -> Result<ImageFormat, ImageError> {
    let unsupported = |format: &str| ImageError::UnsupportedFormat {
        input: input.to_path_buf(),
        format: format.to_string(),
    };
    if bytes.is_empty() {
        return Err(ImageError::UnknownFormat {
            input: input.to_path_buf(),
            detail: "the file is empty".into(),
        });
    }
    // ISO-BMFF brands: HEIC/AVIF from phones are common and deserve a clear answer.
    if bytes.len() >= 12 && &bytes[4..8] == b"ftyp" {
        let brand = &bytes[8..12];
        return Err(match brand {
            b"avif" | b"avis" => unsupported("AVIF"),
            b"heic" | b"heix" | b"hevc" | b"hevx" | b"heim" | b"heis" | b"mif1" | b"msf1" => {
                unsupported("HEIC/HEIF")
            }
            _ => unsupported(&format!(
                "ISO media ({})",
                String::from_utf8_lossy(brand).trim()
            )),
        });
    }
    match ::image::guess_format(bytes) {
        Ok(f) => match f {
            ::image::ImageFormat::Jpeg => Ok(ImageFormat::Jpeg),
            ::image::ImageFormat::Png => Ok(ImageFormat::Png),
            ::image::ImageFormat::WebP => Ok(ImageFormat::WebP),
            ::image::ImageFormat::Gif => Ok(ImageFormat::Gif),
            ::image::ImageFormat::Bmp => Ok(ImageFormat::Bmp),
            other => Err(unsupported(&format!("{other:?}").to_uppercase())),
        },
        Err(_) => {
            let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
            Err(ImageError::UnknownFormat {
                input: input.to_path_buf(),
                detail: format!("starts with {}", head.join(" ")),
            })
        }
    }
}

/// Width and height from a fixed-position header (PNG IHDR, GIF logical screen,
/// BMP info header); `None` where the header is elsewhere or malformed, in which
/// case the decoder's own header parse is checked instead.
fn peek_dimensions(b: &[u8], format: ImageFormat) -> Option<(u32, u32)> {
    let be = |i: usize| {
        b.get(i..i + 4)
            .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    };
    let le16 = |i: usize| {
        b.get(i..i + 2)
            .map(|s| u32::from(u16::from_le_bytes([s[0], s[1]])))
    };
    let le32 = |i: usize| {
        b.get(i..i + 4)
            .map(|s| i32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    };
    match format {
        ImageFormat::Png if b.get(12..16) == Some(b"IHDR") => Some((be(16)?, be(20)?)),
        ImageFormat::Gif => Some((le16(6)?, le16(8)?)),
        ImageFormat::Bmp => match le32(14)? {
            12 => Some((le16(18)?, le16(20)?)),
            // Negative height marks a top-down bitmap.
            n if n >= 40 => Some((le32(18)?.unsigned_abs(), le32(22)?.unsigned_abs())),
            _ => None,
        },
        _ => None,
    }
}

/// The RIFF header states the file length; libwebp (PIL) refuses a shorter file,
/// while the Rust decoder accepts some cut-off files.
fn webp_check_complete(b: &[u8]) -> Result<(), String> {
    let Some(size) = b.get(4..8) else {
        return Err(format!("only {} bytes", b.len()));
    };
    let want = u64::from(u32::from_le_bytes([size[0], size[1], size[2], size[3]])) + 8;
    if (b.len() as u64) < want {
        return Err(format!(
            "the RIFF header declares {want} bytes, the data has {}",
            b.len()
        ));
    }
    Ok(())
}

/// Walks the JPEG marker structure up to EOI. The decoder fills a cut-off scan with
/// grey and reports success; PIL refuses such files ("image file is truncated"), and
/// so do we. Segments are skipped by their length, so an EXIF thumbnail's own EOI
/// is never mistaken for ours; data after EOI is ignored.
fn jpeg_check_complete(b: &[u8]) -> Result<(), String> {
    let ended = |what: &str| {
        Err(format!(
            "the data ends {what} ({} bytes, no end-of-image marker)",
            b.len()
        ))
    };
    if b.len() < 2 || b[0] != 0xFF || b[1] != 0xD8 {
        return Err("missing start-of-image marker".into());
    }
    let mut i = 2;
    loop {
        // Tolerate stray bytes between segments the way libjpeg does.
        while i < b.len() && b[i] != 0xFF {
            i += 1;
        }
        while i < b.len() && b[i] == 0xFF {
            i += 1;
        }
        let Some(&marker) = b.get(i) else {
            return ended("between segments");
        };
        i += 1;
        match marker {
            0xD9 => return Ok(()),
            // Stand-alone markers: no length field.
            0x00 | 0x01 | 0xD0..=0xD8 => continue,
            _ => {}
        }
        let Some(len) = b.get(i..i + 2) else {
            return ended("inside a segment header");
        };
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        if len < 2 {
            return Err(format!("segment {marker:#04x} has length {len}"));
        }
        i += len;
        if i > b.len() {
            return ended(&format!("inside segment {marker:#04x}"));
        }
        if marker == 0xDA {
            // Entropy-coded data: 0xFF is followed by 0x00 (a stuffed byte) or a restart
            // marker; anything else starts the next segment.
            loop {
                while i < b.len() && b[i] != 0xFF {
                    i += 1;
                }
                match b.get(i + 1) {
                    None => return ended("inside the compressed image data"),
                    Some(0x00 | 0xD0..=0xD7) => i += 2,
                    Some(_) => break,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jpeg_walk() {
        // SOI, APP0 (len 4), SOS (len 3) with data containing FF00 and RST, EOI.
        let ok = [
            0xFF, 0xD8, 0xFF, 0xE0, 0, 4, 1, 2, 0xFF, 0xDA, 0, 3, 9, 5, 0xFF, 0x00, 6, 0xFF, 0xD3,
            7, 0xFF, 0xD9,
        ];
        assert!(jpeg_check_complete(&ok).is_ok());
        for cut in 2..ok.len() - 1 {
            assert!(jpeg_check_complete(&ok[..cut]).is_err(), "cut at {cut}");
        }
        // An EOI inside a segment (a thumbnail) does not count.
        let thumb = [
            0xFF, 0xD8, 0xFF, 0xE1, 0, 4, 0xFF, 0xD9, 0xFF, 0xDA, 0, 2, 1, 2,
        ];
        assert!(jpeg_check_complete(&thumb).is_err());
    }
}
