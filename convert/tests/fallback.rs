//! A tensor the requested type cannot hold (here: a value beyond f16's range) is
//! stored F32 instead, and the substitution is recorded in `general.quant_fallbacks`.

mod common;

use common::*;
use mipha_convert::{convert_checkpoint, ConvertOptions, QuantType};
use mipha_runtime::MqfFile;
use safetensors::Dtype;

#[test]
fn out_of_range_tensor_falls_back_to_f32() {
    let name = "model.layers.0.mlp.fc1.weight";
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    copy_side_files(&tiny_a(), &dir);
    let mut src = read_tensors(&tiny_a());
    src.get_mut(name).unwrap().values[7] = 1.0e5;
    write_weights(&dir, &raw_from(&src, Some(Dtype::F32)), 2);

    let out = tmp.path().join("f16.mqf");
    let r = convert_checkpoint(&ConvertOptions::new(&dir, &out, QuantType::F16)).unwrap();
    let line = format!("{name}: f16 -> f32 (max |x| = 1e5 exceeds the f16 range 6.5504e4)");
    assert_eq!(r.fallbacks, std::slice::from_ref(&line));
    let f = MqfFile::open(&out).unwrap();
    f.verify().unwrap();
    assert_eq!(
        f.metadata()
            .get_str_array("general.quant_fallbacks")
            .unwrap(),
        [line]
    );
    let t = f.tensor(name).unwrap();
    assert_eq!(t.info.ty, QuantType::F32);
    let s = &src[name];
    assert_eq!(t.data, expected_bytes(QuantType::F32, &s.shape, &s.values));
    // Every other matrix keeps the requested type.
    let others = f
        .tensors()
        .iter()
        .filter(|t| t.ty == QuantType::F16)
        .count();
    assert!(others > 10);

    // Q8_0's f16 scale is max/127: 1e5 fits, so no fallback there.
    let out = tmp.path().join("q8.mqf");
    let r = convert_checkpoint(&ConvertOptions::new(&dir, &out, QuantType::Q8_0)).unwrap();
    assert!(r.fallbacks.is_empty());
}
