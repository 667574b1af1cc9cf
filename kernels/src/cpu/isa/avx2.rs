//! AVX2 + FMA + F16C, and AVX-VNNI: the [`Avx2`] tokens (`Level::Avx2`,
//! `Level::AvxVnni`) on `__m256` (two per 16-lane [`Panel`] vector), the
//! `#[target_feature]` functions their kernels are entered through, and the
//! decode row dot of unpacked weights ([`Cpu::dot_row`]).

use std::arch::x86_64::*;

use half::f16;

use super::{cephes, Cpu, Kernel, Panel, Simd};
use crate::quant::dequantize_row;
use crate::{QuantType, QK};

/// AVX2 + FMA + F16C on `__m256`; `VNNI` adds AVX-VNNI's 256-bit `vpdpbusd`
/// for the int8 dots. Only [`Cpu::new`] makes one.
#[derive(Clone, Copy)]
pub(crate) struct Avx2<const VNNI: bool>(());

impl<const VNNI: bool> Cpu for Avx2<VNNI> {
    const ROW_DOT: bool = true;
    /// # Safety
    /// The CPU has AVX2, FMA and F16C (every dispatch level above Portable),
    /// and AVX-VNNI for `VNNI`.
    #[inline(always)]
    unsafe fn new() -> Self {
        Avx2(())
    }
    #[inline(always)]
    unsafe fn enter<K: Kernel>(self, k: K) -> K::Out {
        if VNNI {
            enter_avxvnni(k)
        } else {
            enter_avx2(k)
        }
    }
    #[inline(always)]
    unsafe fn dot_row(self, ty: QuantType, row: &[u8], x: &[f32], k: usize) -> f32 {
        dot_row(ty, row, x, k)
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn enter_avx2<K: Kernel>(k: K) -> K::Out {
    k.run(Avx2::<false>(()))
}

#[target_feature(enable = "avxvnni,avx2,fma,f16c")]
unsafe fn enter_avxvnni<K: Kernel>(k: K) -> K::Out {
    k.run(Avx2::<true>(()))
}

// SAFETY (every `unsafe` block below): an `Avx2` exists only on a CPU with
// AVX2, FMA and F16C (see `new`), and the intrinsics only touch registers.
impl<const VNNI: bool> Simd for Avx2<VNNI> {
    type V = __m256;
    const LANES: usize = 8;
    #[inline(always)]
    fn zero(self) -> __m256 {
        unsafe { _mm256_setzero_ps() }
    }
    #[inline(always)]
    fn splat(self, x: f32) -> __m256 {
        unsafe { _mm256_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(self, p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32, v: __m256) {
        _mm256_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn load_h(self, p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }
    #[inline(always)]
    unsafe fn store_h(self, p: *mut f16, v: __m256) {
        _mm_storeu_si128(p.cast(), _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v))
    }
    #[inline(always)]
    fn add(self, a: __m256, b: __m256) -> __m256 {
        unsafe { _mm256_add_ps(a, b) }
    }
    #[inline(always)]
    fn sub(self, a: __m256, b: __m256) -> __m256 {
        unsafe { _mm256_sub_ps(a, b) }
    }
    #[inline(always)]
    fn mul(self, a: __m256, b: __m256) -> __m256 {
        unsafe { _mm256_mul_ps(a, b) }
    }
    #[inline(always)]
    fn max(self, a: __m256, b: __m256) -> __m256 {
        // maxps returns its second operand when either is NaN.
        unsafe { _mm256_max_ps(a, b) }
    }
    #[inline(always)]
    fn fma(self, a: __m256, b: __m256, c: __m256) -> __m256 {
        unsafe { _mm256_fmadd_ps(a, b, c) }
    }
    /// Cephes `expf` (see `avx512::exp16`), 8 lanes.
    #[inline(always)]
    fn exp(self, x: __m256) -> __m256 {
        unsafe { exp8(x) }
    }
    #[inline(always)]
    fn mask_after(self, x: __m256, pos: __m256, key: f32) -> __m256 {
        unsafe {
            let after = _mm256_cmp_ps::<_CMP_LT_OQ>(pos, _mm256_set1_ps(key));
            _mm256_blendv_ps(x, _mm256_set1_ps(f32::NEG_INFINITY), after)
        }
    }
    #[inline(always)]
    fn reduce_add(self, v: __m256) -> f32 {
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
        }
    }
    #[inline(always)]
    fn reduce_max(self, v: __m256) -> f32 {
        unsafe {
            let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)))
        }
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
        transpose8(src, src_stride, dst, dst_stride, mul)
    }
}

/// [`Simd::transpose8`] in 24 shuffles; needs AVX.
#[inline(always)]
pub(super) unsafe fn transpose8(
    src: *const f32,
    ss: usize,
    dst: *mut f32,
    ds: usize,
    mul: &[f32; 8],
) {
    let r = |j: usize| _mm256_loadu_ps(src.add(j * ss));
    let (r0, r1, r2, r3) = (r(0), r(1), r(2), r(3));
    let (r4, r5, r6, r7) = (r(4), r(5), r(6), r(7));
    let t0 = _mm256_unpacklo_ps(r0, r1);
    let t1 = _mm256_unpackhi_ps(r0, r1);
    let t2 = _mm256_unpacklo_ps(r2, r3);
    let t3 = _mm256_unpackhi_ps(r2, r3);
    let t4 = _mm256_unpacklo_ps(r4, r5);
    let t5 = _mm256_unpackhi_ps(r4, r5);
    let t6 = _mm256_unpacklo_ps(r6, r7);
    let t7 = _mm256_unpackhi_ps(r6, r7);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xee>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xee>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xee>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xee>(t5, t7);
    let out = [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ];
    for (i, &o) in out.iter().enumerate() {
        _mm256_storeu_ps(dst.add(i * ds), _mm256_mul_ps(o, _mm256_set1_ps(mul[i])));
    }
}

/// `avx512::exp16` on 8 lanes.
///
/// # Safety
/// AVX2 and FMA must be present (callers run inside AVX2 kernels).
#[inline(always)]
pub(super) unsafe fn exp8(x: __m256) -> __m256 {
    let lo = _mm256_set1_ps(cephes::EXP_LO);
    let xc = _mm256_max_ps(lo, _mm256_min_ps(_mm256_set1_ps(cephes::EXP_HI), x));
    let keep = _mm256_cmp_ps::<_CMP_NLT_UQ>(x, lo);
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        xc,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(cephes::LN2_HI), xc);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(cephes::LN2_LO), r);
    let mut p = _mm256_set1_ps(cephes::EXP_POLY[0]);
    for c in &cephes::EXP_POLY[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
    }
    let y = _mm256_add_ps(
        _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
        _mm256_set1_ps(1.0),
    );
    let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(e)), keep)
}

type I2 = [__m256i; 2];
type F2 = [__m256; 2];

/// Two 256-bit registers per 16 lanes; `VNNI` picks AVX-VNNI's `vpdpbusd`.
impl<const VNNI: bool> Panel for Avx2<VNNI> {
    type I = I2;
    type F = F2;
    /// `(|w|, w)` for `maddubs`, `(w + 128, _)` for `vpdpbusd`
    type W = (I2, I2);
    const FLOAT_MR: usize = 3;
    const INT8_MR: usize = 2;
    const Q8_UNSIGNED: bool = VNNI;
    #[inline(always)]
    unsafe fn fzero() -> F2 {
        [_mm256_setzero_ps(); 2]
    }
    #[inline(always)]
    unsafe fn izero() -> I2 {
        [_mm256_setzero_si256(); 2]
    }
    #[inline(always)]
    unsafe fn bcast_i32(p: *const i32) -> I2 {
        [_mm256_set1_epi32(*p); 2]
    }
    #[inline(always)]
    unsafe fn load_q(p: *const u8) -> I2 {
        [
            _mm256_loadu_si256(p as *const __m256i),
            _mm256_loadu_si256(p.add(32) as *const __m256i),
        ]
    }
    #[inline(always)]
    unsafe fn nibbles(v: I2) -> (I2, I2) {
        let m = _mm256_set1_epi8(0x0f);
        let lo = v.map(|h| _mm256_and_si256(h, m));
        let hi = v.map(|h| _mm256_and_si256(_mm256_srli_epi16(h, 4), m));
        (lo, hi)
    }
    #[inline(always)]
    unsafe fn bcast4(p: *const i8) -> I2 {
        [_mm256_set1_epi32(std::ptr::read_unaligned(p as *const i32)); 2]
    }
    #[inline(always)]
    unsafe fn dot_us(acc: I2, u: I2, s: I2) -> I2 {
        std::array::from_fn(|h| {
            if VNNI {
                _mm256_dpbusd_avx_epi32(acc[h], u[h], s[h])
            } else {
                let pairs = _mm256_maddubs_epi16(u[h], s[h]);
                _mm256_add_epi32(acc[h], _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
            }
        })
    }
    #[inline(always)]
    unsafe fn q8_prep(wu: I2) -> (I2, I2) {
        if VNNI {
            (wu, wu)
        } else {
            let w = wu.map(|h| _mm256_xor_si256(h, _mm256_set1_epi8(-128)));
            (w.map(|h| _mm256_sign_epi8(h, h)), w)
        }
    }
    #[inline(always)]
    unsafe fn q8_dot(acc: I2, w: (I2, I2), x: I2) -> I2 {
        if VNNI {
            Self::dot_us(acc, w.0, x)
        } else {
            let xs = std::array::from_fn(|h| _mm256_sign_epi8(x[h], w.1[h]));
            Self::dot_us(acc, w.0, xs)
        }
    }
    #[inline(always)]
    unsafe fn iadd(a: I2, b: I2) -> I2 {
        std::array::from_fn(|h| _mm256_add_epi32(a[h], b[h]))
    }
    #[inline(always)]
    unsafe fn scales(p: *const u8) -> F2 {
        [
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
            _mm256_cvtph_ps(_mm_loadu_si128(p.add(16) as *const __m128i)),
        ]
    }
    #[inline(always)]
    unsafe fn fma_block(facc: F2, acc: I2, dw: F2, dx: *const f32) -> F2 {
        let dx = _mm256_set1_ps(*dx);
        std::array::from_fn(|h| {
            _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(acc[h]),
                _mm256_mul_ps(dw[h], dx),
                facc[h],
            )
        })
    }
    #[inline(always)]
    unsafe fn weights_f16(p: *const u8) -> F2 {
        std::array::from_fn(|h| _mm256_cvtph_ps(_mm_loadu_si128(p.add(16 * h) as *const __m128i)))
    }
    #[inline(always)]
    unsafe fn bf16_pair(p: *const u8) -> (F2, F2) {
        let v: [__m256i; 2] =
            std::array::from_fn(|h| _mm256_loadu_si256(p.add(32 * h) as *const __m256i));
        let hi = _mm256_set1_epi32(0xffff_0000u32 as i32);
        (
            v.map(|v| _mm256_castsi256_ps(_mm256_slli_epi32(v, 16))),
            v.map(|v| _mm256_castsi256_ps(_mm256_and_si256(v, hi))),
        )
    }
    #[inline(always)]
    unsafe fn bcast_f32(x: *const f32) -> F2 {
        [_mm256_broadcast_ss(&*x); 2]
    }
    #[inline(always)]
    unsafe fn fmadd(a: F2, b: F2, c: F2) -> F2 {
        std::array::from_fn(|h| _mm256_fmadd_ps(a[h], b[h], c[h]))
    }
    #[inline(always)]
    unsafe fn fadd(a: F2, b: F2) -> F2 {
        std::array::from_fn(|h| _mm256_add_ps(a[h], b[h]))
    }
    #[inline(always)]
    unsafe fn load_f(p: *const f32) -> F2 {
        [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))]
    }
    #[inline(always)]
    unsafe fn store_f(p: *mut f32, v: F2) {
        _mm256_storeu_ps(p, v[0]);
        _mm256_storeu_ps(p.add(8), v[1]);
    }
    #[inline(always)]
    unsafe fn prefetch(p: *const u8, l2: bool) {
        if l2 {
            _mm_prefetch::<_MM_HINT_T1>(p as *const i8)
        } else {
            _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scale(b: &[u8]) -> __m256 {
    let h = u16::from_le_bytes([b[0], b[1]]);
    _mm256_set1_ps(_mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32))))
}

/// `sum_j w[j] * x[j]` over the row's `k` logical columns.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_row(ty: QuantType, row: &[u8], x: &[f32], k: usize) -> f32 {
    let nb = k / QK;
    // bytes per 32 elements (one block, or 32 plain floats)
    let bb = ty.row_bytes(QK);
    let mut acc = _mm256_setzero_ps();
    let xp = x.as_ptr();
    for b in 0..nb {
        let blk = &row[b * bb..(b + 1) * bb];
        let xb = xp.add(b * QK);
        let mut s = _mm256_setzero_ps();
        let p = blk.as_ptr();
        match ty {
            QuantType::F32 => {
                for c in 0..4 {
                    let w = _mm256_loadu_ps(p.add(32 * c) as *const f32);
                    acc = _mm256_fmadd_ps(w, _mm256_loadu_ps(xb.add(8 * c)), acc);
                }
                continue;
            }
            QuantType::F16 => {
                for c in 0..4 {
                    let h = _mm_loadu_si128(p.add(16 * c) as *const __m128i);
                    let w = _mm256_cvtph_ps(h);
                    acc = _mm256_fmadd_ps(w, _mm256_loadu_ps(xb.add(8 * c)), acc);
                }
                continue;
            }
            QuantType::BF16 => {
                for c in 0..4 {
                    let h = _mm_loadu_si128(p.add(16 * c) as *const __m128i);
                    let w = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
                    acc = _mm256_fmadd_ps(w, _mm256_loadu_ps(xb.add(8 * c)), acc);
                }
                continue;
            }
            QuantType::Q4_0 | QuantType::Q8_0 => {}
        }
        if ty == QuantType::Q4_0 {
            let bytes = _mm_loadu_si128(blk.as_ptr().add(2) as *const __m128i);
            let mask = _mm_set1_epi8(0x0f);
            let lo = _mm_and_si128(bytes, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
            let eight = _mm256_set1_ps(8.0);
            for (half, nib) in [lo, hi].into_iter().enumerate() {
                let a = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(nib));
                let b8 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(nib, 8)));
                let x0 = _mm256_loadu_ps(xb.add(16 * half));
                let x1 = _mm256_loadu_ps(xb.add(16 * half + 8));
                s = _mm256_fmadd_ps(_mm256_sub_ps(a, eight), x0, s);
                s = _mm256_fmadd_ps(_mm256_sub_ps(b8, eight), x1, s);
            }
        } else {
            let q = blk.as_ptr().add(2);
            for c in 0..4 {
                let v = _mm_loadl_epi64(q.add(8 * c) as *const __m128i);
                let f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
                s = _mm256_fmadd_ps(f, _mm256_loadu_ps(xb.add(8 * c)), s);
            }
        }
        acc = _mm256_fmadd_ps(scale(blk), s, acc);
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
    let mut total: f32 = lanes.iter().sum();
    if !k.is_multiple_of(QK) {
        let mut wt = [0f32; QK];
        dequantize_row(ty, &row[nb * bb..], &mut wt[..k % QK]);
        for (wv, xv) in wt[..k % QK].iter().zip(&x[nb * QK..k]) {
            total += wv * xv;
        }
    }
    total
}
