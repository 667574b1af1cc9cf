//! `MqfFile::open` / `verify` on damaged, foreign and hand-crafted files: every case
//! must end in the right error (never a panic).

use std::path::{Path, PathBuf};

use mipha_runtime::format::raw::{self, Preamble, PREAMBLE_LEN};
use mipha_runtime::{Error, MetaValue, MqfFile, MqfWriter, QuantType, TensorSpec};

/// A small valid file: three tensors `a`, `b` (same size, adjacent) and `c` (Q8_0,
/// padded rows), plus metadata including `future.key`, which tests retag.
fn small_file(dir: &Path) -> PathBuf {
    let path = dir.join("small.mqf");
    let md = vec![
        ("general.name".to_string(), MetaValue::Str("tiny".into())),
        ("future.key".to_string(), MetaValue::U32(7)),
        (
            "future.arr".to_string(),
            MetaValue::Array(vec![MetaValue::U64(1), MetaValue::U64(2)]),
        ),
        ("lm.hidden_size".to_string(), MetaValue::U64(16)),
    ];
    let specs = vec![
        TensorSpec::new("a", QuantType::F32, vec![4, 16]),
        TensorSpec::new("b", QuantType::F32, vec![4, 16]),
        TensorSpec::new("c", QuantType::Q8_0, vec![2, 40]),
    ];
    let mut w = MqfWriter::create(&path, md, specs).unwrap();
    for i in 0..3 {
        let len = w.expected_len(i).unwrap() as usize;
        let data: Vec<u8> = (0..len).map(|j| (j * 7 + i * 13) as u8).collect();
        w.write_tensor(i, &data).unwrap();
    }
    w.finish().unwrap();
    path
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

fn write_to(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn open_err(p: &Path) -> Error {
    match MqfFile::open(p) {
        Ok(_) => panic!("{} opened, expected an error", p.display()),
        Err(e) => e,
    }
}

fn header_end(bytes: &[u8]) -> usize {
    PREAMBLE_LEN + Preamble::decode(bytes).unwrap().header_len as usize
}

/// Position, inside the file, of the first byte after the length-prefixed string `s`
/// in the header (where a metadata entry's tag or a tensor entry's quant id lives).
fn after_string(bytes: &[u8], s: &str) -> usize {
    let mut needle = (s.len() as u32).to_le_bytes().to_vec();
    needle.extend_from_slice(s.as_bytes());
    let header = &bytes[PREAMBLE_LEN..header_end(bytes)];
    let at = header
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("`{s}` not in header"));
    PREAMBLE_LEN + at + needle.len()
}

/// Field offsets inside a tensor entry, relative to `after_string(name)`, for `ndim` dims.
struct Fields {
    id: usize,
    dims: usize,
    row_stride: usize,
    offset: usize,
}

fn tensor_fields(bytes: &[u8], name: &str) -> Fields {
    let p = after_string(bytes, name);
    let ndim = u32::from_le_bytes(bytes[p + 4..p + 8].try_into().unwrap()) as usize;
    let dims = p + 8;
    Fields {
        id: p,
        dims,
        row_stride: dims + 8 * ndim,
        offset: dims + 8 * ndim + 8,
    }
}

fn get_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

fn put_u64(bytes: &mut [u8], at: usize, v: u64) {
    bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn set_preamble(bytes: &mut [u8], f: impl FnOnce(&mut Preamble)) {
    let mut p = Preamble::decode(bytes).unwrap();
    f(&mut p);
    bytes[..PREAMBLE_LEN].copy_from_slice(&p.encode());
}

/// Patches the header and recomputes its checksum, then returns the open error.
fn patched_err(dir: &Path, name: &str, patch: impl FnOnce(&mut [u8])) -> Error {
    let mut bytes = read(&small_file(dir));
    patch(&mut bytes);
    assert!(raw::fix_header_checksum(&mut bytes));
    open_err(&write_to(dir, name, &bytes))
}

fn corrupt_detail(e: &Error) -> &str {
    match e {
        Error::Corrupt { detail, .. } => detail,
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn truncated_files_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = read(&small_file(dir.path()));
    let data_offset = Preamble::decode(&bytes).unwrap().data_offset as usize;
    let cuts = [
        4,
        20,
        PREAMBLE_LEN - 1,
        PREAMBLE_LEN,
        PREAMBLE_LEN + 10,
        header_end(&bytes) - 1,
        data_offset,
        data_offset + 5,
        bytes.len() - 1,
    ];
    for cut in cuts {
        let p = write_to(dir.path(), "cut.mqf", &bytes[..cut]);
        let e = open_err(&p);
        let detail = corrupt_detail(&e);
        assert!(detail.contains("truncated"), "cut at {cut}: {e}");
        if cut >= PREAMBLE_LEN {
            assert!(
                detail.contains(&format!("expected {} bytes, found {cut}", bytes.len())),
                "cut at {cut}: {e}"
            );
        }
        assert!(
            e.to_string().contains("cut.mqf"),
            "error names the path: {e}"
        );
    }
}

#[test]
fn trailing_bytes_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = read(&small_file(dir.path()));
    bytes.extend_from_slice(&[0; 3]);
    let e = open_err(&write_to(dir.path(), "long.mqf", &bytes));
    assert!(corrupt_detail(&e).contains("trailing"), "{e}");
}

#[test]
fn flipped_header_byte_fails_the_header_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = read(&small_file(dir.path()));
    let at = after_string(&bytes, "general.name") + 10;
    bytes[at] ^= 0x20;
    let e = open_err(&write_to(dir.path(), "flip.mqf", &bytes));
    assert!(corrupt_detail(&e).contains("header checksum"), "{e}");
}

#[test]
fn flipped_data_byte_opens_but_verify_names_the_first_bad_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = small_file(dir.path());
    let mut bytes = read(&path);
    let (b_at, c_at) = {
        let f = MqfFile::open(&path).unwrap();
        let base = f.data_offset();
        let t = |n: &str| (base + f.tensor(n).unwrap().info.offset) as usize;
        (t("b"), t("c"))
    };
    bytes[c_at + 3] ^= 1;
    let p = write_to(dir.path(), "flip.mqf", &bytes);
    let f = MqfFile::open(&p).unwrap();
    match f.verify() {
        Err(Error::TensorChecksum {
            tensor,
            stored,
            computed,
            ..
        }) => {
            assert_eq!(tensor, "c");
            assert_ne!(stored, computed);
        }
        other => panic!("expected a checksum error for `c`, got {other:?}"),
    }
    assert!(f.verify_tensor("a").is_ok());
    assert!(f.verify_tensor("c").is_err());

    // Two bad tensors: the first in index order is reported.
    bytes[b_at + 100] ^= 0x80;
    let p = write_to(dir.path(), "flip2.mqf", &bytes);
    let e = MqfFile::open(&p).unwrap().verify().unwrap_err();
    assert!(
        matches!(&e, Error::TensorChecksum { tensor, .. } if tensor == "b"),
        "{e}"
    );
    assert!(e.to_string().contains("flip2.mqf"), "{e}");
}

fn not_mqf_detail(e: &Error) -> &str {
    match e {
        Error::NotMqf { detail, .. } => detail,
        other => panic!("expected NotMqf, got {other:?}"),
    }
}

#[test]
fn gguf_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = b"GGUF".to_vec();
    bytes.extend_from_slice(&3u32.to_le_bytes());
    bytes.extend_from_slice(&[0u8; 40]);
    let e = open_err(&write_to(dir.path(), "model.gguf", &bytes));
    let d = not_mqf_detail(&e);
    assert!(d.contains("GGUF") && d.contains("version 3"), "{e}");
    assert!(e.to_string().contains("model.gguf"), "{e}");
}

#[test]
fn safetensors_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let json = br#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(json);
    bytes.extend_from_slice(&1.0f32.to_le_bytes());
    let e = open_err(&write_to(dir.path(), "model.safetensors", &bytes));
    assert!(not_mqf_detail(&e).contains("safetensors"), "{e}");
}

#[test]
fn random_bytes_show_the_unknown_magic() {
    let dir = tempfile::tempdir().unwrap();
    let bytes: Vec<u8> = (0..1000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let e = open_err(&write_to(dir.path(), "noise.bin", &bytes));
    let d = not_mqf_detail(&e);
    assert!(d.contains("unknown magic"), "{e}");
    let hex = format!("{:02x} {:02x}", bytes[0], bytes[1]);
    assert!(d.contains(&hex), "shows the first bytes: {e}");
}

#[test]
fn empty_file_is_not_mqf() {
    let dir = tempfile::tempdir().unwrap();
    let e = open_err(&write_to(dir.path(), "empty.mqf", &[]));
    assert!(not_mqf_detail(&e).contains("empty"), "{e}");
}

#[test]
fn missing_file_is_an_io_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let e = open_err(&dir.path().join("nope.mqf"));
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    assert!(e.to_string().contains("nope.mqf"), "{e}");
}

#[test]
fn unknown_quant_type_names_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let e = patched_err(dir.path(), "quant.mqf", |b| {
        let at = tensor_fields(b, "b").id;
        b[at..at + 4].copy_from_slice(&77u32.to_le_bytes());
    });
    match &e {
        Error::UnknownQuantType { tensor, id, .. } => {
            assert_eq!(tensor, "b");
            assert_eq!(*id, 77);
        }
        other => panic!("expected UnknownQuantType, got {other:?}"),
    }
}

#[test]
fn big_endian_file_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = read(&small_file(dir.path()));
    bytes[8..12].copy_from_slice(&0x0102_0304u32.to_be_bytes());
    let e = open_err(&write_to(dir.path(), "be.mqf", &bytes));
    assert!(matches!(e, Error::Unsupported { .. }), "{e:?}");
    assert!(e.to_string().contains("big-endian"), "{e}");

    bytes[8..12].copy_from_slice(&[9, 9, 9, 9]);
    let e = open_err(&write_to(dir.path(), "bom.mqf", &bytes));
    assert!(corrupt_detail(&e).contains("byte-order mark"), "{e}");
}

#[test]
fn newer_major_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = read(&small_file(dir.path()));
    set_preamble(&mut bytes, |p| {
        p.major = 2;
        p.minor = 5;
    });
    let e = open_err(&write_to(dir.path(), "v2.mqf", &bytes));
    assert!(
        matches!(
            e,
            Error::UnsupportedVersion {
                major: 2,
                minor: 5,
                supported: 1,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn major_zero_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = read(&small_file(dir.path()));
    set_preamble(&mut bytes, |p| p.major = 0);
    let e = open_err(&write_to(dir.path(), "v0.mqf", &bytes));
    assert!(corrupt_detail(&e).contains("version 0"), "{e}");
}

/// Retags `future.key` (u32) with tag 42 and `future.arr`'s element tag with 43.
fn unknown_tags(b: &mut [u8]) {
    let at = after_string(b, "future.key");
    b[at] = 42;
    let at = after_string(b, "future.arr");
    // tag, value_len, then the array's element tag.
    b[at + 9] = 43;
}

#[test]
fn newer_minor_skips_unknown_metadata_types() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = read(&small_file(dir.path()));
    unknown_tags(&mut bytes);
    set_preamble(&mut bytes, |p| p.minor = 1);
    assert!(raw::fix_header_checksum(&mut bytes));
    let f = MqfFile::open(write_to(dir.path(), "v1_1.mqf", &bytes)).unwrap();
    assert_eq!(f.version(), (1, 1));
    let keys: Vec<&str> = f.metadata().iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["general.name", "lm.hidden_size"]);
    assert_eq!(f.metadata().get_u64("lm.hidden_size").unwrap(), 16);
    f.verify().unwrap();
}

#[test]
fn unknown_metadata_type_in_a_known_minor_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let e = patched_err(dir.path(), "tag.mqf", unknown_tags);
    let d = corrupt_detail(&e);
    assert!(
        d.contains("future.key") && d.contains("unknown type tag 42"),
        "{e}"
    );
}

#[test]
fn bytes_after_the_tensor_index_need_a_newer_minor() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = read(&small_file(dir.path()));
    // The padding up to the data offset is zero, so growing header_len appends
    // zero bytes after the index.
    set_preamble(&mut bytes, |p| p.header_len += 5);
    assert!(raw::fix_header_checksum(&mut bytes));
    let e = open_err(&write_to(dir.path(), "extra.mqf", &bytes));
    assert!(corrupt_detail(&e).contains("after the tensor index"), "{e}");

    set_preamble(&mut bytes, |p| p.minor = 3);
    MqfFile::open(write_to(dir.path(), "extra13.mqf", &bytes)).unwrap();
}

#[test]
fn tensor_running_past_the_end_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let e = patched_err(dir.path(), "past.mqf", |b| {
        let at = tensor_fields(b, "c").offset;
        let v = get_u64(b, at);
        put_u64(b, at, v + 64);
    });
    let d = corrupt_detail(&e);
    assert!(d.contains("`c`") && d.contains("past the end"), "{e}");

    // An offset so large that offset + len overflows u64.
    let e = patched_err(dir.path(), "wrap.mqf", |b| {
        let at = tensor_fields(b, "c").offset;
        put_u64(b, at, u64::MAX - 63);
    });
    assert!(corrupt_detail(&e).contains("past the end"), "{e}");
}

#[test]
fn misaligned_offset_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let e = patched_err(dir.path(), "align.mqf", |b| {
        let at = tensor_fields(b, "a").offset;
        put_u64(b, at, 8);
    });
    assert!(corrupt_detail(&e).contains("multiple of 64"), "{e}");
}

#[test]
fn row_stride_mismatch_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let e = patched_err(dir.path(), "stride.mqf", |b| {
        let at = tensor_fields(b, "c").row_stride;
        let v = get_u64(b, at);
        put_u64(b, at, v + 1);
    });
    let d = corrupt_detail(&e);
    assert!(d.contains("`c`") && d.contains("row_stride"), "{e}");
}

#[test]
fn shape_changes_without_length_changes_are_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    // Same cols (so the stride matches) but more rows than the stored length.
    let e = patched_err(dir.path(), "rows.mqf", |b| {
        let at = tensor_fields(b, "a").dims;
        put_u64(b, at, 5);
    });
    assert!(corrupt_detail(&e).contains("byte length"), "{e}");

    let e = patched_err(dir.path(), "zero.mqf", |b| {
        let at = tensor_fields(b, "a").dims;
        put_u64(b, at, 0);
    });
    assert!(corrupt_detail(&e).contains("zero dim"), "{e}");

    let e = patched_err(dir.path(), "huge.mqf", |b| {
        let at = tensor_fields(b, "a").dims;
        put_u64(b, at, u64::MAX / 2);
    });
    assert!(corrupt_detail(&e).contains("overflows"), "{e}");

    let e = patched_err(dir.path(), "ndim.mqf", |b| {
        let at = tensor_fields(b, "a").id + 4;
        b[at..at + 4].copy_from_slice(&9u32.to_le_bytes());
    });
    assert!(corrupt_detail(&e).contains("9 dims"), "{e}");
}

#[test]
fn overlapping_tensors_are_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let e = patched_err(dir.path(), "overlap.mqf", |b| {
        let a = get_u64(b, tensor_fields(b, "a").offset);
        let at = tensor_fields(b, "b").offset;
        put_u64(b, at, a + 64);
    });
    let d = corrupt_detail(&e);
    assert!(
        d.contains("overlap") && d.contains("`a`") && d.contains("`b`"),
        "{e}"
    );
}

#[test]
fn duplicate_names_and_keys_are_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let e = patched_err(dir.path(), "dupt.mqf", |b| {
        let at = after_string(b, "b") - 1;
        b[at] = b'a';
    });
    assert!(corrupt_detail(&e).contains("duplicate tensor name"), "{e}");

    let e = patched_err(dir.path(), "dupk.mqf", |b| {
        // "future.arr" -> "future.key"
        let at = after_string(b, "future.arr") - 3;
        b[at..at + 3].copy_from_slice(b"key");
    });
    assert!(corrupt_detail(&e).contains("duplicate metadata key"), "{e}");
}

#[test]
fn malformed_metadata_values_are_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    // value_len of a u32 claimed to be 5.
    let e = patched_err(dir.path(), "vlen.mqf", |b| {
        let at = after_string(b, "future.key") + 1;
        put_u64(b, at, 5);
    });
    assert!(corrupt_detail(&e).contains("future.key"), "{e}");

    // Invalid UTF-8 in a string value.
    let e = patched_err(dir.path(), "utf8.mqf", |b| {
        let at = after_string(b, "general.name") + 9;
        b[at] = 0xff;
    });
    assert!(corrupt_detail(&e).contains("UTF-8"), "{e}");

    // An element count the value cannot hold.
    let e = patched_err(dir.path(), "count.mqf", |b| {
        let at = after_string(b, "future.arr") + 10;
        put_u64(b, at, u64::MAX);
    });
    assert!(corrupt_detail(&e).contains("future.arr"), "{e}");

    // A metadata count far beyond the header.
    let e = patched_err(dir.path(), "mcount.mqf", |b| {
        put_u64(b, PREAMBLE_LEN, u64::MAX);
    });
    corrupt_detail(&e);
}

#[test]
fn header_bounds_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = read(&small_file(dir.path()));
    let len = bytes.len() as u64;
    set_preamble(&mut bytes, |p| p.header_len = u64::MAX - 10);
    corrupt_detail(&open_err(&write_to(dir.path(), "hl.mqf", &bytes)));

    let mut bytes = read(&small_file(dir.path()));
    set_preamble(&mut bytes, |p| p.data_offset = len + 4096);
    corrupt_detail(&open_err(&write_to(dir.path(), "do.mqf", &bytes)));

    let mut bytes = read(&small_file(dir.path()));
    set_preamble(&mut bytes, |p| p.data_offset += 64);
    let e = open_err(&write_to(dir.path(), "do2.mqf", &bytes));
    assert!(corrupt_detail(&e).contains("multiple of 4096"), "{e}");
}

#[test]
fn unfinished_writer_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("out.mqf");
    let specs = vec![
        TensorSpec::new("x", QuantType::F32, vec![8]),
        TensorSpec::new("y", QuantType::F32, vec![8]),
    ];
    {
        let mut w = MqfWriter::create(&dest, vec![], specs.clone()).unwrap();
        w.write_tensor(0, &[0u8; 32]).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "temp file exists"
        );
        // dropped here
    }
    assert!(!dest.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

    // finish() with a tensor missing fails and also cleans up.
    let mut w = MqfWriter::create(&dest, vec![], specs).unwrap();
    w.write_tensor(1, &[0u8; 32]).unwrap();
    let e = w.finish().unwrap_err();
    assert!(e.to_string().contains("`x` was never written"), "{e}");
    assert!(!dest.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// Opens (and, when that succeeds, fully exercises) a file; must never panic.
fn exercise(p: &Path) {
    if let Ok(f) = MqfFile::open(p) {
        let _ = f.verify();
        for t in f.tensors() {
            let r = f.tensor(&t.name).unwrap();
            assert_eq!(r.data.len() as u64, t.len);
            let _ = (t.rows(), t.cols(), t.numel());
        }
        for (k, _) in f.metadata().iter() {
            let _ = f.metadata().get_u64(k);
            let _ = f.metadata().get_f64_array(k);
        }
    }
}

#[test]
fn single_byte_flips_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let orig = read(&small_file(dir.path()));
    let end = header_end(&orig);
    let p = dir.path().join("fuzz.mqf");
    for at in 0..end {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut b = orig.clone();
            b[at] ^= mask;
            std::fs::write(&p, &b).unwrap();
            exercise(&p);
            // Past the checksum, so the flip reaches the parser.
            if at >= PREAMBLE_LEN {
                raw::fix_header_checksum(&mut b);
                std::fs::write(&p, &b).unwrap();
                exercise(&p);
            }
        }
    }
    let data_offset = Preamble::decode(&orig).unwrap().data_offset as usize;
    let mut s = 0x1234_5678u64;
    for _ in 0..64 {
        s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let at = data_offset + (s >> 33) as usize % (orig.len() - data_offset);
        let mut b = orig.clone();
        b[at] ^= 0x10;
        std::fs::write(&p, &b).unwrap();
        let f = MqfFile::open(&p).unwrap();
        // Flips in alignment gaps are not covered by any checksum.
        let in_tensor = f.tensors().iter().any(|t| {
            let start = (f.data_offset() + t.offset) as usize;
            (start..start + t.len as usize).contains(&at)
        });
        assert_eq!(f.verify().is_err(), in_tensor, "flip at {at}");
    }
}
