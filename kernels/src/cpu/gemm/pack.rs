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
//! F16 (the float kernel): the weights of element `k` of the panel's 16 rows
//! are 32 contiguous bytes, which one `vcvtph2ps` turns into a 16-lane f32
//! vector. BF16 pairs elements: the 64 bytes of pair `q` hold, for rows
//! `r = 0..16`, elements `2q` and `2q + 1` of row `r` at `4r` — one 32-bit
//! lane per row, as `vdpbf16ps` takes them (a shift and a mask make the two
//! f32 vectors where it multiplies exactly); an odd `k` pads a zero.
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
    /// BF16 only: multiply with the BF16 dot (activations rounded to BF16)
    bf16_dot: bool,
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
    /// Repacks `w`; `None` for types without a panel kernel (F32). BF16
    /// weights will multiply with the BF16 dot where
    /// [`dispatch::bf16_dot`](crate::cpu::dispatch::bf16_dot) says so (the CPU
    /// has `vdpbf16ps`, or `MIPHA_BF16_DOT`), else exactly.
    pub fn pack(w: WeightView) -> Option<Self> {
        Self::pack_with(w, crate::cpu::dispatch::bf16_dot())
    }

    /// [`PackedMatrix::pack`] with the BF16 arithmetic chosen: `bf16_dot`
    /// rounds activations to BF16 and sums pairs of products
    /// ([`reference::matmul_bf16_dot`](crate::reference::matmul_bf16_dot),
    /// `vdpbf16ps` where the level has it, two FMAs below); off, BF16 weights
    /// multiply f32 activations exactly ([`reference::matmul`](crate::reference::matmul)).
    /// Ignored for other types.
    pub fn pack_with(w: WeightView, bf16_dot: bool) -> Option<Self> {
        let panels = w.rows.div_ceil(PANEL);
        if matches!(w.ty, QuantType::F16 | QuantType::BF16) {
            let panel_bytes = float_panel_bytes(w.ty, w.cols);
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
                bf16_dot: bf16_dot && w.ty == QuantType::BF16,
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
            bf16_dot: false,
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

    /// Whether this BF16 matrix multiplies with the BF16 dot (see
    /// [`PackedMatrix::pack_with`]); false for every other type.
    pub fn bf16_dot(&self) -> bool {
        self.bf16_dot
    }

    /// Bytes of one panel of an F16/BF16 matrix.
    pub(super) fn float_panel_bytes(&self) -> usize {
        float_panel_bytes(self.ty, self.cols)
    }

    pub(super) fn panel(&self, p: usize) -> *const u8 {
        // SAFETY (for callers): p < panels, so the offset is inside `data`.
        unsafe { (self.data.as_ptr() as *const u8).add(p * self.nb * self.block_bytes) }
    }
}

/// Bytes of one F16/BF16 panel of `k` columns (BF16 pads an odd `k`).
fn float_panel_bytes(ty: QuantType, k: usize) -> usize {
    let k = if ty == QuantType::BF16 {
        k.next_multiple_of(2)
    } else {
        k
    };
    k * PANEL * 2
}

/// The F16/BF16 layouts: rows `0..16` of element `kk` of panel `p`, at
/// `(kk * 16 + r) * 2` (F16) or, in pairs, `((kk / 2) * 16 + r) * 4 + (kk % 2) * 2` (BF16).
fn pack_float(w: &crate::WeightView, dst: &mut [u8]) {
    let k = w.cols;
    let panel_bytes = float_panel_bytes(w.ty, k);
    if panel_bytes == 0 {
        return;
    }
    let bf16 = w.ty == QuantType::BF16;
    dst.par_chunks_mut(panel_bytes)
        .enumerate()
        .for_each(|(p, d)| {
            for r in 0..PANEL.min(w.rows - p * PANEL) {
                let row = w.row(p * PANEL + r);
                for kk in 0..k {
                    let o = if bf16 {
                        ((kk / 2) * PANEL + r) * 4 + (kk % 2) * 2
                    } else {
                        (kk * PANEL + r) * 2
                    };
                    d[o..o + 2].copy_from_slice(&row[2 * kk..2 * kk + 2]);
                }
            }
        });
}
