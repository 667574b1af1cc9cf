//! A conversion that fails after the writer started leaves no output file (the
//! writer works on a temporary file renamed into place only by `finish`), and an
//! existing file at the destination is left as it was.

mod common;

use common::*;
use mipha_convert::{convert_checkpoint, ConvertError, ConvertOptions, QuantType};

#[test]
fn failure_midway_leaves_no_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.mqf");
    let mut opts = ConvertOptions::new(tiny_a(), &out, QuantType::Q4_0);
    opts.fail_after_tensors = Some(20);
    let e = convert_checkpoint(&opts).unwrap_err();
    assert!(
        matches!(e, ConvertError::Interrupted { written: 20 }),
        "{e:?}"
    );
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn failure_midway_keeps_the_previous_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.mqf");
    std::fs::write(&out, b"previous contents").unwrap();
    let mut opts = ConvertOptions::new(tiny_a(), &out, QuantType::F16);
    opts.fail_after_tensors = Some(1);
    convert_checkpoint(&opts).unwrap_err();
    assert_eq!(std::fs::read(&out).unwrap(), b"previous contents");
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);

    // And a successful run replaces it.
    opts.fail_after_tensors = None;
    convert_checkpoint(&opts).unwrap();
    mipha_runtime::MqfFile::open(&out)
        .unwrap()
        .verify()
        .unwrap();
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}
