//! Storage types of weights and their block layouts.
//!
//! The ids of [`QuantType`] are written into `.mqf` files: an id is never reused
//! for another layout, even after a type is retired.

use bytemuck::{Pod, Zeroable};
use half::{bf16, f16};

/// Elements in one Q8_0 / Q4_0 block.
pub const QK: usize = 32;

/// Q8_0: 32 weights = f16 scale `d` + 32 signed bytes; weight = d * q.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; QK],
}

/// Q4_0: 32 weights = f16 scale `d` + 16 bytes of nibbles; weight = d * (q - 8).
/// Low nibble of byte j is element j, high nibble is element j + 16 (ggml's order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; QK / 2],
}

const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);
const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);
const _: () = assert!(std::mem::align_of::<BlockQ8_0>() == 2);
const _: () = assert!(std::mem::align_of::<BlockQ4_0>() == 2);

/// Per-tensor storage type. The discriminant is the id stored in `.mqf` files.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantType {
    F32 = 0,
    F16 = 1,
    BF16 = 2,
    Q8_0 = 8,
    Q4_0 = 9,
}

impl QuantType {
    pub const ALL: [QuantType; 5] = [
        QuantType::F32,
        QuantType::F16,
        QuantType::BF16,
        QuantType::Q8_0,
        QuantType::Q4_0,
    ];

    pub fn id(self) -> u32 {
        self as u32
    }

    /// `None` for an id this build does not know (a newer writer, or a corrupt file).
    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.id() == id)
    }

    pub fn name(self) -> &'static str {
        match self {
            QuantType::F32 => "f32",
            QuantType::F16 => "f16",
            QuantType::BF16 => "bf16",
            QuantType::Q8_0 => "q8_0",
            QuantType::Q4_0 => "q4_0",
        }
    }

    /// Accepts the names printed by [`QuantType::name`], case-insensitively.
    pub fn from_name(name: &str) -> Option<Self> {
        let lower = name.to_ascii_lowercase();
        Self::ALL.into_iter().find(|t| t.name() == lower)
    }

    /// Elements per block (1 for plain floats).
    pub fn block_elems(self) -> usize {
        match self {
            QuantType::F32 | QuantType::F16 | QuantType::BF16 => 1,
            QuantType::Q8_0 | QuantType::Q4_0 => QK,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            QuantType::F32 => 4,
            QuantType::F16 | QuantType::BF16 => 2,
            QuantType::Q8_0 => std::mem::size_of::<BlockQ8_0>(),
            QuantType::Q4_0 => std::mem::size_of::<BlockQ4_0>(),
        }
    }

    pub fn is_block_quantized(self) -> bool {
        self.block_elems() > 1
    }

    /// Stored row width in elements: the logical width rounded up to whole blocks
    /// (the padding holds zeros).
    pub fn stored_cols(self, logical_cols: usize) -> usize {
        logical_cols.div_ceil(self.block_elems()) * self.block_elems()
    }

    /// Bytes of one stored row of `logical_cols` elements.
    pub fn row_bytes(self, logical_cols: usize) -> usize {
        self.stored_cols(logical_cols) / self.block_elems() * self.block_bytes()
    }
}

impl std::fmt::Display for QuantType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Q8_0 block of 32 values, ggml's rule: d = max|x| / 127, q = round(x / d).
pub fn quantize_block_q8_0(x: &[f32; QK]) -> BlockQ8_0 {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; QK];
    for (q, v) in qs.iter_mut().zip(x) {
        *q = (v * id).round() as i8;
    }
    BlockQ8_0 {
        d: f16::from_f32(d),
        qs,
    }
}

/// Q4_0 block of 32 values, ggml's rule: m = the signed element of largest magnitude
/// (first on ties), d = m / -8, q = min(15, trunc(x / d + 8.5)).
pub fn quantize_block_q4_0(x: &[f32; QK]) -> BlockQ4_0 {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0u8; QK / 2];
    for j in 0..QK / 2 {
        let q0 = ((x[j] * id + 8.5) as u8).min(15);
        let q1 = ((x[j + QK / 2] * id + 8.5) as u8).min(15);
        qs[j] = q0 | (q1 << 4);
    }
    BlockQ4_0 {
        d: f16::from_f32(d),
        qs,
    }
}

pub fn dequantize_block_q8_0(b: &BlockQ8_0, out: &mut [f32; QK]) {
    let d = b.d.to_f32();
    for (o, &q) in out.iter_mut().zip(&b.qs) {
        *o = d * q as f32;
    }
}

pub fn dequantize_block_q4_0(b: &BlockQ4_0, out: &mut [f32; QK]) {
    let d = b.d.to_f32();
    for j in 0..QK / 2 {
        out[j] = d * ((b.qs[j] & 0x0f) as i32 - 8) as f32;
        out[j + QK / 2] = d * ((b.qs[j] >> 4) as i32 - 8) as f32;
    }
}

/// Encodes one logical row into its stored bytes (`ty.row_bytes(src.len())` long),
/// zero-padding the last block.
pub fn quantize_row(ty: QuantType, src: &[f32], dst: &mut [u8]) {
    assert_eq!(
        dst.len(),
        ty.row_bytes(src.len()),
        "quantize_row: wrong destination length"
    );
    match ty {
        QuantType::F32 => dst.copy_from_slice(bytemuck::cast_slice(src)),
        QuantType::F16 => {
            for (c, v) in dst.chunks_exact_mut(2).zip(src) {
                c.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
            }
        }
        QuantType::BF16 => {
            for (c, v) in dst.chunks_exact_mut(2).zip(src) {
                c.copy_from_slice(&bf16::from_f32(*v).to_le_bytes());
            }
        }
        QuantType::Q8_0 | QuantType::Q4_0 => {
            let bb = ty.block_bytes();
            for (i, out) in dst.chunks_exact_mut(bb).enumerate() {
                let mut block = [0.0f32; QK];
                let start = i * QK;
                let end = (start + QK).min(src.len());
                block[..end - start].copy_from_slice(&src[start..end]);
                if ty == QuantType::Q8_0 {
                    out.copy_from_slice(bytemuck::bytes_of(&quantize_block_q8_0(&block)));
                } else {
                    out.copy_from_slice(bytemuck::bytes_of(&quantize_block_q4_0(&block)));
                }
            }
        }
    }
}

/// Decodes the first `dst.len()` logical elements of one stored row.
pub fn dequantize_row(ty: QuantType, src: &[u8], dst: &mut [f32]) {
    assert!(
        src.len() >= ty.row_bytes(dst.len()),
        "dequantize_row: source row too short"
    );
    match ty {
        QuantType::F32 => {
            for (o, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        QuantType::F16 => {
            for (o, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        QuantType::BF16 => {
            for (o, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        QuantType::Q8_0 | QuantType::Q4_0 => {
            let bb = ty.block_bytes();
            let mut tmp = [0.0f32; QK];
            for (i, chunk) in dst.chunks_mut(QK).enumerate() {
                let raw = &src[i * bb..(i + 1) * bb];
                if ty == QuantType::Q8_0 {
                    dequantize_block_q8_0(&bytemuck::pod_read_unaligned(raw), &mut tmp);
                } else {
                    dequantize_block_q4_0(&bytemuck::pod_read_unaligned(raw), &mut tmp);
                }
                chunk.copy_from_slice(&tmp[..chunk.len()]);
            }
        }
    }
}

/// Activations quantized on the fly for the integer matmuls: one f32 scale per
/// 32-block (`d = max|x| / 127`, `q = round(x / d)`, so `q` stays in -127..=127 and
/// `maddubs` pairs cannot saturate), plus the block's sum of `q`, which turns a
/// dot with Q4_0's unsigned nibbles into the dot with `nibble - 8`.
#[inline]
pub fn quantize_act_block(x: &[f32; QK], q: &mut [i8; QK]) -> (f32, i32) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (o, v) in q.iter_mut().zip(x) {
        // NaN and inf activations saturate instead of wrapping (`as` is saturating).
        *o = (v * id).round() as i8;
        sum += *o as i32;
    }
    (d, sum)
}

/// `x` rounded to BF16 bits as `vcvtne2ps2bf16` rounds (the activations of the
/// BF16 dot): to nearest even; subnormals to zero of the same sign; NaN stays
/// a (quiet) NaN. Branch-free enough for the compiler to vectorize a row of it.
#[inline]
pub fn round_bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let abs = b & 0x7fff_ffff;
    if abs > 0x7f80_0000 {
        ((b >> 16) | 0x0040) as u16
    } else if abs < 0x0080_0000 {
        ((b >> 16) & 0x8000) as u16
    } else {
        (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
    }
}
