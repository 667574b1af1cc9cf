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

/// Element type of a KV cache pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvDtype {
    F32,
    /// IEEE binary16: half the memory and half the decode traffic of f32.
    F16,
}

impl KvDtype {
    pub fn size_bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
}

/// A KV cache element: `f32` or `half::f16`. Sealed: the kernels have a path
/// for each of these two and no other.
pub trait KvElem:
    sealed::Sealed + Copy + Default + Send + Sync + std::fmt::Debug + bytemuck::Pod + 'static
{
    const DTYPE: KvDtype;
    fn to_f32(self) -> f32;
    /// f16: round to nearest even, as `half::f16::from_f32`.
    fn from_f32(x: f32) -> Self;
}

impl KvElem for f32 {
    const DTYPE: KvDtype = KvDtype::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl KvElem for half::f16 {
    const DTYPE: KvDtype = KvDtype::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
}

/// Keys/values of one sequence for one layer, read through a paged block table.
///
/// The K (and V) pool is `[n_blocks, block_size, kv_dim]` of `E`; position `p` of
/// the sequence lives at row `block_table[p / block_size] * block_size + p % block_size`.
#[derive(Clone, Copy, Debug)]
pub struct KvView<'a, E: KvElem = f32> {
    pub k: &'a [E],
    pub v: &'a [E],
    pub block_size: usize,
    pub block_table: &'a [u32],
    pub kv_dim: usize,
}

impl<'a, E: KvElem> KvView<'a, E> {
    /// Pool row holding sequence position `pos`.
    #[inline]
    pub fn slot(&self, pos: usize) -> usize {
        self.block_table[pos / self.block_size] as usize * self.block_size + pos % self.block_size
    }

    #[inline]
    pub fn key(&self, pos: usize) -> &'a [E] {
        let s = self.slot(pos) * self.kv_dim;
        &self.k[s..s + self.kv_dim]
    }

    #[inline]
    pub fn value(&self, pos: usize) -> &'a [E] {
        let s = self.slot(pos) * self.kv_dim;
        &self.v[s..s + self.kv_dim]
    }
}

/// One layer's K and V pools, `[n_blocks, block_size, kv_dim]` each, without a
/// block table: what the sequences of a batched attention call share.
#[derive(Clone, Copy, Debug)]
pub struct KvLayer<'a, E: KvElem = f32> {
    pub k: &'a [E],
    pub v: &'a [E],
    pub block_size: usize,
    pub kv_dim: usize,
}

impl<'a, E: KvElem> KvLayer<'a, E> {
    /// The pools as one sequence sees them through its block table.
    #[inline]
    pub fn view(&self, block_table: &'a [u32]) -> KvView<'a, E> {
        KvView {
            k: self.k,
            v: self.v,
            block_size: self.block_size,
            block_table,
            kv_dim: self.kv_dim,
        }
    }
}

/// The rows of one sequence in a batched attention call: `rows` consecutive query
/// rows at positions `first_pos..first_pos + rows`, reading keys through `block_table`.
#[derive(Clone, Copy, Debug)]
pub struct AttnSeq<'a> {
    pub rows: usize,
    pub first_pos: usize,
    pub block_table: &'a [u32],
}
