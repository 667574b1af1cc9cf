//! Weights on the device and the matmuls over them: the f16/quantized GEMV of
//! decode, the cuBLAS f16 GEMM of prefill and the vision tower.

use super::*;

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
        let crate::cuda::GemmScratch { w: wbuf, x: xbuf } = &mut *scratch;
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
}
