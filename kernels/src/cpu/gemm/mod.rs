//! The packed matmuls: weights repacked once into panels of 16 rows
//! ([`PackedMatrix`], `pack`), multiplied by the int8 kernels (Q8_0 / Q4_0
//! weights, activations quantized per 32-block: `acts`, `int8`) or the f32
//! kernel (F16 / BF16 weights: `float`), both written once over
//! [`isa::Panel`] and entered per level through [`isa::run`].
//!
//! Threads get static, contiguous panel ranges (one per pool thread);
//! activation rows go in chunks that stay in cache while a thread sweeps its
//! panels. `int8` and `float` share only what is here (the entry, the panel
//! split and the tile writer).

use std::cell::Cell;

use rayon::prelude::*;

use super::dispatch::{best_up_to, tuning, Level};
use super::isa::{self, Panel, Portable};
use super::math::{gelu_erf8, load, store};
use super::OutPtr;
use crate::{Epilogue, QuantType};

mod acts;
mod float;
mod int8;
mod pack;

pub use super::isa::PANEL;
pub use acts::QuantizedActs;
pub(crate) use acts::{block_quantizer, layer_norm_quantize, quantize_acts};
pub use pack::PackedMatrix;

/// `level`, or the best level below it this CPU supports.
fn supported(level: Level) -> Level {
    if level.is_supported() {
        level
    } else {
        best_up_to(level)
    }
}

thread_local! {
    /// Quantized activations, kept between calls so steady-state matmuls do not
    /// allocate. Taken out while in use (a nested call gets a fresh one).
    static ACTS: Cell<QuantizedActs> = Cell::new(QuantizedActs::default());
    /// Activations rounded to BF16 pairs for the BF16 dot, likewise.
    static XB: Cell<Vec<u32>> = const { Cell::new(Vec::new()) };
}

/// `out[m, n] = x[m, k] . W^T (+ bias)` through the int8 or float kernels of `level`
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
        let mut xb = XB.take();
        if w.bf16_dot() {
            acts::bf16_pairs(x, m, w.cols, &mut xb);
        }
        let job = float::Job {
            w,
            prefetch: tuning().float_prefetch,
            x,
            xb: &xb,
            m,
            bias,
            epilogue,
            out: OutPtr::new(out.as_mut_ptr()),
        };
        // SAFETY: level is supported by this CPU; panel ranges are disjoint.
        over_panels(w.panels, tasks(w), |p0, p1| unsafe {
            isa::run(level, float::Sweep { job: &job, p0, p1 })
        });
        XB.set(xb);
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
        _ if isa::consts(level).q8_unsigned => 128,
        _ => 0,
    });
    let job = int8::Job {
        w,
        prefetch: tuning().int8_prefetch,
        acts,
        m,
        bias,
        epilogue,
        out: OutPtr::new(out.as_mut_ptr()),
    };
    // SAFETY: level is supported by this CPU (`reset` took a supported one);
    // panel ranges are disjoint.
    over_panels(w.panels, tasks(w), |p0, p1| unsafe {
        isa::run(level, int8::Sweep { job: &job, p0, p1 })
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
                    write_tile::<Portable>(
                        &zeros[..cols],
                        row.as_mut_ptr().add(c0),
                        c0,
                        bias,
                        epilogue,
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

/// Writes one tile row: `v = tile + bias[c0..]`, then the epilogue, into `out`
/// (`tile.len()` columns starting at output column `c0`), with `P`'s GELU
/// (the caller runs `P`'s code).
#[inline(always)]
unsafe fn write_tile<P: Panel>(
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
        Epilogue::GeluTanh => P::gelu_tanh(&mut v),
        Epilogue::GeluErf => {
            for h in 0..PANEL / 8 {
                let y = gelu_erf8(load(&v[8 * h..]));
                store(&mut v[8 * h..], y);
            }
        }
        Epilogue::Accumulate => {
            for (l, x) in v[..cols].iter_mut().enumerate() {
                *x += *out.add(l);
            }
        }
    }
    if cols == PANEL {
        std::ptr::write_unaligned(out as *mut [f32; PANEL], v);
    } else {
        std::ptr::copy_nonoverlapping(v.as_ptr(), out, cols);
    }
}
