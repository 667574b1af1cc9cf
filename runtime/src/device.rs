//! Which device runs a plan: `--device cpu|cuda[:N]|auto`, resolved to a
//! concrete device and turned into a [`Backend`]. Compiled with or without the
//! `cuda` feature, so callers (the engine, the CLI, the bench) need no feature of
//! their own: without it, `cuda` is a clear error and `auto` is the CPU.

use std::str::FromStr;
use std::sync::Arc;

use crate::backend::Backend;
use crate::cpu::{CpuBackend, KvConfig};
use crate::error::{Error, Result};
use crate::graph::{BindOptions, LoadProgress, Plan, Weights};

/// What `--device` asks for: `cpu`, `cuda`, `cuda:N` or `auto`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    #[default]
    Cpu,
    Cuda(usize),
    /// the first GPU when one is usable, else the CPU
    Auto,
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "cpu" => Ok(DeviceChoice::Cpu),
            "auto" => Ok(DeviceChoice::Auto),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda(0)),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map(DeviceChoice::Cuda)
                    .map_err(|_| format!("bad device `{s}`: expected cuda:N with N a number")),
                None => Err(format!(
                    "unknown device `{s}` (expected cpu, cuda, cuda:N or auto)"
                )),
            },
        }
    }
}

/// Whether this build can drive a GPU at all.
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// A [`DeviceChoice`] made concrete.
#[derive(Clone, Debug)]
pub enum Resolved {
    Cpu {
        /// why `auto` fell back to the CPU (None when the CPU was asked for)
        reason: Option<String>,
    },
    #[cfg(feature = "cuda")]
    Cuda(Arc<mipha_kernels::cuda::Device>),
}

impl DeviceChoice {
    /// Opens the device. `cuda[:N]` fails with the reason when it is not usable
    /// (or when this build has no CUDA support); `auto` falls back to the CPU
    /// when there is no driver, device or NVRTC, or no CUDA support built in.
    pub fn resolve(self) -> Result<Resolved> {
        match self {
            DeviceChoice::Cpu => Ok(Resolved::Cpu { reason: None }),
            DeviceChoice::Cuda(n) => open_cuda(n),
            DeviceChoice::Auto => auto(),
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(n: usize) -> Result<Resolved> {
    mipha_kernels::cuda::Device::new(n)
        .map(|d| Resolved::Cuda(Arc::new(d)))
        .map_err(|e| Error::Config(format!("cuda:{n}: {e}")))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(n: usize) -> Result<Resolved> {
    Err(Error::Config(format!(
        "cuda:{n} requested, but this build has no CUDA support: built without the cuda \
         feature (rebuild with --features cuda)"
    )))
}

#[cfg(feature = "cuda")]
fn auto() -> Result<Resolved> {
    match mipha_kernels::cuda::Device::new(0) {
        Ok(d) => Ok(Resolved::Cuda(Arc::new(d))),
        Err(e) if e.is_unavailable() => Ok(Resolved::Cpu {
            reason: Some(e.to_string()),
        }),
        Err(e) => Err(Error::Config(format!("cuda:0: {e}"))),
    }
}

#[cfg(not(feature = "cuda"))]
fn auto() -> Result<Resolved> {
    Ok(Resolved::Cpu {
        reason: Some("built without the cuda feature".into()),
    })
}

impl Resolved {
    pub fn is_cuda(&self) -> bool {
        !matches!(self, Resolved::Cpu { .. })
    }

    /// `cpu`, `cpu (auto: no CUDA driver: ...)` or the GPU's description.
    pub fn describe(&self) -> String {
        match self {
            Resolved::Cpu { reason: None } => "cpu".into(),
            Resolved::Cpu { reason: Some(r) } => format!("cpu (auto: {r})"),
            #[cfg(feature = "cuda")]
            Resolved::Cuda(d) => d.describe(),
        }
    }

    /// A backend for `plan` on this device. The CPU backend runs on `pool`; the
    /// CUDA backend uploads every weight of the plan now. `bind` is how `weights`
    /// were bound: with `int8_activations` off (exact f32 activations, the
    /// conformance setting) the GPU also keeps f32 activations in every matmul
    /// (its f32 GEMV kernels, whatever the row count) instead of the f16
    /// tensor-core GEMM for prefill.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub fn backend(
        &self,
        plan: &Plan,
        weights: &Weights,
        kv: Option<KvConfig>,
        pool: Arc<rayon::ThreadPool>,
        bind: BindOptions,
        progress: Option<&LoadProgress>,
    ) -> Result<Box<dyn Backend>> {
        match self {
            Resolved::Cpu { .. } => Ok(Box::new(CpuBackend::with_pool(plan, kv, pool)?)),
            #[cfg(feature = "cuda")]
            Resolved::Cuda(d) => {
                let mut b = crate::cuda::CudaBackend::new_reporting(
                    plan,
                    weights,
                    kv,
                    d.clone(),
                    progress,
                )?;
                b.set_f16_gemm(bind.int8_activations);
                Ok(Box::new(b))
            }
        }
    }

    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    /// Device memory bandwidth in GB/s, measured by device-to-device copies of
    /// `bytes` (read + write counted); `None` on the CPU.
    pub fn copy_gb_s(&self, bytes: usize, iters: usize) -> Result<Option<f64>> {
        match self {
            Resolved::Cpu { .. } => Ok(None),
            #[cfg(feature = "cuda")]
            Resolved::Cuda(d) => d
                .probe_copy_gb_s(bytes, iters)
                .map(Some)
                .map_err(|e| Error::Other(format!("cuda: {e}"))),
        }
    }

    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    /// The device's f16 GEMM rate (cuBLAS, f32 accumulation) in TFLOP/s at
    /// `size`³; `None` on the CPU.
    pub fn gemm_tflop_s(&self, size: usize, iters: usize) -> Result<Option<f64>> {
        match self {
            Resolved::Cpu { .. } => Ok(None),
            #[cfg(feature = "cuda")]
            Resolved::Cuda(d) => d
                .probe_gemm_tflop_s(size, iters)
                .map(Some)
                .map_err(|e| Error::Other(format!("cuda: {e}"))),
        }
    }
}
