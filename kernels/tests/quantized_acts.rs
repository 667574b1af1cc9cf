//! Activations quantized once (`cpu::quantize_acts_at`, or fused into the
//! LayerNorm by `cpu::layer_norm_quantize_at`) and shared by several int8
//! matmuls (`cpu::matmul_quantized`) give, on every path this CPU has, exactly
//! the results of separate `cpu::matmul_packed_at` calls (same quantization,
//! same kernel: tolerance 0, bit for bit), whichever mix of Q4_0 and Q8_0
//! matrices reads them and in whatever order; the fused LayerNorm's f32 output
//! is bit for bit `cpu::layer_norm`'s.

mod common;

use common::{quantize_matrix, Rng};
use mipha_kernels::cpu::{self, PackedMatrix, QuantizedActs};
use mipha_kernels::{Epilogue, QuantType, WeightView};

struct Matrix {
    storage: Vec<u8>,
    ty: QuantType,
    n: usize,
    k: usize,
    bias: Vec<f32>,
}

impl Matrix {
    fn new(ty: QuantType, n: usize, k: usize, rng: &mut Rng) -> Matrix {
        let w = rng.vec_normal(n * k, 0.5);
        Matrix {
            storage: quantize_matrix(ty, &w, n, k),
            ty,
            n,
            k,
            bias: rng.vec_normal(n, 1.0),
        }
    }
    fn packed(&self) -> PackedMatrix {
        PackedMatrix::pack(WeightView::new(self.ty, &self.storage, self.n, self.k)).unwrap()
    }
}

const MS: [usize; 5] = [1, 3, 5, 13, 30];

#[test]
fn shared_activations_equal_separate_matmuls() {
    let mut rng = Rng::new(51);
    let k = 100;
    // Q4_0, Q8_0, then Q4_0 again: each type needs a different start value.
    let ms: Vec<Matrix> = [
        (QuantType::Q4_0, 40),
        (QuantType::Q8_0, 17),
        (QuantType::Q4_0, 33),
    ]
    .into_iter()
    .map(|(ty, n)| Matrix::new(ty, n, k, &mut rng))
    .collect();
    let packed: Vec<PackedMatrix> = ms.iter().map(Matrix::packed).collect();
    for level in common::levels_for("quantized activations") {
        for m in MS {
            let x = rng.vec_normal(m * k, 1.0);
            let mut acts = QuantizedActs::default();
            cpu::quantize_acts_at(level, &x, m, k, &mut acts);
            assert_eq!(acts.shape(), (m, k));
            for (w, p) in ms.iter().zip(&packed) {
                for epilogue in [Epilogue::Store, Epilogue::GeluTanh] {
                    let mut want = vec![f32::NAN; m * w.n];
                    cpu::matmul_packed_at(level, &x, m, p, Some(&w.bias), epilogue, &mut want);
                    let mut got = vec![f32::NAN; m * w.n];
                    cpu::matmul_quantized(&mut acts, p, Some(&w.bias), epilogue, &mut got);
                    assert_eq!(
                        got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "{} {} m={m} {epilogue:?}",
                        level.name(),
                        w.ty
                    );
                }
            }
        }
    }
}

#[test]
fn fused_layer_norm_equals_layer_norm_then_matmul() {
    let mut rng = Rng::new(52);
    let k = 2 * 32 + 7; // a partial last block
    let w = Matrix::new(QuantType::Q8_0, 21, k, &mut rng);
    let p = w.packed();
    let gamma = rng.vec_normal(k, 1.0);
    let beta = rng.vec_normal(k, 0.3);
    for level in common::levels_for("quantized activations") {
        for m in MS {
            let x: Vec<f32> = rng.vec_normal(m * k, 2.0).iter().map(|v| v + 1.5).collect();
            let mut ln = vec![f32::NAN; m * k];
            cpu::layer_norm(&x, k, &gamma, &beta, 1e-5, &mut ln);
            let mut want = vec![f32::NAN; m * w.n];
            cpu::matmul_packed_at(level, &ln, m, &p, None, Epilogue::Store, &mut want);

            let mut acts = QuantizedActs::default();
            let mut fused = vec![f32::NAN; m * k];
            cpu::layer_norm_quantize_at(level, &x, k, &gamma, &beta, 1e-5, &mut fused, &mut acts);
            let mut got = vec![f32::NAN; m * w.n];
            cpu::matmul_quantized(&mut acts, &p, None, Epilogue::Store, &mut got);
            let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&fused),
                bits(&ln),
                "{} m={m}: LayerNorm output",
                level.name()
            );
            assert_eq!(bits(&got), bits(&want), "{} m={m}: matmul", level.name());
        }
    }
}

#[test]
#[should_panic(expected = "activations are 64 wide, weights 96")]
fn width_mismatch_is_refused() {
    let mut rng = Rng::new(53);
    let w = Matrix::new(QuantType::Q4_0, 16, 96, &mut rng);
    let mut acts = QuantizedActs::default();
    cpu::quantize_acts(&rng.vec_normal(2 * 64, 1.0), 2, 64, &mut acts);
    let mut out = vec![0.0; 2 * 16];
    cpu::matmul_quantized(&mut acts, &w.packed(), None, Epilogue::Store, &mut out);
}
