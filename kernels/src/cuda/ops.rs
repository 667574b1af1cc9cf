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

impl Device {
    /// Uploads a weight in its stored layout.
    pub fn upload_weight(&self, w: WeightView) -> Result<DeviceWeight> {
        Ok(DeviceWeight {
            ty: w.ty,
            data: self.upload(&w.data[..w.rows * w.row_stride])?,
            rows: w.rows,
            cols: w.cols,
            row_stride: w.row_stride,
        })
    }

    /// [`crate::reference::layer_norm`].
    pub fn layer_norm(
        &self,
        x: &impl DeviceIn<f32>,
        cols: usize,
        weight: &impl DeviceIn<f32>,
        bias: &impl DeviceIn<f32>,
        eps: f32,
        out: &mut impl DeviceOut<f32>,
    ) -> Result<()> {
        assert!(
            cols > 0 && x.len().is_multiple_of(cols),
            "layer_norm: x not [rows, cols]"
        );
        assert_eq!(out.len(), x.len(), "layer_norm: out length != x length");
        assert_eq!(weight.len(), cols, "layer_norm: weight length != cols");
        assert_eq!(bias.len(), cols, "layer_norm: bias length != cols");
        let rows = x.len() / cols;
        if rows == 0 {
            return Ok(());
        }
        let c = i32_of(cols, "cols");
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (x, weight, bias, mut out) = (x.view(), weight.view(), bias.view(), out.view_mut());
        let mut b = self.stream.launch_builder(self.func("layer_norm"));
        b.arg(&x)
            .arg(&weight)
            .arg(&bias)
            .arg(&mut out)
            .arg(&c)
            .arg(&eps);
        // SAFETY: argument types and count match the kernel; shapes checked above.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// `x[r, c] = gelu(x[r, c] + bias[c])` ([`crate::reference::gelu_tanh`] /
    /// [`crate::reference::gelu_erf`] after the bias add), rows of `cols`.
    pub fn gelu(
        &self,
        x: &mut impl DeviceOut<f32>,
        bias: Option<&CudaSlice<f32>>,
        cols: usize,
        kind: GeluKind,
    ) -> Result<()> {
        assert!(
            cols > 0 && x.len().is_multiple_of(cols),
            "gelu: x not [rows, cols]"
        );
        if let Some(b) = bias {
            assert_eq!(b.len(), cols, "gelu: bias length != cols");
        }
        let n = x.len() as i64;
        if n == 0 {
            return Ok(());
        }
        let c = i32_of(cols, "cols");
        let has = bias.is_some() as i32;
        let name = match kind {
            GeluKind::Tanh => "bias_gelu_tanh",
            GeluKind::Erf => "bias_gelu_erf",
        };
        let cfg = grid_stride(x.len());
        let mut x = x.view_mut();
        let mut b = self.stream.launch_builder(self.func(name));
        b.arg(&mut x);
        match bias {
            Some(bias) => b.arg(bias),
            None => b.arg(&NULL),
        };
        b.arg(&has).arg(&n).arg(&c);
        // SAFETY: as layer_norm; the bias is only read when has_bias is 1.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// [`crate::reference::add_assign`]: `dst += src`.
    pub fn add_assign(
        &self,
        dst: &mut impl DeviceOut<f32>,
        src: &impl DeviceIn<f32>,
    ) -> Result<()> {
        assert_eq!(dst.len(), src.len(), "add_assign: length mismatch");
        let n = dst.len();
        self.elementwise2("add_assign", dst, src, n)
    }

    /// Row t of `x` += row t of `table` (learned position embeddings): the first
    /// `x.len()` elements of `table`.
    pub fn add_rows(&self, x: &mut impl DeviceOut<f32>, table: &impl DeviceIn<f32>) -> Result<()> {
        assert!(table.len() >= x.len(), "add_rows: more rows than the table");
        let n = x.len();
        self.elementwise2("add_rows", x, table, n)
    }

    fn elementwise2(
        &self,
        name: &str,
        dst: &mut impl DeviceOut<f32>,
        src: &impl DeviceIn<f32>,
        n: usize,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let n64 = n as i64;
        let (mut dst, src) = (dst.view_mut(), src.view());
        let mut b = self.stream.launch_builder(self.func(name));
        b.arg(&mut dst).arg(&src).arg(&n64);
        // SAFETY: both buffers hold at least n elements.
        unsafe { b.launch(grid_stride(n)) }?;
        Ok(())
    }

    /// [`crate::reference::softmax`] of every row of `cols`, in place.
    pub fn softmax_rows(&self, x: &mut impl DeviceOut<f32>, cols: usize) -> Result<()> {
        assert!(
            cols > 0 && x.len().is_multiple_of(cols),
            "softmax: x not [rows, cols]"
        );
        let rows = x.len() / cols;
        if rows == 0 {
            return Ok(());
        }
        let c = i32_of(cols, "cols");
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut x = x.view_mut();
        let mut b = self.stream.launch_builder(self.func("softmax_rows"));
        b.arg(&mut x).arg(&c);
        // SAFETY: rows * cols elements.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// [`crate::reference::rope_partial`]; `positions` on the device, one per row.
    pub fn rope_partial(
        &self,
        x: &mut impl DeviceOut<f32>,
        n_heads: usize,
        head_dim: usize,
        rot_dims: usize,
        positions: &impl DeviceIn<u32>,
        theta: f32,
    ) -> Result<()> {
        assert!(
            rot_dims.is_multiple_of(2) && rot_dims <= head_dim,
            "rope_partial: rot_dims {rot_dims} must be even and <= head_dim {head_dim}"
        );
        assert_eq!(
            x.len(),
            positions.len() * n_heads * head_dim,
            "rope_partial: x is not [positions, n_heads * head_dim]"
        );
        if x.len() == 0 || rot_dims == 0 {
            return Ok(());
        }
        let (nh, hd, rd) = (
            i32_of(n_heads, "n_heads"),
            i32_of(head_dim, "head_dim"),
            i32_of(rot_dims, "rot_dims"),
        );
        let cfg = LaunchConfig {
            grid_dim: (positions.len() as u32, n_heads as u32, 1),
            block_dim: ((rot_dims / 2).div_ceil(32).clamp(1, 8) as u32 * 32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (mut x, positions) = (x.view_mut(), positions.view());
        let mut b = self.stream.launch_builder(self.func("rope_partial"));
        b.arg(&mut x)
            .arg(&positions)
            .arg(&nh)
            .arg(&hd)
            .arg(&rd)
            .arg(&theta);
        // SAFETY: shapes checked above.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// [`crate::reference::embedding`]: rows `ids` of `table`, dequantized, into
    /// `out` (`[ids.len(), table.cols]`). An id outside the table is
    /// [`CudaError::TokenOutOfRange`] and nothing is launched.
    pub fn embedding(
        &self,
        table: &DeviceWeight,
        ids: &[u32],
        out: &mut impl DeviceOut<f32>,
    ) -> Result<()> {
        assert_eq!(
            out.len(),
            ids.len() * table.cols,
            "embedding: out is not [ids, cols]"
        );
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= table.rows) {
            return Err(CudaError::TokenOutOfRange(bad));
        }
        if ids.is_empty() {
            return Ok(());
        }
        let mut scratch = self.op_scratch.lock().unwrap_or_else(|e| e.into_inner());
        let dev_ids = super::grown(&self.stream, &mut scratch.ids, ids.len())?;
        self.stream
            .memcpy_htod(ids, &mut dev_ids.slice_mut(..ids.len()))?;
        self.embedding_at(table, &dev_ids.slice(..ids.len()), out)
    }

    /// [`Device::embedding`] with the ids already on the device (e.g. written
    /// before a CUDA graph replay). The caller checks them against the table: an
    /// id outside it gives a NaN row (never a read outside the table).
    pub fn embedding_at(
        &self,
        table: &DeviceWeight,
        ids: &impl DeviceIn<u32>,
        out: &mut impl DeviceOut<f32>,
    ) -> Result<()> {
        assert_eq!(
            out.len(),
            ids.len() * table.cols,
            "embedding: out is not [ids, cols]"
        );
        if ids.is_empty() {
            return Ok(());
        }
        let dev_ids = ids.view();
        let rows = i32_of(table.rows, "rows");
        let ty = table.ty.id() as i32;
        let stride = table.row_stride as i64;
        let cols = i32_of(table.cols, "cols");
        let cfg = LaunchConfig {
            grid_dim: (ids.len() as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut out = out.view_mut();
        let mut b = self.stream.launch_builder(self.func("embedding"));
        b.arg(&table.data)
            .arg(&ty)
            .arg(&stride)
            .arg(&dev_ids)
            .arg(&mut out)
            .arg(&cols)
            .arg(&rows);
        // SAFETY: the kernel checks ids against `rows`; out holds ids * cols.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// Dequantizes `w` into `out` as a dense f16 `[rows, cols]` matrix (raw bits).
    pub fn dequantize_f16(&self, w: &DeviceWeight, out: &mut impl DeviceOut<u16>) -> Result<()> {
        assert!(
            out.len() >= w.rows * w.cols,
            "dequantize_f16: out too short"
        );
        let ty = w.ty.id() as i32;
        let stride = w.row_stride as i64;
        let rows = w.rows as i64;
        let cols = i32_of(w.cols, "cols");
        let mut out = out.view_mut();
        let mut b = self.stream.launch_builder(self.func("dequant_to_f16"));
        b.arg(&w.data)
            .arg(&ty)
            .arg(&stride)
            .arg(&mut out)
            .arg(&rows)
            .arg(&cols);
        // SAFETY: out holds rows * cols.
        unsafe { b.launch(grid_stride(w.rows * w.cols)) }?;
        Ok(())
    }

    fn check_matmul(
        x: &impl DeviceIn<f32>,
        m: usize,
        w: &DeviceWeight,
        bias: Option<&CudaSlice<f32>>,
        out: &impl DeviceIn<f32>,
    ) {
        assert_eq!(x.len(), m * w.cols, "matmul: x is not [m, k]");
        assert_eq!(out.len(), m * w.rows, "matmul: out is not [m, n]");
        if let Some(b) = bias {
            assert_eq!(b.len(), w.rows, "matmul: bias length != n");
        }
    }

    /// [`crate::reference::matmul`] with the GEMV kernels (any m; meant for
    /// decode's few rows): weights read in their stored layout, f32 accumulation.
    pub fn gemv(
        &self,
        x: &impl DeviceIn<f32>,
        m: usize,
        w: &DeviceWeight,
        bias: Option<&CudaSlice<f32>>,
        out: &mut impl DeviceOut<f32>,
    ) -> Result<()> {
        Self::check_matmul(x, m, w, bias, &*out);
        if m == 0 || w.rows == 0 {
            return Ok(());
        }
        let name = match w.ty {
            QuantType::F32 => "gemv_f32",
            QuantType::F16 => "gemv_f16",
            QuantType::BF16 => "gemv_bf16",
            QuantType::Q8_0 => "gemv_q8_0",
            QuantType::Q4_0 => "gemv_q4_0",
        };
        let stride = w.row_stride as i64;
        let has = bias.is_some() as i32;
        let (n, k) = (i32_of(w.rows, "n"), i32_of(w.cols, "k"));
        // Rows per block: one warp per row when there are rows enough to fill the
        // GPU with them, else four warps splitting each row (see gemv.cu).
        let rpb: usize = if w.rows >= GEMV_WIDE_ROWS { 4 } else { 1 };
        let cfg = LaunchConfig {
            grid_dim: (w.rows.div_ceil(rpb) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let rpb = rpb as i32;
        let (xv, mut ov) = (x.view(), out.view_mut());
        // The kernel takes up to GEMV_M rows of x at a time (each weight read once
        // for all of them).
        for r0 in (0..m).step_by(GEMV_M) {
            let mr = (m - r0).min(GEMV_M);
            let xs = xv.slice(r0 * w.cols..(r0 + mr) * w.cols);
            let mut os = ov.slice_mut(r0 * w.rows..(r0 + mr) * w.rows);
            let mi = mr as i32;
            let mut b = self.stream.launch_builder(self.func(name));
            b.arg(&w.data).arg(&stride).arg(&xs);
            match bias {
                Some(bias) => b.arg(bias),
                None => b.arg(&NULL),
            };
            b.arg(&has).arg(&mut os).arg(&n).arg(&k).arg(&mi).arg(&rpb);
            // SAFETY: shapes checked; the bias is only read when has_bias is 1;
            // mi <= GEMV_M, rpb divides the kernel's 4 warps.
            unsafe { b.launch(cfg) }?;
        }
        Ok(())
    }

    /// [`crate::reference::matmul`] through cuBLAS (tensor cores): the weight is
    /// dequantized to f16 into a scratch buffer (F16 weights are used in place),
    /// the activations converted to f16, the product accumulated in f32.
    pub fn gemm(
        &self,
        x: &impl DeviceIn<f32>,
        m: usize,
        w: &DeviceWeight,
        bias: Option<&CudaSlice<f32>>,
        out: &mut impl DeviceOut<f32>,
    ) -> Result<()> {
        Self::check_matmul(x, m, w, bias, &*out);
        let (n, k) = (w.rows, w.cols);
        if m == 0 || n == 0 {
            return Ok(());
        }
        let blas = self.blas()?;
        let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let super::GemmScratch { w: wbuf, x: xbuf } = &mut *scratch;
        let in_place = w.ty == QuantType::F16;
        if !in_place && wbuf.as_ref().is_none_or(|b| b.len() < n * k) {
            *wbuf = Some(self.zeros::<u16>(n * k)?);
        }
        if xbuf.as_ref().is_none_or(|b| b.len() < m * k) {
            *xbuf = Some(self.zeros::<u16>(m * k)?);
        }
        let xh = xbuf.as_mut().expect("allocated above");
        {
            let n64 = (m * k) as i64;
            let mut b = self.stream.launch_builder(self.func("f32_to_f16"));
            let x = x.view();
            b.arg(&x).arg(&mut *xh).arg(&n64);
            // SAFETY: xh holds at least m * k.
            unsafe { b.launch(grid_stride(m * k)) }?;
        }
        if !in_place {
            self.dequantize_f16(w, wbuf.as_mut().expect("allocated above"))?;
        }
        let (alpha, beta) = (1.0f32, 0.0f32);
        {
            let (wp, _gw) = if in_place {
                w.data.device_ptr(&self.stream)
            } else {
                wbuf.as_ref()
                    .expect("allocated above")
                    .device_ptr(&self.stream)
            };
            let (xp, _gx) = xh.device_ptr(&self.stream);
            let mut ov = out.view_mut();
            let (op, _go) = ov.device_ptr_mut(&self.stream);
            // Column-major view: out^T [n, m] = W^T(as stored [k, n])^T . x^T [k, m].
            // SAFETY: W holds n * k f16, x m * k f16, out m * n f32; leading
            // dimensions match those shapes.
            unsafe {
                cudarc::cublas::result::gemm_ex(
                    *blas.handle(),
                    blas_sys::cublasOperation_t::CUBLAS_OP_T,
                    blas_sys::cublasOperation_t::CUBLAS_OP_N,
                    i32_of(n, "n"),
                    i32_of(m, "m"),
                    i32_of(k, "k"),
                    &alpha as *const f32 as *const c_void,
                    wp as *const c_void,
                    blas_sys::cudaDataType_t::CUDA_R_16F,
                    k as i32,
                    xp as *const c_void,
                    blas_sys::cudaDataType_t::CUDA_R_16F,
                    k as i32,
                    &beta as *const f32 as *const c_void,
                    op as *mut c_void,
                    blas_sys::cudaDataType_t::CUDA_R_32F,
                    n as i32,
                    blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| CudaError::Cublas(format!("{e:?}")))?;
        }
        if let Some(bias) = bias {
            let n64 = (m * n) as i64;
            let c = n as i32;
            let mut b = self.stream.launch_builder(self.func("add_bias"));
            let mut out = out.view_mut();
            b.arg(&mut out).arg(bias).arg(&n64).arg(&c);
            // SAFETY: out holds m * n, bias n.
            unsafe { b.launch(grid_stride(m * n)) }?;
        }
        Ok(())
    }

    /// [`crate::reference::kv_store`] of rows `src` (`[n, kv_dim]`) into a paged
    /// pool (f32, or f16 rounded to nearest even) at sequence positions
    /// `first_pos..first_pos + n`, through `block_table` (the layout of
    /// [`crate::KvView`]). Every table entry used must be below the pool's blocks.
    #[allow(clippy::too_many_arguments)]
    pub fn kv_scatter<E: DeviceKvElem>(
        &self,
        src: &impl DeviceIn<f32>,
        n: usize,
        kv_dim: usize,
        pool: &mut impl DeviceOut<E>,
        block_table: &impl DeviceIn<u32>,
        block_size: usize,
        first_pos: usize,
    ) -> Result<()> {
        assert_eq!(src.len(), n * kv_dim, "kv_scatter: src is not [n, kv_dim]");
        assert!(block_size > 0, "kv_scatter: block_size must be > 0");
        assert!(
            block_table.len() * block_size >= first_pos + n,
            "kv_scatter: block table too short"
        );
        if n == 0 {
            return Ok(());
        }
        let table = block_table.view();
        self.kv_scatter_launch(src, n, kv_dim, pool, &table, block_size, first_pos, None)
    }

    /// [`Device::kv_scatter`] at the positions held on the device (`positions[i]`
    /// for row i; written before a CUDA graph replay). The caller guarantees the
    /// table covers them and addresses blocks of the pool.
    #[allow(clippy::too_many_arguments)]
    pub fn kv_scatter_at<E: DeviceKvElem>(
        &self,
        src: &impl DeviceIn<f32>,
        n: usize,
        kv_dim: usize,
        pool: &mut impl DeviceOut<E>,
        block_table: &impl DeviceIn<u32>,
        block_size: usize,
        positions: &impl DeviceIn<u32>,
    ) -> Result<()> {
        assert_eq!(src.len(), n * kv_dim, "kv_scatter: src is not [n, kv_dim]");
        assert!(block_size > 0, "kv_scatter: block_size must be > 0");
        assert!(
            positions.len() >= n,
            "kv_scatter: fewer positions than rows"
        );
        if n == 0 {
            return Ok(());
        }
        let (table, pos) = (block_table.view(), positions.view());
        let rows = (&pos, None);
        self.kv_scatter_launch(src, n, kv_dim, pool, &table, block_size, 0, Some(rows))
    }

    /// [`Device::kv_scatter`] for a batch: row i goes to position
    /// `rows.positions[i]` of its own sequence, through the table at
    /// `rows.table_start[i]` in `rows.tables` (as the CPU backend stores a
    /// step's sequences). The caller guarantees what [`DeviceRows`] says.
    pub fn kv_scatter_rows<E: DeviceKvElem>(
        &self,
        src: &impl DeviceIn<f32>,
        n: usize,
        kv_dim: usize,
        pool: &mut impl DeviceOut<E>,
        block_size: usize,
        rows: &DeviceRows,
    ) -> Result<()> {
        assert_eq!(src.len(), n * kv_dim, "kv_scatter: src is not [n, kv_dim]");
        assert!(block_size > 0, "kv_scatter: block_size must be > 0");
        rows.check(n, "kv_scatter");
        if n == 0 {
            return Ok(());
        }
        let r = (&rows.positions, Some(&rows.table_start));
        self.kv_scatter_launch(src, n, kv_dim, pool, &rows.tables, block_size, 0, Some(r))
    }

    #[allow(clippy::too_many_arguments)]
    fn kv_scatter_launch<E: DeviceKvElem>(
        &self,
        src: &impl DeviceIn<f32>,
        n: usize,
        kv_dim: usize,
        pool: &mut impl DeviceOut<E>,
        table: &CudaView<'_, u32>,
        block_size: usize,
        first_pos: usize,
        // (positions, table starts)
        rows: Option<(&CudaView<'_, u32>, Option<&CudaView<'_, u32>>)>,
    ) -> Result<()> {
        assert!(
            kv_dim > 0 && pool.len().is_multiple_of(kv_dim),
            "kv_scatter: pool is not [slots, kv_dim]"
        );
        let (bs, fp) = (
            i32_of(block_size, "block_size"),
            i32_of(first_pos, "first_pos"),
        );
        let (nn, d) = (i32_of(n, "n"), i32_of(kv_dim, "kv_dim"));
        let (src, mut pool) = (src.view(), pool.view_mut());
        let mut b = self.stream.launch_builder(self.func(E::SCATTER));
        b.arg(&src).arg(&mut pool).arg(table).arg(&bs).arg(&fp);
        match rows {
            Some((p, _)) => b.arg(p),
            None => b.arg(&NULL),
        };
        match rows.and_then(|(_, s)| s) {
            Some(s) => b.arg(s),
            None => b.arg(&NULL),
        };
        b.arg(&nn).arg(&d);
        // SAFETY: argument types and count match the kernel; the callers checked
        // (host positions) or guarantee (device positions) that each row's table
        // covers its position and names blocks of the pool.
        unsafe { b.launch(grid_stride(n * kv_dim)) }?;
        Ok(())
    }

    /// [`Device::gemv`] for up to [`GEMV_MAX_ROWS`] rows, [`Device::gemm`] above.
    pub fn matmul(
        &self,
        x: &impl DeviceIn<f32>,
        m: usize,
        w: &DeviceWeight,
        bias: Option<&CudaSlice<f32>>,
        out: &mut impl DeviceOut<f32>,
    ) -> Result<()> {
        if m <= GEMV_MAX_ROWS {
            self.gemv(x, m, w, bias, out)
        } else {
            self.gemm(x, m, w, bias, out)
        }
    }

    fn check_heads(n_heads: usize, n_kv_heads: usize, head_dim: usize, kv_dim: usize) {
        assert!(
            n_kv_heads > 0 && n_heads.is_multiple_of(n_kv_heads),
            "attention: n_heads {n_heads} not a multiple of n_kv_heads {n_kv_heads}"
        );
        assert!(
            head_dim > 0 && head_dim <= MAX_HEAD_DIM,
            "attention: head_dim {head_dim} outside 1..={MAX_HEAD_DIM}"
        );
        assert_eq!(kv_dim, n_kv_heads * head_dim, "attention: kv_dim");
    }

    #[allow(clippy::too_many_arguments)]
    fn check_attention<E: DeviceKvElem>(
        q: &impl DeviceIn<f32>,
        n_tokens: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        kv: &DeviceKv<E>,
        first_pos: usize,
        out: &impl DeviceIn<f32>,
    ) {
        Self::check_heads(n_heads, n_kv_heads, head_dim, kv.kv_dim);
        assert_eq!(q.len(), n_tokens * n_heads * head_dim, "attention: q shape");
        assert_eq!(out.len(), q.len(), "attention: out shape");
        assert!(kv.block_size > 0, "attention: block_size must be > 0");
        assert!(
            kv.n_blocks <= kv.block_table.len(),
            "attention: n_blocks > table"
        );
        assert!(
            kv.n_blocks * kv.block_size >= first_pos + n_tokens,
            "attention: block table too short"
        );
        assert_eq!(kv.k.len(), kv.v.len(), "attention: K and V pools differ");
    }

    /// [`crate::reference::attention`] with the flash-style prefill kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_prefill<E: DeviceKvElem>(
        &self,
        q: &impl DeviceIn<f32>,
        n_tokens: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        kv: &DeviceKv<E>,
        first_pos: usize,
        causal: bool,
        scale: f32,
        out: &mut impl DeviceOut<f32>,
    ) -> Result<()> {
        Self::check_attention(
            q, n_tokens, n_heads, n_kv_heads, head_dim, kv, first_pos, &*out,
        );
        if n_tokens == 0 {
            return Ok(());
        }
        let ints = [
            i32_of(kv.block_size, "block_size"),
            i32_of(kv.kv_dim, "kv_dim"),
            i32_of(n_tokens, "n_tokens"),
            i32_of(n_heads, "n_heads"),
            i32_of(n_kv_heads, "n_kv_heads"),
            i32_of(head_dim, "head_dim"),
            i32_of(first_pos, "first_pos"),
            causal as i32,
        ];
        let cfg = LaunchConfig {
            grid_dim: (n_tokens.div_ceil(16) as u32, n_heads as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(self.func(E::PREFILL));
        let (q, mut out) = (q.view(), out.view_mut());
        b.arg(&q).arg(kv.k).arg(kv.v).arg(&kv.block_table);
        for v in &ints {
            b.arg(v);
        }
        b.arg(&scale).arg(&mut out);
        // SAFETY: shapes and the block table's coverage checked above.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// [`crate::reference::attention`] with the paged decode kernel, split over the
    /// sequence in chunks of [`DECODE_CHUNK`] keys and merged by a second kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_decode<E: DeviceKvElem>(
        &self,
        q: &impl DeviceIn<f32>,
        n_tokens: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        kv: &DeviceKv<E>,
        first_pos: usize,
        causal: bool,
        scale: f32,
        out: &mut impl DeviceOut<f32>,
    ) -> Result<()> {
        Self::check_attention(
            q, n_tokens, n_heads, n_kv_heads, head_dim, kv, first_pos, &*out,
        );
        if n_tokens == 0 {
            return Ok(());
        }
        let n_splits = (first_pos + n_tokens).div_ceil(DECODE_CHUNK).max(1);
        let mut scratch = self.op_scratch.lock().unwrap_or_else(|e| e.into_inner());
        let ws = super::grown(
            &self.stream,
            &mut scratch.attn,
            decode_workspace_len(n_tokens, n_heads, head_dim, n_splits * DECODE_CHUNK),
        )?;
        let shape = DecodeShape {
            n_tokens,
            n_heads,
            n_kv_heads,
            head_dim,
            n_splits,
        };
        let pools = DeviceKvLayer {
            k: kv.k,
            v: kv.v,
            block_size: kv.block_size,
            kv_dim: kv.kv_dim,
        };
        // ws stays in the device's scratch for the next call: the stream orders
        // that call's kernels after these.
        let at = DecodeAt::Host(first_pos);
        self.decode_launch(
            q,
            &shape,
            &pools,
            &kv.block_table,
            at,
            causal,
            scale,
            ws,
            out,
        )
    }

    /// [`Device::attention_decode`] with the rows' positions on the device
    /// (`positions[i]` for row i, written before a CUDA graph replay) and a
    /// caller-owned workspace of [`decode_workspace_len`] for `max_keys`. The split
    /// count is sized for `kv.n_blocks * kv.block_size` keys whatever the
    /// positions are (splits past a row's keys exit at once), so the launch is
    /// the same at every position and can be captured once. The caller
    /// guarantees `positions[i] < kv.n_blocks * kv.block_size`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_decode_at<E: DeviceKvElem>(
        &self,
        q: &impl DeviceIn<f32>,
        n_tokens: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        kv: &DeviceKv<E>,
        positions: &impl DeviceIn<u32>,
        causal: bool,
        scale: f32,
        ws: &mut CudaSlice<f32>,
        out: &mut impl DeviceOut<f32>,
    ) -> Result<()> {
        Self::check_attention(q, n_tokens, n_heads, n_kv_heads, head_dim, kv, 0, &*out);
        assert!(
            positions.len() >= n_tokens,
            "attention: fewer positions than rows"
        );
        if n_tokens == 0 {
            return Ok(());
        }
        let max_keys = kv.n_blocks * kv.block_size;
        let n_splits = max_keys.div_ceil(DECODE_CHUNK).max(1);
        assert!(
            ws.len() >= decode_workspace_len(n_tokens, n_heads, head_dim, max_keys),
            "attention: decode workspace too small"
        );
        let shape = DecodeShape {
            n_tokens,
            n_heads,
            n_kv_heads,
            head_dim,
            n_splits,
        };
        let pools = DeviceKvLayer {
            k: kv.k,
            v: kv.v,
            block_size: kv.block_size,
            kv_dim: kv.kv_dim,
        };
        let pos = positions.view();
        let at = DecodeAt::Device(&pos);
        self.decode_launch(
            q,
            &shape,
            &pools,
            &kv.block_table,
            at,
            causal,
            scale,
            ws,
            out,
        )
    }

    /// [`crate::reference::attention_batch`] with the paged decode kernel: row i
    /// (of any of the batch's sequences) at `rows.positions[i]`, through its own
    /// sequence's table, attending its keys `0..position + 1` (causal) or
    /// `0..rows.seq_end[i]`. The split count is sized for `max_keys` keys, which
    /// the caller guarantees no row exceeds (a CUDA graph sizes it for the whole
    /// pool; plain launches for the batch's longest sequence), and `ws` holds
    /// [`decode_workspace_len`] for `n_tokens` rows and `max_keys`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_decode_rows<E: DeviceKvElem>(
        &self,
        q: &impl DeviceIn<f32>,
        n_tokens: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        kv: &DeviceKvLayer<E>,
        rows: &DeviceRows,
        max_keys: usize,
        causal: bool,
        scale: f32,
        ws: &mut CudaSlice<f32>,
        out: &mut impl DeviceOut<f32>,
    ) -> Result<()> {
        Self::check_heads(n_heads, n_kv_heads, head_dim, kv.kv_dim);
        assert_eq!(q.len(), n_tokens * n_heads * head_dim, "attention: q shape");
        assert_eq!(out.len(), q.len(), "attention: out shape");
        assert!(kv.block_size > 0, "attention: block_size must be > 0");
        assert_eq!(kv.k.len(), kv.v.len(), "attention: K and V pools differ");
        rows.check(n_tokens, "attention");
        if n_tokens == 0 {
            return Ok(());
        }
        let n_splits = max_keys.div_ceil(DECODE_CHUNK).max(1);
        assert!(
            ws.len() >= decode_workspace_len(n_tokens, n_heads, head_dim, max_keys),
            "attention: decode workspace too small"
        );
        let shape = DecodeShape {
            n_tokens,
            n_heads,
            n_kv_heads,
            head_dim,
            n_splits,
        };
        let at = DecodeAt::Rows(rows);
        self.decode_launch(q, &shape, kv, &rows.tables, at, causal, scale, ws, out)
    }

    #[allow(clippy::too_many_arguments)]
    fn decode_launch<E: DeviceKvElem>(
        &self,
        q: &impl DeviceIn<f32>,
        sh: &DecodeShape,
        kv: &DeviceKvLayer<E>,
        table: &CudaView<'_, u32>,
        at: DecodeAt,
        causal: bool,
        scale: f32,
        ws: &mut CudaSlice<f32>,
        out: &mut impl DeviceOut<f32>,
    ) -> Result<()> {
        let first_pos = match at {
            DecodeAt::Host(p) => p,
            _ => 0,
        };
        let ints = [
            i32_of(kv.block_size, "block_size"),
            i32_of(kv.kv_dim, "kv_dim"),
            i32_of(sh.n_tokens, "n_tokens"),
            i32_of(sh.n_heads, "n_heads"),
            i32_of(sh.n_kv_heads, "n_kv_heads"),
            i32_of(sh.head_dim, "head_dim"),
            i32_of(first_pos, "first_pos"),
        ];
        // grid y and z are at most 65535 (the callers size them within)
        assert!(
            sh.n_splits <= MAX_GRID_YZ && sh.n_tokens <= MAX_GRID_YZ,
            "attention: {} splits x {} rows exceed the decode grid",
            sh.n_splits,
            sh.n_tokens
        );
        let causal = causal as i32;
        let chunk = DECODE_CHUNK as i32;
        {
            let cfg = LaunchConfig {
                grid_dim: (sh.n_heads as u32, sh.n_splits as u32, sh.n_tokens as u32),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = self.stream.launch_builder(self.func(E::DECODE));
            let q = q.view();
            b.arg(&q).arg(kv.k).arg(kv.v).arg(table);
            for v in &ints {
                b.arg(v);
            }
            match at {
                DecodeAt::Host(_) => b.arg(&NULL).arg(&NULL).arg(&NULL),
                DecodeAt::Device(p) => b.arg(p).arg(&NULL).arg(&NULL),
                DecodeAt::Rows(r) => b.arg(&r.positions).arg(&r.table_start).arg(&r.seq_end),
            };
            b.arg(&causal).arg(&scale).arg(&chunk).arg(&mut *ws);
            // SAFETY: argument types and count match the kernel; shapes checked by
            // the callers; ws holds every split's partial; the tables cover every
            // row's keys (checked on the host, or guaranteed by the caller).
            unsafe { b.launch(cfg) }?;
        }
        let (ns, nh, hd) = (sh.n_splits as i32, sh.n_heads as i32, sh.head_dim as i32);
        let cfg = LaunchConfig {
            grid_dim: (sh.n_heads as u32, sh.n_tokens as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(self.func("attn_decode_combine"));
        let mut out = out.view_mut();
        b.arg(&*ws).arg(&ns).arg(&nh).arg(&hd).arg(&mut out);
        // SAFETY: as above.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// Decode kernel for up to [`DECODE_MAX_ROWS`] rows, prefill kernel above.
    #[allow(clippy::too_many_arguments)]
    pub fn attention<E: DeviceKvElem>(
        &self,
        q: &impl DeviceIn<f32>,
        n_tokens: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        kv: &DeviceKv<E>,
        first_pos: usize,
        causal: bool,
        scale: f32,
        out: &mut impl DeviceOut<f32>,
    ) -> Result<()> {
        if n_tokens <= DECODE_MAX_ROWS {
            self.attention_decode(
                q, n_tokens, n_heads, n_kv_heads, head_dim, kv, first_pos, causal, scale, out,
            )
        } else {
            self.attention_prefill(
                q, n_tokens, n_heads, n_kv_heads, head_dim, kv, first_pos, causal, scale, out,
            )
        }
    }
}

/// Where the decode kernel's rows stand.
#[derive(Clone, Copy)]
enum DecodeAt<'r, 'a> {
    /// rows `first_pos..`, one sequence
    Host(usize),
    /// `positions[i]`, one sequence
    Device(&'r CudaView<'a, u32>),
    /// a batch: each row with its own position, table and end
    Rows(&'r DeviceRows<'a>),
}
