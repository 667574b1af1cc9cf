//! GELU (tanh and erf forms): known values, the f64 erf, and cpu vs reference.
//!
//! Tolerances: known values within 1e-6 absolute and 1e-6 relative (the left tail
//! needs the erfc / logistic forms for that). cpu vs reference, relative:
//! |err| <= 2e-7 (1 + x^2) |want| + 1e-37 for both. A few ulps near zero; in the left
//! tail the f32 rounding of the argument (x/sqrt 2, or u) is amplified by the
//! exponent's slope, ~x^2 (e.g. 1e-6 relative at x = -4, where GELU is ~1e-4, and
//! 1e-5 at x = -12, where it is ~1e-32). The reference computes in f64.

mod common;

use common::Rng;
use mipha_kernels::{cpu, reference};

/// Python `0.5 * x * math.erfc(-x / math.sqrt(2))`.
const GELU_ERF: [(f32, f64); 7] = [
    (1.0, 0.8413447460685429),
    (-0.5, -0.15426876936299344),
    (3.0, 2.99595030590511),
    (-3.0, -0.004049694094890287),
    (0.1, 0.053982783727702904),
    (-6.0, -5.919525870226207e-09),
    (10.0, 10.0),
];

/// torch `F.gelu(x, approximate="tanh")` in float64.
const GELU_TANH: [(f32, f64); 6] = [
    (1.0, 0.8411919906082768),
    (-0.5, -0.15428599017485606),
    (3.0, 2.996362607918227),
    (-3.0, -0.0036373920817729943),
    (0.1, 0.053982751045435165),
    (-6.0, -8.43964897967453e-11),
];

type Op = fn(&mut [f32]);

fn check_known(name: &str, op: Op, table: &[(f32, f64)]) {
    let mut x: Vec<f32> = table.iter().map(|t| t.0).collect();
    op(&mut x);
    for (&got, &(input, want)) in x.iter().zip(table) {
        let err = (got as f64 - want).abs();
        assert!(
            err <= 1e-6 && err <= 1e-6 * want.abs() + 1e-12,
            "{name}({input}) = {got}, want {want}"
        );
    }
}

#[test]
fn known_values() {
    check_known("reference::gelu_erf", reference::gelu_erf, &GELU_ERF);
    check_known("cpu::gelu_erf", cpu::gelu_erf, &GELU_ERF);
    check_known("reference::gelu_tanh", reference::gelu_tanh, &GELU_TANH);
    check_known("cpu::gelu_tanh", cpu::gelu_tanh, &GELU_TANH);
}

#[test]
fn reference_erf_matches_python() {
    // (z, math.erf(z), math.erfc(z))
    let table = [
        (1e-3, 0.0011283787909692365, 0.9988716212090307),
        (0.5, 0.5204998778130465, 0.4795001221869535),
        (0.9, 0.7969082124228322, 0.20309178757716786),
        (1.2, 0.9103139782296353, 0.08968602177036465),
        (2.0, 0.9953222650189527, 0.004677734981047265),
        (3.5, 0.9999992569016276, 7.430983723414128e-07),
        (5.0, 0.9999999999984626, 1.5374597944280351e-12),
    ];
    for (z, erf, erfc) in table {
        assert!((reference::erf(z) - erf).abs() <= 1e-15 * erf, "erf({z})");
        assert!((reference::erf(-z) + erf).abs() <= 1e-15 * erf, "erf(-{z})");
        assert!(
            (reference::erfc(z) - erfc).abs() <= 1e-13 * erfc,
            "erfc({z})"
        );
        assert!(
            (reference::erfc(-z) - (2.0 - erfc)).abs() <= 1e-15,
            "erfc(-{z})"
        );
    }
}

fn inputs(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    let mut x = rng.vec_uniform(n, -12.0, 12.0);
    // Around fdlibm's interval edges (|z| = 0.84375, 1.25, 1/0.35, scaled by sqrt 2)
    // and zero, where the approximations switch.
    for (i, &e) in [0.84375f32, 1.25, 2.857_143, 10.0].iter().enumerate() {
        let edge = e * std::f32::consts::SQRT_2;
        for d in -3i32..=3 {
            let v = edge + d as f32 * edge * f32::EPSILON;
            x[i * 16 + 2 * (d + 3) as usize] = v;
            x[i * 16 + 2 * (d + 3) as usize + 1] = -v;
        }
    }
    x[100] = 0.0;
    x[101] = -0.0;
    x[102] = 1e-30;
    x[103] = -1e-30;
    x
}

fn compare(name: &str, cpu_op: Op, ref_op: Op) {
    // Odd lengths exercise the scalar tail; 70_001 the threaded path.
    for (n, seed) in [(1usize, 1u64), (7, 2), (200, 3), (4304, 4), (70_001, 5)] {
        let mut x = if n >= 200 {
            inputs(n, seed)
        } else {
            Rng::new(seed).vec_uniform(n, -5.0, 5.0)
        };
        let input = x.clone();
        let mut want = x.clone();
        cpu_op(&mut x);
        ref_op(&mut want);
        for (i, ((&g, &w), &v)) in x.iter().zip(&want).zip(&input).enumerate() {
            let tol = 2e-7 * (1.0 + v * v) * w.abs() + 1e-37;
            assert!(
                (g - w).abs() <= tol,
                "{name} n={n} i={i}: {name}({v}) = {g}, want {w}"
            );
        }
    }
}

#[test]
fn cpu_gelu_erf_matches_reference() {
    compare("gelu_erf", cpu::gelu_erf, reference::gelu_erf);
}

#[test]
fn cpu_gelu_tanh_matches_reference() {
    compare("gelu_tanh", cpu::gelu_tanh, reference::gelu_tanh);
}
