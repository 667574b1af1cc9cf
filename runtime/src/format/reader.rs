use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use mipha_kernels::QuantType;
use rayon::prelude::*;

use super::raw::{self, tag, Preamble, MAX_NDIM, PREAMBLE_LEN};
use super::{MetaValue, Metadata, DATA_ALIGN, MAGIC, TENSOR_ALIGN, VERSION_MAJOR, VERSION_MINOR};
use crate::error::{Error, Result};

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

impl TensorRef<'_> {
    /// The bytes of row `r` (`row_stride` long, block padding included).
    pub fn row(&self, r: usize) -> Option<&[u8]> {
        let stride = self.info.row_stride as usize;
        let start = r.checked_mul(stride)?;
        self.data.get(start..start.checked_add(stride)?)
    }
}

/// An opened, structurally validated `.mqf` file, mapped with `memmap2`.
///
/// The mapping assumes nobody modifies the file while it is open (the writer never
/// does: it replaces files by renaming). Truncating a mapped file under a reader makes
/// accesses fault, as with any mmap-based loader.
pub struct MqfFile {
    path: PathBuf,
    mmap: Mmap,
    version: (u16, u16),
    metadata: Metadata,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    data_offset: u64,
}

fn corrupt(path: &Path, detail: impl Into<String>) -> Error {
    Error::Corrupt {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

/// Names what a file that lacks our magic looks like.
fn identify_foreign(head: &[u8], file_len: u64) -> String {
    if head.is_empty() {
        return "empty file".to_string();
    }
    if head.starts_with(b"GGUF") {
        let version = head
            .get(4..8)
            .map(|v| format!(" version {}", u32::from_le_bytes(v.try_into().unwrap())))
            .unwrap_or_default();
        return format!(
            "it is a GGUF file{version} (llama.cpp's format); .mqf files are made by mipha-convert"
        );
    }
    if let (Some(n), Some(b'{')) = (head.get(..8), head.get(8)) {
        let n = u64::from_le_bytes(n.try_into().unwrap());
        if n.checked_add(8).is_some_and(|end| end <= file_len) {
            return format!(
                "it is a safetensors file ({n}-byte JSON header); convert the checkpoint with mipha-convert"
            );
        }
    }
    let shown = &head[..head.len().min(8)];
    let hex: Vec<String> = shown.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "unknown magic {} (\"{}\"), expected \"MIPHAMQF\"",
        hex.join(" "),
        shown.escape_ascii()
    )
}

/// Bounds-checked little-endian reads over the header.
struct Cursor<'a> {
    path: &'a Path,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn err(&self, detail: impl std::fmt::Display) -> Error {
        corrupt(self.path, format!("header byte {}: {detail}", self.pos))
    }

    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        let left = self.buf.len() - self.pos;
        match usize::try_from(n).ok().filter(|&n| n <= left) {
            Some(n) => {
                let s = &self.buf[self.pos..self.pos + n];
                self.pos += n;
                Ok(s)
            }
            None => Err(self.err(format_args!(
                "{} needs {n} bytes, only {left} left in the header",
                what()
            ))),
        }
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        Ok(self.take(N as u64, what)?.try_into().unwrap())
    }
    fn u8(&mut self, what: &dyn Fn() -> String) -> Result<u8> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }
    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// u32 length + non-empty UTF-8.
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let len = self.u32(&|| format!("{} length", what()))?;
        if len == 0 {
            return Err(self.err(format_args!("{} is empty", what())));
        }
        let bytes = self.take(len.into(), what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| self.err(format_args!("{} is not valid UTF-8", what())))
    }
}

/// Decodes a fixed-size value (`bytes` has exactly `raw::fixed_size(t)` bytes).
fn fixed_value(t: u8, b: &[u8]) -> std::result::Result<MetaValue, String> {
    let arr = |n: usize| b.get(..n).ok_or_else(|| "value too short".to_string());
    Ok(match t {
        tag::U8 => MetaValue::U8(arr(1)?[0]),
        tag::BOOL => match arr(1)?[0] {
            0 => MetaValue::Bool(false),
            1 => MetaValue::Bool(true),
            other => return Err(format!("bool byte is {other}, not 0 or 1")),
        },
        tag::I32 => MetaValue::I32(i32::from_le_bytes(arr(4)?.try_into().unwrap())),
        tag::U32 => MetaValue::U32(u32::from_le_bytes(arr(4)?.try_into().unwrap())),
        tag::F32 => MetaValue::F32(f32::from_le_bytes(arr(4)?.try_into().unwrap())),
        tag::I64 => MetaValue::I64(i64::from_le_bytes(arr(8)?.try_into().unwrap())),
        tag::U64 => MetaValue::U64(u64::from_le_bytes(arr(8)?.try_into().unwrap())),
        tag::F64 => MetaValue::F64(f64::from_le_bytes(arr(8)?.try_into().unwrap())),
        other => return Err(format!("type tag {other} is not a fixed-size type")),
    })
}

/// What became of one metadata value.
enum Decoded {
    Value(MetaValue),
    /// A type tag this build does not know, in a file of a newer minor.
    Skipped,
}

/// Decodes a value of known tag `t` from exactly its `value_len` bytes.
fn decode_value(t: u8, v: &[u8], newer_minor: bool) -> std::result::Result<Decoded, String> {
    if let Some(size) = raw::fixed_size(t) {
        if v.len() != size {
            return Err(format!(
                "value_len is {}, type tag {t} needs {size}",
                v.len()
            ));
        }
        return fixed_value(t, v).map(Decoded::Value);
    }
    match t {
        tag::STR => String::from_utf8(v.to_vec())
            .map(|s| Decoded::Value(MetaValue::Str(s)))
            .map_err(|_| "string value is not valid UTF-8".to_string()),
        tag::BYTES => Ok(Decoded::Value(MetaValue::Bytes(v.to_vec()))),
        tag::ARRAY => decode_array(v, newer_minor),
        _ => Err(format!("unknown type tag {t}")),
    }
}

fn decode_array(v: &[u8], newer_minor: bool) -> std::result::Result<Decoded, String> {
    let (&et, rest) = v
        .split_first()
        .ok_or("array value is missing its element tag")?;
    let (count, mut body) = match rest.split_first_chunk::<8>() {
        Some((c, body)) => (u64::from_le_bytes(*c), body),
        None => return Err("array value is missing its element count".to_string()),
    };
    if et == tag::ARRAY {
        return Err("arrays of arrays are not allowed".to_string());
    }
    if !raw::is_known_tag(et) {
        return if newer_minor {
            Ok(Decoded::Skipped)
        } else {
            Err(format!("array of unknown element type tag {et}"))
        };
    }
    let mut items = Vec::new();
    if let Some(size) = raw::fixed_size(et) {
        let need = count.checked_mul(size as u64);
        if need != Some(body.len() as u64) {
            return Err(format!(
                "array of {count} elements of tag {et} needs {} bytes, value has {}",
                need.map_or("more than 2^64".to_string(), |n| n.to_string()),
                body.len()
            ));
        }
        for chunk in body.chunks_exact(size) {
            items.push(fixed_value(et, chunk)?);
        }
    } else {
        // Every element has at least its 8-byte length; checking this first keeps a
        // hostile count from driving a huge loop or allocation.
        if count > (body.len() / 8) as u64 {
            return Err(format!(
                "array of {count} elements cannot fit in {} bytes",
                body.len()
            ));
        }
        for i in 0..count {
            let Some((len, after)) = body.split_first_chunk::<8>() else {
                return Err(format!("array element {i}: missing length"));
            };
            let len = u64::from_le_bytes(*len);
            let Some(bytes) = usize::try_from(len).ok().and_then(|l| after.get(..l)) else {
                return Err(format!(
                    "array element {i}: length {len} runs past the value"
                ));
            };
            body = &after[bytes.len()..];
            items.push(if et == tag::STR {
                MetaValue::Str(
                    String::from_utf8(bytes.to_vec())
                        .map_err(|_| format!("array element {i} is not valid UTF-8"))?,
                )
            } else {
                MetaValue::Bytes(bytes.to_vec())
            });
        }
        if !body.is_empty() {
            return Err(format!(
                "{} bytes left over after the array's {count} elements",
                body.len()
            ));
        }
    }
    Ok(Decoded::Value(MetaValue::Array(items)))
}

fn parse_metadata(c: &mut Cursor, newer_minor: bool) -> Result<Metadata> {
    let count = c.u64(&|| "metadata count".to_string())?;
    let mut md = Metadata::default();
    let mut keys = HashSet::new();
    // No preallocation from `count`: each entry consumes at least 14 header bytes,
    // so a hostile count fails at the header's end instead of allocating.
    for i in 0..count {
        let entry_pos = c.pos;
        let key = c.string(&|| format!("metadata entry {i} key"))?;
        let what = || format!("metadata `{key}`");
        let t = c.u8(&|| format!("{} type tag", what()))?;
        let value_len = c.u64(&|| format!("{} value length", what()))?;
        let value = c.take(value_len, &|| format!("{} value", what()))?;
        if !keys.insert(key.clone()) {
            c.pos = entry_pos;
            return Err(c.err(format_args!("duplicate metadata key `{key}`")));
        }
        if !raw::is_known_tag(t) && !newer_minor {
            c.pos = entry_pos;
            return Err(c.err(format_args!(
                "metadata `{key}` has unknown type tag {t} (the file's minor version is not newer than this reader's)"
            )));
        }
        match decode_value(t, value, newer_minor) {
            Ok(Decoded::Value(v)) => md.entries.push((key, v)),
            Ok(Decoded::Skipped) => {}
            Err(_) if !raw::is_known_tag(t) => {}
            Err(e) => {
                c.pos = entry_pos;
                return Err(c.err(format_args!("metadata `{key}`: {e}")));
            }
        }
    }
    Ok(md)
}

/// Parses and validates the tensor index against a data section of `data_len` bytes.
fn parse_tensors(c: &mut Cursor, data_len: u64) -> Result<Vec<TensorInfo>> {
    let path = c.path;
    let count = c.u64(&|| "tensor count".to_string())?;
    let mut tensors: Vec<TensorInfo> = Vec::new();
    let mut names = HashSet::new();
    for i in 0..count {
        let name = c.string(&|| format!("tensor entry {i} name"))?;
        let what = |field: &str| format!("tensor `{name}` {field}");
        let id = c.u32(&|| what("quant type id"))?;
        let ndim = c.u32(&|| what("ndim"))?;
        if ndim == 0 || ndim as usize > MAX_NDIM {
            return Err(c.err(format_args!(
                "tensor `{name}` has {ndim} dims (allowed: 1 to {MAX_NDIM})"
            )));
        }
        let mut shape = Vec::with_capacity(ndim as usize);
        for d in 0..ndim {
            shape.push(c.u64(&|| what(&format!("dim {d}")))?);
        }
        let row_stride = c.u64(&|| what("row_stride"))?;
        let offset = c.u64(&|| what("offset"))?;
        let len = c.u64(&|| what("byte length"))?;
        let checksum = c.u64(&|| what("checksum"))?;

        let bad = |detail: String| corrupt(path, format!("tensor `{name}`: {detail}"));
        if !names.insert(name.clone()) {
            return Err(bad("duplicate tensor name".to_string()));
        }
        let ty = QuantType::from_id(id).ok_or_else(|| Error::UnknownQuantType {
            path: path.to_path_buf(),
            tensor: name.clone(),
            id,
        })?;
        if shape.contains(&0) {
            return Err(bad(format!("shape {shape:?} has a zero dim")));
        }
        let numel = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        if numel.and_then(|n| usize::try_from(n).ok()).is_none() {
            return Err(bad(format!("shape {shape:?} overflows")));
        }
        let cols = *shape.last().unwrap_or(&1);
        let rows: u64 = shape[..shape.len() - 1].iter().product();
        let expected_stride = raw::checked_row_bytes(ty, cols)
            .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
        if row_stride != expected_stride {
            return Err(bad(format!(
                "row_stride is {row_stride}, but a {ty} row of {cols} columns takes {expected_stride} bytes"
            )));
        }
        let expected_len = rows.checked_mul(row_stride);
        if expected_len != Some(len) {
            return Err(bad(format!(
                "byte length is {len}, expected {rows} rows x {row_stride} bytes"
            )));
        }
        if offset % TENSOR_ALIGN != 0 {
            return Err(bad(format!(
                "offset {offset} is not a multiple of {TENSOR_ALIGN}"
            )));
        }
        match offset.checked_add(len) {
            Some(end) if end <= data_len => {}
            _ => {
                return Err(bad(format!(
                    "bytes [{offset}, {offset} + {len}) run past the end of the data section ({data_len} bytes)"
                )))
            }
        }
        tensors.push(TensorInfo {
            name,
            ty,
            shape,
            row_stride,
            offset,
            len,
            checksum,
        });
    }

    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| tensors[i].offset);
    // Tracking the tensor reaching furthest catches overlaps with any earlier one,
    // not just the neighbour.
    let mut furthest: Option<usize> = None;
    for &i in &order {
        let t = &tensors[i];
        if let Some(f) = furthest {
            let ft = &tensors[f];
            let f_end = ft.offset + ft.len;
            if t.offset < f_end {
                return Err(corrupt(
                    path,
                    format!(
                        "tensors `{}` (bytes {}..{}) and `{}` (bytes {}..{}) overlap",
                        ft.name,
                        ft.offset,
                        f_end,
                        t.name,
                        t.offset,
                        t.offset + t.len
                    ),
                ));
            }
            if t.offset + t.len <= f_end {
                continue;
            }
        }
        furthest = Some(i);
    }
    Ok(tensors)
}

impl MqfFile {
    /// Maps and validates the preamble, header checksum, metadata and tensor index
    /// (every offset, length and shape) before any tensor byte is touched.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let io = |e| Error::io(&path, e);
        let file = File::open(&path).map_err(io)?;
        let actual_len = file.metadata().map_err(io)?.len();

        let mut head = Vec::with_capacity(PREAMBLE_LEN);
        (&file)
            .take(PREAMBLE_LEN as u64)
            .read_to_end(&mut head)
            .map_err(io)?;
        let is_magic_prefix =
            !head.is_empty() && head.len() < MAGIC.len() && MAGIC.starts_with(&head);
        if !head.starts_with(&MAGIC) && !is_magic_prefix {
            return Err(Error::NotMqf {
                detail: identify_foreign(&head, actual_len),
                path,
            });
        }
        let Some(p) = Preamble::decode(&head) else {
            return Err(corrupt(
                &path,
                format!(
                    "truncated: the file is {actual_len} bytes, shorter than the {PREAMBLE_LEN}-byte preamble"
                ),
            ));
        };
        if p.bom == raw::BOM_SWAPPED {
            return Err(Error::Unsupported {
                path,
                detail: "big-endian file (byte-order mark reads 0x04030201); only little-endian .mqf files are supported".to_string(),
            });
        }
        if p.bom != raw::BOM {
            return Err(corrupt(
                &path,
                format!(
                    "bad byte-order mark {:#010x} (expected {:#010x})",
                    p.bom,
                    raw::BOM
                ),
            ));
        }
        if p.major > VERSION_MAJOR {
            return Err(Error::UnsupportedVersion {
                path,
                major: p.major,
                minor: p.minor,
                supported: VERSION_MAJOR,
            });
        }
        if p.major == 0 {
            return Err(corrupt(
                &path,
                format!("version {}.{} does not exist", p.major, p.minor),
            ));
        }
        if p.file_len != actual_len {
            let what = if actual_len < p.file_len {
                "truncated"
            } else {
                "trailing bytes"
            };
            return Err(corrupt(
                &path,
                format!("{what}: expected {} bytes, found {actual_len}", p.file_len),
            ));
        }
        let header_end = (PREAMBLE_LEN as u64).checked_add(p.header_len);
        let fits = header_end.is_some_and(|e| e <= p.data_offset) && p.data_offset <= actual_len;
        if !fits {
            return Err(corrupt(
                &path,
                format!(
                    "header of {} bytes and data offset {} do not fit in a file of {actual_len} bytes",
                    p.header_len, p.data_offset
                ),
            ));
        }
        if p.data_offset % DATA_ALIGN != 0 {
            return Err(corrupt(
                &path,
                format!(
                    "data offset {} is not a multiple of {DATA_ALIGN}",
                    p.data_offset
                ),
            ));
        }

        // SAFETY: the mapping is read-only and the format's writers never modify a
        // file in place (they rename a new one over it); see the type's docs.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        if mmap.len() as u64 != actual_len {
            return Err(corrupt(&path, "the file changed size while being opened"));
        }
        // Both bounds were checked against the file length above.
        let header = &mmap[PREAMBLE_LEN..PREAMBLE_LEN + p.header_len as usize];
        let sum = raw::checksum(header);
        if sum != p.header_checksum {
            return Err(corrupt(
                &path,
                format!(
                    "header checksum mismatch (stored {:#018x}, computed {sum:#018x})",
                    p.header_checksum
                ),
            ));
        }

        let newer_minor = p.major == VERSION_MAJOR && p.minor > VERSION_MINOR;
        let mut c = Cursor {
            path: &path,
            buf: header,
            pos: 0,
        };
        let metadata = parse_metadata(&mut c, newer_minor)?;
        let tensors = parse_tensors(&mut c, actual_len - p.data_offset)?;
        if c.pos != header.len() && !newer_minor {
            return Err(c.err(format_args!(
                "{} unexpected bytes after the tensor index",
                header.len() - c.pos
            )));
        }
        let by_name = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(MqfFile {
            path,
            mmap,
            version: (p.major, p.minor),
            metadata,
            tensors,
            by_name,
            data_offset: p.data_offset,
        })
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn version(&self) -> (u16, u16) {
        self.version
    }
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }
    pub fn tensor(&self, name: &str) -> Result<TensorRef<'_>> {
        let &i = self
            .by_name
            .get(name)
            .ok_or_else(|| Error::MissingTensor(name.to_string()))?;
        self.tensor_at(i)
    }
    /// The tensor at position `index` of the index (`tensors()[index]`).
    pub fn tensor_at(&self, index: usize) -> Result<TensorRef<'_>> {
        let info = self
            .tensors
            .get(index)
            .ok_or_else(|| Error::MissingTensor(format!("#{index}")))?;
        let data = self.bytes_of(info).ok_or_else(|| {
            corrupt(
                &self.path,
                format!("tensor `{}` lies outside the file", info.name),
            )
        })?;
        Ok(TensorRef { info, data })
    }
    /// Whether the file has a tensor of that name.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }
    /// Checks every tensor's checksum; the error names the first bad tensor.
    pub fn verify(&self) -> Result<()> {
        let bad = self.tensors.par_iter().find_map_first(|t| {
            let computed = self.bytes_of(t).map_or(!t.checksum, raw::checksum);
            (computed != t.checksum).then_some((t, computed))
        });
        match bad {
            None => Ok(()),
            Some((t, computed)) => Err(Error::TensorChecksum {
                path: self.path.clone(),
                tensor: t.name.clone(),
                stored: t.checksum,
                computed,
            }),
        }
    }
    /// Checks one tensor's checksum (for callers that verify lazily, per tensor).
    pub fn verify_tensor(&self, name: &str) -> Result<()> {
        let t = self.tensor(name)?;
        let computed = raw::checksum(t.data);
        if computed != t.info.checksum {
            return Err(Error::TensorChecksum {
                path: self.path.clone(),
                tensor: t.info.name.clone(),
                stored: t.info.checksum,
                computed,
            });
        }
        Ok(())
    }
    /// File size in bytes.
    pub fn file_size(&self) -> u64 {
        self.mmap.len() as u64
    }
    /// Drops the resident pages of `data` (a slice of this file's map) from this
    /// process: they are re-read from the file if touched again. For tensors
    /// copied into another layout at load, so the file's copy does not count
    /// twice in memory. Only whole pages inside `data` are released.
    pub fn release(&self, data: &[u8]) {
        #[cfg(unix)]
        {
            let base = self.mmap.as_ptr() as usize;
            let start = data.as_ptr() as usize;
            if start < base || start + data.len() > base + self.mmap.len() {
                return;
            }
            let page = 4096;
            let lo = (start - base).div_ceil(page) * page;
            let hi = (start - base + data.len()) / page * page;
            if hi > lo {
                // SAFETY: the map is read-only and private, never written, so its
                // pages are clean copies of the file: dropping them only means they
                // are read again on the next access.
                let _ = unsafe {
                    self.mmap.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        lo,
                        hi - lo,
                    )
                };
            }
        }
        #[cfg(not(unix))]
        let _ = data;
    }

    /// Absolute file offset of the data section (a multiple of 4096).
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    fn bytes_of(&self, t: &TensorInfo) -> Option<&[u8]> {
        let start = usize::try_from(self.data_offset.checked_add(t.offset)?).ok()?;
        let end = start.checked_add(usize::try_from(t.len).ok()?)?;
        self.mmap.get(start..end)
    }
}

impl std::fmt::Debug for MqfFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqfFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_entries", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("file_size", &self.file_size())
            .finish()
    }
}
