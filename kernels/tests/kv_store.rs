//! `cpu::kv_store` / `kv_store_at` convert K/V rows to the pool's element type
//! bit-exactly as `half::f16::from_f32` does (round to nearest even; NaN payloads,
//! infinities, subnormals, overflow), on every dispatch level this machine has,
//! for lengths with vector tails and at unaligned starts; f32 pools get an exact
//! copy.

mod common;

use common::Rng;
use half::f16;
use mipha_kernels::cpu::dispatch::Level;
use mipha_kernels::{cpu, reference};

/// Values at the edges of f16: zeros, infinities, NaNs with payloads (quiet and
/// signalling, both signs, payload bits above and below f16's), the largest f16
/// and the halfway points around it, the subnormal range and its rounding
/// boundaries, ties to even, f32 subnormals.
fn specials() -> Vec<f32> {
    let mut v: Vec<f32> = vec![
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::MAX,
        f32::MIN,
        f32::MIN_POSITIVE,
        f32::EPSILON,
        1.0,
        -1.0,
        65504.0,
        65519.996,
        65520.0,
        -65520.0,
        1e6,
        6.103_515_6e-5,     // 2^-14, the smallest normal f16
        6.097_555e-5,       // just below it
        5.960_464_5e-8,     // 2^-24, the smallest subnormal f16
        2.980_232_2e-8,     // 2^-25: a tie, rounds to 0 (even)
        2.980_233e-8,       // just above: rounds up to 2^-24
        8.940_697e-8,       // 1.5 * 2^-24: a tie, rounds to 2^-23
        1.0 + 1.0 / 2048.0, // a tie between 1 and 1 + 2^-10: to 1
        1.0 + 3.0 / 2048.0, // a tie: to 1 + 2^-9
        1e-40,              // an f32 subnormal
        -1e-45,
    ];
    for bits in [
        0x7f80_0001u32, // signalling NaN, payload below f16's bits
        0x7fa0_0000,    // signalling NaN, payload in f16's bits
        0xffbf_ffff,
        0x7fc0_0001,
        0x7fff_ffff,
        0xffc0_2000,
        0x7f80_2000,
    ] {
        v.push(f32::from_bits(bits));
    }
    // Every f16 value, and each halfway point to the next one.
    for h in 0..=u16::MAX {
        let x = f16::from_bits(h).to_f32();
        v.push(x);
        let next = f16::from_bits(h.wrapping_add(1)).to_f32();
        if x.is_finite() && next.is_finite() {
            v.push(((x as f64 + next as f64) / 2.0) as f32);
        }
    }
    v
}

fn random(rng: &mut Rng, n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        v.push(match i % 3 {
            // any bit pattern
            0 => f32::from_bits(rng.next_u64() as u32),
            // activations
            1 => rng.normal() * 4.0,
            // around f16's range ends
            _ => rng.normal() * if i % 2 == 0 { 3e4 } else { 1e-5 },
        });
    }
    v
}

fn f16_bits(x: &[f16]) -> Vec<u16> {
    x.iter().map(|h| h.to_bits()).collect()
}

/// Converts `src` at `level` (or dispatched, for `None`) and compares with
/// `half::f16::from_f32`, its software version and the reference.
fn check(what: &str, level: Option<Level>, src: &[f32]) {
    let want: Vec<f16> = src.iter().map(|&x| f16::from_f32(x)).collect();
    let mut got = vec![f16::from_bits(0x5555); src.len()];
    match level {
        Some(l) => cpu::kv_store_at(l, src, &mut got),
        None => cpu::kv_store(src, &mut got),
    }
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            g.to_bits(),
            w.to_bits(),
            "{what}: element {i} of {}: {:e} ({:#010x}) gave {:#06x}, want {:#06x}",
            src.len(),
            src[i],
            src[i].to_bits(),
            g.to_bits(),
            w.to_bits()
        );
    }
    let soft: Vec<u16> = src
        .iter()
        .map(|&x| f16::from_f32_const(x).to_bits())
        .collect();
    assert_eq!(
        f16_bits(&want),
        soft,
        "{what}: from_f32 and its software version"
    );
    let mut r = vec![f16::ZERO; src.len()];
    reference::kv_store(src, &mut r);
    assert_eq!(f16_bits(&r), f16_bits(&want), "{what}: reference");

    let mut copy = vec![0.0f32; src.len()];
    match level {
        Some(l) => cpu::kv_store_at(l, src, &mut copy),
        None => cpu::kv_store(src, &mut copy),
    }
    let same = copy
        .iter()
        .zip(src)
        .all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(same, "{what}: f32 copy");
}

const LENGTHS: [usize; 8] = [0, 1, 7, 15, 17, 33, 1000, 1 << 16];

fn check_level(level: Option<Level>) {
    let name = level.map_or("dispatched", |l| l.name());
    let mut rng = Rng::new(81);
    let sp = specials();
    // In order and shuffled, so every special value sits in a vector lane and in
    // a tail somewhere.
    let mut shuffled = sp.clone();
    rng.shuffle(&mut shuffled);
    for (set, v) in [("specials", &sp), ("shuffled specials", &shuffled)] {
        check(&format!("{name} {set}"), level, v);
        for &n in &LENGTHS[..7] {
            for start in [0, 3] {
                let v = &v[start..start + n];
                check(&format!("{name} {set}[{start}..+{n}]"), level, v);
            }
        }
    }
    let r = random(&mut rng, (1 << 16) + 8);
    for n in LENGTHS {
        for start in [0, 1, 5] {
            check(
                &format!("{name} random[{start}..+{n}]"),
                level,
                &r[start..start + n],
            );
        }
    }
}

/// Every level, each forced through `kv_store_at`: those this CPU lacks are
/// named as skipped (`kv_store_at` would lower them).
#[test]
fn kv_store_is_from_f32_at_every_level() {
    for l in Level::ALL {
        if !l.is_supported() {
            eprintln!("kv_store at {}: skipped, this CPU lacks it", l.name());
            continue;
        }
        check_level(Some(l));
        eprintln!("kv_store at {}: checked", l.name());
    }
}

#[test]
fn kv_store_dispatched() {
    check_level(None);
}

#[test]
#[should_panic(expected = "kv_store: length mismatch")]
fn kv_store_checks_lengths() {
    let mut dst = [f16::ZERO; 3];
    cpu::kv_store(&[1.0, 2.0], &mut dst);
}
