use std::path::Path;

use mipha_kernels::QuantType;

use super::MetaValue;
use crate::error::Result;

/// A tensor declared before any data is written.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub ty: QuantType,
    /// Logical shape (see `TensorInfo`).
    pub shape: Vec<u64>,
}

/// Streaming writer: metadata and the tensor list are fixed up front, so the layout
/// is known; tensors are then written one at a time (bounded memory) into a temporary
/// file next to the destination, which `finish` renames into place.
pub struct MqfWriter {
    // ...
}

impl MqfWriter {
    pub fn create(
        path: impl AsRef<Path>,
        metadata: Vec<(String, MetaValue)>,
        tensors: Vec<TensorSpec>,
    ) -> Result<Self> {
        todo!()
    }
    /// `data` is the tensor's stored bytes: rows * ty.row_bytes(cols). Tensors may be
    /// written in any order, each exactly once.
    pub fn write_tensor(&mut self, index: usize, data: &[u8]) -> Result<()> {
        todo!()
    }
    /// Writes the header (with checksums), syncs, renames the temporary file into place.
    /// Fails if any tensor was not written. Dropping the writer without `finish`
    /// removes the temporary file.
    pub fn finish(self) -> Result<()> {
        todo!()
    }
}
