//! cpu::softmax against reference::softmax (f64 exp and sum).
//!
//! Tolerance: |err| <= 2e-6 |want| + 1e-9 (a couple of ulps from exp, the f32 sum
//! and the final scale).

mod common;

use common::{assert_close, Rng};
use mipha_kernels::{cpu, reference};

#[test]
fn matches_reference() {
    let mut rng = Rng::new(31);
    for n in [1usize, 2, 7, 8, 9, 31, 80, 200, 1000, 4097] {
        for spread in [1.0f32, 30.0] {
            let x = rng.vec_normal(n, spread);
            let mut want = x.clone();
            reference::softmax(&mut want);
            let mut got = x.clone();
            cpu::softmax(&mut got);
            assert_close(&format!("n={n} spread={spread}"), &got, &want, 1e-9, 2e-6);
            let total: f32 = got.iter().sum();
            assert!((total - 1.0).abs() < 1e-5, "n={n}: sum {total}");
        }
    }
}

#[test]
fn large_and_masked_values() {
    // Shift invariance at large magnitudes and -inf entries (masked positions).
    let mut x = vec![
        1000.0f32,
        999.0,
        f32::NEG_INFINITY,
        998.0,
        -1e30,
        1000.0,
        0.0,
        997.5,
        996.0,
    ];
    let mut want = x.clone();
    reference::softmax(&mut want);
    cpu::softmax(&mut x);
    assert_close("large", &x, &want, 1e-9, 2e-6);
    assert_eq!(x[2], 0.0);

    let mut all_masked = vec![f32::NEG_INFINITY; 11];
    cpu::softmax(&mut all_masked);
    assert!(all_masked.iter().all(|&v| v == 0.0));
    let mut empty: Vec<f32> = vec![];
    cpu::softmax(&mut empty);
}
