//! Attention over a paged KV cache.
//!
//! reference::attention is checked against a naive contiguous implementation
//! written here (f64 throughout; |err| <= 1e-6 abs + 1e-6 rel), then cpu::attention
//! against the reference (|err| <= 1e-5 abs + 1e-5 rel: f32 scores, exp and sums on
//! outputs of order 1). The pool's unused rows hold NaN, so reading any slot outside
//! the sequence's blocks poisons the result, and every output buffer starts as NaN,
//! so an element the kernel fails to write shows up too.
//!
//! `cpu::attention` runs at the CPU's best dispatch level; the `every_level` test
//! reruns the cpu tests in child processes with `MIPHA_CPU` set to each lower level
//! this machine has, so one `cargo test` covers every kernel build.

mod common;

use common::{assert_close, Rng};
use mipha_kernels::{cpu, reference, KvView};

#[derive(Clone, Copy, Debug)]
struct Case {
    n_tokens: usize,
    first_pos: usize,
    causal: bool,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    block_size: usize,
}

const fn case(
    n_tokens: usize,
    first_pos: usize,
    causal: bool,
    heads: (usize, usize),
    head_dim: usize,
    block_size: usize,
) -> Case {
    Case {
        n_tokens,
        first_pos,
        causal,
        n_heads: heads.0,
        n_kv_heads: heads.1,
        head_dim,
        block_size,
    }
}

const CASES: [Case; 10] = [
    // Phi-2 shapes: prefill, then decode after prefill, then a prefill chunk.
    case(37, 0, true, (4, 4), 80, 16),
    case(1, 50, true, (4, 4), 80, 16),
    case(9, 23, true, (4, 4), 80, 16),
    // Grouped-query attention, block sizes that do not divide the length.
    case(1, 40, true, (6, 2), 80, 16),
    case(13, 20, true, (8, 2), 80, 5),
    // SigLIP: non-causal over the whole image, head_dim 72.
    case(29, 0, false, (3, 3), 72, 7),
    case(5, 10, false, (4, 1), 72, 16),
    // Tiny test models: head_dim 16; and a head_dim that is not a multiple of 8.
    case(20, 0, true, (2, 1), 16, 16),
    case(6, 3, true, (2, 2), 20, 3),
    // Enough (row, head) tasks to spread over threads.
    case(64, 0, true, (8, 8), 80, 16),
];

/// Contiguous K/V `[total, kv_dim]` and q for one case.
struct Data {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

fn data(c: &Case, rng: &mut Rng) -> Data {
    let total = c.first_pos + c.n_tokens;
    let kv_dim = c.n_kv_heads * c.head_dim;
    Data {
        // A larger q spread gives peaky softmaxes as well as flat ones.
        q: rng.vec_normal(c.n_tokens * c.n_heads * c.head_dim, 2.0),
        k: rng.vec_normal(total * kv_dim, 1.0),
        v: rng.vec_normal(total * kv_dim, 1.0),
    }
}

/// Scatters contiguous K/V into NaN-filled pools through a shuffled block table
/// with two spare blocks.
fn paged(c: &Case, d: &Data, rng: &mut Rng) -> (Vec<f32>, Vec<f32>, Vec<u32>) {
    let total = c.first_pos + c.n_tokens;
    let kv_dim = c.n_kv_heads * c.head_dim;
    let used = total.div_ceil(c.block_size);
    let n_blocks = used + 2;
    let mut ids: Vec<u32> = (0..n_blocks as u32).collect();
    rng.shuffle(&mut ids);
    let table = ids[..used].to_vec();
    let mut kp = vec![f32::NAN; n_blocks * c.block_size * kv_dim];
    let mut vp = kp.clone();
    for p in 0..total {
        let slot = table[p / c.block_size] as usize * c.block_size + p % c.block_size;
        kp[slot * kv_dim..(slot + 1) * kv_dim].copy_from_slice(&d.k[p * kv_dim..(p + 1) * kv_dim]);
        vp[slot * kv_dim..(slot + 1) * kv_dim].copy_from_slice(&d.v[p * kv_dim..(p + 1) * kv_dim]);
    }
    (kp, vp, table)
}

/// Textbook attention on contiguous K/V, f64 throughout.
fn naive(c: &Case, d: &Data, scale: f32) -> Vec<f32> {
    let (hd, kv_dim) = (c.head_dim, c.n_kv_heads * c.head_dim);
    let qd = c.n_heads * hd;
    let total = c.first_pos + c.n_tokens;
    let mut out = vec![0.0f32; c.n_tokens * qd];
    for i in 0..c.n_tokens {
        let keys = if c.causal { c.first_pos + i + 1 } else { total };
        for h in 0..c.n_heads {
            let kh = h / (c.n_heads / c.n_kv_heads);
            let q = &d.q[i * qd + h * hd..i * qd + (h + 1) * hd];
            let s: Vec<f64> = (0..keys)
                .map(|t| {
                    let k = &d.k[t * kv_dim + kh * hd..t * kv_dim + (kh + 1) * hd];
                    q.iter()
                        .zip(k)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|v| (v - max).exp()).collect();
            let z: f64 = e.iter().sum();
            for dd in 0..hd {
                let acc: f64 = (0..keys)
                    .map(|t| e[t] / z * d.v[t * kv_dim + kh * hd + dd] as f64)
                    .sum();
                out[i * qd + h * hd + dd] = acc as f32;
            }
        }
    }
    out
}

/// `reference::attention` or `cpu::attention`.
type AttentionFn = fn(&[f32], usize, usize, usize, usize, &KvView, usize, bool, f32, &mut [f32]);

fn run(c: &Case, d: &Data, kv: &KvView, scale: f32, f: AttentionFn) -> Vec<f32> {
    let mut out = vec![f32::NAN; d.q.len()];
    f(
        &d.q,
        c.n_tokens,
        c.n_heads,
        c.n_kv_heads,
        c.head_dim,
        kv,
        c.first_pos,
        c.causal,
        scale,
        &mut out,
    );
    out
}

#[test]
fn reference_and_cpu_match_naive_contiguous() {
    let mut rng = Rng::new(71);
    for c in &CASES {
        let d = data(c, &mut rng);
        let (kp, vp, table) = paged(c, &d, &mut rng);
        let kv = KvView {
            k: &kp,
            v: &vp,
            block_size: c.block_size,
            block_table: &table,
            kv_dim: c.n_kv_heads * c.head_dim,
        };
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        let want = naive(c, &d, scale);
        let r = run(c, &d, &kv, scale, reference::attention);
        assert_close(&format!("reference {c:?}"), &r, &want, 1e-6, 1e-6);
        let got = run(c, &d, &kv, scale, cpu::attention);
        assert_close(&format!("cpu {c:?}"), &got, &r, 1e-5, 1e-5);
    }
}

/// Decoding token by token after a prefill gives the same rows as one causal
/// prefill over the whole sequence.
#[test]
fn incremental_decode_matches_full_prefill() {
    let mut rng = Rng::new(72);
    let full = case(24, 0, true, (4, 2), 80, 16);
    let d = data(&full, &mut rng);
    let (kp, vp, table) = paged(&full, &d, &mut rng);
    let kv = KvView {
        k: &kp,
        v: &vp,
        block_size: 16,
        block_table: &table,
        kv_dim: 2 * 80,
    };
    let scale = 1.0 / (80f32).sqrt();
    let all = run(&full, &d, &kv, scale, cpu::attention);
    let qd = 4 * 80;
    for p in [0usize, 15, 16, 23] {
        let step = case(1, p, true, (4, 2), 80, 16);
        let one = Data {
            q: d.q[p * qd..(p + 1) * qd].to_vec(),
            k: vec![],
            v: vec![],
        };
        let got = run(&step, &one, &kv, scale, cpu::attention);
        assert_close(
            &format!("decode at {p}"),
            &got,
            &all[p * qd..(p + 1) * qd],
            1e-6,
            1e-6,
        );
    }
}

/// Shapes aimed at the CPU kernel's paths: query tiles (8, 16 or 32 rows) that do
/// not divide the tokens, key tiles (48 positions) across block edges, the causal
/// diagonal inside a tile, head_dims with SIMD tails, the rows path (fewer than 4
/// query rows; online softmax over chunks of 256 keys) and its split over the
/// keys for long contexts with few heads.
const CPU_CASES: [Case; 15] = [
    // SigLIP: 729 tokens in one block of 729 (as the vision tower passes them),
    // head_dim 72, no mask; fewer heads than the model's 16 to keep the f64
    // reference quick.
    case(729, 0, false, (2, 2), 72, 729),
    // Phi-2: a causal prefill chunk after a cached prefix, block size 16.
    case(70, 45, true, (4, 4), 80, 16),
    case(100, 0, true, (3, 3), 80, 16),
    // Odd head_dim (no full SIMD vector at all, then a tail), GQA, odd block sizes.
    case(37, 0, true, (4, 2), 13, 5),
    case(45, 11, false, (6, 3), 13, 7),
    case(33, 2, true, (2, 1), 3, 4),
    case(17, 30, true, (4, 1), 20, 16),
    case(41, 0, true, (8, 2), 80, 48),
    // The rows path: decode and two or three rows, with GQA and a tail.
    case(1, 200, true, (4, 2), 13, 16),
    case(3, 60, false, (2, 2), 80, 9),
    case(2, 99, true, (8, 8), 80, 16),
    case(1, 600, true, (8, 4), 80, 16),
    // Long contexts with few (row, head) tasks: split over the keys.
    case(1, 1150, true, (2, 1), 80, 16),
    case(2, 1300, true, (1, 1), 72, 32),
    case(1, 1100, false, (3, 3), 13, 16),
];

#[test]
fn cpu_matches_reference_at_kernel_shapes() {
    let mut rng = Rng::new(73);
    for c in &CPU_CASES {
        let d = data(c, &mut rng);
        let (kp, vp, table) = paged(c, &d, &mut rng);
        let kv = KvView {
            k: &kp,
            v: &vp,
            block_size: c.block_size,
            block_table: &table,
            kv_dim: c.n_kv_heads * c.head_dim,
        };
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        let want = run(c, &d, &kv, scale, reference::attention);
        // Twice, so the second call runs on the scratch the first one left.
        for pass in 0..2 {
            let got = run(c, &d, &kv, scale, cpu::attention);
            assert_close(&format!("cpu {c:?} pass {pass}"), &got, &want, 1e-5, 1e-5);
        }
    }
}

/// Large and very negative scores: rows whose softmax is one-hot, and scores far
/// enough below the row max that their exponentials underflow.
#[test]
fn cpu_matches_reference_for_peaky_scores() {
    let mut rng = Rng::new(74);
    for c in [
        case(40, 0, true, (2, 2), 80, 16),
        case(3, 700, true, (8, 8), 80, 16),
        case(1, 1200, true, (1, 1), 80, 16),
    ] {
        let mut d = data(&c, &mut rng);
        d.q.iter_mut().for_each(|x| *x *= 20.0);
        let (kp, vp, table) = paged(&c, &d, &mut rng);
        let kv = KvView {
            k: &kp,
            v: &vp,
            block_size: c.block_size,
            block_table: &table,
            kv_dim: c.n_kv_heads * c.head_dim,
        };
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        let want = run(&c, &d, &kv, scale, reference::attention);
        let got = run(&c, &d, &kv, scale, cpu::attention);
        // Scores of order 100: an f32 score differs from the f64-dot reference by
        // about 1e-5 absolute, which moves the near-one-hot weights by as much.
        assert_close(&format!("cpu {c:?}"), &got, &want, 1e-4, 1e-4);
    }
}

/// Reruns the cpu tests at every dispatch level below the CPU's best (the parent
/// run covers the best), each in a child process with `MIPHA_CPU` set.
#[test]
fn every_level() {
    use mipha_kernels::cpu::dispatch::{available, level};
    if std::env::var_os("MIPHA_CPU").is_some() {
        return; // a child, or a run pinned to one level on purpose
    }
    let exe = std::env::current_exe().unwrap();
    for l in available().into_iter().filter(|&l| l < level()) {
        for test in [
            "reference_and_cpu_match_naive_contiguous",
            "incremental_decode_matches_full_prefill",
            "cpu_matches_reference_at_kernel_shapes",
            "cpu_matches_reference_for_peaky_scores",
        ] {
            let out = std::process::Command::new(&exe)
                .args(["--exact", test, "--test-threads", "1"])
                .env("MIPHA_CPU", l.name())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{test} at MIPHA_CPU={}:\n{}{}",
                l.name(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(stdout.contains("1 passed"), "{test} did not run:\n{stdout}");
        }
    }
}
