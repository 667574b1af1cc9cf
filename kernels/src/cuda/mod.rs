//! CUDA kernels (feature `cuda`): the `.cu` sources of `kernels/cuda/`, compiled
//! with NVRTC for the device's own architecture on first use and cached on disk
//! ([`cache`]), with safe wrappers ([`Device`]'s methods) whose contracts are
//! those of [`crate::reference`].
//!
//! The driver, NVRTC and cuBLAS are loaded at run time (cudarc's
//! `dynamic-loading`): a build with the feature needs no CUDA toolkit, and
//! [`Device::new`] returns [`CudaError::NoDriver`] / [`CudaError::NoDevice`] /
//! [`CudaError::NoNvrtc`] on a machine without them instead of failing to link or
//! panicking. cuBLAS is loaded by the first GEMM only.

pub mod cache;
mod ops;
mod probe;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream};

pub use cudarc::driver::{
    CudaGraph, CudaSlice as DeviceBuffer, CudaView, CudaViewMut, DriverError,
};
pub use ops::{
    decode_workspace_len, DeviceIn, DeviceKv, DeviceKvElem, DeviceKvLayer, DeviceOut, DeviceRows,
    DeviceWeight, GeluKind, DECODE_CHUNK, DECODE_MAX_ROWS, GEMV_MAX_ROWS, MAX_GRID_YZ,
    MAX_HEAD_DIM,
};

/// The `.cu` sources, embedded; `common.cuh` is prepended to each.
pub const COMMON_SRC: &str = include_str!("../../cuda/common.cuh");
pub const SOURCES: [(&str, &str); 3] = [
    ("elementwise", include_str!("../../cuda/elementwise.cu")),
    ("gemv", include_str!("../../cuda/gemv.cu")),
    ("attention", include_str!("../../cuda/attention.cu")),
];

/// Every kernel of [`SOURCES`], by module.
const KERNELS: [(&str, &[&str]); 3] = [
    (
        "elementwise",
        &[
            "layer_norm",
            "bias_gelu_tanh",
            "bias_gelu_erf",
            "add_assign",
            "add_rows",
            "softmax_rows",
            "rope_partial",
            "embedding",
            "dequant_to_f16",
            "f32_to_f16",
            "add_bias",
            "kv_scatter",
            "kv_scatter_f16",
        ],
    ),
    (
        "gemv",
        &[
            "gemv_f32",
            "gemv_f16",
            "gemv_bf16",
            "gemv_q8_0",
            "gemv_q4_0",
        ],
    ),
    (
        "attention",
        &[
            "attn_prefill",
            "attn_prefill_f16",
            "attn_decode_split",
            "attn_decode_split_f16",
            "attn_decode_combine",
        ],
    ),
];

/// Why the CUDA path is unavailable or failed.
#[derive(Debug)]
pub enum CudaError {
    /// `libcuda` could not be loaded (no NVIDIA driver on this machine).
    NoDriver(String),
    /// The driver loaded but there is no usable device (or not that ordinal).
    NoDevice(String),
    /// `libnvrtc` could not be loaded (needed to compile the kernels).
    NoNvrtc(String),
    /// `libcublas` could not be loaded (needed by the GEMM path).
    NoCublas(String),
    /// A driver call failed.
    Driver(DriverError),
    /// cuBLAS returned an error.
    Cublas(String),
    /// NVRTC rejected a source; `log` is its compile log.
    Compile { module: String, log: String },
    /// A token id outside the embedding table.
    TokenOutOfRange(u32),
}

impl fmt::Display for CudaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CudaError::NoDriver(m) => write!(f, "no CUDA driver: {m}"),
            CudaError::NoDevice(m) => write!(f, "no CUDA device: {m}"),
            CudaError::NoNvrtc(m) => write!(f, "NVRTC not found: {m}"),
            CudaError::NoCublas(m) => write!(f, "cuBLAS not found: {m}"),
            CudaError::Driver(e) => write!(f, "CUDA driver error: {e}"),
            CudaError::Cublas(e) => write!(f, "cuBLAS error: {e}"),
            CudaError::Compile { module, log } => {
                write!(f, "NVRTC failed to compile {module}.cu:\n{log}")
            }
            CudaError::TokenOutOfRange(id) => {
                write!(f, "token id {id} outside the embedding table")
            }
        }
    }
}

impl std::error::Error for CudaError {}

impl From<DriverError> for CudaError {
    fn from(e: DriverError) -> Self {
        CudaError::Driver(e)
    }
}

pub type Result<T> = std::result::Result<T, CudaError>;

/// Whether the error means "no CUDA here" (driver, device or NVRTC missing) rather
/// than a failure of a working setup: tests skip on these.
impl CudaError {
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            CudaError::NoDriver(_) | CudaError::NoDevice(_) | CudaError::NoNvrtc(_)
        )
    }
}

/// Number of CUDA devices, or why there are none usable.
pub fn device_count() -> Result<usize> {
    // SAFETY: only tries to dlopen the library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(CudaError::NoDriver(
            "libcuda.so could not be loaded (install the NVIDIA driver, or add its \
             directory to LD_LIBRARY_PATH)"
                .into(),
        ));
    }
    cudarc::driver::result::init()
        .map_err(|e| CudaError::NoDevice(format!("cuInit failed: {e}")))?;
    let n = CudaContext::device_count()
        .map_err(|e| CudaError::NoDevice(format!("cuDeviceGetCount failed: {e}")))?;
    if n <= 0 {
        return Err(CudaError::NoDevice("the driver reports no device".into()));
    }
    Ok(n as usize)
}

/// The driver's CUDA version as `major * 1000 + minor * 10` (e.g. 12040).
pub fn driver_version() -> Result<i32> {
    let mut v = 0i32;
    // SAFETY: the library is loaded (callers went through device_count) and `v` is
    // a valid out-pointer.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) }
        .result()
        .map_err(CudaError::Driver)?;
    Ok(v)
}

/// f16 buffers of the GEMM path, grown on demand.
#[derive(Default)]
pub(crate) struct GemmScratch {
    /// dequantized weights `[n, k]`
    pub(crate) w: Option<CudaSlice<u16>>,
    /// activations `[m, k]`
    pub(crate) x: Option<CudaSlice<u16>>,
}

/// Small per-op buffers, kept between calls so steady-state steps allocate
/// nothing on the device.
#[derive(Default)]
pub(crate) struct OpScratch {
    /// the split partials of the decode attention
    pub(crate) attn: Option<CudaSlice<f32>>,
    /// token ids of an embedding gather
    pub(crate) ids: Option<CudaSlice<u32>>,
}

/// `buf` with room for `n` elements, reallocated (zeroed) only when it is too small.
pub(crate) fn grown<'a, T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    buf: &'a mut Option<CudaSlice<T>>,
    n: usize,
) -> Result<&'a mut CudaSlice<T>> {
    if buf.as_ref().is_none_or(|b| b.len() < n) {
        *buf = Some(stream.alloc_zeros(n.max(1))?);
    }
    Ok(buf.as_mut().expect("allocated above"))
}

/// One device with its stream, its compiled kernels and (lazily) cuBLAS. All work
/// is queued on one stream, in order; reads back to the host synchronise.
pub struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    funcs: HashMap<&'static str, CudaFunction>,
    blas: OnceLock<std::result::Result<CudaBlas, String>>,
    /// f16 scratch of the GEMM path: (dequantized weights, converted activations).
    scratch: Mutex<GemmScratch>,
    pub(crate) op_scratch: Mutex<OpScratch>,
    arch: String,
    name: String,
    driver: i32,
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Device")
            .field("ordinal", &self.ctx.ordinal())
            .field("name", &self.name)
            .field("arch", &self.arch)
            .field("driver", &self.driver)
            .finish()
    }
}

impl Device {
    /// Opens device `ordinal`, compiling (or loading from the cache) every kernel.
    pub fn new(ordinal: usize) -> Result<Self> {
        let count = device_count()?;
        if ordinal >= count {
            return Err(CudaError::NoDevice(format!(
                "device {ordinal} requested, the driver reports {count}"
            )));
        }
        // SAFETY: only tries to dlopen the library.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(CudaError::NoNvrtc(
                "libnvrtc.so could not be loaded (install the CUDA runtime's NVRTC, e.g. \
                 the nvidia-cuda-nvrtc-cu12 wheel, and add its lib directory to \
                 LD_LIBRARY_PATH)"
                    .into(),
            ));
        }
        let ctx = CudaContext::new(ordinal)?;
        // One stream, used in order: cudarc's per-buffer event tracking is not needed
        // (and would get in the way of graph capture).
        // SAFETY: no buffer is shared between streams.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        let (major, minor) = ctx.compute_capability()?;
        let arch = format!("sm_{major}{minor}");
        let name = ctx.name()?;
        let driver = driver_version()?;
        let mut funcs = HashMap::new();
        for ((module, src), (kmod, names)) in SOURCES.iter().zip(KERNELS.iter()) {
            debug_assert_eq!(module, kmod);
            let ptx = cache::compile(module, src, &arch, driver)?;
            let m = ctx.load_module(ptx)?;
            for &n in names.iter() {
                funcs.insert(n, m.load_function(n)?);
            }
        }
        Ok(Device {
            ctx,
            stream,
            funcs,
            blas: OnceLock::new(),
            scratch: Mutex::new(GemmScratch::default()),
            op_scratch: Mutex::new(OpScratch::default()),
            arch,
            name,
            driver,
        })
    }

    /// `cuda:N (NVIDIA H100 80GB HBM3, sm_90, driver 12040)`
    pub fn describe(&self) -> String {
        format!(
            "cuda:{} ({}, {}, driver {})",
            self.ctx.ordinal(),
            self.name,
            self.arch,
            self.driver
        )
    }

    pub fn arch(&self) -> &str {
        &self.arch
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Waits for every queued kernel.
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    /// Starts recording the stream's work into a CUDA graph instead of running it
    /// (this thread only: another thread's driver calls are not affected). Work
    /// queued before runs first. Every call until [`Device::end_capture`] must be
    /// capturable: kernel launches and device-to-device copies, no host copies,
    /// no allocation, no synchronisation.
    pub fn begin_capture(&self) -> Result<()> {
        use cudarc::driver::sys::CUstreamCaptureMode;
        self.stream.synchronize()?;
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        Ok(())
    }

    /// Ends the capture begun by [`Device::begin_capture`] and instantiates the
    /// graph; `None` when the driver invalidated the capture (an uncapturable call
    /// was made). Replay with [`CudaGraph::launch`], on this device's stream.
    pub fn end_capture(&self) -> Result<Option<CudaGraph>> {
        use cudarc::driver::sys::CUgraphInstantiate_flags;
        Ok(self.stream.end_capture(CUgraphInstantiate_flags(0))?)
    }

    pub(crate) fn func(&self, name: &str) -> &CudaFunction {
        &self.funcs[name]
    }

    pub(crate) fn blas(&self) -> Result<&CudaBlas> {
        let b = self.blas.get_or_init(|| {
            // SAFETY: only tries to dlopen the library.
            if !unsafe { cudarc::cublas::sys::is_culib_present() } {
                return Err(
                    "libcublas.so could not be loaded (install cuBLAS, e.g. the \
                            nvidia-cublas-cu12 wheel, and add its lib directory to \
                            LD_LIBRARY_PATH)"
                        .to_string(),
                );
            }
            CudaBlas::new(self.stream.clone()).map_err(|e| format!("cublasCreate: {e:?}"))
        });
        b.as_ref().map_err(|m| CudaError::NoCublas(m.clone()))
    }

    // ---- buffers ----

    pub fn upload<T: cudarc::driver::DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        Ok(self.stream.clone_htod(host)?)
    }

    pub fn upload_into<T: cudarc::driver::DeviceRepr>(
        &self,
        host: &[T],
        dst: &mut CudaSlice<T>,
    ) -> Result<()> {
        Ok(self.stream.memcpy_htod(host, dst)?)
    }

    pub fn download<T: cudarc::driver::DeviceRepr>(&self, dev: &CudaSlice<T>) -> Result<Vec<T>> {
        Ok(self.stream.clone_dtoh(dev)?)
    }

    pub fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> Result<CudaSlice<T>> {
        Ok(self.stream.alloc_zeros(n)?)
    }
}
