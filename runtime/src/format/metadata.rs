use crate::error::{Error, Result};

/// A typed metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I32(i32),
    U32(u32),
    I64(i64),
    U64(u64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Bytes(Vec<u8>),
    /// Elements share one type (checked by the writer and the reader).
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// Name of the value's type, as used in error messages (`u64`, `array of str`, …).
    pub fn type_name(&self) -> String {
        match self {
            MetaValue::Array(items) => match items.first() {
                Some(first) => format!("array of {}", first.type_name()),
                None => "empty array".to_string(),
            },
            other => other.scalar_type_name().to_string(),
        }
    }

    fn scalar_type_name(&self) -> &'static str {
        match self {
            MetaValue::U8(_) => "u8",
            MetaValue::I32(_) => "i32",
            MetaValue::U32(_) => "u32",
            MetaValue::I64(_) => "i64",
            MetaValue::U64(_) => "u64",
            MetaValue::F32(_) => "f32",
            MetaValue::F64(_) => "f64",
            MetaValue::Bool(_) => "bool",
            MetaValue::Str(_) => "str",
            MetaValue::Bytes(_) => "bytes",
            MetaValue::Array(_) => "array",
        }
    }

    /// Any integer that is non-negative (and so fits in u64).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer that fits in i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => i64::try_from(v).ok(),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::I64(v) => Some(v),
            _ => None,
        }
    }

    /// Floats, and integers converted to the nearest f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v as f64),
            MetaValue::I64(v) => Some(v as f64),
            _ => None,
        }
    }

    /// A short description for error messages: the type, plus the value for numbers
    /// (so "found i64 -2" explains why a non-negative integer was refused).
    fn describe(&self) -> String {
        match self {
            MetaValue::U8(v) => format!("u8 {v}"),
            MetaValue::I32(v) => format!("i32 {v}"),
            MetaValue::U32(v) => format!("u32 {v}"),
            MetaValue::I64(v) => format!("i64 {v}"),
            MetaValue::U64(v) => format!("u64 {v}"),
            MetaValue::F32(v) => format!("f32 {v}"),
            MetaValue::F64(v) => format!("f64 {v}"),
            MetaValue::Bool(v) => format!("bool {v}"),
            other => other.type_name(),
        }
    }
}

/// Ordered key → value metadata of a file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metadata {
    pub entries: Vec<(String, MetaValue)>,
}

fn type_err(key: &str, expected: &'static str, found: &MetaValue) -> Error {
    Error::MetadataType {
        key: key.to_string(),
        expected,
        found: found.describe(),
    }
}

fn array_elem_err(key: &str, expected: &'static str, index: usize, found: &MetaValue) -> Error {
    Error::MetadataType {
        key: key.to_string(),
        expected,
        found: format!("element {index} is {}", found.describe()),
    }
}

impl Metadata {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &MetaValue)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        // Linear: files carry a few dozen keys, read once at load time.
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Replaces the value of an existing key in place (keeping its position), else appends.
    pub fn insert(&mut self, key: impl Into<String>, value: MetaValue) {
        let key = key.into();
        match self.entries.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => *v = value,
            None => self.entries.push((key, value)),
        }
    }

    fn require(&self, key: &str) -> Result<&MetaValue> {
        self.get(key)
            .ok_or_else(|| Error::MissingMetadata(key.to_string()))
    }

    /// Any integer type that fits in u64.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.require(key)?;
        v.as_u64()
            .ok_or_else(|| type_err(key, "non-negative integer", v))
    }
    pub fn get_i64(&self, key: &str) -> Result<i64> {
        let v = self.require(key)?;
        v.as_i64()
            .ok_or_else(|| type_err(key, "integer fitting in i64", v))
    }
    /// F32 or F64 (or an integer).
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let v = self.require(key)?;
        v.as_f64().ok_or_else(|| type_err(key, "number", v))
    }
    pub fn get_bool(&self, key: &str) -> Result<bool> {
        match self.require(key)? {
            MetaValue::Bool(b) => Ok(*b),
            v => Err(type_err(key, "bool", v)),
        }
    }
    pub fn get_str(&self, key: &str) -> Result<&str> {
        match self.require(key)? {
            MetaValue::Str(s) => Ok(s),
            v => Err(type_err(key, "str", v)),
        }
    }
    pub fn get_bytes(&self, key: &str) -> Result<&[u8]> {
        match self.require(key)? {
            MetaValue::Bytes(b) => Ok(b),
            v => Err(type_err(key, "bytes", v)),
        }
    }
    pub fn get_array(&self, key: &str) -> Result<&[MetaValue]> {
        match self.require(key)? {
            MetaValue::Array(a) => Ok(a),
            v => Err(type_err(key, "array", v)),
        }
    }
    pub fn get_f64_array(&self, key: &str) -> Result<Vec<f64>> {
        let expected = "array of numbers";
        self.typed_array(key, expected)?
            .iter()
            .enumerate()
            .map(|(i, e)| {
                e.as_f64()
                    .ok_or_else(|| array_elem_err(key, expected, i, e))
            })
            .collect()
    }
    pub fn get_u64_array(&self, key: &str) -> Result<Vec<u64>> {
        let expected = "array of non-negative integers";
        self.typed_array(key, expected)?
            .iter()
            .enumerate()
            .map(|(i, e)| {
                e.as_u64()
                    .ok_or_else(|| array_elem_err(key, expected, i, e))
            })
            .collect()
    }
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        let expected = "array of str";
        self.typed_array(key, expected)?
            .iter()
            .enumerate()
            .map(|(i, e)| match e {
                MetaValue::Str(s) => Ok(s.as_str()),
                _ => Err(array_elem_err(key, expected, i, e)),
            })
            .collect()
    }

    fn typed_array(&self, key: &str, expected: &'static str) -> Result<&[MetaValue]> {
        match self.require(key)? {
            MetaValue::Array(a) => Ok(a),
            v => Err(type_err(key, expected, v)),
        }
    }
}

impl FromIterator<(String, MetaValue)> for Metadata {
    fn from_iter<I: IntoIterator<Item = (String, MetaValue)>>(iter: I) -> Self {
        let mut m = Metadata::new();
        for (k, v) in iter {
            m.insert(k, v);
        }
        m
    }
}
