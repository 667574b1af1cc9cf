//! [`PackedMatrix`]: weights repacked once at load time into panels of
//! [`PANEL`] rows, in one of two layouts.
//!
//! Q8_0 / Q4_0 (the int8 kernels): one panel = 16 weight rows, its 32-blocks in
//! order; a block of the panel is 32 bytes of f16 scales, one per row, then the
//! quants: quant vector `c` (64 bytes) holds, for rows `r = 0..16`, bytes
//! `4c..4c+4` of row `r`'s block. One 512-bit register is then 16 rows × 4
//! consecutive elements: `vpdpbusd` against 4 broadcast activation bytes gives
//! the 16 rows' partial dots at once, and the same weights serve every
//! activation row of a tile (prefill) from registers. Q4_0 keeps ggml's nibble
//! order (low nibbles are elements 0..16, high nibbles 16..32), so vector `c`
//! yields elements `4c..4c+4` (low) and `16+4c..` (high); Q4_0's `nibble - 8`
//! becomes `dot(nibble, x) - 8 * sum(x)` with the activation block's sum.
//! Q8_0 is stored unsigned (`w + 128`, see `QuantizedActs`).
//!
//! F16 / BF16 (the float kernel): the weights of element `k` of the panel's 16
//! rows are 32 contiguous bytes, which one `vcvtph2ps` (or a 16-bit shift for
//! BF16) turns into a 16-lane f32 vector.
//!
//! Rows past the matrix's end are zero.

use rayon::prelude::*;

use super::PANEL;
use crate::{QuantType, WeightView, QK};

#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

/// A Q8_0, Q4_0, F16 or BF16 matrix repacked for
/// [`matmul_packed`](crate::cpu::matmul_packed); built once per weight at load
/// time, never stored in a file.
pub struct PackedMatrix {
    pub(super) ty: QuantType,
    pub(super) rows: usize,
    pub(super) cols: usize,
    /// 32-blocks per row
    pub(super) nb: usize,
    pub(super) panels: usize,
    /// bytes of one block of one panel
    pub(super) block_bytes: usize,
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
            pack_float(
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

    pub(super) fn panel(&self, p: usize) -> *const u8 {
        // SAFETY (for callers): p < panels, so the offset is inside `data`.
        unsafe { (self.data.as_ptr() as *const u8).add(p * self.nb * self.block_bytes) }
    }
}

/// The F16/BF16 layout: rows `0..16` of element `kk` of panel `p`.
fn pack_float(w: &crate::WeightView, dst: &mut [u8]) {
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
