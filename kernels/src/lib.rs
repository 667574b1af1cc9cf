//! Compute kernels with no model knowledge: quantized block layouts, a scalar
//! reference for every op, and the CPU implementations tested against them.
//!
//! [`reference`] and [`cpu`] expose the same functions with the same signatures,
//! so a test (or a debugging engine) can swap one for the other.

pub mod cpu;
pub mod quant;
pub mod reference;

/// CUDA kernels (feature `cuda`): see `docs/cuda.md`.
#[cfg(feature = "cuda")]
pub mod cuda;

pub use quant::{BlockQ4_0, BlockQ8_0, QuantType, QK};

/// What a matmul does with each result `v = x . w + b` as it writes it, so the
/// activation or the residual add costs no extra pass over memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Epilogue {
    /// `out = v`
    #[default]
    Store,
    /// `out = gelu_tanh(v)` (HF `gelu_new` / `gelu_pytorch_tanh`)
    GeluTanh,
    /// `out = gelu_erf(v)` (torch `nn.GELU()`)
    GeluErf,
    /// `out += v` (a residual connection)
    Accumulate,
}

/// Borrowed weight matrix `[rows = n, cols = k logical]` in its stored layout: each
/// row is `row_stride` bytes (`ty.row_bytes(cols)`; Q8_0/Q4_0 rows are padded with
/// zeros to whole 32-blocks).
///
/// Kernels take the bytes as stored in the `.mqf` file, so a mapped file is used
/// without a decode pass; the data need not be aligned to the element type.
#[derive(Clone, Copy, Debug)]
pub struct WeightView<'a> {
    pub ty: QuantType,
    pub data: &'a [u8],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
}

impl<'a> WeightView<'a> {
    /// Panics if `data.len() != rows * ty.row_bytes(cols)`: shapes are checked when a
    /// file is loaded, so a mismatch here is a programming error.
    pub fn new(ty: QuantType, data: &'a [u8], rows: usize, cols: usize) -> Self {
        let row_stride = ty.row_bytes(cols);
        assert_eq!(
            data.len(),
            rows * row_stride,
            "WeightView: {rows}x{cols} {ty} needs {} bytes, got {}",
            rows * row_stride,
            data.len()
        );
        WeightView {
            ty,
            data,
            rows,
            cols,
            row_stride,
        }
    }

    pub fn row(&self, i: usize) -> &'a [u8] {
        &self.data[i * self.row_stride..(i + 1) * self.row_stride]
    }
}

/// Keys/values of one sequence for one layer, read through a paged block table.
///
/// The K (and V) pool is `[n_blocks, block_size, kv_dim]` f32; position `p` of the
/// sequence lives at row `block_table[p / block_size] * block_size + p % block_size`.
#[derive(Clone, Copy, Debug)]
pub struct KvView<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub block_size: usize,
    pub block_table: &'a [u32],
    pub kv_dim: usize,
}

impl<'a> KvView<'a> {
    /// Pool row holding sequence position `pos`.
    #[inline]
    pub fn slot(&self, pos: usize) -> usize {
        self.block_table[pos / self.block_size] as usize * self.block_size + pos % self.block_size
    }

    #[inline]
    pub fn key(&self, pos: usize) -> &'a [f32] {
        let s = self.slot(pos) * self.kv_dim;
        &self.k[s..s + self.kv_dim]
    }

    #[inline]
    pub fn value(&self, pos: usize) -> &'a [f32] {
        let s = self.slot(pos) * self.kv_dim;
        &self.v[s..s + self.kv_dim]
    }
}
