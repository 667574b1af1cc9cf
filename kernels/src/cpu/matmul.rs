//! `out = x . W^T (+ b)` with weights decoded block by block into f32 registers.
//!
//! Work is split over weight rows (output columns): at decode time (`m = 1`) the
//! op is a stream through the weights, and each thread streams its own rows. For
//! `m > 1` every weight block is decoded once per tile of up to four x rows.
//! Activations stay f32, so results match an oracle run on dequantized weights.
//!
//! This is the path of unpacked weights (as stored in the file); the block
//! decoders here ([`Decode`]) are per storage type, on `wide`, and the whole
//! kernel is entered per level through `isa` (AVX2 at most, whose decode row dot
//! is [`super::isa::Cpu::dot_row`]).

use std::cell::Cell;
use std::marker::PhantomData;

use half::f16;
use rayon::prelude::*;
use wide::{f32x8, u32x8};

use super::dispatch::Level;
#[cfg(target_arch = "x86_64")]
use super::isa::Avx2;
use super::isa::{Cpu, Kernel, Portable};
use super::math::load;
use crate::quant::dequantize_row;
use crate::reference::check_matmul;
use crate::{QuantType, WeightView, QK};

/// 32 decoded weights in four registers.
type Block = [f32x8; 4];

/// One storage type's block decoder. Blocks are 32 elements for every type so the
/// dot-product loop is shared; a row's last partial block goes through
/// [`dequantize_row`] into a zero-padded buffer.
trait Decode {
    /// Bytes per 32 elements.
    const BYTES: usize;
    fn block(b: &[u8]) -> Block;
}

struct F32;
struct F16;
struct Bf16;
struct Q8;
struct Q4;

impl Decode for F32 {
    const BYTES: usize = 128;
    #[inline(always)]
    fn block(b: &[u8]) -> Block {
        // Unaligned reads: tensors in a mapped file need not be 4-byte aligned.
        std::array::from_fn(|c| f32x8::new(bytemuck::pod_read_unaligned(&b[32 * c..32 * c + 32])))
    }
}

#[inline(always)]
fn u16x8_at(b: &[u8], o: usize) -> u32x8 {
    let h: [u16; 8] = bytemuck::pod_read_unaligned(&b[o..o + 16]);
    u32x8::new(h.map(u32::from))
}

/// Branch-free f16 -> f32: shifting the exponent+mantissa into f32 position and
/// scaling by 2^112 (the exponent-bias difference) is exact for normals and
/// subnormals alike; inf/NaN (which land at >= 65536) get the all-ones exponent.
#[inline(always)]
fn f16x8_to_f32(h: u32x8) -> f32x8 {
    let bits = (h & u32x8::splat(0x7fff)) << 13;
    let mag: f32x8 = bytemuck::cast::<_, f32x8>(bits) * f32x8::splat(f32::from_bits(0x7780_0000));
    let special: f32x8 = bytemuck::cast(bits | u32x8::splat(0x7000_0000));
    let mag = mag.simd_ge(f32x8::splat(65536.0)).select(special, mag);
    let sign: f32x8 = bytemuck::cast((h & u32x8::splat(0x8000)) << 16);
    mag | sign
}

impl Decode for F16 {
    const BYTES: usize = 64;
    #[inline(always)]
    fn block(b: &[u8]) -> Block {
        std::array::from_fn(|c| f16x8_to_f32(u16x8_at(b, 16 * c)))
    }
}

impl Decode for Bf16 {
    const BYTES: usize = 64;
    #[inline(always)]
    fn block(b: &[u8]) -> Block {
        std::array::from_fn(|c| bytemuck::cast(u16x8_at(b, 16 * c) << 16))
    }
}

impl Decode for Q8 {
    const BYTES: usize = 34;
    #[inline(always)]
    fn block(b: &[u8]) -> Block {
        let d = f32x8::splat(f16::from_le_bytes([b[0], b[1]]).to_f32());
        let q: &[u8; 32] = b[2..34].try_into().unwrap();
        std::array::from_fn(|c| f32x8::new(std::array::from_fn(|t| q[8 * c + t] as i8 as f32)) * d)
    }
}

impl Decode for Q4 {
    const BYTES: usize = 18;
    #[inline(always)]
    fn block(b: &[u8]) -> Block {
        let d = f32x8::splat(f16::from_le_bytes([b[0], b[1]]).to_f32());
        let qs: &[u8; 16] = b[2..18].try_into().unwrap();
        // Elements 0..16 are the low nibbles of bytes 0..16, 16..32 the high ones.
        std::array::from_fn(|c| {
            let q = &qs[8 * (c % 2)..8 * (c % 2) + 8];
            let shift = if c < 2 { 0 } else { 4 };
            f32x8::new(std::array::from_fn(|t| ((q[t] >> shift) & 15) as f32 - 8.0)) * d
        })
    }
}

/// x rows processed per pass over a weight row.
const TILE: usize = 4;

/// One tile of `R` x rows: row slices plus their last partial block, zero-padded
/// so a padded weight block can be multiplied without reading past `x`.
struct XTile<'a, const R: usize> {
    rows: [&'a [f32]; R],
    tails: [[f32; QK]; R],
}

impl<'a, const R: usize> XTile<'a, R> {
    fn new(x: &'a [f32], k: usize, first: usize) -> Self {
        let full = k / QK * QK;
        let rows: [&[f32]; R] = std::array::from_fn(|r| &x[(first + r) * k..(first + r + 1) * k]);
        let tails = std::array::from_fn(|r| {
            let mut t = [0.0f32; QK];
            t[..k - full].copy_from_slice(&rows[r][full..]);
            t
        });
        XTile { rows, tails }
    }
}

/// Dot products of `R` x rows with one stored weight row. `A` independent
/// accumulators per x row hide FMA latency when `R` is small.
#[inline(always)]
fn dot_tile<D: Decode, const R: usize, const A: usize>(
    ty: QuantType,
    wrow: &[u8],
    xt: &XTile<R>,
    k: usize,
) -> [f32; R] {
    let nb = k / QK;
    let mut acc = [[f32x8::ZERO; A]; R];
    for b in 0..nb {
        let w = D::block(&wrow[b * D::BYTES..(b + 1) * D::BYTES]);
        for (acc_r, xr) in acc.iter_mut().zip(&xt.rows) {
            let xs = &xr[b * QK..(b + 1) * QK];
            for (c, wc) in w.iter().enumerate() {
                let a = &mut acc_r[c % A];
                *a = load(&xs[8 * c..]).mul_add(*wc, *a);
            }
        }
    }
    if !k.is_multiple_of(QK) {
        let mut wt = [0.0f32; QK];
        dequantize_row(ty, &wrow[nb * D::BYTES..], &mut wt[..k % QK]);
        for (acc_r, tail) in acc.iter_mut().zip(&xt.tails) {
            for c in 0..4 {
                let a = &mut acc_r[c % A];
                *a = load(&tail[8 * c..]).mul_add(load(&wt[8 * c..]), *a);
            }
        }
    }
    std::array::from_fn(|r| acc[r].iter().fold(f32x8::ZERO, |s, v| s + *v).reduce_add())
}

/// Computes rows `j0..j0 + out_t.len() / m` of `out^T` (column-major: `out_t[j * m + i]`).
#[inline(always)]
fn matmul_cols<D: Decode>(x: &[f32], m: usize, w: &WeightView, j0: usize, out_t: &mut [f32]) {
    let k = w.cols;
    let mut i = 0;
    while i < m {
        let left = m - i;
        if left >= TILE {
            let xt = XTile::<TILE>::new(x, k, i);
            for (jj, o) in out_t.chunks_exact_mut(m).enumerate() {
                let d = dot_tile::<D, TILE, 1>(w.ty, w.row(j0 + jj), &xt, k);
                o[i..i + TILE].copy_from_slice(&d);
            }
            i += TILE;
        } else if left >= 2 {
            let xt = XTile::<2>::new(x, k, i);
            for (jj, o) in out_t.chunks_exact_mut(m).enumerate() {
                let d = dot_tile::<D, 2, 2>(w.ty, w.row(j0 + jj), &xt, k);
                o[i..i + 2].copy_from_slice(&d);
            }
            i += 2;
        } else {
            let xt = XTile::<1>::new(x, k, i);
            for (jj, o) in out_t.chunks_exact_mut(m).enumerate() {
                o[i] = dot_tile::<D, 1, 4>(w.ty, w.row(j0 + jj), &xt, k)[0];
            }
            i += 1;
        }
    }
}

/// [`matmul_cols`] compiled for the best instruction set this CPU has (checked
/// once at run time), so one binary runs everywhere and fast where it can. AVX2
/// at most: the `wide` code and the row dot are 8 lanes wide.
#[inline(always)]
fn cols<D: Decode>(x: &[f32], m: usize, w: &WeightView, j0: usize, out_t: &mut [f32]) {
    let task = Cols::<D> {
        x,
        m,
        w,
        j0,
        out_t,
        decode: PhantomData,
    };
    // Not `isa::run`: only these two tokens are built for this path.
    #[cfg(target_arch = "x86_64")]
    if super::dispatch::level() >= Level::Avx2 {
        // SAFETY: level() reported AVX2, FMA and F16C on this CPU.
        unsafe { Avx2::<false>::new().enter(task) };
        return;
    }
    // SAFETY: the portable kernel has no contract.
    unsafe { Portable.enter(task) }
}

struct Cols<'a, D> {
    x: &'a [f32],
    m: usize,
    w: &'a WeightView<'a>,
    j0: usize,
    out_t: &'a mut [f32],
    decode: PhantomData<D>,
}

impl<D: Decode> Kernel for Cols<'_, D> {
    type Out = ();
    #[inline(always)]
    unsafe fn run<C: Cpu>(self, c: C) {
        let Cols {
            x, m, w, j0, out_t, ..
        } = self;
        // Decode streams each weight row once: the quantized types get
        // hand-written block dots where the level has them (f32 activations,
        // so results match the portable path up to summation order).
        if C::ROW_DOT && m == 1 {
            for (jj, o) in out_t.iter_mut().enumerate() {
                *o = c.dot_row(w.ty, w.row(j0 + jj), x, w.cols);
            }
            return;
        }
        matmul_cols::<D>(x, m, w, j0, out_t)
    }
}

thread_local! {
    /// Transposed-output scratch for `m > 1`, kept between calls so steady-state
    /// matmuls do not allocate. Taken out (not borrowed) while in use, so a nested
    /// call on the same thread (rayon work stealing) just gets a fresh buffer.
    static SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

pub(crate) fn matmul(x: &[f32], m: usize, w: WeightView, bias: Option<&[f32]>, out: &mut [f32]) {
    check_matmul(x, m, &w, bias, out);
    match w.ty {
        QuantType::F32 => run::<F32>(x, m, &w, bias, out),
        QuantType::F16 => run::<F16>(x, m, &w, bias, out),
        QuantType::BF16 => run::<Bf16>(x, m, &w, bias, out),
        QuantType::Q8_0 => run::<Q8>(x, m, &w, bias, out),
        QuantType::Q4_0 => run::<Q4>(x, m, &w, bias, out),
    }
}

fn run<D: Decode>(x: &[f32], m: usize, w: &WeightView, bias: Option<&[f32]>, out: &mut [f32]) {
    let n = w.rows;
    if m == 0 || n == 0 {
        return;
    }
    // A few chunks per thread so uneven progress balances out.
    let chunk = n.div_ceil(4 * rayon::current_num_threads()).max(4);
    if m == 1 {
        // out is [1, n]: already column-major.
        out.par_chunks_mut(chunk).enumerate().for_each(|(c, o)| {
            cols::<D>(x, 1, w, c * chunk, o);
        });
    } else {
        let mut out_t = SCRATCH.take();
        out_t.resize(m * n, 0.0);
        out_t
            .par_chunks_mut(chunk * m)
            .enumerate()
            .for_each(|(c, o)| {
                cols::<D>(x, m, w, c * chunk, o);
            });
        out.par_chunks_mut(n).enumerate().for_each(|(i, o)| {
            for (j, v) in o.iter_mut().enumerate() {
                *v = out_t[j * m + i];
            }
        });
        SCRATCH.set(out_t);
    }
    if let Some(b) = bias {
        out.par_chunks_mut(n)
            .for_each(|o| super::add_assign_serial(o, b));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every one of the 65536 f16 bit patterns (subnormals, inf, NaN included)
    /// decodes as `half` does.
    #[test]
    fn f16_decode_all_bit_patterns() {
        for base in (0..=u16::MAX as u32).step_by(8) {
            let h = u32x8::new(std::array::from_fn(|t| base + t as u32));
            let got = f16x8_to_f32(h);
            for t in 0..8 {
                let want = f16::from_bits((base + t as u32) as u16).to_f32();
                let g = got.as_array()[t];
                assert!(
                    g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                    "f16 {:#06x}: got {g} want {want}",
                    base + t as u32
                );
            }
        }
    }
}
