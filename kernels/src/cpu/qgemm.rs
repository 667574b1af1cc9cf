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
                            // Q8_0 is stored unsigned (w + 128), see `QuantizedActs`.
                            let flip = if w.ty == QuantType::Q8_0 {
                                0x8080_8080
                            } else {
                                0
                            };
                            for c in 0..qb / 4 {
                                let o = 32 + 64 * c + 4 * r;
                                let q =
                                    u32::from_le_bytes(s[2 + 4 * c..6 + 4 * c].try_into().unwrap());
                                d[o..o + 4].copy_from_slice(&(q ^ flip).to_le_bytes());
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

/// Activation rows quantized per 32-block, in groups of `g` rows (the micro-
/// tile height) so that a tile reads one block of all its rows from one place:
/// block `b` of row `i` of group `G` has its quants at
/// `qs[((G * nb + b) * g + i) * 32..]`, its scale at `d[(G * nb + b) * g + i]`,
/// and at `init` the integer the dot starts from (`-bias * sum(q)`, which
/// cancels the bias of unsigned weights: 8 for Q4_0's nibbles, 128 for Q8_0
/// stored as `w + 128`). A tile thus needs one pointer per operand, and every
/// row's data is a constant displacement from it.
///
/// Built by [`quantize_acts`] or [`super::layer_norm_quantize`], then read by
/// any number of [`matmul_quantized`] calls (Phi-2's q, k, v and fc1 share one).
#[derive(Default)]
pub struct QuantizedActs {
    level: Option<Level>,
    m: usize,
    k: usize,
    g: usize,
    nb: usize,
    qs: Vec<i8>,
    d: Vec<f32>,
    sum: Vec<i32>,
    init: Vec<i32>,
    /// the bias `init` was computed for (`None`: not yet)
    init_bias: Option<i32>,
}

impl std::fmt::Debug for QuantizedActs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QuantizedActs({} x {})", self.m, self.k)
    }
}

impl QuantizedActs {
    /// Rows and columns of the activations these were quantized from.
    pub fn shape(&self) -> (usize, usize) {
        (self.m, self.k)
    }

    /// Sizes the buffers for `m x k` activations on `level` (supported by this
    /// CPU).
    fn reset(&mut self, level: Level, m: usize, k: usize) {
        let g = int8_shape(level).0.min(m).max(1);
        let nb = k.div_ceil(QK);
        let blocks = m.div_ceil(g) * nb * g;
        self.level = Some(level);
        (self.m, self.k, self.g, self.nb) = (m, k, g, nb);
        self.init_bias = None;
        // Padding rows of the last group stay zero: tiles never read them.
        self.qs.clear();
        self.qs.resize(blocks * QK, 0);
        self.d.clear();
        self.d.resize(blocks, 0.0);
        self.sum.clear();
        self.sum.resize(blocks, 0);
    }

    /// Quantizes `x`'s rows group by group, in parallel when there are several
    /// (decode's single row stays on the calling thread). With `norm`, each
    /// group's rows are first normalized into `out` and quantized from there
    /// while they are in cache.
    fn fill(&mut self, x: &[f32], norm: Option<(&Norm, &mut [f32])>) {
        let (m, g, k, nb) = (self.m, self.g, self.k, self.nb);
        let block = block_quantizer(self.level.unwrap_or(Level::Portable));
        let min_len = if m >= 4 { 1 } else { usize::MAX };
        let (norm, out) = match norm {
            Some((f, out)) => (Some(f), OutPtr(out.as_mut_ptr())),
            None => (None, OutPtr(std::ptr::null_mut())),
        };
        self.qs
            .par_chunks_mut(nb * g * QK)
            .zip(self.d.par_chunks_mut(nb * g))
            .zip(self.sum.par_chunks_mut(nb * g))
            .enumerate()
            .with_min_len(min_len)
            .for_each(|(gi, ((qs, d), sum))| {
                let (r0, r1) = (gi * g, ((gi + 1) * g).min(m));
                let src = &x[r0 * k..r1 * k];
                let rows: &[f32] = match norm {
                    Some(f) => {
                        let _ = &out;
                        // SAFETY: groups write disjoint rows of `out`, which has
                        // x.len() elements (checked by the caller).
                        let o =
                            unsafe { std::slice::from_raw_parts_mut(out.0.add(r0 * k), src.len()) };
                        f(src, o);
                        o
                    }
                    None => src,
                };
                for (i, xr) in rows.chunks(k.max(1)).enumerate() {
                    for b in 0..nb {
                        let o = b * g + i;
                        let q: &mut [i8; QK] = (&mut qs[o * QK..(o + 1) * QK]).try_into().unwrap();
                        (d[o], sum[o]) = if (b + 1) * QK <= k {
                            block(xr[b * QK..(b + 1) * QK].try_into().unwrap(), q)
                        } else {
                            let mut xs = [0.0f32; QK];
                            xs[..k - b * QK].copy_from_slice(&xr[b * QK..]);
                            block(&xs, q)
                        };
                    }
                }
            });
    }

    /// Makes `init` hold `-bias * sum`.
    fn set_bias(&mut self, bias: i32) {
        if self.init_bias != Some(bias) {
            self.init.clear();
            self.init.extend(self.sum.iter().map(|s| -bias * s));
            self.init_bias = Some(bias);
        }
    }
}

/// A row-wise normalization (`x` rows to `out` rows) run before quantizing.
pub(crate) type Norm<'a> = dyn Fn(&[f32], &mut [f32]) + Sync + 'a;

/// Quantizes `x` (`m x k`) for [`matmul_quantized`] on `level`.
pub(crate) fn quantize_acts(level: Level, x: &[f32], m: usize, k: usize, acts: &mut QuantizedActs) {
    assert_eq!(x.len(), m * k, "quantize: x is not m x k");
    acts.reset(supported(level), m, k);
    acts.fill(x, None);
}

/// `out = norm(x)` row by row (`k` wide), each group of rows quantized into
/// `acts` for [`matmul_quantized`] as soon as it is written.
pub(crate) fn layer_norm_quantize(
    level: Level,
    x: &[f32],
    k: usize,
    norm: &Norm,
    out: &mut [f32],
    acts: &mut QuantizedActs,
) {
    assert_eq!(x.len(), out.len(), "layer_norm: x and out differ in length");
    assert!(
        k > 0 && x.len().is_multiple_of(k),
        "layer_norm: rows are not {k} wide"
    );
    acts.reset(supported(level), x.len() / k, k);
    acts.fill(x, Some((norm, out)));
}

/// [`quantize_act_block`], or a vector version of it with the same results
/// where `level` has one.
pub(super) fn block_quantizer(level: Level) -> fn(&[f32; QK], &mut [i8; QK]) -> (f32, i32) {
    #[cfg(target_arch = "x86_64")]
    if matches!(level, Level::Avx512 | Level::Avx512Vnni | Level::Avx512Bf16)
        && level.is_supported()
    {
        return |x, q| {
            // SAFETY: the level's features are present.
            unsafe { x86::quantize_act_block_avx512(x, q) }
        };
    }
    let _ = level;
    quantize_act_block
}

fn supported(level: Level) -> Level {
    if level.is_supported() {
        level
    } else {
        super::dispatch::best_up_to(level)
    }
}

thread_local! {
    /// Quantized activations, kept between calls so steady-state matmuls do not
    /// allocate. Taken out while in use (a nested call gets a fresh one).
    static ACTS: Cell<QuantizedActs> = Cell::new(QuantizedActs::default());
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
    if trivial(m, w, bias, epilogue, out) {
        return;
    }
    let level = supported(level);
    if matches!(w.ty, QuantType::F16 | QuantType::BF16) {
        let job = super::fgemm::FJob {
            w,
            prefetch: super::dispatch::tuning().weight_prefetch,
            x,
            m,
            bias,
            epilogue,
            out: OutPtr(out.as_mut_ptr()),
        };
        // SAFETY: level is supported by this CPU; panel ranges are disjoint.
        over_panels(w.panels, tasks(w), |p0, p1| unsafe {
            job.run(level, p0, p1)
        });
        return;
    }
    let mut acts = ACTS.take();
    quantize_acts(level, x, m, w.cols, &mut acts);
    matmul_quantized(&mut acts, w, bias, epilogue, out);
    ACTS.set(acts);
}

/// `out = epilogue(acts . W^T + bias)` for a Q8_0 or Q4_0 matrix, on the level
/// `acts` were quantized for.
pub(crate) fn matmul_quantized(
    acts: &mut QuantizedActs,
    w: &PackedMatrix,
    bias: Option<&[f32]>,
    epilogue: Epilogue,
    out: &mut [f32],
) {
    let m = acts.m;
    assert!(
        matches!(w.ty, QuantType::Q8_0 | QuantType::Q4_0),
        "matmul: {} weights take f32 activations",
        w.ty
    );
    assert_eq!(
        acts.k, w.cols,
        "matmul: activations are {} wide, weights {}",
        acts.k, w.cols
    );
    if trivial(m, w, bias, epilogue, out) {
        return;
    }
    let level = acts.level.expect("activations were quantized");
    acts.set_bias(match w.ty {
        QuantType::Q4_0 => 8,
        _ if int8_shape(level).1 => 128,
        _ => 0,
    });
    let job = Job {
        w,
        prefetch: super::dispatch::tuning().weight_prefetch,
        acts,
        m,
        bias,
        epilogue,
        out: OutPtr(out.as_mut_ptr()),
    };
    // SAFETY: level is supported by this CPU (`reset` took a supported one);
    // panel ranges are disjoint.
    over_panels(w.panels, tasks(w), |p0, p1| unsafe {
        job.run(level, p0, p1)
    });
}

/// One task per pool thread, at most one per panel.
fn tasks(w: &PackedMatrix) -> usize {
    rayon::current_num_threads().min(w.panels).max(1)
}

/// Checks the output's shape and handles the shapes with nothing to multiply
/// (returns true when it did).
fn trivial(
    m: usize,
    w: &PackedMatrix,
    bias: Option<&[f32]>,
    epilogue: Epilogue,
    out: &mut [f32],
) -> bool {
    assert_eq!(out.len(), m * w.rows, "matmul: out is not m x n");
    if let Some(b) = bias {
        assert_eq!(b.len(), w.rows, "matmul: bias length != n");
    }
    if m == 0 || w.rows == 0 {
        return true;
    }
    if w.cols == 0 {
        let zeros = [0.0f32; PANEL];
        for row in out.chunks_exact_mut(w.rows) {
            for c0 in (0..w.rows).step_by(PANEL) {
                let cols = PANEL.min(w.rows - c0);
                // SAFETY: c0 + cols <= row.len().
                unsafe {
                    write_tile(
                        &zeros[..cols],
                        row.as_mut_ptr().add(c0),
                        c0,
                        bias,
                        epilogue,
                        false,
                    )
                };
            }
        }
        return true;
    }
    false
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
    /// bytes ahead a streaming tile prefetches ([`super::dispatch::Tuning`]; 0: none)
    prefetch: usize,
    acts: &'a QuantizedActs,
    m: usize,
    bias: Option<&'a [f32]>,
    epilogue: Epilogue,
    out: OutPtr,
}

/// Writes one tile row: `v = tile + bias[c0..]`, then the epilogue, into `out`
/// (`tile.len()` columns starting at output column `c0`). `zmm`: the caller
/// runs AVX-512 code, so the GELU may too.
#[inline(always)]
pub(super) unsafe fn write_tile(
    tile: &[f32],
    out: *mut f32,
    c0: usize,
    bias: Option<&[f32]>,
    epilogue: Epilogue,
    zmm: bool,
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
        #[cfg(target_arch = "x86_64")]
        Epilogue::GeluTanh if zmm => super::math::x86::gelu_tanh16(&mut v),
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
    let _ = zmm;
    if cols == PANEL {
        std::ptr::write_unaligned(out as *mut [f32; PANEL], v);
    } else {
        std::ptr::copy_nonoverlapping(v.as_ptr(), out, cols);
    }
}

/// Micro-tile height (activation rows) of `level`'s int8 kernels, and whether
/// they dot Q8_0 weights as stored (`w + 128`, unsigned) against signed
/// activations (`vpdpbusd`, and the portable path); the `maddubs` paths cannot
/// (u8 x s8 pairs would saturate 16 bits) and restore the sign first.
fn int8_shape(level: Level) -> (usize, bool) {
    match level {
        Level::Avx512Vnni | Level::Avx512Bf16 => (x86::ZMM_MR, true),
        Level::Avx512 => (x86::ZMM_MR, false),
        Level::AvxVnni => (2, true),
        Level::Avx2 => (2, false),
        Level::Portable => (2, true),
    }
}

impl Job<'_> {
    unsafe fn run(&self, level: Level, p0: usize, p1: usize) {
        #[cfg(target_arch = "x86_64")]
        match level {
            Level::Avx512Vnni | Level::Avx512Bf16 => return x86::run_avx512vnni(self, p0, p1),
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
    /// A Q8_0 weight vector made ready for [`Isa::q8_dot`].
    type W: Copy;
    unsafe fn fzero() -> Self::F;
    unsafe fn izero() -> Self::I;
    /// One i32 repeated in every lane.
    unsafe fn bcast_i32(p: *const i32) -> Self::I;
    /// 64 bytes of a panel's quant vector.
    unsafe fn load_q(p: *const u8) -> Self::I;
    /// Low and high nibbles of every byte.
    unsafe fn nibbles(v: Self::I) -> (Self::I, Self::I);
    /// 4 activation bytes repeated in every lane.
    unsafe fn bcast4(p: *const i8) -> Self::I;
    /// Per lane: `acc + sum of 4 u8 x s8 products` (`u` is at most 15 here).
    unsafe fn dot_us(acc: Self::I, u: Self::I, s: Self::I) -> Self::I;
    /// Stored Q8_0 weights (`w + 128`) ready for dots.
    unsafe fn q8_prep(wu: Self::I) -> Self::W;
    /// `acc + dot(w + 128, x)` where `int8_shape` says unsigned, else `acc + dot(w, x)`.
    unsafe fn q8_dot(acc: Self::I, w: Self::W, x: Self::I) -> Self::I;
    unsafe fn iadd(a: Self::I, b: Self::I) -> Self::I;
    /// 16 f16 scales.
    unsafe fn scales(p: *const u8) -> Self::F;
    /// `facc + f32(acc) * dw * dx`.
    unsafe fn fma_block(facc: Self::F, acc: Self::I, dw: Self::F, dx: *const f32) -> Self::F;
    unsafe fn store(v: Self::F, out: &mut [f32; PANEL]);
    /// Whether this is AVX-512 code (see [`write_tile`]).
    const ZMM: bool = false;
    /// A hint to fetch the cache line at `p` (which may be past the panel's end).
    #[inline(always)]
    unsafe fn prefetch(p: *const u8) {
        let _ = p;
    }
}

/// Decode's tiles (up to 12 rows: a batched decode step) stream their panel
/// once: fetch the block `dist` bytes ahead (the CPU's
/// [`super::dispatch::Tuning::weight_prefetch`]), one hint per cache line.
/// Without it, 4-, 8- and 12-row steps ran 15-40% slower on a model-sized
/// weight set (`examples/batch_decode_speed`); with more rows than one tile,
/// the panel is read again from cache for the later tiles.
#[inline(always)]
unsafe fn prefetch_block<I: Isa, const M: usize>(blk: *const u8, bb: usize, dist: usize) {
    if M <= 12 && dist > 0 {
        for off in (0..bb).step_by(64) {
            I::prefetch(blk.add(dist + off));
        }
    }
}

/// All activation rows against panels `p0..p1`.
#[inline(always)]
unsafe fn sweep<I: Isa>(job: &Job, p0: usize, p1: usize) {
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
                    let o = job.out.0.add((i + ii) * n + c0);
                    write_tile(&t[..cols], o, c0, job.bias, job.epilogue, I::ZMM);
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

#[inline(always)]
unsafe fn tile_q4<I: Isa, const M: usize>(
    job: &Job,
    p: usize,
    grp: usize,
    tile: &mut [[f32; PANEL]; MAX_MR],
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
        for c in 0..4 {
            let (lo, hi) = I::nibbles(I::load_q(blk.add(32 + 64 * c)));
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
        I::store(facc[i], &mut tile[i]);
    }
}

#[inline(always)]
unsafe fn tile_q8<I: Isa, const M: usize>(
    job: &Job,
    p: usize,
    grp: usize,
    tile: &mut [[f32; PANEL]; MAX_MR],
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
        for c in (0..8).step_by(2) {
            let w0 = I::q8_prep(I::load_q(blk.add(32 + 64 * c)));
            let w1 = I::q8_prep(I::load_q(blk.add(32 + 64 * (c + 1))));
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
        I::store(facc[i], &mut tile[i]);
    }
}

/// Plain arrays: what any target compiles (and auto-vectorizes).
struct Portable;

impl Isa for Portable {
    type I = [i32; 16];
    type F = [f32; 16];
    type W = [i32; 16];
    #[inline(always)]
    unsafe fn fzero() -> [f32; 16] {
        [0.0; 16]
    }
    #[inline(always)]
    unsafe fn izero() -> [i32; 16] {
        [0; 16]
    }
    #[inline(always)]
    unsafe fn bcast_i32(p: *const i32) -> [i32; 16] {
        [*p; 16]
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
    unsafe fn q8_prep(wu: [i32; 16]) -> [i32; 16] {
        wu
    }
    #[inline(always)]
    unsafe fn q8_dot(acc: [i32; 16], w: [i32; 16], x: [i32; 16]) -> [i32; 16] {
        Self::dot_us(acc, w, x)
    }
    #[inline(always)]
    unsafe fn iadd(a: [i32; 16], b: [i32; 16]) -> [i32; 16] {
        std::array::from_fn(|l| a[l] + b[l])
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
        dw: [f32; 16],
        dx: *const f32,
    ) -> [f32; 16] {
        let dx = *dx;
        std::array::from_fn(|l| (acc[l] as f32).mul_add(dw[l] * dx, facc[l]))
    }
    #[inline(always)]
    unsafe fn store(v: [f32; 16], out: &mut [f32; PANEL]) {
        *out = v;
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    pub(super) const ZMM_MR: usize = 2;
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{sweep, Isa, Job, PANEL};

    /// 12 rows x (one accumulator + one f32 sum) + a weight vector and the
    /// scales: 26 of the 32 zmm registers.
    pub(super) const ZMM_MR: usize = 12;

    /// One 512-bit register per 16 lanes; `VNNI` picks `vpdpbusd` over
    /// `maddubs` + `madd`.
    pub(super) struct Zmm<const VNNI: bool>;

    impl<const VNNI: bool> Isa for Zmm<VNNI> {
        type I = __m512i;
        type F = __m512;
        /// `(|w|, w)` for `maddubs`, `(w + 128, _)` for `vpdpbusd`
        type W = (__m512i, __m512i);
        const ZMM: bool = true;
        #[inline(always)]
        unsafe fn fzero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn izero() -> __m512i {
            _mm512_setzero_si512()
        }
        #[inline(always)]
        unsafe fn bcast_i32(p: *const i32) -> __m512i {
            _mm512_set1_epi32(*p)
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
        unsafe fn q8_prep(wu: __m512i) -> (__m512i, __m512i) {
            if VNNI {
                (wu, wu)
            } else {
                let w = _mm512_xor_si512(wu, _mm512_set1_epi8(-128));
                (_mm512_abs_epi8(w), w)
            }
        }
        #[inline(always)]
        unsafe fn q8_dot(acc: __m512i, w: (__m512i, __m512i), x: __m512i) -> __m512i {
            if VNNI {
                Self::dot_us(acc, w.0, x)
            } else {
                let neg = _mm512_movepi8_mask(w.1);
                let xs = _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x);
                Self::dot_us(acc, w.0, xs)
            }
        }
        #[inline(always)]
        unsafe fn iadd(a: __m512i, b: __m512i) -> __m512i {
            _mm512_add_epi32(a, b)
        }
        #[inline(always)]
        unsafe fn scales(p: *const u8) -> __m512 {
            _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
        }
        #[inline(always)]
        unsafe fn fma_block(facc: __m512, acc: __m512i, dw: __m512, dx: *const f32) -> __m512 {
            let s = _mm512_mul_ps(dw, _mm512_set1_ps(*dx));
            _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), s, facc)
        }
        #[inline(always)]
        unsafe fn store(v: __m512, out: &mut [f32; PANEL]) {
            _mm512_storeu_ps(out.as_mut_ptr(), v)
        }
        #[inline(always)]
        unsafe fn prefetch(p: *const u8) {
            _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
        }
    }

    /// Two 256-bit registers per 16 lanes; `VNNI` picks AVX-VNNI's `vpdpbusd`.
    pub(super) struct Ymm<const VNNI: bool>;

    type I2 = [__m256i; 2];
    type F2 = [__m256; 2];

    impl<const VNNI: bool> Isa for Ymm<VNNI> {
        type I = I2;
        type F = F2;
        /// `(|w|, w)` for `maddubs`, `(w + 128, _)` for `vpdpbusd`
        type W = (I2, I2);
        #[inline(always)]
        unsafe fn fzero() -> F2 {
            [_mm256_setzero_ps(); 2]
        }
        #[inline(always)]
        unsafe fn izero() -> I2 {
            [_mm256_setzero_si256(); 2]
        }
        #[inline(always)]
        unsafe fn bcast_i32(p: *const i32) -> I2 {
            [_mm256_set1_epi32(*p); 2]
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
        unsafe fn q8_prep(wu: I2) -> (I2, I2) {
            if VNNI {
                (wu, wu)
            } else {
                let w = wu.map(|h| _mm256_xor_si256(h, _mm256_set1_epi8(-128)));
                (w.map(|h| _mm256_sign_epi8(h, h)), w)
            }
        }
        #[inline(always)]
        unsafe fn q8_dot(acc: I2, w: (I2, I2), x: I2) -> I2 {
            if VNNI {
                Self::dot_us(acc, w.0, x)
            } else {
                let xs = std::array::from_fn(|h| _mm256_sign_epi8(x[h], w.1[h]));
                Self::dot_us(acc, w.0, xs)
            }
        }
        #[inline(always)]
        unsafe fn iadd(a: I2, b: I2) -> I2 {
            std::array::from_fn(|h| _mm256_add_epi32(a[h], b[h]))
        }
        #[inline(always)]
        unsafe fn scales(p: *const u8) -> F2 {
            [
                _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
                _mm256_cvtph_ps(_mm_loadu_si128(p.add(16) as *const __m128i)),
            ]
        }
        #[inline(always)]
        unsafe fn fma_block(facc: F2, acc: I2, dw: F2, dx: *const f32) -> F2 {
            let dx = _mm256_set1_ps(*dx);
            std::array::from_fn(|h| {
                _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(acc[h]),
                    _mm256_mul_ps(dw[h], dx),
                    facc[h],
                )
            })
        }
        #[inline(always)]
        unsafe fn store(v: F2, out: &mut [f32; PANEL]) {
            _mm256_storeu_ps(out.as_mut_ptr(), v[0]);
            _mm256_storeu_ps(out.as_mut_ptr().add(8), v[1]);
        }
        #[inline(always)]
        unsafe fn prefetch(p: *const u8) {
            _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
        }
    }

    /// [`quantize_act_block`](crate::quant::quantize_act_block) on two zmm
    /// registers, bit for bit: the same scale arithmetic, and `round` (half away
    /// from zero) as `trunc(v + copysign(0.49999997, v))`, exact for every f32.
    /// Blocks with a NaN or an infinity take the scalar path (its saturating
    /// casts define them).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
    pub(super) unsafe fn quantize_act_block_avx512(x: &[f32; 32], q: &mut [i8; 32]) -> (f32, i32) {
        let a = _mm512_loadu_ps(x.as_ptr());
        let b = _mm512_loadu_ps(x.as_ptr().add(16));
        let (aa, ab) = (_mm512_abs_ps(a), _mm512_abs_ps(b));
        let inf = _mm512_set1_ps(f32::INFINITY);
        // not (|v| < inf): NaN or infinite
        if (_mm512_cmp_ps_mask::<_CMP_NLT_UQ>(aa, inf) | _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(ab, inf))
            != 0
        {
            return crate::quant::quantize_act_block(x, q);
        }
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(aa, ab));
        let d = amax / 127.0;
        let id = _mm512_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
        let round = |v: __m512| {
            let v = _mm512_mul_ps(v, id);
            let sign = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(i32::MIN));
            let half = _mm512_or_si512(sign, _mm512_castps_si512(_mm512_set1_ps(0.49999997)));
            let t = _mm512_add_ps(v, _mm512_castsi512_ps(half));
            _mm512_cvttps_epi32(t)
        };
        let (qa, qb) = (round(a), round(b));
        _mm_storeu_si128(q.as_mut_ptr() as *mut __m128i, _mm512_cvtepi32_epi8(qa));
        _mm_storeu_si128(
            q.as_mut_ptr().add(16) as *mut __m128i,
            _mm512_cvtepi32_epi8(qb),
        );
        (d, _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)))
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
