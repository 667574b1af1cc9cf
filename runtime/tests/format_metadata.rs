//! Typed metadata accessors: which stored types each getter accepts, and the errors.

use mipha_runtime::{Error, MetaValue, Metadata};

fn md() -> Metadata {
    use MetaValue::*;
    let mut m = Metadata::default();
    m.insert("u8", U8(200));
    m.insert("u32", U32(7));
    m.insert("u64", U64(u64::MAX));
    m.insert("i32", I32(-2));
    m.insert("i64", I64(42));
    m.insert("f32", F32(0.5));
    m.insert("f64", F64(1e-5));
    m.insert("bool", Bool(true));
    m.insert("str", Str("phi".into()));
    m.insert("bytes", Bytes(vec![1, 2]));
    m.insert("size", Array(vec![U64(336), U64(336)]));
    m.insert("mean", Array(vec![F64(0.5), F32(0.25)]));
    m.insert("ints", Array(vec![I32(1), I32(-1)]));
    m.insert(
        "roles",
        Array(vec![Str("USER".into()), Str("ASSISTANT".into())]),
    );
    m.insert("empty", Array(vec![]));
    m
}

fn type_err<T: std::fmt::Debug>(r: Result<T, Error>) -> (String, &'static str, String) {
    match r {
        Err(Error::MetadataType {
            key,
            expected,
            found,
        }) => (key, expected, found),
        other => panic!("expected MetadataType, got {other:?}"),
    }
}

#[test]
fn get_u64_takes_any_non_negative_integer() {
    let m = md();
    assert_eq!(m.get_u64("u8").unwrap(), 200);
    assert_eq!(m.get_u64("u32").unwrap(), 7);
    assert_eq!(m.get_u64("u64").unwrap(), u64::MAX);
    assert_eq!(m.get_u64("i64").unwrap(), 42);
    let (key, _, found) = type_err(m.get_u64("i32"));
    assert_eq!(key, "i32");
    assert!(found.contains("-2"), "{found}");
    type_err(m.get_u64("f64"));
    type_err(m.get_u64("str"));
}

#[test]
fn get_i64_takes_integers_that_fit() {
    let m = md();
    assert_eq!(m.get_i64("i32").unwrap(), -2);
    assert_eq!(m.get_i64("u8").unwrap(), 200);
    assert_eq!(m.get_i64("i64").unwrap(), 42);
    type_err(m.get_i64("u64"));
    type_err(m.get_i64("f32"));
}

#[test]
fn get_f64_takes_floats_and_integers() {
    let m = md();
    assert_eq!(m.get_f64("f32").unwrap(), 0.5);
    assert_eq!(m.get_f64("f64").unwrap(), 1e-5);
    assert_eq!(m.get_f64("i32").unwrap(), -2.0);
    let (_, expected, found) = type_err(m.get_f64("bool"));
    assert_eq!(expected, "number");
    assert!(found.contains("bool"));
}

#[test]
fn exact_type_getters() {
    let m = md();
    assert!(m.get_bool("bool").unwrap());
    assert_eq!(m.get_str("str").unwrap(), "phi");
    assert_eq!(m.get_bytes("bytes").unwrap(), [1, 2]);
    assert_eq!(m.get_array("size").unwrap().len(), 2);
    type_err(m.get_bool("u8"));
    type_err(m.get_str("bytes"));
    type_err(m.get_bytes("str"));
    let (_, expected, found) = type_err(m.get_array("str"));
    assert_eq!((expected, found.as_str()), ("array", "str"));
}

#[test]
fn array_getters() {
    let m = md();
    assert_eq!(m.get_u64_array("size").unwrap(), [336, 336]);
    assert_eq!(m.get_f64_array("mean").unwrap(), [0.5, 0.25]);
    assert_eq!(m.get_f64_array("size").unwrap(), [336.0, 336.0]);
    assert_eq!(m.get_str_array("roles").unwrap(), ["USER", "ASSISTANT"]);
    assert!(m.get_u64_array("empty").unwrap().is_empty());
    assert!(m.get_str_array("empty").unwrap().is_empty());
    let (key, _, found) = type_err(m.get_u64_array("ints"));
    assert_eq!(key, "ints");
    assert!(
        found.contains("element 1") && found.contains("-1"),
        "{found}"
    );
    let (_, _, found) = type_err(m.get_str_array("size"));
    assert!(found.contains("element 0"), "{found}");
    type_err(m.get_f64_array("u64"));
}

#[test]
fn missing_keys_are_named() {
    let m = md();
    let e = m.get_u64("lm.hidden_size").unwrap_err();
    assert!(matches!(&e, Error::MissingMetadata(k) if k == "lm.hidden_size"));
    assert!(e.to_string().contains("lm.hidden_size"));
    assert!(m.get_str_array("nope").is_err());
    assert!(m.get("nope").is_none());
}

#[test]
fn insert_replaces_in_place() {
    let mut m = md();
    let n = m.len();
    m.insert("u8", MetaValue::Str("now a string".into()));
    assert_eq!(m.len(), n);
    assert_eq!(m.entries[0].0, "u8");
    assert_eq!(m.get_str("u8").unwrap(), "now a string");
}

#[test]
fn type_errors_read_well() {
    let e = md().get_u64("roles").unwrap_err().to_string();
    assert_eq!(
        e,
        "metadata key `roles`: expected non-negative integer, found array of str"
    );
}
