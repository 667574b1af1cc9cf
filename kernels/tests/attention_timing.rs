//! Timings for `cpu::attention` at the model's shapes. Ignored by default; run with
//! `cargo test --release -p mipha-kernels --test attention_timing -- --ignored --nocapture`
//! (add `MIPHA_CPU=portable` for the portable build).

mod common;

use std::time::Instant;

use common::Rng;
use mipha_kernels::{cpu, KvView};

struct Shape {
    name: &'static str,
    n_tokens: usize,
    first_pos: usize,
    causal: bool,
    n_heads: usize,
    head_dim: usize,
    block_size: usize,
}

/// CPU time of every thread of this process so far, in seconds (Linux schedstat;
/// 0 elsewhere): unlike wall time, not inflated by other work on the machine.
fn cpu_seconds() -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .sum::<f64>()
        * 1e-9
}

/// (fastest wall time, mean CPU time) per call, in seconds.
fn time(s: &Shape) -> (f64, f64) {
    let mut rng = Rng::new(5);
    let total = s.first_pos + s.n_tokens;
    let kv_dim = s.n_heads * s.head_dim;
    let n_blocks = total.div_ceil(s.block_size);
    let mut table: Vec<u32> = (0..n_blocks as u32).collect();
    rng.shuffle(&mut table);
    let k = rng.vec_normal(n_blocks * s.block_size * kv_dim, 1.0);
    let v = rng.vec_normal(n_blocks * s.block_size * kv_dim, 1.0);
    let q = rng.vec_normal(s.n_tokens * kv_dim, 1.0);
    let mut out = vec![0.0f32; q.len()];
    let kv = KvView {
        k: &k,
        v: &v,
        block_size: s.block_size,
        block_table: &table,
        kv_dim,
    };
    let scale = 1.0 / (s.head_dim as f32).sqrt();
    let mut run = || {
        cpu::attention(
            &q,
            s.n_tokens,
            s.n_heads,
            s.n_heads,
            s.head_dim,
            &kv,
            s.first_pos,
            s.causal,
            scale,
            &mut out,
        )
    };
    // Warm up, then the fastest of enough runs to fill about a second (the minimum:
    // other work on the machine only ever adds time).
    let t = Instant::now();
    run();
    run();
    let once = t.elapsed().as_secs_f64() / 2.0;
    let reps = ((1.0 / once) as usize).clamp(5, 500);
    let cpu0 = cpu_seconds();
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            run();
            t.elapsed().as_secs_f64()
        })
        .collect();
    let cpu = (cpu_seconds() - cpu0) / reps as f64;
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (times[0], cpu)
}

#[test]
#[ignore]
fn attention_timings() {
    let shapes = [
        Shape {
            name: "siglip 16x72, 729 tokens, no mask",
            n_tokens: 729,
            first_pos: 0,
            causal: false,
            n_heads: 16,
            head_dim: 72,
            block_size: 729,
        },
        Shape {
            name: "phi prefill 32x80, 512 tokens causal",
            n_tokens: 512,
            first_pos: 0,
            causal: true,
            n_heads: 32,
            head_dim: 80,
            block_size: 16,
        },
        Shape {
            name: "phi decode 32x80, 1024 context",
            n_tokens: 1,
            first_pos: 1023,
            causal: true,
            n_heads: 32,
            head_dim: 80,
            block_size: 16,
        },
        Shape {
            name: "phi decode 32x80, 4096 context",
            n_tokens: 1,
            first_pos: 4095,
            causal: true,
            n_heads: 32,
            head_dim: 80,
            block_size: 16,
        },
        Shape {
            name: "phi 2 rows 32x80, 1024 context",
            n_tokens: 2,
            first_pos: 1022,
            causal: true,
            n_heads: 32,
            head_dim: 80,
            block_size: 16,
        },
        Shape {
            name: "phi 4 rows 32x80, 1024 context",
            n_tokens: 4,
            first_pos: 1020,
            causal: true,
            n_heads: 32,
            head_dim: 80,
            block_size: 16,
        },
        Shape {
            name: "phi 8 rows 32x80, 1024 context",
            n_tokens: 8,
            first_pos: 1016,
            causal: true,
            n_heads: 32,
            head_dim: 80,
            block_size: 16,
        },
        Shape {
            name: "phi 16 rows 32x80, 1024 context",
            n_tokens: 16,
            first_pos: 1008,
            causal: true,
            n_heads: 32,
            head_dim: 80,
            block_size: 16,
        },
    ];
    eprintln!(
        "level {} threads {}",
        mipha_kernels::cpu::dispatch::level().name(),
        rayon::current_num_threads()
    );
    // ATTENTION_TIMING=<substring> times only the shapes whose name has it.
    let only = std::env::var("ATTENTION_TIMING").unwrap_or_default();
    for s in shapes.iter().filter(|s| s.name.contains(&only)) {
        let (wall, cpu) = time(s);
        eprintln!(
            "{:40} {:9.3} ms  (cpu {:9.3} ms)",
            s.name,
            wall * 1e3,
            cpu * 1e3
        );
    }
}
