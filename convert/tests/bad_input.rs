//! Broken checkpoints fail with an error naming the file, tensor or key, and leave
//! no output file.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use mipha_convert::{convert_checkpoint, ConvertError, ConvertOptions, QuantType};
use safetensors::Dtype;

/// Converts `dir` and returns the error, checking that no file appeared.
fn fail(dir: &Path) -> ConvertError {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.mqf");
    let err = convert_checkpoint(&ConvertOptions::new(dir, &out, QuantType::Q8_0)).unwrap_err();
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
    err
}

/// A copy of tiny-a (side files + weights rewritten by `edit`) in a temp dir.
fn variant(shards: usize, edit: impl FnOnce(&mut Vec<Raw>)) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    copy_side_files(&tiny_a(), &dir);
    let mut raw = raw_from(&read_tensors(&tiny_a()), None);
    edit(&mut raw);
    write_weights(&dir, &raw, shards);
    (tmp, dir)
}

fn copy_of_tiny_a() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    std::fs::create_dir(&dir).unwrap();
    for e in std::fs::read_dir(tiny_a()).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    (tmp, dir)
}

#[test]
fn missing_shard_is_named_with_a_tensor_it_holds() {
    let (_t, dir) = copy_of_tiny_a();
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let e = fail(&dir);
    assert!(matches!(e, ConvertError::MissingShard { .. }), "{e:?}");
    let msg = e.to_string();
    // lm_head.bias is the first (sorted) tensor the index maps to shard 2.
    assert!(msg.contains("`model-00002-of-00002.safetensors`"), "{msg}");
    assert!(msg.contains("`lm_head.bias`"), "{msg}");
}

#[test]
fn config_without_hidden_size_names_the_key() {
    let (_t, dir) = copy_of_tiny_a();
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(&p, v.to_string()).unwrap();
    let msg = fail(&dir).to_string();
    assert!(
        msg.contains("config.json: key `hidden_size` is missing"),
        "{msg}"
    );
}

#[test]
fn config_without_nested_key_names_the_path() {
    let (_t, dir) = copy_of_tiny_a();
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    v["vision_config"]["mm_projector"]
        .as_object_mut()
        .unwrap()
        .remove("mm_hidden_size");
    std::fs::write(&p, v.to_string()).unwrap();
    let msg = fail(&dir).to_string();
    assert!(
        msg.contains("`vision_config.mm_projector.mm_hidden_size` is missing"),
        "{msg}"
    );
}

#[test]
fn invalid_config_json_is_reported() {
    let (_t, dir) = copy_of_tiny_a();
    std::fs::write(dir.join("config.json"), "{\"hidden_size\": 64,").unwrap();
    let e = fail(&dir);
    assert!(matches!(e, ConvertError::Json { .. }), "{e:?}");
    assert!(e.to_string().contains("config.json"));
}

#[test]
fn wrong_shape_is_named_with_both_shapes() {
    let name = "model.layers.1.self_attn.q_proj.weight";
    let (_t, dir) = variant(2, |raw| {
        let t = raw.iter_mut().find(|t| t.0 == name).unwrap();
        t.2 = vec![32, 128]; // same element count, wrong shape
    });
    let e = fail(&dir);
    let msg = e.to_string();
    assert!(matches!(e, ConvertError::UnexpectedShape { .. }), "{e:?}");
    assert!(
        msg.contains(name) && msg.contains("[32, 128]") && msg.contains("[64, 64]"),
        "{msg}"
    );
}

#[test]
fn truncated_shard_is_named() {
    let (_t, dir) = copy_of_tiny_a();
    let p = dir.join("model-00001-of-00002.safetensors");
    let len = std::fs::metadata(&p).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(len - 1000).unwrap();
    let e = fail(&dir);
    assert!(matches!(e, ConvertError::Truncated { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("model-00001-of-00002.safetensors: truncated"),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("the file has {}", len - 1000)),
        "{msg}"
    );
}

#[test]
fn shard_cut_inside_its_header_is_reported() {
    let (_t, dir) = copy_of_tiny_a();
    let p = dir.join("model-00002-of-00002.safetensors");
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(100).unwrap();
    let msg = fail(&dir).to_string();
    assert!(
        msg.contains("model-00002-of-00002.safetensors: not a valid safetensors file"),
        "{msg}"
    );
}

#[test]
fn garbage_header_is_reported() {
    let (_t, dir) = copy_of_tiny_a();
    let p = dir.join("model-00001-of-00002.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[8..16].copy_from_slice(b"not json");
    std::fs::write(&p, bytes).unwrap();
    let msg = fail(&dir).to_string();
    assert!(
        msg.contains("model-00001-of-00002.safetensors: not a valid safetensors file"),
        "{msg}"
    );
}

#[test]
fn empty_dir_has_no_config() {
    let tmp = tempfile::tempdir().unwrap();
    let e = fail(tmp.path());
    assert!(matches!(e, ConvertError::MissingConfig { .. }), "{e:?}");
    assert!(e.to_string().contains("no config.json"));
}

#[test]
fn nonexistent_dir_is_reported() {
    let e = fail(Path::new("/nonexistent/mipha-checkpoint"));
    assert!(
        e.to_string().contains("/nonexistent/mipha-checkpoint"),
        "{e}"
    );
}

#[test]
fn config_without_weights() {
    let tmp = tempfile::tempdir().unwrap();
    copy_side_files(&tiny_a(), tmp.path());
    let e = fail(tmp.path());
    assert!(matches!(e, ConvertError::NoWeights { .. }), "{e:?}");
}

#[test]
fn unsupported_dtype_is_named() {
    let name = "model.final_layernorm.weight";
    let (_t, dir) = variant(0, |raw| {
        let t = raw.iter_mut().find(|t| t.0 == name).unwrap();
        t.1 = Dtype::I16; // same byte size as bf16
    });
    let msg = fail(&dir).to_string();
    assert!(msg.contains(name) && msg.contains("I16"), "{msg}");
}

#[test]
fn unsupported_dtype_of_a_dropped_tensor_is_fine() {
    let (_t, dir) = variant(0, |raw| {
        let t = raw
            .iter_mut()
            .find(|t| t.0 == "model.vision_tower.vision_model.head.probe")
            .unwrap();
        t.1 = Dtype::I16;
    });
    let tmp = tempfile::tempdir().unwrap();
    convert_checkpoint(&ConvertOptions::new(
        &dir,
        tmp.path().join("o.mqf"),
        QuantType::F16,
    ))
    .unwrap();
}

#[test]
fn missing_tensor_is_named() {
    let name = "model.mm_projector.2.bias";
    let (_t, dir) = variant(2, |raw| raw.retain(|t| t.0 != name));
    let e = fail(&dir);
    assert!(matches!(e, ConvertError::MissingTensor { .. }), "{e:?}");
    assert!(e.to_string().contains(name));
}

#[test]
fn unknown_tensor_is_refused() {
    let name = "model.layers.0.self_attn.q_layernorm.weight";
    let (_t, dir) = variant(2, |raw| {
        raw.push((name.into(), Dtype::BF16, vec![16], vec![0; 32]));
    });
    let e = fail(&dir);
    assert!(matches!(e, ConvertError::UnexpectedTensor { .. }), "{e:?}");
    assert!(e.to_string().contains(name));
}

#[test]
fn non_finite_value_is_named() {
    let name = "model.layers.1.mlp.fc2.weight";
    let (_t, dir) = variant(2, |raw| {
        let t = raw.iter_mut().find(|t| t.0 == name).unwrap();
        let n = t.3.len();
        t.3[n - 2..].copy_from_slice(&half::bf16::NAN.to_le_bytes());
    });
    let e = fail(&dir);
    assert!(matches!(e, ConvertError::NonFinite { .. }), "{e:?}");
    assert!(e.to_string().contains(name));
}

#[test]
fn index_pointing_at_the_wrong_shard() {
    let (_t, dir) = copy_of_tiny_a();
    let p = dir.join("model.safetensors.index.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    v["weight_map"]["lm_head.weight"] = "model-00001-of-00002.safetensors".into();
    std::fs::write(&p, v.to_string()).unwrap();
    let e = fail(&dir);
    assert!(matches!(e, ConvertError::TensorNotInShard { .. }), "{e:?}");
    assert!(e.to_string().contains("lm_head.weight"));
}

#[test]
fn no_tokenizer_files() {
    let (_t, dir) = copy_of_tiny_a();
    std::fs::remove_file(dir.join("vocab.json")).unwrap();
    let e = fail(&dir);
    assert!(matches!(e, ConvertError::Tokenizer { .. }), "{e:?}");
    assert!(e.to_string().contains("vocab.json"), "{e}");
}

#[test]
fn unsupported_model_variants() {
    for (key, value, needle) in [
        ("model_type", serde_json::json!("mipha_gemma"), "model_type"),
        ("qk_layernorm", serde_json::json!(true), "qk_layernorm"),
        (
            "tie_word_embeddings",
            serde_json::json!(true),
            "tie_word_embeddings",
        ),
    ] {
        let (_t, dir) = copy_of_tiny_a();
        let p = dir.join("config.json");
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        v[key] = value;
        std::fs::write(&p, v.to_string()).unwrap();
        let msg = fail(&dir).to_string();
        assert!(msg.contains(needle), "{msg}");
    }
}

#[test]
fn unknown_quant_value_is_a_usage_error() {
    let out = std::process::Command::new(BIN)
        .args([TINY_A, "-o", "/tmp/never-written.mqf", "--quant", "q3_k"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid value 'q3_k' for '--quant <QUANT>'"),
        "{err}"
    );
    assert!(err.contains("q8_0"), "{err}");
    assert!(!Path::new("/tmp/never-written.mqf").exists());
}
