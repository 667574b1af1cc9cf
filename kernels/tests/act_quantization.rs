//! The int8 activation quantizer each matmul path runs
//! (`cpu::quantize_act_block_at`) against the scalar
//! `quant::quantize_act_block`, bit for bit, on every path this CPU has: same
//! scale, same quants (round half away from zero), same sum. Ties, signed
//! zeros, subnormals, huge values, NaN and infinities included.

mod common;

use common::Rng;
use mipha_kernels::cpu::quantize_act_block_at;
use mipha_kernels::quant::quantize_act_block;

fn blocks() -> Vec<[f32; 32]> {
    let mut rng = Rng::new(41);
    let mut out = Vec::new();
    for scale in [1e-3f32, 1.0, 37.0, 1e30] {
        for _ in 0..200 {
            out.push(std::array::from_fn(|_| rng.normal() * scale));
        }
    }
    // amax 127 makes the scale exactly 1: every x.5 is a tie.
    let mut ties: [f32; 32] = std::array::from_fn(|i| i as f32 - 15.5);
    ties[31] = 127.0;
    ties[30] = -126.5;
    ties[29] = 0.5;
    ties[28] = -0.5;
    out.push(ties);
    // Just below and above a tie.
    let near: [f32; 32] = std::array::from_fn(|i| match i % 3 {
        0 => f32::from_bits(2.5f32.to_bits() - 1),
        1 => f32::from_bits(2.5f32.to_bits() + 1),
        _ => -f32::from_bits(0.5f32.to_bits() - 1),
    });
    let mut near = near;
    near[0] = 127.0;
    out.push(near);
    out.push([0.0; 32]);
    out.push(std::array::from_fn(|i| if i % 2 == 0 { -0.0 } else { 0.0 }));
    out.push(std::array::from_fn(|i| f32::from_bits(1 + i as u32))); // subnormals
    out.push(std::array::from_fn(|i| (i as f32 - 16.0) * 1e37));
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut b: [f32; 32] = std::array::from_fn(|i| i as f32 * 0.1);
        b[7] = bad;
        out.push(b);
    }
    out
}

#[test]
fn every_path_quantizes_like_the_scalar_reference() {
    let all = blocks();
    for level in common::levels_for("activation quantization") {
        for (n, x) in all.iter().enumerate() {
            let (mut want_q, mut got_q) = ([0i8; 32], [0i8; 32]);
            let want = quantize_act_block(x, &mut want_q);
            let got = quantize_act_block_at(level, x, &mut got_q);
            assert_eq!(
                (got.0.to_bits(), got.1, got_q),
                (want.0.to_bits(), want.1, want_q),
                "{} block {n}: {x:?}",
                level.name()
            );
        }
    }
}
