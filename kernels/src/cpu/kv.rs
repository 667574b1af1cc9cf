//! Stores into the KV cache: K/V rows converted to the pool's element type.

use half::f16;
use rayon::prelude::*;

use super::dispatch::{best_up_to, Level};
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
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `level` is supported (see `kv_store`): Avx512 has AVX-512F,
        // every level above Portable F16C.
        if level >= Level::Avx512 {
            done = unsafe { x86::to_f16_avx512(src, dst) };
        } else if level >= Level::Avx2 {
            done = unsafe { x86::to_f16_f16c(src, dst) };
        }
    }
    let _ = level;
    for (d, &s) in dst[done..].iter_mut().zip(&src[done..]) {
        *d = f16::from_f32(s);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::f16;

    /// Converts the leading multiple of 16 elements; returns how many.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn to_f16_avx512(src: &[f32], dst: &mut [f16]) -> usize {
        let n = src.len().min(dst.len()) / 16 * 16;
        for c in (0..n).step_by(16) {
            let h =
                _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm512_loadu_ps(src.as_ptr().add(c)));
            _mm256_storeu_si256(dst.as_mut_ptr().add(c).cast(), h);
        }
        n
    }

    /// Converts the leading multiple of 8 elements; returns how many.
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn to_f16_f16c(src: &[f32], dst: &mut [f16]) -> usize {
        let n = src.len().min(dst.len()) / 8 * 8;
        for c in (0..n).step_by(8) {
            let h =
                _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(src.as_ptr().add(c)));
            _mm_storeu_si128(dst.as_mut_ptr().add(c).cast(), h);
        }
        n
    }
}
