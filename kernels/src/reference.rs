//! Scalar, obviously-correct versions of every op: the oracle the fast paths are
//! tested against. Written for clarity, not speed; accumulates in f64 where that
//! costs nothing in readability, so the reference is (slightly) more exact than
//! any f32 implementation it judges.

use crate::quant::dequantize_row;
pub use crate::{AttnSeq, KvElem, KvLayer, KvView, WeightView};

/// `out[m, n] = x[m, k] . W[n, k]^T (+ bias[n])`, with `k = w.cols`, `n = w.rows`.
pub fn matmul(x: &[f32], m: usize, w: WeightView, bias: Option<&[f32]>, out: &mut [f32]) {
    let (n, k) = (w.rows, w.cols);
    check_matmul(x, m, &w, bias, out);
    let mut row = vec![0.0f32; k];
    for j in 0..n {
        dequantize_row(w.ty, w.row(j), &mut row);
        for i in 0..m {
            let xi = &x[i * k..(i + 1) * k];
            let mut acc: f64 = xi
                .iter()
                .zip(&row)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum();
            if let Some(b) = bias {
                acc += b[j] as f64;
            }
            out[i * n + j] = acc as f32;
        }
    }
}

/// Shape checks shared by every matmul implementation: a mismatch is a bug in the
/// caller, so it panics with the shapes involved.
pub(crate) fn check_matmul(x: &[f32], m: usize, w: &WeightView, bias: Option<&[f32]>, out: &[f32]) {
    assert_eq!(
        x.len(),
        m * w.cols,
        "matmul: x has {} elements, expected m={m} x k={}",
        x.len(),
        w.cols
    );
    assert_eq!(
        out.len(),
        m * w.rows,
        "matmul: out has {} elements, expected m={m} x n={}",
        out.len(),
        w.rows
    );
    assert_eq!(
        w.row_stride,
        w.ty.row_bytes(w.cols),
        "matmul: bad row_stride"
    );
    assert!(
        w.data.len() >= w.rows * w.row_stride,
        "matmul: weight data too short"
    );
    if let Some(b) = bias {
        assert_eq!(b.len(), w.rows, "matmul: bias length != n");
    }
}

/// Row-wise LayerNorm (biased variance, as torch) over rows of `cols` elements.
pub fn layer_norm(x: &[f32], cols: usize, weight: &[f32], bias: &[f32], eps: f32, out: &mut [f32]) {
    check_layer_norm(x, cols, weight, bias, out);
    for (xr, or) in x.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
        let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
        let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / cols as f64;
        let inv = 1.0 / (var + eps as f64).sqrt();
        for (((o, &v), &g), &b) in or.iter_mut().zip(xr).zip(weight).zip(bias) {
            *o = ((v as f64 - mean) * inv * g as f64 + b as f64) as f32;
        }
    }
}

pub(crate) fn check_layer_norm(x: &[f32], cols: usize, weight: &[f32], bias: &[f32], out: &[f32]) {
    assert!(cols > 0, "layer_norm: cols must be > 0");
    assert_eq!(
        x.len() % cols,
        0,
        "layer_norm: x.len() not a multiple of cols"
    );
    assert_eq!(out.len(), x.len(), "layer_norm: out length != x length");
    assert_eq!(weight.len(), cols, "layer_norm: weight length != cols");
    assert_eq!(bias.len(), cols, "layer_norm: bias length != cols");
}

/// Tanh-approximation GELU (HF `gelu_new`), in place.
///
/// Evaluated as `x / (1 + e^{-2u})`, the same function as `0.5 x (1 + tanh(u))`:
/// in the left tail `1 + tanh(u)` cancels completely even in f64 (at x = -8 the
/// true value is ~1e-21 of the terms).
pub fn gelu_tanh(x: &mut [f32]) {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    for v in x {
        let a = *v as f64;
        let u = c * (a + 0.044715 * a * a * a);
        *v = (a / (1.0 + (-2.0 * u).exp())) as f32;
    }
}

/// Exact GELU `0.5 x (1 + erf(x / sqrt 2))` (torch `nn.GELU()`), in place.
///
/// Negative inputs go through `erfc` so the far left tail keeps its relative
/// accuracy instead of cancelling in `1 + erf`.
pub fn gelu_erf(x: &mut [f32]) {
    for v in x {
        let a = *v as f64;
        let z = a * std::f64::consts::FRAC_1_SQRT_2;
        let phi = if z >= 0.0 {
            0.5 * (1.0 + erf(z))
        } else {
            0.5 * erfc(-z)
        };
        *v = (a * phi) as f32;
    }
}

/// f64 error function, relative error ~1e-15 (exposed so tests can check it).
///
/// No `erf` in stable `std`, so: for |x| < 2 the everywhere-positive series
/// `2/sqrt(pi) e^{-x^2} sum (2x^2)^n x / (2n+1)!!` (no cancellation), above that
/// `1 - erfc`.
pub fn erf(x: f64) -> f64 {
    let a = x.abs();
    let r = if a < 2.0 {
        erf_series(a)
    } else {
        1.0 - erfc_cf(a)
    };
    r.copysign(x)
}

/// f64 complementary error function with relative accuracy in the right tail.
pub fn erfc(x: f64) -> f64 {
    if x < 0.0 {
        2.0 - erfc(-x)
    } else if x < 2.0 {
        1.0 - erf_series(x)
    } else {
        erfc_cf(x)
    }
}

fn erf_series(a: f64) -> f64 {
    let two_a2 = 2.0 * a * a;
    let mut term = a;
    let mut sum = a;
    let mut n = 0.0;
    while term > 1e-18 * sum {
        n += 1.0;
        term *= two_a2 / (2.0 * n + 1.0);
        sum += term;
    }
    std::f64::consts::FRAC_2_SQRT_PI * (-a * a).exp() * sum
}

/// Continued fraction `erfc(a) = e^{-a^2}/sqrt(pi) / (a + (1/2)/(a + 1/(a + (3/2)/(a + ...))))`,
/// evaluated backwards; 60 terms reach f64 precision for a >= 2.
fn erfc_cf(a: f64) -> f64 {
    let mut f = a;
    for n in (1..=60).rev() {
        f = a + (n as f64 * 0.5) / f;
    }
    (-a * a).exp() / (std::f64::consts::PI.sqrt() * f)
}

/// `dst += src`.
pub fn add_assign(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "add_assign: length mismatch");
    for (d, s) in dst.iter_mut().zip(src) {
        *d += *s;
    }
}

/// Numerically stable softmax of one row, in place. A row that is entirely `-inf`
/// (nothing to attend to) becomes all zeros rather than NaN.
pub fn softmax(row: &mut [f32]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    let mut sum = 0.0f64;
    for v in row.iter_mut() {
        let e = ((*v - max) as f64).exp();
        sum += e;
        *v = e as f32;
    }
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v = (*v as f64 * inv) as f32;
    }
}

/// Partial rotate-half (NeoX) rotary embedding, in place, angles in f64.
/// `x` is `[T, n_heads * head_dim]` with `T = positions.len()`; only the first
/// `rot_dims` dims of each head rotate.
pub fn rope_partial(
    x: &mut [f32],
    n_heads: usize,
    head_dim: usize,
    rot_dims: usize,
    positions: &[usize],
    theta: f32,
) {
    check_rope(x, n_heads, head_dim, rot_dims, positions);
    let h = rot_dims / 2;
    let width = n_heads * head_dim;
    for (row, &pos) in x.chunks_exact_mut(width).zip(positions) {
        for head in row.chunks_exact_mut(head_dim) {
            for j in 0..h {
                let inv_freq = (theta as f64).powf(-2.0 * j as f64 / rot_dims as f64);
                let (sin, cos) = (pos as f64 * inv_freq).sin_cos();
                let x1 = head[j] as f64;
                let x2 = head[h + j] as f64;
                head[j] = (x1 * cos - x2 * sin) as f32;
                head[h + j] = (x2 * cos + x1 * sin) as f32;
            }
        }
    }
}

pub(crate) fn check_rope(
    x: &[f32],
    n_heads: usize,
    head_dim: usize,
    rot_dims: usize,
    positions: &[usize],
) {
    assert!(
        rot_dims.is_multiple_of(2) && rot_dims <= head_dim,
        "rope_partial: rot_dims {rot_dims} must be even and <= head_dim {head_dim}"
    );
    assert_eq!(
        x.len(),
        positions.len() * n_heads * head_dim,
        "rope_partial: x is not [positions, n_heads * head_dim]"
    );
}

/// Gathers rows `ids` of `table` into `out` (`[ids.len(), table.cols]`), dequantizing.
/// An id outside the table is returned as `Err(id)` (token ids come from user input)
/// and `out` is left untouched.
pub fn embedding(table: WeightView, ids: &[u32], out: &mut [f32]) -> Result<(), u32> {
    check_embedding(&table, ids, out)?;
    for (&id, o) in ids.iter().zip(out.chunks_exact_mut(table.cols)) {
        dequantize_row(table.ty, table.row(id as usize), o);
    }
    Ok(())
}

pub(crate) fn check_embedding(table: &WeightView, ids: &[u32], out: &[f32]) -> Result<(), u32> {
    assert_eq!(
        out.len(),
        ids.len() * table.cols,
        "embedding: out is not [ids, cols]"
    );
    match ids.iter().find(|&&id| id as usize >= table.rows) {
        Some(&bad) => Err(bad),
        None => Ok(()),
    }
}

/// Multi-head attention over a paged KV cache, one query row at a time, on the
/// K/V values widened to f32. See [`crate::cpu::attention`] for the contract.
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
    check_attention(
        q, n_tokens, n_heads, n_kv_heads, head_dim, kv, first_pos, out,
    );
    let group = n_heads / n_kv_heads;
    let qd = n_heads * head_dim;
    let total = first_pos + n_tokens;
    let mut scores = vec![0.0f32; total];
    for i in 0..n_tokens {
        let n_keys = if causal { first_pos + i + 1 } else { total };
        for h in 0..n_heads {
            let kvh = h / group;
            let qh = &q[i * qd + h * head_dim..i * qd + (h + 1) * head_dim];
            for (t, s) in scores[..n_keys].iter_mut().enumerate() {
                let k = &kv.key(t)[kvh * head_dim..(kvh + 1) * head_dim];
                let dot: f64 = qh
                    .iter()
                    .zip(k)
                    .map(|(&a, &b)| a as f64 * b.to_f32() as f64)
                    .sum();
                *s = dot as f32 * scale;
            }
            softmax(&mut scores[..n_keys]);
            let oh = &mut out[i * qd + h * head_dim..i * qd + (h + 1) * head_dim];
            for (d, o) in oh.iter_mut().enumerate() {
                let acc: f64 = scores[..n_keys]
                    .iter()
                    .enumerate()
                    .map(|(t, &p)| p as f64 * kv.value(t)[kvh * head_dim + d].to_f32() as f64)
                    .sum();
                *o = acc as f32;
            }
        }
    }
}

/// [`attention`] for several sequences' rows in one call: `q` and `out` are
/// `[sum of rows, n_heads * head_dim]`, the rows of `seqs[0]` first. See
/// [`crate::cpu::attention_batch`].
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
    check_attention_batch(q, n_heads, n_kv_heads, head_dim, kv, seqs, out);
    let qd = n_heads * head_dim;
    let mut r0 = 0;
    for s in seqs {
        let rows = r0 * qd..(r0 + s.rows) * qd;
        attention(
            &q[rows.clone()],
            s.rows,
            n_heads,
            n_kv_heads,
            head_dim,
            &kv.view(s.block_table),
            s.first_pos,
            causal,
            scale,
            &mut out[rows],
        );
        r0 += s.rows;
    }
}

/// K or V rows converted to the pool's element type (f16: round to nearest even).
pub fn kv_store<E: KvElem>(src: &[f32], dst: &mut [E]) {
    assert_eq!(src.len(), dst.len(), "kv_store: length mismatch");
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = E::from_f32(s);
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn check_attention<E: KvElem>(
    q: &[f32],
    n_tokens: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    kv: &KvView<E>,
    first_pos: usize,
    out: &[f32],
) {
    assert!(
        n_kv_heads > 0 && n_heads.is_multiple_of(n_kv_heads),
        "attention: n_heads {n_heads} not a multiple of n_kv_heads {n_kv_heads}"
    );
    assert_eq!(q.len(), n_tokens * n_heads * head_dim, "attention: q shape");
    assert_eq!(out.len(), q.len(), "attention: out shape");
    assert_eq!(
        kv.kv_dim,
        n_kv_heads * head_dim,
        "attention: kv_dim != n_kv_heads * head_dim"
    );
    assert!(kv.block_size > 0, "attention: block_size must be > 0");
    let total = first_pos + n_tokens;
    assert!(
        kv.block_table.len() * kv.block_size >= total,
        "attention: block table covers {} positions, need {total}",
        kv.block_table.len() * kv.block_size
    );
}

/// [`check_attention`] for a batch: `q` and `out` hold exactly the sequences'
/// rows, and each block table covers its sequence's positions.
pub(crate) fn check_attention_batch<E: KvElem>(
    q: &[f32],
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    kv: &KvLayer<E>,
    seqs: &[AttnSeq],
    out: &[f32],
) {
    assert!(
        n_kv_heads > 0 && n_heads.is_multiple_of(n_kv_heads),
        "attention: n_heads {n_heads} not a multiple of n_kv_heads {n_kv_heads}"
    );
    let rows: usize = seqs.iter().map(|s| s.rows).sum();
    assert_eq!(
        q.len(),
        rows * n_heads * head_dim,
        "attention_batch: q is not [{rows} rows, {n_heads} x {head_dim}]"
    );
    assert_eq!(out.len(), q.len(), "attention_batch: out shape");
    assert_eq!(
        kv.kv_dim,
        n_kv_heads * head_dim,
        "attention: kv_dim != n_kv_heads * head_dim"
    );
    assert!(kv.block_size > 0, "attention: block_size must be > 0");
    for (i, s) in seqs.iter().enumerate() {
        let total = s.first_pos + s.rows;
        assert!(
            s.block_table.len() * kv.block_size >= total,
            "attention_batch: sequence {i}'s block table covers {} positions, need {total}",
            s.block_table.len() * kv.block_size
        );
    }
}

/// The integer matmul the CPU runs for Q8_0/Q4_0 weights: each x row quantized
/// per 32-block by [`quantize_act_block`](crate::quant::quantize_act_block), each
/// block's integer dot with the weight block scaled by both scales, blocks summed
/// in order in f32. The row's last partial block is zero-padded (as the weights are).
pub fn matmul_int8(x: &[f32], m: usize, w: WeightView, bias: Option<&[f32]>, out: &mut [f32]) {
    use crate::quant::{quantize_act_block, BlockQ4_0, BlockQ8_0, QuantType, QK};
    check_matmul(x, m, &w, bias, out);
    let (n, k) = (w.rows, w.cols);
    let nb = k.div_ceil(QK);
    for i in 0..m {
        let mut xq = vec![([0i8; QK], 0.0f32, 0i32); nb];
        for (b, blk) in xq.iter_mut().enumerate() {
            let mut xs = [0.0f32; QK];
            let end = ((b + 1) * QK).min(k);
            xs[..end - b * QK].copy_from_slice(&x[i * k + b * QK..i * k + end]);
            let (d, s) = quantize_act_block(&xs, &mut blk.0);
            blk.1 = d;
            blk.2 = s;
        }
        for j in 0..n {
            let row = w.row(j);
            let mut acc = 0.0f32;
            for (b, (q, dx, _)) in xq.iter().enumerate() {
                let (dw, dot) = match w.ty {
                    QuantType::Q8_0 => {
                        let blk: BlockQ8_0 =
                            bytemuck::pod_read_unaligned(&row[b * 34..b * 34 + 34]);
                        let dot: i32 = blk
                            .qs
                            .iter()
                            .zip(q)
                            .map(|(&a, &c)| a as i32 * c as i32)
                            .sum();
                        (blk.d.to_f32(), dot)
                    }
                    QuantType::Q4_0 => {
                        let blk: BlockQ4_0 =
                            bytemuck::pod_read_unaligned(&row[b * 18..b * 18 + 18]);
                        let mut dot = 0i32;
                        for t in 0..QK / 2 {
                            dot += ((blk.qs[t] & 15) as i32 - 8) * q[t] as i32;
                            dot += ((blk.qs[t] >> 4) as i32 - 8) * q[t + QK / 2] as i32;
                        }
                        (blk.d.to_f32(), dot)
                    }
                    other => panic!("matmul_int8: {other} weights are not block-quantized"),
                };
                acc += dot as f32 * (dw * dx);
            }
            out[i * n + j] = acc + bias.map_or(0.0, |b| b[j]);
        }
    }
}

/// An activation as `vcvtne2ps2bf16` rounds it for `vdpbf16ps`: to nearest
/// even BF16, subnormal inputs and results as zero of the same sign, NaN quiet.
/// Returned widened to f32 (exact).
pub fn round_bf16(x: f32) -> f32 {
    let bits = x.to_bits();
    if x.is_nan() {
        return f32::from_bits((bits | 0x0040_0000) & 0xffff_0000);
    }
    if x.is_subnormal() {
        return f32::from_bits(bits & 0x8000_0000);
    }
    let lsb = (bits >> 16) & 1;
    let rounded = bits.wrapping_add(0x7fff + lsb) & 0xffff_0000;
    let y = f32::from_bits(rounded);
    if y.is_subnormal() {
        f32::from_bits(rounded & 0x8000_0000)
    } else {
        y
    }
}

/// The BF16 matmul on CPUs with AVX512_BF16 (`vdpbf16ps`, as llama.cpp's BF16
/// path): each activation rounded by [`round_bf16`], each product of two BF16
/// values exact in f32, accumulated in f32 over the pairs `(2p, 2p + 1)` of
/// `k` (odd element first, as the instruction does; an odd `k` pairs its last
/// element with zero), bias added last. The kernels split the sum into several
/// chains, so they agree with this to f32 summation rounding, not bit for bit.
pub fn matmul_bf16_dot(x: &[f32], m: usize, w: WeightView, bias: Option<&[f32]>, out: &mut [f32]) {
    use crate::quant::QuantType;
    check_matmul(x, m, &w, bias, out);
    assert_eq!(w.ty, QuantType::BF16, "matmul_bf16_dot: {} weights", w.ty);
    let (n, k) = (w.rows, w.cols);
    let mut row = vec![0.0f32; k + 1];
    let xb: Vec<f32> = x.iter().map(|&v| round_bf16(v)).collect();
    for j in 0..n {
        dequantize_row(w.ty, w.row(j), &mut row[..k]);
        row[k] = 0.0;
        for i in 0..m {
            let xi = &xb[i * k..(i + 1) * k];
            let mut acc = 0.0f32;
            for p in (0..k).step_by(2) {
                let x1 = if p + 1 < k { xi[p + 1] } else { 0.0 };
                acc += row[p + 1] * x1;
                acc += row[p] * xi[p];
            }
            out[i * n + j] = acc + bias.map_or(0.0, |b| b[j]);
        }
    }
}
