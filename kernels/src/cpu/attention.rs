//! Multi-head attention over a paged KV cache of f32 or f16 (widened to f32 as it
//! is read; scores, softmax and sums are f32 either way).
//!
//! Two schedules, both written once over a small SIMD interface ([`Simd`]) and
//! built per instruction set and KV element type ([`Load`]): portable
//! (`wide::f32x8`), AVX2 + FMA (+ F16C) and AVX-512F (intrinsics), chosen at run
//! time by [`super::dispatch::level`].
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
use wide::{f32x8, u32x8};

use super::dispatch::{self, Level};
use crate::reference::{check_attention, check_attention_batch};
use crate::{AttnSeq, KvDtype, KvElem, KvLayer, KvView};

/// Query rows from which the tiled path is used; fewer go one row at a time.
const TILED_MIN_ROWS: usize = 4;
/// Split-K applies to rows with at least this many keys...
const SPLIT_MIN_KEYS: usize = 1024;
/// ...in chunks of at least this many keys...
const SPLIT_CHUNK_MIN: usize = 256;
/// ...when there are fewer than this many (row, head) tasks per thread.
const SPLIT_TASKS_PER_THREAD: usize = 4;

thread_local! {
    /// Per-thread tile buffers, reused across calls. Taken
    /// out while in use so a re-entrant call on the same thread cannot observe it
    /// half-written.
    static SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    /// Split-K partial results, on the calling thread.
    static PARTIALS: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    /// The rows pass's query rows, on the calling thread.
    static FEW_ROWS: Cell<Vec<FewRow>> = const { Cell::new(Vec::new()) };
}

/// The vector operations the kernels need. Implementations are zero-sized tokens;
/// one that needs CPU features is only constructed after checking for them.
trait Simd: Copy {
    type V: Copy;
    const LANES: usize;
    fn zero(self) -> Self::V;
    fn splat(self, x: f32) -> Self::V;
    /// # Safety
    /// `p` is valid for reading `LANES` floats.
    unsafe fn load(self, p: *const f32) -> Self::V;
    /// # Safety
    /// `p` is valid for writing `LANES` floats.
    unsafe fn store(self, p: *mut f32, v: Self::V);
    /// `LANES` halves from `p`, widened (exactly) to f32.
    ///
    /// # Safety
    /// `p` is valid for reading `LANES` halves.
    unsafe fn load_h(self, p: *const f16) -> Self::V;
    fn add(self, a: Self::V, b: Self::V) -> Self::V;
    fn sub(self, a: Self::V, b: Self::V) -> Self::V;
    fn mul(self, a: Self::V, b: Self::V) -> Self::V;
    /// Lane-wise max; a NaN in `b` propagates.
    fn max(self, a: Self::V, b: Self::V) -> Self::V;
    /// `a * b + c`
    fn fma(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `e^x` for `x <= 0` (softmax arguments); 0 below about -86, so `e^-inf = 0`.
    fn exp(self, x: Self::V) -> Self::V;
    /// `x`, with `-inf` in the lanes where `pos < key` (keys after the row).
    fn mask_after(self, x: Self::V, pos: Self::V, key: f32) -> Self::V;
    fn reduce_add(self, v: Self::V) -> f32;
    fn reduce_max(self, v: Self::V) -> f32;

    /// Transposes an 8×8 block: `dst[i * dst_stride + j] = src[j * src_stride + i] *
    /// mul[i]`.
    ///
    /// # Safety
    /// Both blocks are in bounds.
    #[inline(always)]
    unsafe fn transpose8(
        self,
        src: *const f32,
        src_stride: usize,
        dst: *mut f32,
        dst_stride: usize,
        mul: &[f32; 8],
    ) {
        for (i, &m) in mul.iter().enumerate() {
            for j in 0..8 {
                *dst.add(i * dst_stride + j) = *src.add(j * src_stride + i) * m;
            }
        }
    }
}

/// `wide::f32x8`: whatever the build targets (SSE2 on x86-64, NEON on aarch64).
#[derive(Clone, Copy)]
struct Portable;

impl Simd for Portable {
    type V = f32x8;
    const LANES: usize = 8;
    #[inline(always)]
    fn zero(self) -> f32x8 {
        f32x8::ZERO
    }
    #[inline(always)]
    fn splat(self, x: f32) -> f32x8 {
        f32x8::splat(x)
    }
    #[inline(always)]
    unsafe fn load(self, p: *const f32) -> f32x8 {
        f32x8::new(p.cast::<[f32; 8]>().read_unaligned())
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32, v: f32x8) {
        p.cast::<[f32; 8]>().write_unaligned(v.to_array())
    }
    #[inline(always)]
    unsafe fn load_h(self, p: *const f16) -> f32x8 {
        widen8(p.cast::<[u16; 8]>().read_unaligned())
    }
    #[inline(always)]
    fn add(self, a: f32x8, b: f32x8) -> f32x8 {
        a + b
    }
    #[inline(always)]
    fn sub(self, a: f32x8, b: f32x8) -> f32x8 {
        a - b
    }
    #[inline(always)]
    fn mul(self, a: f32x8, b: f32x8) -> f32x8 {
        a * b
    }
    #[inline(always)]
    fn max(self, a: f32x8, b: f32x8) -> f32x8 {
        b.is_nan().select(b, a.max(b))
    }
    #[inline(always)]
    fn fma(self, a: f32x8, b: f32x8, c: f32x8) -> f32x8 {
        a.mul_add(b, c)
    }
    #[inline(always)]
    fn exp(self, x: f32x8) -> f32x8 {
        x.exp()
    }
    #[inline(always)]
    fn mask_after(self, x: f32x8, pos: f32x8, key: f32) -> f32x8 {
        pos.simd_lt(f32x8::splat(key))
            .select(f32x8::splat(f32::NEG_INFINITY), x)
    }
    #[inline(always)]
    fn reduce_add(self, v: f32x8) -> f32 {
        v.reduce_add()
    }
    #[inline(always)]
    fn reduce_max(self, v: f32x8) -> f32 {
        v.to_array().into_iter().fold(f32::NEG_INFINITY, f32::max)
    }
}

/// Eight f16 (bits) widened exactly as `f16::to_f32` does (NaNs quieted,
/// payload kept), in vector integer ops. `half`'s conversion is a call per
/// element: with it, portable f16 decode ran 3.5 times as long as f32; with
/// this, 1.5 to 2 times (SSE2 has no conversion instruction).
#[inline(always)]
fn widen8(h: [u16; 8]) -> f32x8 {
    let c = u32x8::splat;
    let h = u32x8::new([
        h[0] as u32,
        h[1] as u32,
        h[2] as u32,
        h[3] as u32,
        h[4] as u32,
        h[5] as u32,
        h[6] as u32,
        h[7] as u32,
    ]);
    let em = (h & c(0x7fff)) << 13u32;
    let exp = em & c(0x7c00 << 13);
    // Rebiased exponent: right for normal numbers.
    let normal = em + c((127 - 15) << 23);
    // All-ones exponent; a NaN gets the quiet bit.
    let quiet = (em & c(0x007f_ffff))
        .simd_eq(c(0))
        .select(c(0), c(0x0040_0000));
    let inf_nan = (normal + c((128 - 16) << 23)) | quiet;
    // Zero and subnormals: 2^-14 * (1 + m) - 2^-14 in f32 is exact.
    let small: u32x8 = bytemuck::cast(
        bytemuck::cast::<u32x8, f32x8>(normal + c(1 << 23)) - f32x8::splat(6.103_515_6e-5),
    );
    let r = exp
        .simd_eq(c(0x7c00 << 13))
        .select(inf_nan, exp.simd_eq(c(0)).select(small, normal));
    bytemuck::cast(r | ((h & c(0x8000)) << 16u32))
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// AVX2 + FMA (+ F16C for [`super::Simd::load_h`]) on `__m256`. Only
    /// [`Avx2::new`] makes one.
    #[derive(Clone, Copy)]
    pub(super) struct Avx2(());

    impl Avx2 {
        /// # Safety
        /// The CPU has AVX2, FMA and F16C (every dispatch level above Portable).
        #[inline(always)]
        pub(super) unsafe fn new() -> Self {
            Avx2(())
        }
    }

    // SAFETY (every `unsafe` block below): an `Avx2` exists only on a CPU with
    // AVX2, FMA and F16C (see `new`), and the intrinsics only touch registers.
    impl super::Simd for Avx2 {
        type V = __m256;
        const LANES: usize = 8;
        #[inline(always)]
        fn zero(self) -> __m256 {
            unsafe { _mm256_setzero_ps() }
        }
        #[inline(always)]
        fn splat(self, x: f32) -> __m256 {
            unsafe { _mm256_set1_ps(x) }
        }
        #[inline(always)]
        unsafe fn load(self, p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32, v: __m256) {
            _mm256_storeu_ps(p, v)
        }
        /// Inlined only into functions built with F16C (the f16 kernels).
        #[inline(always)]
        unsafe fn load_h(self, p: *const half::f16) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
        }
        #[inline(always)]
        fn add(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_add_ps(a, b) }
        }
        #[inline(always)]
        fn sub(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_sub_ps(a, b) }
        }
        #[inline(always)]
        fn mul(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_mul_ps(a, b) }
        }
        #[inline(always)]
        fn max(self, a: __m256, b: __m256) -> __m256 {
            // maxps returns its second operand when either is NaN.
            unsafe { _mm256_max_ps(a, b) }
        }
        #[inline(always)]
        fn fma(self, a: __m256, b: __m256, c: __m256) -> __m256 {
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        /// Cephes `expf` (see `math::x86::exp16`), 8 lanes.
        #[inline(always)]
        fn exp(self, x: __m256) -> __m256 {
            // SAFETY: this impl only runs inside the AVX2 kernels.
            unsafe { crate::cpu::math::x86::exp8(x) }
        }
        #[inline(always)]
        fn mask_after(self, x: __m256, pos: __m256, key: f32) -> __m256 {
            unsafe {
                let after = _mm256_cmp_ps::<_CMP_LT_OQ>(pos, _mm256_set1_ps(key));
                _mm256_blendv_ps(x, _mm256_set1_ps(f32::NEG_INFINITY), after)
            }
        }
        #[inline(always)]
        fn reduce_add(self, v: __m256) -> f32 {
            unsafe {
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
            }
        }
        #[inline(always)]
        fn reduce_max(self, v: __m256) -> f32 {
            unsafe {
                let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
                _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)))
            }
        }
        #[inline(always)]
        unsafe fn transpose8(
            self,
            src: *const f32,
            src_stride: usize,
            dst: *mut f32,
            dst_stride: usize,
            mul: &[f32; 8],
        ) {
            transpose8(src, src_stride, dst, dst_stride, mul)
        }
    }

    /// [`super::Simd::transpose8`] in 24 shuffles; needs AVX.
    #[inline(always)]
    pub(super) unsafe fn transpose8(
        src: *const f32,
        ss: usize,
        dst: *mut f32,
        ds: usize,
        mul: &[f32; 8],
    ) {
        let r = |j: usize| _mm256_loadu_ps(src.add(j * ss));
        let (r0, r1, r2, r3) = (r(0), r(1), r(2), r(3));
        let (r4, r5, r6, r7) = (r(4), r(5), r(6), r(7));
        let t0 = _mm256_unpacklo_ps(r0, r1);
        let t1 = _mm256_unpackhi_ps(r0, r1);
        let t2 = _mm256_unpacklo_ps(r2, r3);
        let t3 = _mm256_unpackhi_ps(r2, r3);
        let t4 = _mm256_unpacklo_ps(r4, r5);
        let t5 = _mm256_unpackhi_ps(r4, r5);
        let t6 = _mm256_unpacklo_ps(r6, r7);
        let t7 = _mm256_unpackhi_ps(r6, r7);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xee>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xee>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xee>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xee>(t5, t7);
        let out = [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ];
        for (i, &o) in out.iter().enumerate() {
            _mm256_storeu_ps(dst.add(i * ds), _mm256_mul_ps(o, _mm256_set1_ps(mul[i])));
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// AVX-512F on `__m512`. Only [`Avx512::new`] makes one.
    #[derive(Clone, Copy)]
    pub(super) struct Avx512(());

    impl Avx512 {
        /// # Safety
        /// The CPU has AVX-512F.
        #[inline(always)]
        pub(super) unsafe fn new() -> Self {
            Avx512(())
        }
    }

    // SAFETY (every `unsafe` block below): an `Avx512` exists only on a CPU with
    // AVX-512F (see `new`), and the intrinsics only touch registers.
    impl super::Simd for Avx512 {
        type V = __m512;
        const LANES: usize = 16;
        #[inline(always)]
        fn zero(self) -> __m512 {
            unsafe { _mm512_setzero_ps() }
        }
        #[inline(always)]
        fn splat(self, x: f32) -> __m512 {
            unsafe { _mm512_set1_ps(x) }
        }
        #[inline(always)]
        unsafe fn load(self, p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32, v: __m512) {
            _mm512_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn load_h(self, p: *const half::f16) -> __m512 {
            _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
        }
        #[inline(always)]
        fn add(self, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_add_ps(a, b) }
        }
        #[inline(always)]
        fn sub(self, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_sub_ps(a, b) }
        }
        #[inline(always)]
        fn mul(self, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_mul_ps(a, b) }
        }
        #[inline(always)]
        fn max(self, a: __m512, b: __m512) -> __m512 {
            // vmaxps returns its second operand when either is NaN.
            unsafe { _mm512_max_ps(a, b) }
        }
        #[inline(always)]
        fn fma(self, a: __m512, b: __m512, c: __m512) -> __m512 {
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }
        /// As the AVX2 `exp`, 16 lanes.
        #[inline(always)]
        fn exp(self, x: __m512) -> __m512 {
            // SAFETY: this impl only runs inside the AVX-512 kernels.
            unsafe { crate::cpu::math::x86::exp16(x) }
        }
        #[inline(always)]
        fn mask_after(self, x: __m512, pos: __m512, key: f32) -> __m512 {
            unsafe {
                let after = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(pos, _mm512_set1_ps(key));
                _mm512_mask_blend_ps(after, x, _mm512_set1_ps(f32::NEG_INFINITY))
            }
        }
        #[inline(always)]
        fn reduce_add(self, v: __m512) -> f32 {
            unsafe { _mm512_reduce_add_ps(v) }
        }
        #[inline(always)]
        fn reduce_max(self, v: __m512) -> f32 {
            unsafe { _mm512_reduce_max_ps(v) }
        }
        #[inline(always)]
        unsafe fn transpose8(
            self,
            src: *const f32,
            src_stride: usize,
            dst: *mut f32,
            dst_stride: usize,
            mul: &[f32; 8],
        ) {
            super::avx2::transpose8(src, src_stride, dst, dst_stride, mul)
        }
    }
}

/// How the kernels read a pool's element type.
trait Load: KvElem {
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
struct Args<'a, E: KvElem> {
    /// the sequence's query rows
    q: &'a [f32],
    n_tokens: usize,
    n_heads: usize,
    /// query heads per kv head
    group: usize,
    head_dim: usize,
    kv: KvView<'a, E>,
    first_pos: usize,
    causal: bool,
    scale: f32,
}

impl<E: KvElem> Args<'_, E> {
    /// Keys query row `i` attends to: `0..n_keys(i)`.
    #[inline]
    fn n_keys(&self, i: usize) -> usize {
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
struct Walk<'a> {
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
    fn new<E: KvElem>(kv: &KvView<'a, E>, off: usize, head_dim: usize, pos: usize) -> Self {
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
    fn next_offset(&mut self) -> usize {
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
fn prefetch<E>(base: *const E, from: usize, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let start = base.wrapping_add(from) as usize;
        let mut line = start & !63;
        while line < start + len * size_of::<E>() {
            // SAFETY: a prefetch never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(line as *const i8) };
            line += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (base, from, len);
}

/// The output, written by tasks at disjoint (row, head) slices.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements, and the caller's `&mut` outlives them.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Through a method, so closures capture the `Sync` wrapper, not the pointer.
    #[inline(always)]
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Scratch of at least `len` floats starting at a 64-byte boundary.
#[inline(always)]
fn aligned(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len + 16 {
        buf.resize(len + 16, 0.0);
    }
    let skip = (64 - buf.as_ptr() as usize % 64) % 64 / 4;
    &mut buf[skip..skip + len]
}

/// One (head `h`, query tile `t`) task of the tiled path: `RV` vectors of rows
/// make a tile; Q·Kᵀ is blocked `NK` keys × `RV` and P·V `ND` dims × `RV`.
///
/// # Safety
/// `out` is the sequence's output (`[n_tokens, n_heads * head_dim]`), no other
/// task writes rows of tile `t` in head `h`, and `s` can convert `E`.
#[inline(always)]
unsafe fn tile<
    S: Simd,
    E: Load,
    const RV: usize,
    const NK: usize,
    const ND: usize,
    const KT: usize,
>(
    s: S,
    a: &Args<E>,
    out: OutPtr,
    h: usize,
    t: usize,
    buf: &mut Vec<f32>,
) {
    const { assert!(KT.is_multiple_of(NK) && RV * S::LANES <= 64) };
    let lanes = S::LANES;
    let rows = RV * lanes;
    let hd = a.head_dim;
    let qd = a.n_heads * hd;
    let i0 = t * rows;
    let nr = rows.min(a.n_tokens - i0);

    // qt: queries [hd][rows] pre-scaled; ot: accumulator [hd][rows]; st: [KT][rows];
    // for f16, the key tile's K and V rows widened: kw, vw [KT][hd].
    let widened = if E::DTYPE == KvDtype::F32 {
        0
    } else {
        2 * KT * hd
    };
    let scratch = aligned(buf, (2 * hd + KT) * rows + widened);
    let (qt, rest) = scratch.split_at_mut(hd * rows);
    let (ot, rest) = rest.split_at_mut(hd * rows);
    let (st, kvw) = rest.split_at_mut(KT * rows);
    let (kw, vw) = kvw.split_at_mut(widened / 2);
    let (kw, vw) = (kw.as_mut_ptr(), vw.as_mut_ptr());
    // Where a widened tile's rows are.
    let mut w_slots = [0usize; KT];
    if E::DTYPE != KvDtype::F32 {
        for (j, w) in w_slots.iter_mut().enumerate() {
            *w = j * hd;
        }
    }
    let qh = &a.q[i0 * qd + h * hd..];
    assert!(qh.len() >= (nr - 1) * qd + hd);
    transpose_in(s, qh.as_ptr(), qd, nr, hd, rows, a.scale, qt.as_mut_ptr());
    ot.fill(0.0);
    let (qt, ot, st) = (qt.as_ptr(), ot.as_mut_ptr(), st.as_mut_ptr());

    // Each row lane's position; padding rows are never masked.
    let mut lane_pos = [f32::INFINITY; 64];
    for (r, p) in lane_pos[..nr].iter_mut().enumerate() {
        *p = (a.first_pos + i0 + r) as f32;
    }
    let mut pos = [s.zero(); RV];
    for (v, p) in pos.iter_mut().enumerate() {
        *p = s.load(lane_pos.as_ptr().add(v * lanes));
    }

    let kv = &a.kv;
    let key_end = if a.causal {
        a.first_pos + i0 + nr
    } else {
        a.first_pos + a.n_tokens
    };
    // Keys after this one are masked for some row of the tile.
    let first_row = a.first_pos + i0;
    let mut walk = Walk::new(kv, (h / a.group) * hd, hd, 0);
    let mut slots = [0usize; KT];
    let mut m = [s.splat(f32::NEG_INFINITY); RV];
    let mut l = [s.zero(); RV];
    let mut k0 = 0;
    while k0 < key_end {
        let kt = KT.min(key_end - k0);
        for slot in &mut slots[..kt] {
            *slot = walk.next_offset();
        }
        // Pad to whole key blocks with copies of the last key (scores unused).
        let ktr = kt.div_ceil(NK) * NK;
        for j in kt..ktr {
            slots[j] = slots[kt - 1];
        }
        let (kp, vp, slots) = if E::DTYPE == KvDtype::F32 {
            // The pools are f32 here: read them in place.
            (
                kv.k.as_ptr().cast::<f32>(),
                kv.v.as_ptr().cast::<f32>(),
                &slots,
            )
        } else {
            widen_rows(s, kv.k.as_ptr(), &slots[..ktr], hd, kw);
            widen_rows(s, kv.v.as_ptr(), &slots[..kt], hd, vw);
            (kw.cast_const(), vw.cast_const(), &w_slots)
        };
        qk::<S, RV, NK>(s, qt, kp, &slots[..ktr], st, hd, rows);
        if a.causal && k0 + kt > first_row + 1 {
            for j in (first_row + 1).saturating_sub(k0)..kt {
                let key = (k0 + j) as f32;
                for (v, &p) in pos.iter().enumerate() {
                    let at = st.add(j * rows + v * lanes);
                    s.store(at, s.mask_after(s.load(at), p, key));
                }
            }
        }

        // Online softmax: new running max, rescale factor, probabilities, sums.
        let mut mn = m;
        for j in 0..kt {
            for (v, x) in mn.iter_mut().enumerate() {
                *x = s.max(*x, s.load(st.add(j * rows + v * lanes)));
            }
        }
        let mut alpha = [s.zero(); RV];
        let mut sum = [s.zero(); RV];
        for v in 0..RV {
            alpha[v] = s.exp(s.sub(m[v], mn[v]));
        }
        for j in 0..kt {
            for v in 0..RV {
                let at = st.add(j * rows + v * lanes);
                let e = s.exp(s.sub(s.load(at), mn[v]));
                s.store(at, e);
                sum[v] = s.add(sum[v], e);
            }
        }
        for v in 0..RV {
            l[v] = s.fma(l[v], alpha[v], sum[v]);
        }
        m = mn;

        let mut d0 = 0;
        while d0 + ND <= hd {
            pv::<S, RV, ND>(s, st, vp, &slots[..kt], ot, &alpha, d0, rows);
            d0 += ND;
        }
        while d0 + 2 <= hd {
            pv::<S, RV, 2>(s, st, vp, &slots[..kt], ot, &alpha, d0, rows);
            d0 += 2;
        }
        if d0 < hd {
            pv::<S, RV, 1>(s, st, vp, &slots[..kt], ot, &alpha, d0, rows);
        }
        k0 += kt;
    }

    let mut lane_sum = [0.0f32; 64];
    for (v, &x) in l.iter().enumerate() {
        s.store(lane_sum.as_mut_ptr().add(v * lanes), x);
    }
    for x in &mut lane_sum[..nr] {
        *x = 1.0 / *x;
    }
    transpose_out(
        s,
        ot,
        rows,
        hd,
        &lane_sum[..nr],
        out.get().add(i0 * qd + h * hd),
        qd,
    );
}

/// `dst[j * hd..(j + 1) * hd] = pool[slots[j]..slots[j] + hd]` widened to f32.
///
/// # Safety
/// Each `pool[slot..slot + hd]` is in bounds, `dst` has room for
/// `[slots.len()][hd]`, and `s` can convert `E`.
#[inline(always)]
unsafe fn widen_rows<S: Simd, E: Load>(
    s: S,
    pool: *const E,
    slots: &[usize],
    hd: usize,
    dst: *mut f32,
) {
    let lanes = S::LANES;
    let nv = hd / lanes * lanes;
    for (j, &slot) in slots.iter().enumerate() {
        let (src, d) = (pool.add(slot), dst.add(j * hd));
        let mut c = 0;
        while c < nv {
            s.store(d.add(c), E::load(s, src.add(c)));
            c += lanes;
        }
        for c in nv..hd {
            *d.add(c) = (*src.add(c)).to_f32();
        }
    }
}

/// `qt[d * rows + r] = q[r * stride + d] * scale` for the `nr` rows, zero for the
/// padding rows up to `rows`: 8×8 blocks in registers, the edges one by one.
///
/// # Safety
/// `q` holds `nr` rows of `stride` with `hd` used, `qt` `[hd][rows]`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn transpose_in<S: Simd>(
    s: S,
    q: *const f32,
    stride: usize,
    nr: usize,
    hd: usize,
    rows: usize,
    scale: f32,
    qt: *mut f32,
) {
    let (nr8, hd8) = (nr / 8 * 8, hd / 8 * 8);
    for r0 in (0..nr8).step_by(8) {
        for d0 in (0..hd8).step_by(8) {
            s.transpose8(
                q.add(r0 * stride + d0),
                stride,
                qt.add(d0 * rows + r0),
                rows,
                &[scale; 8],
            );
        }
    }
    transpose_edge(q, stride, 0..nr8, hd8..hd, qt, rows, scale);
    transpose_edge(q, stride, nr8..nr, 0..hd, qt, rows, scale);
    for d in 0..hd {
        for r in nr..rows {
            *qt.add(d * rows + r) = 0.0;
        }
    }
}

/// `out[r * stride + d] = ot[d * rows + r] * inv[r]` for the rows of `inv`.
///
/// # Safety
/// `ot` holds `[hd][rows]`, and `out` is valid for writing those elements.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn transpose_out<S: Simd>(
    s: S,
    ot: *const f32,
    rows: usize,
    hd: usize,
    inv: &[f32],
    out: *mut f32,
    stride: usize,
) {
    let nr = inv.len();
    let (nr8, hd8) = (nr / 8 * 8, hd / 8 * 8);
    for r0 in (0..nr8).step_by(8) {
        let mul: &[f32; 8] = inv[r0..r0 + 8].try_into().unwrap();
        for d0 in (0..hd8).step_by(8) {
            s.transpose8(
                ot.add(d0 * rows + r0),
                rows,
                out.add(r0 * stride + d0),
                stride,
                mul,
            );
        }
    }
    for (r, &m) in inv.iter().enumerate() {
        let ds = if r < nr8 { hd8..hd } else { 0..hd };
        for d in ds {
            *out.add(r * stride + d) = *ot.add(d * rows + r) * m;
        }
    }
}

/// The scalar part of [`transpose_in`]: out of line, so it is built for the
/// baseline target (an AVX-512 build of this loop scatters, which is slow).
#[inline(never)]
unsafe fn transpose_edge(
    q: *const f32,
    stride: usize,
    rs: std::ops::Range<usize>,
    ds: std::ops::Range<usize>,
    qt: *mut f32,
    rows: usize,
    scale: f32,
) {
    for r in rs {
        for d in ds.clone() {
            *qt.add(d * rows + r) = *q.add(r * stride + d) * scale;
        }
    }
}

/// `st[j][rows] = sum_d qt[d][rows] * k[slots[j] + d]`, `NK` keys at a time.
///
/// # Safety
/// `qt` holds `[hd][rows]`, `st` has room for `[slots.len()][rows]`, and every
/// `k[slot..slot + hd]` is in bounds.
#[inline(always)]
unsafe fn qk<S: Simd, const RV: usize, const NK: usize>(
    s: S,
    qt: *const f32,
    k: *const f32,
    slots: &[usize],
    st: *mut f32,
    hd: usize,
    rows: usize,
) {
    let lanes = S::LANES;
    for (jb, block) in slots.chunks_exact(NK).enumerate() {
        let mut kr = [k; NK];
        for n in 0..NK {
            kr[n] = k.add(block[n]);
        }
        let mut acc = [[s.zero(); RV]; NK];
        for d in 0..hd {
            let mut qv = [s.zero(); RV];
            for (v, x) in qv.iter_mut().enumerate() {
                *x = s.load(qt.add(d * rows + v * lanes));
            }
            for n in 0..NK {
                let kb = s.splat(*kr[n].add(d));
                for v in 0..RV {
                    acc[n][v] = s.fma(qv[v], kb, acc[n][v]);
                }
            }
        }
        for (n, an) in acc.iter().enumerate() {
            for (v, &x) in an.iter().enumerate() {
                s.store(st.add((jb * NK + n) * rows + v * lanes), x);
            }
        }
    }
}

/// `ot[d][rows] = ot[d][rows] * alpha + sum_j pt[j][rows] * v[slots[j] + d]` for the
/// `ND` dims from `d0`.
///
/// # Safety
/// As [`qk`], with `pt` holding `[slots.len()][rows]` and `ot` `[hd][rows]`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn pv<S: Simd, const RV: usize, const ND: usize>(
    s: S,
    pt: *const f32,
    v: *const f32,
    slots: &[usize],
    ot: *mut f32,
    alpha: &[S::V; RV],
    d0: usize,
    rows: usize,
) {
    let lanes = S::LANES;
    let mut acc = [[s.zero(); RV]; ND];
    for (n, an) in acc.iter_mut().enumerate() {
        for (w, x) in an.iter_mut().enumerate() {
            *x = s.mul(s.load(ot.add((d0 + n) * rows + w * lanes)), alpha[w]);
        }
    }
    for (j, &slot) in slots.iter().enumerate() {
        let mut p = [s.zero(); RV];
        for (w, x) in p.iter_mut().enumerate() {
            *x = s.load(pt.add(j * rows + w * lanes));
        }
        let vr = v.add(slot + d0);
        for (n, an) in acc.iter_mut().enumerate() {
            let vb = s.splat(*vr.add(n));
            for (x, &pw) in an.iter_mut().zip(&p) {
                *x = s.fma(pw, vb, *x);
            }
        }
    }
    for (n, an) in acc.iter().enumerate() {
        for (w, &x) in an.iter().enumerate() {
            s.store(ot.add((d0 + n) * rows + w * lanes), x);
        }
    }
}

/// Keys per chunk of the rows path's online softmax (scores on the stack).
const ROW_CHUNK: usize = 256;

/// Query row `qh` of head `h` over keys `lo..hi`: writes the unnormalised
/// `sum_j e^(s_j - max) v_j` to `acc` and returns `(max, sum_j e^(s_j - max))`
/// (`(-inf, 0)` and zeros for no keys). Keys go in chunks of [`ROW_CHUNK`] with an
/// online softmax, so no scratch grows with the context; within a chunk `NC`
/// vectors of head_dim at a time stay in registers while P·V runs over the keys.
///
/// # Safety
/// `s` can convert `E`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn row<S: Simd, E: Load, const NC: usize>(
    s: S,
    a: &Args<E>,
    qh: &[f32],
    h: usize,
    lo: usize,
    hi: usize,
    acc: &mut [f32],
) -> (f32, f32) {
    let lanes = S::LANES;
    let hd = a.head_dim;
    let (qh, acc) = (&qh[..hd], &mut acc[..hd]);
    let off = (h / a.group) * hd;
    let nv = hd / lanes * lanes;
    let kp = a.kv.k.as_ptr();
    acc.fill(0.0);
    let (mut max, mut sum) = (f32::NEG_INFINITY, 0.0f32);
    let vp = a.kv.v.as_ptr();
    let mut walk = Walk::new(&a.kv, off, hd, lo);
    // The first keys' K and V rows, then each key's a fixed distance ahead:
    // a head's rows sit `kv_dim` apart, a stride the hardware prefetchers do
    // not follow, and V is read right after this key's chunk of scores.
    let mut lead = Walk::new(&a.kv, off, hd, lo);
    let mut lead_pos = lo;
    while lead_pos < hi.min(lo + E::PREFETCH_KEYS) {
        let at = lead.next_offset();
        prefetch(kp, at, hd);
        prefetch(vp, at, hd);
        lead_pos += 1;
    }
    let mut sc = [0.0f32; ROW_CHUNK];
    for c0 in (lo..hi).step_by(ROW_CHUNK) {
        let n = ROW_CHUNK.min(hi - c0);
        let sc = &mut sc[..n];

        // Scores, four keys at a time.
        for out4 in sc.chunks_mut(4) {
            for _ in 0..out4.len() {
                if lead_pos < hi {
                    let at = lead.next_offset();
                    prefetch(kp, at, hd);
                    prefetch(vp, at, hd);
                    lead_pos += 1;
                }
            }
            let mut kr = [kp; 4];
            for k in &mut kr[..out4.len()] {
                // SAFETY: the walk checked `k[at..at + hd]`.
                *k = unsafe { kp.add(walk.next_offset()) };
            }
            // A short last block repeats its first key.
            let first = kr[0];
            for k in &mut kr[out4.len()..] {
                *k = first;
            }
            let mut dots = [s.zero(); 4];
            let mut d = 0;
            while d < nv {
                // SAFETY: d + lanes <= hd, within q and each key's head slice.
                unsafe {
                    let qv = s.load(qh.as_ptr().add(d));
                    for (x, k) in dots.iter_mut().zip(kr) {
                        *x = s.fma(qv, E::load(s, k.add(d)), *x);
                    }
                }
                d += lanes;
            }
            for ((o, dot), k) in out4.iter_mut().zip(dots).zip(kr) {
                let mut x = s.reduce_add(dot);
                for (dd, &qd) in qh.iter().enumerate().skip(nv) {
                    // SAFETY: dd < hd.
                    x += qd * unsafe { *k.add(dd) }.to_f32();
                }
                *o = x * a.scale;
            }
        }

        // Online softmax: the chunk's numerators against the new running max.
        let n8 = n / lanes * lanes;
        let mut mv = s.splat(max);
        for c in (0..n8).step_by(lanes) {
            // SAFETY: c + lanes <= n.
            mv = s.max(mv, unsafe { s.load(sc.as_ptr().add(c)) });
        }
        let mut new_max = s.reduce_max(mv);
        for &x in &sc[n8..] {
            new_max = if x.is_nan() { x } else { new_max.max(x) };
        }
        let alpha = if max == new_max {
            1.0
        } else {
            (max - new_max).exp()
        };
        max = new_max;
        let (m, mut sv) = (s.splat(max), s.zero());
        for c in (0..n8).step_by(lanes) {
            // SAFETY: c + lanes <= n.
            unsafe {
                let e = s.exp(s.sub(s.load(sc.as_ptr().add(c)), m));
                s.store(sc.as_mut_ptr().add(c), e);
                sv = s.add(sv, e);
            }
        }
        if n8 < n {
            let mut tail = [f32::NEG_INFINITY; 16];
            tail[..n - n8].copy_from_slice(&sc[n8..]);
            // SAFETY: lanes <= 16.
            unsafe {
                let e = s.exp(s.sub(s.load(tail.as_ptr()), m));
                s.store(tail.as_mut_ptr(), e);
                sv = s.add(sv, e);
            }
            sc[n8..].copy_from_slice(&tail[..n - n8]);
        }
        sum = sum * alpha + s.reduce_add(sv);

        // P·V: blocks of NC, then 4, 2, 1 vectors in registers, then the scalar tail.
        let sc = &*sc;
        let mut d0 = 0;
        while d0 + NC * lanes <= nv {
            row_pv::<S, E, NC>(s, a, sc, off, c0, d0, alpha, acc);
            d0 += NC * lanes;
        }
        if NC > 4 && d0 + 4 * lanes <= nv {
            row_pv::<S, E, 4>(s, a, sc, off, c0, d0, alpha, acc);
            d0 += 4 * lanes;
        }
        if NC > 2 && d0 + 2 * lanes <= nv {
            row_pv::<S, E, 2>(s, a, sc, off, c0, d0, alpha, acc);
            d0 += 2 * lanes;
        }
        if d0 < nv {
            row_pv::<S, E, 1>(s, a, sc, off, c0, d0, alpha, acc);
        }
        if nv < hd {
            acc[nv..].iter_mut().for_each(|x| *x *= alpha);
            let mut walk = Walk::new(&a.kv, off, hd, c0);
            for &p in sc {
                let at = walk.next_offset();
                let vr = &a.kv.v[at + nv..at + hd];
                for (o, &x) in acc[nv..].iter_mut().zip(vr) {
                    *o += p * x.to_f32();
                }
            }
        }
    }
    (max, sum)
}

/// `acc[d0..d0 + NC * LANES] = alpha * acc[..] + sum_j p_j v_j[..]` over the keys
/// from `lo`.
///
/// # Safety
/// `s` can convert `E`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn row_pv<S: Simd, E: Load, const NC: usize>(
    s: S,
    a: &Args<E>,
    p: &[f32],
    off: usize,
    lo: usize,
    d0: usize,
    alpha: f32,
    acc: &mut [f32],
) {
    let lanes = S::LANES;
    let hd = a.head_dim;
    let vp = a.kv.v.as_ptr();
    assert!(d0 + NC * lanes <= hd && acc.len() >= hd);
    let mut r = [s.zero(); NC];
    let al = s.splat(alpha);
    for (c, x) in r.iter_mut().enumerate() {
        // SAFETY: checked above.
        *x = s.mul(unsafe { s.load(acc.as_ptr().add(d0 + c * lanes)) }, al);
    }
    let mut walk = Walk::new(&a.kv, off, hd, lo);
    let mut lead = Walk::new(&a.kv, off, hd, lo + E::PREFETCH_KEYS);
    for (j, &pj) in p.iter().enumerate() {
        if j + E::PREFETCH_KEYS < p.len() {
            prefetch(vp, lead.next_offset() + d0, NC * lanes);
        }
        let pb = s.splat(pj);
        // SAFETY: the walk checked `v[at..at + hd]`, and d0 + NC * lanes <= hd.
        unsafe {
            let vr = vp.add(walk.next_offset() + d0);
            for (c, x) in r.iter_mut().enumerate() {
                *x = s.fma(pb, E::load(s, vr.add(c * lanes)), *x);
            }
        }
    }
    for (c, &x) in r.iter().enumerate() {
        // SAFETY: checked above.
        unsafe { s.store(acc.as_mut_ptr().add(d0 + c * lanes), x) };
    }
}

/// The kernels of one instruction set, for pools of `E`.
struct Kernels<E: KvElem> {
    /// query rows per tile
    tile_rows: usize,
    /// [`tile`] (same safety contract)
    tile: TileFn<E>,
    /// [`row`] (unsafe only for the target features)
    row: RowFn<E>,
    /// kernels with smaller tiles, for calls with at most their `tile_rows` rows
    few: Option<&'static Kernels<E>>,
}

type TileFn<E> = unsafe fn(&Args<E>, OutPtr, usize, usize, &mut Vec<f32>);
type RowFn<E> = unsafe fn(&Args<E>, &[f32], usize, usize, usize, &mut [f32]) -> (f32, f32);

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

const PORTABLE: Kernels<f32> = Kernels {
    tile_rows: 8,
    tile: tile_portable,
    row: row_portable,
    few: None,
};

const PORTABLE_F16: Kernels<f16> = Kernels {
    tile_rows: 8,
    tile: tile_portable,
    row: row_portable,
    few: None,
};

unsafe fn tile_portable<E: Load>(a: &Args<E>, out: OutPtr, h: usize, t: usize, buf: &mut Vec<f32>) {
    tile::<Portable, E, 1, 6, 6, 48>(Portable, a, out, h, t, buf)
}

unsafe fn row_portable<E: Load>(
    a: &Args<E>,
    qh: &[f32],
    h: usize,
    lo: usize,
    hi: usize,
    acc: &mut [f32],
) -> (f32, f32) {
    row::<Portable, E, 4>(Portable, a, qh, h, lo, hi, acc)
}

#[cfg(target_arch = "x86_64")]
const AVX2: Kernels<f32> = Kernels {
    tile_rows: 16,
    tile: tile_avx2,
    row: row_avx2,
    few: None,
};

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2(a: &Args<f32>, out: OutPtr, h: usize, t: usize, buf: &mut Vec<f32>) {
    tile::<avx2::Avx2, f32, 2, 6, 6, 48>(avx2::Avx2::new(), a, out, h, t, buf)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_avx2(
    a: &Args<f32>,
    qh: &[f32],
    h: usize,
    lo: usize,
    hi: usize,
    acc: &mut [f32],
) -> (f32, f32) {
    row::<avx2::Avx2, f32, 8>(avx2::Avx2::new(), a, qh, h, lo, hi, acc)
}

#[cfg(target_arch = "x86_64")]
const AVX2_F16: Kernels<f16> = Kernels {
    tile_rows: 16,
    tile: tile_avx2_f16,
    row: row_avx2_f16,
    few: None,
};

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_avx2_f16(a: &Args<f16>, out: OutPtr, h: usize, t: usize, buf: &mut Vec<f32>) {
    tile::<avx2::Avx2, f16, 2, 6, 6, 48>(avx2::Avx2::new(), a, out, h, t, buf)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn row_avx2_f16(
    a: &Args<f16>,
    qh: &[f32],
    h: usize,
    lo: usize,
    hi: usize,
    acc: &mut [f32],
) -> (f32, f32) {
    row::<avx2::Avx2, f16, 8>(avx2::Avx2::new(), a, qh, h, lo, hi, acc)
}

/// 48-row tiles measured about 10% faster than 32 for SigLIP (same for Phi-2
/// prefill). Calls with at most 16 rows take AVX2's 16-row tiles instead (less
/// padding), and the rows path stays AVX2: decode is bound by memory, not FMAs.
#[cfg(target_arch = "x86_64")]
const AVX512: Kernels<f32> = Kernels {
    tile_rows: 48,
    tile: tile_avx512,
    row: row_avx2,
    few: Some(&AVX2),
};

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn tile_avx512(a: &Args<f32>, out: OutPtr, h: usize, t: usize, buf: &mut Vec<f32>) {
    tile::<avx512::Avx512, f32, 3, 8, 8, 32>(avx512::Avx512::new(), a, out, h, t, buf)
}

/// As [`AVX512`], but the rows path is AVX-512 here: with f16 rows, decode
/// measured about 20% faster with 512-bit loads and conversions than with
/// AVX2's, and five vectors (`NC`) hold Phi-2's head_dim of 80, so P·V is one
/// pass over the V rows instead of two.
#[cfg(target_arch = "x86_64")]
const AVX512_F16: Kernels<f16> = Kernels {
    tile_rows: 48,
    tile: tile_avx512_f16,
    row: row_avx512_f16,
    few: Some(&AVX2_F16),
};

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn tile_avx512_f16(a: &Args<f16>, out: OutPtr, h: usize, t: usize, buf: &mut Vec<f32>) {
    tile::<avx512::Avx512, f16, 3, 8, 8, 32>(avx512::Avx512::new(), a, out, h, t, buf)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn row_avx512_f16(
    a: &Args<f16>,
    qh: &[f32],
    h: usize,
    lo: usize,
    hi: usize,
    acc: &mut [f32],
) -> (f32, f32) {
    row::<avx512::Avx512, f16, 5>(avx512::Avx512::new(), a, qh, h, lo, hi, acc)
}

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

/// A query row of the rows pass.
#[derive(Clone, Copy)]
struct FewRow {
    /// its sequence
    seq: usize,
    /// the sequence's first query row in the call
    r0: usize,
    /// its index in the sequence
    i: usize,
}

/// The `few` query rows of sequences with fewer than [`TILED_MIN_ROWS`] rows,
/// one task per (row, head), or per (row, head, chunk of keys) with split-K.
fn rows<E: Load>(b: &Batch<E>, few: usize, out: &mut [f32], k: &Kernels<E>) {
    let hd = b.head_dim;
    let qd = b.n_heads * hd;
    let mut list = FEW_ROWS.take();
    list.clear();
    if list.capacity() < few {
        // Room for 64 rows at least, and rounded up, so a decode batch that grows
        // a sequence at a time seldom reallocates it.
        list.reserve_exact(few.next_power_of_two().max(64));
    }
    let mut max_keys = 0;
    let mut r0 = 0;
    for (seq, s) in b.seqs.iter().enumerate() {
        if s.rows < TILED_MIN_ROWS {
            list.extend((0..s.rows).map(|i| FewRow { seq, r0, i }));
            // The last row has the most keys, causal or not.
            max_keys = max_keys.max(s.first_pos + s.rows);
        }
        r0 += s.rows;
    }
    let index = &list[..];
    let tasks = few * b.n_heads;
    // Chunks per (row, head) to give each thread SPLIT_TASKS_PER_THREAD tasks.
    let want = (SPLIT_TASKS_PER_THREAD * rayon::current_num_threads()).div_ceil(tasks);
    let chunks = if max_keys >= SPLIT_MIN_KEYS {
        want.min(max_keys / SPLIT_CHUNK_MIN)
    } else {
        1
    };
    // Row `x`'s sequence's arguments, its index there, and its (row, head h)
    // slice of q and out.
    let out = OutPtr(out.as_mut_ptr());
    let task = |x: usize, h: usize| {
        let r = index[x];
        let a = b.args(r.seq, r.r0);
        let at = (r.r0 + r.i) * qd + h * hd;
        (a, r.i, &b.q[at..at + hd], at)
    };
    // Split-K partials: (acc[hd], max, sum) per (row, head, chunk). Sized for
    // `want` chunks on every call, split or not, so the first decode step (the
    // warm-up) allocates it and a context growing past SPLIT_MIN_KEYS never does.
    let width = hd + 2;
    let mut parts = PARTIALS.take();
    if parts.len() < tasks * want * width {
        parts.resize((tasks * want * width).next_power_of_two(), 0.0);
    }
    if chunks <= 1 {
        PARTIALS.set(parts);
        (0..tasks).into_par_iter().for_each(|idx| {
            let h = idx % b.n_heads;
            let (a, i, q, at) = task(idx / b.n_heads, h);
            // SAFETY: `at..at + hd` is this task's own (row, head) slice of the
            // output (the index holds each row once), in bounds as it is in q
            // (`task` sliced it there), which has the output's shape.
            let o = unsafe { std::slice::from_raw_parts_mut(out.get().add(at), hd) };
            // SAFETY: `k` matches the CPU.
            let (_, sum) = unsafe { (k.row)(&a, q, h, 0, a.n_keys(i), o) };
            let inv = 1.0 / sum;
            o.iter_mut().for_each(|x| *x *= inv);
        });
        FEW_ROWS.set(list);
        return;
    }

    // Split-K: the chunks' partials, then merged.
    let len = tasks * chunks * width;
    parts[..len]
        .par_chunks_mut(width)
        .enumerate()
        .for_each(|(idx, part)| {
            let (rh, c) = (idx / chunks, idx % chunks);
            let h = rh % b.n_heads;
            let (a, i, q, _) = task(rh / b.n_heads, h);
            let n = a.n_keys(i);
            let (acc, ms) = part.split_at_mut(hd);
            // SAFETY: `k` matches the CPU.
            let (m, sum) = unsafe { (k.row)(&a, q, h, n * c / chunks, n * (c + 1) / chunks, acc) };
            ms[0] = m;
            ms[1] = sum;
        });
    parts[..len]
        .par_chunks(chunks * width)
        .enumerate()
        .for_each(|(rh, p)| {
            let (_, _, _, at) = task(rh / b.n_heads, rh % b.n_heads);
            // SAFETY: as in the unsplit pass.
            let o = unsafe { std::slice::from_raw_parts_mut(out.get().add(at), hd) };
            let max = p
                .chunks_exact(width)
                .map(|c| c[hd])
                .fold(f32::NEG_INFINITY, f32::max);
            o.fill(0.0);
            let mut sum = 0.0;
            for c in p.chunks_exact(width) {
                if c[hd] == f32::NEG_INFINITY {
                    continue; // no keys in this chunk
                }
                let w = (c[hd] - max).exp();
                sum += w * c[hd + 1];
                for (x, &y) in o.iter_mut().zip(&c[..hd]) {
                    *x += w * y;
                }
            }
            let inv = 1.0 / sum;
            o.iter_mut().for_each(|x| *x *= inv);
        });
    PARTIALS.set(parts);
    FEW_ROWS.set(list);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The portable widening against `half` for every f16 bit pattern.
    #[test]
    fn portable_f16_widening_is_exact() {
        let all: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        for (i, c) in all.chunks_exact(8).enumerate() {
            // SAFETY: `c` holds 8 halves.
            let got = unsafe { Portable.load_h(c.as_ptr()) }.to_array();
            for (j, (g, h)) in got.iter().zip(c).enumerate() {
                assert_eq!(g.to_bits(), h.to_f32().to_bits(), "f16 {:#06x}", i * 8 + j);
            }
        }
    }
}
