//! By hand only (`--ignored`; needs ~9 GB of disk): a checkpoint in Mipha-3B's real
//! layout and size (905 bf16 tensors, 6.4 GB, two shards, the tower's last layer,
//! post_layernorm and pooling head included) converted by the release binary, with
//! its wall time and peak RSS printed.
//!
//! ```text
//! cargo build --release -p mipha-convert
//! MIPHA_FULL_DIR=/tmp/mipha-full cargo test --release -p mipha-convert \
//!     --test full_size -- --ignored --nocapture
//! ```
//! `MIPHA_FULL_QUANT` (default `q4_0`) picks the output type.

mod common;

use std::path::{Path, PathBuf};
use std::time::Instant;

use common::*;
use mipha_convert::config::ModelConfig;
use mipha_convert::plan::expected_tensors;
use safetensors::{Dtype, View};

const REAL_CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../assets/mipha-3b");

/// The tensors `expected_tensors` leaves out: tower layer 26, post_layernorm, head.
fn dead_tensors(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i) = (cfg.vision.hidden_size, cfg.vision.intermediate_size);
    let p = "model.vision_tower.vision_model";
    let mut v = Vec::new();
    for l in cfg.vision.kept_layers..cfg.vision.num_hidden_layers {
        let b = format!("{p}.encoder.layers.{l}");
        for n in ["layer_norm1", "layer_norm2"] {
            v.push((format!("{b}.{n}.weight"), vec![h]));
            v.push((format!("{b}.{n}.bias"), vec![h]));
        }
        for n in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            v.push((format!("{b}.self_attn.{n}.weight"), vec![h, h]));
            v.push((format!("{b}.self_attn.{n}.bias"), vec![h]));
        }
        v.push((format!("{b}.mlp.fc1.weight"), vec![i, h]));
        v.push((format!("{b}.mlp.fc1.bias"), vec![i]));
        v.push((format!("{b}.mlp.fc2.weight"), vec![h, i]));
        v.push((format!("{b}.mlp.fc2.bias"), vec![h]));
    }
    for n in ["post_layernorm", "head.layernorm"] {
        v.push((format!("{p}.{n}.weight"), vec![h]));
        v.push((format!("{p}.{n}.bias"), vec![h]));
    }
    v.push((format!("{p}.head.probe"), vec![1, 1, h]));
    v.push((format!("{p}.head.attention.in_proj_weight"), vec![3 * h, h]));
    v.push((format!("{p}.head.attention.in_proj_bias"), vec![3 * h]));
    v.push((format!("{p}.head.attention.out_proj.weight"), vec![h, h]));
    v.push((format!("{p}.head.attention.out_proj.bias"), vec![h]));
    v.push((format!("{p}.head.mlp.fc1.weight"), vec![i, h]));
    v.push((format!("{p}.head.mlp.fc1.bias"), vec![i]));
    v.push((format!("{p}.head.mlp.fc2.weight"), vec![h, i]));
    v.push((format!("{p}.head.mlp.fc2.bias"), vec![h]));
    v
}

fn make_checkpoint(dir: &Path) {
    if dir.join("model.safetensors.index.json").is_file() {
        return;
    }
    std::fs::create_dir_all(dir).unwrap();
    copy_side_files(&tiny_a(), dir);
    for f in ["config.json", "preprocessor_config.json"] {
        std::fs::copy(Path::new(REAL_CONFIG).join(f), dir.join(f)).unwrap();
    }
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let mut all: Vec<(String, Vec<usize>)> = expected_tensors(&cfg)
        .into_iter()
        .map(|e| (e.name, e.shape))
        .collect();
    all.extend(dead_tensors(&cfg));
    assert_eq!(all.len(), 905);
    let tensors: Vec<(String, Lazy)> = all
        .into_iter()
        .enumerate()
        .map(|(i, (n, shape))| {
            (
                n,
                Lazy {
                    dtype: Dtype::BF16,
                    scale: 0.08,
                    shape,
                    seed: i as u64,
                },
            )
        })
        .collect();
    // Split like HF does: the first shard up to ~5 GB.
    let mut split = 0;
    let mut acc = 0usize;
    for (i, t) in tensors.iter().enumerate() {
        acc += (&t.1).data_len();
        if acc > 5_000_000_000 {
            split = i;
            break;
        }
    }
    let mut weight_map = serde_json::Map::new();
    for (s, part) in [&tensors[..split], &tensors[split..]]
        .into_iter()
        .enumerate()
    {
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
}

#[allow(clippy::zombie_processes)]
#[test]
#[ignore = "by hand: writes ~9 GB"]
fn full_size_conversion() {
    let dir = PathBuf::from(std::env::var("MIPHA_FULL_DIR").expect("set MIPHA_FULL_DIR"));
    let quant = std::env::var("MIPHA_FULL_QUANT").unwrap_or_else(|_| "q4_0".into());
    let t = Instant::now();
    make_checkpoint(&dir.join("checkpoint"));
    eprintln!("checkpoint ready in {:.1}s", t.elapsed().as_secs_f64());
    let out = dir.join(format!("mipha-3b.{quant}.mqf"));
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/mipha-convert");
    let t = Instant::now();
    let child = std::process::Command::new(&bin)
        .arg(dir.join("checkpoint"))
        .args([
            "-o".as_ref(),
            out.as_os_str(),
            "--quant".as_ref(),
            quant.as_ref(),
        ])
        .spawn()
        .unwrap();
    let mut status = 0;
    // SAFETY: see bounded_memory.rs.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    eprintln!(
        "converted to {quant} in {:.1}s: {} bytes, peak RSS {:.0} MiB",
        t.elapsed().as_secs_f64(),
        std::fs::metadata(&out).unwrap().len(),
        usage.ru_maxrss as f64 / 1024.0
    );
}
