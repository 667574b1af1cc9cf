//! `synth`: a random-weight file with the same tensors and metadata layout as a
//! conversion of the same config.

mod common;

use common::*;
use mipha_convert::{convert_checkpoint, synth, ConvertOptions, QuantType, SynthOptions};
use mipha_kernels::quant::dequantize_row;
use mipha_runtime::MqfFile;

fn values(f: &MqfFile, name: &str) -> Vec<f32> {
    let t = f.tensor(name).unwrap();
    let cols = t.info.cols();
    let mut out = Vec::new();
    let mut row = vec![0f32; cols];
    for r in 0..t.info.rows() {
        dequantize_row(t.info.ty, t.row(r).unwrap(), &mut row);
        out.extend_from_slice(&row);
    }
    out
}

fn std_dev(v: &[f32]) -> f64 {
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt()
}

#[test]
fn synth_matches_a_conversion_of_the_same_config() {
    let tmp = tempfile::tempdir().unwrap();
    let conv = tmp.path().join("conv.mqf");
    let mut copts = ConvertOptions::new(tiny_a(), &conv, QuantType::Q8_0);
    copts.vision_quant = QuantType::F16;
    convert_checkpoint(&copts).unwrap();

    let out = tmp.path().join("synth.mqf");
    let mut opts = SynthOptions::new(tiny_a().join("config.json"), &out, QuantType::Q8_0);
    opts.vision_quant = QuantType::F16;
    opts.seed = 42;
    let r = synth(&opts).unwrap();

    let s = MqfFile::open(&out).unwrap();
    s.verify().unwrap();
    let c = MqfFile::open(&conv).unwrap();
    assert_eq!(r.tensors, s.tensors().len());
    assert_eq!(r.file_size, s.file_size());
    let shape = |f: &MqfFile| -> Vec<_> {
        f.tensors()
            .iter()
            .map(|t| (t.name.clone(), t.ty, t.shape.clone()))
            .collect()
    };
    assert_eq!(shape(&s), shape(&c));
    assert_eq!(
        r.params,
        s.tensors().iter().map(|t| t.numel() as u64).sum::<u64>()
    );

    let (sm, cm) = (s.metadata(), c.metadata());
    assert!(sm.get_bool("general.synthetic").unwrap());
    assert_eq!(sm.get_u64("general.synth_seed").unwrap(), 42);
    assert!(sm
        .get_str_array("general.dropped_tensors")
        .unwrap()
        .is_empty());
    assert_eq!(
        sm.get_str_array("general.source_files").unwrap(),
        ["config.json", "preprocessor_config.json"]
    );
    // Every key a conversion writes is there, with the same value except provenance.
    let provenance = [
        "general.name",
        "general.source_files",
        "general.source_sha256",
        "general.dropped_tensors",
        "tokenizer.huggingface.json",
    ];
    for (k, v) in cm.entries.iter() {
        let got = sm.get(k).unwrap_or_else(|| panic!("synth lacks {k}"));
        if !provenance.contains(&k.as_str()) {
            assert_eq!(got, v, "{k}");
        }
    }
    let tok =
        tokenizers::Tokenizer::from_bytes(sm.get_bytes("tokenizer.huggingface.json").unwrap())
            .unwrap();
    assert_eq!(
        tok.encode("a  b", false).unwrap().get_ids(),
        [64, 50286, 65]
    );

    // The documented scales: lecun for input projections, residual outputs scaled by
    // 1/sqrt(2L), embeddings 0.02, LayerNorm gains ~1.
    let q = std_dev(&values(&s, "model.layers.0.self_attn.q_proj.weight"));
    assert!((q - 1.0 / 8.0).abs() < 0.01, "q_proj std {q}");
    let dense = std_dev(&values(&s, "model.layers.0.self_attn.dense.weight"));
    assert!((dense - 1.0 / 8.0 / 2.0).abs() < 0.01, "dense std {dense}");
    let emb = std_dev(&values(&s, "model.embed_tokens.weight"));
    assert!((emb - 0.02).abs() < 0.001, "embed std {emb}");
    let ln = values(&s, "model.final_layernorm.weight");
    let mean = ln.iter().sum::<f32>() / ln.len() as f32;
    assert!((mean - 1.0).abs() < 0.01, "ln mean {mean}");
}

#[test]
fn synth_is_deterministic_per_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |seed: u64, name: &str| {
        let out = tmp.path().join(name);
        let mut opts = SynthOptions::new(tiny_a().join("config.json"), &out, QuantType::Q4_0);
        opts.seed = seed;
        synth(&opts).unwrap();
        std::fs::read(out).unwrap()
    };
    let a = run(7, "a.mqf");
    assert_eq!(a, run(7, "b.mqf"), "same seed, same bytes");
    assert_ne!(a, run(8, "c.mqf"));
}

#[test]
fn synth_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("s.mqf");
    let o = std::process::Command::new(BIN)
        .args(["synth", "--config"])
        .arg(tiny_a().join("config.json"))
        .args([
            "--quant",
            "bf16",
            "--vision-quant",
            "q8_0",
            "--seed",
            "5",
            "-o",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("seed 5"), "{err}");
    // stderr is not a terminal here: no progress-bar control characters.
    assert!(!err.contains('\r') && !err.contains('\u{1b}'), "{err:?}");
    let f = MqfFile::open(&out).unwrap();
    assert_eq!(f.metadata().get_str("general.quant").unwrap(), "bf16");
    assert_eq!(
        f.metadata().get_str("general.vision_quant").unwrap(),
        "q8_0"
    );
    assert_eq!(f.metadata().get_u64("general.synth_seed").unwrap(), 5);
}
