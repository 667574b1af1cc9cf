//! Row-wise and element-wise ops: LayerNorm, GELU, adds, softmax, RoPE,
//! embedding look-ups.

use super::*;

impl Device {
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
        let dev_ids = crate::cuda::grown(&self.stream, &mut scratch.ids, ids.len())?;
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
}
