//! `MqfWriter` refuses what it cannot write, before or while writing.

use mipha_runtime::{Error, MetaValue, MqfWriter, QuantType, TensorSpec};

fn create_err(md: Vec<(String, MetaValue)>, specs: Vec<TensorSpec>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let e = MqfWriter::create(dir.path().join("x.mqf"), md, specs).unwrap_err();
    assert!(matches!(e, Error::InvalidWrite { .. }), "{e:?}");
    // Nothing was created.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    e.to_string()
}

fn kv(k: &str, v: MetaValue) -> (String, MetaValue) {
    (k.to_string(), v)
}

#[test]
fn duplicate_metadata_keys() {
    let e = create_err(
        vec![kv("a", MetaValue::U8(1)), kv("a", MetaValue::U8(2))],
        vec![],
    );
    assert!(e.contains("duplicate metadata key `a`"), "{e}");
}

#[test]
fn empty_metadata_key() {
    let e = create_err(vec![kv("", MetaValue::U8(1))], vec![]);
    assert!(e.contains("empty metadata key"), "{e}");
}

#[test]
fn heterogeneous_and_nested_arrays() {
    let e = create_err(
        vec![kv(
            "mix",
            MetaValue::Array(vec![MetaValue::U64(1), MetaValue::I64(2)]),
        )],
        vec![],
    );
    assert!(e.contains("`mix`") && e.contains("not homogeneous"), "{e}");
    let e = create_err(
        vec![kv("nest", MetaValue::Array(vec![MetaValue::Array(vec![])]))],
        vec![],
    );
    assert!(
        e.contains("`nest`") && e.contains("arrays of arrays"),
        "{e}"
    );
}

#[test]
fn duplicate_tensor_names() {
    let t = TensorSpec::new("w", QuantType::F32, vec![4]);
    let e = create_err(vec![], vec![t.clone(), t]);
    assert!(e.contains("duplicate tensor name `w`"), "{e}");
}

#[test]
fn bad_shapes() {
    let e = create_err(vec![], vec![TensorSpec::new("s", QuantType::F32, vec![])]);
    assert!(e.contains("`s`") && e.contains("1 to 8 dims"), "{e}");
    let e = create_err(
        vec![],
        vec![TensorSpec::new("s", QuantType::F32, vec![1; 9])],
    );
    assert!(e.contains("1 to 8 dims"), "{e}");
    let e = create_err(
        vec![],
        vec![TensorSpec::new("z", QuantType::F16, vec![3, 0])],
    );
    assert!(e.contains("`z`") && e.contains("zero dim"), "{e}");
    let e = create_err(
        vec![],
        vec![TensorSpec::new("h", QuantType::F32, vec![u64::MAX, 2])],
    );
    assert!(e.contains("`h`") && e.contains("too large"), "{e}");
    let e = create_err(vec![], vec![TensorSpec::new("", QuantType::F32, vec![1])]);
    assert!(e.contains("empty name"), "{e}");
}

#[test]
fn write_tensor_misuse() {
    let dir = tempfile::tempdir().unwrap();
    let specs = vec![TensorSpec::new("w", QuantType::Q4_0, vec![2, 33])];
    let mut w = MqfWriter::create(dir.path().join("x.mqf"), vec![], specs).unwrap();
    // 2 rows of 2 Q4_0 blocks of 18 bytes.
    assert_eq!(w.expected_len(0), Some(72));
    let e = w.write_tensor(0, &[0; 71]).unwrap_err().to_string();
    assert!(
        e.contains("`w`") && e.contains("got 71 bytes, expected 72"),
        "{e}"
    );
    let e = w.write_tensor(1, &[0; 72]).unwrap_err().to_string();
    assert!(e.contains("index 1 out of range"), "{e}");
    w.write_tensor(0, &[0; 72]).unwrap();
    let e = w.write_tensor(0, &[0; 72]).unwrap_err().to_string();
    assert!(e.contains("`w` written twice"), "{e}");
    w.finish().unwrap();
}

#[test]
fn missing_directory_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let e = MqfWriter::create(dir.path().join("no/such/dir/x.mqf"), vec![], vec![]).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
}
