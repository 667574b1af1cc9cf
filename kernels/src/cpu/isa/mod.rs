//! The one SIMD abstraction of the CPU kernels: a zero-sized token type per
//! dispatch level, implementing the vector traits the kernels are written over.
//!
//! * [`Simd`]: `LANES`-wide f32 vectors (8 or 16 lanes): arithmetic, `exp`,
//!   masks, reductions, f16 widening and narrowing, 8×8 transposes. Attention
//!   and the KV stores use it.
//! * [`Panel`]: 16 lanes, one per weight row of a packed panel ([`PANEL`]):
//!   int8 dots, Q4_0 nibbles, f16 scales, F16/BF16 weight widening, broadcast
//!   FMAs. The packed matmuls (`gemm`) use it; the micro-tile heights that
//!   differ per level are its associated constants.
//! * [`Cpu`]: the token of one level. Only [`Cpu::new`] (unsafe: the caller
//!   checked the CPU) makes one, and [`Cpu::enter`] runs a [`Kernel`] inside a
//!   function built with the level's `#[target_feature]`s, so that the generic
//!   kernel (all `#[inline(always)]` down to the intrinsics) is compiled there
//!   with the level's instructions. [`run`] maps a [`Level`] to its token.
//!
//! Tokens: [`Portable`] (plain arrays and `wide`, whatever the build targets),
//! [`Avx2<false>`](Avx2) (AVX2 + FMA + F16C), `Avx2<true>` (+ AVX-VNNI),
//! [`Avx512<false>`](Avx512) (AVX-512 F/BW/VL/DQ), `Avx512<true>` (+ VNNI; also
//! `Level::Avx512Bf16`, which adds nothing yet). Every intrinsic of the CPU
//! kernels lives in the file of its instruction set.

use half::f16;

use super::dispatch::Level;
use crate::quant::quantize_act_block;
use crate::{QuantType, QK};

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod portable;

#[cfg(target_arch = "x86_64")]
pub(crate) use avx2::Avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) use avx512::Avx512;
pub(crate) use portable::Portable;

/// Weight rows per panel of the packed matmuls (the lanes of a `Panel` vector).
pub const PANEL: usize = 16;

/// The f32 vector operations of attention and the KV stores. Implementations are
/// the level tokens: only a token that exists may run its (safe) methods.
pub(crate) trait Simd: Copy {
    type V: Copy;
    const LANES: usize;
    fn zero(self) -> Self::V;
    fn splat(self, x: f32) -> Self::V;
    /// # Safety
    /// `p` is valid for reading `LANES` floats.
    unsafe fn load(self, p: *const f32) -> Self::V;
    /// # Safety
    /// `p` is valid for writing `LANES` floats.
    unsafe fn store(self, p: *mut f32, v: Self::V);
    /// `LANES` halves from `p`, widened (exactly) to f32.
    ///
    /// # Safety
    /// `p` is valid for reading `LANES` halves.
    unsafe fn load_h(self, p: *const f16) -> Self::V;
    /// `v` rounded to f16 (nearest even, as `f16::from_f32`), stored at `p`.
    ///
    /// # Safety
    /// `p` is valid for writing `LANES` halves.
    unsafe fn store_h(self, p: *mut f16, v: Self::V);
    fn add(self, a: Self::V, b: Self::V) -> Self::V;
    fn sub(self, a: Self::V, b: Self::V) -> Self::V;
    fn mul(self, a: Self::V, b: Self::V) -> Self::V;
    /// Lane-wise max; a NaN in `b` propagates.
    fn max(self, a: Self::V, b: Self::V) -> Self::V;
    /// `a * b + c`
    fn fma(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `e^x` for `x <= 0` (softmax arguments); 0 below about -86, so `e^-inf = 0`.
    fn exp(self, x: Self::V) -> Self::V;
    /// `x`, with `-inf` in the lanes where `pos < key` (keys after the row).
    fn mask_after(self, x: Self::V, pos: Self::V, key: f32) -> Self::V;
    fn reduce_add(self, v: Self::V) -> f32;
    fn reduce_max(self, v: Self::V) -> f32;

    /// Transposes an 8×8 block: `dst[i * dst_stride + j] = src[j * src_stride + i] *
    /// mul[i]`.
    ///
    /// # Safety
    /// Both blocks are in bounds.
    #[inline(always)]
    unsafe fn transpose8(
        self,
        src: *const f32,
        src_stride: usize,
        dst: *mut f32,
        dst_stride: usize,
        mul: &[f32; 8],
    ) {
        for (i, &m) in mul.iter().enumerate() {
            for j in 0..8 {
                *dst.add(i * dst_stride + j) = *src.add(j * src_stride + i) * m;
            }
        }
    }
}

/// The vector operations of the packed matmuls, over 16 i32 / f32 lanes (one
/// panel's rows): one 512-bit register, two 256-bit ones, or plain arrays.
///
/// # Safety (every method)
/// Called only inside a kernel entered through the implementing token
/// ([`Cpu::enter`]); pointers are valid for what the method reads or writes.
pub(crate) trait Panel {
    type I: Copy;
    type F: Copy;
    /// A Q8_0 weight vector made ready for [`Panel::q8_dot`].
    type W: Copy;
    /// Activation rows per micro-tile of the F16/BF16 kernel.
    const FLOAT_MR: usize;
    /// Activation rows per micro-tile of the int8 kernels (the group height of
    /// `QuantizedActs`).
    const INT8_MR: usize;
    /// Whether the int8 kernels dot Q8_0 weights as stored (`w + 128`,
    /// unsigned) against signed activations (`vpdpbusd`, and the portable
    /// path); the `maddubs` paths cannot (u8 x s8 pairs would saturate 16
    /// bits) and restore the sign first.
    const Q8_UNSIGNED: bool;

    unsafe fn fzero() -> Self::F;
    unsafe fn izero() -> Self::I;
    /// One i32 repeated in every lane.
    unsafe fn bcast_i32(p: *const i32) -> Self::I;
    /// 64 bytes of a panel's quant vector.
    unsafe fn load_q(p: *const u8) -> Self::I;
    /// Low and high nibbles of every byte.
    unsafe fn nibbles(v: Self::I) -> (Self::I, Self::I);
    /// 4 activation bytes repeated in every lane.
    unsafe fn bcast4(p: *const i8) -> Self::I;
    /// Per lane: `acc + sum of 4 u8 x s8 products` (`u` is at most 15 here).
    unsafe fn dot_us(acc: Self::I, u: Self::I, s: Self::I) -> Self::I;
    /// Stored Q8_0 weights (`w + 128`) ready for dots.
    unsafe fn q8_prep(wu: Self::I) -> Self::W;
    /// `acc + dot(w + 128, x)` where [`Panel::Q8_UNSIGNED`], else `acc + dot(w, x)`.
    unsafe fn q8_dot(acc: Self::I, w: Self::W, x: Self::I) -> Self::I;
    unsafe fn iadd(a: Self::I, b: Self::I) -> Self::I;
    /// 16 f16 scales.
    unsafe fn scales(p: *const u8) -> Self::F;
    /// `facc + f32(acc) * dw * dx`.
    unsafe fn fma_block(facc: Self::F, acc: Self::I, dw: Self::F, dx: *const f32) -> Self::F;

    /// The 16 stored F16 weights of one element as f32.
    unsafe fn weights_f16(p: *const u8) -> Self::F;
    /// The 16 stored BF16 weights of elements `2q` and `2q + 1` (64 bytes of
    /// the pair layout: row `r`'s two weights at `4r`), as f32: `(even, odd)`.
    unsafe fn bf16_pair(p: *const u8) -> (Self::F, Self::F);
    /// `acc + w_odd * x_odd + w_even * x_even` per lane (the odd product
    /// added first), for the 64 bytes of a weight pair at `w` and one
    /// activation pair `x` (two BF16 values, the even one in the low half):
    /// `vdpbf16ps`'s arithmetic, which the levels with it run natively.
    #[inline(always)]
    unsafe fn dot_bf16(acc: Self::F, w: *const u8, x: *const u32) -> Self::F {
        let (even, odd) = Self::bf16_pair(w);
        let xo = f32::from_bits(*x & 0xffff_0000);
        let xe = f32::from_bits(*x << 16);
        let acc = Self::fmadd(Self::bcast_f32(&xo), odd, acc);
        Self::fmadd(Self::bcast_f32(&xe), even, acc)
    }
    /// One f32 repeated in every lane.
    unsafe fn bcast_f32(x: *const f32) -> Self::F;
    /// `a * b + c`
    unsafe fn fmadd(a: Self::F, b: Self::F, c: Self::F) -> Self::F;
    unsafe fn fadd(a: Self::F, b: Self::F) -> Self::F;
    unsafe fn load_f(p: *const f32) -> Self::F;
    unsafe fn store_f(p: *mut f32, v: Self::F);

    /// A hint to fetch the cache line at `p` (which may be past the panel's
    /// end) into L1, or only into L2 with `l2`.
    #[inline(always)]
    unsafe fn prefetch(p: *const u8, l2: bool) {
        let _ = (p, l2);
    }

    /// Tanh-approximation GELU of one output tile row, in place (the matmul
    /// epilogue): `wide`'s 8 lanes unless the level has better.
    #[inline(always)]
    unsafe fn gelu_tanh(v: &mut [f32; PANEL]) {
        use super::math::{gelu_tanh8, load, store};
        for h in 0..PANEL / 8 {
            let y = gelu_tanh8(load(&v[8 * h..]));
            store(&mut v[8 * h..], y);
        }
    }
}

/// Quantizes one 32-block of activations: `(scale, sum of the quants)`.
pub(crate) type BlockQuantizer = fn(&[f32; QK], &mut [i8; QK]) -> (f32, i32);

/// The token of one dispatch level.
pub(crate) trait Cpu: Simd + Panel {
    /// [`quantize_act_block`], or a vector version of it with the same results.
    const QUANTIZE_ACT_BLOCK: BlockQuantizer = quantize_act_block;
    /// Whether [`Cpu::dot_row`] is there.
    const ROW_DOT: bool = false;

    /// # Safety
    /// The CPU supports the level.
    unsafe fn new() -> Self;

    /// Runs `k` with this token inside a function built for the level's
    /// instructions.
    ///
    /// # Safety
    /// `k`'s own contract holds.
    unsafe fn enter<K: Kernel>(self, k: K) -> K::Out;

    /// `sum_j w[j] * x[j]` over one stored row of unpacked weights (any type)
    /// and its `k` logical columns, with f32 activations: a hand-written decode
    /// dot where [`Cpu::ROW_DOT`].
    ///
    /// # Safety
    /// Only where `ROW_DOT`, inside a kernel entered through this token.
    #[inline(always)]
    unsafe fn dot_row(self, ty: QuantType, row: &[u8], x: &[f32], k: usize) -> f32 {
        let _ = (ty, row, x, k);
        unreachable!("no row dot on this level")
    }
}

/// A kernel written once over the level traits.
pub(crate) trait Kernel {
    type Out;
    /// Implementations are `#[inline(always)]`, so the whole kernel is built
    /// inside [`Cpu::enter`]'s `#[target_feature]` function.
    ///
    /// # Safety
    /// As the implementing kernel documents.
    unsafe fn run<C: Cpu>(self, cpu: C) -> Self::Out;
}

/// Runs `k` on `level`'s token.
///
/// # Safety
/// The CPU supports `level`, and `k`'s own contract holds.
#[inline]
pub(crate) unsafe fn run<K: Kernel>(level: Level, k: K) -> K::Out {
    #[cfg(target_arch = "x86_64")]
    match level {
        Level::Portable => Portable.enter(k),
        Level::Avx2 => Avx2::<false>::new().enter(k),
        Level::AvxVnni => Avx2::<true>::new().enter(k),
        Level::Avx512 => Avx512::<false>::new().enter(k),
        Level::Avx512Vnni => Avx512::<true>::new().enter(k),
        Level::Avx512Bf16 => Avx512::<true, true>::new().enter(k),
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = level;
        Portable.enter(k)
    }
}

/// What code outside the kernels needs to know of a level (to size buffers or
/// pick a function before entering one): its token's constants.
#[derive(Clone, Copy)]
pub(crate) struct Consts {
    /// [`Panel::INT8_MR`]
    pub int8_mr: usize,
    /// [`Panel::Q8_UNSIGNED`]
    pub q8_unsigned: bool,
    /// [`Cpu::QUANTIZE_ACT_BLOCK`]
    pub quantize_act_block: BlockQuantizer,
}

const fn consts_of<C: Cpu>() -> Consts {
    Consts {
        int8_mr: C::INT8_MR,
        q8_unsigned: C::Q8_UNSIGNED,
        quantize_act_block: C::QUANTIZE_ACT_BLOCK,
    }
}

/// [`Consts`] of `level`'s token (which [`run`] would enter).
pub(crate) const fn consts(level: Level) -> Consts {
    #[cfg(target_arch = "x86_64")]
    match level {
        Level::Portable => consts_of::<Portable>(),
        Level::Avx2 => consts_of::<Avx2<false>>(),
        Level::AvxVnni => consts_of::<Avx2<true>>(),
        Level::Avx512 => consts_of::<Avx512<false>>(),
        Level::Avx512Vnni => consts_of::<Avx512<true>>(),
        Level::Avx512Bf16 => consts_of::<Avx512<true, true>>(),
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = level;
        consts_of::<Portable>()
    }
}

/// A hint to fetch the cache line holding `p` into L1 (never faults).
#[inline(always)]
pub(crate) fn prefetch_line(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults, whatever the address; SSE is baseline.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Cephes `expf`'s argument range (lanes below `EXP_LO` become 0, above
/// `EXP_HI` are clamped), its split of `ln 2`, and its degree-7 polynomial
/// for `e^r` from the highest coefficient down (the AVX2 and AVX-512 `exp`).
#[cfg(target_arch = "x86_64")]
mod cephes {
    pub(super) const EXP_LO: f32 = -86.5;
    pub(super) const EXP_HI: f32 = 88.0;
    pub(super) const LN2_HI: f32 = 0.693_359_4;
    pub(super) const LN2_LO: f32 = -2.121_944_4e-4;
    pub(super) const EXP_POLY: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ];
}
