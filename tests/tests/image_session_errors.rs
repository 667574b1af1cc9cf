//! Bad pictures and oversized multimodal prompts at the session level: each is a
//! clear error naming the problem, nothing is attached, and the session answers
//! the next question normally. (The decoder's own cases are in
//! `models/tests/image_bad_input.rs`.)

use std::sync::Arc;

use mipha_models::{GenerateOptions, Session};
use mipha_tests::*;

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A PNG whose header declares `w` x `h` pixels, with no image data.
fn png_header(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    out.extend_from_slice(&13u32.to_be_bytes());
    out.extend_from_slice(&ihdr);
    out.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    out
}

#[test]
fn bad_pictures_are_named_and_the_session_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let mqf = convert(&fixture("tiny-a/checkpoint"), dir.path(), "f32", "f32");
    let e = Arc::new(conformance_engine(&mqf));
    let mut s = Session::new(e.clone());

    let good = std::fs::read(fixture("tiny-a/chelsea.png")).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated.png",
            good[..good.len() / 2].to_vec(),
            "truncated.png",
        ),
        ("bomb.png", png_header(100_000, 100_000), "100000x100000"),
        ("empty.png", png_header(0, 0), "empty.png"),
        ("notes.txt", b"just some text".to_vec(), "notes.txt"),
        ("zero.jpg", Vec::new(), "zero.jpg"),
    ];
    for (name, bytes, needle) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let t = std::time::Instant::now();
        let err = s.attach_image(&path).unwrap_err().to_string();
        assert!(err.contains(needle), "{name}: {err}");
        assert!(t.elapsed().as_secs() < 5, "{name} took {:?}", t.elapsed());
        assert_eq!(s.pending_images(), 0);
    }
    let err = s.attach_image(dir.path().join("missing.png")).unwrap_err();
    assert!(err.to_string().contains("missing.png"), "{err}");

    // A picture plus text that cannot fit the context.
    s.attach_image(fixture("tiny-a/chelsea.png")).unwrap();
    let long = "word ".repeat(e.context_length());
    let opts = GenerateOptions {
        max_tokens: 2,
        ..Default::default()
    };
    let err = s.ask(&long, &opts, None, |_, _| true).unwrap_err();
    assert!(err.to_string().contains("context"), "{err}");
    assert_eq!(
        s.pending_images(),
        1,
        "the picture waits for the next question"
    );

    let r = s.ask("What is this?", &opts, None, |_, _| true).unwrap();
    assert_eq!(r.stats.images_encoded + r.stats.images_cached, 1);
    assert!(!r.tokens.is_empty());
}

#[test]
fn a_text_only_model_refuses_pictures_clearly() {
    // The language-model tensors alone: a model file without a vision tower.
    let dir = tempfile::tempdir().unwrap();
    let full = convert(&fixture("tiny-a/checkpoint"), dir.path(), "f32", "f32");
    let src = mipha_runtime::MqfFile::open(&full).unwrap();
    let keep: Vec<_> = src
        .tensors()
        .iter()
        .filter(|t| !t.name.contains("vision_tower") && !t.name.contains("mm_projector"))
        .collect();
    let meta: Vec<_> = src
        .metadata()
        .iter()
        .filter(|(k, _)| !k.starts_with("vision.") && !k.starts_with("projector."))
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    let specs = keep
        .iter()
        .map(|t| mipha_runtime::TensorSpec::new(t.name.clone(), t.ty, t.shape.clone()))
        .collect();
    let out = dir.path().join("text-only.mqf");
    let mut w = mipha_runtime::MqfWriter::create(&out, meta, specs).unwrap();
    for (i, t) in keep.iter().enumerate() {
        w.write_tensor(i, src.tensor(&t.name).unwrap().data)
            .unwrap();
    }
    w.finish().unwrap();
    let e = Arc::new(conformance_engine(&out));
    let mut s = Session::new(e);
    let err = s.attach_image(fixture("tiny-a/chelsea.png")).unwrap_err();
    assert!(err.to_string().contains("no vision tower"), "{err}");
    let opts = GenerateOptions {
        max_tokens: 2,
        ..Default::default()
    };
    s.ask("Hello", &opts, None, |_, _| true).unwrap();
}
