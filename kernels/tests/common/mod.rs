//! Shared test helpers: a deterministic PRNG (no `rand` dependency, same numbers on
//! every machine) and tolerance checks that name the first offending element.

// Each test file uses a different subset of these helpers.
#![allow(dead_code)]

use mipha_kernels::quant::{dequantize_row, quantize_row};
use mipha_kernels::{reference, QuantType, WeightView};

/// SplitMix64: tiny, fast, and good enough to fill test tensors.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit() as f32
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.unit().max(1e-300);
        let u2 = self.unit();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn vec_uniform(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }

    pub fn vec_normal(&mut self, n: usize, std: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * std).collect()
    }

    /// Fisher-Yates.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// Encodes a row-major `[rows, cols]` f32 matrix into stored rows of `ty`.
pub fn quantize_matrix(ty: QuantType, w: &[f32], rows: usize, cols: usize) -> Vec<u8> {
    let rb = ty.row_bytes(cols);
    let mut out = vec![0u8; rows * rb];
    for (src, dst) in w.chunks_exact(cols).zip(out.chunks_exact_mut(rb)) {
        quantize_row(ty, src, dst);
    }
    out
}

/// Asserts `|got - want| <= abs + rel * |want|` element-wise; reports the first failure
/// and the worst error so a failing tolerance can be judged.
#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f32], abs: f32, rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length mismatch");
    let mut worst = (0usize, 0.0f32);
    let mut first_bad = None;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        let ok = err <= abs + rel * w.abs();
        if !ok && first_bad.is_none() {
            first_bad = Some(i);
        }
        if err.is_nan() || err > worst.1 {
            worst = (i, err);
        }
        if g.is_nan() != w.is_nan() && first_bad.is_none() {
            first_bad = Some(i);
        }
    }
    if let Some(i) = first_bad {
        panic!(
            "{what}: element {i}: got {} want {} (abs {abs}, rel {rel}); worst err {} at {}",
            got[i], want[i], worst.1, worst.0
        );
    }
}

/// `sum_k |x_k w_k| + |b|` for each matmul output, from the dequantized weights:
/// the scale a matmul's rounding error is judged against (the result itself may
/// cancel to near zero).
pub fn magnitudes(x: &[f32], m: usize, w: &WeightView, bias: Option<&[f32]>) -> Vec<f32> {
    let mut wabs = vec![0.0f32; w.rows * w.cols];
    for (j, row) in wabs.chunks_exact_mut(w.cols).enumerate() {
        dequantize_row(w.ty, w.row(j), row);
        row.iter_mut().for_each(|v| *v = v.abs());
    }
    let xabs: Vec<f32> = x.iter().map(|v| v.abs()).collect();
    let babs: Option<Vec<f32>> = bias.map(|b| b.iter().map(|v| v.abs()).collect());
    let view = WeightView::new(QuantType::F32, bytemuck::cast_slice(&wabs), w.rows, w.cols);
    let mut mag = vec![0.0f32; m * w.rows];
    reference::matmul(&xabs, m, view, babs.as_deref(), &mut mag);
    mag
}

/// Every dispatch level this CPU has, after saying for each level there is
/// whether `what` runs at it or skips it (a level the CPU lacks is never run
/// at a lower level under its name).
#[allow(dead_code)]
pub fn levels_for(what: &str) -> Vec<mipha_kernels::cpu::dispatch::Level> {
    use mipha_kernels::cpu::dispatch::{available, Level};
    let here = available();
    for l in Level::ALL {
        if here.contains(&l) {
            eprintln!("{what} at {}: ran", l.name());
        } else {
            eprintln!("{what} at {}: skipped, this CPU lacks it", l.name());
        }
    }
    here
}
