//! Matmul for F16 and BF16 weights repacked into panels of 16 rows, f32
//! activations and accumulation: the weights of element `k` of the panel's 16
//! rows are 32 contiguous bytes, which one `vcvtph2ps` (or a 16-bit shift for
//! BF16) turns into a 16-lane f32 vector; every activation row of a tile then
//! does one broadcast FMA with it. Decode streams each thread's panels once,
//! front to back; prefill blocks `k` so a panel slice stays in L1 while the
//! activation rows of a chunk stay in L2.

use super::dispatch::Level;
use super::qgemm::{write_tile, OutPtr, PackedMatrix, PANEL};
use crate::{Epilogue, QuantType};

/// Activation rows per cache chunk.
const MC: usize = 128;
/// Elements of `k` per cache block (a 16 KiB slice of an F16 panel).
const KC: usize = 512;

/// Rows `0..16` of element `kk` of panel `p`, as stored by [`pack`].
pub(super) fn pack(w: &crate::WeightView, dst: &mut [u8]) {
    use rayon::prelude::*;
    let k = w.cols;
    let panel_bytes = k * PANEL * 2;
    if panel_bytes == 0 {
        return;
    }
    dst.par_chunks_mut(panel_bytes)
        .enumerate()
        .for_each(|(p, d)| {
            for r in 0..PANEL.min(w.rows - p * PANEL) {
                let row = w.row(p * PANEL + r);
                for kk in 0..k {
                    let o = (kk * PANEL + r) * 2;
                    d[o..o + 2].copy_from_slice(&row[2 * kk..2 * kk + 2]);
                }
            }
        });
}

pub(super) struct FJob<'a> {
    pub w: &'a PackedMatrix,
    /// bytes ahead decode prefetches ([`super::dispatch::Tuning`]; 0: none)
    pub prefetch: usize,
    pub x: &'a [f32],
    pub m: usize,
    pub bias: Option<&'a [f32]>,
    pub epilogue: Epilogue,
    pub out: OutPtr,
}

impl FJob<'_> {
    /// Panels `p0..p1` of every activation row.
    pub(super) unsafe fn run(&self, level: Level, p0: usize, p1: usize) {
        let bf = self.w.ty() == QuantType::BF16;
        #[cfg(target_arch = "x86_64")]
        match (level, bf) {
            (Level::Avx512 | Level::Avx512Vnni | Level::Avx512Bf16, false) => {
                return x86::run_avx512::<false>(self, p0, p1)
            }
            (Level::Avx512 | Level::Avx512Vnni | Level::Avx512Bf16, true) => {
                return x86::run_avx512::<true>(self, p0, p1)
            }
            (Level::Avx2 | Level::AvxVnni, false) => return x86::run_avx2::<false>(self, p0, p1),
            (Level::Avx2 | Level::AvxVnni, true) => return x86::run_avx2::<true>(self, p0, p1),
            _ => {}
        }
        if bf {
            sweep::<Portable<true>>(self, p0, p1)
        } else {
            sweep::<Portable<false>>(self, p0, p1)
        }
    }
}

/// 16 f32 lanes (one panel's rows) and what the kernel does with them.
trait FIsa {
    type F: Copy;
    /// Activation rows per micro-tile.
    const MR: usize;
    unsafe fn zero() -> Self::F;
    /// The 16 stored weights of one element (F16 or BF16) as f32.
    unsafe fn weights(p: *const u8) -> Self::F;
    unsafe fn bcast(x: *const f32) -> Self::F;
    /// `a * b + c`
    unsafe fn fma(a: Self::F, b: Self::F, c: Self::F) -> Self::F;
    unsafe fn add(a: Self::F, b: Self::F) -> Self::F;
    unsafe fn load(p: *const f32) -> Self::F;
    unsafe fn store(p: *mut f32, v: Self::F);
    /// Whether this is AVX-512 code (see [`write_tile`]).
    const ZMM: bool = false;
    /// A hint to fetch the cache line at `p` (which may be past the panel's end).
    #[inline(always)]
    unsafe fn prefetch(p: *const u8) {
        let _ = p;
    }
}

#[inline(always)]
unsafe fn sweep<I: FIsa>(job: &FJob, p0: usize, p1: usize) {
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
                    let r = I::MR.min(i1 - i);
                    let mut tile = [[0.0f32; PANEL]; 8];
                    // Partial sums of earlier k blocks wait in `out`; a residual
                    // add starts from what `out` holds.
                    if k0 > 0 || accumulate {
                        for (ii, t) in tile[..r].iter_mut().enumerate() {
                            let o = job.out.0.add((i + ii) * n + c0);
                            t[..cols].copy_from_slice(std::slice::from_raw_parts(o, cols));
                        }
                    }
                    match r {
                        1 => tile_f::<I, 1>(job, panel, i, k0, k1, &mut tile),
                        2 => tile_f::<I, 2>(job, panel, i, k0, k1, &mut tile),
                        3 => tile_f::<I, 3>(job, panel, i, k0, k1, &mut tile),
                        4 => tile_f::<I, 4>(job, panel, i, k0, k1, &mut tile),
                        5 => tile_f::<I, 5>(job, panel, i, k0, k1, &mut tile),
                        6 => tile_f::<I, 6>(job, panel, i, k0, k1, &mut tile),
                        7 => tile_f::<I, 7>(job, panel, i, k0, k1, &mut tile),
                        _ => tile_f::<I, 8>(job, panel, i, k0, k1, &mut tile),
                    }
                    for (ii, t) in tile[..r].iter().enumerate() {
                        let o = job.out.0.add((i + ii) * n + c0);
                        if k1 == k {
                            write_tile(&t[..cols], o, c0, job.bias, epilogue, I::ZMM);
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
unsafe fn tile_f<I: FIsa, const M: usize>(
    job: &FJob,
    panel: *const u8,
    i0: usize,
    k0: usize,
    k1: usize,
    tile: &mut [[f32; PANEL]; 8],
) {
    let k = job.w.cols();
    let xr: [*const f32; M] = std::array::from_fn(|i| job.x.as_ptr().add((i0 + i) * k));
    let mut even: [I::F; M] = std::array::from_fn(|i| I::load(tile[i].as_ptr()));
    let mut odd = [I::zero(); M];
    let mut kk = k0;
    while kk + 2 <= k1 {
        if M <= 2 && job.prefetch > 0 {
            // Decode streams each panel once from memory: ask for the line
            // `job.prefetch` bytes ahead so the loads find it in cache.
            I::prefetch(panel.add(kk * PANEL * 2 + job.prefetch));
        }
        let w0 = I::weights(panel.add(kk * PANEL * 2));
        let w1 = I::weights(panel.add((kk + 1) * PANEL * 2));
        for i in 0..M {
            even[i] = I::fma(I::bcast(xr[i].add(kk)), w0, even[i]);
            odd[i] = I::fma(I::bcast(xr[i].add(kk + 1)), w1, odd[i]);
        }
        kk += 2;
    }
    if kk < k1 {
        let w0 = I::weights(panel.add(kk * PANEL * 2));
        for i in 0..M {
            even[i] = I::fma(I::bcast(xr[i].add(kk)), w0, even[i]);
        }
    }
    for i in 0..M {
        I::store(tile[i].as_mut_ptr(), I::add(even[i], odd[i]));
    }
}

struct Portable<const BF: bool>;

impl<const BF: bool> FIsa for Portable<BF> {
    type F = [f32; 16];
    const MR: usize = 4;
    #[inline(always)]
    unsafe fn zero() -> [f32; 16] {
        [0.0; 16]
    }
    #[inline(always)]
    unsafe fn weights(p: *const u8) -> [f32; 16] {
        let h: [u16; 16] = std::ptr::read_unaligned(p as *const [u16; 16]);
        if BF {
            h.map(|v| f32::from_bits((v as u32) << 16))
        } else {
            h.map(|v| half::f16::from_bits(v).to_f32())
        }
    }
    #[inline(always)]
    unsafe fn bcast(x: *const f32) -> [f32; 16] {
        [*x; 16]
    }
    #[inline(always)]
    unsafe fn fma(a: [f32; 16], b: [f32; 16], c: [f32; 16]) -> [f32; 16] {
        std::array::from_fn(|l| a[l].mul_add(b[l], c[l]))
    }
    #[inline(always)]
    unsafe fn add(a: [f32; 16], b: [f32; 16]) -> [f32; 16] {
        std::array::from_fn(|l| a[l] + b[l])
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> [f32; 16] {
        std::ptr::read_unaligned(p as *const [f32; 16])
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: [f32; 16]) {
        std::ptr::write_unaligned(p as *mut [f32; 16], v)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{sweep, FIsa, FJob};

    struct Zmm<const BF: bool>;

    impl<const BF: bool> FIsa for Zmm<BF> {
        type F = __m512;
        const ZMM: bool = true;
        const MR: usize = 8;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn weights(p: *const u8) -> __m512 {
            let h = _mm256_loadu_si256(p as *const __m256i);
            if BF {
                _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
            } else {
                _mm512_cvtph_ps(h)
            }
        }
        #[inline(always)]
        unsafe fn bcast(x: *const f32) -> __m512 {
            _mm512_set1_ps(*x)
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            _mm512_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            _mm512_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn prefetch(p: *const u8) {
            _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
        }
    }

    struct Ymm<const BF: bool>;

    type F2 = [__m256; 2];

    impl<const BF: bool> FIsa for Ymm<BF> {
        type F = F2;
        const MR: usize = 3;
        #[inline(always)]
        unsafe fn zero() -> F2 {
            [_mm256_setzero_ps(); 2]
        }
        #[inline(always)]
        unsafe fn weights(p: *const u8) -> F2 {
            std::array::from_fn(|h| {
                let v = _mm_loadu_si128(p.add(16 * h) as *const __m128i);
                if BF {
                    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16))
                } else {
                    _mm256_cvtph_ps(v)
                }
            })
        }
        #[inline(always)]
        unsafe fn bcast(x: *const f32) -> F2 {
            [_mm256_broadcast_ss(&*x); 2]
        }
        #[inline(always)]
        unsafe fn fma(a: F2, b: F2, c: F2) -> F2 {
            std::array::from_fn(|h| _mm256_fmadd_ps(a[h], b[h], c[h]))
        }
        #[inline(always)]
        unsafe fn add(a: F2, b: F2) -> F2 {
            std::array::from_fn(|h| _mm256_add_ps(a[h], b[h]))
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> F2 {
            [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))]
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: F2) {
            _mm256_storeu_ps(p, v[0]);
            _mm256_storeu_ps(p.add(8), v[1]);
        }
        #[inline(always)]
        unsafe fn prefetch(p: *const u8) {
            _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    pub(super) unsafe fn run_avx512<const BF: bool>(job: &FJob, p0: usize, p1: usize) {
        sweep::<Zmm<BF>>(job, p0, p1)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn run_avx2<const BF: bool>(job: &FJob, p0: usize, p1: usize) {
        sweep::<Ymm<BF>>(job, p0, p1)
    }
}
