//! rope_partial: the reference against a direct f64 formula, cpu against the
//! reference, identity at position 0, and pass-through of the unrotated dims.
//!
//! Tolerances: reference vs f64 formula 1e-6 |want| + 1e-7 (one f32 rounding of an
//! f64 result); cpu vs reference 2e-6 abs + 1e-6 rel (cos/sin rounded to f32, then
//! two f32 products and a sum, on inputs of order 1).

mod common;

use common::{assert_close, Rng};
use mipha_kernels::{cpu, reference};

/// Written out independently of the kernels: per head, pairs (j, j + rot/2) rotate by
/// pos * theta^(-2j/rot), everything in f64.
fn direct(
    x: &[f32],
    n_heads: usize,
    head_dim: usize,
    rot: usize,
    positions: &[usize],
    theta: f64,
) -> Vec<f32> {
    let mut out = x.to_vec();
    let h = rot / 2;
    for (t, &pos) in positions.iter().enumerate() {
        for head in 0..n_heads {
            let base = t * n_heads * head_dim + head * head_dim;
            for j in 0..h {
                let angle = pos as f64 / theta.powf(2.0 * j as f64 / rot as f64);
                let (a, b) = (x[base + j] as f64, x[base + h + j] as f64);
                out[base + j] = (a * angle.cos() - b * angle.sin()) as f32;
                out[base + h + j] = (b * angle.cos() + a * angle.sin()) as f32;
            }
        }
    }
    out
}

/// (n_heads, head_dim, rot_dims): Phi-2 (80, 32 rotated), tiny models, full rotation.
const CONFIGS: [(usize, usize, usize); 4] = [(32, 80, 32), (4, 16, 16), (2, 16, 8), (3, 72, 0)];

#[test]
fn reference_matches_direct_formula() {
    let mut rng = Rng::new(61);
    let positions = [0usize, 1, 2, 17, 511, 2047, 2048, 4095, 10_000];
    for (n_heads, head_dim, rot) in CONFIGS {
        let x = rng.vec_normal(positions.len() * n_heads * head_dim, 1.0);
        let want = direct(&x, n_heads, head_dim, rot, &positions, 10_000.0);
        let mut got = x.clone();
        reference::rope_partial(&mut got, n_heads, head_dim, rot, &positions, 10_000.0);
        assert_close(
            &format!("ref {n_heads}x{head_dim} rot {rot}"),
            &got,
            &want,
            1e-7,
            1e-6,
        );
    }
}

#[test]
fn cpu_matches_reference() {
    let mut rng = Rng::new(62);
    for (n_heads, head_dim, rot) in CONFIGS {
        // 70 positions of width 2560 takes the threaded path.
        for positions in [
            vec![5usize],
            (0..70).map(|p| p * 31).collect(),
            vec![3000, 1, 0, 2047],
        ] {
            let x = rng.vec_normal(positions.len() * n_heads * head_dim, 1.0);
            let mut want = x.clone();
            reference::rope_partial(&mut want, n_heads, head_dim, rot, &positions, 10_000.0);
            let mut got = x.clone();
            cpu::rope_partial(&mut got, n_heads, head_dim, rot, &positions, 10_000.0);
            let what = format!("cpu {n_heads}x{head_dim} rot {rot} T={}", positions.len());
            assert_close(&what, &got, &want, 2e-6, 1e-6);
            // Dims past rot_dims pass through untouched.
            for (i, (&g, &v)) in got.iter().zip(&x).enumerate() {
                if i % head_dim >= rot {
                    assert_eq!(g, v, "{what}: dim {} changed", i % head_dim);
                }
            }
        }
    }
}

#[test]
fn position_zero_is_identity() {
    let mut rng = Rng::new(63);
    let x = rng.vec_normal(3 * 2 * 80, 1.0);
    for op in [cpu::rope_partial, reference::rope_partial] {
        let mut y = x.clone();
        op(&mut y, 2, 80, 32, &[0, 0, 0], 10_000.0);
        assert_eq!(y, x);
    }
}
