//! F16 and BF16 weights repacked into 16-row panels (`cpu::matmul_packed`)
//! against `reference::matmul` on **every kernel path this CPU has**. Both use
//! the stored weights exactly and f32 activations; the reference sums in f64.
//! Tolerance per output: |got - want| <= 1e-5 * (sum_k |x_k w_k| + |b|).
//!
//! BF16 with the BF16 dot (activations rounded to BF16, `vdpbf16ps` where the
//! CPU has AVX512_BF16, two FMAs per pair below) against
//! `reference::matmul_bf16_dot`, same tolerance (f32 summation order only).
//! Shapes cross the kernel's blocking: k past one 512-element block, m past
//! one 128-row chunk, rows past a panel, every micro-tile remainder.

mod common;

use common::{magnitudes, quantize_matrix, Rng};
use mipha_kernels::cpu::dispatch::Level;
use mipha_kernels::cpu::{self, PackedMatrix};
use mipha_kernels::{reference, Epilogue, QuantType, WeightView};

#[test]
fn every_path_matches_the_reference() {
    let levels = common::levels_for("f16/bf16 matmul");
    let mut rng = Rng::new(31);
    let shapes = [(1, 1), (5, 7), (16, 32), (17, 513), (40, 1100), (33, 96)];
    let ms = [1, 2, 3, 5, 8, 9, 17, 131];
    for ty in [QuantType::F16, QuantType::BF16] {
        for &(n, k) in &shapes {
            for &m in &ms {
                if k >= 1100 && m > 17 {
                    continue;
                }
                let w = rng.vec_normal(n * k, 0.5);
                let mut storage = vec![0u8; 1];
                storage.extend(quantize_matrix(ty, &w, n, k));
                let view = WeightView::new(ty, &storage[1..], n, k);
                let x = rng.vec_normal(m * k, 1.0);
                let bias = (m % 2 == 1).then(|| rng.vec_normal(n, 1.0));
                let packed = PackedMatrix::pack_with(view, false).expect("F16/BF16 pack");
                let mut want = vec![0.0f32; m * n];
                reference::matmul(&x, m, view, bias.as_deref(), &mut want);
                let mag = magnitudes(&x, m, &view, bias.as_deref());
                let what = format!("{ty} n={n} k={k} m={m}");
                let case = Case {
                    x: &x,
                    m,
                    packed: &packed,
                    bias: bias.as_deref(),
                };
                assert_every_level(&levels, &what, &case, &want, &mag);
            }
        }
    }
}

/// The fused epilogues equal the separate ops, also when `k` spans several
/// cache blocks (partial sums parked in `out`) and for a residual add.
#[test]
fn epilogues_equal_the_separate_ops() {
    let mut rng = Rng::new(32);
    let (n, k, m) = (21, 1100, 5);
    for ty in [QuantType::F16, QuantType::BF16] {
        let w = rng.vec_normal(n * k, 0.5);
        let data = quantize_matrix(ty, &w, n, k);
        let view = WeightView::new(ty, &data, n, k);
        let packed = PackedMatrix::pack_with(view, false).unwrap();
        let x = rng.vec_normal(m * k, 1.0);
        let bias = rng.vec_normal(n, 1.0);
        for level in common::levels_for("f16/bf16 matmul epilogues") {
            let mut plain = vec![0.0f32; m * n];
            cpu::matmul_packed_at(
                level,
                &x,
                m,
                &packed,
                Some(&bias),
                Epilogue::Store,
                &mut plain,
            );
            for (epi, gelu) in [
                (
                    Epilogue::GeluTanh,
                    Some(reference::gelu_tanh as fn(&mut [f32])),
                ),
                (
                    Epilogue::GeluErf,
                    Some(reference::gelu_erf as fn(&mut [f32])),
                ),
                (Epilogue::Accumulate, None),
            ] {
                let resid = rng.vec_normal(m * n, 1.0);
                let mut want = plain.clone();
                match gelu {
                    Some(f) => f(&mut want),
                    None => want.iter_mut().zip(&resid).for_each(|(w, r)| *w += r),
                }
                let mut got = if gelu.is_some() {
                    vec![f32::NAN; m * n]
                } else {
                    resid.clone()
                };
                cpu::matmul_packed_at(level, &x, m, &packed, Some(&bias), epi, &mut got);
                common::assert_close(
                    &format!("{} {ty} {epi:?}", level.name()),
                    &got,
                    &want,
                    1e-4,
                    1e-5,
                );
            }
        }
    }
}

/// The BF16 dot on every level (native `vdpbf16ps` on `avx512bf16`, emulated
/// below) equals its reference to f32 summation rounding, and really rounds
/// the activations: it differs from the exact product by far more than that.
#[test]
fn bf16_dot_matches_its_reference_on_every_level() {
    let levels = common::levels_for("bf16 dot");
    for l in &levels {
        let how = if l.bf16_dot() {
            "native vdpbf16ps"
        } else {
            "emulated with FMAs"
        };
        eprintln!("bf16 dot at {}: {how}", l.name());
    }
    let mut rng = Rng::new(33);
    let shapes = [
        (1, 1),
        (5, 7),
        (16, 32),
        (17, 513),
        (40, 1100),
        (33, 96),
        (3, 1025),
    ];
    let ms = [1, 2, 3, 5, 8, 9, 17, 131];
    let mut rounded_somewhere = false;
    for &(n, k) in &shapes {
        for &m in &ms {
            if k >= 1025 && m > 17 {
                continue;
            }
            let w = rng.vec_normal(n * k, 0.5);
            let mut storage = vec![0u8; 1];
            storage.extend(quantize_matrix(QuantType::BF16, &w, n, k));
            let view = WeightView::new(QuantType::BF16, &storage[1..], n, k);
            let x = rng.vec_normal(m * k, 1.0);
            let bias = (m % 2 == 1).then(|| rng.vec_normal(n, 1.0));
            let packed = PackedMatrix::pack_with(view, true).expect("BF16 pack");
            assert!(packed.bf16_dot());
            let mut want = vec![0.0f32; m * n];
            reference::matmul_bf16_dot(&x, m, view, bias.as_deref(), &mut want);
            let mut exact = vec![0.0f32; m * n];
            reference::matmul(&x, m, view, bias.as_deref(), &mut exact);
            let mag = magnitudes(&x, m, &view, bias.as_deref());
            for i in 0..m * n {
                rounded_somewhere |= (want[i] - exact[i]).abs() > 1e-4 * mag[i];
            }
            let what = format!("bf16 dot n={n} k={k} m={m}");
            let case = Case {
                x: &x,
                m,
                packed: &packed,
                bias: bias.as_deref(),
            };
            assert_every_level(&levels, &what, &case, &want, &mag);
        }
    }
    assert!(
        rounded_somewhere,
        "the BF16 dot's reference never left the exact product"
    );
}

/// The kernels' BF16 rounding of activations is the reference's, for every
/// class of f32 (and `half`'s round-to-nearest-even for normal numbers).
#[test]
fn bf16_rounding_matches_the_reference() {
    use mipha_kernels::quant::round_bf16_bits;
    let mut rng = Rng::new(34);
    let mut values: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        f32::MAX,
        f32::MIN,
        f32::MIN_POSITIVE,
        -f32::MIN_POSITIVE,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        1e-40,
        -1e-40,
        f32::from_bits(0x3f80_8000), // a tie: rounds to even (down)
        f32::from_bits(0x3f81_8000), // a tie: rounds to even (up)
        f32::from_bits(0x7f7f_ffff), // rounds up to infinity
        f32::from_bits(0x0080_0000), // smallest normal
    ];
    for _ in 0..100_000 {
        values.push(f32::from_bits(rng.next_u64() as u32));
    }
    for &v in &values {
        let got = f32::from_bits((round_bf16_bits(v) as u32) << 16);
        let want = reference::round_bf16(v);
        assert!(
            got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
            "{v:e} ({:#010x}): got {got:e} want {want:e}",
            v.to_bits()
        );
        if v.is_normal() {
            let h = half::bf16::from_f32(v).to_f32();
            assert_eq!(got.to_bits(), h.to_bits(), "{v:e}");
        }
    }
}

/// One matmul's inputs.
struct Case<'a> {
    x: &'a [f32],
    m: usize,
    packed: &'a PackedMatrix,
    bias: Option<&'a [f32]>,
}

/// The packed matmul at every level in `levels` equals `want` to within 1e-5
/// of each output's magnitude.
fn assert_every_level(levels: &[Level], what: &str, c: &Case, want: &[f32], mag: &[f32]) {
    for &level in levels {
        let mut got = vec![f32::NAN; want.len()];
        cpu::matmul_packed_at(level, c.x, c.m, c.packed, c.bias, Epilogue::Store, &mut got);
        for i in 0..want.len() {
            let err = (got[i] - want[i]).abs();
            assert!(
                err <= 1e-5 * mag[i] + 1e-30,
                "{} {what}: out[{i}] = {} want {} (mag {})",
                level.name(),
                got[i],
                want[i],
                mag[i]
            );
        }
    }
}
