//! Vectorised transcendental helpers for the CPU ops, on `wide::f32x8` (what
//! the build targets). The 16-lane AVX-512 `exp` and GELU, and AVX2's `exp`,
//! are in `isa`, with the other intrinsics.

use wide::f32x8;

#[inline(always)]
pub(crate) fn load(s: &[f32]) -> f32x8 {
    let a: [f32; 8] = s[..8].try_into().unwrap();
    f32x8::new(a)
}

#[inline(always)]
pub(crate) fn store(s: &mut [f32], v: f32x8) {
    s[..8].copy_from_slice(v.as_array());
}

/// Applies `f` to `x` eight lanes at a time; the tail goes through a zero-padded
/// vector so scalar and vector lanes share one code path (and one rounding).
#[inline(always)]
pub(crate) fn map_in_place(x: &mut [f32], f: impl Fn(f32x8) -> f32x8) {
    let mut chunks = x.chunks_exact_mut(8);
    for c in &mut chunks {
        store(c, f(load(c)));
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        let mut buf = [0.0f32; 8];
        buf[..rest.len()].copy_from_slice(rest);
        let y = f(f32x8::new(buf));
        rest.copy_from_slice(&y.as_array()[..rest.len()]);
    }
}

/// Horner evaluation with coefficients from the constant term up.
#[inline(always)]
fn poly(x: f32x8, c: &[f32]) -> f32x8 {
    let mut acc = f32x8::splat(c[c.len() - 1]);
    for &k in c[..c.len() - 1].iter().rev() {
        acc = acc.mul_add(x, f32x8::splat(k));
    }
    acc
}

/// `HF gelu_new`: `0.5 x (1 + tanh(u))` rewritten as `x / (1 + e^{-2u})`, which is the
/// same function without the cancellation of `1 + tanh(u)` for negative `u`.
#[inline(always)]
pub(crate) fn gelu_tanh8(x: f32x8) -> f32x8 {
    const C: f32 = 0.797_884_6; // sqrt(2/pi)
    let u = f32x8::splat(C) * x * (f32x8::splat(0.044715) * x * x + f32x8::ONE);
    x / ((f32x8::splat(-2.0) * u).exp() + f32x8::ONE)
}

/// Exact GELU `x * Phi(x)`.
#[inline(always)]
pub(crate) fn gelu_erf8(x: f32x8) -> f32x8 {
    x * phi8(x)
}

// The erf/erfc rational approximations below use the coefficients of Sun's fdlibm
// `s_erff.c` (as also used by FreeBSD and musl):
//
// Copyright (C) 1993 by Sun Microsystems, Inc. All rights reserved.
// Developed at SunPro, a Sun Microsystems, Inc. business.
// Permission to use, copy, modify, and distribute this software is freely granted,
// provided that this notice is preserved.
const ERX: f32 = 0.8450629;
const PP: [f32; 5] = [
    0.12837917,
    -0.3250421,
    -0.02848175,
    -0.0057702702,
    -2.3763017e-05,
];
const QQ: [f32; 6] = [
    1.0,
    0.3979172,
    0.06502225,
    0.005081306,
    1.3249474e-04,
    -3.9602282e-06,
];
const PA: [f32; 7] = [
    -0.0023621186,
    0.4148561,
    -0.37220788,
    0.31834662,
    -0.110894695,
    0.035478305,
    -0.0021663755,
];
const QA: [f32; 7] = [
    1.0,
    0.10642088,
    0.54039794,
    0.071828656,
    0.12617122,
    0.013637084,
    0.0119845,
];
// erfc on [1.25, 1/0.35) (`ra`/`sa`) and [1/0.35, 28) (`rb`/`sb`, padded with a zero
// so both sets have the same degree and can be blended lane by lane).
const RA: [f32; 8] = [
    -0.009864944,
    -0.69385856,
    -10.558626,
    -62.37533,
    -162.39667,
    -184.60509,
    -81.28744,
    -9.814329,
];
const SA: [f32; 9] = [
    1.0,
    19.651272,
    137.65776,
    434.5659,
    645.38727,
    429.00815,
    108.635,
    6.5702496,
    -0.060424414,
];
const RB: [f32; 8] = [
    -0.009864943,
    -0.79928327,
    -17.757956,
    -160.63638,
    -637.56647,
    -1025.0951,
    -483.5192,
    0.0,
];
const SB: [f32; 9] = [
    1.0, 30.33806, 325.7925, 1536.7296, 3199.8582, 2553.0503, 474.52853, -22.440952, 0.0,
];

/// Standard normal CDF `Phi(x) = 0.5 (1 + erf(x / sqrt 2))` to a few f32 ulps, also
/// in relative terms in the left tail: there it is `0.5 erfc(|z|)` computed directly,
/// never `1 - erf`. fdlibm's branches become lane selects; every lane evaluates all
/// three approximations, which is still far cheaper than a scalar call per element.
#[inline(always)]
pub(crate) fn phi8(x: f32x8) -> f32x8 {
    let half = f32x8::splat(0.5);
    let z = x * f32x8::splat(std::f32::consts::FRAC_1_SQRT_2);
    let neg = z.simd_lt(f32x8::ZERO);
    // Beyond |z| = 10 erfc is below f32's smallest subnormal; clamping keeps inf out
    // of the polynomials.
    let a = z.abs().min(f32x8::splat(10.0));

    // |z| < 0.84375: erf = a + a P(a^2) / Q(a^2).
    let a2 = a * a;
    let erf_small = a + a * (poly(a2, &PP) / poly(a2, &QQ));
    let phi_small = neg.select(half - half * erf_small, half + half * erf_small);

    // 0.84375 <= |z| < 1.25: erf = erx + P(s) / Q(s), erfc = (1 - erx) - P/Q, s = a - 1.
    let s = a - f32x8::ONE;
    let pq = poly(s, &PA) / poly(s, &QA);
    let erfc_mid = f32x8::splat(1.0 - ERX) - pq;

    // |z| >= 1.25: erfc = exp(-zh^2 - 0.5625) exp((zh - a)(zh + a) + R/S) / a, with zh
    // the top 12 bits of a so zh^2 is exact.
    let t = f32x8::ONE / a2;
    let far = a.simd_ge(f32x8::splat(2.857_143));
    let r = poly_blend(t, far, &RB, &RA);
    let sv = poly_blend(t, far, &SB, &SA);
    let zh: f32x8 =
        bytemuck::cast(bytemuck::cast::<_, wide::u32x8>(a) & wide::u32x8::splat(0xffff_f000));
    let e1 = (-zh).mul_add(zh, f32x8::splat(-0.5625)).exp();
    let e2 = ((zh - a) * (zh + a) + r / sv).exp();
    let erfc_tail = e1 * e2 / a;

    let in_mid = a.simd_lt(f32x8::splat(1.25));
    let erfc_big = in_mid.select(erfc_mid, erfc_tail);
    let phi_big = neg.select(half * erfc_big, f32x8::ONE - half * erfc_big);
    a.simd_lt(f32x8::splat(0.84375)).select(phi_small, phi_big)
}

/// Horner over two coefficient sets chosen per lane (`mask` true: `c1`).
#[inline(always)]
fn poly_blend(x: f32x8, mask: f32x8, c1: &[f32], c0: &[f32]) -> f32x8 {
    let n = c1.len();
    let mut acc = mask.select(f32x8::splat(c1[n - 1]), f32x8::splat(c0[n - 1]));
    for i in (0..n - 1).rev() {
        let k = mask.select(f32x8::splat(c1[i]), f32x8::splat(c0[i]));
        acc = acc.mul_add(x, k);
    }
    acc
}
