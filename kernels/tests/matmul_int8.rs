//! The integer matmul (`cpu::matmul_packed`, weights repacked into 16-row
//! panels, activations quantized to int8 per 32-block) against the scalar
//! `reference::matmul_int8`, on **every kernel path this CPU has** (portable,
//! AVX2 `maddubs`, AVX-VNNI, AVX-512 BW, AVX-512 VNNI), each forced explicitly.
//!
//! Both quantize the activations identically and do exact integer block dots;
//! they differ only in how the per-block f32 products are summed (FMA, lane
//! order). Tolerance per output: |got - want| <= 1e-5 * (sum_k |x_k w_k| + |b|).
//! A second check bounds the int8 activation error against the f32 matmul.

mod common;

use common::{magnitudes, quantize_matrix, Rng};
use mipha_kernels::cpu::dispatch::Level;
use mipha_kernels::cpu::{self, PackedMatrix};
use mipha_kernels::{reference, Epilogue, QuantType, WeightView};

/// (n, k): rows past a panel, partial blocks, one block, many blocks.
const SHAPES: [(usize, usize); 8] = [
    (1, 1),
    (5, 31),
    (16, 32),
    (17, 33),
    (37, 70),
    (48, 256),
    (130, 1152),
    (20, 4304),
];
/// m: single rows (decode), short and full 12-row AVX-512 tiles and their
/// remainders, past one 96-row chunk.
const MS: [usize; 8] = [1, 2, 3, 9, 12, 17, 67, 101];

struct Case {
    ty: QuantType,
    n: usize,
    k: usize,
    m: usize,
    storage: Vec<u8>,
    x: Vec<f32>,
    bias: Option<Vec<f32>>,
}

impl Case {
    fn new(ty: QuantType, n: usize, k: usize, m: usize, rng: &mut Rng) -> Case {
        let w = rng.vec_normal(n * k, 0.5);
        let mut storage = vec![0u8; 1]; // one byte off alignment, as in a mapped file
        storage.extend(quantize_matrix(ty, &w, n, k));
        let mut x = rng.vec_normal(m * k, 1.0);
        // Outliers and an all-zero block, as real activations have.
        if k > 40 {
            x[3] = 40.0;
            for v in &mut x[..32.min(k)] {
                *v *= 0.0;
            }
        }
        let bias = (m % 2 == 1).then(|| rng.vec_normal(n, 1.0));
        Case {
            ty,
            n,
            k,
            m,
            storage,
            x,
            bias,
        }
    }
    fn view(&self) -> WeightView<'_> {
        WeightView::new(self.ty, &self.storage[1..], self.n, self.k)
    }
}

fn check_level(level: Level, c: &Case, packed: &PackedMatrix, want: &[f32], mag: &[f32]) {
    let mut got = vec![f32::NAN; c.m * c.n];
    cpu::matmul_packed_at(
        level,
        &c.x,
        c.m,
        packed,
        c.bias.as_deref(),
        Epilogue::Store,
        &mut got,
    );
    for i in 0..c.m * c.n {
        let err = (got[i] - want[i]).abs();
        assert!(
            err <= 1e-5 * mag[i] + 1e-30,
            "{} {} n={} k={} m={}: out[{},{}] = {} want {} (err {err}, mag {})",
            level.name(),
            c.ty,
            c.n,
            c.k,
            c.m,
            i / c.n,
            i % c.n,
            got[i],
            want[i],
            mag[i]
        );
    }
}

#[test]
fn every_path_matches_the_scalar_reference() {
    let levels = common::levels_for("int8 matmul");
    eprintln!("int8 kernel paths on this CPU: {levels:?}");
    let mut rng = Rng::new(21);
    for ty in [QuantType::Q4_0, QuantType::Q8_0] {
        for &(n, k) in &SHAPES {
            for &m in &MS {
                if k >= 1152 && m > 17 {
                    continue; // the scalar reference is slow; m = 17 covers the tiles
                }
                let c = Case::new(ty, n, k, m, &mut rng);
                let packed = PackedMatrix::pack(c.view()).unwrap();
                let mut want = vec![0.0f32; m * n];
                reference::matmul_int8(&c.x, m, c.view(), c.bias.as_deref(), &mut want);
                let mag = magnitudes(&c.x, m, &c.view(), c.bias.as_deref());
                for &level in &levels {
                    check_level(level, &c, &packed, &want, &mag);
                }
            }
        }
    }
}

#[test]
fn default_path_is_the_dispatched_one() {
    let mut rng = Rng::new(22);
    let c = Case::new(QuantType::Q4_0, 33, 96, 5, &mut rng);
    let packed = PackedMatrix::pack(c.view()).unwrap();
    let mut a = vec![f32::NAN; c.m * c.n];
    let mut b = vec![f32::NAN; c.m * c.n];
    cpu::matmul_packed(&c.x, c.m, &packed, c.bias.as_deref(), &mut a);
    cpu::matmul_packed_at(
        cpu::dispatch::level(),
        &c.x,
        c.m,
        &packed,
        c.bias.as_deref(),
        Epilogue::Store,
        &mut b,
    );
    assert_eq!(a, b);
}

/// int8 activations cost little accuracy: per output, the difference from the
/// f32-activation matmul on the same weights is within 2 % of the terms'
/// magnitude, and the whole output's cosine similarity is above 0.9995.
#[test]
fn activation_quantization_error_is_small() {
    let mut rng = Rng::new(23);
    for ty in [QuantType::Q4_0, QuantType::Q8_0] {
        let c = Case::new(ty, 64, 2560, 4, &mut rng);
        let packed = PackedMatrix::pack(c.view()).unwrap();
        let mut f32_acts = vec![0.0f32; c.m * c.n];
        reference::matmul(&c.x, c.m, c.view(), c.bias.as_deref(), &mut f32_acts);
        let mut int8 = vec![0.0f32; c.m * c.n];
        cpu::matmul_packed(&c.x, c.m, &packed, c.bias.as_deref(), &mut int8);
        let mag = magnitudes(&c.x, c.m, &c.view(), c.bias.as_deref());
        let (mut dot, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
        for i in 0..int8.len() {
            assert!(
                (int8[i] - f32_acts[i]).abs() <= 0.02 * mag[i],
                "{ty} out {i}"
            );
            dot += int8[i] as f64 * f32_acts[i] as f64;
            na += (int8[i] as f64).powi(2);
            nb += (f32_acts[i] as f64).powi(2);
        }
        let cos = dot / (na.sqrt() * nb.sqrt());
        eprintln!("{ty}: cosine int8 vs f32 activations {cos:.6}");
        assert!(cos > 0.9995, "{ty}: cosine {cos}");
    }
}

#[test]
fn other_types_are_not_packed_and_empty_shapes_work() {
    let data = vec![0u8; 4 * 8];
    assert!(PackedMatrix::pack(WeightView::new(QuantType::F32, &data, 4, 2)).is_none());
    let mut rng = Rng::new(24);
    // k = 0: the output is the bias.
    let c = Case {
        ty: QuantType::Q8_0,
        n: 3,
        k: 0,
        m: 2,
        storage: vec![0],
        x: vec![],
        bias: Some(rng.vec_normal(3, 1.0)),
    };
    let packed = PackedMatrix::pack(c.view()).unwrap();
    let mut out = vec![f32::NAN; 6];
    cpu::matmul_packed(&c.x, 2, &packed, c.bias.as_deref(), &mut out);
    assert_eq!(&out[..3], c.bias.as_deref().unwrap());
    assert_eq!(&out[3..], c.bias.as_deref().unwrap());
}

/// The fused epilogues equal the separate ops: GELU (tanh, erf) of the result,
/// and `out += result` on top of what `out` held, on every path.
#[test]
fn epilogues_equal_the_separate_ops() {
    let mut rng = Rng::new(25);
    for ty in [QuantType::Q4_0, QuantType::Q8_0] {
        let c = Case::new(ty, 37, 200, 9, &mut rng);
        let packed = PackedMatrix::pack(c.view()).unwrap();
        for level in common::levels_for("int8 matmul epilogues") {
            let mut plain = vec![0.0f32; c.m * c.n];
            cpu::matmul_packed_at(
                level,
                &c.x,
                c.m,
                &packed,
                c.bias.as_deref(),
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
                let resid = rng.vec_normal(c.m * c.n, 1.0);
                let mut want = plain.clone();
                match gelu {
                    Some(f) => f(&mut want),
                    None => want.iter_mut().zip(&resid).for_each(|(w, r)| *w += r),
                }
                let mut got = if gelu.is_some() {
                    vec![f32::NAN; c.m * c.n]
                } else {
                    resid.clone()
                };
                cpu::matmul_packed_at(level, &c.x, c.m, &packed, c.bias.as_deref(), epi, &mut got);
                common::assert_close(
                    &format!("{} {ty} {epi:?}", level.name()),
                    &got,
                    &want,
                    1e-5,
                    1e-5,
                );
            }
        }
    }
}
