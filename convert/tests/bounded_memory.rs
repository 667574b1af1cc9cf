//! Conversion memory is bounded by about one tensor, not by the model: a ~410 MB f32
//! checkpoint converts in a child process whose peak RSS (from wait4) stays far below.

mod common;

use common::*;
use mipha_convert::config::ModelConfig;
use mipha_convert::plan::expected_tensors;
use safetensors::{Dtype, View};

/// Runs the binary and returns its peak resident set in bytes.
// The child is reaped by wait4, which std's lint cannot see.
#[allow(clippy::zombie_processes)]
fn child_peak_rss(args: &[&std::ffi::OsStr]) -> u64 {
    let child = std::process::Command::new(BIN).args(args).spawn().unwrap();
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value, and wait4 on our own child's pid
    // with valid pointers is the documented use.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as libc::pid_t);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "status {status}"
    );
    // Linux reports ru_maxrss in KiB.
    usage.ru_maxrss as u64 * 1024
}

#[test]
fn peak_rss_is_about_one_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    copy_side_files(&tiny_a(), &dir);
    let cfg_path = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    v["hidden_size"] = 512.into();
    v["intermediate_size"] = 2048.into();
    v["num_hidden_layers"] = 16.into();
    v["num_attention_heads"] = 8.into();
    v["num_key_value_heads"] = 8.into();
    v["vision_config"]["mm_projector"]["hidden_size"] = 512.into();
    std::fs::write(&cfg_path, v.to_string()).unwrap();
    let cfg = ModelConfig::from_file(&cfg_path).unwrap();

    let tensors: Vec<(String, Lazy)> = expected_tensors(&cfg)
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            (
                e.name,
                Lazy {
                    dtype: Dtype::F32,
                    scale: 0.1,
                    shape: e.shape,
                    seed: i as u64,
                },
            )
        })
        .collect();
    let source: u64 = tensors.iter().map(|t| (&t.1).data_len() as u64).sum();
    let largest: u64 = tensors
        .iter()
        .map(|t| (&t.1).data_len() as u64)
        .max()
        .unwrap();
    // Two shards, so both the index path and per-shard parallel hashing run.
    let half = tensors.len() / 2;
    let mut weight_map = serde_json::Map::new();
    for (s, part) in [&tensors[..half], &tensors[half..]].into_iter().enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", s + 1);
        for t in part {
            weight_map.insert(t.0.clone(), file.clone().into());
        }
        let views = part.iter().map(|(n, l)| (n.clone(), l));
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
    }
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::json!({ "metadata": {}, "weight_map": weight_map }).to_string(),
    )
    .unwrap();
    assert!(source > 390 << 20, "checkpoint of {source} bytes");

    let out = tmp.path().join("big.mqf");
    let peak = child_peak_rss(&[
        dir.as_os_str(),
        "-o".as_ref(),
        out.as_os_str(),
        "--quant".as_ref(),
        "q8_0".as_ref(),
        "--quiet".as_ref(),
    ]);
    let out_size = std::fs::metadata(&out).unwrap().len();
    let mib = |x: u64| x as f64 / (1 << 20) as f64;
    eprintln!(
        "source {:.0} MiB (largest tensor {:.0} MiB f32), output {:.0} MiB, peak RSS {:.0} MiB",
        mib(source),
        mib(largest),
        mib(out_size),
        mib(peak)
    );
    // The largest stored tensor (embed_tokens at q8_0) is ~28 MiB and the read buffer
    // 16 MiB; the rest is the program and the tokenizer, independent of model size.
    assert!(peak < 160 << 20, "peak RSS {:.0} MiB", mib(peak));
    assert!(peak < source / 2, "peak RSS {:.0} MiB", mib(peak));
    let f = mipha_runtime::MqfFile::open(&out).unwrap();
    f.verify().unwrap();
}
