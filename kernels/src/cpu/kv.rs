//! Stores into the KV cache: K/V rows converted to the pool's element type
//! (f16: with the level's vector conversion, [`super::isa::Simd::store_h`]).

use half::f16;
use rayon::prelude::*;

use super::dispatch::{best_up_to, Level};
use super::isa::{self, Cpu, Kernel};
use super::PAR_MIN;
use crate::{KvDtype, KvElem};

pub(crate) fn kv_store<E: KvElem>(level: Level, src: &[f32], dst: &mut [E]) {
    assert_eq!(src.len(), dst.len(), "kv_store: length mismatch");
    match E::DTYPE {
        KvDtype::F32 => bytemuck::cast_slice_mut::<E, f32>(dst).copy_from_slice(src),
        KvDtype::F16 => {
            let dst = bytemuck::cast_slice_mut::<E, f16>(dst);
            let level = best_up_to(level);
            // A prefill chunk's rows (a decode step's is one row: serial).
            if dst.len() >= 2 * PAR_MIN {
                dst.par_chunks_mut(PAR_MIN)
                    .zip(src.par_chunks(PAR_MIN))
                    .for_each(|(d, s)| to_f16(level, s, d));
            } else {
                to_f16(level, src, dst);
            }
        }
    }
}

/// `dst = src` rounded to nearest even: the vector conversions round as
/// `f16::from_f32` does (it is the F16C instruction where the CPU has one), so
/// the tails go through it.
fn to_f16(level: Level, src: &[f32], dst: &mut [f16]) {
    // SAFETY: `level` is supported (see `kv_store`).
    let done = unsafe { isa::run(level, ToF16 { src, dst }) };
    for (d, &s) in dst[done..].iter_mut().zip(&src[done..]) {
        *d = f16::from_f32(s);
    }
}

/// Converts the leading multiple of `LANES` elements; returns how many.
struct ToF16<'a> {
    src: &'a [f32],
    dst: &'a mut [f16],
}

impl Kernel for ToF16<'_> {
    type Out = usize;
    #[inline(always)]
    unsafe fn run<C: Cpu>(self, s: C) -> usize {
        let lanes = C::LANES;
        let n = self.src.len().min(self.dst.len()) / lanes * lanes;
        for c in (0..n).step_by(lanes) {
            // SAFETY: c + lanes <= n, within both slices.
            s.store_h(
                self.dst.as_mut_ptr().add(c),
                s.load(self.src.as_ptr().add(c)),
            );
        }
        n
    }
}
