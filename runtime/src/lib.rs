//! The Mipha runtime: the `.mqf` format, the graph plan, the backend trait and its
//! CPU implementation, the paged KV cache.

pub mod backend;
pub mod cpu;
/// The CUDA backend (feature `cuda`): see `docs/cuda.md`.
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod error;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod format;
pub mod graph;
pub mod kv;

pub use backend::{Backend, Capture, Input, ResidentRows, SeqRows, Step};
pub use cpu::{CpuBackend, KvConfig};
pub use device::{DeviceChoice, Resolved};
pub use error::{Error, Result};
pub use format::{MetaValue, Metadata, MqfFile, MqfWriter, TensorInfo, TensorRef, TensorSpec};
pub use graph::{
    BindOptions, BufId, BufferLayout, Epilogue, GeluKind, KvShape, LoadProgress, Op, Plan,
    PlanBuilder, Rows, WeightId, Weights,
};
pub use kv::{BlockHash, BlockPool, PosKey, SeqId};
pub use mipha_kernels::{KvDtype, QuantType};
