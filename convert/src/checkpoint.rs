//! Reading safetensors checkpoints with bounded memory: headers are parsed on their
//! own, tensor bytes are fetched with positioned reads, a block of rows at a time.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;
use serde_json::Value;

use crate::config::read_json;
use crate::error::{ConvertError, Result};

/// Element types the converter reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceDtype {
    F32,
    F16,
    BF16,
}

impl SourceDtype {
    pub fn size(self) -> usize {
        match self {
            SourceDtype::F32 => 4,
            SourceDtype::F16 | SourceDtype::BF16 => 2,
        }
    }

    /// Decodes little-endian elements into `out` (same element count).
    pub fn decode(self, src: &[u8], out: &mut [f32]) {
        debug_assert_eq!(src.len(), out.len() * self.size());
        match self {
            SourceDtype::F32 => {
                for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            SourceDtype::F16 => {
                for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                    *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            SourceDtype::BF16 => {
                for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                    *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
        }
    }
}

/// One tensor of the checkpoint.
#[derive(Clone, Debug)]
pub struct SourceTensor {
    pub name: String,
    /// Index into [`Checkpoint::files`].
    pub file: usize,
    /// `Err(name)` for a dtype the converter cannot read; only an error if the tensor
    /// is actually needed.
    pub dtype: std::result::Result<SourceDtype, String>,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub start: u64,
    pub end: u64,
}

impl SourceTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

#[derive(Clone, Debug)]
pub struct SourceFile {
    /// Relative to the checkpoint dir.
    pub rel: String,
    pub path: PathBuf,
    pub size: u64,
    /// Byte offset of the data section (8 + header length).
    pub data_start: u64,
}

/// The tensors of a checkpoint, with where each one lives; no tensor data is read.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub files: Vec<SourceFile>,
    /// Ordered by file, then offset, so that a pass over them reads each file forward.
    pub tensors: Vec<SourceTensor>,
    pub by_name: HashMap<String, usize>,
    /// The index file, if the checkpoint is sharded (relative to dir).
    pub index_file: Option<String>,
}

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        let single = dir.join(SINGLE_FILE);
        if index_path.is_file() {
            Self::open_sharded(dir, &index_path)
        } else if single.is_file() {
            let mut files = Vec::new();
            let mut tensors = Vec::new();
            let (file, header) = read_header(&single, SINGLE_FILE)?;
            files.push(file);
            add_tensors(&files[0], 0, &header, None, &mut tensors)?;
            Ok(Self::finish(dir, files, tensors, None))
        } else {
            Err(ConvertError::NoWeights { dir: dir.into() })
        }
    }

    fn open_sharded(dir: &Path, index_path: &Path) -> Result<Self> {
        let index = read_json(index_path)?;
        let bad = |detail: &str| ConvertError::Safetensors {
            path: index_path.into(),
            detail: detail.into(),
        };
        let Some(Value::Object(map)) = index.get("weight_map") else {
            return Err(bad("no `weight_map` object"));
        };
        // shard -> tensor names, both sorted so the messages are deterministic.
        let mut shards: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (tensor, shard) in map {
            let shard = shard
                .as_str()
                .ok_or_else(|| bad(&format!("weight_map.{tensor} is not a file name")))?;
            // A shard name must stay inside the checkpoint dir.
            if shard.is_empty() || shard.contains('/') || shard.contains('\\') || shard == ".." {
                return Err(bad(&format!(
                    "weight_map.{tensor}: bad shard name `{shard}`"
                )));
            }
            shards
                .entry(shard.to_string())
                .or_default()
                .push(tensor.clone());
        }
        for names in shards.values_mut() {
            names.sort();
        }
        // Check every shard exists before reading any, so that a missing one is
        // reported at once rather than after the others were parsed.
        for (shard, names) in &shards {
            if !dir.join(shard).is_file() {
                return Err(ConvertError::MissingShard {
                    index: index_path.into(),
                    shard: shard.clone(),
                    tensor: names[0].clone(),
                });
            }
        }
        let mut files = Vec::new();
        let mut tensors = Vec::new();
        for (shard, names) in &shards {
            let (file, header) = read_header(&dir.join(shard), shard)?;
            files.push(file);
            let idx = files.len() - 1;
            for name in names {
                if header.info(name).is_none() {
                    return Err(ConvertError::TensorNotInShard {
                        index: index_path.into(),
                        shard: shard.clone(),
                        tensor: name.clone(),
                    });
                }
            }
            add_tensors(&files[idx], idx, &header, Some(names), &mut tensors)?;
        }
        Ok(Self::finish(
            dir,
            files,
            tensors,
            Some(INDEX_FILE.to_string()),
        ))
    }

    fn finish(
        dir: &Path,
        files: Vec<SourceFile>,
        mut tensors: Vec<SourceTensor>,
        index_file: Option<String>,
    ) -> Self {
        tensors.sort_by_key(|t| (t.file, t.start));
        let by_name = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Checkpoint {
            dir: dir.into(),
            files,
            tensors,
            by_name,
            index_file,
        }
    }

    pub fn get(&self, name: &str) -> Option<&SourceTensor> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// Every file the checkpoint's weights come from, the index first.
    pub fn weight_files(&self) -> Vec<String> {
        self.index_file
            .iter()
            .cloned()
            .chain(self.files.iter().map(|f| f.rel.clone()))
            .collect()
    }
}

/// Reads the 8-byte length and the JSON header (never the data) and checks that
/// every tensor's bytes lie inside the file.
fn read_header(path: &Path, rel: &str) -> Result<(SourceFile, Metadata)> {
    let bad = |detail: String| ConvertError::Safetensors {
        path: path.into(),
        detail,
    };
    let mut f = File::open(path).map_err(|e| ConvertError::io(path, e))?;
    let size = f.metadata().map_err(|e| ConvertError::io(path, e))?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| bad(format!("{size} bytes is too short for a header")))?;
    let n = u64::from_le_bytes(len);
    // Same bound as the safetensors crate.
    if n > 100_000_000 {
        return Err(bad(format!("header length {n} is implausible")));
    }
    if 8 + n > size {
        return Err(bad(format!(
            "header of {n} bytes runs past the end of the {size}-byte file (truncated?)"
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .map_err(|e| ConvertError::io(path, e))?;
    let meta: Metadata =
        serde_json::from_slice(&header).map_err(|e| bad(format!("bad header: {e}")))?;
    let data_start = 8 + n;
    let file = SourceFile {
        rel: rel.to_string(),
        path: path.into(),
        size,
        data_start,
    };
    // Metadata's own validation makes offsets contiguous from 0, so checking the
    // last tensor against the file size covers them all; name the first that spills.
    for name in meta.offset_keys() {
        let info = meta.info(&name).expect("offset_keys come from the map");
        let (_, end) = byte_range(&file, &name, info)?;
        if end > size {
            return Err(ConvertError::Truncated {
                path: path.into(),
                tensor: name,
                needed: end,
                actual: size,
            });
        }
    }
    Ok((file, meta))
}

/// A tensor's absolute byte range in its file: the header's `data_offsets` past
/// the data start. A hostile header can declare offsets near 2^64 (the
/// safetensors crate only checks that they are contiguous and match the shapes),
/// so the addition is checked and an overflow names the tensor.
fn byte_range(file: &SourceFile, name: &str, info: &TensorInfo) -> Result<(u64, u64)> {
    let (begin, end) = info.data_offsets;
    let abs = |off: usize| file.data_start.checked_add(u64::try_from(off).ok()?);
    match (abs(begin), abs(end)) {
        (Some(s), Some(e)) => Ok((s, e)),
        _ => Err(ConvertError::Safetensors {
            path: file.path.clone(),
            detail: format!(
                "tensor `{name}`: data offsets [{begin}, {end}] past the data start (byte {}) \
                 overflow a 64-bit file offset",
                file.data_start
            ),
        }),
    }
}

fn add_tensors(
    file: &SourceFile,
    idx: usize,
    meta: &Metadata,
    only: Option<&Vec<String>>,
    out: &mut Vec<SourceTensor>,
) -> Result<()> {
    let names: Vec<String> = match only {
        Some(names) => names.clone(),
        None => meta.offset_keys(),
    };
    for name in names {
        let info = meta.info(&name).expect("checked by the caller");
        let dtype = match info.dtype {
            Dtype::F32 => Ok(SourceDtype::F32),
            Dtype::F16 => Ok(SourceDtype::F16),
            Dtype::BF16 => Ok(SourceDtype::BF16),
            other => Err(format!("{other:?}")),
        };
        let (start, end) = byte_range(file, &name, info)?;
        out.push(SourceTensor {
            name,
            file: idx,
            dtype,
            shape: info.shape.clone(),
            start,
            end,
        });
    }
    Ok(())
}

/// Positioned reads of one file, shared by worker threads without a seek position.
pub struct Reader {
    file: File,
    path: PathBuf,
}

impl Reader {
    pub fn open(path: &Path) -> Result<Self> {
        Ok(Reader {
            file: File::open(path).map_err(|e| ConvertError::io(path, e))?,
            path: path.into(),
        })
    }

    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                ConvertError::Safetensors {
                    path: self.path.clone(),
                    detail: format!(
                        "file shrank while being read (EOF before byte {})",
                        offset + buf.len() as u64
                    ),
                }
            } else {
                ConvertError::io(&self.path, e)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_past_2_pow_64_are_an_error_naming_the_tensor() {
        let file = SourceFile {
            rel: "model.safetensors".into(),
            path: "ckpt/model.safetensors".into(),
            size: 1 << 20,
            data_start: 1000,
        };
        let info = TensorInfo {
            dtype: Dtype::U8,
            shape: vec![16],
            data_offsets: (usize::MAX - 16, usize::MAX),
        };
        let e = byte_range(&file, "lm_head.weight", &info)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ckpt/model.safetensors"), "{e}");
        assert!(e.contains("`lm_head.weight`"), "{e}");
        assert!(e.contains("overflow"), "{e}");
        let ok = TensorInfo {
            data_offsets: (16, 32),
            ..info
        };
        assert_eq!(byte_range(&file, "x", &ok).unwrap(), (1016, 1032));
    }
}
