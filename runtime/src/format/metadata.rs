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

/// Ordered key → value metadata of a file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metadata {
    pub entries: Vec<(String, MetaValue)>,
}

impl Metadata {
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        todo!()
    }
    pub fn insert(&mut self, key: impl Into<String>, value: MetaValue) {
        todo!()
    }
    /// Any integer type that fits in u64.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        todo!()
    }
    pub fn get_i64(&self, key: &str) -> Result<i64> {
        todo!()
    }
    /// F32 or F64 (or an integer).
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        todo!()
    }
    pub fn get_bool(&self, key: &str) -> Result<bool> {
        todo!()
    }
    pub fn get_str(&self, key: &str) -> Result<&str> {
        todo!()
    }
    pub fn get_bytes(&self, key: &str) -> Result<&[u8]> {
        todo!()
    }
    pub fn get_array(&self, key: &str) -> Result<&[MetaValue]> {
        todo!()
    }
    pub fn get_f64_array(&self, key: &str) -> Result<Vec<f64>> {
        todo!()
    }
    pub fn get_u64_array(&self, key: &str) -> Result<Vec<u64>> {
        todo!()
    }
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        todo!()
    }
}

#[allow(dead_code)]
fn _unused(_: Error) {}
