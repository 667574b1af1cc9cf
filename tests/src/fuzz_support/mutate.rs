//! Deterministic mutations of valid inputs: byte-level ones for any input, and
//! structure-aware ones that keep a format's framing valid (lengths, checksums,
//! CRCs) so the damage reaches the checks behind it: `.mqf` metadata values
//! rewritten to boundary values for every key with the header re-encoded and
//! its checksum recomputed, numbers in JSON swapped for huge or negative ones,
//! safetensors headers re-encoded with their length, PNG chunks with their CRC.
//!
//! Every mutation returns the new bytes and a description of what it did, which
//! the replay test prints with a failing case.

use mipha_runtime::format::raw;
use mipha_runtime::{MetaValue, MqfFile, QuantType, TensorInfo};
use serde_json::{json, Value};

use super::rng::Rng;
use super::targets::{self, Bundle, ChatPart, ScratchPath};

/// Bytes plus what was done to them.
pub type Mutated = (Vec<u8>, String);

/// Integers worth trying wherever an integer is read.
pub const INTS: [u64; 16] = [
    0,
    1,
    2,
    3,
    255,
    65535,
    (1 << 31) - 1,
    1 << 31,
    (1 << 32) - 1,
    1 << 32,
    (1 << 32) + 1,
    1 << 53,
    (1 << 53) + 1,
    1 << 63,
    u64::MAX - 1,
    u64::MAX,
];

// ---------------------------------------------------------------- bytes

/// One to four stacked byte-level mutations; `donors` are other inputs of the
/// same kind to splice from.
pub fn bytes(rng: &mut Rng, data: &[u8], donors: &[&[u8]]) -> Mutated {
    let mut out = data.to_vec();
    let mut what = Vec::new();
    for _ in 0..rng.range(1, 4) {
        what.push(byte_op(rng, &mut out, donors));
    }
    (out, what.join(", "))
}

fn byte_op(rng: &mut Rng, out: &mut Vec<u8>, donors: &[&[u8]]) -> String {
    let len = out.len();
    let pos = rng.below(len + 1);
    match rng.below(10) {
        0 if len > 0 => {
            let p = pos.min(len - 1);
            let bit = rng.below(8);
            out[p] ^= 1 << bit;
            format!("flip bit {bit} of byte {p}")
        }
        1 if len > 0 => {
            let p = pos.min(len - 1);
            let r = rng.byte();
            let v = *rng.pick(&[0u8, 1, 0x7f, 0x80, 0xff, r]);
            out[p] = v;
            format!("byte {p} = {v:#04x}")
        }
        2 if len > 0 => {
            let width = *rng.pick(&[2usize, 4, 8]);
            let p = pos.min(len.saturating_sub(width));
            let v = *rng.pick(&INTS);
            let b = v.to_le_bytes();
            let n = width.min(len - p);
            out[p..p + n].copy_from_slice(&b[..n]);
            format!("u{} at {p} = {v}", width * 8)
        }
        3 => {
            let n = rng.range(1, 64);
            let ins = rng.bytes(n);
            out.splice(pos..pos, ins);
            format!("insert {n} random bytes at {pos}")
        }
        4 if len > 0 => {
            let n = rng.size(len - pos.min(len - 1)).max(1);
            let p = pos.min(len - 1);
            let end = (p + n).min(len);
            out.drain(p..end);
            format!("delete bytes {p}..{end}")
        }
        5 => {
            out.truncate(pos);
            format!("truncate to {pos} bytes")
        }
        6 if len > 1 => {
            let a = rng.below(len);
            let b = (a + rng.size(len - a).max(1)).min(len);
            let chunk = out[a..b].to_vec();
            let times = rng.range(1, 8);
            for _ in 0..times {
                out.splice(pos..pos, chunk.iter().copied());
            }
            format!("repeat bytes {a}..{b} x{times} at {pos}")
        }
        7 if !donors.is_empty() => {
            let d = rng.pick(donors);
            let from = rng.below(d.len() + 1);
            out.truncate(pos);
            out.extend_from_slice(&d[from..]);
            format!("splice: bytes from {pos} replaced by a donor's from {from}")
        }
        8 => {
            let n = rng.size(4096).max(1);
            let fill = rng.byte();
            out.extend(std::iter::repeat_n(fill, n));
            format!("append {n} x {fill:#04x}")
        }
        _ if len > 0 => {
            let p = pos.min(len - 1);
            let v = rng.byte();
            out[p] = v;
            format!("byte {p} = {v:#04x}")
        }
        _ => {
            out.push(rng.byte());
            "append a byte".into()
        }
    }
}

// ---------------------------------------------------------------- JSON

/// Numbers worth trying wherever JSON holds a number.
pub fn json_numbers() -> Vec<Value> {
    let mut v: Vec<Value> = INTS.iter().map(|&n| json!(n)).collect();
    v.extend([
        json!(-1),
        json!(-2),
        json!(i64::MIN),
        json!(-(1i64 << 32)),
        json!(0.5),
        json!(-0.5),
        json!(1e-320),
        json!(1e308),
        json!(-1e308),
        json!(2048.0),
        json!(4294967296.0),
        json!(1.5e19),
    ]);
    v
}

fn json_strings(rng: &mut Rng) -> Vec<Value> {
    vec![
        json!(""),
        json!("0"),
        json!("-1"),
        json!("../../../etc/passwd"),
        json!("\u{0}"),
        json!("é".repeat(rng.range(1, 1000))),
        json!("A".repeat(rng.size(1 << 20))),
        json!("<|endoftext|>"),
    ]
}

/// JSON pointers of every node of `v` (the root is "").
pub fn json_paths(v: &Value) -> Vec<String> {
    fn walk(v: &Value, at: String, out: &mut Vec<String>) {
        out.push(at.clone());
        match v {
            Value::Object(m) => {
                for (k, c) in m {
                    let k = k.replace('~', "~0").replace('/', "~1");
                    walk(c, format!("{at}/{k}"), out);
                }
            }
            Value::Array(a) => {
                for (i, c) in a.iter().enumerate() {
                    walk(c, format!("{at}/{i}"), out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(v, String::new(), &mut out);
    out
}

/// Pointers of the numbers in `v`.
pub fn json_number_paths(v: &Value) -> Vec<String> {
    json_paths(v)
        .into_iter()
        .filter(|p| v.pointer(p).is_some_and(Value::is_number))
        .collect()
}

/// Replaces the node at `path` (which exists) with `new`.
pub fn json_set(v: &Value, path: &str, new: Value) -> Value {
    let mut out = v.clone();
    if let Some(slot) = out.pointer_mut(path) {
        *slot = new;
    }
    out
}

/// One structural mutation of a JSON document. `allow(path, new)` may refuse a
/// replacement (the replay test keeps known findings out this way).
pub fn json_value(
    rng: &mut Rng,
    v: &Value,
    allow: &dyn Fn(&str, &Value) -> bool,
) -> (Value, String) {
    let paths = json_paths(v);
    let numbers = json_number_paths(v);
    for _ in 0..16 {
        // Numbers are what the checks are about: pick them half the time.
        let path = if !numbers.is_empty() && rng.chance(1, 2) {
            rng.pick(&numbers).clone()
        } else {
            rng.pick(&paths).clone()
        };
        let node = v.pointer(&path).expect("path from json_paths");
        let (new, what) = json_replacement(rng, node);
        if let Some(new) = new {
            if !allow(&path, &new) {
                continue;
            }
            let short = short(&new);
            return (
                json_set(v, &path, new),
                format!("{path:?}: {what} -> {short}"),
            );
        }
        // Edits of the container itself.
        let mut out = v.clone();
        let slot = out.pointer_mut(&path).expect("path");
        let what = match slot {
            Value::Object(m) if !m.is_empty() && rng.chance(1, 2) => {
                let k = m.keys().nth(rng.below(m.len())).unwrap().clone();
                m.remove(&k);
                format!("{path:?}: remove key {k:?}")
            }
            Value::Object(m) => {
                let n = rng.pick(&json_numbers()).clone();
                m.insert("fuzz_unknown_key".into(), n.clone());
                format!("{path:?}: add key fuzz_unknown_key = {n}")
            }
            Value::Array(a) if !a.is_empty() && rng.chance(1, 2) => {
                let i = rng.below(a.len());
                let times = *rng.pick(&[1usize, 2, 100, 10_000]);
                let item = a[i].clone();
                for _ in 0..times {
                    a.push(item.clone());
                }
                format!("{path:?}: element {i} appended x{times}")
            }
            Value::Array(a) if !a.is_empty() => {
                let i = rng.below(a.len());
                a.remove(i);
                format!("{path:?}: remove element {i}")
            }
            other => {
                let depth = *rng.pick(&[2usize, 64, 127, 129, 1000]);
                let mut inner = other.take();
                for _ in 0..depth {
                    inner = Value::Array(vec![inner]);
                }
                *other = inner;
                format!("{path:?}: wrapped in {depth} arrays")
            }
        };
        return (out, what);
    }
    (v.clone(), "no allowed mutation".into())
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        format!(
            "{}... ({} bytes)",
            &s[..s.char_indices().nth(40).map_or(s.len(), |c| c.0)],
            s.len()
        )
    } else {
        s
    }
}

/// A replacement for a leaf, or `None` to edit a container instead.
fn json_replacement(rng: &mut Rng, node: &Value) -> (Option<Value>, &'static str) {
    match node {
        Value::Number(n) => {
            let new = match rng.below(4) {
                0 | 1 => rng.pick(&json_numbers()).clone(),
                2 => {
                    let x = n.as_f64().unwrap_or(0.0);
                    json!(*rng.pick(&[x + 1.0, x - 1.0, x * 2.0, -x, x * 65536.0, x / 3.0]))
                }
                _ => {
                    let strings = json_strings(rng);
                    let s = rng.pick(&strings).clone();
                    rng.pick(&[s, Value::Null, json!(true), json!([n]), json!({})])
                        .clone()
                }
            };
            (Some(new), "number")
        }
        Value::String(s) => {
            let new = match rng.below(4) {
                0 | 1 => {
                    let strings = json_strings(rng);
                    rng.pick(&strings).clone()
                }
                2 => rng.pick(&json_numbers()).clone(),
                _ => {
                    let mut t = s.clone();
                    if !t.is_empty() {
                        let mut cut = rng.below(t.len());
                        while !t.is_char_boundary(cut) {
                            cut -= 1;
                        }
                        t.truncate(cut);
                    }
                    const TAILS: [&str; 6] = ["", "\u{0}", "x", "/..", "<image>", "\u{fffd}"];
                    let tail = *rng.pick(&TAILS);
                    t.push_str(tail);
                    json!(t)
                }
            };
            (Some(new), "string")
        }
        Value::Bool(b) => (
            Some(
                rng.pick(&[json!(!b), Value::Null, json!(0), json!("true")])
                    .clone(),
            ),
            "bool",
        ),
        Value::Null => (
            Some(
                rng.pick(&[json!(0), json!(""), json!({}), json!([])])
                    .clone(),
            ),
            "null",
        ),
        _ if rng.chance(1, 4) => (
            Some(
                rng.pick(&[Value::Null, json!([]), json!({}), json!(0), json!("")])
                    .clone(),
            ),
            "container",
        ),
        _ => (None, "container"),
    }
}

/// Serialises, compact or pretty.
pub fn json_bytes(rng: &mut Rng, v: &Value) -> Vec<u8> {
    if rng.chance(1, 2) {
        serde_json::to_vec(v).unwrap()
    } else {
        serde_json::to_vec_pretty(v).unwrap()
    }
}

/// A JSON document's bytes mutated: structurally when they parse (mostly),
/// else (or sometimes) byte by byte.
pub fn json_doc(rng: &mut Rng, data: &[u8], allow: &dyn Fn(&str, &Value) -> bool) -> Mutated {
    match serde_json::from_slice::<Value>(data) {
        Ok(v) if !rng.chance(1, 8) => {
            let (v, what) = json_value(rng, &v, allow);
            (json_bytes(rng, &v), what)
        }
        _ => bytes(rng, data, &[]),
    }
}

// ---------------------------------------------------------------- .mqf

/// A `.mqf` file taken apart: version, metadata, tensor index and data section,
/// re-encoded by [`MqfImage::encode`] with a consistent preamble and header
/// checksum whatever the parts hold.
#[derive(Clone, Debug)]
pub struct MqfImage {
    pub major: u16,
    pub minor: u16,
    pub metadata: Vec<(String, MetaValue)>,
    /// Raw metadata entries appended after `metadata` (tags this build lacks).
    pub raw_entries: Vec<Vec<u8>>,
    pub tensors: Vec<TensorInfo>,
    pub data: Vec<u8>,
}

impl MqfImage {
    /// Takes a valid file apart (`None` if the reader refuses it).
    pub fn parse(bytes: &[u8]) -> Option<MqfImage> {
        let tmp = ScratchPath::new("parse.mqf");
        std::fs::write(&tmp.0, bytes).ok()?;
        let f = MqfFile::open(&tmp.0).ok()?;
        let (major, minor) = f.version();
        Some(MqfImage {
            major,
            minor,
            metadata: f.metadata().entries.clone(),
            raw_entries: Vec::new(),
            tensors: f.tensors().to_vec(),
            data: bytes[f.data_offset() as usize..].to_vec(),
        })
    }

    pub fn header(&self) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&((self.metadata.len() + self.raw_entries.len()) as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            raw::put_entry(&mut h, k, v);
        }
        for e in &self.raw_entries {
            h.extend_from_slice(e);
        }
        h.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        for t in &self.tensors {
            raw::put_tensor(&mut h, t);
        }
        h
    }

    pub fn encode(&self) -> Vec<u8> {
        let header = self.header();
        let pre = raw::PREAMBLE_LEN as u64;
        let data_offset =
            raw::align_up(pre + header.len() as u64, mipha_runtime::format::DATA_ALIGN)
                .expect("header size");
        let file_len = data_offset + self.data.len() as u64;
        let p = raw::Preamble {
            bom: raw::BOM,
            major: self.major,
            minor: self.minor,
            header_len: header.len() as u64,
            header_checksum: raw::checksum(&header),
            data_offset,
            file_len,
        };
        let mut out = Vec::with_capacity(file_len as usize);
        out.extend_from_slice(&p.encode());
        out.extend_from_slice(&header);
        out.resize(data_offset as usize, 0);
        out.extend_from_slice(&self.data);
        out
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn set(&mut self, key: &str, v: MetaValue) {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = v,
            None => self.metadata.push((key.to_string(), v)),
        }
    }
}

/// Metadata values worth trying for any key (numbers of every type at their
/// boundaries, NaN and infinities, empty and huge strings, odd arrays).
pub fn meta_boundaries() -> Vec<MetaValue> {
    use MetaValue::*;
    let mut v: Vec<MetaValue> = INTS.iter().map(|&n| U64(n)).collect();
    v.extend([
        I64(-1),
        I64(i64::MIN),
        I64(i64::MAX),
        I32(-1),
        I32(i32::MIN),
        U32(u32::MAX),
        U8(0),
        U8(255),
        F64(f64::NAN),
        F64(f64::INFINITY),
        F64(f64::NEG_INFINITY),
        F64(0.0),
        F64(-0.0),
        F64(-1.0),
        F64(5e-324),
        F64(1e300),
        F32(f32::NAN),
        F32(f32::INFINITY),
        F32(1e-45),
        Bool(true),
        Str(String::new()),
        Str("x".into()),
        Str("\u{0}".into()),
        Str("a".repeat(1 << 20)),
        Bytes(Vec::new()),
        Bytes(vec![0xff; 3]),
        Array(Vec::new()),
        Array(vec![U64(0)]),
        Array(vec![U64(u64::MAX); 3]),
        Array(vec![F64(f64::NAN); 3]),
        Array(vec![I64(-1); 2]),
        Array(vec![Str(String::new()); 2]),
        Array(vec![U64(0); 100_000]),
    ]);
    v
}

/// Type-preserving changes of a value (nearby numbers, the same number in other
/// types, edited strings, arrays with one element replaced, grown or shrunk).
fn meta_nudges(rng: &mut Rng, v: &MetaValue) -> Vec<MetaValue> {
    use MetaValue::*;
    let mut out = Vec::new();
    if let Some(n) = v.as_u64() {
        for m in [
            n.wrapping_sub(1),
            n.wrapping_add(1),
            n.wrapping_mul(2),
            n / 2,
            n.wrapping_mul(n),
            n << 20,
        ] {
            out.push(U64(m));
        }
        out.extend([
            I64(n as i64),
            I64((n as i64).wrapping_neg()),
            U32(n as u32),
            F64(n as f64 + 0.5),
            Str(n.to_string()),
        ]);
    }
    if let Some(x) = v.as_f64() {
        out.extend([
            F64(-x),
            F64(x * 1e300),
            F64(x / 1e300),
            F32(x as f32),
            U64(x.abs() as u64),
        ]);
    }
    match v {
        Str(s) => {
            out.push(Str(s.repeat(rng.range(2, 1000))));
            out.push(Str(s.to_uppercase()));
            out.push(Str(format!("{s}\u{0}")));
            out.push(Bytes(s.as_bytes().to_vec()));
        }
        Array(items) if !items.is_empty() => {
            let i = rng.below(items.len());
            for b in meta_boundaries()
                .into_iter()
                .filter(|b| !matches!(b, Array(_)))
            {
                let mut a = items.clone();
                a[i] = b;
                out.push(Array(a));
            }
            let mut grown = items.clone();
            grown.push(items[i].clone());
            out.push(Array(grown));
            out.push(Array(items[..items.len() - 1].to_vec()));
            out.push(Array(
                items
                    .iter()
                    .cycle()
                    .take(items.len() * 1000)
                    .cloned()
                    .collect(),
            ));
        }
        Bool(b) => out.extend([Bool(!b), U8(2), U64(1)]),
        Bytes(b) => {
            out.push(Bytes(b[..rng.below(b.len() + 1)].to_vec()));
            out.push(Str(String::from_utf8_lossy(b).into_owned()));
        }
        _ => {}
    }
    out
}

/// How many systematic `.mqf` cases there are: every metadata key of `img` times
/// every boundary value (see [`mqf_systematic`]).
pub fn mqf_systematic_count(img: &MqfImage) -> usize {
    img.metadata.len() * meta_boundaries().len()
}

/// Systematic case `i`: metadata key `i / B` rewritten to boundary value
/// `i % B`, the file's structure and checksums kept valid.
pub fn mqf_systematic(img: &MqfImage, i: usize) -> (MqfImage, String) {
    let b = meta_boundaries();
    let (key, _) = &img.metadata[i / b.len() % img.metadata.len()];
    let v = b[i % b.len()].clone();
    let what = format!("metadata `{key}` = {}", describe(&v));
    let mut out = img.clone();
    out.set(&key.clone(), v);
    (out, what)
}

/// A short description of a metadata value.
pub fn describe(v: &MetaValue) -> String {
    match v {
        MetaValue::Str(s) if s.len() > 40 => format!("str of {} bytes", s.len()),
        MetaValue::Bytes(b) if b.len() > 16 => format!("bytes of {}", b.len()),
        MetaValue::Array(a) if a.len() > 4 => format!(
            "array of {} x {}",
            a.len(),
            a.first().map_or("?".into(), |x| x.type_name())
        ),
        other => format!("{other:?}"),
    }
}

/// The tokenizer JSON key of a `.mqf` file.
pub const TOKENIZER_KEY: &str = "tokenizer.huggingface.json";

/// One random structure-aware mutation of a `.mqf` file. `allow_tokenizer(path,
/// new)` filters replacements inside the tokenizer JSON.
pub fn mqf(
    rng: &mut Rng,
    img: &MqfImage,
    allow_tokenizer: &dyn Fn(&str, &Value) -> bool,
) -> (Vec<u8>, String) {
    let mut m = img.clone();
    let what = match rng.below(16) {
        0..=3 => {
            // Any key to any boundary value.
            let i = rng.below(mqf_systematic_count(img));
            let (out, what) = mqf_systematic(img, i);
            m = out;
            what
        }
        4..=6 => {
            let i = rng.below(m.metadata.len());
            let (key, v) = m.metadata[i].clone();
            let nudges = meta_nudges(rng, &v);
            if nudges.is_empty() {
                m.metadata.remove(i);
                format!("remove metadata `{key}`")
            } else {
                let n = rng.pick(&nudges).clone();
                let what = format!("metadata `{key}`: {} -> {}", describe(&v), describe(&n));
                m.metadata[i].1 = n;
                what
            }
        }
        7 => {
            let i = rng.below(m.metadata.len());
            let key = m.metadata.remove(i).0;
            format!("remove metadata `{key}`")
        }
        8 => {
            // Rename a key: to an unknown one, or to another existing one (a duplicate).
            let i = rng.below(m.metadata.len());
            let j = rng.below(m.metadata.len());
            let old = m.metadata[i].0.clone();
            let new = if rng.chance(1, 2) {
                m.metadata[j].0.clone()
            } else {
                format!("{old}.fuzz")
            };
            m.metadata[i].0 = new.clone();
            format!("rename metadata `{old}` to `{new}`")
        }
        9 => tokenizer_json(rng, &mut m, allow_tokenizer),
        10 | 11 => tensor_index(rng, &mut m),
        12 => {
            // An entry of a type tag this build does not know, in a file of a
            // newer minor version or not.
            let tag = rng.range(11, 255) as u8;
            let mut e = Vec::new();
            raw::put_string(&mut e, "fuzz.unknown");
            e.push(tag);
            let n = rng.size(64);
            e.extend_from_slice(&(n as u64).to_le_bytes());
            e.extend(rng.bytes(n));
            if rng.chance(1, 2) {
                m.minor += 1;
            }
            m.raw_entries.push(e);
            format!("entry with unknown tag {tag}, minor version {}", m.minor)
        }
        13 => {
            let (major, minor) =
                *rng.pick(&[(0u16, 0u16), (1, 1), (1, u16::MAX), (2, 0), (u16::MAX, 0)]);
            m.major = major;
            m.minor = minor;
            format!("version {major}.{minor}")
        }
        14 => {
            let n = rng.size(m.data.len());
            m.data.truncate(m.data.len() - n.min(m.data.len()));
            format!("data section cut by {n} bytes")
        }
        _ => {
            // Bytes of the header changed with the checksum fixed after, so the
            // damage reaches the parser.
            let mut out = m.encode();
            let header_end = raw::PREAMBLE_LEN + m.header().len();
            let mut what = Vec::new();
            for _ in 0..rng.range(1, 3) {
                let p = rng.range(raw::PREAMBLE_LEN, header_end - 1);
                if rng.chance(1, 2) {
                    let v = *rng.pick(&INTS);
                    let n = 8.min(header_end - p);
                    out[p..p + n].copy_from_slice(&v.to_le_bytes()[..n]);
                    what.push(format!("header u64 at {p} = {v}"));
                } else {
                    out[p] ^= 1 << rng.below(8);
                    what.push(format!("header byte {p} flipped"));
                }
            }
            raw::fix_header_checksum(&mut out);
            return (out, format!("{} (checksum fixed)", what.join(", ")));
        }
    };
    let mut out = m.encode();
    if rng.chance(1, 16) {
        // Preamble fields that disagree with the file.
        let field = *rng.pick(&[16usize, 32, 40]);
        let v = *rng.pick(&INTS);
        out[field..field + 8].copy_from_slice(&v.to_le_bytes());
        return (out, format!("{what}; preamble u64 at {field} = {v}"));
    }
    (out, what)
}

/// A mutation of the tokenizer JSON inside the file (its ids, above all).
fn tokenizer_json(rng: &mut Rng, m: &mut MqfImage, allow: &dyn Fn(&str, &Value) -> bool) -> String {
    let Some(MetaValue::Bytes(b)) = m.get(TOKENIZER_KEY).cloned() else {
        return "no tokenizer JSON".into();
    };
    let Ok(v) = serde_json::from_slice::<Value>(&b) else {
        return "tokenizer JSON does not parse".into();
    };
    let (new, what) = if rng.chance(1, 2) {
        // An id of the vocabulary or of an added token.
        let added = v["added_tokens"].as_array().map_or(0, Vec::len);
        let mut paths: Vec<String> = (0..added)
            .map(|i| format!("/added_tokens/{i}/id"))
            .collect();
        if let Some(vocab) = v["model"]["vocab"].as_object() {
            let k = vocab
                .keys()
                .nth(rng.below(vocab.len()))
                .cloned()
                .unwrap_or_default();
            paths.push(format!(
                "/model/vocab/{}",
                k.replace('~', "~0").replace('/', "~1")
            ));
        }
        let path = rng.pick(&paths).clone();
        let n = rng.pick(&json_numbers()).clone();
        if !allow(&path, &n) {
            return "tokenizer id mutation not allowed".into();
        }
        (
            json_set(&v, &path, n.clone()),
            format!("tokenizer JSON {path:?} = {n}"),
        )
    } else {
        let (new, what) = json_value(rng, &v, allow);
        (new, format!("tokenizer JSON {what}"))
    };
    m.set(
        TOKENIZER_KEY,
        MetaValue::Bytes(serde_json::to_vec(&new).unwrap()),
    );
    what
}

/// `row_stride` and `len` made consistent with `ty` and `shape` (when they can be).
fn fix_layout(t: &mut TensorInfo) {
    let cols = *t.shape.last().unwrap_or(&1);
    let rows = t.shape[..t.shape.len().saturating_sub(1)]
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d));
    if let (Some(stride), Some(rows)) = (raw::checked_row_bytes(t.ty, cols), rows) {
        t.row_stride = stride;
        if let Some(len) = rows.checked_mul(stride) {
            t.len = len;
        }
    }
}

/// A change to the tensor index: shapes, types, offsets, names.
fn tensor_index(rng: &mut Rng, m: &mut MqfImage) -> String {
    if m.tensors.is_empty() {
        return "no tensors".into();
    }
    let i = rng.below(m.tensors.len());
    let name = m.tensors[i].name.clone();
    let consistent = rng.chance(3, 4);
    let t = &mut m.tensors[i];
    let what = match rng.below(9) {
        0 | 1 => {
            let d = rng.below(t.shape.len());
            let old = t.shape[d];
            let v = *rng.pick(&[
                0,
                1,
                2,
                old / 2,
                old + 1,
                old * 2,
                1 << 32,
                u64::MAX,
                31,
                33,
            ]);
            t.shape[d] = v;
            format!("tensor `{name}` dim {d}: {old} -> {v}")
        }
        2 => {
            let old = t.shape.clone();
            if rng.chance(1, 2) && t.shape.len() > 1 {
                t.shape.reverse();
            } else if rng.chance(1, 2) {
                t.shape.insert(0, 1);
            } else {
                t.shape = vec![old.iter().product::<u64>().max(1)];
            }
            format!("tensor `{name}` shape {old:?} -> {:?}", t.shape)
        }
        3 => {
            let ty = *rng.pick(&QuantType::ALL);
            let old = t.ty;
            t.ty = ty;
            format!("tensor `{name}` type {old} -> {ty}")
        }
        4 => {
            let old = t.offset;
            let v = *rng.pick(&[
                0,
                64,
                old + 64,
                old.wrapping_sub(64),
                old + 1,
                1 << 40,
                u64::MAX - 63,
            ]);
            t.offset = v;
            format!("tensor `{name}` offset {old} -> {v}")
        }
        5 => {
            let (s, l) = (*rng.pick(&INTS), *rng.pick(&INTS));
            if rng.chance(1, 2) {
                t.row_stride = s;
            } else {
                t.len = l;
            }
            return format!(
                "tensor `{name}` row_stride/len = {}/{}",
                t.row_stride, t.len
            );
        }
        6 => {
            m.tensors.remove(i);
            return format!("remove tensor `{name}`");
        }
        7 => {
            let j = rng.below(m.tensors.len());
            let other = m.tensors[j].name.clone();
            m.tensors[i].name = if rng.chance(1, 2) {
                other.clone()
            } else {
                format!("{name}.x")
            };
            return format!("rename tensor `{name}` to `{}`", m.tensors[i].name);
        }
        _ => {
            // Two tensors swap their names (each keeps its own bytes).
            let j = rng.below(m.tensors.len());
            let a = m.tensors[i].name.clone();
            m.tensors[i].name = m.tensors[j].name.clone();
            m.tensors[j].name = a;
            return format!("tensors `{name}` and `{}` swap names", m.tensors[i].name);
        }
    };
    if consistent {
        fix_layout(&mut m.tensors[i]);
        format!("{what} (stride and length made consistent)")
    } else {
        what
    }
}

// ---------------------------------------------------------------- checkpoint

/// A safetensors file taken apart: its header JSON and data.
pub fn safetensors_parts(b: &[u8]) -> Option<(Value, Vec<u8>)> {
    let n = u64::from_le_bytes(b.get(..8)?.try_into().ok()?) as usize;
    let header = b.get(8..8usize.checked_add(n)?)?;
    let v = serde_json::from_slice(header).ok()?;
    Some((v, b[8 + n..].to_vec()))
}

/// A safetensors file from its header and data (length prefix consistent).
pub fn safetensors_join(header: &Value, data: &[u8]) -> Vec<u8> {
    let h = serde_json::to_vec(header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

/// A structure-aware mutation of a safetensors file: the header's offsets,
/// shapes and dtypes (re-encoded with a consistent length), or the data.
pub fn safetensors(rng: &mut Rng, b: &[u8]) -> Mutated {
    let Some((h, mut data)) = safetensors_parts(b) else {
        return bytes(rng, b, &[]);
    };
    let names: Vec<String> = h
        .as_object()
        .map(|m| m.keys().filter(|k| *k != "__metadata__").cloned().collect())
        .unwrap_or_default();
    if names.is_empty() || rng.chance(1, 8) {
        return bytes(rng, b, &[]);
    }
    let name = rng.pick(&names).clone();
    let t = &h[&name];
    let esc = name.replace('~', "~0").replace('/', "~1");
    let (h, what) = match rng.below(6) {
        0 | 1 => {
            let k = rng.below(2);
            let n = rng.pick(&json_numbers()).clone();
            (
                json_set(&h, &format!("/{esc}/data_offsets/{k}"), n.clone()),
                format!("`{name}` data_offsets[{k}] = {n}"),
            )
        }
        2 => {
            let dims = t["shape"].as_array().map_or(0, Vec::len);
            let d = rng.below(dims.max(1));
            let n = rng.pick(&json_numbers()).clone();
            (
                json_set(&h, &format!("/{esc}/shape/{d}"), n.clone()),
                format!("`{name}` shape[{d}] = {n}"),
            )
        }
        3 => {
            let dt = *rng.pick(&[
                "F64", "I64", "U8", "BOOL", "F8_E4M3", "F4", "E8M0", "C64", "bf16", "",
            ]);
            (
                json_set(&h, &format!("/{esc}/dtype"), json!(dt)),
                format!("`{name}` dtype = {dt:?}"),
            )
        }
        4 => {
            let n = rng.size(data.len());
            data.truncate(data.len() - n.min(data.len()));
            (h, format!("data cut by {n} bytes"))
        }
        _ => {
            let (v, what) = json_value(rng, &h, &|_, _| true);
            (v, format!("header {what}"))
        }
    };
    let mut out = safetensors_join(&h, &data);
    if rng.chance(1, 16) {
        let v = *rng.pick(&INTS);
        out[..8].copy_from_slice(&v.to_le_bytes());
        return (out, format!("{what}; header length = {v}"));
    }
    (out, what)
}

/// The JSON files of a bundle whose numbers the systematic cases go through.
const SYSTEMATIC_FILES: [&str; 2] = ["config.json", "preprocessor_config.json"];

/// (file, its JSON, its number paths) of the systematic cases.
fn systematic_docs(bundle: &Bundle) -> Vec<(&'static str, Value, Vec<String>)> {
    SYSTEMATIC_FILES
        .iter()
        .filter_map(|&name| {
            let v: Value = serde_json::from_slice(bundle.get(name)?).ok()?;
            let paths = json_number_paths(&v);
            Some((name, v, paths))
        })
        .collect()
}

/// Systematic checkpoint case `i`: each number of `config.json`, then of
/// `preprocessor_config.json` (in [`json_number_paths`] order), set to each
/// boundary number in turn.
pub fn checkpoint_systematic(bundle: &Bundle, i: usize) -> Option<Mutated> {
    let nums = json_numbers();
    let mut k = i / nums.len();
    for (name, doc, paths) in systematic_docs(bundle) {
        if k < paths.len() {
            let n = nums[i % nums.len()].clone();
            let mut b = bundle.clone();
            let idx = targets::BUNDLE_FILES.iter().position(|f| *f == name)?;
            b.set(
                idx,
                serde_json::to_vec(&json_set(&doc, &paths[k], n.clone())).unwrap(),
            );
            return Some((b.encode(), format!("{name} {:?} = {n}", paths[k])));
        }
        k -= paths.len();
    }
    None
}

/// How many systematic checkpoint cases there are.
pub fn checkpoint_systematic_count(bundle: &Bundle) -> usize {
    let per = json_numbers().len();
    systematic_docs(bundle)
        .iter()
        .map(|d| d.2.len() * per)
        .sum()
}

/// A mutation of one file of a checkpoint bundle, by what the file is.
pub fn checkpoint(rng: &mut Rng, bundle: &Bundle) -> Mutated {
    let mut b = bundle.clone();
    if b.files.is_empty() || rng.chance(1, 32) {
        let (out, what) = bytes(rng, &bundle.encode(), &[]);
        return (out, format!("bundle bytes: {what}"));
    }
    let k = rng.below(b.files.len());
    let (idx, data) = b.files[k].clone();
    let name = targets::BUNDLE_FILES[idx];
    let (new, what) = if rng.chance(1, 24) {
        b.files.remove(k);
        return (b.encode(), format!("remove {name}"));
    } else if name.ends_with(".safetensors") {
        safetensors(rng, &data)
    } else if name.ends_with(".json") {
        json_doc(rng, &data, &|_, _| true)
    } else {
        bytes(rng, &data, &[])
    };
    b.files[k].1 = new;
    (b.encode(), format!("{name}: {what}"))
}

// ---------------------------------------------------------------- images

/// CRC-32 (IEEE), as PNG chunks carry it.
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// A PNG's chunks: (type, data).
fn png_chunks(b: &[u8]) -> Option<Vec<([u8; 4], Vec<u8>)>> {
    let mut p = 8;
    let mut out = Vec::new();
    while p + 12 <= b.len() {
        let len = u32::from_be_bytes(b[p..p + 4].try_into().ok()?) as usize;
        let ty: [u8; 4] = b[p + 4..p + 8].try_into().ok()?;
        let data = b.get(p + 8..p + 8 + len)?.to_vec();
        out.push((ty, data));
        p += 12 + len;
    }
    Some(out)
}

fn png_join(chunks: &[([u8; 4], Vec<u8>)]) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    for (ty, data) in chunks {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut c = ty.to_vec();
        c.extend_from_slice(data);
        out.extend_from_slice(&c);
        out.extend_from_slice(&crc32(&c).to_be_bytes());
    }
    out
}

/// Image dimensions worth trying.
const DIMS: [u32; 10] = [
    0,
    1,
    2,
    16384,
    16385,
    65535,
    65536,
    1 << 24,
    (1 << 31) - 1,
    u32::MAX,
];

/// A PNG mutated chunk by chunk, every CRC recomputed.
fn png(rng: &mut Rng, b: &[u8]) -> Option<Mutated> {
    let mut chunks = png_chunks(b)?;
    let what = match rng.below(6) {
        0 | 1 => {
            let (w, h) = (*rng.pick(&DIMS), *rng.pick(&DIMS));
            let ihdr = &mut chunks.first_mut()?.1;
            ihdr[0..4].copy_from_slice(&w.to_be_bytes());
            ihdr[4..8].copy_from_slice(&h.to_be_bytes());
            format!("PNG IHDR {w}x{h}")
        }
        2 => {
            let ihdr = &mut chunks.first_mut()?.1;
            let (depth, colour) = (
                *rng.pick(&[0u8, 1, 2, 4, 8, 16, 32]),
                *rng.pick(&[0u8, 2, 3, 4, 6, 7]),
            );
            ihdr[8] = depth;
            ihdr[9] = colour;
            format!("PNG bit depth {depth}, colour type {colour}")
        }
        3 => {
            let ty = *rng.pick(&[
                *b"eXIf", *b"tEXt", *b"zTXt", *b"iCCP", *b"PLTE", *b"tRNS", *b"acTL", *b"fcTL",
                *b"IDAT", *b"sBIT",
            ]);
            let n = rng.size(1 << 16);
            let data = rng.bytes(n);
            let at = rng.range(1, chunks.len());
            chunks.insert(at, (ty, data));
            format!(
                "PNG {} chunk of {n} random bytes at {at}",
                String::from_utf8_lossy(&ty)
            )
        }
        _ => {
            let k = rng.below(chunks.len());
            let ty = chunks[k].0;
            let (d, what) = bytes(rng, &chunks[k].1, &[]);
            chunks[k].1 = d;
            format!("PNG {} chunk: {what}", String::from_utf8_lossy(&ty))
        }
    };
    Some((png_join(&chunks), format!("{what} (CRCs fixed)")))
}

/// Where a format keeps its dimensions: (offset, bytes, big-endian).
fn dim_fields(b: &[u8]) -> Vec<(usize, usize, bool)> {
    if b.starts_with(b"GIF") {
        let mut v = vec![(6, 2, false), (8, 2, false)];
        if let Some(p) = b.iter().position(|&x| x == 0x2c) {
            v.extend([
                (p + 1, 2, false),
                (p + 3, 2, false),
                (p + 5, 2, false),
                (p + 7, 2, false),
            ]);
        }
        v
    } else if b.starts_with(b"BM") {
        vec![
            (2, 4, false),
            (10, 4, false),
            (14, 4, false),
            (18, 4, false),
            (22, 4, false),
            (28, 2, false),
            (30, 4, false),
            (34, 4, false),
        ]
    } else if b.starts_with(&[0xff, 0xd8]) {
        let mut v = Vec::new();
        for p in 0..b.len().saturating_sub(8) {
            if b[p] == 0xff && matches!(b[p + 1], 0xc0..=0xc2) {
                v.extend([
                    (p + 2, 2, true),
                    (p + 5, 2, true),
                    (p + 7, 2, true),
                    (p + 9, 1, true),
                ]);
            }
            if b[p] == 0xff && matches!(b[p + 1], 0xc4 | 0xdb | 0xda | 0xe1) {
                v.push((p + 2, 2, true));
            }
        }
        // EXIF orientation value (the seeds' APP1 puts it at a fixed place).
        if b.get(6..10) == Some(b"Exif") {
            v.push((30, 2, false));
        }
        v
    } else if b.starts_with(b"RIFF") {
        vec![
            (4, 4, false),
            (16, 4, false),
            (21, 2, false),
            (23, 2, false),
            (24, 3, false),
            (26, 2, false),
        ]
    } else {
        Vec::new()
    }
}

/// A picture mutated: dimensions and header fields of its format set to
/// boundary values, PNG chunks with their CRCs fixed, or bytes.
pub fn image(rng: &mut Rng, b: &[u8], donors: &[&[u8]]) -> Mutated {
    if b.starts_with(b"\x89PNG") && rng.chance(2, 3) {
        if let Some(m) = png(rng, b) {
            return m;
        }
    }
    let fields = dim_fields(b);
    if !fields.is_empty() && rng.chance(1, 2) {
        let mut out = b.to_vec();
        let (off, n, be) = *rng.pick(&fields);
        if off + n <= out.len() {
            let v = *rng.pick(&DIMS) as u64;
            let bytes = if be {
                v.to_be_bytes()[8 - n..].to_vec()
            } else {
                v.to_le_bytes()[..n].to_vec()
            };
            out[off..off + n].copy_from_slice(&bytes);
            return (out, format!("header field at {off} ({n} bytes) = {v}"));
        }
    }
    bytes(rng, b, donors)
}

// ---------------------------------------------------------------- chats

/// Strings that mean something to the template or the tokenizer.
const SPECIALS: [&str; 12] = [
    "<|endoftext|>",
    "<image>",
    "USER:",
    " ASSISTANT:",
    "\n",
    "\u{0}",
    "\u{feff}",
    "\u{202e}",
    "e\u{301}\u{301}\u{301}",
    "\u{10ffff}",
    "\r\n\t",
    "<|endoftext",
];

/// A chat mutated: roles, pictures, special strings, long and odd texts.
pub fn chat(rng: &mut Rng, b: &[u8], donors: &[&[u8]]) -> Mutated {
    let mut c = targets::decode_chat(b);
    if c.is_empty() || rng.chance(1, 5) {
        return bytes(rng, b, donors);
    }
    let m = rng.below(c.len());
    let what = match rng.below(8) {
        0 => {
            c[m].0 = rng.below(4) as u8;
            format!("message {m} role = {}", c[m].0)
        }
        1 => {
            let at = rng.below(c[m].1.len() + 1);
            c[m].1.insert(at, ChatPart::Image);
            format!("picture into message {m} at {at}")
        }
        2 => {
            let msg = c[m].clone();
            // At most ~1 MiB in all: a chat longer than a server accepts says
            // nothing about the code.
            let size = targets::encode_chat(std::slice::from_ref(&msg))
                .len()
                .max(1);
            let times = (*rng.pick(&[2usize, 50, 2000]))
                .min((1 << 20) / size)
                .max(1);
            for _ in 0..times {
                c.insert(m, msg.clone());
            }
            format!("message {m} repeated x{times}")
        }
        3 => {
            let n = rng.size(256 << 10).max(1);
            let s: String =
                std::iter::repeat_n(*rng.pick(&[' ', 'a', '\n', '日', '🐱', '\u{301}']), n)
                    .collect();
            c[m].1.push(ChatPart::Text(s));
            format!("{n} repeated chars into message {m}")
        }
        4 => {
            let n = rng.size(4096).max(1);
            let s: String = (0..n)
                .filter_map(|_| char::from_u32(rng.below(0x11_0000) as u32))
                .collect();
            c[m].1.push(ChatPart::Text(s));
            format!("{n} random code points into message {m}")
        }
        5 => {
            c.remove(m);
            format!("remove message {m}")
        }
        _ => {
            let s = rng.pick(&SPECIALS).repeat(rng.range(1, 64));
            let at = rng.below(c[m].1.len() + 1);
            c[m].1.insert(at, ChatPart::Text(s.clone()));
            format!("{:?} x{} into message {m}", rng.pick(&SPECIALS), s.len())
        }
    };
    // Separator bytes inside texts would re-split the chat: keep them out.
    for (_, parts) in &mut c {
        for p in parts {
            if let ChatPart::Text(t) = p {
                if t.contains(['\u{1e}', '\u{1f}']) {
                    *t = t.replace(['\u{1e}', '\u{1f}'], " ");
                }
            }
        }
    }
    (targets::encode_chat(&c), what)
}

// ---------------------------------------------------------------- requests

/// Systematic request case `i` of body `v`: number `i / B` set to boundary
/// number `i % B`.
pub fn request_systematic(v: &Value, i: usize) -> Option<Mutated> {
    let paths = json_number_paths(v);
    let nums = json_numbers();
    let path = paths.get(i / nums.len())?;
    let n = nums[i % nums.len()].clone();
    Some((
        serde_json::to_vec(&json_set(v, path, n.clone())).unwrap(),
        format!("{path:?} = {n}"),
    ))
}

/// A request body mutated: JSON structure, data URLs, message lists, or bytes.
pub fn request(rng: &mut Rng, b: &[u8], donors: &[&[u8]]) -> Mutated {
    let Ok(v) = serde_json::from_slice::<Value>(b) else {
        return bytes(rng, b, donors);
    };
    match rng.below(8) {
        0 => bytes(rng, b, donors),
        1 => {
            // A data URL changed: its type, base64, or size.
            let url = match rng.below(6) {
                0 => "data:image/png;base64,".to_string(),
                1 => "data:image/png;base64,!!!!".to_string(),
                2 => format!("data:image/png;base64,{}", "A".repeat(rng.size(1 << 20))),
                3 => "data:text/plain;base64,aGk=".to_string(),
                4 => {
                    let n = rng.size(4096);
                    format!(
                        "data:image/gif;base64, {} ",
                        super::seeds::base64(&rng.bytes(n))
                    )
                }
                _ => "DATA:image/png;base64,AAAA".to_string(),
            };
            let body = json!({"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]}]});
            (
                serde_json::to_vec(&body).unwrap(),
                format!("data URL {:?}", &url[..url.len().min(40)]),
            )
        }
        2 => {
            let n = *rng.pick(&[100usize, 5000]);
            let msgs: Vec<Value> = (0..n)
                .map(|i| json!({"role": if i % 2 == 0 {"user"} else {"assistant"}, "content": "x"}))
                .collect();
            let body = json!({"messages": msgs, "max_tokens": 1});
            (serde_json::to_vec(&body).unwrap(), format!("{n} messages"))
        }
        _ => {
            let (v, what) = json_value(rng, &v, &|_, _| true);
            (json_bytes(rng, &v), what)
        }
    }
}
