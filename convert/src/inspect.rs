//! `inspect` (a human- or JSON-readable dump of a `.mqf` file) and `verify`.

use std::fmt::Write;
use std::path::Path;

use mipha_runtime::{MetaValue, MqfFile};
use serde_json::{json, Value};

use crate::error::Result;

/// Array elements shown before "... (N more)".
const MAX_ARRAY_ITEMS: usize = 8;
/// Strings longer than this are cut in the text dump.
const MAX_STR_CHARS: usize = 160;

fn type_name(v: &MetaValue) -> String {
    match v {
        MetaValue::U8(_) => "u8".into(),
        MetaValue::I32(_) => "i32".into(),
        MetaValue::U32(_) => "u32".into(),
        MetaValue::I64(_) => "i64".into(),
        MetaValue::U64(_) => "u64".into(),
        MetaValue::F32(_) => "f32".into(),
        MetaValue::F64(_) => "f64".into(),
        MetaValue::Bool(_) => "bool".into(),
        MetaValue::Str(_) => "str".into(),
        MetaValue::Bytes(_) => "bytes".into(),
        MetaValue::Array(items) => match items.first() {
            Some(first) => format!("[{}; {}]", type_name(first), items.len()),
            None => "[]".into(),
        },
    }
}

fn short_str(s: &str) -> String {
    let q = format!("{s:?}");
    if q.chars().count() > MAX_STR_CHARS {
        let cut: String = q.chars().take(MAX_STR_CHARS).collect();
        format!("{cut}... ({} chars)", s.chars().count())
    } else {
        q
    }
}

fn value_text(v: &MetaValue) -> String {
    match v {
        MetaValue::U8(x) => x.to_string(),
        MetaValue::I32(x) => x.to_string(),
        MetaValue::U32(x) => x.to_string(),
        MetaValue::I64(x) => x.to_string(),
        MetaValue::U64(x) => x.to_string(),
        MetaValue::F32(x) => format!("{x:?}"),
        MetaValue::F64(x) => format!("{x:?}"),
        MetaValue::Bool(x) => x.to_string(),
        MetaValue::Str(s) => short_str(s),
        MetaValue::Bytes(b) => format!("<bytes: {}>", b.len()),
        MetaValue::Array(items) => {
            let shown: Vec<String> = items.iter().take(MAX_ARRAY_ITEMS).map(value_text).collect();
            let more = items.len().saturating_sub(MAX_ARRAY_ITEMS);
            if more > 0 {
                format!("[{}, ... ({more} more)]", shown.join(", "))
            } else {
                format!("[{}]", shown.join(", "))
            }
        }
    }
}

fn value_json(v: &MetaValue) -> Value {
    match v {
        MetaValue::U8(x) => json!(x),
        MetaValue::I32(x) => json!(x),
        MetaValue::U32(x) => json!(x),
        MetaValue::I64(x) => json!(x),
        MetaValue::U64(x) => json!(x),
        MetaValue::F32(x) => json!(x),
        MetaValue::F64(x) => json!(x),
        MetaValue::Bool(x) => json!(x),
        MetaValue::Str(s) => json!(s),
        MetaValue::Bytes(b) => json!({ "bytes": b.len() }),
        MetaValue::Array(items) => Value::Array(items.iter().map(value_json).collect()),
    }
}

/// Everything in a file but the tensor data: version, size, metadata (tokenizer bytes
/// summarised, long arrays cut short) and the tensor table. `json` gives one JSON
/// object instead, with arrays in full.
pub fn inspect(path: impl AsRef<Path>, json: bool) -> Result<String> {
    let f = MqfFile::open(path.as_ref())?;
    let (major, minor) = f.version();
    let meta = &f.metadata().entries;
    if json {
        let metadata: serde_json::Map<String, Value> = meta
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    json!({ "type": type_name(v), "value": value_json(v) }),
                )
            })
            .collect();
        let tensors: Vec<Value> = f
            .tensors()
            .iter()
            .map(|t| {
                json!({
                    "name": t.name,
                    "type": t.ty.name(),
                    "shape": t.shape,
                    "row_stride": t.row_stride,
                    "offset": t.offset,
                    "bytes": t.len,
                    "checksum": format!("{:016x}", t.checksum),
                })
            })
            .collect();
        let doc = json!({
            "path": path.as_ref().display().to_string(),
            "version": format!("{major}.{minor}"),
            "file_size": f.file_size(),
            "metadata": metadata,
            "tensors": tensors,
        });
        return Ok(serde_json::to_string_pretty(&doc).expect("JSON values serialise") + "\n");
    }

    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w, "file:      {}", path.as_ref().display());
    let _ = writeln!(w, "version:   {major}.{minor}");
    let _ = writeln!(
        w,
        "file size: {} bytes ({})",
        f.file_size(),
        human(f.file_size())
    );
    let _ = writeln!(w, "metadata:  {} keys", meta.len());
    let kw = meta.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let tw = meta
        .iter()
        .map(|(_, v)| type_name(v).len())
        .max()
        .unwrap_or(0);
    for (k, v) in meta {
        let _ = writeln!(w, "  {k:<kw$}  {:<tw$}  {}", type_name(v), value_text(v));
    }
    let tensors = f.tensors();
    let total: u64 = tensors.iter().map(|t| t.len).sum();
    let _ = writeln!(
        w,
        "tensors:   {} ({} bytes, {})",
        tensors.len(),
        total,
        human(total)
    );
    let nw = tensors
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let shape = |s: &[u64]| {
        format!(
            "[{}]",
            s.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
        )
    };
    let sw = tensors
        .iter()
        .map(|t| shape(&t.shape).len())
        .max()
        .unwrap_or(5)
        .max(5);
    let _ = writeln!(
        w,
        "  {:<nw$}  {:<5}  {:<sw$}  {:>10}  {:>12}  {:>12}",
        "name", "type", "shape", "row stride", "offset", "bytes"
    );
    for t in tensors {
        let _ = writeln!(
            w,
            "  {:<nw$}  {:<5}  {:<sw$}  {:>10}  {:>12}  {:>12}",
            t.name,
            t.ty.name(),
            shape(&t.shape),
            t.row_stride,
            t.offset,
            t.len
        );
    }
    Ok(out)
}

fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = n as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{x:.2} {}", UNITS[u])
    }
}

/// What `verify` checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    pub tensors: usize,
    pub bytes: u64,
}

/// Opens (structural checks) and checksums every tensor; the error names the first
/// damaged tensor.
pub fn verify(path: impl AsRef<Path>) -> Result<VerifyReport> {
    let f = MqfFile::open(path.as_ref())?;
    f.verify()?;
    Ok(VerifyReport {
        tensors: f.tensors().len(),
        bytes: f.tensors().iter().map(|t| t.len).sum(),
    })
}
