//! Write → read roundtrips of the `.mqf` format.

use std::path::Path;

use mipha_kernels::quant::quantize_row;
use mipha_runtime::format::{DATA_ALIGN, TENSOR_ALIGN};
use mipha_runtime::{MetaValue, MqfFile, MqfWriter, QuantType, TensorSpec};

fn all_value_types() -> Vec<(String, MetaValue)> {
    use MetaValue::*;
    let v: Vec<(&str, MetaValue)> = vec![
        ("t.u8", U8(0xfe)),
        ("t.i32", I32(-123_456)),
        ("t.u32", U32(u32::MAX)),
        ("t.i64", I64(i64::MIN)),
        ("t.u64", U64(u64::MAX)),
        ("t.f32", F32(-1.5e-7)),
        ("t.f64", F64(std::f64::consts::PI)),
        ("t.bool.true", Bool(true)),
        ("t.bool.false", Bool(false)),
        ("t.str", Str("phi".into())),
        ("t.str.empty", Str(String::new())),
        ("t.str.unicode", Str("héllo → 世界 🦀\0nul".into())),
        ("t.bytes", Bytes((0..=255u8).collect())),
        ("t.bytes.empty", Bytes(vec![])),
        ("t.array.empty", Array(vec![])),
        ("t.array.u8", Array(vec![U8(1), U8(2)])),
        ("t.array.i32", Array(vec![I32(-1), I32(7)])),
        ("t.array.u32", Array(vec![U32(3)])),
        ("t.array.i64", Array(vec![I64(-2), I64(i64::MAX)])),
        ("t.array.u64", Array(vec![U64(224), U64(224)])),
        ("t.array.f32", Array(vec![F32(0.5), F32(-0.25)])),
        (
            "t.array.f64",
            Array(vec![F64(0.481_454_66), F64(0.457_827_5), F64(0.408_210_73)]),
        ),
        ("t.array.bool", Array(vec![Bool(true), Bool(false)])),
        (
            "t.array.str",
            Array(vec![
                Str("USER".into()),
                Str(String::new()),
                Str("ü".into()),
            ]),
        ),
        (
            "t.array.bytes",
            Array(vec![Bytes(vec![1, 2, 3]), Bytes(vec![])]),
        ),
        ("ключ.unicode", U64(1)),
    ];
    v.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// Deterministic pseudo-random floats in [-2, 2).
fn floats(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

/// Real stored bytes for `shape` in `ty`, produced row by row by the kernels' quantizer.
fn tensor_bytes(ty: QuantType, shape: &[u64], seed: u64) -> Vec<u8> {
    let cols = *shape.last().unwrap() as usize;
    let rows: u64 = shape[..shape.len() - 1].iter().product();
    let row_bytes = ty.row_bytes(cols);
    let mut out = vec![0u8; rows as usize * row_bytes];
    for (r, dst) in out.chunks_exact_mut(row_bytes).enumerate() {
        quantize_row(ty, &floats(cols, seed * 1000 + r as u64), dst);
    }
    out
}

/// Every quant type in 1-D, 2-D, 3-D and 4-D shapes, most with cols not a multiple of 32.
fn specs() -> Vec<TensorSpec> {
    let shapes: [&[u64]; 6] = [&[7], &[3, 45], &[2, 3, 33], &[2, 2, 2, 70], &[5, 64], &[1]];
    let mut specs = Vec::new();
    for ty in QuantType::ALL {
        for (i, shape) in shapes.iter().enumerate() {
            specs.push(TensorSpec::new(
                format!("{}.t{i}", ty.name()),
                ty,
                shape.to_vec(),
            ));
        }
    }
    specs
}

fn write(path: &Path, metadata: Vec<(String, MetaValue)>, specs: &[TensorSpec], reverse: bool) {
    let mut w = MqfWriter::create(path, metadata, specs.to_vec()).unwrap();
    let mut order: Vec<usize> = (0..specs.len()).collect();
    if reverse {
        order.reverse();
    }
    for i in order {
        let s = &specs[i];
        w.write_tensor(i, &tensor_bytes(s.ty, &s.shape, i as u64))
            .unwrap();
    }
    w.finish().unwrap();
}

fn check(path: &Path, metadata: &[(String, MetaValue)], specs: &[TensorSpec]) {
    let f = MqfFile::open(path).unwrap();
    assert_eq!(f.version(), (1, 0));
    assert_eq!(f.metadata().entries, metadata);
    assert_eq!(f.data_offset() % DATA_ALIGN, 0);
    assert_eq!(f.file_size(), std::fs::metadata(path).unwrap().len());
    assert_eq!(f.tensors().len(), specs.len());
    for (i, (s, info)) in specs.iter().zip(f.tensors()).enumerate() {
        assert_eq!(info.name, s.name);
        assert_eq!(info.ty, s.ty);
        assert_eq!(info.shape, s.shape);
        assert_eq!(info.offset % TENSOR_ALIGN, 0, "{}", s.name);
        assert_eq!(info.row_stride as usize, s.ty.row_bytes(info.cols()));
        let t = f.tensor(&s.name).unwrap();
        assert_eq!(t.data, tensor_bytes(s.ty, &s.shape, i as u64), "{}", s.name);
        assert_eq!(t.data.len(), info.rows() * info.row_stride as usize);
    }
    f.verify().unwrap();
}

#[test]
fn roundtrip_every_value_and_quant_type() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.mqf");
    let md = all_value_types();
    let specs = specs();
    write(&path, md.clone(), &specs, false);
    check(&path, &md, &specs);
}

#[test]
fn tensors_written_in_reverse_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rev.mqf");
    let md = all_value_types();
    let specs = specs();
    write(&path, md.clone(), &specs, true);
    check(&path, &md, &specs);
}

#[test]
fn layout_is_aligned_and_dense() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("layout.mqf");
    let specs = specs();
    write(&path, vec![], &specs, false);
    let f = MqfFile::open(&path).unwrap();
    assert_eq!(
        f.data_offset(),
        DATA_ALIGN,
        "a small header fits in one page"
    );
    let mut end = 0u64;
    for t in f.tensors() {
        // Each tensor sits at the first aligned offset after the previous one.
        assert_eq!(t.offset, end.div_ceil(TENSOR_ALIGN) * TENSOR_ALIGN);
        end = t.offset + t.len;
        let abs = f.data_offset() + t.offset;
        assert_eq!(abs % TENSOR_ALIGN, 0);
    }
    assert_eq!(f.file_size(), f.data_offset() + end);
    // Alignment gaps are zero.
    let bytes = std::fs::read(&path).unwrap();
    let mut prev_end = f.data_offset() as usize;
    for t in f.tensors() {
        let start = (f.data_offset() + t.offset) as usize;
        assert!(bytes[prev_end..start].iter().all(|&b| b == 0));
        prev_end = start + t.len as usize;
    }
}

#[test]
fn large_metadata_pushes_the_data_offset_to_a_later_page() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.mqf");
    let md = vec![(
        "tokenizer.huggingface.json".to_string(),
        MetaValue::Bytes(vec![b'x'; 3 * 4096 + 17]),
    )];
    let specs = vec![TensorSpec::new("w", QuantType::Q4_0, vec![3, 100])];
    write(&path, md.clone(), &specs, false);
    let f = MqfFile::open(&path).unwrap();
    assert_eq!(f.data_offset(), 4 * DATA_ALIGN);
    check(&path, &md, &specs);
}

#[test]
fn file_without_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.mqf");
    let md = vec![("general.name".to_string(), MetaValue::Str("x".into()))];
    MqfWriter::create(&path, md.clone(), vec![])
        .unwrap()
        .finish()
        .unwrap();
    let f = MqfFile::open(&path).unwrap();
    assert!(f.tensors().is_empty());
    assert_eq!(f.file_size(), f.data_offset());
    assert_eq!(f.metadata().entries, md);
    f.verify().unwrap();
    assert!(matches!(
        f.tensor("nope"),
        Err(mipha_runtime::Error::MissingTensor(n)) if n == "nope"
    ));
}

#[test]
fn rows_of_a_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rows.mqf");
    let specs = vec![TensorSpec::new("w", QuantType::Q8_0, vec![3, 40])];
    write(&path, vec![], &specs, false);
    let f = MqfFile::open(&path).unwrap();
    let t = f.tensor("w").unwrap();
    let all = tensor_bytes(QuantType::Q8_0, &[3, 40], 0);
    for r in 0..3 {
        assert_eq!(t.row(r).unwrap(), &all[r * 68..(r + 1) * 68]);
    }
    assert!(t.row(3).is_none());
}

#[test]
fn writing_the_same_path_twice_replaces_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.mqf");
    let first = vec![TensorSpec::new("w", QuantType::F32, vec![2, 8])];
    let second = vec![TensorSpec::new("v", QuantType::F16, vec![3])];
    let md1 = vec![("general.name".to_string(), MetaValue::Str("one".into()))];
    let md2 = vec![("general.name".to_string(), MetaValue::Str("two".into()))];
    write(&path, md1.clone(), &first, false);
    let old = MqfFile::open(&path).unwrap();

    // While the second file is being written, the destination is still the first.
    let mut w = MqfWriter::create(&path, md2.clone(), second.clone()).unwrap();
    w.write_tensor(0, &tensor_bytes(QuantType::F16, &[3], 0))
        .unwrap();
    check(&path, &md1, &first);
    w.finish().unwrap();

    check(&path, &md2, &second);
    // A reader that had the old file open keeps seeing it intact.
    assert_eq!(old.metadata().get_str("general.name").unwrap(), "one");
    assert_eq!(
        old.tensor("w").unwrap().data,
        tensor_bytes(QuantType::F32, &[2, 8], 0)
    );
    old.verify().unwrap();
    // No temporary files are left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["model.mqf"]);
}
