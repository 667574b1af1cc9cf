use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use mipha_kernels::QuantType;

use super::raw::{self, Preamble, MAX_NDIM, PREAMBLE_LEN};
use super::{MetaValue, TensorInfo, DATA_ALIGN, TENSOR_ALIGN, VERSION_MAJOR, VERSION_MINOR};
use crate::error::{Error, Result};

/// A tensor declared before any data is written.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub ty: QuantType,
    /// Logical shape (see `TensorInfo`).
    pub shape: Vec<u64>,
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, ty: QuantType, shape: impl Into<Vec<u64>>) -> Self {
        TensorSpec {
            name: name.into(),
            ty,
            shape: shape.into(),
        }
    }
}

/// Streaming writer: metadata and the tensor list are fixed up front, so the layout
/// is known; tensors are then written one at a time (bounded memory) into a temporary
/// file next to the destination, which `finish` renames into place.
pub struct MqfWriter {
    dest: PathBuf,
    tmp: PathBuf,
    file: File,
    metadata: Vec<(String, MetaValue)>,
    /// Final layout; `checksum` is filled in as each tensor is written.
    tensors: Vec<TensorInfo>,
    written: Vec<bool>,
    header_len: u64,
    data_offset: u64,
    file_len: u64,
    /// Set once the temporary file has been renamed away, so `Drop` leaves it alone.
    done: bool,
}

/// Distinguishes temporary files of several writers in one process.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn invalid(path: &Path, detail: impl Into<String>) -> Error {
    Error::InvalidWrite {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

fn check_metadata(path: &Path, metadata: &[(String, MetaValue)]) -> Result<()> {
    let mut seen = HashSet::new();
    for (key, value) in metadata {
        if key.is_empty() {
            return Err(invalid(path, "empty metadata key"));
        }
        if u32::try_from(key.len()).is_err() {
            return Err(invalid(
                path,
                format!("metadata key of {} bytes", key.len()),
            ));
        }
        if !seen.insert(key.as_str()) {
            return Err(invalid(path, format!("duplicate metadata key `{key}`")));
        }
        if let MetaValue::Array(items) = value {
            let first = items.first().map(raw::tag_of);
            for (i, item) in items.iter().enumerate() {
                if matches!(item, MetaValue::Array(_)) {
                    return Err(invalid(
                        path,
                        format!("metadata key `{key}`: arrays of arrays are not supported"),
                    ));
                }
                if Some(raw::tag_of(item)) != first {
                    return Err(invalid(
                        path,
                        format!(
                            "metadata key `{key}`: array is not homogeneous (element {i} is {}, element 0 is {})",
                            item.type_name(),
                            items[0].type_name()
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Validates one spec and returns (row_stride, len).
fn tensor_layout(path: &Path, spec: &TensorSpec) -> Result<(u64, u64)> {
    let name = &spec.name;
    let bad = |detail: String| invalid(path, format!("tensor `{name}`: {detail}"));
    if name.is_empty() {
        return Err(invalid(path, "tensor with an empty name"));
    }
    if u32::try_from(name.len()).is_err() {
        return Err(bad(format!("name of {} bytes", name.len())));
    }
    if spec.shape.is_empty() || spec.shape.len() > MAX_NDIM {
        return Err(bad(format!(
            "shape {:?} must have 1 to {MAX_NDIM} dims",
            spec.shape
        )));
    }
    if spec.shape.contains(&0) {
        return Err(bad(format!(
            "shape {:?} has a zero dim (empty tensors are not stored)",
            spec.shape
        )));
    }
    let overflow = || bad(format!("shape {:?} is too large", spec.shape));
    let (&cols, outer) = spec.shape.split_last().ok_or_else(overflow)?;
    spec.shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .ok_or_else(overflow)?;
    let rows = outer.iter().product::<u64>();
    let row_stride = raw::checked_row_bytes(spec.ty, cols).ok_or_else(overflow)?;
    let len = rows.checked_mul(row_stride).ok_or_else(overflow)?;
    usize::try_from(len).map_err(|_| overflow())?;
    Ok((row_stride, len))
}

impl MqfWriter {
    pub fn create(
        path: impl AsRef<Path>,
        metadata: Vec<(String, MetaValue)>,
        tensors: Vec<TensorSpec>,
    ) -> Result<Self> {
        let dest = path.as_ref().to_path_buf();
        check_metadata(&dest, &metadata)?;

        let mut infos = Vec::with_capacity(tensors.len());
        let mut names = HashSet::new();
        let mut cursor = 0u64;
        let too_big = || invalid(&dest, "total size overflows u64");
        for spec in tensors {
            let (row_stride, len) = tensor_layout(&dest, &spec)?;
            if !names.insert(spec.name.clone()) {
                return Err(invalid(
                    &dest,
                    format!("duplicate tensor name `{}`", spec.name),
                ));
            }
            let offset = raw::align_up(cursor, TENSOR_ALIGN).ok_or_else(too_big)?;
            cursor = offset.checked_add(len).ok_or_else(too_big)?;
            infos.push(TensorInfo {
                name: spec.name,
                ty: spec.ty,
                shape: spec.shape,
                row_stride,
                offset,
                len,
                checksum: 0,
            });
        }

        // Checksums are fixed-size fields, so the header's length is final already.
        let header_len = raw::encode_header(&metadata, &infos).len() as u64;
        let data_offset =
            raw::align_up(PREAMBLE_LEN as u64 + header_len, DATA_ALIGN).ok_or_else(too_big)?;
        let file_len = data_offset.checked_add(cursor).ok_or_else(too_big)?;

        let file_name = dest
            .file_name()
            .ok_or_else(|| invalid(&dest, "destination has no file name"))?;
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(file_name);
        tmp_name.push(format!(".tmp-{}-{n}", std::process::id()));
        let tmp = dir.join(tmp_name);

        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| Error::io(&tmp, e))?;
        let written = vec![false; infos.len()];
        // From here on `Drop` removes the temporary file on any error.
        let writer = MqfWriter {
            dest,
            tmp,
            file,
            metadata,
            tensors: infos,
            written,
            header_len,
            data_offset,
            file_len,
            done: false,
        };
        // Sizing the file up front makes every gap (header area, alignment padding)
        // read as zeros without writing them, and lets tensors go in any order.
        writer
            .file
            .set_len(file_len)
            .map_err(|e| Error::io(&writer.tmp, e))?;
        Ok(writer)
    }

    /// The destination path.
    pub fn path(&self) -> &Path {
        &self.dest
    }

    /// The final tensor index (offsets, lengths, strides); checksums are 0 until written.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// Bytes `write_tensor(index, ..)` expects.
    pub fn expected_len(&self, index: usize) -> Option<u64> {
        self.tensors.get(index).map(|t| t.len)
    }

    /// Total size the finished file will have.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// `data` is the tensor's stored bytes: rows * ty.row_bytes(cols). Tensors may be
    /// written in any order, each exactly once.
    pub fn write_tensor(&mut self, index: usize, data: &[u8]) -> Result<()> {
        let count = self.tensors.len();
        let info = self.tensors.get(index).ok_or_else(|| {
            invalid(
                &self.dest,
                format!("tensor index {index} out of range ({count} tensors declared)"),
            )
        })?;
        if self.written[index] {
            return Err(invalid(
                &self.dest,
                format!("tensor `{}` written twice", info.name),
            ));
        }
        if data.len() as u64 != info.len {
            return Err(invalid(
                &self.dest,
                format!(
                    "tensor `{}` ({} {:?}): got {} bytes, expected {} ({} rows x {} bytes)",
                    info.name,
                    info.ty,
                    info.shape,
                    data.len(),
                    info.len,
                    info.rows(),
                    info.row_stride
                ),
            ));
        }
        let at = self.data_offset + info.offset;
        let io = |e| Error::io(&self.tmp, e);
        (&self.file).seek(SeekFrom::Start(at)).map_err(io)?;
        (&self.file).write_all(data).map_err(io)?;
        self.tensors[index].checksum = raw::checksum(data);
        self.written[index] = true;
        Ok(())
    }

    /// Writes the header (with checksums), syncs, renames the temporary file into place.
    /// Fails if any tensor was not written. Dropping the writer without `finish`
    /// removes the temporary file.
    pub fn finish(mut self) -> Result<()> {
        if let Some(i) = self.written.iter().position(|w| !w) {
            let missing = self.written.iter().filter(|w| !**w).count();
            return Err(invalid(
                &self.dest,
                format!(
                    "tensor `{}` was never written ({missing} of {} missing)",
                    self.tensors[i].name,
                    self.tensors.len()
                ),
            ));
        }
        let header = raw::encode_header(&self.metadata, &self.tensors);
        if header.len() as u64 != self.header_len {
            return Err(Error::Other(format!(
                "{}: internal error: header length changed from {} to {}",
                self.dest.display(),
                self.header_len,
                header.len()
            )));
        }
        let preamble = Preamble {
            bom: raw::BOM,
            major: VERSION_MAJOR,
            minor: VERSION_MINOR,
            header_len: self.header_len,
            header_checksum: raw::checksum(&header),
            data_offset: self.data_offset,
            file_len: self.file_len,
        };
        let io = |e| Error::io(&self.tmp, e);
        (&self.file).seek(SeekFrom::Start(0)).map_err(io)?;
        (&self.file).write_all(&preamble.encode()).map_err(io)?;
        (&self.file).write_all(&header).map_err(io)?;
        // The data must be durable before the rename makes it visible under the
        // real name, or a crash could leave a complete-looking file with holes.
        self.file.sync_all().map_err(io)?;
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| Error::io(&self.dest, e))?;
        self.done = true;
        sync_parent_dir(&self.dest)
    }
}

/// Makes the rename itself durable.
#[cfg(unix)]
fn sync_parent_dir(dest: &Path) -> Result<()> {
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// Directories cannot be opened for syncing here; the rename is as durable as it gets.
#[cfg(not(unix))]
fn sync_parent_dir(_dest: &Path) -> Result<()> {
    Ok(())
}

impl Drop for MqfWriter {
    fn drop(&mut self) {
        if !self.done {
            // Best effort: an error here has nowhere to go, and the name marks the
            // file as disposable for anyone cleaning up by hand.
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

impl std::fmt::Debug for MqfWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqfWriter")
            .field("dest", &self.dest)
            .field("tmp", &self.tmp)
            .field("tensors", &self.tensors.len())
            .field("written", &self.written.iter().filter(|w| **w).count())
            .field("file_len", &self.file_len)
            .finish()
    }
}
