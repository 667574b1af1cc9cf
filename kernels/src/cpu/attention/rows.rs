//! The rows (decode) path: one task per (query row, head), or per (row, head,
//! chunk of keys) with split-K, for the sequences with a few rows (see the
//! module docs of `attention`).

use std::cell::Cell;

use rayon::prelude::*;

use super::super::isa::Simd;
use super::super::OutPtr;
use super::{prefetch, Args, Batch, Kernels, Load, Walk, TILED_MIN_ROWS};

/// Split-K applies to rows with at least this many keys...
const SPLIT_MIN_KEYS: usize = 1024;
/// ...in chunks of at least this many keys...
const SPLIT_CHUNK_MIN: usize = 256;
/// ...when there are fewer than this many (row, head) tasks per thread.
const SPLIT_TASKS_PER_THREAD: usize = 4;

thread_local! {
    /// Split-K partial results, on the calling thread.
    static PARTIALS: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    /// The rows pass's query rows, on the calling thread.
    static FEW_ROWS: Cell<Vec<FewRow>> = const { Cell::new(Vec::new()) };
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
pub(super) unsafe fn row<S: Simd, E: Load, const NC: usize>(
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
pub(super) fn rows<E: Load>(b: &Batch<E>, few: usize, out: &mut [f32], k: &Kernels<E>) {
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
