//! Hostile and broken input: every case is a typed error that names the input,
//! never a panic, a hang or a huge allocation.

use std::io::Cursor;
use std::time::{Duration, Instant};

use mipha_models::image::{
    decode_bytes, decode_file, DecodeLimits, DecodeOptions, Decoded, ImageError, ImageFormat,
};

fn opts() -> DecodeOptions {
    DecodeOptions::default()
}

fn noisy(w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x * 7 + y * 3) as u8,
            ((x ^ y) * 5) as u8,
            ((x * y) % 251) as u8,
        ])
    })
}

fn encode(img: &image::RgbImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img.clone())
        .write_to(&mut out, format)
        .unwrap();
    out.into_inner()
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// A PNG with valid chunks and CRCs whose IHDR claims `w` x `h` and whose IDAT is
/// a few bytes: the shape of a decompression bomb.
fn png_claiming(w: u32, h: u32, bit_depth: u8, color_type: u8) -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[bit_depth, color_type, 0, 0, 0]);
    png_chunk(&mut png, b"IHDR", &ihdr);
    png_chunk(
        &mut png,
        b"IDAT",
        &[0x78, 0x9C, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    png_chunk(&mut png, b"IEND", &[]);
    png
}

/// BITMAPINFOHEADER BMP claiming `w` x `h` 24-bit pixels, with `pixels` bytes of data.
fn bmp_header(w: i32, h: i32, pixels: usize) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"BM");
    b.extend_from_slice(&(54 + pixels as u32).to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    b.extend_from_slice(&54u32.to_le_bytes());
    b.extend_from_slice(&40u32.to_le_bytes());
    b.extend_from_slice(&w.to_le_bytes());
    b.extend_from_slice(&h.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&24u16.to_le_bytes());
    b.extend_from_slice(&[0; 24]);
    b.extend(std::iter::repeat_n(0x55, pixels));
    b
}

/// A GIF whose logical screen is `w` x `h`, with one 1x1 frame.
fn gif_screen(w: u16, h: u16) -> Vec<u8> {
    let mut g = b"GIF89a".to_vec();
    g.extend_from_slice(&w.to_le_bytes());
    g.extend_from_slice(&h.to_le_bytes());
    g.extend_from_slice(&[0x80, 0, 0]); // global colour table of 2 entries
    g.extend_from_slice(&[0, 0, 0, 255, 255, 255]);
    g.extend_from_slice(&[0x2C, 0, 0, 0, 0, 1, 0, 1, 0, 0]); // image descriptor 1x1
    g.extend_from_slice(&[2, 2, 0x44, 0x01, 0]); // LZW min size 2, one sub-block
    g.push(0x3B);
    g
}

/// A real baseline JPEG whose SOF0 is patched to claim `w` x `h`.
fn jpeg_claiming(w: u16, h: u16) -> Vec<u8> {
    let mut j = encode(&noisy(16, 16), image::ImageFormat::Jpeg);
    let sof = j.windows(2).position(|m| m == [0xFF, 0xC0]).unwrap();
    j[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    j[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    j
}

fn err(r: Result<Decoded, ImageError>) -> ImageError {
    match r {
        Ok(d) => panic!("decoded {:?} from bad input", d.image),
        Err(e) => {
            eprintln!("{e}");
            e
        }
    }
}

fn assert_names(e: &ImageError, name: &str) {
    let msg = e.to_string();
    assert!(
        msg.starts_with(name),
        "message does not start with {name:?}: {msg}"
    );
}

#[test]
fn missing_file() {
    let path = "/nonexistent-mipha-dir/cat.jpg";
    let e = err(decode_file(path, &opts()));
    assert!(matches!(e, ImageError::Io { .. }), "{e:?}");
    assert_names(&e, path);
    assert!(e.to_string().contains("No such file"), "{e}");
}

#[test]
fn directory_instead_of_file() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let e = err(decode_file(dir, &opts()));
    assert!(matches!(e, ImageError::Io { .. }), "{e:?}");
    assert_names(&e, dir);
}

#[test]
fn empty_random_and_text_are_unknown_formats() {
    let e = err(decode_bytes(b"", "empty.png", &opts()));
    assert!(matches!(e, ImageError::UnknownFormat { .. }), "{e:?}");
    assert!(e.to_string().contains("empty"), "{e}");

    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let random: Vec<u8> = (0..4096)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 32) as u8
        })
        .collect();
    let e = err(decode_bytes(&random, "noise.jpg", &opts()));
    assert!(matches!(e, ImageError::UnknownFormat { .. }), "{e:?}");
    assert_names(&e, "noise.jpg");
    assert!(
        e.to_string().contains("not a recognised image format"),
        "{e}"
    );

    let text = b"USER: <image>\nWhat is in this picture?\n";
    let e = err(decode_bytes(text, "notes.txt", &opts()));
    assert!(matches!(e, ImageError::UnknownFormat { .. }), "{e:?}");
    assert!(e.to_string().contains("55 53 45 52"), "{e}");
}

#[test]
fn known_but_unsupported_formats_are_named() {
    let tiff = b"II*\x00\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00";
    let e = err(decode_bytes(tiff, "scan.tif", &opts()));
    assert!(
        matches!(&e, ImageError::UnsupportedFormat { format, .. } if format == "TIFF"),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("TIFF images are not supported"),
        "{e}"
    );

    let heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic";
    let e = err(decode_bytes(heic, "IMG_0001.HEIC", &opts()));
    assert!(
        matches!(&e, ImageError::UnsupportedFormat { format, .. } if format == "HEIC/HEIF"),
        "{e:?}"
    );
}

/// The `image` crate (zune-jpeg, non-strict) decodes a cut JPEG "successfully",
/// filling the missing part with grey; PIL says "image file is truncated". We
/// refuse it too, by walking the marker structure to the end-of-image marker.
#[test]
fn truncated_jpeg_is_an_error() {
    let full = encode(&noisy(97, 61), image::ImageFormat::Jpeg);
    assert!(decode_bytes(&full, "full.jpg", &opts()).is_ok());

    for cut in [full.len() / 2, full.len() - 1, full.len() - 2, 200] {
        let e = err(decode_bytes(&full[..cut], "cut.jpg", &opts()));
        assert!(
            matches!(
                e,
                ImageError::Truncated {
                    format: ImageFormat::Jpeg,
                    ..
                }
            ),
            "cut at {cut}: {e:?}"
        );
        assert_names(&e, "cut.jpg");
    }

    // Bytes after the end-of-image marker (camera trailers) are fine.
    let mut trailer = full.clone();
    trailer.extend_from_slice(b"\x00\x00SAMSUNG-TRAILER\xFF\xD8");
    assert!(decode_bytes(&trailer, "trailer.jpg", &opts()).is_ok());
}

#[test]
fn truncated_png_gif_webp_bmp_are_errors() {
    let img = noisy(97, 61);
    for (format, name) in [
        (image::ImageFormat::Png, "cut.png"),
        (image::ImageFormat::Gif, "cut.gif"),
        (image::ImageFormat::WebP, "cut.webp"),
        (image::ImageFormat::Bmp, "cut.bmp"),
    ] {
        let full = encode(&img, format);
        assert!(decode_bytes(&full, name, &opts()).is_ok(), "{name} full");
        let e = err(decode_bytes(&full[..full.len() / 2], name, &opts()));
        assert!(
            matches!(e, ImageError::Truncated { .. } | ImageError::Corrupt { .. }),
            "{name}: {e:?}"
        );
        assert_names(&e, name);
    }
    // WebP states its length up front: one byte short is already truncated (PIL agrees).
    let webp = encode(&img, image::ImageFormat::WebP);
    let e = err(decode_bytes(&webp[..webp.len() - 1], "short.webp", &opts()));
    assert!(matches!(e, ImageError::Truncated { .. }), "{e:?}");
}

#[test]
fn zero_sized_images_are_refused() {
    for (bytes, name) in [
        (png_claiming(0, 10, 8, 2), "zero-width.png"),
        (png_claiming(10, 0, 8, 2), "zero-height.png"),
        (bmp_header(0, 0, 0), "zero.bmp"),
        (gif_screen(0, 0), "zero.gif"),
        (jpeg_claiming(0, 16), "zero.jpg"),
    ] {
        let e = err(decode_bytes(&bytes, name, &opts()));
        assert!(
            matches!(e, ImageError::Empty { .. } | ImageError::Corrupt { .. }),
            "{name}: {e:?}"
        );
        assert_names(&e, name);
    }
}

/// Headers claiming gigapixel images are refused from the header alone: quickly
/// and without allocating the pixel buffer (which would abort the test process).
#[test]
fn decompression_bombs_are_refused_from_the_header() {
    let cases: Vec<(Vec<u8>, &str, &str)> = vec![
        (
            png_claiming(100_000, 100_000, 8, 2),
            "bomb.png",
            "100000x100000",
        ),
        (gif_screen(65_535, 65_535), "bomb.gif", "65535x65535"),
        (
            bmp_header(100_000, 100_000, 16),
            "bomb.bmp",
            "100000x100000",
        ),
        (
            bmp_header(100_000, -100_000, 16),
            "topdown-bomb.bmp",
            "100000x100000",
        ),
        (jpeg_claiming(65_000, 65_000), "bomb.jpg", "65000x65000"),
    ];
    for (bytes, name, dims) in cases {
        let start = Instant::now();
        let e = err(decode_bytes(&bytes, name, &opts()));
        let took = start.elapsed();
        assert!(matches!(e, ImageError::TooLarge { .. }), "{name}: {e:?}");
        let msg = e.to_string();
        assert_names(&e, name);
        assert!(
            msg.contains(dims) && msg.contains("16384x16384"),
            "{name}: {msg}"
        );
        assert!(took < Duration::from_secs(1), "{name} took {took:?}");
    }

    // Within the side limits but too many bytes: 16384 x 16384 RGBA at 16 bits is 2 GiB.
    let e = err(decode_bytes(
        &png_claiming(16_384, 16_384, 16, 6),
        "deep.png",
        &opts(),
    ));
    assert!(matches!(e, ImageError::TooLarge { .. }), "{e:?}");
    assert!(e.to_string().contains("would decode to"), "{e}");
}

#[test]
fn limits_are_configurable() {
    let png = encode(&noisy(40, 30), image::ImageFormat::Png);
    let small = DecodeOptions {
        limits: DecodeLimits {
            max_width: 32,
            ..DecodeLimits::default()
        },
        ..DecodeOptions::default()
    };
    let e = err(decode_bytes(&png, "wide.png", &small));
    assert!(e.to_string().contains("40x30"), "{e}");

    let tiny_file = DecodeOptions {
        limits: DecodeLimits {
            max_file_bytes: 100,
            ..DecodeLimits::default()
        },
        ..DecodeOptions::default()
    };
    let e = err(decode_bytes(&png, "big.png", &tiny_file));
    assert!(matches!(e, ImageError::TooLarge { .. }), "{e:?}");

    let dir = tempfile_dir();
    let path = dir.join("big.png");
    std::fs::write(&path, &png).unwrap();
    let e = err(decode_file(&path, &tiny_file));
    assert!(matches!(e, ImageError::TooLarge { .. }), "{e:?}");
    assert_names(&e, path.to_str().unwrap());
    std::fs::remove_dir_all(dir).unwrap();
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("mipha-image-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Damaged files of every format: errors or images, never a panic.
#[test]
fn corrupted_bytes_never_panic() {
    let img = noisy(23, 17);
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for format in [
        image::ImageFormat::Jpeg,
        image::ImageFormat::Png,
        image::ImageFormat::Gif,
        image::ImageFormat::WebP,
        image::ImageFormat::Bmp,
    ] {
        let full = encode(&img, format);
        for _ in 0..150 {
            let mut bytes = full.clone();
            for _ in 0..1 + next() % 4 {
                // Keep the signature so the decoder itself gets exercised.
                let i = 8 + (next() as usize) % (bytes.len() - 8);
                bytes[i] ^= 1 << (next() % 8);
            }
            let cut = bytes.len() - (next() as usize % 3) * (next() as usize % bytes.len()) / 3;
            let _ = decode_bytes(&bytes[..cut.max(9)], "fuzz", &opts());
        }
    }
}
