//! Safe wrappers, one per kernel. Shapes are checked with the same panics as the
//! CPU kernels (a mismatch is a bug in the caller); device failures are errors.
//! Every op is queued on the device's stream and returns without waiting.

use std::ffi::c_void;

use cudarc::cublas::sys as blas_sys;
use cudarc::driver::{
    CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig,
    PushKernelArg, ValidAsZeroBits,
};

use super::{CudaError, Device, Result};
use crate::{KvDtype, QuantType, WeightView};

mod attention;
mod elementwise;
mod matmul;

/// Which GELU [`Device::gelu`] applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GeluKind {
    Tanh,
    Erf,
}

/// A weight matrix uploaded once, in its stored (`.mqf`) layout.
#[derive(Debug)]
pub struct DeviceWeight {
    pub ty: QuantType,
    pub data: CudaSlice<u8>,
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for u16 {}
}

/// A K/V pool element on the device: `f32` ([`KvDtype::F32`]), or `u16` holding
/// IEEE f16 bits ([`KvDtype::F16`]): cudarc has no f16 type without its `f16`
/// feature, and the GEMM's f16 scratch is `u16` likewise. Sealed: the kernels
/// have an entry for each of these two and no other.
pub trait DeviceKvElem: sealed::Sealed + DeviceRepr + ValidAsZeroBits + Copy + 'static {
    const DTYPE: KvDtype;
    /// the kernels' entries for this element type
    const SCATTER: &'static str;
    const PREFILL: &'static str;
    const DECODE: &'static str;
}

impl DeviceKvElem for f32 {
    const DTYPE: KvDtype = KvDtype::F32;
    const SCATTER: &'static str = "kv_scatter";
    const PREFILL: &'static str = "attn_prefill";
    const DECODE: &'static str = "attn_decode_split";
}

impl DeviceKvElem for u16 {
    const DTYPE: KvDtype = KvDtype::F16;
    const SCATTER: &'static str = "kv_scatter_f16";
    const PREFILL: &'static str = "attn_prefill_f16";
    const DECODE: &'static str = "attn_decode_split_f16";
}

/// The paged K/V pools of one layer on the device, with a sequence's block table:
/// the layout of [`crate::KvView`].
#[derive(Debug)]
pub struct DeviceKv<'a, E: DeviceKvElem = f32> {
    pub k: &'a CudaSlice<E>,
    pub v: &'a CudaSlice<E>,
    pub block_size: usize,
    /// a view, so a sequence's table can be part of a longer buffer (a batched
    /// step's tables, concatenated)
    pub block_table: CudaView<'a, u32>,
    /// entries of `block_table` in use (the view may be longer)
    pub n_blocks: usize,
    pub kv_dim: usize,
}

/// One layer's K/V pools on the device without a block table: what the
/// sequences of a batched call share (the layout of [`crate::KvLayer`]).
#[derive(Debug)]
pub struct DeviceKvLayer<'a, E: DeviceKvElem = f32> {
    pub k: &'a CudaSlice<E>,
    pub v: &'a CudaSlice<E>,
    pub block_size: usize,
    pub kv_dim: usize,
}

impl<'a, E: DeviceKvElem> DeviceKvLayer<'a, E> {
    /// The pools as one sequence sees them through `block_table` (`n_blocks`
    /// entries in use).
    pub fn with_table(&self, block_table: CudaView<'a, u32>, n_blocks: usize) -> DeviceKv<'a, E> {
        DeviceKv {
            k: self.k,
            v: self.v,
            block_size: self.block_size,
            block_table,
            n_blocks,
            kv_dim: self.kv_dim,
        }
    }
}

/// Where each row of a batched call stands (rows of several sequences, those of
/// a sequence consecutive): one entry per row, all on the device so a launch
/// reads them there (written before the launches, or before a graph replay). The
/// host that writes them guarantees what the kernels cannot check: each row's
/// table covers its position, and every table entry names a block of the pool.
#[derive(Debug)]
pub struct DeviceRows<'a> {
    /// the row's position in its sequence
    pub positions: CudaView<'a, u32>,
    /// every sequence's block table, one after another
    pub tables: CudaView<'a, u32>,
    /// where the row's sequence's table starts in `tables`
    pub table_start: CudaView<'a, u32>,
    /// the row's sequence's end (`first_pos + rows`): the keys a non-causal row
    /// attends
    pub seq_end: CudaView<'a, u32>,
}

impl DeviceRows<'_> {
    /// Rows `r` of the batch (the tables stay whole: the starts index them).
    pub fn rows(&self, r: std::ops::Range<usize>) -> DeviceRows<'_> {
        DeviceRows {
            positions: self.positions.slice(r.clone()),
            tables: self.tables.slice(..),
            table_start: self.table_start.slice(r.clone()),
            seq_end: self.seq_end.slice(r),
        }
    }

    fn check(&self, n: usize, what: &str) {
        assert!(
            self.positions.len() >= n && self.table_start.len() >= n && self.seq_end.len() >= n,
            "{what}: fewer row entries than rows ({n})"
        );
    }
}

/// Largest head dimension the attention kernels take (`MAX_D` in attention.cu).
pub const MAX_HEAD_DIM: usize = 128;
/// Keys per split of the decode kernel.
pub const DECODE_CHUNK: usize = 256;
/// Rows at or below which [`Device::matmul`] uses the GEMV kernels.
pub const GEMV_MAX_ROWS: usize = 8;
/// Rows of x one GEMV launch takes (`GEMV_M` in gemv.cu).
const GEMV_M: usize = 8;
/// Weight rows from which a GEMV block gives each row one warp (below: four).
const GEMV_WIDE_ROWS: usize = 8192;
/// Rows at or below which [`Device::attention`] uses the decode kernel.
pub const DECODE_MAX_ROWS: usize = 4;
/// Largest y and z of a launch grid: the decode kernel's splits and rows.
pub const MAX_GRID_YZ: usize = 65535;

const NULL: u64 = 0;

/// f32 elements of the decode-attention workspace for `n_tokens` rows over at
/// most `max_keys` keys (one partial per split: max, sum, `head_dim` outputs).
pub fn decode_workspace_len(
    n_tokens: usize,
    n_heads: usize,
    head_dim: usize,
    max_keys: usize,
) -> usize {
    n_tokens * n_heads * max_keys.div_ceil(DECODE_CHUNK).max(1) * (head_dim + 2)
}

struct DecodeShape {
    n_tokens: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    n_splits: usize,
}

/// A device buffer an op reads: a whole [`CudaSlice`] or a view of part of one
/// (e.g. the first `n` rows of a `[max_tokens, width]` activation buffer).
pub trait DeviceIn<T> {
    fn view(&self) -> CudaView<'_, T>;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A device buffer an op writes.
pub trait DeviceOut<T>: DeviceIn<T> {
    fn view_mut(&mut self) -> CudaViewMut<'_, T>;
}

impl<T> DeviceIn<T> for CudaSlice<T> {
    fn view(&self) -> CudaView<'_, T> {
        self.as_view()
    }
    fn len(&self) -> usize {
        CudaSlice::len(self)
    }
}

impl<T> DeviceOut<T> for CudaSlice<T> {
    fn view_mut(&mut self) -> CudaViewMut<'_, T> {
        self.as_view_mut()
    }
}

impl<T> DeviceIn<T> for CudaView<'_, T> {
    fn view(&self) -> CudaView<'_, T> {
        self.slice(..)
    }
    fn len(&self) -> usize {
        CudaView::len(self)
    }
}

impl<T> DeviceIn<T> for CudaViewMut<'_, T> {
    fn view(&self) -> CudaView<'_, T> {
        self.as_view()
    }
    fn len(&self) -> usize {
        CudaViewMut::len(self)
    }
}

impl<T> DeviceOut<T> for CudaViewMut<'_, T> {
    fn view_mut(&mut self) -> CudaViewMut<'_, T> {
        self.slice_mut(..)
    }
}

fn grid_stride(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 8192) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn i32_of(v: usize, what: &str) -> i32 {
    i32::try_from(v).unwrap_or_else(|_| panic!("{what} = {v} does not fit the kernels' int"))
}
