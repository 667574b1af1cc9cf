//! The resampler against Pillow: `image_resize_cases.json` holds PIL's own output
//! for small random images resized up and down (made by
//! `tools/fixture-gen/pil_resize_cases.py`); every byte must match.

use mipha_models::image::{preprocess, Aspect, ImageConfig, Resample, RgbImage};

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn matches_pillow_byte_for_byte() {
    let text = include_str!("image_resize_cases.json");
    let doc: serde_json::Value = serde_json::from_str(text).unwrap();
    let cases = doc["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for (i, c) in cases.iter().enumerate() {
        let u = |k: &str| c[k].as_u64().unwrap() as u32;
        let (w, h, ow, oh) = (u("w"), u("h"), u("out_w"), u("out_h"));
        let filter = Resample::from_name(c["filter"].as_str().unwrap()).unwrap();
        let img = RgbImage::new(w, h, hex(c["src"].as_str().unwrap())).unwrap();
        let img = match c["pad"].as_array() {
            Some(p) => {
                let p: Vec<u8> = p.iter().map(|v| v.as_u64().unwrap() as u8).collect();
                img.expand_to_square([p[0], p[1], p[2]])
            }
            None => img,
        };
        let got = img.resize(ow, oh, filter);
        let want = hex(c["out"].as_str().unwrap());
        let bad = got
            .as_raw()
            .iter()
            .zip(&want)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            bad, 0,
            "case {i} ({w}x{h} -> {ow}x{oh} {filter:?}, pad {}): {bad} bytes differ",
            c["pad"]
        );
        assert_eq!(got.as_raw().len(), want.len());
    }
}

/// Preprocessing pads virtually (no square canvas is built); it must equal padding
/// for real and resizing that.
#[test]
fn virtual_padding_equals_expand2square() {
    let mut seed = 0x2545F4914F6CDD1Du64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 24) as u8
    };
    for (w, h, side) in [
        (97, 61, 56),
        (53, 90, 56),
        (40, 23, 56),
        (1, 30, 7),
        (30, 1, 7),
        (12, 12, 5),
    ] {
        let img = RgbImage::new(w, h, (0..w * h * 3).map(|_| next()).collect()).unwrap();
        let pad = [127, 3, 250];
        let cfg = ImageConfig::new(
            [side, side],
            [0.0; 3],
            [1.0; 3],
            1.0,
            Resample::Bicubic,
            Aspect::Pad,
            pad,
        )
        .unwrap();
        let got = preprocess(&img, &cfg);
        let want = img
            .expand_to_square(pad)
            .resize(side as u32, side as u32, Resample::Bicubic);
        let plane = side * side;
        for (i, p) in want.as_raw().chunks_exact(3).enumerate() {
            for (c, &v) in p.iter().enumerate() {
                assert_eq!(
                    got.pixels[c * plane + i],
                    f32::from(v),
                    "{w}x{h} px {i} ch {c}"
                );
            }
        }
    }
}

#[test]
fn expand_to_square_offsets_like_pil_paste() {
    let img = RgbImage::new(4, 1, vec![9; 12]).unwrap();
    let sq = img.expand_to_square([1, 2, 3]);
    assert_eq!((sq.width(), sq.height()), (4, 4));
    // (4 - 1) // 2 = 1: the image row lands on row 1.
    assert_eq!(sq.pixel(0, 0), [1, 2, 3]);
    assert_eq!(sq.pixel(3, 1), [9, 9, 9]);
    assert_eq!(sq.pixel(0, 2), [1, 2, 3]);
    let img = RgbImage::new(2, 5, vec![9; 30]).unwrap();
    let sq = img.expand_to_square([1, 2, 3]);
    assert_eq!((sq.width(), sq.height()), (5, 5));
    // (5 - 2) // 2 = 1: columns 1 and 2.
    assert_eq!(sq.pixel(0, 4), [1, 2, 3]);
    assert_eq!(sq.pixel(1, 4), [9, 9, 9]);
    assert_eq!(sq.pixel(2, 0), [9, 9, 9]);
    assert_eq!(sq.pixel(3, 0), [1, 2, 3]);
}

/// Timing, not correctness: `cargo test --release -p mipha-models --test
/// image_resize -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_12_megapixel_to_384() {
    let (w, h) = (4000u32, 3000u32);
    let data: Vec<u8> = (0..w as usize * h as usize * 3)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let img = RgbImage::new(w, h, data).unwrap();
    let cfg = ImageConfig::new(
        [384, 384],
        [0.5; 3],
        [0.5; 3],
        1.0 / 255.0,
        Resample::Bicubic,
        Aspect::Pad,
        [127; 3],
    )
    .unwrap();
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let _ = preprocess(&img, &cfg);
        let total = t.elapsed();
        let t = std::time::Instant::now();
        let hash = img.content_hash();
        let hashing = t.elapsed();
        eprintln!(
            "{w}x{h} -> 384x384 preprocess {:.1} ms; SHA-256 of the decoded image {:.1} ms ({:08x})",
            total.as_secs_f64() * 1e3,
            hashing.as_secs_f64() * 1e3,
            hash as u32
        );
    }
}
