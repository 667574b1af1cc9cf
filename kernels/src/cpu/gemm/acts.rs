//! [`QuantizedActs`]: activations quantized per 32-block to int8 for the int8
//! matmuls, laid out by micro-tile group, optionally straight out of a
//! LayerNorm ([`layer_norm_quantize`]) while its rows are still in cache.

use rayon::prelude::*;

use super::super::isa::{self, BlockQuantizer};
use super::super::OutPtr;
use super::supported;
use crate::cpu::dispatch::Level;
use crate::quant::quantize_act_block;
use crate::QK;

/// Activation rows quantized per 32-block, in groups of `g` rows (the micro-
/// tile height) so that a tile reads one block of all its rows from one place:
/// block `b` of row `i` of group `G` has its quants at
/// `qs[((G * nb + b) * g + i) * 32..]`, its scale at `d[(G * nb + b) * g + i]`,
/// and at `init` the integer the dot starts from (`-bias * sum(q)`, which
/// cancels the bias of unsigned weights: 8 for Q4_0's nibbles, 128 for Q8_0
/// stored as `w + 128`). A tile thus needs one pointer per operand, and every
/// row's data is a constant displacement from it.
///
/// Built by [`crate::cpu::quantize_acts`] or [`crate::cpu::layer_norm_quantize`], then read by
/// any number of [`crate::cpu::matmul_quantized`] calls (Phi-2's q, k, v and fc1 share one).
#[derive(Default)]
pub struct QuantizedActs {
    pub(super) level: Option<Level>,
    pub(super) m: usize,
    pub(super) k: usize,
    pub(super) g: usize,
    pub(super) nb: usize,
    pub(super) qs: Vec<i8>,
    pub(super) d: Vec<f32>,
    sum: Vec<i32>,
    pub(super) init: Vec<i32>,
    /// the bias `init` was computed for (`None`: not yet)
    init_bias: Option<i32>,
}

impl std::fmt::Debug for QuantizedActs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QuantizedActs({} x {})", self.m, self.k)
    }
}

impl QuantizedActs {
    /// Rows and columns of the activations these were quantized from.
    pub fn shape(&self) -> (usize, usize) {
        (self.m, self.k)
    }

    /// Sizes the buffers for `m x k` activations on `level` (supported by this
    /// CPU).
    pub(super) fn reset(&mut self, level: Level, m: usize, k: usize) {
        let g = isa::consts(level).int8_mr.min(m).max(1);
        let nb = k.div_ceil(QK);
        let blocks = m.div_ceil(g) * nb * g;
        self.level = Some(level);
        (self.m, self.k, self.g, self.nb) = (m, k, g, nb);
        self.init_bias = None;
        // Padding rows of the last group stay zero: tiles never read them.
        self.qs.clear();
        self.qs.resize(blocks * QK, 0);
        self.d.clear();
        self.d.resize(blocks, 0.0);
        self.sum.clear();
        self.sum.resize(blocks, 0);
    }

    /// Quantizes `x`'s rows group by group, in parallel when there are several
    /// (decode's single row stays on the calling thread). With `norm`, each
    /// group's rows are first normalized into `out` and quantized from there
    /// while they are in cache.
    pub(super) fn fill(&mut self, x: &[f32], norm: Option<(&Norm, &mut [f32])>) {
        let (m, g, k, nb) = (self.m, self.g, self.k, self.nb);
        let block = block_quantizer(self.level.unwrap_or(Level::Portable));
        let min_len = if m >= 4 { 1 } else { usize::MAX };
        let (norm, out) = match norm {
            Some((f, out)) => (Some(f), OutPtr::new(out.as_mut_ptr())),
            None => (None, OutPtr::new(std::ptr::null_mut())),
        };
        self.qs
            .par_chunks_mut(nb * g * QK)
            .zip(self.d.par_chunks_mut(nb * g))
            .zip(self.sum.par_chunks_mut(nb * g))
            .enumerate()
            .with_min_len(min_len)
            .for_each(|(gi, ((qs, d), sum))| {
                let (r0, r1) = (gi * g, ((gi + 1) * g).min(m));
                let src = &x[r0 * k..r1 * k];
                let rows: &[f32] = match norm {
                    Some(f) => {
                        // SAFETY: groups write disjoint rows of `out`, which has
                        // x.len() elements (checked by the caller).
                        let o = unsafe {
                            std::slice::from_raw_parts_mut(out.get().add(r0 * k), src.len())
                        };
                        f(src, o);
                        o
                    }
                    None => src,
                };
                for (i, xr) in rows.chunks(k.max(1)).enumerate() {
                    for b in 0..nb {
                        let o = b * g + i;
                        let q: &mut [i8; QK] = (&mut qs[o * QK..(o + 1) * QK]).try_into().unwrap();
                        (d[o], sum[o]) = if (b + 1) * QK <= k {
                            block(xr[b * QK..(b + 1) * QK].try_into().unwrap(), q)
                        } else {
                            let mut xs = [0.0f32; QK];
                            xs[..k - b * QK].copy_from_slice(&xr[b * QK..]);
                            block(&xs, q)
                        };
                    }
                }
            });
    }

    /// Makes `init` hold `-bias * sum`.
    pub(super) fn set_bias(&mut self, bias: i32) {
        if self.init_bias != Some(bias) {
            self.init.clear();
            self.init.extend(self.sum.iter().map(|s| -bias * s));
            self.init_bias = Some(bias);
        }
    }
}

/// A row-wise normalization (`x` rows to `out` rows) run before quantizing.
pub(crate) type Norm<'a> = dyn Fn(&[f32], &mut [f32]) + Sync + 'a;

/// Quantizes `x` (`m x k`) for [`matmul_quantized`](super::matmul_quantized) on `level`.
pub(crate) fn quantize_acts(level: Level, x: &[f32], m: usize, k: usize, acts: &mut QuantizedActs) {
    assert_eq!(x.len(), m * k, "quantize: x is not m x k");
    acts.reset(supported(level), m, k);
    acts.fill(x, None);
}

/// `out = norm(x)` row by row (`k` wide), each group of rows quantized into
/// `acts` for [`matmul_quantized`](super::matmul_quantized) as soon as it is written.
pub(crate) fn layer_norm_quantize(
    level: Level,
    x: &[f32],
    k: usize,
    norm: &Norm,
    out: &mut [f32],
    acts: &mut QuantizedActs,
) {
    assert_eq!(x.len(), out.len(), "layer_norm: x and out differ in length");
    assert!(
        k > 0 && x.len().is_multiple_of(k),
        "layer_norm: rows are not {k} wide"
    );
    acts.reset(supported(level), x.len() / k, k);
    acts.fill(x, Some((norm, out)));
}

/// [`quantize_act_block`], or a vector version of it with the same results
/// where `level` has one.
pub(crate) fn block_quantizer(level: Level) -> BlockQuantizer {
    if level.is_supported() {
        isa::consts(level).quantize_act_block
    } else {
        quantize_act_block
    }
}

/// `x` (`m x k`) rounded to BF16 for the BF16 dot, as pairs: `xb[i * kp + q]`
/// holds elements `2q` (low half) and `2q + 1` of row `i`, `kp = ceil(k / 2)`,
/// an odd `k`'s last pair padded with 0. Rounding as
/// [`round_bf16_bits`](crate::quant::round_bf16_bits).
pub(crate) fn bf16_pairs(x: &[f32], m: usize, k: usize, xb: &mut Vec<u32>) {
    use crate::quant::round_bf16_bits as r;
    let kp = k.div_ceil(2);
    xb.clear();
    xb.resize(m * kp, 0);
    let row = |(xr, dst): (&[f32], &mut [u32])| {
        for (d, p) in dst.iter_mut().zip(xr.chunks(2)) {
            let hi = p.get(1).map_or(0, |&v| r(v) as u32);
            *d = r(p[0]) as u32 | hi << 16;
        }
    };
    if k == 0 {
        return;
    }
    // A prefill chunk's rows in parallel; a decode row (or a few) in place.
    if m * k >= 1 << 16 {
        x.par_chunks(k).zip(xb.par_chunks_mut(kp)).for_each(row);
    } else {
        x.chunks(k).zip(xb.chunks_mut(kp)).for_each(row);
    }
}
