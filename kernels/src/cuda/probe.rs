//! What the device itself can do, measured on it (the bounds `mipha-bench
//! --device cuda` divides by): memory bandwidth by device-to-device copies, and
//! the f16 tensor-core rate by a large cuBLAS GEMM.

use std::ffi::c_void;
use std::time::Instant;

use cudarc::cublas::sys as blas_sys;
use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::{CudaError, Device, Result};

impl Device {
    /// Memory bandwidth in GB/s (10⁹ bytes): `iters` copies of a `bytes` buffer
    /// into another, each moving `2 * bytes` (read and write), after one warm-up
    /// copy. Timed on the host around a synchronised batch.
    pub fn probe_copy_gb_s(&self, bytes: usize, iters: usize) -> Result<f64> {
        let n = (bytes / 4).max(1);
        let src = self.zeros::<f32>(n)?;
        let mut dst = self.zeros::<f32>(n)?;
        self.stream.memcpy_dtod(&src, &mut dst)?;
        self.synchronize()?;
        let t0 = Instant::now();
        for _ in 0..iters.max(1) {
            self.stream.memcpy_dtod(&src, &mut dst)?;
        }
        self.synchronize()?;
        let secs = t0.elapsed().as_secs_f64();
        Ok(2.0 * (n * 4) as f64 * iters.max(1) as f64 / secs / 1e9)
    }

    /// f16 GEMM rate in TFLOP/s (10¹² flops, 2 per multiply-add): `iters`
    /// `size`×`size`×`size` cuBLAS GemmEx calls with f16 inputs and f32
    /// accumulation (the prefill path's math), after one warm-up call.
    pub fn probe_gemm_tflop_s(&self, size: usize, iters: usize) -> Result<f64> {
        let blas = self.blas()?;
        let a = self.zeros::<u16>(size * size)?;
        let b = self.zeros::<u16>(size * size)?;
        let mut c = self.zeros::<f32>(size * size)?;
        let s = i32::try_from(size).map_err(|_| CudaError::Cublas("size too large".into()))?;
        let run = |c: &mut cudarc::driver::CudaSlice<f32>| -> Result<()> {
            let (alpha, beta) = (1.0f32, 0.0f32);
            let (ap, _ga) = a.device_ptr(&self.stream);
            let (bp, _gb) = b.device_ptr(&self.stream);
            let (cp, _gc) = c.device_ptr_mut(&self.stream);
            // SAFETY: a, b hold size² f16, c size² f32; leading dimensions = size.
            unsafe {
                cudarc::cublas::result::gemm_ex(
                    *blas.handle(),
                    blas_sys::cublasOperation_t::CUBLAS_OP_T,
                    blas_sys::cublasOperation_t::CUBLAS_OP_N,
                    s,
                    s,
                    s,
                    &alpha as *const f32 as *const c_void,
                    ap as *const c_void,
                    blas_sys::cudaDataType_t::CUDA_R_16F,
                    s,
                    bp as *const c_void,
                    blas_sys::cudaDataType_t::CUDA_R_16F,
                    s,
                    &beta as *const f32 as *const c_void,
                    cp as *mut c_void,
                    blas_sys::cudaDataType_t::CUDA_R_32F,
                    s,
                    blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| CudaError::Cublas(format!("{e:?}")))
        };
        run(&mut c)?;
        self.synchronize()?;
        let t0 = Instant::now();
        for _ in 0..iters.max(1) {
            run(&mut c)?;
        }
        self.synchronize()?;
        let secs = t0.elapsed().as_secs_f64();
        let flops = 2.0 * (size as f64).powi(3) * iters.max(1) as f64;
        Ok(flops / secs / 1e12)
    }
}
