//! The int8 matmul of Q8_0 and Q4_0 weights: `out = x . W^T (+ b)` from
//! activations quantized per 32-block ([`QuantizedActs`]) and 4-byte integer
//! dots (`vpdpbusd`, or `maddubs` + `madd`), like ggml's `vec_dot_q4_0_q8_0`,
//! but over the panels of [`PackedMatrix`] (layout in `pack`). Each micro-tile
//! is `INT8_MR` activation rows ([`Panel::INT8_MR`], one group of the
//! activations) × one panel's 16 rows.

use super::super::isa::{Cpu, Kernel, Panel};
use super::super::OutPtr;
use super::{write_tile, PackedMatrix, QuantizedActs, PANEL};
use crate::cpu::dispatch::Prefetch;
use crate::{Epilogue, QuantType, QK};

/// Activation rows per cache chunk.
const MC: usize = 64;

pub(super) struct Job<'a> {
    pub w: &'a PackedMatrix,
    /// how far ahead decode prefetches, into which cache
    /// ([`crate::cpu::dispatch::Tuning::int8_prefetch`])
    pub prefetch: Prefetch,
    pub acts: &'a QuantizedActs,
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
    /// `acts` were quantized for the entered level; no other task writes
    /// panels `p0..p1`'s columns of `out`.
    #[inline(always)]
    unsafe fn run<C: Cpu>(self, _: C) {
        sweep::<C>(self.job, self.p0, self.p1)
    }
}

/// Decode's tiles (up to 12 rows: a batched decode step) stream their panel
/// once: fetch the block `pf.distance` bytes ahead, into L1 or L2 (the CPU's
/// [`crate::cpu::dispatch::Tuning::int8_prefetch`]), one hint per cache line.
/// Without it, 4-, 8- and 12-row steps ran 15-40% slower on a model-sized
/// weight set (`examples/batch_decode_speed`); with more rows than one tile,
/// the panel is read again from cache for the later tiles.
#[inline(always)]
unsafe fn prefetch_block<I: Panel, const M: usize>(blk: *const u8, bb: usize, pf: Prefetch) {
    if M <= 12 && pf.distance > 0 {
        for off in (0..bb).step_by(64) {
            I::prefetch(blk.add(pf.distance + off), pf.l2);
        }
    }
}

/// All activation rows against panels `p0..p1`.
#[inline(always)]
unsafe fn sweep<I: Panel>(job: &Job, p0: usize, p1: usize) {
    let n = job.w.rows;
    let g = job.acts.g;
    // A chunk of whole groups, small enough to stay in L2 while a thread sweeps
    // its panels (each panel then stays in L1 across the chunk's tiles).
    let mc = g * (MC / g).max(1);
    for i0 in (0..job.m).step_by(mc) {
        let i1 = (i0 + mc).min(job.m);
        for p in p0..p1 {
            for i in (i0..i1).step_by(g) {
                let r = g.min(i1 - i);
                let mut tile = [[0.0f32; PANEL]; MAX_MR];
                let grp = i / g;
                macro_rules! tiles {
                    ($($m:literal)*) => {
                        match (job.w.ty, r) {
                            $((QuantType::Q4_0, $m) => tile_q4::<I, $m>(job, p, grp, &mut tile),)*
                            $((_, $m) => tile_q8::<I, $m>(job, p, grp, &mut tile),)*
                            _ => unreachable!("tile of {r} rows"),
                        }
                    };
                }
                tiles!(1 2 3 4 5 6 7 8 9 10 11 12);
                let c0 = p * PANEL;
                let cols = PANEL.min(n - c0);
                for (ii, t) in tile[..r].iter().enumerate() {
                    let o = job.out.get().add((i + ii) * n + c0);
                    write_tile::<I>(&t[..cols], o, c0, job.bias, job.epilogue);
                }
            }
        }
    }
}

/// The tallest micro-tile of any level.
const MAX_MR: usize = 12;

/// Pointers to block 0 of a group's quants, scales and start values.
#[inline(always)]
unsafe fn group_ptrs(a: &QuantizedActs, grp: usize) -> (*const i8, *const f32, *const i32) {
    let o = grp * a.nb * a.g;
    (
        a.qs.as_ptr().add(o * QK),
        a.d.as_ptr().add(o),
        a.init.as_ptr().add(o),
    )
}

/// Tiles of few rows run two dot chains per row, so the `vpdpbusd` latency
/// (about 5 cycles) does not bound them; tall tiles have enough rows in flight.
const fn two_chains(m: usize) -> bool {
    m <= 4
}

/// One micro-tile of `M` activation rows × panel `p`: per block, `dots` adds
/// the 16 rows' integer dots with each activation row to `acc` (and `acc2`
/// when [`two_chains`]), given the block's quants (after the 32 bytes of
/// scales) and row 0's activation bytes; then every row's sum is scaled into
/// its f32 accumulator.
#[inline(always)]
unsafe fn tile_int8<I: Panel, const M: usize>(
    job: &Job,
    p: usize,
    grp: usize,
    tile: &mut [[f32; PANEL]; MAX_MR],
    dots: impl Fn(*const u8, *const i8, &mut [I::I; M], &mut [I::I; M]),
) {
    let a = job.acts;
    let g = a.g;
    let bb = job.w.block_bytes;
    let mut blk = job.w.panel(p);
    let (mut xq, mut xd, mut xi) = group_ptrs(a, grp);
    let mut facc = [I::fzero(); M];
    for _ in 0..a.nb {
        prefetch_block::<I, M>(blk, bb, job.prefetch);
        let mut acc: [I::I; M] = std::array::from_fn(|i| I::bcast_i32(xi.add(i)));
        let mut acc2 = [I::izero(); M];
        dots(blk.add(32), xq, &mut acc, &mut acc2);
        let dw = I::scales(blk);
        for i in 0..M {
            let s = if two_chains(M) {
                I::iadd(acc[i], acc2[i])
            } else {
                acc[i]
            };
            facc[i] = I::fma_block(facc[i], s, dw, xd.add(i));
        }
        blk = blk.add(bb);
        xq = xq.add(g * QK);
        xd = xd.add(g);
        xi = xi.add(g);
    }
    for i in 0..M {
        I::store_f(tile[i].as_mut_ptr(), facc[i]);
    }
}

/// Q4_0: each 64-byte quant vector `c` holds elements `4c..` in its low
/// nibbles and `16 + 4c..` in its high ones (unsigned; the -8 is in the start
/// value).
#[inline(always)]
unsafe fn tile_q4<I: Panel, const M: usize>(
    job: &Job,
    p: usize,
    grp: usize,
    tile: &mut [[f32; PANEL]; MAX_MR],
) {
    tile_int8::<I, M>(job, p, grp, tile, |q, xq, acc, acc2| {
        for c in 0..4 {
            let (lo, hi) = I::nibbles(I::load_q(q.add(64 * c)));
            for i in 0..M {
                let xp = xq.add(i * QK + 4 * c);
                acc[i] = I::dot_us(acc[i], lo, I::bcast4(xp));
                if two_chains(M) {
                    acc2[i] = I::dot_us(acc2[i], hi, I::bcast4(xp.add(16)));
                } else {
                    acc[i] = I::dot_us(acc[i], hi, I::bcast4(xp.add(16)));
                }
            }
        }
    })
}

/// Q8_0: quant vector `c` holds elements `4c..4c + 4`.
#[inline(always)]
unsafe fn tile_q8<I: Panel, const M: usize>(
    job: &Job,
    p: usize,
    grp: usize,
    tile: &mut [[f32; PANEL]; MAX_MR],
) {
    tile_int8::<I, M>(job, p, grp, tile, |q, xq, acc, acc2| {
        for c in (0..8).step_by(2) {
            let w0 = I::q8_prep(I::load_q(q.add(64 * c)));
            let w1 = I::q8_prep(I::load_q(q.add(64 * (c + 1))));
            for i in 0..M {
                let xp = xq.add(i * QK + 4 * c);
                acc[i] = I::q8_dot(acc[i], w0, I::bcast4(xp));
                if two_chains(M) {
                    acc2[i] = I::q8_dot(acc2[i], w1, I::bcast4(xp.add(4)));
                } else {
                    acc[i] = I::q8_dot(acc[i], w1, I::bcast4(xp.add(4)));
                }
            }
        }
    })
}
