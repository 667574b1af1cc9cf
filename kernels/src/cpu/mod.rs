//! The CPU path the engine runs. Same functions and signatures as
//! [`crate::reference`], which is what every function here is tested against.
//!
//! The hot kernels (packed matmuls in `gemm`, attention, decode row dots, KV
//! stores) are written once over the traits of `isa` and built per
//! [`dispatch::Level`] with `#[target_feature]` and intrinsics, chosen at run
//! time; every intrinsic lives in `isa`, in the file of its instruction set.
//!
//! Layout: `isa` (the level tokens and their traits), `gemm` (packed matmuls:
//! packing, activation quantization, the int8 and float kernels), `attention`
//! (entry and batching, the tiled and the rows paths), `matmul` (unpacked
//! weights), `kv` (KV stores), `math` (`wide` transcendentals), `dispatch`
//! (levels, CPU detection, per-CPU tuning). Dependencies run one way: the
//! kernels use `isa`, `isa` uses only `math` and `dispatch`. The light elementwise ops use `wide`, which picks its instructions from
//! the build's target features (SSE2 on a default x86-64 build). Threads through
//! rayon: each op runs in whatever pool it is called from (the global one, or one
//! the engine `install`s), may be called from inside a rayon task, and splits its
//! work only when it is large enough to pay for it.

mod attention;
pub mod dispatch;
mod gemm;
mod isa;
mod kv;
mod math;
mod matmul;

use rayon::prelude::*;
use wide::f32x8;

use crate::reference;
pub use crate::{AttnSeq, Epilogue, KvDtype, KvElem, KvLayer, KvView, WeightView};
pub use gemm::{PackedMatrix, QuantizedActs, PANEL};
use math::{load, map_in_place, store};

/// Elements below which an elementwise op stays on the calling thread.
const PAR_MIN: usize = 1 << 15;

/// The output of a parallel kernel, written through by tasks at disjoint
/// elements (attention's (row, head) slices, the matmuls' column ranges).
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements, and the caller's `&mut` outlives them.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    pub(crate) fn new(p: *mut f32) -> Self {
        OutPtr(p)
    }

    /// Through a method, so closures capture the `Sync` wrapper, not the pointer.
    #[inline(always)]
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// `out[m, n] = x[m, k] . W[n, k]^T (+ bias[n])`. `x` is row-major `[m, k]` with
/// `k = w.cols`; `out` is `[m, w.rows]`.
///
/// For `m > 1` the calling thread keeps an `m * n` f32 scratch buffer between calls
/// (threads split the weight rows, so they write transposed tiles first).
pub fn matmul(x: &[f32], m: usize, w: WeightView, bias: Option<&[f32]>, out: &mut [f32]) {
    matmul::matmul(x, m, w, bias, out)
}

/// [`matmul`] for a matrix repacked by [`PackedMatrix::pack`], on the best
/// kernel this CPU has. Q8_0/Q4_0: the activations are quantized per 32-block
/// to int8 and multiplied with integer dots (`vpdpbusd` / `maddubs`), as
/// [`reference::matmul_int8`] defines. F16/BF16: f32 activations and FMAs, as
/// [`reference::matmul`].
pub fn matmul_packed(x: &[f32], m: usize, w: &PackedMatrix, bias: Option<&[f32]>, out: &mut [f32]) {
    gemm::matmul_packed(dispatch::level(), x, m, w, bias, Epilogue::Store, out)
}

/// [`matmul_packed`] with an [`Epilogue`] applied as each result is written
/// (`Accumulate` reads `out` first), on a chosen kernel path (lowered to what
/// the CPU supports), so tests and benchmarks can run every path on one machine.
pub fn matmul_packed_at(
    level: dispatch::Level,
    x: &[f32],
    m: usize,
    w: &PackedMatrix,
    bias: Option<&[f32]>,
    epilogue: Epilogue,
    out: &mut [f32],
) {
    gemm::matmul_packed(level, x, m, w, bias, epilogue, out)
}

/// [`matmul_packed`] with an [`Epilogue`], on the dispatched path.
pub fn matmul_packed_with(
    x: &[f32],
    m: usize,
    w: &PackedMatrix,
    bias: Option<&[f32]>,
    epilogue: Epilogue,
    out: &mut [f32],
) {
    gemm::matmul_packed(dispatch::level(), x, m, w, bias, epilogue, out)
}

/// Quantizes `x` (`m x k`) once for any number of [`matmul_quantized`] calls
/// on the dispatched path (or on `level`, lowered to what the CPU supports):
/// the int8 matmuls of Q8_0/Q4_0 weights that read the same activations (Phi-2's
/// q, k, v and fc1) then share one quantization.
pub fn quantize_acts(x: &[f32], m: usize, k: usize, acts: &mut QuantizedActs) {
    gemm::quantize_acts(dispatch::level(), x, m, k, acts)
}

/// [`quantize_acts`] on a chosen path.
pub fn quantize_acts_at(
    level: dispatch::Level,
    x: &[f32],
    m: usize,
    k: usize,
    acts: &mut QuantizedActs,
) {
    gemm::quantize_acts(level, x, m, k, acts)
}

/// [`layer_norm`] fused with [`quantize_acts`] of its output: each group of
/// rows is quantized while it is still in cache (`out` is written too).
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_quantize_at(
    level: dispatch::Level,
    x: &[f32],
    cols: usize,
    weight: &[f32],
    bias: &[f32],
    eps: f32,
    out: &mut [f32],
    acts: &mut QuantizedActs,
) {
    reference::check_layer_norm(x, cols, weight, bias, out);
    let norm = |x: &[f32], o: &mut [f32]| layer_norm_rows(x, cols, weight, bias, eps, o);
    gemm::layer_norm_quantize(level, x, cols, &norm, out, acts)
}

/// [`layer_norm_quantize_at`] on the dispatched path.
pub fn layer_norm_quantize(
    x: &[f32],
    cols: usize,
    weight: &[f32],
    bias: &[f32],
    eps: f32,
    out: &mut [f32],
    acts: &mut QuantizedActs,
) {
    layer_norm_quantize_at(dispatch::level(), x, cols, weight, bias, eps, out, acts)
}

/// [`matmul_packed_with`] for a Q8_0/Q4_0 matrix from activations quantized
/// beforehand, on the path they were quantized for. Panics for F16/BF16
/// matrices (they take f32 activations).
pub fn matmul_quantized(
    acts: &mut QuantizedActs,
    w: &PackedMatrix,
    bias: Option<&[f32]>,
    epilogue: Epilogue,
    out: &mut [f32],
) {
    gemm::matmul_quantized(acts, w, bias, epilogue, out)
}

/// [`crate::quant::quantize_act_block`] as the int8 matmuls of `level` run it
/// (a vector version on AVX-512, bit-identical), for tests.
pub fn quantize_act_block_at(
    level: dispatch::Level,
    x: &[f32; 32],
    q: &mut [i8; 32],
) -> (f32, i32) {
    gemm::block_quantizer(level)(x, q)
}

/// Row-wise LayerNorm over rows of `cols` elements (`rows = x.len() / cols`).
pub fn layer_norm(x: &[f32], cols: usize, weight: &[f32], bias: &[f32], eps: f32, out: &mut [f32]) {
    reference::check_layer_norm(x, cols, weight, bias, out);
    let rows = x.len() / cols;
    let per_task = (PAR_MIN / cols).max(1);
    if rows > per_task {
        x.par_chunks(cols * per_task)
            .zip(out.par_chunks_mut(cols * per_task))
            .for_each(|(xs, os)| layer_norm_rows(xs, cols, weight, bias, eps, os));
    } else {
        layer_norm_rows(x, cols, weight, bias, eps, out);
    }
}

/// Tanh-approximation GELU (HF `gelu_new` / `gelu_pytorch_tanh`), in place.
pub fn gelu_tanh(x: &mut [f32]) {
    map_par(x, math::gelu_tanh8)
}

/// Exact erf GELU (torch `nn.GELU()`), in place.
pub fn gelu_erf(x: &mut [f32]) {
    map_par(x, math::gelu_erf8)
}

/// `dst += src`.
pub fn add_assign(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "add_assign: length mismatch");
    if dst.len() >= 2 * PAR_MIN {
        dst.par_chunks_mut(PAR_MIN)
            .zip(src.par_chunks(PAR_MIN))
            .for_each(|(d, s)| add_assign_serial(d, s));
    } else {
        add_assign_serial(dst, src);
    }
}

/// Numerically stable softmax of one row, in place (an all `-inf` row becomes zeros).
pub fn softmax(row: &mut [f32]) {
    let n8 = row.len() / 8 * 8;
    let mut vmax = f32x8::splat(f32::NEG_INFINITY);
    for c in (0..n8).step_by(8) {
        vmax = vmax.max(load(&row[c..]));
    }
    let max = vmax
        .as_array()
        .iter()
        .chain(&row[n8..])
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    let vm = f32x8::splat(max);
    map_in_place(row, |v| (v - vm).exp());
    let inv = 1.0 / sum(row);
    map_in_place(row, |v| v * f32x8::splat(inv));
}

/// Partial rotate-half (NeoX) rotary embedding, in place. `x` is
/// `[T, n_heads * head_dim]`, `T = positions.len()`; in each head the first
/// `rot_dims` dims rotate with `inv_freq[j] = theta^(-2j/rot_dims)`, the rest pass through.
pub fn rope_partial(
    x: &mut [f32],
    n_heads: usize,
    head_dim: usize,
    rot_dims: usize,
    positions: &[usize],
    theta: f32,
) {
    reference::check_rope(x, n_heads, head_dim, rot_dims, positions);
    let width = n_heads * head_dim;
    if width == 0 || rot_dims == 0 {
        return;
    }
    let half = rot_dims / 2;
    // f64 angles: at position 2048+ an f32 product pos * inv_freq is already off by
    // ~1e-4 rad. One sin_cos per (position, frequency), shared by all heads. The
    // frequencies go through a stack table (no allocation: this runs every decode
    // step), FREQS at a time; every head of every model so far needs one pass.
    const FREQS: usize = 64;
    let mut inv_freq = [0f64; FREQS];
    for j0 in (0..half).step_by(FREQS) {
        let freqs = &mut inv_freq[..(half - j0).min(FREQS)];
        for (i, f) in freqs.iter_mut().enumerate() {
            *f = (theta as f64).powf(-2.0 * (j0 + i) as f64 / rot_dims as f64);
        }
        let freqs = &*freqs;
        let rotate_row = |row: &mut [f32], pos: usize| {
            for (i, &f) in freqs.iter().enumerate() {
                let (sin, cos) = (pos as f64 * f).sin_cos();
                let (sin, cos) = (sin as f32, cos as f32);
                let j = j0 + i;
                for head in row.chunks_exact_mut(head_dim) {
                    let (x1, x2) = (head[j], head[half + j]);
                    head[j] = x1 * cos - x2 * sin;
                    head[half + j] = x2 * cos + x1 * sin;
                }
            }
        };
        if positions.len() * width >= PAR_MIN {
            x.par_chunks_mut(width)
                .zip(positions.par_iter())
                .for_each(|(row, &pos)| rotate_row(row, pos));
        } else {
            for (row, &pos) in x.chunks_exact_mut(width).zip(positions) {
                rotate_row(row, pos);
            }
        }
    }
}

/// Gathers rows `ids` of `table` into `out` (`[ids.len(), table.cols]`), dequantizing.
/// Returns `Err(id)` for an id outside the table, leaving `out` untouched.
pub fn embedding(table: WeightView, ids: &[u32], out: &mut [f32]) -> Result<(), u32> {
    // A gather of a few rows: the scalar row decoder is already memory-bound here.
    reference::embedding(table, ids, out)
}

/// Multi-head attention for `n_tokens` query rows over a paged KV cache.
///
/// `q` and `out` are `[n_tokens, n_heads * head_dim]`. Query row `i` sits at
/// position `first_pos + i`; keys/values for positions `0..first_pos + n_tokens`
/// must already be in `kv`. Causal: row `i` attends keys `0..=first_pos + i`;
/// otherwise all keys. Query head `h` uses kv head `h / (n_heads / n_kv_heads)`.
/// f16 keys/values are widened to f32 as they are read; scores and softmax are
/// f32; `scale` is usually `1/sqrt(head_dim)`.
#[allow(clippy::too_many_arguments)]
pub fn attention<E: KvElem>(
    q: &[f32],
    n_tokens: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    kv: &KvView<E>,
    first_pos: usize,
    causal: bool,
    scale: f32,
    out: &mut [f32],
) {
    attention::attention(
        q, n_tokens, n_heads, n_kv_heads, head_dim, kv, first_pos, causal, scale, out,
    )
}

/// [`attention()`] for several sequences' rows in one call: `q` and `out` are
/// `[sum of rows, n_heads * head_dim]`, the rows of `seqs[0]` first, then
/// `seqs[1]`, ...; each sequence attends (causally or not) over its own keys,
/// read from `kv` through its block table. Sequences may share blocks.
///
/// Sequences with a few rows (decode steps) run together in one parallel pass;
/// each with more (a prefill chunk) runs tiled on its own. Gives the same
/// results as one [`attention()`] call per sequence, to rounding: a long context
/// may be split over the keys differently with more rows to share the threads.
#[allow(clippy::too_many_arguments)]
pub fn attention_batch<E: KvElem>(
    q: &[f32],
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    kv: &KvLayer<E>,
    seqs: &[AttnSeq],
    causal: bool,
    scale: f32,
    out: &mut [f32],
) {
    attention::attention_batch(
        q, n_heads, n_kv_heads, head_dim, kv, seqs, causal, scale, out,
    )
}

/// Converts K or V rows into the pool's element type: f16 rounds to nearest
/// even, bit-identical to `half::f16::from_f32` for every input (NaN, infinity,
/// subnormals, overflow to infinity).
pub fn kv_store<E: KvElem>(src: &[f32], dst: &mut [E]) {
    kv::kv_store(dispatch::level(), src, dst)
}

/// [`kv_store`] on a chosen path (lowered to what the CPU supports).
pub fn kv_store_at<E: KvElem>(level: dispatch::Level, src: &[f32], dst: &mut [E]) {
    kv::kv_store(level, src, dst)
}

fn map_par(x: &mut [f32], f: fn(f32x8) -> f32x8) {
    if x.len() >= 2 * PAR_MIN {
        x.par_chunks_mut(PAR_MIN).for_each(|c| map_in_place(c, f));
    } else {
        map_in_place(x, f);
    }
}

pub(crate) fn add_assign_serial(dst: &mut [f32], src: &[f32]) {
    let n8 = dst.len() / 8 * 8;
    for c in (0..n8).step_by(8) {
        let v = load(&dst[c..]) + load(&src[c..]);
        store(&mut dst[c..], v);
    }
    for (d, s) in dst[n8..].iter_mut().zip(&src[n8..]) {
        *d += *s;
    }
}

/// Sum with eight lane accumulators (shorter rounding chains than a serial sum).
fn sum(x: &[f32]) -> f32 {
    let n8 = x.len() / 8 * 8;
    let mut acc = f32x8::ZERO;
    for c in (0..n8).step_by(8) {
        acc += load(&x[c..]);
    }
    x[n8..].iter().fold(acc.reduce_add(), |s, &v| s + v)
}

/// Two-pass mean/variance in f32 (no `E[x^2] - E[x]^2` cancellation).
fn layer_norm_rows(
    x: &[f32],
    cols: usize,
    weight: &[f32],
    bias: &[f32],
    eps: f32,
    out: &mut [f32],
) {
    let n8 = cols / 8 * 8;
    for (xr, or) in x.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
        let mean = sum(xr) / cols as f32;
        let vm = f32x8::splat(mean);
        let mut acc = f32x8::ZERO;
        for c in (0..n8).step_by(8) {
            let d = load(&xr[c..]) - vm;
            acc = d.mul_add(d, acc);
        }
        let var = xr[n8..]
            .iter()
            .fold(acc.reduce_add(), |s, &v| s + (v - mean) * (v - mean))
            / cols as f32;
        let inv = 1.0 / (var + eps).sqrt();
        let vi = f32x8::splat(inv);
        for c in (0..n8).step_by(8) {
            let y = ((load(&xr[c..]) - vm) * vi).mul_add(load(&weight[c..]), load(&bias[c..]));
            store(&mut or[c..], y);
        }
        for c in n8..cols {
            or[c] = (xr[c] - mean) * inv * weight[c] + bias[c];
        }
    }
}
