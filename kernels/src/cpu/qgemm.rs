//! Integer matmul for Q8_0 and Q4_0 weights: `out = x . W^T (+ b)` with the
//! activations quantized per 32-block to int8 on the fly
//! ([`quantize_act_block`]) and 4-byte integer dots (`vpdpbusd`, or
//! `maddubs` + `madd`), like ggml's `vec_dot_q4_0_q8_0`, but over weights
//! repacked once at load time into panels of 16 rows.
//!
//! Panel layout (one panel = 16 weight rows, its 32-blocks in order; a block
//! of the panel is 32 bytes of f16 scales, one per row, then the quants):
//! quant vector `c` (64 bytes) holds, for rows `r = 0..16`, bytes `4c..4c+4`
//! of row `r`'s block. One 512-bit register is then 16 rows × 4 consecutive
//! elements: `vpdpbusd` against 4 broadcast activation bytes gives the 16 rows'
//! partial dots at once, and the same weights serve every activation row of a
//! tile (prefill) from registers. Q4_0 keeps ggml's nibble order (low nibbles
//! are elements 0..16, high nibbles 16..32), so vector `c` yields elements
//! `4c..4c+4` (low) and `16+4c..` (high); Q4_0's `nibble - 8` becomes
//! `dot(nibble, x) - 8 * sum(x)` with the activation block's sum.
//!
//! Rows past the matrix's end are zero. Threads get static, contiguous panel
//! ranges (one per pool thread); activation rows go in chunks that stay in
//! cache while a thread sweeps its panels.

use std::cell::Cell;

use rayon::prelude::*;

use super::dispatch::Level;
use crate::quant::quantize_act_block;
use crate::{Epilogue, QuantType, WeightView, QK};

/// Weight rows per panel.
pub const PANEL: usize = 16;
/// Activation rows per cache chunk.
const MC: usize = 64;

#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

/// A Q8_0, Q4_0, F16 or BF16 matrix repacked for [`matmul_packed`] (the float
/// layout is in `fgemm`); built once per weight at load time, never stored in a
/// file.
pub struct PackedMatrix {
    ty: QuantType,
    rows: usize,
    cols: usize,
    /// 32-blocks per row
    nb: usize,
    panels: usize,
    /// bytes of one block of one panel
    block_bytes: usize,
    data: Vec<Line>,
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedMatrix({} {}x{})", self.ty, self.rows, self.cols)
    }
}

fn quant_bytes(ty: QuantType) -> Option<usize> {
    match ty {
        QuantType::Q4_0 => Some(16),
        QuantType::Q8_0 => Some(32),
        _ => None,
    }
}

impl PackedMatrix {
    /// Repacks `w`; `None` for types without a panel kernel (F32).
    pub fn pack(w: WeightView) -> Option<Self> {
        let panels = w.rows.div_ceil(PANEL);
        if matches!(w.ty, QuantType::F16 | QuantType::BF16) {
            let panel_bytes = w.cols * PANEL * 2;
            let mut data = vec![Line([0; 64]); (panels * panel_bytes).div_ceil(64)];
            super::fgemm::pack(
                &w,
                &mut Self::as_bytes_mut(&mut data)[..panels * panel_bytes],
            );
            return Some(PackedMatrix {
                ty: w.ty,
                rows: w.rows,
                cols: w.cols,
                nb: 0,
                panels,
                block_bytes: 0,
                data,
            });
        }
        let qb = quant_bytes(w.ty)?;
        let src_block = w.ty.block_bytes();
        let nb = w.cols.div_ceil(QK);
        let block_bytes = 32 + PANEL * qb;
        let panel_bytes = nb * block_bytes;
        let mut data = vec![Line([0; 64]); (panels * panel_bytes).div_ceil(64)];
        let bytes = &mut Self::as_bytes_mut(&mut data)[..panels * panel_bytes];
        if panel_bytes > 0 {
            bytes
                .par_chunks_mut(panel_bytes)
                .enumerate()
                .for_each(|(p, dst)| {
                    for r in 0..PANEL.min(w.rows - p * PANEL) {
                        let row = w.row(p * PANEL + r);
                        for b in 0..nb {
                            let s = &row[b * src_block..(b + 1) * src_block];
                            let d = &mut dst[b * block_bytes..(b + 1) * block_bytes];
                            d[2 * r..2 * r + 2].copy_from_slice(&s[..2]);
                            for c in 0..qb / 4 {
                                let o = 32 + 64 * c + 4 * r;
                                d[o..o + 4].copy_from_slice(&s[2 + 4 * c..6 + 4 * c]);
                            }
                        }
                    }
                });
        }
        Some(PackedMatrix {
            ty: w.ty,
            rows: w.rows,
            cols: w.cols,
            nb,
            panels,
            block_bytes,
            data,
        })
    }

    fn as_bytes_mut(data: &mut [Line]) -> &mut [u8] {
        // SAFETY: Line is 64 plain bytes; the slice covers exactly the allocation.
        unsafe { std::slice::from_raw_parts_mut(data.as_mut_ptr() as *mut u8, data.len() * 64) }
    }

    pub(super) fn bytes(&self) -> &[u8] {
        // SAFETY: as in as_bytes_mut.
        unsafe { std::slice::from_raw_parts(self.data.as_ptr() as *const u8, self.data.len() * 64) }
    }

    pub fn ty(&self) -> QuantType {
        self.ty
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Bytes the packed copy occupies.
    pub fn size_bytes(&self) -> usize {
        self.data.len() * 64
    }

    fn panel(&self, p: usize) -> *const u8 {
        // SAFETY (for callers): p < panels, so the offset is inside `data`.
        unsafe { (self.data.as_ptr() as *const u8).add(p * self.nb * self.block_bytes) }
    }
}

/// Activation rows quantized per 32-block: `qs[i][b * 32..]`, scale `d[i][b]`,
/// and `8 * sum(q)` as f32 (Q4_0's offset term).
#[derive(Default)]
struct Acts {
    nb: usize,
    qs: Vec<i8>,
    /// `q + 128` (as u8), for the VNNI Q8_0 kernels: filled only when asked
    qu: Vec<u8>,
    d: Vec<f32>,
    off: Vec<f32>,
}

impl Acts {
    fn quantize(&mut self, x: &[f32], m: usize, k: usize, unsigned_copy: bool) {
        let nb = k.div_ceil(QK);
        self.nb = nb;
        self.qs.resize(m * nb * QK, 0);
        self.d.resize(m * nb, 0.0);
        self.off.resize(m * nb, 0.0);
        let row = |(((xr, qs), d), off): RowParts| {
            for b in 0..nb {
                let mut xs = [0.0f32; QK];
                let end = ((b + 1) * QK).min(k);
                xs[..end - b * QK].copy_from_slice(&xr[b * QK..end]);
                let q: &mut [i8; QK] = (&mut qs[b * QK..(b + 1) * QK]).try_into().unwrap();
                let (scale, sum) = quantize_act_block(&xs, q);
                d[b] = scale;
                off[b] = 8.0 * sum as f32;
            }
        };
        if m >= 4 {
            x.par_chunks(k)
                .zip(self.qs.par_chunks_mut(nb * QK))
                .zip(self.d.par_chunks_mut(nb))
                .zip(self.off.par_chunks_mut(nb))
                .for_each(row);
        } else {
            x.chunks(k)
                .zip(self.qs.chunks_mut(nb * QK))
                .zip(self.d.chunks_mut(nb))
                .zip(self.off.chunks_mut(nb))
                .for_each(row);
        }
        if unsigned_copy {
            self.qu.resize(self.qs.len(), 0);
            for (u, q) in self.qu.iter_mut().zip(&self.qs) {
                *u = (*q as u8) ^ 0x80;
            }
        }
    }
}

/// One activation row and its quantized outputs.
type RowParts<'a> = (((&'a [f32], &'a mut [i8]), &'a mut [f32]), &'a mut [f32]);

thread_local! {
    /// Quantized activations, kept between calls so steady-state matmuls do not
    /// allocate. Taken out while in use (a nested call gets a fresh one).
    static ACTS: Cell<Acts> = Cell::new(Acts::default());
}

/// Writes 16 columns at a time into `out` rows of `n` from several threads;
/// every task owns a disjoint set of columns.
#[derive(Clone, Copy)]
pub(super) struct OutPtr(pub(super) *mut f32);
// SAFETY: tasks write disjoint column ranges of the output.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// `out[m, n] = x[m, k] . W^T (+ bias)` through the integer kernels of `level`
/// (clamped to what the CPU supports).
pub(crate) fn matmul_packed(
    level: Level,
    x: &[f32],
    m: usize,
    w: &PackedMatrix,
    bias: Option<&[f32]>,
    epilogue: Epilogue,
    out: &mut [f32],
) {
    assert_eq!(x.len(), m * w.cols, "matmul: x is not m x k");
    assert_eq!(out.len(), m * w.rows, "matmul: out is not m x n");
    if let Some(b) = bias {
        assert_eq!(b.len(), w.rows, "matmul: bias length != n");
    }
    if m == 0 || w.rows == 0 {
        return;
    }
    if w.cols == 0 {
        let zeros = [0.0f32; PANEL];
        for row in out.chunks_exact_mut(w.rows) {
            for c0 in (0..w.rows).step_by(PANEL) {
                let cols = PANEL.min(w.rows - c0);
                // SAFETY: c0 + cols <= row.len().
                unsafe { write_tile(&zeros[..cols], row.as_mut_ptr().add(c0), c0, bias, epilogue) };
            }
        }
        return;
    }
    let level = if level.is_supported() {
        level
    } else {
        super::dispatch::best_up_to(level)
    };
    let tasks = rayon::current_num_threads().min(w.panels).max(1);
    if matches!(w.ty, QuantType::F16 | QuantType::BF16) {
        let job = super::fgemm::FJob {
            w,
            x,
            m,
            bias,
            epilogue,
            out: OutPtr(out.as_mut_ptr()),
        };
        // SAFETY: level is supported by this CPU; panel ranges are disjoint.
        over_panels(w.panels, tasks, |p0, p1| unsafe { job.run(level, p0, p1) });
        return;
    }
    let mut acts = ACTS.take();
    let unsigned_copy =
        w.ty == QuantType::Q8_0 && matches!(level, Level::AvxVnni | Level::Avx512Vnni);
    acts.quantize(x, m, w.cols, unsigned_copy);
    let job = Job {
        w,
        acts: &acts,
        m,
        bias,
        epilogue,
        out: OutPtr(out.as_mut_ptr()),
    };
    // SAFETY: level is supported by this CPU; panel ranges are disjoint.
    over_panels(w.panels, tasks, |p0, p1| unsafe { job.run(level, p0, p1) });
    ACTS.set(acts);
}

/// Splits `panels` into `tasks` static, contiguous ranges `p0..p1`, one per
/// pool thread (no splitting, and no pool round trip, for a single task).
fn over_panels(panels: usize, tasks: usize, run: impl Fn(usize, usize) + Sync) {
    let range = |t: usize| run(panels * t / tasks, panels * (t + 1) / tasks);
    if tasks == 1 {
        range(0);
    } else {
        (0..tasks).into_par_iter().with_min_len(1).for_each(range);
    }
}

struct Job<'a> {
    w: &'a PackedMatrix,
    acts: &'a Acts,
    m: usize,
    bias: Option<&'a [f32]>,
    epilogue: Epilogue,
    out: OutPtr,
}

/// Writes one tile row: `v = tile + bias[c0..]`, then the epilogue, into `out`
/// (`tile.len()` columns starting at output column `c0`).
#[inline(always)]
pub(super) unsafe fn write_tile(
    tile: &[f32],
    out: *mut f32,
    c0: usize,
    bias: Option<&[f32]>,
    epilogue: Epilogue,
) {
    let cols = tile.len();
    let mut v = [0.0f32; PANEL];
    v[..cols].copy_from_slice(tile);
    if let Some(b) = bias {
        for (l, x) in v[..cols].iter_mut().enumerate() {
            *x += b[c0 + l];
        }
    }
    match epilogue {
        Epilogue::Store => {}
        Epilogue::GeluTanh | Epilogue::GeluErf => {
            let f = if epilogue == Epilogue::GeluTanh {
                super::math::gelu_tanh8
            } else {
                super::math::gelu_erf8
            };
            for h in 0..PANEL / 8 {
                let y = f(super::math::load(&v[8 * h..]));
                super::math::store(&mut v[8 * h..], y);
            }
        }
        Epilogue::Accumulate => {
            for (l, x) in v[..cols].iter_mut().enumerate() {
                *x += *out.add(l);
            }
        }
    }
    std::ptr::copy_nonoverlapping(v.as_ptr(), out, cols);
}

impl Job<'_> {
    unsafe fn run(&self, level: Level, p0: usize, p1: usize) {
        #[cfg(target_arch = "x86_64")]
        match level {
            Level::Avx512Vnni => return x86::run_avx512vnni(self, p0, p1),
            Level::Avx512 => return x86::run_avx512(self, p0, p1),
            Level::AvxVnni => return x86::run_avxvnni(self, p0, p1),
            Level::Avx2 => return x86::run_avx2(self, p0, p1),
            Level::Portable => {}
        }
        sweep::<Portable>(self, p0, p1)
    }
}

/// The few vector operations the integer kernels need, over 16 i32 / f32 lanes
/// (one panel's rows): one 512-bit register, two 256-bit ones, or plain arrays.
trait Isa {
    type I: Copy;
    type F: Copy;
    /// Activation rows per micro-tile.
    const MR: usize;
    unsafe fn izero() -> Self::I;
    unsafe fn fzero() -> Self::F;
    /// 64 bytes of a panel's quant vector.
    unsafe fn load_q(p: *const u8) -> Self::I;
    /// Low and high nibbles of every byte.
    unsafe fn nibbles(v: Self::I) -> (Self::I, Self::I);
    /// 4 activation bytes repeated in every lane.
    unsafe fn bcast4(p: *const i8) -> Self::I;
    /// Per lane: `acc + sum of 4 u8 x s8 products` (`u` is at most 128).
    unsafe fn dot_us(acc: Self::I, u: Self::I, s: Self::I) -> Self::I;
    /// Per lane: `acc + sum of 4 s8 x s8 products`.
    #[inline(always)]
    unsafe fn dot_ss(acc: Self::I, w: Self::I, x: Self::I) -> Self::I {
        let (u, s) = Self::abs_sign(w, x);
        Self::dot_us(acc, u, s)
    }
    /// `(|w|, x * sign(w))`, turning a signed dot into `dot_us`.
    unsafe fn abs_sign(w: Self::I, x: Self::I) -> (Self::I, Self::I);
    unsafe fn iadd(a: Self::I, b: Self::I) -> Self::I;
    /// `acc - 128 * s`
    unsafe fn sub_128x(acc: Self::I, s: Self::I) -> Self::I;
    /// `vpdpbusd` kernels take Q8_0 activations as `q + 128` (unsigned, so the
    /// broadcast folds into the dot) and subtract `128 * sum(w)`; the `maddubs`
    /// ones cannot (u8 x s8 pairs would saturate 16 bits) and use `|w|, x sign(w)`.
    const Q8_UNSIGNED_X: bool = false;
    /// 4 bytes of 1 in every lane.
    unsafe fn ones() -> Self::I;
    /// 16 f16 scales.
    unsafe fn scales(p: *const u8) -> Self::F;
    /// `facc + (f32(acc) - off) * dw * dx`.
    unsafe fn fma_block(facc: Self::F, acc: Self::I, off: f32, dw: Self::F, dx: f32) -> Self::F;
    unsafe fn store(v: Self::F, out: &mut [f32; PANEL]);
}

/// All activation rows against panels `p0..p1`.
#[inline(always)]
unsafe fn sweep<I: Isa>(job: &Job, p0: usize, p1: usize) {
    let n = job.w.rows;
    for i0 in (0..job.m).step_by(MC) {
        let i1 = (i0 + MC).min(job.m);
        for p in p0..p1 {
            let mut i = i0;
            while i < i1 {
                let r = I::MR.min(i1 - i);
                let mut tile = [[0.0f32; PANEL]; 8];
                match (job.w.ty, r) {
                    (QuantType::Q4_0, 1) => tile_q4::<I, 1>(job, p, i, &mut tile),
                    (QuantType::Q4_0, 2) => tile_q4::<I, 2>(job, p, i, &mut tile),
                    (QuantType::Q4_0, 3) => tile_q4::<I, 3>(job, p, i, &mut tile),
                    (QuantType::Q4_0, 4) => tile_q4::<I, 4>(job, p, i, &mut tile),
                    (QuantType::Q4_0, 5) => tile_q4::<I, 5>(job, p, i, &mut tile),
                    (QuantType::Q4_0, 6) => tile_q4::<I, 6>(job, p, i, &mut tile),
                    (QuantType::Q4_0, 7) => tile_q4::<I, 7>(job, p, i, &mut tile),
                    (QuantType::Q4_0, _) => tile_q4::<I, 8>(job, p, i, &mut tile),
                    (_, 1) => tile_q8::<I, 1>(job, p, i, &mut tile),
                    (_, 2) => tile_q8::<I, 2>(job, p, i, &mut tile),
                    (_, 3) => tile_q8::<I, 3>(job, p, i, &mut tile),
                    (_, 4) => tile_q8::<I, 4>(job, p, i, &mut tile),
                    (_, 5) => tile_q8::<I, 5>(job, p, i, &mut tile),
                    (_, 6) => tile_q8::<I, 6>(job, p, i, &mut tile),
                    (_, 7) => tile_q8::<I, 7>(job, p, i, &mut tile),
                    (_, _) => tile_q8::<I, 8>(job, p, i, &mut tile),
                }
                let c0 = p * PANEL;
                let cols = PANEL.min(n - c0);
                for (ii, t) in tile[..r].iter().enumerate() {
                    let o = job.out.0.add((i + ii) * n + c0);
                    write_tile(&t[..cols], o, c0, job.bias, job.epilogue);
                }
                i += r;
            }
        }
    }
}

#[inline(always)]
unsafe fn tile_q4<I: Isa, const M: usize>(
    job: &Job,
    p: usize,
    i0: usize,
    tile: &mut [[f32; PANEL]; 8],
) {
    let a = job.acts;
    let nb = a.nb;
    let bb = job.w.block_bytes;
    let mut blk = job.w.panel(p);
    // Row i's block b: quants at xq[i] + 32 b, scale and offset at xd[i] / xo[i] + b.
    let xq: [*const i8; M] = std::array::from_fn(|i| a.qs.as_ptr().add((i0 + i) * nb * QK));
    let xd: [*const f32; M] = std::array::from_fn(|i| a.d.as_ptr().add((i0 + i) * nb));
    let xo: [*const f32; M] = std::array::from_fn(|i| a.off.as_ptr().add((i0 + i) * nb));
    let mut facc = [I::fzero(); M];
    for b in 0..nb {
        // Two chains per row (low / high nibbles) halve the dot latency chain.
        let mut lo_acc = [I::izero(); M];
        let mut hi_acc = [I::izero(); M];
        for c in 0..4 {
            let (lo, hi) = I::nibbles(I::load_q(blk.add(32 + 64 * c)));
            for i in 0..M {
                let xp = xq[i].add(b * QK);
                lo_acc[i] = I::dot_us(lo_acc[i], lo, I::bcast4(xp.add(4 * c)));
                hi_acc[i] = I::dot_us(hi_acc[i], hi, I::bcast4(xp.add(16 + 4 * c)));
            }
        }
        let dw = I::scales(blk);
        for i in 0..M {
            let acc = I::iadd(lo_acc[i], hi_acc[i]);
            facc[i] = I::fma_block(facc[i], acc, *xo[i].add(b), dw, *xd[i].add(b));
        }
        blk = blk.add(bb);
    }
    for i in 0..M {
        I::store(facc[i], &mut tile[i]);
    }
}

#[inline(always)]
unsafe fn tile_q8<I: Isa, const M: usize>(
    job: &Job,
    p: usize,
    i0: usize,
    tile: &mut [[f32; PANEL]; 8],
) {
    let a = job.acts;
    let nb = a.nb;
    let bb = job.w.block_bytes;
    let mut blk = job.w.panel(p);
    let xq: [*const i8; M] = std::array::from_fn(|i| a.qs.as_ptr().add((i0 + i) * nb * QK));
    let xu: [*const u8; M] = if I::Q8_UNSIGNED_X {
        std::array::from_fn(|i| a.qu.as_ptr().add((i0 + i) * nb * QK))
    } else {
        [std::ptr::null(); M]
    };
    let xd: [*const f32; M] = std::array::from_fn(|i| a.d.as_ptr().add((i0 + i) * nb));
    let mut facc = [I::fzero(); M];
    for b in 0..nb {
        let mut even = [I::izero(); M];
        let mut odd = [I::izero(); M];
        let mut wsum = I::izero();
        for c in (0..8).step_by(2) {
            let w0 = I::load_q(blk.add(32 + 64 * c));
            let w1 = I::load_q(blk.add(32 + 64 * (c + 1)));
            if I::Q8_UNSIGNED_X {
                wsum = I::dot_us(wsum, I::ones(), w0);
                wsum = I::dot_us(wsum, I::ones(), w1);
                for i in 0..M {
                    let xp = xu[i].add(b * QK) as *const i8;
                    even[i] = I::dot_us(even[i], I::bcast4(xp.add(4 * c)), w0);
                    odd[i] = I::dot_us(odd[i], I::bcast4(xp.add(4 * c + 4)), w1);
                }
            } else {
                for i in 0..M {
                    let xp = xq[i].add(b * QK);
                    even[i] = I::dot_ss(even[i], w0, I::bcast4(xp.add(4 * c)));
                    odd[i] = I::dot_ss(odd[i], w1, I::bcast4(xp.add(4 * c + 4)));
                }
            }
        }
        let dw = I::scales(blk);
        for i in 0..M {
            let mut acc = I::iadd(even[i], odd[i]);
            if I::Q8_UNSIGNED_X {
                acc = I::sub_128x(acc, wsum);
            }
            facc[i] = I::fma_block(facc[i], acc, 0.0, dw, *xd[i].add(b));
        }
        blk = blk.add(bb);
    }
    for i in 0..M {
        I::store(facc[i], &mut tile[i]);
    }
}

/// Plain arrays: what any target compiles (and auto-vectorizes).
struct Portable;

impl Isa for Portable {
    type I = [i32; 16];
    type F = [f32; 16];
    const MR: usize = 2;
    #[inline(always)]
    unsafe fn izero() -> [i32; 16] {
        [0; 16]
    }
    #[inline(always)]
    unsafe fn fzero() -> [f32; 16] {
        [0.0; 16]
    }
    #[inline(always)]
    unsafe fn load_q(p: *const u8) -> [i32; 16] {
        std::ptr::read_unaligned(p as *const [i32; 16])
    }
    #[inline(always)]
    unsafe fn nibbles(v: [i32; 16]) -> ([i32; 16], [i32; 16]) {
        (
            v.map(|x| x & 0x0f0f_0f0f),
            v.map(|x| (x >> 4) & 0x0f0f_0f0f),
        )
    }
    #[inline(always)]
    unsafe fn bcast4(p: *const i8) -> [i32; 16] {
        [std::ptr::read_unaligned(p as *const i32); 16]
    }
    #[inline(always)]
    unsafe fn dot_us(acc: [i32; 16], u: [i32; 16], s: [i32; 16]) -> [i32; 16] {
        std::array::from_fn(|l| {
            let (u, s) = (u[l].to_le_bytes(), s[l].to_le_bytes());
            acc[l] + (0..4).map(|t| u[t] as i32 * s[t] as i8 as i32).sum::<i32>()
        })
    }
    #[inline(always)]
    unsafe fn dot_ss(acc: [i32; 16], w: [i32; 16], x: [i32; 16]) -> [i32; 16] {
        std::array::from_fn(|l| {
            let (w, x) = (w[l].to_le_bytes(), x[l].to_le_bytes());
            acc[l]
                + (0..4)
                    .map(|t| w[t] as i8 as i32 * x[t] as i8 as i32)
                    .sum::<i32>()
        })
    }
    #[inline(always)]
    unsafe fn abs_sign(w: [i32; 16], x: [i32; 16]) -> ([i32; 16], [i32; 16]) {
        (w, x) // unused: dot_ss is direct
    }
    #[inline(always)]
    unsafe fn iadd(a: [i32; 16], b: [i32; 16]) -> [i32; 16] {
        std::array::from_fn(|l| a[l] + b[l])
    }
    #[inline(always)]
    unsafe fn sub_128x(acc: [i32; 16], s: [i32; 16]) -> [i32; 16] {
        std::array::from_fn(|l| acc[l] - 128 * s[l])
    }
    #[inline(always)]
    unsafe fn ones() -> [i32; 16] {
        [0x0101_0101; 16]
    }
    #[inline(always)]
    unsafe fn scales(p: *const u8) -> [f32; 16] {
        let h: [u16; 16] = std::ptr::read_unaligned(p as *const [u16; 16]);
        h.map(|v| half::f16::from_bits(v).to_f32())
    }
    #[inline(always)]
    unsafe fn fma_block(
        facc: [f32; 16],
        acc: [i32; 16],
        off: f32,
        dw: [f32; 16],
        dx: f32,
    ) -> [f32; 16] {
        std::array::from_fn(|l| (acc[l] as f32 - off).mul_add(dw[l] * dx, facc[l]))
    }
    #[inline(always)]
    unsafe fn store(v: [f32; 16], out: &mut [f32; PANEL]) {
        *out = v;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{sweep, Isa, Job, PANEL};

    /// One 512-bit register per 16 lanes; `VNNI` picks `vpdpbusd` over
    /// `maddubs` + `madd`.
    pub(super) struct Zmm<const VNNI: bool>;

    impl<const VNNI: bool> Isa for Zmm<VNNI> {
        type I = __m512i;
        type F = __m512;
        const MR: usize = 8;
        #[inline(always)]
        unsafe fn izero() -> __m512i {
            _mm512_setzero_si512()
        }
        #[inline(always)]
        unsafe fn fzero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load_q(p: *const u8) -> __m512i {
            _mm512_loadu_si512(p as *const _)
        }
        #[inline(always)]
        unsafe fn nibbles(v: __m512i) -> (__m512i, __m512i) {
            let m = _mm512_set1_epi8(0x0f);
            (
                _mm512_and_si512(v, m),
                _mm512_and_si512(_mm512_srli_epi16(v, 4), m),
            )
        }
        #[inline(always)]
        unsafe fn bcast4(p: *const i8) -> __m512i {
            _mm512_set1_epi32(std::ptr::read_unaligned(p as *const i32))
        }
        #[inline(always)]
        unsafe fn dot_us(acc: __m512i, u: __m512i, s: __m512i) -> __m512i {
            if VNNI {
                _mm512_dpbusd_epi32(acc, u, s)
            } else {
                let pairs = _mm512_maddubs_epi16(u, s);
                _mm512_add_epi32(acc, _mm512_madd_epi16(pairs, _mm512_set1_epi16(1)))
            }
        }
        #[inline(always)]
        unsafe fn abs_sign(w: __m512i, x: __m512i) -> (__m512i, __m512i) {
            let neg = _mm512_movepi8_mask(w);
            (
                _mm512_abs_epi8(w),
                _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x),
            )
        }
        #[inline(always)]
        unsafe fn iadd(a: __m512i, b: __m512i) -> __m512i {
            _mm512_add_epi32(a, b)
        }
        const Q8_UNSIGNED_X: bool = VNNI;
        #[inline(always)]
        unsafe fn sub_128x(acc: __m512i, s: __m512i) -> __m512i {
            _mm512_sub_epi32(acc, _mm512_slli_epi32(s, 7))
        }
        #[inline(always)]
        unsafe fn ones() -> __m512i {
            _mm512_set1_epi8(1)
        }
        #[inline(always)]
        unsafe fn scales(p: *const u8) -> __m512 {
            _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
        }
        #[inline(always)]
        unsafe fn fma_block(facc: __m512, acc: __m512i, off: f32, dw: __m512, dx: f32) -> __m512 {
            let v = _mm512_sub_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(off));
            _mm512_fmadd_ps(v, _mm512_mul_ps(dw, _mm512_set1_ps(dx)), facc)
        }
        #[inline(always)]
        unsafe fn store(v: __m512, out: &mut [f32; PANEL]) {
            _mm512_storeu_ps(out.as_mut_ptr(), v)
        }
    }

    /// Two 256-bit registers per 16 lanes; `VNNI` picks AVX-VNNI's `vpdpbusd`.
    pub(super) struct Ymm<const VNNI: bool>;

    type I2 = [__m256i; 2];
    type F2 = [__m256; 2];

    impl<const VNNI: bool> Isa for Ymm<VNNI> {
        type I = I2;
        type F = F2;
        const MR: usize = 2;
        #[inline(always)]
        unsafe fn izero() -> I2 {
            [_mm256_setzero_si256(); 2]
        }
        #[inline(always)]
        unsafe fn fzero() -> F2 {
            [_mm256_setzero_ps(); 2]
        }
        #[inline(always)]
        unsafe fn load_q(p: *const u8) -> I2 {
            [
                _mm256_loadu_si256(p as *const __m256i),
                _mm256_loadu_si256(p.add(32) as *const __m256i),
            ]
        }
        #[inline(always)]
        unsafe fn nibbles(v: I2) -> (I2, I2) {
            let m = _mm256_set1_epi8(0x0f);
            let lo = v.map(|h| _mm256_and_si256(h, m));
            let hi = v.map(|h| _mm256_and_si256(_mm256_srli_epi16(h, 4), m));
            (lo, hi)
        }
        #[inline(always)]
        unsafe fn bcast4(p: *const i8) -> I2 {
            [_mm256_set1_epi32(std::ptr::read_unaligned(p as *const i32)); 2]
        }
        #[inline(always)]
        unsafe fn dot_us(acc: I2, u: I2, s: I2) -> I2 {
            std::array::from_fn(|h| {
                if VNNI {
                    _mm256_dpbusd_avx_epi32(acc[h], u[h], s[h])
                } else {
                    let pairs = _mm256_maddubs_epi16(u[h], s[h]);
                    _mm256_add_epi32(acc[h], _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
                }
            })
        }
        #[inline(always)]
        unsafe fn abs_sign(w: I2, x: I2) -> (I2, I2) {
            (
                w.map(|h| _mm256_sign_epi8(h, h)),
                std::array::from_fn(|h| _mm256_sign_epi8(x[h], w[h])),
            )
        }
        #[inline(always)]
        unsafe fn iadd(a: I2, b: I2) -> I2 {
            std::array::from_fn(|h| _mm256_add_epi32(a[h], b[h]))
        }
        const Q8_UNSIGNED_X: bool = VNNI;
        #[inline(always)]
        unsafe fn sub_128x(acc: I2, s: I2) -> I2 {
            std::array::from_fn(|h| _mm256_sub_epi32(acc[h], _mm256_slli_epi32(s[h], 7)))
        }
        #[inline(always)]
        unsafe fn ones() -> I2 {
            [_mm256_set1_epi8(1); 2]
        }
        #[inline(always)]
        unsafe fn scales(p: *const u8) -> F2 {
            [
                _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
                _mm256_cvtph_ps(_mm_loadu_si128(p.add(16) as *const __m128i)),
            ]
        }
        #[inline(always)]
        unsafe fn fma_block(facc: F2, acc: I2, off: f32, dw: F2, dx: f32) -> F2 {
            std::array::from_fn(|h| {
                let v = _mm256_sub_ps(_mm256_cvtepi32_ps(acc[h]), _mm256_set1_ps(off));
                _mm256_fmadd_ps(v, _mm256_mul_ps(dw[h], _mm256_set1_ps(dx)), facc[h])
            })
        }
        #[inline(always)]
        unsafe fn store(v: F2, out: &mut [f32; PANEL]) {
            _mm256_storeu_ps(out.as_mut_ptr(), v[0]);
            _mm256_storeu_ps(out.as_mut_ptr().add(8), v[1]);
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn run_avx512vnni(job: &Job, p0: usize, p1: usize) {
        sweep::<Zmm<true>>(job, p0, p1)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    pub(super) unsafe fn run_avx512(job: &Job, p0: usize, p1: usize) {
        sweep::<Zmm<false>>(job, p0, p1)
    }

    #[target_feature(enable = "avxvnni,avx2,fma,f16c")]
    pub(super) unsafe fn run_avxvnni(job: &Job, p0: usize, p1: usize) {
        sweep::<Ymm<true>>(job, p0, p1)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn run_avx2(job: &Job, p0: usize, p1: usize) {
        sweep::<Ymm<false>>(job, p0, p1)
    }
}
