//! The `.mqf` file format (see `docs/mqf.md`): reader and streaming writer.

mod metadata;
#[doc(hidden)]
pub mod raw;
mod reader;
mod writer;

pub use metadata::{MetaValue, Metadata};
pub use reader::{MqfFile, TensorInfo, TensorRef};
pub use writer::{MqfWriter, TensorSpec};

/// First eight bytes of every `.mqf` file.
pub const MAGIC: [u8; 8] = *b"MIPHAMQF";
/// Major version this build writes and reads; files with a newer major are refused.
pub const VERSION_MAJOR: u16 = 1;
/// Minor version this build writes; newer minors are read, skipping unknown metadata.
pub const VERSION_MINOR: u16 = 0;
/// Tensor data starts on this boundary.
pub const DATA_ALIGN: u64 = 4096;
/// Every tensor starts on this boundary inside the data section.
pub const TENSOR_ALIGN: u64 = 64;
