//! cpu::layer_norm against reference::layer_norm (f64).
//!
//! Tolerance: |err| <= 1e-5 (|want| + |bias| + 1): the normalised value carries the
//! f32 rounding of mean, variance and the scale, then is scaled by the weight.

mod common;

use common::{assert_close, Rng};
use mipha_kernels::{cpu, reference};

#[test]
fn matches_reference() {
    let mut rng = Rng::new(21);
    // (rows, cols): single row, odd widths, SigLIP/Phi widths, enough rows to thread.
    for (rows, cols) in [
        (1, 1),
        (3, 7),
        (5, 80),
        (2, 172),
        (9, 200),
        (4, 1152),
        (3, 2560),
        (40, 1152),
    ] {
        // Non-zero mean and a large offset test the two-pass variance.
        let offset = rng.uniform(-20.0, 20.0);
        let x: Vec<f32> = rng
            .vec_normal(rows * cols, 3.0)
            .iter()
            .map(|v| v + offset)
            .collect();
        let w = rng.vec_normal(cols, 1.0);
        let b = rng.vec_normal(cols, 0.5);
        let mut want = vec![0.0f32; x.len()];
        reference::layer_norm(&x, cols, &w, &b, 1e-5, &mut want);
        let mut got = vec![f32::NAN; x.len()];
        cpu::layer_norm(&x, cols, &w, &b, 1e-5, &mut got);
        for (i, (&g, &v)) in got.iter().zip(&want).enumerate() {
            let tol = 1e-5 * (v.abs() + b[i % cols].abs() + 1.0);
            assert!(
                (g - v).abs() <= tol,
                "rows={rows} cols={cols} i={i}: {g} vs {v}"
            );
        }
    }
}

#[test]
fn constant_row_gives_bias() {
    // Zero variance: the output is exactly the bias (eps keeps it finite).
    let cols = 37;
    let x = vec![4.25f32; 2 * cols];
    let w = vec![2.0f32; cols];
    let b: Vec<f32> = (0..cols).map(|i| i as f32 * 0.1).collect();
    let mut got = vec![0.0f32; x.len()];
    cpu::layer_norm(&x, cols, &w, &b, 1e-5, &mut got);
    assert_close("constant row", &got[..cols], &b, 0.0, 0.0);
    assert_close("constant row 2", &got[cols..], &b, 0.0, 0.0);
}
