//! Attention over a paged KV cache.
//!
//! reference::attention is checked against a naive contiguous implementation
//! written here (f64 throughout; |err| <= 1e-6 abs + 1e-6 rel), then cpu::attention
//! against the reference (|err| <= 1e-5 abs + 1e-5 rel: f32 scores, exp and sums on
//! outputs of order 1). The pool's unused rows hold NaN, so reading any slot outside
//! the sequence's blocks poisons the result.

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
