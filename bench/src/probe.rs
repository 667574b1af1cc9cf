//! Probes of the machine itself: sustained memory read bandwidth and peak
//! arithmetic rates (f32 FMA, int8 dot products), the bounds every model figure
//! is compared against.
//!
//! Each probe picks its instructions at run time (never `target-cpu=native`):
//! the widest the CPU has, plus the narrower ones where they might be faster
//! (some CPUs split 512-bit ops). Arithmetic probes keep 12–16 independent
//! dependency chains in registers, enough to cover the latency of every unit;
//! operations are counted as 2 per multiply-add (one f32 FMA = 2 flops, one
//! int8 × int8 product summed into an accumulator = 2 ops).

use std::hint::black_box;
use std::time::{Duration, Instant};

/// Rates of repeated passes of one probe, in its unit (GB/s, GFLOP/s, GOP/s).
#[derive(Clone, Debug)]
pub struct ProbeResult {
    /// the instructions that gave the best rate
    pub isa: &'static str,
    pub samples: Vec<f64>,
}

impl ProbeResult {
    /// The best pass: the bound.
    pub fn best(&self) -> f64 {
        self.samples.iter().copied().fold(0.0, f64::max)
    }
}

/// A cache-line aligned 64-byte block.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u64; 8]);

/// A buffer for the bandwidth probe, every page written once so that reads
/// stream from memory (an untouched allocation reads the shared zero page).
pub struct ReadBuffer {
    lines: Vec<Line>,
}

impl ReadBuffer {
    pub fn new(bytes: usize, threads: usize) -> Self {
        let n = bytes.div_ceil(64).max(1);
        let mut lines: Vec<Line> = Vec::with_capacity(n);
        let per = n.div_ceil(threads.max(1));
        // Written by several threads at once, so the first touch is fast too.
        std::thread::scope(|s| {
            for (t, part) in lines.spare_capacity_mut()[..n].chunks_mut(per).enumerate() {
                s.spawn(move || {
                    for (i, l) in part.iter_mut().enumerate() {
                        let v = (t * per + i) as u64;
                        l.write(Line([v, v ^ 1, v ^ 2, v ^ 3, v ^ 4, v ^ 5, v ^ 6, v ^ 7]));
                    }
                });
            }
        });
        // SAFETY: every one of the `n` elements was initialised above.
        unsafe { lines.set_len(n) };
        ReadBuffer { lines }
    }

    pub fn bytes(&self) -> usize {
        self.lines.len() * 64
    }
}

/// Sustained read bandwidth (GB/s, 1e9 bytes) of `threads` threads, each
/// streaming its own slice of `buf` once per pass; passes repeat for about
/// `duration` (at least 3).
pub fn mem_read_gb_s(buf: &ReadBuffer, threads: usize, duration: Duration) -> ProbeResult {
    let threads = threads.max(1);
    let (isa, read): (&'static str, fn(&[Line]) -> u64) = read_kernel();
    let per = buf.lines.len().div_ceil(threads);
    let mut samples = Vec::new();
    let start = Instant::now();
    while samples.len() < 3 || start.elapsed() < duration {
        let t = Instant::now();
        let sum: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = buf
                .lines
                .chunks(per)
                .map(|part| s.spawn(move || read(part)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("probe thread"))
                .fold(0u64, u64::wrapping_add)
        });
        let secs = t.elapsed().as_secs_f64();
        black_box(sum);
        samples.push(buf.bytes() as f64 / secs / 1e9);
        if samples.len() >= 1000 {
            break;
        }
    }
    ProbeResult { isa, samples }
}

fn read_kernel() -> (&'static str, fn(&[Line]) -> u64) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was detected just above.
            return ("avx512", |l| unsafe { x86::read_avx512(l) });
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return ("avx2", |l| unsafe { x86::read_avx2(l) });
        }
    }
    ("portable", read_portable)
}

fn read_portable(lines: &[Line]) -> u64 {
    let mut acc = [0u64; 8];
    for l in lines {
        for (a, v) in acc.iter_mut().zip(l.0) {
            *a = a.wrapping_add(v);
        }
    }
    acc.iter().fold(0, |s, &v| s.wrapping_add(v))
}

/// One arithmetic kernel: runs `iters` loop trips, returns a value to keep.
type Kernel = fn(u64) -> f32;

struct Arith {
    isa: &'static str,
    /// operations (flops or int ops) per loop trip
    ops_per_iter: f64,
    kernel: Kernel,
}

/// Runs `kernel` on `threads` threads for about `duration`, in passes of about
/// 20 ms each; one sample (ops/s ÷ 1e9) per pass.
fn arith_rate(a: &Arith, threads: usize, duration: Duration) -> Vec<f64> {
    let threads = threads.max(1);
    // Calibrate one pass to ~20 ms on one thread.
    let mut iters = 1u64 << 12;
    loop {
        let t = Instant::now();
        black_box((a.kernel)(iters));
        if t.elapsed() >= Duration::from_millis(20) || iters >= 1 << 40 {
            break;
        }
        iters *= 2;
    }
    let mut samples = Vec::new();
    let start = Instant::now();
    while samples.len() < 3 || start.elapsed() < duration {
        let t = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| black_box((a.kernel)(black_box(iters))));
            }
        });
        let secs = t.elapsed().as_secs_f64();
        samples.push(threads as f64 * iters as f64 * a.ops_per_iter / secs / 1e9);
        if samples.len() >= 1000 {
            break;
        }
    }
    samples
}

/// Picks the fastest of `kernels` on one thread (a short trial each), then
/// measures it on `threads` threads.
fn best_of(kernels: &[Arith], threads: &[usize], duration: Duration) -> Vec<ProbeResult> {
    let trial = (duration / 4).max(Duration::from_millis(60));
    let best = kernels
        .iter()
        .map(|k| {
            let s = arith_rate(k, 1, trial);
            (k, s.iter().copied().fold(0.0, f64::max))
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(k, _)| k)
        .expect("at least the portable kernel");
    threads
        .iter()
        .map(|&t| ProbeResult {
            isa: best.isa,
            samples: arith_rate(best, t, duration),
        })
        .collect()
}

/// Peak f32 FMA rate (GFLOP/s), one result per entry of `threads`.
pub fn f32_fma_gflop_s(threads: &[usize], duration: Duration) -> Vec<ProbeResult> {
    let mut k = vec![Arith {
        isa: "portable",
        ops_per_iter: (PORTABLE_CHAINS * 8 * 2) as f64,
        kernel: fma_portable,
    }];
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            k.push(Arith {
                isa: "avx2+fma",
                ops_per_iter: (x86::CHAINS_256 * 8 * 2) as f64,
                // SAFETY: the features were detected just above.
                kernel: |n| unsafe { x86::fma_avx2(n) },
            });
        }
        if is_x86_feature_detected!("avx512f") {
            k.push(Arith {
                isa: "avx512f",
                ops_per_iter: (x86::CHAINS_512 * 16 * 2) as f64,
                // SAFETY: as above.
                kernel: |n| unsafe { x86::fma_avx512(n) },
            });
        }
    }
    best_of(&k, threads, duration)
}

/// Peak int8 dot-product rate (GOP/s, 2 ops per u8 × i8 product), one result
/// per entry of `threads`.
pub fn int8_dot_gop_s(threads: &[usize], duration: Duration) -> Vec<ProbeResult> {
    let mut k = vec![Arith {
        isa: "portable",
        ops_per_iter: (PORTABLE_CHAINS * 32 * 2) as f64,
        kernel: int8_portable,
    }];
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") {
            k.push(Arith {
                isa: "avx2 (maddubs)",
                ops_per_iter: (x86::CHAINS_256 * 32 * 2) as f64,
                // SAFETY: the feature was detected just above.
                kernel: |n| unsafe { x86::maddubs_avx2(n) },
            });
        }
        if is_x86_feature_detected!("avxvnni") {
            k.push(Arith {
                isa: "avxvnni (vpdpbusd ymm)",
                ops_per_iter: (x86::CHAINS_256 * 32 * 2) as f64,
                // SAFETY: as above.
                kernel: |n| unsafe { x86::dpbusd_avxvnni(n) },
            });
        }
        if is_x86_feature_detected!("avx512bw") {
            k.push(Arith {
                isa: "avx512bw (maddubs)",
                ops_per_iter: (x86::CHAINS_512 * 64 * 2) as f64,
                // SAFETY: as above.
                kernel: |n| unsafe { x86::maddubs_avx512(n) },
            });
        }
        if is_x86_feature_detected!("avx512vnni") {
            k.push(Arith {
                isa: "avx512vnni (vpdpbusd zmm)",
                ops_per_iter: (x86::CHAINS_512 * 64 * 2) as f64,
                // SAFETY: as above.
                kernel: |n| unsafe { x86::dpbusd_avx512(n) },
            });
        }
    }
    best_of(&k, threads, duration)
}

const PORTABLE_CHAINS: usize = 8;

/// 8 chains of 8-wide f32 multiply-adds (`mul_add` would call libm without FMA).
fn fma_portable(iters: u64) -> f32 {
    let a = black_box(0.999_999f32);
    let b = black_box(1e-7f32);
    let mut acc = [[0f32; 8]; PORTABLE_CHAINS];
    for _ in 0..iters {
        for c in acc.iter_mut() {
            for x in c.iter_mut() {
                *x = *x * a + b;
            }
        }
    }
    acc.iter().flatten().sum()
}

/// 8 chains of 32 i8 × i8 products summed into i32 lanes.
fn int8_portable(iters: u64) -> f32 {
    let b = black_box([3i8; 32]);
    let mut acc = [[0i32; 8]; PORTABLE_CHAINS];
    for _ in 0..iters {
        for c in acc.iter_mut() {
            for (lane, x) in c.iter_mut().enumerate() {
                let mut s = *x;
                for j in 0..4 {
                    // the accumulator feeds the multiplier, so nothing is loop-invariant
                    let a = (*x >> (8 * j)) as i8;
                    s = s.wrapping_add(i32::from(a) * i32::from(b[lane * 4 + j]));
                }
                *x = s;
            }
        }
    }
    acc.iter().flatten().fold(0i32, |s, &v| s.wrapping_add(v)) as f32
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Line;
    use std::arch::x86_64::*;
    use std::hint::black_box;

    /// Independent chains: 12 of 16 ymm registers, 16 of 32 zmm registers.
    pub const CHAINS_256: usize = 12;
    pub const CHAINS_512: usize = 16;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn read_avx512(lines: &[Line]) -> u64 {
        let mut acc = [_mm512_setzero_si512(); 4];
        let chunks = lines.chunks_exact(4);
        let rest = chunks.remainder();
        for c in chunks {
            for (a, l) in acc.iter_mut().zip(c) {
                // SAFETY: `Line` is 64 bytes, 64-byte aligned.
                let v = unsafe { _mm512_load_si512(l.0.as_ptr().cast()) };
                *a = _mm512_add_epi64(*a, v);
            }
        }
        let mut s = _mm512_add_epi64(
            _mm512_add_epi64(acc[0], acc[1]),
            _mm512_add_epi64(acc[2], acc[3]),
        );
        for l in rest {
            // SAFETY: as above.
            s = _mm512_add_epi64(s, unsafe { _mm512_load_si512(l.0.as_ptr().cast()) });
        }
        _mm512_reduce_add_epi64(s) as u64
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn read_avx2(lines: &[Line]) -> u64 {
        let mut acc = [_mm256_setzero_si256(); 4];
        let chunks = lines.chunks_exact(2);
        let rest = chunks.remainder();
        for c in chunks {
            for (j, l) in c.iter().enumerate() {
                let p = l.0.as_ptr().cast::<__m256i>();
                // SAFETY: two aligned 32-byte halves of a 64-byte line.
                let (lo, hi) = unsafe { (_mm256_load_si256(p), _mm256_load_si256(p.add(1))) };
                acc[2 * j] = _mm256_add_epi64(acc[2 * j], lo);
                acc[2 * j + 1] = _mm256_add_epi64(acc[2 * j + 1], hi);
            }
        }
        let mut s = _mm256_add_epi64(
            _mm256_add_epi64(acc[0], acc[1]),
            _mm256_add_epi64(acc[2], acc[3]),
        );
        for l in rest {
            let p = l.0.as_ptr().cast::<__m256i>();
            // SAFETY: as above.
            unsafe {
                s = _mm256_add_epi64(s, _mm256_load_si256(p));
                s = _mm256_add_epi64(s, _mm256_load_si256(p.add(1)));
            }
        }
        let mut out = [0u64; 4];
        // SAFETY: 32 bytes into a 32-byte array (unaligned store).
        unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), s) };
        out.iter().fold(0, |a, &v| a.wrapping_add(v))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn fma_avx2(iters: u64) -> f32 {
        let a = _mm256_set1_ps(black_box(0.999_999));
        let b = _mm256_set1_ps(black_box(1e-7));
        let mut acc = [_mm256_setzero_ps(); CHAINS_256];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(*x, a, b);
            }
        }
        let mut s = _mm256_setzero_ps();
        for x in acc {
            s = _mm256_add_ps(s, x);
        }
        let mut out = [0f32; 8];
        // SAFETY: 32 bytes into a 32-byte array (unaligned store).
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), s) };
        out.iter().sum()
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma_avx512(iters: u64) -> f32 {
        let a = _mm512_set1_ps(black_box(0.999_999));
        let b = _mm512_set1_ps(black_box(1e-7));
        let mut acc = [_mm512_setzero_ps(); CHAINS_512];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, a, b);
            }
        }
        let mut s = _mm512_setzero_ps();
        for x in acc {
            s = _mm512_add_ps(s, x);
        }
        _mm512_reduce_add_ps(s)
    }

    /// `maddubs` (u8 × i8 pairs → i16) then `madd` with ones (→ i32) and an add:
    /// the int8 dot of AVX2 without VNNI. The accumulator is the `u8` operand of
    /// the next multiply, so nothing can be hoisted out of the loop.
    #[target_feature(enable = "avx2")]
    pub unsafe fn maddubs_avx2(iters: u64) -> f32 {
        let b = _mm256_set1_epi8(black_box(3));
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_set1_epi32(black_box(1)); CHAINS_256];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                let p = _mm256_maddubs_epi16(*x, b);
                *x = _mm256_add_epi32(*x, _mm256_madd_epi16(p, ones));
            }
        }
        let mut s = _mm256_setzero_si256();
        for x in acc {
            s = _mm256_add_epi32(s, x);
        }
        _mm256_extract_epi32::<0>(s) as f32
    }

    #[target_feature(enable = "avx512bw")]
    pub unsafe fn maddubs_avx512(iters: u64) -> f32 {
        let b = _mm512_set1_epi8(black_box(3));
        let ones = _mm512_set1_epi16(1);
        let mut acc = [_mm512_set1_epi32(black_box(1)); CHAINS_512];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                let p = _mm512_maddubs_epi16(*x, b);
                *x = _mm512_add_epi32(*x, _mm512_madd_epi16(p, ones));
            }
        }
        let mut s = _mm512_setzero_si512();
        for x in acc {
            s = _mm512_add_epi32(s, x);
        }
        _mm512_reduce_add_epi32(s) as f32
    }

    /// `vpdpbusd` on ymm (AVX-VNNI): 32 u8 × i8 products per instruction.
    #[target_feature(enable = "avx2,avxvnni")]
    pub unsafe fn dpbusd_avxvnni(iters: u64) -> f32 {
        let a = _mm256_set1_epi8(black_box(5));
        let b = _mm256_set1_epi8(black_box(3));
        let mut acc = [_mm256_setzero_si256(); CHAINS_256];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm256_dpbusd_avx_epi32(*x, a, b);
            }
        }
        let mut s = _mm256_setzero_si256();
        for x in acc {
            s = _mm256_add_epi32(s, x);
        }
        _mm256_extract_epi32::<0>(s) as f32
    }

    /// `vpdpbusd` on zmm (AVX-512 VNNI): 64 u8 × i8 products per instruction.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn dpbusd_avx512(iters: u64) -> f32 {
        let a = _mm512_set1_epi8(black_box(5));
        let b = _mm512_set1_epi8(black_box(3));
        let mut acc = [_mm512_setzero_si512(); CHAINS_512];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_dpbusd_epi32(*x, a, b);
            }
        }
        let mut s = _mm512_setzero_si512();
        for x in acc {
            s = _mm512_add_epi32(s, x);
        }
        _mm512_reduce_add_epi32(s) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_give_positive_rates() {
        let buf = ReadBuffer::new(4 << 20, 2);
        let bw = mem_read_gb_s(&buf, 2, Duration::from_millis(20));
        assert!(bw.samples.len() >= 3 && bw.best() > 0.0, "{bw:?}");
        for r in f32_fma_gflop_s(&[1], Duration::from_millis(30))
            .into_iter()
            .chain(int8_dot_gop_s(&[1], Duration::from_millis(30)))
        {
            assert!(r.best() > 0.0 && r.best().is_finite(), "{r:?}");
        }
    }

    #[test]
    fn read_kernels_agree() {
        let buf = ReadBuffer::new(64 * 37, 1);
        let want = read_portable(&buf.lines);
        assert_eq!((read_kernel().1)(&buf.lines), want);
    }
}
