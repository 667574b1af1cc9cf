//! cpu::matmul against reference::matmul for every storage type.
//!
//! Tolerance, per output element: |got - want| <= 1e-5 * (sum_k |x_k w_k| + |b|),
//! i.e. relative to the magnitude of the terms rather than of the (possibly
//! cancelling) result. The reference accumulates in f64, cpu in f32 lanes.
//! Both read the same stored weights, so quantization error does not enter.

mod common;

use common::{magnitudes, quantize_matrix, Rng};
use mipha_kernels::quant::dequantize_row;
use mipha_kernels::{cpu, reference, QuantType, WeightView};

/// (n = weight rows, k = cols): tails, padded rows, one block, several chunks.
const SHAPES: [(usize, usize); 9] = [
    (5, 1),
    (7, 31),
    (3, 32),
    (13, 33),
    (16, 80),
    (33, 172),
    (9, 200),
    (300, 256),
    (20, 4304),
];
const MS: [usize; 4] = [1, 3, 17, 64];

fn check(ty: QuantType, n: usize, k: usize, m: usize, with_bias: bool, rng: &mut Rng) {
    let w = rng.vec_normal(n * k, 0.5);
    // Stored one byte off alignment, as a tensor inside a mapped file may be.
    let mut storage = vec![0u8; 1];
    storage.extend(quantize_matrix(ty, &w, n, k));
    let view = WeightView::new(ty, &storage[1..], n, k);
    let x = rng.vec_normal(m * k, 1.0);
    let bias = with_bias.then(|| rng.vec_normal(n, 1.0));

    let mut want = vec![0.0f32; m * n];
    reference::matmul(&x, m, view, bias.as_deref(), &mut want);
    let mut got = vec![f32::NAN; m * n];
    cpu::matmul(&x, m, view, bias.as_deref(), &mut got);
    let mag = magnitudes(&x, m, &view, bias.as_deref());
    for i in 0..m * n {
        let err = (got[i] - want[i]).abs();
        assert!(
            err <= 1e-5 * mag[i],
            "{ty} n={n} k={k} m={m} bias={with_bias}: out[{},{}] = {} want {} (err {err}, mag {})",
            i / n,
            i % n,
            got[i],
            want[i],
            mag[i]
        );
    }
}

#[test]
fn all_types_shapes_and_m() {
    let mut rng = Rng::new(11);
    for ty in QuantType::ALL {
        for &(n, k) in &SHAPES {
            for &m in &MS {
                if k == 4304 && m == 64 {
                    continue; // covered at m = 17; keeps the scalar reference cheap
                }
                check(ty, n, k, m, m % 2 == 1, &mut rng);
            }
        }
    }
}

#[test]
fn large_prefill_shape() {
    // Many x-row tiles plus remainders (4 * 15 + 2 + 1) against a wide weight.
    let mut rng = Rng::new(12);
    for ty in [QuantType::Q8_0, QuantType::F16] {
        check(ty, 48, 1152, 63, true, &mut rng);
    }
}

/// One-hot x rows pick out single weights, so the block decoders must reproduce
/// dequantize_row bit for bit, including f16 subnormals, -0 and the extremes.
#[test]
fn decoders_are_exact() {
    let mut rng = Rng::new(13);
    let (n, k) = (6, 70);
    let mut w = rng.vec_normal(n * k, 1.0);
    let specials = [
        65504.0, -65504.0, 6.1e-5, -5.96e-8, 3.0e-6, -0.0, 1e-7, -2.5e-5,
    ];
    w[..specials.len()].copy_from_slice(&specials);
    for ty in QuantType::ALL {
        let bytes = quantize_matrix(ty, &w, n, k);
        let view = WeightView::new(ty, &bytes, n, k);
        let mut x = vec![0.0f32; k * k];
        for i in 0..k {
            x[i * k + i] = 1.0;
        }
        let mut got = vec![0.0f32; k * n];
        cpu::matmul(&x, k, view, None, &mut got);
        let mut row = vec![0.0f32; k];
        for j in 0..n {
            dequantize_row(ty, view.row(j), &mut row);
            for i in 0..k {
                // == rather than bits: a -0.0 weight times 1 plus +0 terms is +0.
                assert!(
                    got[i * n + j] == row[i],
                    "{ty}: W[{j},{i}] decoded as {} want {}",
                    got[i * n + j],
                    row[i]
                );
            }
        }
    }
}

#[test]
fn empty_dimensions() {
    let w = quantize_matrix(QuantType::Q8_0, &[], 0, 64);
    let view = WeightView::new(QuantType::Q8_0, &w, 0, 64);
    let mut out: Vec<f32> = vec![];
    cpu::matmul(&[0.0; 64], 1, view, None, &mut out);
    let w = quantize_matrix(QuantType::Q4_0, &[0.5; 64], 1, 64);
    let view = WeightView::new(QuantType::Q4_0, &w, 1, 64);
    cpu::matmul(&[], 0, view, None, &mut out);
}
