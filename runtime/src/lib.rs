//! The Mipha runtime: the `.mqf` format, the graph plan, the backend trait and its
//! CPU implementation, the paged KV cache.

pub mod error;
pub mod format;

pub use error::{Error, Result};
pub use format::{MetaValue, Metadata, MqfFile, MqfWriter, TensorInfo, TensorRef, TensorSpec};
pub use mipha_kernels::QuantType;
