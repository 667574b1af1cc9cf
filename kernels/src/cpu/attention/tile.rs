//! The tiled (prefill) path: flash attention over one (head, tile of query
//! rows) per task, with the queries transposed so that every step works on
//! vectors of rows (see the module docs of `attention`).

use super::super::isa::Simd;
use super::super::OutPtr;
use super::{Args, Load, Walk};
use crate::KvDtype;

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
pub(super) unsafe fn tile<
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
