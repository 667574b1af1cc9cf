//! The matmul of F16 and BF16 weights, over the panels of [`PackedMatrix`]
//! (layouts in `pack`), with f32 accumulation, in one of three arithmetics:
//!
//! - F16, and BF16 when exact: f32 activations; every activation row of a
//!   micro-tile does one broadcast FMA with the 16-lane weight vector of each
//!   element (BF16 widens a pair of elements from one 64-byte load).
//! - BF16 with the BF16 dot ([`PackedMatrix::bf16_dot`], the default where the
//!   CPU has `vdpbf16ps`): activations rounded to BF16 once per call, in pairs;
//!   one `vdpbf16ps` per activation row and weight pair does 32 multiply-adds
//!   (twice an FMA's), as llama.cpp's BF16 path does. Levels without the
//!   instruction run the same arithmetic with two FMAs (for tests, and for
//!   `MIPHA_BF16_DOT=1`).
//!
//! Decode streams each thread's panels once, front to back; prefill blocks `k`
//! so a panel slice stays in L1 while the activation rows of a chunk stay in L2.

use super::super::isa::{Cpu, Kernel, Panel};
use super::super::OutPtr;
use super::{write_tile, PackedMatrix, PANEL};
use crate::cpu::dispatch::Prefetch;
use crate::{Epilogue, QuantType};

/// Activation rows per cache chunk.
const MC: usize = 128;
/// Elements of `k` per cache block (a 16 KiB slice of a panel); even, so a
/// BF16 pair never straddles two blocks.
const KC: usize = 512;

pub(super) struct Job<'a> {
    pub w: &'a PackedMatrix,
    /// how far ahead decode prefetches, into which cache
    /// ([`crate::cpu::dispatch::Tuning::float_prefetch`])
    pub prefetch: Prefetch,
    pub x: &'a [f32],
    /// With the BF16 dot: `x` rounded to BF16 pairs (`[m, ceil(k / 2)]`, the
    /// even element in the low half, an odd `k`'s last pair padded with 0).
    pub xb: &'a [u32],
    pub m: usize,
    pub bias: Option<&'a [f32]>,
    pub epilogue: Epilogue,
    pub out: OutPtr,
}

/// The arithmetics (see the module docs).
const F16: u8 = 0;
const BF16_EXACT: u8 = 1;
const BF16_DOT: u8 = 2;

/// Panels `p0..p1` of every activation row.
pub(super) struct Sweep<'a> {
    pub job: &'a Job<'a>,
    pub p0: usize,
    pub p1: usize,
}

impl Kernel for Sweep<'_> {
    type Out = ();
    /// # Safety
    /// No other task writes panels `p0..p1`'s columns of `out`.
    #[inline(always)]
    unsafe fn run<C: Cpu>(self, _: C) {
        let (job, p0, p1) = (self.job, self.p0, self.p1);
        match job.w.ty() {
            QuantType::BF16 if job.w.bf16_dot() => sweep::<C, BF16_DOT>(job, p0, p1),
            QuantType::BF16 => sweep::<C, BF16_EXACT>(job, p0, p1),
            _ => sweep::<C, F16>(job, p0, p1),
        }
    }
}

#[inline(always)]
unsafe fn sweep<I: Panel, const MODE: u8>(job: &Job, p0: usize, p1: usize) {
    let (n, k) = (job.w.rows(), job.w.cols());
    let panel_bytes = job.w.float_panel_bytes();
    let base = job.w.bytes().as_ptr();
    let accumulate = job.epilogue == Epilogue::Accumulate;
    let epilogue = if accumulate {
        Epilogue::Store
    } else {
        job.epilogue
    };
    // Blocking `k` pays only when several tiles reuse a panel slice from L1;
    // a decode step (one tile) streams each panel front to back instead, so
    // the hardware prefetchers and ours see one long run per panel rather
    // than a jump to another panel every 16 KiB.
    let one_tile = job.m <= I::FLOAT_MR;
    let kc = if one_tile { k.max(1) } else { KC };
    for i0 in (0..job.m).step_by(MC) {
        let i1 = (i0 + MC).min(job.m);
        for k0 in (0..k).step_by(kc) {
            let k1 = (k0 + kc).min(k);
            for p in p0..p1 {
                let panel = base.add(p * panel_bytes);
                let c0 = p * PANEL;
                let cols = PANEL.min(n - c0);
                let mut i = i0;
                while i < i1 {
                    let r = I::FLOAT_MR.min(i1 - i);
                    let mut tile = [[0.0f32; PANEL]; 8];
                    // Partial sums of earlier k blocks wait in `out`; a residual
                    // add starts from what `out` holds.
                    if k0 > 0 || accumulate {
                        for (ii, t) in tile[..r].iter_mut().enumerate() {
                            let o = job.out.get().add((i + ii) * n + c0);
                            t[..cols].copy_from_slice(std::slice::from_raw_parts(o, cols));
                        }
                    }
                    macro_rules! tiles {
                        ($($m:literal)*) => {
                            match r {
                                $($m => tile_f::<I, MODE, $m>(job, panel, i, k0, k1, one_tile, &mut tile),)*
                                _ => tile_f::<I, MODE, 8>(job, panel, i, k0, k1, one_tile, &mut tile),
                            }
                        };
                    }
                    tiles!(1 2 3 4 5 6 7);
                    for (ii, t) in tile[..r].iter().enumerate() {
                        let o = job.out.get().add((i + ii) * n + c0);
                        if k1 == k {
                            write_tile::<I>(&t[..cols], o, c0, job.bias, epilogue);
                        } else {
                            // partial sums stay in `out` between k blocks
                            std::ptr::copy_nonoverlapping(t.as_ptr(), o, cols);
                        }
                    }
                    i += r;
                }
            }
        }
    }
}

/// `tile[i] += sum_{kk in k0..k1} x[i0 + i][kk] * panel[kk]` for `M` rows, with
/// two accumulator chains per row (even / odd `kk`, or even / odd pair with
/// the BF16 dot) to cover the FMA latency. Both layouts keep element `kk` of
/// the panel's rows within the 32 bytes at `kk * 32` (a BF16 pair is the 64
/// bytes at `kk * 32` for even `kk`).
#[inline(always)]
unsafe fn tile_f<I: Panel, const MODE: u8, const M: usize>(
    job: &Job,
    panel: *const u8,
    i0: usize,
    k0: usize,
    k1: usize,
    streaming: bool,
    tile: &mut [[f32; PANEL]; 8],
) {
    let k = job.w.cols();
    // Decode (the job is one tile) reads each panel once from memory: ask for
    // the line `pf.distance` bytes ahead so the loads find it in cache.
    let pf = job.prefetch;
    let prefetch = streaming && pf.distance > 0;
    let mut even: [I::F; M] = std::array::from_fn(|i| I::load_f(tile[i].as_ptr()));
    let mut odd = [I::fzero(); M];
    let mut kk = k0;
    if MODE == BF16_DOT {
        // One activation pair per `vdpbf16ps`; chains alternate pairs.
        let kp = k.div_ceil(2);
        let xr: [*const u32; M] = std::array::from_fn(|i| job.xb.as_ptr().add((i0 + i) * kp));
        let kend = k1.next_multiple_of(2);
        while kk + 4 <= kend {
            if prefetch {
                I::prefetch(panel.add(kk * PANEL * 2 + pf.distance), pf.l2);
                I::prefetch(panel.add(kk * PANEL * 2 + pf.distance + 64), pf.l2);
            }
            let w = panel.add(kk * PANEL * 2);
            for i in 0..M {
                even[i] = I::dot_bf16(even[i], w, xr[i].add(kk / 2));
                odd[i] = I::dot_bf16(odd[i], w.add(64), xr[i].add(kk / 2 + 1));
            }
            kk += 4;
        }
        if kk < kend {
            let w = panel.add(kk * PANEL * 2);
            for i in 0..M {
                even[i] = I::dot_bf16(even[i], w, xr[i].add(kk / 2));
            }
        }
    } else {
        let xr: [*const f32; M] = std::array::from_fn(|i| job.x.as_ptr().add((i0 + i) * k));
        let weights = |kk: usize| -> (I::F, I::F) {
            let p = panel.add(kk * PANEL * 2);
            if MODE == BF16_EXACT {
                I::bf16_pair(p)
            } else {
                (I::weights_f16(p), I::weights_f16(p.add(PANEL * 2)))
            }
        };
        while kk + 2 <= k1 {
            if prefetch {
                I::prefetch(panel.add(kk * PANEL * 2 + pf.distance), pf.l2);
            }
            let (w0, w1) = weights(kk);
            for i in 0..M {
                even[i] = I::fmadd(I::bcast_f32(xr[i].add(kk)), w0, even[i]);
                odd[i] = I::fmadd(I::bcast_f32(xr[i].add(kk + 1)), w1, odd[i]);
            }
            kk += 2;
        }
        if kk < k1 {
            // the last element of an odd `k` (a BF16 pair's second half is 0)
            let w0 = if MODE == BF16_EXACT {
                I::bf16_pair(panel.add(kk * PANEL * 2)).0
            } else {
                I::weights_f16(panel.add(kk * PANEL * 2))
            };
            for i in 0..M {
                even[i] = I::fmadd(I::bcast_f32(xr[i].add(kk)), w0, even[i]);
            }
        }
    }
    for i in 0..M {
        I::store_f(tile[i].as_mut_ptr(), I::fadd(even[i], odd[i]));
    }
}
