//! Multi-head attention over a paged KV cache of f32 or f16 (widened to f32 as it
//! is read; scores, softmax and sums are f32 either way).
//!
//! Two schedules, both written once over the f32 vectors of the level tokens
//! ([`Simd`]) and built per token and KV element type ([`Load`]): portable
//! (`wide::f32x8`), AVX2 + FMA + F16C and AVX-512 (intrinsics), chosen at run
//! time by [`super::dispatch::level`] through the [`Kernels`] tables here,
//! which also hold each level's tile shapes. This file holds the entry points,
//! batching and the shared walk over the block table; `tile` the tiled path,
//! `rows` the rows path.
//!
//! * Tiled (prefill, SigLIP): flash attention with an online softmax. One rayon
//!   task per (head, tile of query rows). The tile's queries are held transposed
//!   and pre-scaled, `[head_dim][rows]`, so that every score, softmax and
//!   accumulator step works on vectors of rows: Q·Kᵀ is a register-blocked outer
//!   product (`NK` keys × the tile's rows, one broadcast key element per FMA
//!   column), the running max / sum per row are plain vector max / add (no
//!   horizontal reductions), and P·V is a second outer product into the transposed
//!   accumulator, rescaled as it is loaded. Keys go in tiles of `KT` (32 or 48)
//!   positions walked through the block table, so any block size works (SigLIP's
//!   single 729-row block is just a run of tiles); key tiles wholly above the
//!   causal diagonal are never visited and only those that cross it are masked.
//! * Rows (decode, a few query rows): one task per (row, head): scores for all of
//!   the row's keys, two-pass softmax, P·V accumulated in registers over head_dim.
//!   K/V rows are prefetched a few keys ahead. A long context with too few
//!   (row, head) tasks to occupy the pool is split over the keys (split-K): each
//!   chunk keeps its own max, sum and accumulator, merged afterwards. (Phi-2's 32
//!   heads keep two threads busy without it: forcing the split measured no
//!   better at 1024 and 4096 keys.)
//!
//! A batched call ([`attention_batch`]) runs each sequence with enough rows for
//! tiles through the tiled path, one after the other, and the rows of all the
//! others (decode steps) in one parallel rows pass: one rayon call per layer
//! however many sequences decode together.
//!
//! f16 pools: the rows path widens K/V vectors in registers (`vcvtph2ps`), as it
//! streams them; the tiled path widens each key tile's K and V rows into f32
//! scratch once and runs the f32 micro-kernels on it, since its Q·Kᵀ broadcasts
//! single key elements (a scalar conversion per FMA column otherwise).
//!
//! Scratch lives in thread-locals reused across calls: no heap allocation after
//! the first calls on each thread.

use std::cell::Cell;

use half::f16;
use rayon::prelude::*;

use super::dispatch::{self, Level};
use super::isa::{prefetch_line, Cpu, Kernel, Portable, Simd};
#[cfg(target_arch = "x86_64")]
use super::isa::{Avx2, Avx512};
use super::OutPtr;
use crate::reference::{check_attention, check_attention_batch};
use crate::{AttnSeq, KvDtype, KvElem, KvLayer, KvView};

mod rows;
mod tile;

use rows::{row, rows};
use tile::tile;

/// Query rows from which the tiled path is used; fewer go one row at a time.
const TILED_MIN_ROWS: usize = 4;

thread_local! {
    /// Per-thread tile buffers, reused across calls. Taken
    /// out while in use so a re-entrant call on the same thread cannot observe it
    /// half-written.
    static SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// How the kernels read a pool's element type.
pub(super) trait Load: KvElem {
    /// Keys the rows path prefetches ahead. A head's K/V rows sit `kv_dim`
    /// elements apart, a stride the hardware prefetchers do not follow across
    /// pages.
    const PREFETCH_KEYS: usize;
    /// `LANES` elements from `p` as f32.
    ///
    /// # Safety
    /// `p` is valid for reading `LANES` elements, and `s`'s conversion
    /// instructions are enabled where this is inlined.
    unsafe fn load<S: Simd>(s: S, p: *const Self) -> S::V;
    /// The kernels for `level` (at most the CPU's).
    fn kernels(level: Level) -> &'static Kernels<Self>;
}

impl Load for f32 {
    const PREFETCH_KEYS: usize = 16;
    #[inline(always)]
    unsafe fn load<S: Simd>(s: S, p: *const f32) -> S::V {
        s.load(p)
    }
    fn kernels(level: Level) -> &'static Kernels<f32> {
        #[cfg(target_arch = "x86_64")]
        {
            if level >= Level::Avx512 {
                return &AVX512;
            }
            if level >= Level::Avx2 {
                return &AVX2;
            }
        }
        let _ = level;
        &PORTABLE
    }
}

impl Load for f16 {
    const PREFETCH_KEYS: usize = F16_PREFETCH_KEYS;
    #[inline(always)]
    unsafe fn load<S: Simd>(s: S, p: *const f16) -> S::V {
        s.load_h(p)
    }
    fn kernels(level: Level) -> &'static Kernels<f16> {
        #[cfg(target_arch = "x86_64")]
        {
            if level >= Level::Avx512 {
                return &AVX512_F16;
            }
            if level >= Level::Avx2 {
                return &AVX2_F16;
            }
        }
        let _ = level;
        &PORTABLE_F16
    }
}

/// One sequence's arguments, shared by its tasks.
#[derive(Clone, Copy)]
pub(super) struct Args<'a, E: KvElem> {
    /// the sequence's query rows
    pub(super) q: &'a [f32],
    pub(super) n_tokens: usize,
    pub(super) n_heads: usize,
    /// query heads per kv head
    pub(super) group: usize,
    pub(super) head_dim: usize,
    pub(super) kv: KvView<'a, E>,
    pub(super) first_pos: usize,
    pub(super) causal: bool,
    pub(super) scale: f32,
}

impl<E: KvElem> Args<'_, E> {
    /// Keys query row `i` attends to: `0..n_keys(i)`.
    #[inline]
    pub(super) fn n_keys(&self, i: usize) -> usize {
        if self.causal {
            self.first_pos + i + 1
        } else {
            self.first_pos + self.n_tokens
        }
    }
}

/// Walks sequence positions from `pos` on through the block table, yielding the
/// offset of each position's head slice in the K/V pools, checked to lie inside
/// both (so the kernels can read `head_dim` elements there unchecked).
pub(super) struct Walk<'a> {
    table: &'a [u32],
    block_size: usize,
    kv_dim: usize,
    off: usize,
    head_dim: usize,
    /// the shorter pool's length
    len: usize,
    block: usize,
    within: usize,
}

impl<'a> Walk<'a> {
    #[inline(always)]
    pub(super) fn new<E: KvElem>(
        kv: &KvView<'a, E>,
        off: usize,
        head_dim: usize,
        pos: usize,
    ) -> Self {
        Walk {
            table: kv.block_table,
            block_size: kv.block_size,
            kv_dim: kv.kv_dim,
            off,
            head_dim,
            len: kv.k.len().min(kv.v.len()),
            block: pos / kv.block_size,
            within: pos % kv.block_size,
        }
    }

    #[inline(always)]
    pub(super) fn next_offset(&mut self) -> usize {
        let row = self.table[self.block] as usize * self.block_size + self.within;
        let at = row * self.kv_dim + self.off;
        assert!(
            at + self.head_dim <= self.len,
            "attention: block table points outside the KV pool"
        );
        self.within += 1;
        if self.within == self.block_size {
            self.within = 0;
            self.block += 1;
        }
        at
    }
}

/// [`Load::PREFETCH_KEYS`] for f16: as many bytes ahead as f32's 16 keys. For
/// eight Phi-2 sequences decoding at 1024 keys (K/V from DRAM), 32 measured
/// about 15% faster than 16 and than 48.
const F16_PREFETCH_KEYS: usize = 32;

/// Prefetches the cache lines holding `base[from..from + len]` into L1.
#[inline(always)]
pub(super) fn prefetch<E>(base: *const E, from: usize, len: usize) {
    let start = base.wrapping_add(from) as usize;
    let mut line = start & !63;
    while line < start + len * size_of::<E>() {
        prefetch_line(line as *const u8);
        line += 64;
    }
}

/// The kernels of one instruction set, for pools of `E`.
pub(super) struct Kernels<E: KvElem> {
    /// query rows per tile
    pub(super) tile_rows: usize,
    /// [`tile()`] (same safety contract)
    pub(super) tile: TileFn<E>,
    /// [`row()`] (unsafe only for the target features)
    pub(super) row: RowFn<E>,
    /// kernels with smaller tiles, for calls with at most their `tile_rows` rows
    pub(super) few: Option<&'static Kernels<E>>,
}

pub(super) type TileFn<E> = unsafe fn(&Args<E>, OutPtr, usize, usize, &mut Vec<f32>);
pub(super) type RowFn<E> =
    unsafe fn(&Args<E>, &[f32], usize, usize, usize, &mut [f32]) -> (f32, f32);

impl<E: KvElem> Kernels<E> {
    /// The kernels for a sequence of `n` rows.
    fn for_rows(&'static self, n: usize) -> &'static Kernels<E> {
        match self.few {
            Some(few) if n <= few.tile_rows => few,
            _ => self,
        }
    }
}

// Tile shapes: `RV` vectors of query rows × `NK` keys for Q·Kᵀ and × `ND` dims
// for P·V make `RV * (NK or ND)` accumulators (12 of AVX2's 16 registers, 24 of
// AVX-512's 32), leaving room for the row vectors and a broadcast; `KT` keys per
// tile keep a tile's K and V rows, scores and Q / accumulator in L1. The f16
// kernels are the f32 ones built with the conversions.

/// [`tile()`] on `C`'s instructions: the tables' tile entries.
///
/// # Safety
/// The CPU supports `C`'s level, and [`tile()`]'s contract holds.
unsafe fn tile_on<
    C: Cpu,
    E: Load,
    const RV: usize,
    const NK: usize,
    const ND: usize,
    const KT: usize,
>(
    a: &Args<E>,
    out: OutPtr,
    h: usize,
    t: usize,
    buf: &mut Vec<f32>,
) {
    C::new().enter(TileTask::<E, RV, NK, ND, KT> { a, out, h, t, buf })
}

struct TileTask<
    'a,
    'k,
    E: KvElem,
    const RV: usize,
    const NK: usize,
    const ND: usize,
    const KT: usize,
> {
    a: &'a Args<'k, E>,
    out: OutPtr,
    h: usize,
    t: usize,
    buf: &'a mut Vec<f32>,
}

impl<E: Load, const RV: usize, const NK: usize, const ND: usize, const KT: usize> Kernel
    for TileTask<'_, '_, E, RV, NK, ND, KT>
{
    type Out = ();
    #[inline(always)]
    unsafe fn run<C: Cpu>(self, c: C) {
        tile::<C, E, RV, NK, ND, KT>(c, self.a, self.out, self.h, self.t, self.buf)
    }
}

/// [`row()`] on `C`'s instructions: the tables' row entries.
///
/// # Safety
/// The CPU supports `C`'s level.
unsafe fn row_on<C: Cpu, E: Load, const NC: usize>(
    a: &Args<E>,
    qh: &[f32],
    h: usize,
    lo: usize,
    hi: usize,
    acc: &mut [f32],
) -> (f32, f32) {
    C::new().enter(RowTask::<E, NC> {
        a,
        qh,
        h,
        lo,
        hi,
        acc,
    })
}

struct RowTask<'a, 'k, E: KvElem, const NC: usize> {
    a: &'a Args<'k, E>,
    qh: &'a [f32],
    h: usize,
    lo: usize,
    hi: usize,
    acc: &'a mut [f32],
}

impl<E: Load, const NC: usize> Kernel for RowTask<'_, '_, E, NC> {
    type Out = (f32, f32);
    #[inline(always)]
    unsafe fn run<C: Cpu>(self, c: C) -> (f32, f32) {
        row::<C, E, NC>(c, self.a, self.qh, self.h, self.lo, self.hi, self.acc)
    }
}

const PORTABLE: Kernels<f32> = Kernels {
    tile_rows: 8,
    tile: tile_on::<Portable, f32, 1, 6, 6, 48>,
    row: row_on::<Portable, f32, 4>,
    few: None,
};

const PORTABLE_F16: Kernels<f16> = Kernels {
    tile_rows: 8,
    tile: tile_on::<Portable, f16, 1, 6, 6, 48>,
    row: row_on::<Portable, f16, 4>,
    few: None,
};

#[cfg(target_arch = "x86_64")]
const AVX2: Kernels<f32> = Kernels {
    tile_rows: 16,
    tile: tile_on::<Avx2<false>, f32, 2, 6, 6, 48>,
    row: row_on::<Avx2<false>, f32, 8>,
    few: None,
};

#[cfg(target_arch = "x86_64")]
const AVX2_F16: Kernels<f16> = Kernels {
    tile_rows: 16,
    tile: tile_on::<Avx2<false>, f16, 2, 6, 6, 48>,
    row: row_on::<Avx2<false>, f16, 8>,
    few: None,
};

/// 48-row tiles measured about 10% faster than 32 for SigLIP (same for Phi-2
/// prefill). Calls with at most 16 rows take AVX2's 16-row tiles instead (less
/// padding), and the rows path stays AVX2: decode is bound by memory, not FMAs.
#[cfg(target_arch = "x86_64")]
const AVX512: Kernels<f32> = Kernels {
    tile_rows: 48,
    tile: tile_on::<Avx512<false>, f32, 3, 8, 8, 32>,
    row: row_on::<Avx2<false>, f32, 8>,
    few: Some(&AVX2),
};

/// As [`AVX512`], but the rows path is AVX-512 here: with f16 rows, decode
/// measured about 20% faster with 512-bit loads and conversions than with
/// AVX2's, and five vectors (`NC`) hold Phi-2's head_dim of 80, so P·V is one
/// pass over the V rows instead of two.
#[cfg(target_arch = "x86_64")]
const AVX512_F16: Kernels<f16> = Kernels {
    tile_rows: 48,
    tile: tile_on::<Avx512<false>, f16, 3, 8, 8, 32>,
    row: row_on::<Avx512<false>, f16, 5>,
    few: Some(&AVX2_F16),
};

#[allow(clippy::too_many_arguments)]
pub(crate) fn attention<E: KvElem>(
    q: &[f32],
    n_tokens: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    kv: &KvView<E>,
    first_pos: usize,
    causal: bool,
    scale: f32,
    out: &mut [f32],
) {
    check_attention(
        q, n_tokens, n_heads, n_kv_heads, head_dim, kv, first_pos, out,
    );
    let layer = KvLayer {
        k: kv.k,
        v: kv.v,
        block_size: kv.block_size,
        kv_dim: kv.kv_dim,
    };
    let seq = [AttnSeq {
        rows: n_tokens,
        first_pos,
        block_table: kv.block_table,
    }];
    batch(
        q, n_heads, n_kv_heads, head_dim, &layer, &seq, causal, scale, out,
    )
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_batch<E: KvElem>(
    q: &[f32],
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    kv: &KvLayer<E>,
    seqs: &[AttnSeq],
    causal: bool,
    scale: f32,
    out: &mut [f32],
) {
    check_attention_batch(q, n_heads, n_kv_heads, head_dim, kv, seqs, out);
    batch(
        q, n_heads, n_kv_heads, head_dim, kv, seqs, causal, scale, out,
    )
}

/// A batch's arguments, checked.
#[derive(Clone, Copy)]
struct Batch<'a, E: KvElem> {
    q: &'a [f32],
    n_heads: usize,
    group: usize,
    head_dim: usize,
    kv: KvLayer<'a, E>,
    seqs: &'a [AttnSeq<'a>],
    causal: bool,
    scale: f32,
}

impl<'a, E: KvElem> Batch<'a, E> {
    /// The batch with pools of `T`, the same type as `E` (the caller matched
    /// `E::DTYPE`), which the kernels can name.
    fn cast<T: KvElem>(&self) -> Batch<'a, T> {
        Batch {
            q: self.q,
            n_heads: self.n_heads,
            group: self.group,
            head_dim: self.head_dim,
            kv: KvLayer {
                k: bytemuck::cast_slice(self.kv.k),
                v: bytemuck::cast_slice(self.kv.v),
                block_size: self.kv.block_size,
                kv_dim: self.kv.kv_dim,
            },
            seqs: self.seqs,
            causal: self.causal,
            scale: self.scale,
        }
    }

    /// Sequence `i`'s arguments; its rows start at query row `r0`.
    #[inline]
    fn args(&self, i: usize, r0: usize) -> Args<'a, E> {
        let s = &self.seqs[i];
        let qd = self.n_heads * self.head_dim;
        Args {
            q: &self.q[r0 * qd..(r0 + s.rows) * qd],
            n_tokens: s.rows,
            n_heads: self.n_heads,
            group: self.group,
            head_dim: self.head_dim,
            kv: self.kv.view(s.block_table),
            first_pos: s.first_pos,
            causal: self.causal,
            scale: self.scale,
        }
    }
}

/// [`attention_batch`] once checked.
#[allow(clippy::too_many_arguments)]
fn batch<E: KvElem>(
    q: &[f32],
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    kv: &KvLayer<E>,
    seqs: &[AttnSeq],
    causal: bool,
    scale: f32,
    out: &mut [f32],
) {
    if head_dim == 0 || n_heads == 0 {
        return;
    }
    // The tiled path compares positions as f32.
    for s in seqs {
        assert!(
            s.first_pos + s.rows <= 1 << 24,
            "attention: positions past 2^24"
        );
    }
    let b = Batch {
        q,
        n_heads,
        group: n_heads / n_kv_heads,
        head_dim,
        kv: *kv,
        seqs,
        causal,
        scale,
    };
    let level = dispatch::level();
    match E::DTYPE {
        KvDtype::F32 => run(&b.cast::<f32>(), out, f32::kernels(level)),
        KvDtype::F16 => run(&b.cast::<f16>(), out, f16::kernels(level)),
    }
}

/// Sequences with at least [`TILED_MIN_ROWS`] rows through the tiled path, one
/// after another, each parallel inside; the rows of all the others in one
/// parallel rows pass.
fn run<E: Load>(b: &Batch<E>, out: &mut [f32], k: &'static Kernels<E>) {
    let qd = b.n_heads * b.head_dim;
    let mut r0 = 0;
    let mut few = 0;
    for (i, s) in b.seqs.iter().enumerate() {
        if s.rows >= TILED_MIN_ROWS {
            let a = b.args(i, r0);
            tiled(
                &a,
                &mut out[r0 * qd..(r0 + s.rows) * qd],
                k.for_rows(s.rows),
            );
        } else {
            few += s.rows;
        }
        r0 += s.rows;
    }
    if few > 0 {
        rows(b, few, out, k)
    }
}

fn tiled<E: Load>(a: &Args<E>, out: &mut [f32], k: &Kernels<E>) {
    let n_tiles = a.n_tokens.div_ceil(k.tile_rows);
    let out = OutPtr(out.as_mut_ptr());
    (0..a.n_heads * n_tiles).into_par_iter().for_each(|task| {
        // Last tiles first: under a causal mask they have the most keys.
        let (t, h) = (n_tiles - 1 - task / a.n_heads, task % a.n_heads);
        let mut buf = SCRATCH.take();
        // SAFETY: `k` matches the CPU (see `Load::kernels`); task (h, t) is the
        // only writer of rows of tile t in head h.
        unsafe { (k.tile)(a, out, h, t, &mut buf) };
        SCRATCH.set(buf);
    });
}
