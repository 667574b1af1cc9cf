//! Attention over a paged KV cache.
//!
//! reference::attention is checked against a naive contiguous implementation
//! written here (f64 throughout; |err| <= 1e-6 abs + 1e-6 rel), then cpu::attention
//! against the reference (|err| <= 1e-5 abs + 1e-5 rel: f32 scores, exp and sums on
//! outputs of order 1). The pool's unused rows hold NaN, so reading any slot outside
//! the sequence's blocks poisons the result, and every output buffer starts as NaN,
//! so an element the kernel fails to write shows up too.
//!
//! f16 KV pools are checked against the reference reading the same f16 values,
//! and `cpu::attention_batch` against one `cpu::attention` call per sequence.
//!
//! `cpu::attention` runs at the CPU's best dispatch level; the `every_level` test
//! reruns the cpu tests in child processes with `MIPHA_CPU` set to each lower level
//! this machine has, so one `cargo test` covers every kernel build.

mod common;

use common::{assert_close, Rng};
use half::f16;
use mipha_kernels::cpu::dispatch::{level, Level};
use mipha_kernels::{cpu, reference, AttnSeq, KvElem, KvLayer, KvView};

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

/// Scatters contiguous K/V into NaN-filled pools of `E` through a shuffled block
/// table with two spare blocks.
fn paged<E: KvElem>(c: &Case, d: &Data, rng: &mut Rng) -> (Vec<E>, Vec<E>, Vec<u32>) {
    let total = c.first_pos + c.n_tokens;
    let kv_dim = c.n_kv_heads * c.head_dim;
    let used = total.div_ceil(c.block_size);
    let n_blocks = used + 2;
    let mut ids: Vec<u32> = (0..n_blocks as u32).collect();
    rng.shuffle(&mut ids);
    let table = ids[..used].to_vec();
    let mut kp = vec![E::from_f32(f32::NAN); n_blocks * c.block_size * kv_dim];
    let mut vp = kp.clone();
    for p in 0..total {
        let slot = table[p / c.block_size] as usize * c.block_size + p % c.block_size;
        let (dst, src) = (
            slot * kv_dim..(slot + 1) * kv_dim,
            p * kv_dim..(p + 1) * kv_dim,
        );
        for (x, &y) in kp[dst.clone()].iter_mut().zip(&d.k[src.clone()]) {
            *x = E::from_f32(y);
        }
        for (x, &y) in vp[dst].iter_mut().zip(&d.v[src]) {
            *x = E::from_f32(y);
        }
    }
    (kp, vp, table)
}

/// A pool's values widened to f32 (what the kernels compute with).
fn widened<E: KvElem>(pool: &[E]) -> Vec<f32> {
    pool.iter().map(|x| x.to_f32()).collect()
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
type AttentionFn<E> =
    fn(&[f32], usize, usize, usize, usize, &KvView<E>, usize, bool, f32, &mut [f32]);

fn run<E: KvElem>(c: &Case, d: &Data, kv: &KvView<E>, scale: f32, f: AttentionFn<E>) -> Vec<f32> {
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
        let (kp, vp, table) = paged::<f32>(c, &d, &mut rng);
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
    let (kp, vp, table) = paged::<f32>(&full, &d, &mut rng);
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
        let (kp, vp, table) = paged::<f32>(c, &d, &mut rng);
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
        let (kp, vp, table) = paged::<f32>(&c, &d, &mut rng);
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

        let (kp, vp, table) = paged::<f16>(&c, &d, &mut rng);
        let kv = KvView {
            k: &kp,
            v: &vp,
            block_size: c.block_size,
            block_table: &table,
            kv_dim: c.n_kv_heads * c.head_dim,
        };
        let want = run(&c, &d, &kv, scale, reference::attention);
        let got = run(&c, &d, &kv, scale, cpu::attention);
        assert_close(&format!("cpu f16 {c:?}"), &got, &want, 1e-4, 1e-4);
    }
}

/// Shapes for f16 pools on top of the f32 ones: block sizes 1, 4 and 16, SigLIP's
/// head_dim 72, Phi-2's 80 and odd ones (SIMD tails in the widening of a key
/// tile and in the rows path), GQA, and long contexts split over the keys.
const F16_CASES: [Case; 12] = [
    case(50, 10, true, (4, 2), 72, 1),
    case(3, 40, true, (4, 2), 37, 1),
    case(1, 1030, true, (1, 1), 37, 1),
    case(20, 7, false, (2, 2), 80, 4),
    case(2, 1100, false, (1, 1), 72, 4),
    case(9, 0, true, (6, 3), 80, 4),
    case(100, 0, false, (2, 2), 72, 16),
    case(1, 1500, true, (2, 1), 80, 16),
    case(1, 77, true, (32, 32), 80, 16),
    case(17, 30, true, (4, 1), 23, 16),
    case(1, 300, false, (4, 4), 23, 16),
    case(64, 64, true, (2, 2), 80, 16),
];

/// f16 pools: cpu::attention against the reference reading the same f16 values,
/// and against cpu::attention on those values widened into f32 pools, which is
/// what the f16 kernels compute with: bit-identical where both run the same
/// micro-kernels (the tiled path, 4 rows and more, converts each key tile to f32
/// and runs the f32 kernels; the rows path differs only on AVX-512, where f16
/// rows take 512-bit vectors and f32 rows AVX2's).
#[test]
fn f16_kv_matches_reference() {
    let mut rng = Rng::new(75);
    for c in CASES.iter().chain(&CPU_CASES).chain(&F16_CASES) {
        let d = data(c, &mut rng);
        let (kp, vp, table) = paged::<f16>(c, &d, &mut rng);
        let kv = KvView {
            k: &kp,
            v: &vp,
            block_size: c.block_size,
            block_table: &table,
            kv_dim: c.n_kv_heads * c.head_dim,
        };
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        let want = run(c, &d, &kv, scale, reference::attention);
        let mut got = vec![];
        for pass in 0..2 {
            got = run(c, &d, &kv, scale, cpu::attention);
            assert_close(&format!("f16 {c:?} pass {pass}"), &got, &want, 1e-5, 1e-5);
        }

        let (kw, vw) = (widened(&kp), widened(&vp));
        let kv32 = KvView {
            k: &kw,
            v: &vw,
            block_size: c.block_size,
            block_table: &table,
            kv_dim: c.n_kv_heads * c.head_dim,
        };
        let got32 = run(c, &d, &kv32, scale, cpu::attention);
        let what = format!("f16 {c:?} vs f32 pools of the same values");
        if c.n_tokens >= 4 || level() < Level::Avx512 {
            assert_eq!(bits(&got), bits(&got32), "{what}");
        } else {
            assert_close(&what, &got, &got32, 1e-5, 1e-5);
        }
    }
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Sequences of a batched call over one shared pool.
struct BatchCase {
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    /// (rows, first_pos) per sequence
    seqs: &'static [(usize, usize)],
    /// (sequence, donor, blocks): the sequence's table starts with the donor's
    /// first `blocks` blocks (a shared prefix)
    share: Option<(usize, usize, usize)>,
}

/// A batch's pools (NaN outside the sequences' positions), block tables and q.
struct BatchData<E> {
    k: Vec<E>,
    v: Vec<E>,
    tables: Vec<Vec<u32>>,
    q: Vec<f32>,
}

fn batch_data<E: KvElem>(b: &BatchCase, rng: &mut Rng) -> BatchData<E> {
    let bs = b.block_size;
    let kv_dim = b.n_kv_heads * b.head_dim;
    let used: Vec<usize> = b.seqs.iter().map(|&(r, p)| (r + p).div_ceil(bs)).collect();
    let n_blocks = used.iter().sum::<usize>() + 2;
    let mut ids: Vec<u32> = (0..n_blocks as u32).collect();
    rng.shuffle(&mut ids);
    let mut next = ids.into_iter();
    let mut tables: Vec<Vec<u32>> = used
        .iter()
        .map(|&n| next.by_ref().take(n).collect())
        .collect();
    if let Some((s, donor, n)) = b.share {
        let prefix = tables[donor][..n].to_vec();
        tables[s][..n].copy_from_slice(&prefix);
    }
    let mut k = vec![E::from_f32(f32::NAN); n_blocks * bs * kv_dim];
    let mut v = k.clone();
    for (t, &(rows, first)) in tables.iter().zip(b.seqs) {
        for p in 0..rows + first {
            let slot = t[p / bs] as usize * bs + p % bs;
            for x in &mut k[slot * kv_dim..(slot + 1) * kv_dim] {
                *x = E::from_f32(rng.normal());
            }
            for x in &mut v[slot * kv_dim..(slot + 1) * kv_dim] {
                *x = E::from_f32(rng.normal());
            }
        }
    }
    let rows: usize = b.seqs.iter().map(|s| s.0).sum();
    BatchData {
        k,
        v,
        tables,
        q: rng.vec_normal(rows * b.n_heads * b.head_dim, 2.0),
    }
}

/// `attention_batch` (cpu or reference) and one `attention` call (cpu or
/// reference) per sequence, each into a NaN-filled output.
fn batch_and_per_sequence<E: KvElem>(
    b: &BatchCase,
    d: &BatchData<E>,
    causal: bool,
    cpu: bool,
) -> (Vec<f32>, Vec<f32>) {
    let layer = KvLayer {
        k: &d.k,
        v: &d.v,
        block_size: b.block_size,
        kv_dim: b.n_kv_heads * b.head_dim,
    };
    let seqs: Vec<AttnSeq> = b
        .seqs
        .iter()
        .zip(&d.tables)
        .map(|(&(rows, first_pos), t)| AttnSeq {
            rows,
            first_pos,
            block_table: t,
        })
        .collect();
    let scale = 1.0 / (b.head_dim as f32).sqrt();
    let (nh, nkv, hd) = (b.n_heads, b.n_kv_heads, b.head_dim);
    let mut all = vec![f32::NAN; d.q.len()];
    let batch = if cpu {
        cpu::attention_batch::<E>
    } else {
        reference::attention_batch::<E>
    };
    batch(&d.q, nh, nkv, hd, &layer, &seqs, causal, scale, &mut all);
    let one: AttentionFn<E> = if cpu {
        cpu::attention
    } else {
        reference::attention
    };
    let mut each = vec![f32::NAN; d.q.len()];
    let mut r0 = 0;
    for s in &seqs {
        let span = r0 * nh * hd..(r0 + s.rows) * nh * hd;
        let kv = layer.view(s.block_table);
        one(
            &d.q[span.clone()],
            s.rows,
            nh,
            nkv,
            hd,
            &kv,
            s.first_pos,
            causal,
            scale,
            &mut each[span],
        );
        r0 += s.rows;
    }
    (all, each)
}

/// Decode steps of several sequences at different lengths, a prefill chunk (the
/// tiled path), two- and three-row sequences, one with no rows, and one whose
/// table starts with another's blocks, in one batch.
const BATCHES: [BatchCase; 3] = [
    BatchCase {
        n_heads: 8,
        n_kv_heads: 2,
        head_dim: 80,
        block_size: 16,
        seqs: &[
            (1, 0),
            (1, 37),
            (45, 20),
            (1, 300),
            (2, 129),
            (1, 200),
            (0, 10),
            (3, 0),
            (16, 5),
            (1, 15),
        ],
        share: Some((5, 3, 5)),
    },
    BatchCase {
        n_heads: 3,
        n_kv_heads: 3,
        head_dim: 72,
        block_size: 4,
        seqs: &[(1, 90), (29, 0), (1, 90), (2, 3), (1, 500), (7, 33)],
        share: Some((2, 0, 20)),
    },
    BatchCase {
        n_heads: 4,
        n_kv_heads: 1,
        head_dim: 13,
        block_size: 1,
        seqs: &[(1, 60), (1, 61), (1, 62), (5, 0), (1, 1), (2, 30)],
        share: Some((1, 0, 58)),
    },
];

/// cpu::attention_batch gives exactly what one cpu::attention call per sequence
/// gives (no context here is long enough to split over the keys), and is close to
/// reference::attention_batch, itself exactly the reference per sequence; f32 and
/// f16 pools, causal and not.
#[test]
fn batch_matches_per_sequence_calls() {
    let mut rng = Rng::new(76);
    for b in &BATCHES {
        for causal in [true, false] {
            let what = |dtype: &str| {
                format!(
                    "{dtype} causal {causal} heads {}/{} head_dim {} block {} seqs {:?}",
                    b.n_heads, b.n_kv_heads, b.head_dim, b.block_size, b.seqs
                )
            };
            let d32 = batch_data::<f32>(b, &mut rng);
            let d16 = batch_data::<f16>(b, &mut rng);
            let (ref32, each) = batch_and_per_sequence(b, &d32, causal, false);
            assert_eq!(bits(&ref32), bits(&each), "reference {}", what("f32"));
            let (ref16, each) = batch_and_per_sequence(b, &d16, causal, false);
            assert_eq!(bits(&ref16), bits(&each), "reference {}", what("f16"));
            // Twice, so the second call runs on the scratch the first one left.
            for pass in 0..2 {
                let (all, each) = batch_and_per_sequence(b, &d32, causal, true);
                assert_eq!(bits(&all), bits(&each), "pass {pass} {}", what("f32"));
                assert_close(&what("f32"), &all, &ref32, 1e-5, 1e-5);
                let (all, each) = batch_and_per_sequence(b, &d16, causal, true);
                assert_eq!(bits(&all), bits(&each), "pass {pass} {}", what("f16"));
                assert_close(&what("f16"), &all, &ref16, 1e-5, 1e-5);
            }
        }
    }
}

/// Long contexts with few (row, head) tasks in a batch: the rows pass splits
/// over the keys (4 threads, so as to split on any machine), also the rows of
/// short sequences whose chunks hold no keys at all.
#[test]
fn batch_splits_long_contexts() {
    const SPLIT: [BatchCase; 2] = [
        BatchCase {
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 72,
            block_size: 16,
            seqs: &[(1, 1500), (1, 1030), (2, 10), (50, 0), (1, 0)],
            share: None,
        },
        BatchCase {
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 80,
            block_size: 4,
            seqs: &[(1, 1100), (1, 2000), (1, 1100)],
            share: Some((2, 0, 250)),
        },
    ];
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(4)
        .build()
        .unwrap();
    let mut rng = Rng::new(77);
    pool.install(|| {
        for b in &SPLIT {
            for causal in [true, false] {
                let what = |dtype: &str| format!("{dtype} causal {causal} seqs {:?}", b.seqs);
                let d32 = batch_data::<f32>(b, &mut rng);
                let d16 = batch_data::<f16>(b, &mut rng);
                let (want, _) = batch_and_per_sequence(b, &d32, causal, false);
                let (all, each) = batch_and_per_sequence(b, &d32, causal, true);
                assert_close(&what("f32 batch"), &all, &want, 1e-5, 1e-5);
                assert_close(&what("f32 per sequence"), &each, &want, 1e-5, 1e-5);
                let (want, _) = batch_and_per_sequence(b, &d16, causal, false);
                let (all, each) = batch_and_per_sequence(b, &d16, causal, true);
                assert_close(&what("f16 batch"), &all, &want, 1e-5, 1e-5);
                assert_close(&what("f16 per sequence"), &each, &want, 1e-5, 1e-5);
            }
        }
    });
}

/// No sequences, or none with rows: nothing to do, nothing written.
#[test]
fn batch_without_rows() {
    let k = vec![0.0f32; 4 * 16];
    let layer = KvLayer {
        k: &k,
        v: &k,
        block_size: 4,
        kv_dim: 16,
    };
    cpu::attention_batch(&[], 2, 1, 16, &layer, &[], true, 0.25, &mut []);
    reference::attention_batch(&[], 2, 1, 16, &layer, &[], true, 0.25, &mut []);
    let seqs = [AttnSeq {
        rows: 0,
        first_pos: 3,
        block_table: &[0],
    }];
    cpu::attention_batch(&[], 2, 1, 16, &layer, &seqs, true, 0.25, &mut []);
    reference::attention_batch(&[], 2, 1, 16, &layer, &seqs, true, 0.25, &mut []);
}

/// Reruns the cpu tests at every dispatch level below the CPU's best (the parent
/// run covers the best), each in a child process with `MIPHA_CPU` set.
#[test]
fn every_level() {
    use mipha_kernels::cpu::dispatch::available;
    if std::env::var_os("MIPHA_CPU").is_some() {
        return; // a child, or a run pinned to one level on purpose
    }
    let exe = std::env::current_exe().unwrap();
    for l in Level::ALL {
        if l == level() {
            eprintln!("attention at {}: the other tests of this process", l.name());
            continue;
        }
        if !available().contains(&l) {
            eprintln!("attention at {}: skipped, this CPU lacks it", l.name());
            continue;
        }
        for test in [
            "reference_and_cpu_match_naive_contiguous",
            "incremental_decode_matches_full_prefill",
            "cpu_matches_reference_at_kernel_shapes",
            "cpu_matches_reference_for_peaky_scores",
            "f16_kv_matches_reference",
            "batch_matches_per_sequence_calls",
            "batch_splits_long_contexts",
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
        eprintln!("attention at {}: passed in child processes", l.name());
    }
}
