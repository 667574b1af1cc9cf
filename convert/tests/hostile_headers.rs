//! Hostile numbers in a checkpoint's headers and config, and tokenizer files
//! the `tokenizers` crate panics on (what fuzzing the checkpoint reader turned
//! up): each a clear error naming the tensor, key or file, never an arithmetic
//! overflow, a panic, a hang or a huge allocation.

use std::path::{Path, PathBuf};

use mipha_convert::checkpoint::Checkpoint;
use mipha_convert::config::ModelConfig;
use mipha_convert::{convert_checkpoint, ConvertOptions, QuantType};
use serde_json::{json, Value};

const TINY_A: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/tiny-a/checkpoint"
);

/// A checkpoint folder with tiny-a's config and tokenizer files and the given
/// `model.safetensors` bytes.
fn checkpoint_with(weights: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    std::fs::create_dir(&dir).unwrap();
    for e in std::fs::read_dir(TINY_A).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        if !name.starts_with("model") {
            std::fs::copy(&p, dir.join(name)).unwrap();
        }
    }
    std::fs::write(dir.join("model.safetensors"), weights).unwrap();
    (tmp, dir)
}

/// A safetensors file of just a header (8-byte length + JSON), no data.
fn header_only(header: &Value) -> Vec<u8> {
    let text = serde_json::to_vec(header).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out
}

#[test]
fn data_offsets_near_2_pow_64_are_an_error_naming_a_tensor() {
    // Eight contiguous U8 tensors of 2^61 - 1 bytes each: the safetensors crate
    // accepts the offsets (contiguous, each matching its shape), and the last
    // one ends at 2^64 - 8, past any data start.
    let n: u64 = (1 << 61) - 1;
    let mut h = serde_json::Map::new();
    for k in 0..8u64 {
        h.insert(
            format!("t{k}"),
            json!({"dtype": "U8", "shape": [n], "data_offsets": [k * n, (k + 1) * n]}),
        );
    }
    let (_t, dir) = checkpoint_with(&header_only(&Value::Object(h)));
    let e = Checkpoint::open(&dir).unwrap_err().to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    assert!(e.contains("`t0`"), "{e}");

    let out = dir.parent().unwrap().join("out.mqf");
    let e = convert_checkpoint(&ConvertOptions::new(&dir, &out, QuantType::F32))
        .unwrap_err()
        .to_string();
    assert!(e.contains("`t0`"), "{e}");
    assert!(!out.exists());
}

#[test]
fn data_offsets_beyond_u64_are_refused_by_the_header_parser() {
    // An offset that does not fit in 64 bits at all.
    let text = br#"{"t":{"dtype":"U8","shape":[1],"data_offsets":[0,18446744073709551617]}}"#;
    let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(text);
    let (_t, dir) = checkpoint_with(&bytes);
    let e = Checkpoint::open(&dir).unwrap_err().to_string();
    assert!(e.contains("not a valid safetensors file"), "{e}");
}

fn tiny_config() -> Value {
    serde_json::from_slice(&std::fs::read(Path::new(TINY_A).join("config.json")).unwrap()).unwrap()
}

/// `config.json` with one value replaced (a `/`-separated path) must be refused
/// with an error naming `key`.
fn refused(path: &str, value: Value, key: &str) {
    let mut v = tiny_config();
    *v.pointer_mut(path).unwrap() = value.clone();
    let e = ModelConfig::from_value(Path::new("config.json"), &v)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains(key), "{path} = {value}: {e}");
}

#[test]
fn layer_counts_beyond_the_limit_are_refused_before_planning() {
    // 2^40 layers used to build a plan of 2^44 tensor names (minutes, then OOM).
    refused("/num_hidden_layers", json!(1u64 << 40), "num_hidden_layers");
    refused(
        "/vision_config/vision_tower/num_hidden_layers",
        json!(1u64 << 40),
        "vision_config.vision_tower.num_hidden_layers",
    );
    // u64::MAX vision layers: `layers as i64 + 1` wrapped, then `layers + 1` in
    // the message overflowed.
    refused(
        "/vision_config/vision_tower/num_hidden_layers",
        json!(u64::MAX),
        "vision_config.vision_tower.num_hidden_layers",
    );
}

#[test]
fn select_layer_extremes_are_refused() {
    for sel in [i64::MIN, i64::MIN + 1, i64::MAX, -1 - (1 << 40)] {
        refused(
            "/vision_config/vision_tower/mm_vision_select_layer",
            json!(sel),
            "mm_vision_select_layer",
        );
    }
}

#[test]
fn sizes_whose_products_overflow_are_refused() {
    // 2^33 px with 1 px patches: (2^33)^2 patches overflowed in the plan.
    let mut v = tiny_config();
    v["vision_config"]["vision_tower"]["image_size"] = json!(1u64 << 33);
    v["vision_config"]["vision_tower"]["patch_size"] = json!(1);
    let e = ModelConfig::from_value(Path::new("config.json"), &v)
        .unwrap_err()
        .to_string();
    assert!(e.contains("vision_config.vision_tower.image_size"), "{e}");
    for key in [
        "/vocab_size",
        "/intermediate_size",
        "/max_position_embeddings",
    ] {
        refused(key, json!(u64::MAX), key.trim_start_matches('/'));
    }
    refused(
        "/vision_config/vision_tower/num_channels",
        json!(1u64 << 40),
        "num_channels",
    );
}

#[test]
fn the_real_config_is_within_every_limit() {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../assets/mipha-3b/config.json"
    );
    ModelConfig::from_file(Path::new(p)).unwrap();
}

/// A one-merge BPE `tokenizer.json` with `<|endoftext|>`; `model` entries and
/// `decoder` as given.
fn tokenizer_json(prefix: &str, decoder: &str) -> Vec<u8> {
    format!(
        r#"{{"version":"1.0","truncation":null,"padding":null,
        "added_tokens":[{{"id":3,"content":"<|endoftext|>","single_word":false,"lstrip":false,
            "rstrip":false,"normalized":false,"special":true}}],
        "normalizer":null,"pre_tokenizer":null,"post_processor":null,"decoder":{decoder},
        "model":{{"type":"BPE","dropout":null,"unk_token":null,"continuing_subword_prefix":{prefix},
            "end_of_word_suffix":null,"fuse_unk":false,"byte_fallback":false,
            "vocab":{{"a":0,"b":1,"ab":2}},"merges":["a b"]}}}}"#
    )
    .into_bytes()
}

#[test]
fn tokenizer_files_the_tokenizers_crate_panics_on_are_errors() {
    use mipha_convert::tokenizer::TokenizerInfo;
    let load = |json: Vec<u8>| TokenizerInfo::from_json(json, Path::new("tokenizer.json"), vec![]);
    load(tokenizer_json("null", "null")).expect("the well-formed file loads");
    // `DecoderWrapper`'s deserialiser calls `expect("Helper")` on a syntax error
    // inside `decoder`.
    let e = load(tokenizer_json(
        "null",
        r#"{"type":"ByteLevel","add_prefix_space":tru}"#,
    ))
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("not valid JSON"),
        "{e}"
    );
    // The same for a lone surrogate escape and for nesting past serde_json's
    // depth limit inside `decoder` (both pass a lenient scan of the syntax).
    let deep = format!("{}null{}", "[".repeat(200), "]".repeat(200));
    for decoder in [
        r#"{"type":"Replace","pattern":{"String":"\ud800"},"content":""}"#,
        &deep,
    ] {
        let e = load(tokenizer_json("null", decoder))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not valid JSON"), "{e}");
    }
    // `BPE::build` slices each merge's second token past the prefix's length.
    let e = load(tokenizer_json("\"~~~~~~~~\"", "null"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("panicked"),
        "{e}"
    );
}
