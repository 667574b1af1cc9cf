//! Timings for `cpu::attention` and `cpu::attention_batch` at the model's shapes,
//! f32 and f16 KV. Ignored by default; run with
//! `cargo test --release -p mipha-kernels --test attention_timing -- --ignored --nocapture`
//! (add `MIPHA_CPU=portable` for the portable build).

mod common;

use std::time::Instant;

use common::Rng;
use half::f16;
use mipha_kernels::{cpu, AttnSeq, KvDtype, KvElem, KvLayer, KvView};

#[derive(Clone)]
struct Shape {
    name: String,
    n_tokens: usize,
    first_pos: usize,
    causal: bool,
    n_heads: usize,
    head_dim: usize,
    block_size: usize,
    /// sequences of `n_tokens` rows each at `first_pos`, each with its own blocks
    seqs: usize,
    /// with `seqs > 1`: one `cpu::attention` call per sequence instead of one
    /// `cpu::attention_batch` call
    separate: bool,
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
fn time<E: KvElem>(s: &Shape) -> (f64, f64) {
    let mut rng = Rng::new(5);
    let total = s.first_pos + s.n_tokens;
    let kv_dim = s.n_heads * s.head_dim;
    let per_seq = total.div_ceil(s.block_size);
    let n_blocks = per_seq * s.seqs;
    let mut blocks: Vec<u32> = (0..n_blocks as u32).collect();
    rng.shuffle(&mut blocks);
    let widen = |x: Vec<f32>| x.into_iter().map(E::from_f32).collect::<Vec<E>>();
    let k = widen(rng.vec_normal(n_blocks * s.block_size * kv_dim, 1.0));
    let v = widen(rng.vec_normal(n_blocks * s.block_size * kv_dim, 1.0));
    let q = rng.vec_normal(s.seqs * s.n_tokens * kv_dim, 1.0);
    let mut out = vec![0.0f32; q.len()];
    let layer = KvLayer {
        k: &k,
        v: &v,
        block_size: s.block_size,
        kv_dim,
    };
    let seqs: Vec<AttnSeq> = blocks
        .chunks_exact(per_seq)
        .map(|table| AttnSeq {
            rows: s.n_tokens,
            first_pos: s.first_pos,
            block_table: table,
        })
        .collect();
    let scale = 1.0 / (s.head_dim as f32).sqrt();
    let width = s.n_tokens * kv_dim;
    let mut run = || {
        if s.seqs == 1 || s.separate {
            for (seq, (q, out)) in seqs
                .iter()
                .zip(q.chunks_exact(width).zip(out.chunks_exact_mut(width)))
            {
                let kv: KvView<E> = layer.view(seq.block_table);
                cpu::attention(
                    q,
                    s.n_tokens,
                    s.n_heads,
                    s.n_heads,
                    s.head_dim,
                    &kv,
                    s.first_pos,
                    s.causal,
                    scale,
                    out,
                )
            }
        } else {
            cpu::attention_batch(
                &q, s.n_heads, s.n_heads, s.head_dim, &layer, &seqs, s.causal, scale, &mut out,
            )
        }
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

/// Phi-2 decode: 32 heads of 80, block size 16, `seqs` sequences of one row
/// after `context - 1` cached positions.
fn phi_decode(context: usize, seqs: usize, separate: bool) -> Shape {
    let how = match (seqs, separate) {
        (1, _) => String::new(),
        (_, false) => format!(" x{seqs} batch"),
        (_, true) => format!(" x{seqs} separate"),
    };
    Shape {
        name: format!("phi decode 32x80, {context} context{how}"),
        n_tokens: 1,
        first_pos: context - 1,
        causal: true,
        n_heads: 32,
        head_dim: 80,
        block_size: 16,
        seqs,
        separate,
    }
}

#[test]
#[ignore]
fn attention_timings() {
    let mut shapes = vec![
        Shape {
            name: "siglip 16x72, 729 tokens, no mask".into(),
            n_tokens: 729,
            first_pos: 0,
            causal: false,
            n_heads: 16,
            head_dim: 72,
            block_size: 729,
            seqs: 1,
            separate: false,
        },
        Shape {
            name: "phi prefill 32x80, 512 tokens causal".into(),
            n_tokens: 512,
            first_pos: 0,
            causal: true,
            n_heads: 32,
            head_dim: 80,
            block_size: 16,
            seqs: 1,
            separate: false,
        },
        Shape {
            name: "phi decode 32x80, 1024 context".into(),
            n_tokens: 1,
            first_pos: 1023,
            causal: true,
            n_heads: 32,
            head_dim: 80,
            block_size: 16,
            seqs: 1,
            separate: false,
        },
        Shape {
            name: "phi decode 32x80, 4096 context".into(),
            n_tokens: 1,
            first_pos: 4095,
            causal: true,
            n_heads: 32,
            head_dim: 80,
            block_size: 16,
            seqs: 1,
            separate: false,
        },
        Shape {
            name: "phi 2 rows 32x80, 1024 context".into(),
            n_tokens: 2,
            first_pos: 1022,
            causal: true,
            n_heads: 32,
            head_dim: 80,
            block_size: 16,
            seqs: 1,
            separate: false,
        },
        Shape {
            name: "phi 4 rows 32x80, 1024 context".into(),
            n_tokens: 4,
            first_pos: 1020,
            causal: true,
            n_heads: 32,
            head_dim: 80,
            block_size: 16,
            seqs: 1,
            separate: false,
        },
        Shape {
            name: "phi 8 rows 32x80, 1024 context".into(),
            n_tokens: 8,
            first_pos: 1016,
            causal: true,
            n_heads: 32,
            head_dim: 80,
            block_size: 16,
            seqs: 1,
            separate: false,
        },
        Shape {
            name: "phi 16 rows 32x80, 1024 context".into(),
            n_tokens: 16,
            first_pos: 1008,
            causal: true,
            n_heads: 32,
            head_dim: 80,
            block_size: 16,
            seqs: 1,
            separate: false,
        },
    ];
    shapes.extend([
        phi_decode(48, 1, false),
        phi_decode(48, 8, false),
        phi_decode(1024, 8, false),
        phi_decode(1024, 8, true),
        phi_decode(1024, 16, false),
        phi_decode(4096, 8, false),
    ]);

    eprintln!(
        "level {} threads {}",
        mipha_kernels::cpu::dispatch::level().name(),
        rayon::current_num_threads()
    );
    // ATTENTION_TIMING=<substring> times only the shapes whose name has it.
    let only = std::env::var("ATTENTION_TIMING").unwrap_or_default();
    // ATTENTION_KV=f32|f16 times only that KV type.
    let kv = std::env::var("ATTENTION_KV").unwrap_or_default();
    for s in shapes.iter().filter(|s| s.name.contains(&only)) {
        for dtype in [KvDtype::F32, KvDtype::F16] {
            if !kv.is_empty() && kv != dtype.name() {
                continue;
            }
            let (wall, cpu) = match dtype {
                KvDtype::F32 => time::<f32>(s),
                KvDtype::F16 => time::<f16>(s),
            };
            eprintln!(
                "{:48} {} {:9.3} ms  (cpu {:9.3} ms)",
                s.name,
                dtype.name(),
                wall * 1e3,
                cpu * 1e3
            );
        }
    }
}
