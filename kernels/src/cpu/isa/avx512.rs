//! AVX-512 F/BW/VL/DQ, with or without VNNI and BF16: the [`Avx512`] tokens
//! (`Level::Avx512`, `Level::Avx512Vnni` and `Level::Avx512Bf16`) on `__m512`,
//! the `#[target_feature]` functions their kernels are entered through, the
//! 16-lane `exp` and GELU, and the vector activation-block quantizer.

use std::arch::x86_64::*;

use half::f16;

use super::{avx2, cephes, BlockQuantizer, Cpu, Kernel, Panel, Simd, PANEL};

/// AVX-512 F/BW/VL/DQ on `__m512`; `VNNI` picks `vpdpbusd` over `maddubs` +
/// `madd` for the int8 dots, `BF16` (with `VNNI`) `vdpbf16ps` for the BF16
/// dots. Only [`Cpu::new`] makes one.
#[derive(Clone, Copy)]
pub(crate) struct Avx512<const VNNI: bool, const BF16: bool = false>(());

impl<const VNNI: bool, const BF16: bool> Cpu for Avx512<VNNI, BF16> {
    const QUANTIZE_ACT_BLOCK: BlockQuantizer = |x, q| {
        // SAFETY: a token's constants are only read for a supported level.
        unsafe { quantize_act_block_avx512(x, q) }
    };
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL/DQ (and AVX2, FMA, F16C), AVX-512 VNNI for
    /// `VNNI`, AVX-512 BF16 for `BF16`.
    #[inline(always)]
    unsafe fn new() -> Self {
        Avx512(())
    }
    #[inline(always)]
    unsafe fn enter<K: Kernel>(self, k: K) -> K::Out {
        if BF16 {
            enter_avx512bf16(k)
        } else if VNNI {
            enter_avx512vnni(k)
        } else {
            enter_avx512(k)
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn enter_avx512<K: Kernel>(k: K) -> K::Out {
    k.run(Avx512::<false>(()))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
unsafe fn enter_avx512vnni<K: Kernel>(k: K) -> K::Out {
    k.run(Avx512::<true>(()))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16,avx2,fma,f16c")]
unsafe fn enter_avx512bf16<K: Kernel>(k: K) -> K::Out {
    k.run(Avx512::<true, true>(()))
}

/// `vdpbf16ps`: 16 lanes of `acc + w_odd * x_odd + w_even * x_even` against
/// the broadcast activation pair `*x`. Only reached inside
/// [`enter_avx512bf16`]'s kernels (the `BF16` token), where it inlines.
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn dpbf16(acc: __m512, w: *const u8, x: *const u32) -> __m512 {
    let w: __m512bh = std::mem::transmute(_mm512_loadu_si512(w as *const _));
    let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(*x as i32));
    _mm512_dpbf16_ps(acc, w, x)
}

// SAFETY (every `unsafe` block below): an `Avx512` exists only on a CPU with
// AVX-512F (see `new`), and the intrinsics only touch registers.
impl<const VNNI: bool, const BF16: bool> Simd for Avx512<VNNI, BF16> {
    type V = __m512;
    const LANES: usize = 16;
    #[inline(always)]
    fn zero(self) -> __m512 {
        unsafe { _mm512_setzero_ps() }
    }
    #[inline(always)]
    fn splat(self, x: f32) -> __m512 {
        unsafe { _mm512_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(self, p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32, v: __m512) {
        _mm512_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn load_h(self, p: *const f16) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
    }
    #[inline(always)]
    unsafe fn store_h(self, p: *mut f16, v: __m512) {
        _mm256_storeu_si256(p.cast(), _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v))
    }
    #[inline(always)]
    fn add(self, a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_add_ps(a, b) }
    }
    #[inline(always)]
    fn sub(self, a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_sub_ps(a, b) }
    }
    #[inline(always)]
    fn mul(self, a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_mul_ps(a, b) }
    }
    #[inline(always)]
    fn max(self, a: __m512, b: __m512) -> __m512 {
        // vmaxps returns its second operand when either is NaN.
        unsafe { _mm512_max_ps(a, b) }
    }
    #[inline(always)]
    fn fma(self, a: __m512, b: __m512, c: __m512) -> __m512 {
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }
    /// As the AVX2 `exp`, 16 lanes.
    #[inline(always)]
    fn exp(self, x: __m512) -> __m512 {
        unsafe { exp16(x) }
    }
    #[inline(always)]
    fn mask_after(self, x: __m512, pos: __m512, key: f32) -> __m512 {
        unsafe {
            let after = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(pos, _mm512_set1_ps(key));
            _mm512_mask_blend_ps(after, x, _mm512_set1_ps(f32::NEG_INFINITY))
        }
    }
    #[inline(always)]
    fn reduce_add(self, v: __m512) -> f32 {
        unsafe { _mm512_reduce_add_ps(v) }
    }
    #[inline(always)]
    fn reduce_max(self, v: __m512) -> f32 {
        unsafe { _mm512_reduce_max_ps(v) }
    }
    #[inline(always)]
    unsafe fn transpose8(
        self,
        src: *const f32,
        src_stride: usize,
        dst: *mut f32,
        dst_stride: usize,
        mul: &[f32; 8],
    ) {
        avx2::transpose8(src, src_stride, dst, dst_stride, mul)
    }
}

/// Cephes `expf` on 16 lanes: `e^x = 2^n e^r`, `n = round(x log2 e)`,
/// `|r| <= ln2 / 2`, `e^r` by a degree-7 polynomial; about 1 ulp. Arguments
/// are clamped to [-86.5, 88] first so no lane builds a subnormal or garbage
/// exponent (both slow), and lanes below -86.5 (`e^x < 3e-38`, nothing next
/// to a softmax sum of at least 1) become 0. NaN stays NaN.
///
/// # Safety
/// AVX-512 F must be present (callers run inside AVX-512 kernels).
#[inline(always)]
unsafe fn exp16(x: __m512) -> __m512 {
    let lo = _mm512_set1_ps(cephes::EXP_LO);
    // minps/maxps return the second operand for NaN: keep x there.
    let xc = _mm512_max_ps(lo, _mm512_min_ps(_mm512_set1_ps(cephes::EXP_HI), x));
    let keep = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, lo);
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(xc, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(cephes::LN2_HI), xc);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(cephes::LN2_LO), r);
    let mut p = _mm512_set1_ps(cephes::EXP_POLY[0]);
    for c in &cephes::EXP_POLY[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
    }
    let y = _mm512_add_ps(
        _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
        _mm512_set1_ps(1.0),
    );
    let e = _mm512_slli_epi32::<23>(_mm512_add_epi32(
        _mm512_cvtps_epi32(n),
        _mm512_set1_epi32(127),
    ));
    _mm512_maskz_mov_ps(keep, _mm512_mul_ps(y, _mm512_castsi512_ps(e)))
}

/// `math::gelu_tanh8` on 16 lanes in place, with [`exp16`]: the matmul
/// epilogue of the AVX-512 kernels (`wide`'s 8-lane exp is an SSE2 call).
///
/// # Safety
/// AVX-512 F must be present.
#[inline(always)]
unsafe fn gelu_tanh16(v: &mut [f32; 16]) {
    let x = _mm512_loadu_ps(v.as_ptr());
    let u = _mm512_mul_ps(
        _mm512_mul_ps(_mm512_set1_ps(0.797_884_6), x),
        _mm512_fmadd_ps(
            _mm512_mul_ps(_mm512_set1_ps(0.044715), x),
            x,
            _mm512_set1_ps(1.0),
        ),
    );
    let e = exp16(_mm512_mul_ps(_mm512_set1_ps(-2.0), u));
    _mm512_storeu_ps(
        v.as_mut_ptr(),
        _mm512_div_ps(x, _mm512_add_ps(e, _mm512_set1_ps(1.0))),
    );
}

/// One 512-bit register per 16 lanes; `VNNI` picks `vpdpbusd` over
/// `maddubs` + `madd`.
impl<const VNNI: bool, const BF16: bool> Panel for Avx512<VNNI, BF16> {
    type I = __m512i;
    type F = __m512;
    /// `(|w|, w)` for `maddubs`, `(w + 128, _)` for `vpdpbusd`
    type W = (__m512i, __m512i);
    const FLOAT_MR: usize = 8;
    /// 12 rows x (one accumulator + one f32 sum) + a weight vector and the
    /// scales: 26 of the 32 zmm registers.
    const INT8_MR: usize = 12;
    const Q8_UNSIGNED: bool = VNNI;
    #[inline(always)]
    unsafe fn fzero() -> __m512 {
        _mm512_setzero_ps()
    }
    #[inline(always)]
    unsafe fn izero() -> __m512i {
        _mm512_setzero_si512()
    }
    #[inline(always)]
    unsafe fn bcast_i32(p: *const i32) -> __m512i {
        _mm512_set1_epi32(*p)
    }
    #[inline(always)]
    unsafe fn load_q(p: *const u8) -> __m512i {
        _mm512_loadu_si512(p as *const _)
    }
    #[inline(always)]
    unsafe fn nibbles(v: __m512i) -> (__m512i, __m512i) {
        let m = _mm512_set1_epi8(0x0f);
        (
            _mm512_and_si512(v, m),
            _mm512_and_si512(_mm512_srli_epi16(v, 4), m),
        )
    }
    #[inline(always)]
    unsafe fn bcast4(p: *const i8) -> __m512i {
        _mm512_set1_epi32(std::ptr::read_unaligned(p as *const i32))
    }
    #[inline(always)]
    unsafe fn dot_us(acc: __m512i, u: __m512i, s: __m512i) -> __m512i {
        if VNNI {
            _mm512_dpbusd_epi32(acc, u, s)
        } else {
            let pairs = _mm512_maddubs_epi16(u, s);
            _mm512_add_epi32(acc, _mm512_madd_epi16(pairs, _mm512_set1_epi16(1)))
        }
    }
    #[inline(always)]
    unsafe fn q8_prep(wu: __m512i) -> (__m512i, __m512i) {
        if VNNI {
            (wu, wu)
        } else {
            let w = _mm512_xor_si512(wu, _mm512_set1_epi8(-128));
            (_mm512_abs_epi8(w), w)
        }
    }
    #[inline(always)]
    unsafe fn q8_dot(acc: __m512i, w: (__m512i, __m512i), x: __m512i) -> __m512i {
        if VNNI {
            Self::dot_us(acc, w.0, x)
        } else {
            let neg = _mm512_movepi8_mask(w.1);
            let xs = _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x);
            Self::dot_us(acc, w.0, xs)
        }
    }
    #[inline(always)]
    unsafe fn iadd(a: __m512i, b: __m512i) -> __m512i {
        _mm512_add_epi32(a, b)
    }
    #[inline(always)]
    unsafe fn scales(p: *const u8) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
    #[inline(always)]
    unsafe fn fma_block(facc: __m512, acc: __m512i, dw: __m512, dx: *const f32) -> __m512 {
        let s = _mm512_mul_ps(dw, _mm512_set1_ps(*dx));
        _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), s, facc)
    }
    #[inline(always)]
    unsafe fn weights_f16(p: *const u8) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
    #[inline(always)]
    unsafe fn bf16_pair(p: *const u8) -> (__m512, __m512) {
        let v = _mm512_loadu_si512(p as *const _);
        (
            _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)),
            _mm512_castsi512_ps(_mm512_and_si512(
                v,
                _mm512_set1_epi32(0xffff_0000u32 as i32),
            )),
        )
    }
    #[inline(always)]
    unsafe fn dot_bf16(acc: __m512, w: *const u8, x: *const u32) -> __m512 {
        if BF16 {
            dpbf16(acc, w, x)
        } else {
            let (even, odd) = Self::bf16_pair(w);
            let xo = _mm512_set1_ps(f32::from_bits(*x & 0xffff_0000));
            let xe = _mm512_set1_ps(f32::from_bits(*x << 16));
            _mm512_fmadd_ps(xe, even, _mm512_fmadd_ps(xo, odd, acc))
        }
    }
    #[inline(always)]
    unsafe fn bcast_f32(x: *const f32) -> __m512 {
        _mm512_set1_ps(*x)
    }
    #[inline(always)]
    unsafe fn fmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn fadd(a: __m512, b: __m512) -> __m512 {
        _mm512_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn load_f(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store_f(p: *mut f32, v: __m512) {
        _mm512_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn prefetch(p: *const u8, l2: bool) {
        if l2 {
            _mm_prefetch::<_MM_HINT_T1>(p as *const i8)
        } else {
            _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
        }
    }
    /// With [`exp16`] (`wide`'s 8-lane exp is an SSE2 call).
    #[inline(always)]
    unsafe fn gelu_tanh(v: &mut [f32; PANEL]) {
        gelu_tanh16(v)
    }
}

/// [`quantize_act_block`](crate::quant::quantize_act_block) on two zmm
/// registers, bit for bit: the same scale arithmetic, and `round` (half away
/// from zero) as `trunc(v + copysign(0.49999997, v))`, exact for every f32.
/// Blocks with a NaN or an infinity take the scalar path (its saturating
/// casts define them).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
unsafe fn quantize_act_block_avx512(x: &[f32; 32], q: &mut [i8; 32]) -> (f32, i32) {
    let a = _mm512_loadu_ps(x.as_ptr());
    let b = _mm512_loadu_ps(x.as_ptr().add(16));
    let (aa, ab) = (_mm512_abs_ps(a), _mm512_abs_ps(b));
    let inf = _mm512_set1_ps(f32::INFINITY);
    // not (|v| < inf): NaN or infinite
    if (_mm512_cmp_ps_mask::<_CMP_NLT_UQ>(aa, inf) | _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(ab, inf))
        != 0
    {
        return crate::quant::quantize_act_block(x, q);
    }
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(aa, ab));
    let d = amax / 127.0;
    let id = _mm512_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
    let round = |v: __m512| {
        let v = _mm512_mul_ps(v, id);
        let sign = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(i32::MIN));
        let half = _mm512_or_si512(sign, _mm512_castps_si512(_mm512_set1_ps(0.49999997)));
        let t = _mm512_add_ps(v, _mm512_castsi512_ps(half));
        _mm512_cvttps_epi32(t)
    };
    let (qa, qb) = (round(a), round(b));
    _mm_storeu_si128(q.as_mut_ptr() as *mut __m128i, _mm512_cvtepi32_epi8(qa));
    _mm_storeu_si128(
        q.as_mut_ptr().add(16) as *mut __m128i,
        _mm512_cvtepi32_epi8(qb),
    );
    (d, _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)))
}
