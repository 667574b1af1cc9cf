use std::path::{Path, PathBuf};

use mipha_kernels::QuantType;

use super::Metadata;
use crate::error::Result;

/// One entry of the tensor index.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub ty: QuantType,
    /// Logical shape, row-major. rows = product of all but the last dim (1 for 1-D);
    /// cols = the last dim.
    pub shape: Vec<u64>,
    /// Bytes per stored row (`ty.row_bytes(cols)`; rows are padded to whole blocks).
    pub row_stride: u64,
    /// Byte offset from the start of the data section (a multiple of 64).
    pub offset: u64,
    /// Byte length = rows * row_stride.
    pub len: u64,
    /// xxh3-64 of the tensor's bytes.
    pub checksum: u64,
}

impl TensorInfo {
    pub fn rows(&self) -> usize {
        if self.shape.len() <= 1 {
            1
        } else {
            self.shape[..self.shape.len() - 1].iter().product::<u64>() as usize
        }
    }
    pub fn cols(&self) -> usize {
        self.shape.last().copied().unwrap_or(1) as usize
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product::<u64>() as usize
    }
}

/// A tensor's bytes inside the mapping (zero copy).
#[derive(Clone, Copy, Debug)]
pub struct TensorRef<'a> {
    pub info: &'a TensorInfo,
    pub data: &'a [u8],
}

/// An opened, structurally validated `.mqf` file, mapped with `memmap2`.
pub struct MqfFile {
    path: PathBuf,
    // mmap, metadata, tensors, data_start, version ...
}

impl MqfFile {
    /// Maps and validates the preamble, header checksum, metadata and tensor index
    /// (every offset, length and shape) before any tensor byte is touched.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        todo!()
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn version(&self) -> (u16, u16) {
        todo!()
    }
    pub fn metadata(&self) -> &Metadata {
        todo!()
    }
    pub fn tensors(&self) -> &[TensorInfo] {
        todo!()
    }
    pub fn tensor(&self, name: &str) -> Result<TensorRef<'_>> {
        todo!()
    }
    /// Checks every tensor's checksum; the error names the first bad tensor.
    pub fn verify(&self) -> Result<()> {
        todo!()
    }
    /// File size in bytes.
    pub fn file_size(&self) -> u64 {
        todo!()
    }
}
