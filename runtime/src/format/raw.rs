//! Byte-level encoding shared by the reader and the writer, exposed (hidden from the
//! docs) so tests can craft and patch files the writer would never produce.

use super::{MetaValue, TensorInfo};

/// Size of the fixed preamble; the header starts right after it.
pub const PREAMBLE_LEN: usize = 64;
/// Byte-order mark as written (little-endian) by every writer.
pub const BOM: u32 = 0x0102_0304;
/// What a little-endian reader sees in a big-endian file.
pub const BOM_SWAPPED: u32 = 0x0403_0201;
/// Most dimensions a tensor may have.
pub const MAX_NDIM: usize = 8;

/// Metadata value type tags.
pub mod tag {
    pub const U8: u8 = 0;
    pub const I32: u8 = 1;
    pub const U32: u8 = 2;
    pub const I64: u8 = 3;
    pub const U64: u8 = 4;
    pub const F32: u8 = 5;
    pub const F64: u8 = 6;
    pub const BOOL: u8 = 7;
    pub const STR: u8 = 8;
    pub const BYTES: u8 = 9;
    pub const ARRAY: u8 = 10;
}

/// Byte size of a fixed-size value type, `None` for Str/Bytes/Array/unknown tags.
pub fn fixed_size(t: u8) -> Option<usize> {
    match t {
        tag::U8 | tag::BOOL => Some(1),
        tag::I32 | tag::U32 | tag::F32 => Some(4),
        tag::I64 | tag::U64 | tag::F64 => Some(8),
        _ => None,
    }
}

/// Whether this build knows tag `t`.
pub fn is_known_tag(t: u8) -> bool {
    t <= tag::ARRAY
}

/// The preamble's fields, unvalidated (the magic is implied).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Preamble {
    pub bom: u32,
    pub major: u16,
    pub minor: u16,
    pub header_len: u64,
    pub header_checksum: u64,
    pub data_offset: u64,
    pub file_len: u64,
}

impl Preamble {
    pub fn encode(&self) -> [u8; PREAMBLE_LEN] {
        let mut b = [0u8; PREAMBLE_LEN];
        b[0..8].copy_from_slice(&super::MAGIC);
        b[8..12].copy_from_slice(&self.bom.to_le_bytes());
        b[12..14].copy_from_slice(&self.major.to_le_bytes());
        b[14..16].copy_from_slice(&self.minor.to_le_bytes());
        b[16..24].copy_from_slice(&self.header_len.to_le_bytes());
        b[24..32].copy_from_slice(&self.header_checksum.to_le_bytes());
        b[32..40].copy_from_slice(&self.data_offset.to_le_bytes());
        b[40..48].copy_from_slice(&self.file_len.to_le_bytes());
        b
    }

    /// Decodes the fields of the first 64 bytes; `None` if `b` is shorter.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let b = b.get(..PREAMBLE_LEN)?;
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        Some(Preamble {
            bom: u32_at(8),
            major: u16_at(12),
            minor: u16_at(14),
            header_len: u64_at(16),
            header_checksum: u64_at(24),
            data_offset: u64_at(32),
            file_len: u64_at(40),
        })
    }
}

pub fn checksum(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// Recomputes the header checksum of a whole file image in place, so a test can
/// patch the header and still get past the checksum. Returns false when the
/// preamble's header range is not inside `file`.
pub fn fix_header_checksum(file: &mut [u8]) -> bool {
    let Some(p) = Preamble::decode(file) else {
        return false;
    };
    let Some(end) = usize::try_from(p.header_len)
        .ok()
        .and_then(|l| l.checked_add(PREAMBLE_LEN))
        .filter(|&e| e <= file.len())
    else {
        return false;
    };
    let sum = checksum(&file[PREAMBLE_LEN..end]);
    file[24..32].copy_from_slice(&sum.to_le_bytes());
    true
}

pub fn tag_of(v: &MetaValue) -> u8 {
    match v {
        MetaValue::U8(_) => tag::U8,
        MetaValue::I32(_) => tag::I32,
        MetaValue::U32(_) => tag::U32,
        MetaValue::I64(_) => tag::I64,
        MetaValue::U64(_) => tag::U64,
        MetaValue::F32(_) => tag::F32,
        MetaValue::F64(_) => tag::F64,
        MetaValue::Bool(_) => tag::BOOL,
        MetaValue::Str(_) => tag::STR,
        MetaValue::Bytes(_) => tag::BYTES,
        MetaValue::Array(_) => tag::ARRAY,
    }
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_len(out: &mut Vec<u8>, len: usize) {
    put_u64(out, len as u64);
}

/// Key / tensor name: u32 length + UTF-8. The writer has checked the length fits.
pub fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Encodes a scalar as an array element (Str/Bytes carry their own length).
fn put_element(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::Str(s) => {
            put_len(out, s.len());
            out.extend_from_slice(s.as_bytes());
        }
        MetaValue::Bytes(b) => {
            put_len(out, b.len());
            out.extend_from_slice(b);
        }
        other => put_value(out, other),
    }
}

/// Encodes a value's bytes (without tag or value_len). Arrays are assumed
/// homogeneous and flat (the writer checks).
pub fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(u8::from(*x)),
        MetaValue::Str(s) => out.extend_from_slice(s.as_bytes()),
        MetaValue::Bytes(b) => out.extend_from_slice(b),
        MetaValue::Array(items) => {
            // An empty array has no element to take the type from; U8 is as good as any.
            out.push(items.first().map_or(tag::U8, tag_of));
            put_len(out, items.len());
            for item in items {
                put_element(out, item);
            }
        }
    }
}

/// One metadata entry: key, tag, value_len, value.
pub fn put_entry(out: &mut Vec<u8>, key: &str, v: &MetaValue) {
    put_string(out, key);
    out.push(tag_of(v));
    let len_at = out.len();
    put_u64(out, 0);
    let start = out.len();
    put_value(out, v);
    let value_len = (out.len() - start) as u64;
    out[len_at..len_at + 8].copy_from_slice(&value_len.to_le_bytes());
}

pub fn put_tensor(out: &mut Vec<u8>, t: &TensorInfo) {
    put_string(out, &t.name);
    out.extend_from_slice(&t.ty.id().to_le_bytes());
    out.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
    for &d in &t.shape {
        put_u64(out, d);
    }
    put_u64(out, t.row_stride);
    put_u64(out, t.offset);
    put_u64(out, t.len);
    put_u64(out, t.checksum);
}

/// The complete header: metadata then tensor index.
pub fn encode_header(metadata: &[(String, MetaValue)], tensors: &[TensorInfo]) -> Vec<u8> {
    let mut out = Vec::new();
    put_len(&mut out, metadata.len());
    for (k, v) in metadata {
        put_entry(&mut out, k, v);
    }
    put_len(&mut out, tensors.len());
    for t in tensors {
        put_tensor(&mut out, t);
    }
    out
}

/// Rounds `v` up to a multiple of `align` (a power of two); `None` on overflow.
pub fn align_up(v: u64, align: u64) -> Option<u64> {
    debug_assert!(align.is_power_of_two());
    Some(v.checked_add(align - 1)? & !(align - 1))
}

/// `ty.row_bytes(cols)` without the overflow `QuantType::row_bytes` could hit on
/// hostile shapes.
pub fn checked_row_bytes(ty: mipha_kernels::QuantType, cols: u64) -> Option<u64> {
    let blocks = cols.div_ceil(ty.block_elems() as u64);
    blocks.checked_mul(ty.block_bytes() as u64)
}
