//! The matmul of F16 and BF16 weights, over the panels of [`PackedMatrix`]
//! (layout in `pack`), with f32 activations and accumulation: every activation
//! row of a micro-tile does one broadcast FMA with the 16-lane weight vector of
//! each element. Decode streams each thread's panels once, front to back;
//! prefill blocks `k` so a panel slice stays in L1 while the activation rows of
//! a chunk stay in L2.

use super::super::isa::{Cpu, Kernel, Panel};
use super::super::OutPtr;
use super::{write_tile, PackedMatrix, PANEL};
use crate::{Epilogue, QuantType};

/// Activation rows per cache chunk.
const MC: usize = 128;
/// Elements of `k` per cache block (a 16 KiB slice of an F16 panel).
const KC: usize = 512;

pub(super) struct Job<'a> {
    pub w: &'a PackedMatrix,
    /// bytes ahead decode prefetches ([`crate::cpu::dispatch::Tuning`]; 0: none)
    pub prefetch: usize,
    pub x: &'a [f32],
    pub m: usize,
    pub bias: Option<&'a [f32]>,
    pub epilogue: Epilogue,
    pub out: OutPtr,
}

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
        if self.job.w.ty() == QuantType::BF16 {
            sweep::<C, true>(self.job, self.p0, self.p1)
        } else {
            sweep::<C, false>(self.job, self.p0, self.p1)
        }
    }
}

/// The 16 stored weights of one element (BF16 or F16) as f32.
#[inline(always)]
unsafe fn weights<I: Panel, const BF: bool>(p: *const u8) -> I::F {
    if BF {
        I::weights_bf16(p)
    } else {
        I::weights_f16(p)
    }
}

#[inline(always)]
unsafe fn sweep<I: Panel, const BF: bool>(job: &Job, p0: usize, p1: usize) {
    let (n, k) = (job.w.rows(), job.w.cols());
    let panel_bytes = k * PANEL * 2;
    let base = job.w.bytes().as_ptr();
    let accumulate = job.epilogue == Epilogue::Accumulate;
    let epilogue = if accumulate {
        Epilogue::Store
    } else {
        job.epilogue
    };
    for i0 in (0..job.m).step_by(MC) {
        let i1 = (i0 + MC).min(job.m);
        for k0 in (0..k).step_by(KC) {
            let k1 = (k0 + KC).min(k);
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
                    match r {
                        1 => tile_f::<I, BF, 1>(job, panel, i, k0, k1, &mut tile),
                        2 => tile_f::<I, BF, 2>(job, panel, i, k0, k1, &mut tile),
                        3 => tile_f::<I, BF, 3>(job, panel, i, k0, k1, &mut tile),
                        4 => tile_f::<I, BF, 4>(job, panel, i, k0, k1, &mut tile),
                        5 => tile_f::<I, BF, 5>(job, panel, i, k0, k1, &mut tile),
                        6 => tile_f::<I, BF, 6>(job, panel, i, k0, k1, &mut tile),
                        7 => tile_f::<I, BF, 7>(job, panel, i, k0, k1, &mut tile),
                        _ => tile_f::<I, BF, 8>(job, panel, i, k0, k1, &mut tile),
                    }
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
/// two accumulator chains per row (even / odd `kk`) to cover FMA latency.
#[inline(always)]
unsafe fn tile_f<I: Panel, const BF: bool, const M: usize>(
    job: &Job,
    panel: *const u8,
    i0: usize,
    k0: usize,
    k1: usize,
    tile: &mut [[f32; PANEL]; 8],
) {
    let k = job.w.cols();
    let xr: [*const f32; M] = std::array::from_fn(|i| job.x.as_ptr().add((i0 + i) * k));
    let mut even: [I::F; M] = std::array::from_fn(|i| I::load_f(tile[i].as_ptr()));
    let mut odd = [I::fzero(); M];
    let mut kk = k0;
    while kk + 2 <= k1 {
        if M <= 2 && job.prefetch > 0 {
            // Decode streams each panel once from memory: ask for the line
            // `job.prefetch` bytes ahead so the loads find it in cache.
            I::prefetch(panel.add(kk * PANEL * 2 + job.prefetch));
        }
        let w0 = weights::<I, BF>(panel.add(kk * PANEL * 2));
        let w1 = weights::<I, BF>(panel.add((kk + 1) * PANEL * 2));
        for i in 0..M {
            even[i] = I::fmadd(I::bcast_f32(xr[i].add(kk)), w0, even[i]);
            odd[i] = I::fmadd(I::bcast_f32(xr[i].add(kk + 1)), w1, odd[i]);
        }
        kk += 2;
    }
    if kk < k1 {
        let w0 = weights::<I, BF>(panel.add(kk * PANEL * 2));
        for i in 0..M {
            even[i] = I::fmadd(I::bcast_f32(xr[i].add(kk)), w0, even[i]);
        }
    }
    for i in 0..M {
        I::store_f(tile[i].as_mut_ptr(), I::fadd(even[i], odd[i]));
    }
}
