//! Bad input at the engine level: each a clear error, never a panic, and the
//! engine stays usable afterwards.

use mipha_models::{Engine, EngineOptions, GenerateOptions, Logits};
use mipha_runtime::{Error, Input};
use mipha_tests::*;

fn tiny_a(dir: &std::path::Path) -> std::path::PathBuf {
    convert(&fixture("tiny-a/checkpoint"), dir, "f32", "f32")
}

#[test]
fn a_prompt_longer_than_the_context_is_refused_and_the_engine_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::load(tiny_a(dir.path()), EngineOptions::default()).unwrap();
    let long: Vec<u32> = (0..e.context_length() as u32 + 5)
        .map(|i| 100 + i % 50)
        .collect();
    let err = e
        .generate(&long, &GenerateOptions::default(), |_, _| true)
        .unwrap_err();
    assert!(matches!(err, Error::ContextOverflow { .. }), "{err}");
    assert!(err.to_string().contains("context"), "{err}");
    let ok = e
        .generate(
            &[32, 8537],
            &GenerateOptions {
                max_tokens: 2,
                ..Default::default()
            },
            |_, _| true,
        )
        .unwrap();
    assert!(!ok.tokens.is_empty());
}

#[test]
fn generation_stops_cleanly_at_the_context_end() {
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::load(tiny_a(dir.path()), EngineOptions::default()).unwrap();
    let n = e.context_length() - 3;
    let prompt: Vec<u32> = (0..n as u32).map(|i| 100 + i % 50).collect();
    let opts = GenerateOptions {
        max_tokens: 100,
        ignore_eos: true,
        ..Default::default()
    };
    let g = e.generate(&prompt, &opts, |_, _| true).unwrap();
    assert_eq!(g.stop_reason, mipha_models::StopReason::ContextFull);
    assert_eq!(prompt.len() + g.tokens.len(), e.context_length());
}

#[test]
fn a_full_kv_pool_fails_that_sequence_only() {
    let dir = tempfile::tempdir().unwrap();
    // One context's worth of blocks, shared by two sequences.
    let opts = EngineOptions {
        kv_cache: mipha_models::KvCacheSize::Positions(2048),
        max_outputs: 1,
        ..EngineOptions::default()
    };
    let e = Engine::load(tiny_a(dir.path()), opts).unwrap();
    let a = e.new_sequence();
    let b = e.new_sequence();
    let big: Vec<Input> = (0..e.context_length() - 20)
        .map(|i| Input::Token(100 + (i % 50) as u32))
        .collect();
    let mut logits = Vec::new();
    e.forward(a, &big, Logits::Last, &mut logits, None).unwrap();
    let small: Vec<Input> = (0..64).map(|i| Input::Token(200 + i)).collect();
    let err = e
        .forward(b, &small, Logits::Last, &mut logits, None)
        .unwrap_err();
    assert!(matches!(err, Error::KvCacheFull { .. }), "{err}");
    assert_eq!(
        e.sequence_len(b).unwrap(),
        0,
        "the failed sequence is unchanged"
    );
    // The neighbour still decodes exactly as a fresh sequence would.
    let mut next = Vec::new();
    e.forward(a, &[Input::Token(7)], Logits::Last, &mut next, None)
        .unwrap();
    e.release_sequence(a).unwrap();
    e.release_sequence(b).unwrap();
    let c = e.new_sequence();
    let mut fresh = Vec::new();
    let mut all = big.clone();
    all.push(Input::Token(7));
    e.forward(c, &all, Logits::Last, &mut fresh, None).unwrap();
    assert!(max_abs_diff(&next, &fresh) < 1e-4);
}

#[test]
fn foreign_and_damaged_model_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("model.gguf");
    let mut bytes = b"GGUF".to_vec();
    bytes.extend_from_slice(&3u32.to_le_bytes());
    bytes.resize(256, 0);
    std::fs::write(&gguf, bytes).unwrap();
    let err = Engine::load(&gguf, EngineOptions::default()).err().unwrap();
    assert!(err.to_string().contains("GGUF"), "{err}");

    let st = fixture("tiny-a/checkpoint/model-00001-of-00002.safetensors");
    let err = Engine::load(&st, EngineOptions::default()).err().unwrap();
    assert!(err.to_string().contains("safetensors"), "{err}");

    let mqf = tiny_a(dir.path());
    let full = std::fs::read(&mqf).unwrap();
    let cut = dir.path().join("cut.mqf");
    std::fs::write(&cut, &full[..full.len() / 2]).unwrap();
    let err = Engine::load(&cut, EngineOptions::default()).err().unwrap();
    assert!(err.to_string().contains("truncated"), "{err}");

    let missing = dir.path().join("nope.mqf");
    let err = Engine::load(&missing, EngineOptions::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("nope.mqf"), "{err}");
}

#[test]
fn a_flipped_data_byte_is_caught_by_verify_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let mqf = tiny_a(dir.path());
    let file = mipha_runtime::MqfFile::open(&mqf).unwrap();
    let t = file.tensor("model.layers.1.mlp.fc1.weight").unwrap();
    let at = file.data_offset() + t.info.offset + 5;
    drop(file);
    let mut bytes = std::fs::read(&mqf).unwrap();
    bytes[at as usize] ^= 0x40;
    std::fs::write(&mqf, bytes).unwrap();
    let opts = EngineOptions {
        verify: true,
        ..EngineOptions::default()
    };
    let err = Engine::load(&mqf, opts).err().unwrap();
    assert!(
        err.to_string().contains("model.layers.1.mlp.fc1.weight"),
        "{err}"
    );
}

#[test]
fn out_of_vocabulary_ids_and_bad_sampling_settings_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::load(tiny_a(dir.path()), EngineOptions::default()).unwrap();
    let err = e
        .generate(&[999_999], &GenerateOptions::default(), |_, _| true)
        .unwrap_err();
    assert!(err.to_string().contains("999999"), "{err}");
    let mut opts = GenerateOptions::default();
    opts.sampling.top_p = 0.0;
    let err = e.generate(&[32], &opts, |_, _| true).unwrap_err();
    assert!(err.to_string().contains("top-p"), "{err}");
}
