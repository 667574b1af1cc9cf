//! What a decoded image contains: the formats, PIL's `convert('RGB')` rules
//! (alpha dropped, grey replicated, 16-bit high byte), the first GIF frame, EXIF
//! orientation, and the content hash.

use std::io::Cursor;

use image::codecs::gif::GifEncoder;
use image::{Delay, Frame, Rgba, RgbaImage};
use mipha_models::image::{decode_bytes, DecodeOptions, Decoded, ImageFormat, RgbImage};

fn decode(bytes: &[u8]) -> Decoded {
    decode_bytes(bytes, "test", &DecodeOptions::default()).unwrap()
}

fn encode(img: image::DynamicImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// 13x7 with few distinct colours, so GIF's palette holds it exactly.
fn pattern() -> image::RgbImage {
    let colours = [
        [255, 0, 0],
        [0, 200, 0],
        [10, 20, 250],
        [127, 127, 127],
        [0, 0, 0],
    ];
    image::RgbImage::from_fn(13, 7, |x, y| {
        image::Rgb(colours[((x * 3 + y) % 5) as usize])
    })
}

#[test]
fn lossless_formats_decode_exactly_and_hash_alike() {
    let src = pattern();
    let mut hashes = Vec::new();
    for (format, ours) in [
        (image::ImageFormat::Png, ImageFormat::Png),
        (image::ImageFormat::Bmp, ImageFormat::Bmp),
        (image::ImageFormat::WebP, ImageFormat::WebP),
        (image::ImageFormat::Gif, ImageFormat::Gif),
    ] {
        let d = decode(&encode(image::DynamicImage::ImageRgb8(src.clone()), format));
        assert_eq!(d.format, ours);
        assert_eq!((d.image.width(), d.image.height()), (13, 7), "{ours}");
        assert_eq!(d.image.as_raw(), src.as_raw().as_slice(), "{ours}");
        assert_eq!(d.exif_orientation, 1);
        hashes.push(d.image.content_hash());
    }
    assert!(hashes.windows(2).all(|w| w[0] == w[1]));

    let jpeg = decode(&encode(
        image::DynamicImage::ImageRgb8(src),
        image::ImageFormat::Jpeg,
    ));
    assert_eq!(jpeg.format, ImageFormat::Jpeg);
    assert_eq!((jpeg.image.width(), jpeg.image.height()), (13, 7));
}

#[test]
fn content_hash_covers_pixels_and_shape() {
    let a = RgbImage::new(4, 2, (0..24).collect()).unwrap();
    let same = RgbImage::new(4, 2, (0..24).collect()).unwrap();
    let transposed = RgbImage::new(2, 4, (0..24).collect()).unwrap();
    let mut changed: Vec<u8> = (0..24).collect();
    changed[23] ^= 1;
    let changed = RgbImage::new(4, 2, changed).unwrap();
    assert_eq!(a.content_hash(), same.content_hash());
    assert_ne!(a.content_hash(), transposed.content_hash());
    assert_ne!(a.content_hash(), changed.content_hash());
    assert!(RgbImage::new(4, 2, vec![0; 23]).is_none());
}

/// PIL's RGBA -> RGB drops alpha without compositing onto any background.
#[test]
fn alpha_is_dropped_not_composited() {
    let mut img = RgbaImage::new(2, 1);
    img.put_pixel(0, 0, Rgba([200, 100, 50, 0]));
    img.put_pixel(1, 0, Rgba([1, 2, 3, 128]));
    for format in [image::ImageFormat::Png, image::ImageFormat::WebP] {
        let d = decode(&encode(
            image::DynamicImage::ImageRgba8(img.clone()),
            format,
        ));
        assert_eq!(d.image.as_raw(), &[200, 100, 50, 1, 2, 3], "{format:?}");
    }
}

#[test]
fn grey_is_replicated() {
    let grey = image::GrayImage::from_raw(3, 1, vec![0, 77, 255]).unwrap();
    let d = decode(&encode(
        image::DynamicImage::ImageLuma8(grey),
        image::ImageFormat::Png,
    ));
    assert_eq!(d.image.as_raw(), &[0, 0, 0, 77, 77, 77, 255, 255, 255]);

    let grey_alpha = image::GrayAlphaImage::from_raw(2, 1, vec![9, 0, 200, 255]).unwrap();
    let d = decode(&encode(
        image::DynamicImage::ImageLumaA8(grey_alpha),
        image::ImageFormat::Png,
    ));
    assert_eq!(d.image.as_raw(), &[9, 9, 9, 200, 200, 200]);
}

/// PIL unpacks 16-bit PNG colour as `RGB;16B`, keeping the high byte (no rounding):
/// 0x80FF -> 128, 0x00FF -> 0. (16-bit grey PIL clips to white above 255; we keep
/// the high byte there too, see `to_rgb8`.)
#[test]
fn sixteen_bit_keeps_the_high_byte() {
    let values = [0u16, 0x00FF, 0x0100, 0x7FFF, 0x80FF, 0xFEFF, 0xFFFF];
    let want: Vec<u8> = values.iter().map(|v| (v >> 8) as u8).collect();

    let rgb: Vec<u16> = values.iter().flat_map(|&v| [v, v, v]).collect();
    let rgb = image::ImageBuffer::<image::Rgb<u16>, _>::from_raw(7, 1, rgb).unwrap();
    let d = decode(&encode(
        image::DynamicImage::ImageRgb16(rgb),
        image::ImageFormat::Png,
    ));
    let got: Vec<u8> = d.image.as_raw().chunks(3).map(|p| p[0]).collect();
    assert_eq!(got, want);

    let rgba: Vec<u16> = values.iter().flat_map(|&v| [v, 0, v, 1]).collect();
    let rgba = image::ImageBuffer::<Rgba<u16>, _>::from_raw(7, 1, rgba).unwrap();
    let d = decode(&encode(
        image::DynamicImage::ImageRgba16(rgba),
        image::ImageFormat::Png,
    ));
    let got: Vec<u8> = d.image.as_raw().chunks(3).map(|p| p[2]).collect();
    assert_eq!(got, want);

    let grey = image::ImageBuffer::<image::Luma<u16>, _>::from_raw(7, 1, values.to_vec()).unwrap();
    let d = decode(&encode(
        image::DynamicImage::ImageLuma16(grey),
        image::ImageFormat::Png,
    ));
    let got: Vec<u8> = d.image.as_raw().chunks(3).map(|p| p[1]).collect();
    assert_eq!(got, want);
}

#[test]
fn animated_gif_uses_the_first_frame() {
    let frame = |c: [u8; 4]| {
        Frame::from_parts(
            RgbaImage::from_pixel(5, 4, Rgba(c)),
            0,
            0,
            Delay::from_numer_denom_ms(100, 1),
        )
    };
    let mut bytes = Vec::new();
    {
        let mut enc = GifEncoder::new(&mut bytes);
        enc.encode_frames([frame([255, 0, 0, 255]), frame([0, 0, 255, 255])])
            .unwrap();
    }
    let d = decode(&bytes);
    assert_eq!(d.format, ImageFormat::Gif);
    assert_eq!((d.image.width(), d.image.height()), (5, 4));
    assert!(d.image.as_raw().chunks(3).all(|p| p == [255, 0, 0]));
}

/// A big-endian TIFF block with one IFD entry: Orientation (0x0112) = `value`.
fn exif_tiff(value: u16) -> Vec<u8> {
    let mut t = b"MM\x00\x2A\x00\x00\x00\x08".to_vec();
    t.extend_from_slice(&1u16.to_be_bytes());
    t.extend_from_slice(&[0x01, 0x12, 0x00, 0x03, 0, 0, 0, 1]);
    t.extend_from_slice(&value.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    t
}

/// A JPEG of `src` with an APP1 Exif segment carrying orientation `value`.
fn jpeg_with_orientation(src: &image::RgbImage, value: u16) -> Vec<u8> {
    let jpeg = encode(
        image::DynamicImage::ImageRgb8(src.clone()),
        image::ImageFormat::Jpeg,
    );
    let mut payload = b"Exif\x00\x00".to_vec();
    payload.extend_from_slice(&exif_tiff(value));
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&payload);
    out.extend_from_slice(&jpeg[2..]);
    out
}

/// 40x20: left half red, right half blue (JPEG-friendly blocks).
fn red_blue() -> image::RgbImage {
    image::RgbImage::from_fn(40, 20, |x, _| {
        if x < 20 {
            image::Rgb([255, 0, 0])
        } else {
            image::Rgb([0, 0, 255])
        }
    })
}

fn is_red(p: [u8; 3]) -> bool {
    p[0] > 200 && p[2] < 60
}
fn is_blue(p: [u8; 3]) -> bool {
    p[2] > 200 && p[0] < 60
}

#[test]
fn jpeg_exif_orientation_is_applied() {
    // 6 = the camera was turned clockwise: rotate 90 degrees clockwise to view.
    let d = decode(&jpeg_with_orientation(&red_blue(), 6));
    assert_eq!(d.exif_orientation, 6);
    assert_eq!((d.stored_width, d.stored_height), (40, 20));
    assert_eq!((d.image.width(), d.image.height()), (20, 40));
    // The left (red) half ends up on top.
    assert!(is_red(d.image.pixel(10, 5)) && is_blue(d.image.pixel(10, 35)));

    // 8 = rotate 90 counter-clockwise: red goes to the bottom.
    let d = decode(&jpeg_with_orientation(&red_blue(), 8));
    assert_eq!((d.image.width(), d.image.height()), (20, 40));
    assert!(is_blue(d.image.pixel(10, 5)) && is_red(d.image.pixel(10, 35)));

    // 3 = rotate 180: sides swap, shape stays.
    let d = decode(&jpeg_with_orientation(&red_blue(), 3));
    assert_eq!((d.image.width(), d.image.height()), (40, 20));
    assert!(is_blue(d.image.pixel(5, 10)) && is_red(d.image.pixel(35, 10)));

    // Opting out gives the stored pixels, as PIL's plain `Image.open` does.
    let raw = DecodeOptions {
        apply_orientation: false,
        ..DecodeOptions::default()
    };
    let d = decode_bytes(&jpeg_with_orientation(&red_blue(), 6), "raw", &raw).unwrap();
    assert_eq!(d.exif_orientation, 6);
    assert_eq!((d.image.width(), d.image.height()), (40, 20));
    assert!(is_red(d.image.pixel(5, 10)));
}

#[test]
fn png_exif_orientation_is_applied() {
    let png = encode(
        image::DynamicImage::ImageRgb8(red_blue()),
        image::ImageFormat::Png,
    );
    // Insert an eXIf chunk right after IHDR (8-byte signature + 25-byte IHDR chunk).
    let tiff = exif_tiff(6);
    let mut chunk = (tiff.len() as u32).to_be_bytes().to_vec();
    chunk.extend_from_slice(b"eXIf");
    chunk.extend_from_slice(&tiff);
    let crc = crc32(&chunk[4..]);
    chunk.extend_from_slice(&crc.to_be_bytes());
    let mut out = png[..33].to_vec();
    out.extend_from_slice(&chunk);
    out.extend_from_slice(&png[33..]);
    let d = decode(&out);
    assert_eq!(d.exif_orientation, 6);
    assert_eq!((d.image.width(), d.image.height()), (20, 40));
    assert_eq!(d.image.pixel(0, 0), [255, 0, 0]);
    assert_eq!(d.image.pixel(0, 39), [0, 0, 255]);
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

#[test]
fn webp_exif_orientation_is_applied() {
    let simple = encode(
        image::DynamicImage::ImageRgb8(red_blue()),
        image::ImageFormat::WebP,
    );
    assert_eq!(&simple[12..16], b"VP8L");
    // Re-wrap as extended WebP: VP8X (EXIF flag, canvas size) + the VP8L chunk + EXIF.
    let mut vp8x = vec![0x08, 0, 0, 0];
    vp8x.extend_from_slice(&39u32.to_le_bytes()[..3]);
    vp8x.extend_from_slice(&19u32.to_le_bytes()[..3]);
    let chunk = |kind: &[u8; 4], data: &[u8]| {
        let mut c = kind.to_vec();
        c.extend_from_slice(&(data.len() as u32).to_le_bytes());
        c.extend_from_slice(data);
        if data.len() % 2 == 1 {
            c.push(0);
        }
        c
    };
    let mut body = b"WEBP".to_vec();
    body.extend(chunk(b"VP8X", &vp8x));
    body.extend_from_slice(&simple[12..]);
    body.extend(chunk(b"EXIF", &exif_tiff(6)));
    let mut out = b"RIFF".to_vec();
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend(body);
    let d = decode(&out);
    assert_eq!(d.format, ImageFormat::WebP);
    assert_eq!(d.exif_orientation, 6);
    assert_eq!((d.image.width(), d.image.height()), (20, 40));
    assert_eq!(d.image.pixel(0, 0), [255, 0, 0]);
}

/// A transparent GIF pixel keeps its palette colour, as in PIL (`P` -> `RGB`).
#[test]
fn transparent_gif_pixels_keep_their_palette_colour() {
    let mut gif = b"GIF89a".to_vec();
    gif.extend_from_slice(&[2, 0, 1, 0, 0x80, 0, 0]); // 2x1 screen, 2-colour table
    gif.extend_from_slice(&[10, 20, 30, 200, 100, 50]);
    gif.extend_from_slice(&[0x21, 0xF9, 4, 1, 0, 0, 1, 0]); // index 1 is transparent
    gif.extend_from_slice(&[0x2C, 0, 0, 0, 0, 2, 0, 1, 0, 0]); // 2x1 frame
    gif.extend_from_slice(&[2, 2, 0x44, 0x0A, 0]); // LZW: clear, 0, 1, end
    gif.push(0x3B);
    let d = decode(&gif);
    assert_eq!(d.image.as_raw(), &[10, 20, 30, 200, 100, 50]);
}
