//! F16 and BF16 weights repacked into 16-row panels (`cpu::matmul_packed`)
//! against `reference::matmul` on **every kernel path this CPU has**. Both use
//! the stored weights exactly and f32 activations; the reference sums in f64.
//! Tolerance per output: |got - want| <= 1e-5 * (sum_k |x_k w_k| + |b|).
//! Shapes cross the kernel's blocking: k past one 512-element block, m past
//! one 128-row chunk, rows past a panel, every micro-tile remainder.

mod common;

use common::{magnitudes, quantize_matrix, Rng};
use mipha_kernels::cpu::dispatch::available;
use mipha_kernels::cpu::{self, PackedMatrix};
use mipha_kernels::{reference, Epilogue, QuantType, WeightView};

#[test]
fn every_path_matches_the_reference() {
    let levels = available();
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
                let packed = PackedMatrix::pack(view).expect("F16/BF16 pack");
                let mut want = vec![0.0f32; m * n];
                reference::matmul(&x, m, view, bias.as_deref(), &mut want);
                let mag = magnitudes(&x, m, &view, bias.as_deref());
                for &level in &levels {
                    let mut got = vec![f32::NAN; m * n];
                    cpu::matmul_packed_at(
                        level,
                        &x,
                        m,
                        &packed,
                        bias.as_deref(),
                        Epilogue::Store,
                        &mut got,
                    );
                    for i in 0..m * n {
                        let err = (got[i] - want[i]).abs();
                        assert!(
                            err <= 1e-5 * mag[i] + 1e-30,
                            "{} {ty} n={n} k={k} m={m}: out[{}] = {} want {} (mag {})",
                            level.name(),
                            i,
                            got[i],
                            want[i],
                            mag[i]
                        );
                    }
                }
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
        let packed = PackedMatrix::pack(view).unwrap();
        let x = rng.vec_normal(m * k, 1.0);
        let bias = rng.vec_normal(n, 1.0);
        for level in available() {
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
