//! Multi-head attention over a paged KV cache: one task per (query row, head),
//! two-pass softmax in f32 over a per-thread score buffer.

use std::cell::Cell;

use rayon::prelude::*;
use wide::f32x8;

use super::math::{load, store};
use crate::reference::check_attention;
use crate::KvView;

thread_local! {
    /// Per-thread score row, reused across calls. Taken out while in use so a
    /// re-entrant call on the same thread cannot observe it half-written.
    static SCORES: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n8 = a.len() / 8 * 8;
    let mut acc = [f32x8::ZERO; 2];
    for (i, c) in (0..n8).step_by(8).enumerate() {
        acc[i % 2] = load(&a[c..]).mul_add(load(&b[c..]), acc[i % 2]);
    }
    let mut s = (acc[0] + acc[1]).reduce_add();
    for i in n8..a.len() {
        s += a[i] * b[i];
    }
    s
}

/// `out += p * v`.
#[inline(always)]
fn axpy(out: &mut [f32], p: f32, v: &[f32]) {
    let n8 = out.len() / 8 * 8;
    let pv = f32x8::splat(p);
    for c in (0..n8).step_by(8) {
        let o = load(&v[c..]).mul_add(pv, load(&out[c..]));
        store(&mut out[c..], o);
    }
    for i in n8..out.len() {
        out[i] += p * v[i];
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    q: &[f32],
    n_tokens: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    kv: &KvView,
    first_pos: usize,
    causal: bool,
    scale: f32,
    out: &mut [f32],
) {
    check_attention(
        q, n_tokens, n_heads, n_kv_heads, head_dim, kv, first_pos, out,
    );
    if head_dim == 0 {
        return;
    }
    let group = n_heads / n_kv_heads;
    let total = first_pos + n_tokens;
    out.par_chunks_mut(head_dim)
        .enumerate()
        .for_each(|(idx, o)| {
            let (i, h) = (idx / n_heads, idx % n_heads);
            let n_keys = if causal { first_pos + i + 1 } else { total };
            let qh = &q[idx * head_dim..(idx + 1) * head_dim];
            let off = (h / group) * head_dim;

            let mut scores = SCORES.take();
            scores.resize(n_keys.max(scores.len()), 0.0);
            let s = &mut scores[..n_keys];
            let mut max = f32::NEG_INFINITY;
            for (t, st) in s.iter_mut().enumerate() {
                *st = dot(qh, &kv.key(t)[off..off + head_dim]) * scale;
                max = max.max(*st);
            }
            super::math::map_in_place(s, |v| (v - f32x8::splat(max)).exp());
            let sum: f32 = s.iter().sum();
            o.fill(0.0);
            for (t, &p) in s.iter().enumerate() {
                axpy(o, p, &kv.value(t)[off..off + head_dim]);
            }
            let inv = 1.0 / sum;
            o.iter_mut().for_each(|v| *v *= inv);
            SCORES.set(scores);
        });
}
