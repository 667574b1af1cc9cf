//! tiny-a (bf16, two shards, no tokenizer.json) converted to every storage type.

mod common;

use std::collections::BTreeSet;

use common::*;
use mipha_convert::{convert_checkpoint, ConvertOptions, QuantType};
use mipha_kernels::quant::dequantize_row;
use mipha_runtime::MqfFile;
use sha2::{Digest, Sha256};

fn is_always_f32(name: &str, shape: &[usize]) -> bool {
    shape.len() == 1
        || name.ends_with("patch_embedding.weight")
        || name.ends_with("position_embedding.weight")
}

#[test]
fn every_quant_type_stores_the_source_values() {
    let src = read_tensors(&tiny_a());
    let dropped = tiny_a_dropped(&src);
    assert_eq!(dropped.len(), 16 + 2 + 11, "fixture layout changed?");
    let tmp = tempfile::tempdir().unwrap();
    for ty in QuantType::ALL {
        let out = tmp.path().join(format!("tiny-a.{ty}.mqf"));
        let report = convert_checkpoint(&ConvertOptions::new(tiny_a(), &out, ty)).unwrap();
        assert_eq!(report.dropped, dropped);
        assert!(report.fallbacks.is_empty(), "{:?}", report.fallbacks);
        assert!(report.warnings.is_empty(), "{:?}", report.warnings);

        let f = MqfFile::open(&out).unwrap();
        f.verify().unwrap();
        assert_eq!(report.tensors, f.tensors().len());
        assert_eq!(report.file_size, f.file_size());

        let names: BTreeSet<&str> = f.tensors().iter().map(|t| t.name.as_str()).collect();
        let kept: BTreeSet<&str> = src
            .keys()
            .map(String::as_str)
            .filter(|n| !dropped.iter().any(|d| d == n))
            .collect();
        assert_eq!(names, kept, "{ty}: kept tensors");

        for info in f.tensors() {
            let s = &src[&info.name];
            let shape: Vec<u64> = s.shape.iter().map(|&d| d as u64).collect();
            assert_eq!(info.shape, shape, "{}", info.name);
            let want_ty = if is_always_f32(&info.name, &s.shape) {
                QuantType::F32
            } else {
                ty
            };
            assert_eq!(info.ty, want_ty, "{}", info.name);
            let data = f.tensor(&info.name).unwrap().data;
            assert_eq!(
                data,
                expected_bytes(info.ty, &s.shape, &s.values).as_slice(),
                "{ty}: {} bytes differ from quantize_row of the source",
                info.name
            );
            // Round trip: the float types give the source values back.
            let cols = info.cols();
            let mut row = vec![0f32; cols];
            for (r, want) in s.values.chunks(cols).enumerate() {
                let stride = info.row_stride as usize;
                dequantize_row(info.ty, &data[r * stride..(r + 1) * stride], &mut row);
                match info.ty {
                    QuantType::F32 | QuantType::BF16 => assert_eq!(row, want, "{}", info.name),
                    QuantType::F16 => {
                        for (a, b) in row.iter().zip(want) {
                            let tol = (b.abs() * 2f32.powi(-11)).max(2f32.powi(-24));
                            assert!((a - b).abs() <= tol, "{}: {a} vs {b}", info.name);
                        }
                    }
                    QuantType::Q8_0 | QuantType::Q4_0 => {}
                }
            }
        }

        let m = f.metadata();
        assert_eq!(m.get_str("general.architecture").unwrap(), "mipha-phi");
        assert_eq!(
            m.get_str("general.name").unwrap(),
            "mipha-random-tiny-a-seed3"
        );
        assert_eq!(m.get_str("general.quant").unwrap(), ty.name());
        assert_eq!(m.get_str("general.vision_quant").unwrap(), ty.name());
        assert_eq!(m.get_str_array("general.dropped_tensors").unwrap(), dropped);
        assert!(m
            .get_str_array("general.quant_fallbacks")
            .unwrap()
            .is_empty());
        assert!(m.get("general.synthetic").is_none());
        assert_eq!(m.get_u64("tokenizer.eos_token_id").unwrap(), 50256);
        assert_eq!(m.get_u64("tokenizer.bos_token_id").unwrap(), 50256);
        assert_eq!(m.get_u64("tokenizer.pad_token_id").unwrap(), 50256);
        assert!(!m.get_bool("tokenizer.add_bos").unwrap());
        assert_eq!(m.get_i64("tokenizer.image_token_index").unwrap(), -200);
        assert_eq!(m.get_u64("lm.vocab_size").unwrap(), 51200);
        assert_eq!(m.get_u64("lm.hidden_size").unwrap(), 64);
        assert_eq!(m.get_u64("lm.head_dim").unwrap(), 16);
        assert_eq!(m.get_u64("lm.rotary_dims").unwrap(), 8);
        assert_eq!(m.get_u64("lm.num_key_value_heads").unwrap(), 4);
        assert_eq!(m.get_f64("lm.layer_norm_eps").unwrap(), 1e-5);
        assert_eq!(m.get_str("lm.hidden_act").unwrap(), "gelu_new");
        assert_eq!(m.get_u64("vision.num_hidden_layers").unwrap(), 1);
        assert_eq!(m.get_u64("vision.num_hidden_layers_checkpoint").unwrap(), 2);
        assert_eq!(m.get_i64("vision.select_layer").unwrap(), -2);
        assert_eq!(m.get_str("vision.select_feature").unwrap(), "patch");
        assert_eq!(m.get_f64("vision.layer_norm_eps").unwrap(), 1e-6);
        assert_eq!(m.get_str("projector.type").unwrap(), "mlp2x_gelu");
        assert_eq!(m.get_u64("projector.input_size").unwrap(), 64);
        assert_eq!(m.get_str("chat.template").unwrap(), "phi");
        assert_eq!(
            m.get_str_array("chat.roles").unwrap(),
            ["USER", "ASSISTANT"]
        );
        assert_eq!(m.get_str("chat.sep2").unwrap(), "<|endoftext|>");
        assert_eq!(m.get_u64_array("image.size").unwrap(), [42, 42]);
        assert_eq!(m.get_f64_array("image.mean").unwrap(), [0.5; 3]);
        assert_eq!(m.get_f64("image.rescale_factor").unwrap(), 1.0 / 255.0);
        assert_eq!(m.get_str("image.resample").unwrap(), "bicubic");
        assert_eq!(m.get_str("image.aspect").unwrap(), "pad");
        assert_eq!(m.get_u64_array("image.pad_color").unwrap(), [127; 3]);

        // The stored tokenizer loads and encodes like the reference.
        let tok =
            tokenizers::Tokenizer::from_bytes(m.get_bytes("tokenizer.huggingface.json").unwrap())
                .unwrap();
        let ids = tok.encode("a  b<|endoftext|>", false).unwrap();
        assert_eq!(ids.get_ids(), [64, 50286, 65, 50256]);

        // Provenance: every file read, with its SHA-256.
        let files = m.get_str_array("general.source_files").unwrap();
        let shas = m.get_str_array("general.source_sha256").unwrap();
        assert_eq!(files.len(), shas.len());
        for want in [
            "config.json",
            "preprocessor_config.json",
            "vocab.json",
            "merges.txt",
            "added_tokens.json",
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ] {
            let i = files
                .iter()
                .position(|f| *f == want)
                .unwrap_or_else(|| panic!("{want}"));
            let bytes = std::fs::read(tiny_a().join(want)).unwrap();
            let hex: String = Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(shas[i], hex, "{want}");
        }
        assert!(m
            .get_str("general.converter")
            .unwrap()
            .starts_with("mipha-convert "));
    }
}

#[test]
fn vision_quant_applies_to_tower_and_projector() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("mixed.mqf");
    let mut opts = ConvertOptions::new(tiny_a(), &out, QuantType::Q4_0);
    opts.vision_quant = QuantType::F16;
    convert_checkpoint(&opts).unwrap();
    let f = MqfFile::open(&out).unwrap();
    assert_eq!(f.metadata().get_str("general.vision_quant").unwrap(), "f16");
    for t in f.tensors() {
        if t.shape.len() == 1
            || t.name.ends_with("patch_embedding.weight")
            || t.name.ends_with("position_embedding.weight")
        {
            assert_eq!(t.ty, QuantType::F32, "{}", t.name);
        } else if t.name.starts_with("model.vision_tower.")
            || t.name.starts_with("model.mm_projector.")
        {
            assert_eq!(t.ty, QuantType::F16, "{}", t.name);
        } else {
            assert_eq!(t.ty, QuantType::Q4_0, "{}", t.name);
        }
    }
}

/// The other generated fixtures (f32 and f16 sources, widths that are not multiples
/// of 32, three shards) convert as well, when present.
#[test]
fn other_fixtures_convert() {
    let root = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures"));
    let tmp = tempfile::tempdir().unwrap();
    for name in ["gen-f32", "gen-hd80"] {
        let dir = root.join(name).join("checkpoint");
        if !dir.join("config.json").is_file() {
            continue;
        }
        let src = read_tensors(&dir);
        for ty in [QuantType::F32, QuantType::Q4_0] {
            let out = tmp.path().join(format!("{name}.{ty}.mqf"));
            let r = convert_checkpoint(&ConvertOptions::new(&dir, &out, ty)).unwrap();
            assert!(r.fallbacks.is_empty());
            let f = MqfFile::open(&out).unwrap();
            f.verify().unwrap();
            for info in f.tensors() {
                let s = &src[&info.name];
                assert_eq!(
                    f.tensor(&info.name).unwrap().data,
                    expected_bytes(info.ty, &s.shape, &s.values).as_slice(),
                    "{name} {ty}: {}",
                    info.name
                );
            }
        }
    }
}
