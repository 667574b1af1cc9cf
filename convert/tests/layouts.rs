//! The same weights in other checkpoint layouts (one file; f32 and f16 shards) give
//! the same stored tensors.

mod common;

use common::*;
use mipha_convert::{convert_checkpoint, ConvertOptions, QuantType};
use mipha_runtime::MqfFile;
use safetensors::Dtype;

fn convert(dir: &std::path::Path, out: &std::path::Path, ty: QuantType) -> MqfFile {
    convert_checkpoint(&ConvertOptions::new(dir, out, ty)).unwrap();
    let f = MqfFile::open(out).unwrap();
    f.verify().unwrap();
    f
}

#[test]
fn single_file_and_resharded_checkpoints_match() {
    let src = read_tensors(&tiny_a());
    let tmp = tempfile::tempdir().unwrap();

    let single = tmp.path().join("single");
    copy_side_files(&tiny_a(), &single);
    write_weights(&single, &raw_from(&src, None), 0);

    // bf16 values widen to f32 exactly, so an f32 checkpoint holds the same numbers.
    let f32_shards = tmp.path().join("f32-shards");
    copy_side_files(&tiny_a(), &f32_shards);
    write_weights(&f32_shards, &raw_from(&src, Some(Dtype::F32)), 3);

    // f16 rounds some bf16 values (small magnitudes, f16 subnormals): compare against
    // the f16-rounded source.
    let f16_shards = tmp.path().join("f16-shards");
    copy_side_files(&tiny_a(), &f16_shards);
    write_weights(&f16_shards, &raw_from(&src, Some(Dtype::F16)), 4);
    let f16_src = read_tensors(&f16_shards);

    for ty in [QuantType::F32, QuantType::Q8_0] {
        let base = convert(&tiny_a(), &tmp.path().join(format!("base.{ty}.mqf")), ty);
        let variants = [
            (&single, "single", false),
            (&f32_shards, "f32", false),
            (&f16_shards, "f16", true),
        ];
        for (dir, label, rounded) in variants {
            let f = convert(dir, &tmp.path().join(format!("{label}.{ty}.mqf")), ty);
            assert_eq!(f.tensors().len(), base.tensors().len(), "{label}");
            for (a, b) in f.tensors().iter().zip(base.tensors()) {
                assert_eq!(
                    (&a.name, a.ty, &a.shape),
                    (&b.name, b.ty, &b.shape),
                    "{label}"
                );
                let got = f.tensor(&a.name).unwrap().data;
                if rounded {
                    let s = &f16_src[&a.name];
                    assert_eq!(
                        got,
                        expected_bytes(a.ty, &s.shape, &s.values),
                        "{label}: {}",
                        a.name
                    );
                } else {
                    assert_eq!(
                        got,
                        base.tensor(&b.name).unwrap().data,
                        "{label}: {}",
                        a.name
                    );
                }
            }
            let m = f.metadata();
            assert_eq!(
                m.get_str_array("general.dropped_tensors").unwrap(),
                base.metadata()
                    .get_str_array("general.dropped_tensors")
                    .unwrap()
            );
            let files = m.get_str_array("general.source_files").unwrap();
            if label == "single" {
                assert!(files.contains(&"model.safetensors"), "{files:?}");
                assert!(!files.contains(&"model.safetensors.index.json"));
            } else {
                assert!(files.contains(&"model.safetensors.index.json"), "{files:?}");
            }
        }
    }
}

/// A checkpoint that ships its own tokenizer.json: stored verbatim.
#[test]
fn checkpoint_tokenizer_json_is_used_verbatim() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    copy_side_files(&tiny_a(), &dir);
    write_weights(&dir, &raw_from(&read_tensors(&tiny_a()), None), 0);
    let reference = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../assets/phi2-tokenizer/tokenizer.json"
    ))
    .unwrap();
    std::fs::write(dir.join("tokenizer.json"), &reference).unwrap();
    let f = convert(&dir, &tmp.path().join("out.mqf"), QuantType::F16);
    let m = f.metadata();
    assert_eq!(
        m.get_bytes("tokenizer.huggingface.json").unwrap(),
        reference.as_slice()
    );
    let files = m.get_str_array("general.source_files").unwrap();
    assert!(files.contains(&"tokenizer.json"));
    assert!(!files.contains(&"vocab.json"));
}

/// Without preprocessor_config.json the SigLIP defaults are used, with a warning.
#[test]
fn missing_preprocessor_config_uses_siglip_defaults() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    copy_side_files(&tiny_a(), &dir);
    std::fs::remove_file(dir.join("preprocessor_config.json")).unwrap();
    write_weights(&dir, &raw_from(&read_tensors(&tiny_a()), None), 2);
    let out = tmp.path().join("out.mqf");
    let r = convert_checkpoint(&ConvertOptions::new(&dir, &out, QuantType::F32)).unwrap();
    assert_eq!(r.warnings.len(), 1);
    assert!(
        r.warnings[0].contains("preprocessor_config.json"),
        "{:?}",
        r.warnings
    );
    let f = MqfFile::open(&out).unwrap();
    let m = f.metadata();
    assert_eq!(m.get_u64_array("image.size").unwrap(), [42, 42]);
    assert_eq!(m.get_f64_array("image.std").unwrap(), [0.5; 3]);
    assert_eq!(m.get_str("image.resample").unwrap(), "bicubic");
}
