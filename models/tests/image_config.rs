//! `ImageConfig::from_metadata`: every parameter comes from the `image.*` keys;
//! missing or unusable values are errors that name the key.

use mipha_models::image::{Aspect, ImageConfig, Resample};
use mipha_runtime::{MetaValue, Metadata};

fn arr(v: Vec<MetaValue>) -> MetaValue {
    MetaValue::Array(v)
}

fn base() -> Metadata {
    let mut m = Metadata::new();
    m.insert(
        "image.size",
        arr(vec![MetaValue::U64(384), MetaValue::U64(320)]),
    );
    m.insert(
        "image.mean",
        arr(vec![
            MetaValue::F64(0.48),
            MetaValue::F64(0.45),
            MetaValue::F64(0.4),
        ]),
    );
    m.insert(
        "image.std",
        arr(vec![
            MetaValue::F64(0.26),
            MetaValue::F64(0.26),
            MetaValue::F64(0.27),
        ]),
    );
    m.insert("image.rescale_factor", MetaValue::F64(1.0 / 255.0));
    m.insert("image.resample", MetaValue::Str("bicubic".into()));
    m.insert("image.aspect", MetaValue::Str("pad".into()));
    m.insert(
        "image.pad_color",
        arr(vec![
            MetaValue::U64(122),
            MetaValue::U64(116),
            MetaValue::U64(104),
        ]),
    );
    m
}

fn error_with(key: &str, value: Option<MetaValue>) -> String {
    let mut m = base();
    match value {
        Some(v) => m.insert(key, v),
        None => m.entries.retain(|(k, _)| k != key),
    }
    ImageConfig::from_metadata(&m).unwrap_err().to_string()
}

#[test]
fn reads_every_key() {
    let c = ImageConfig::from_metadata(&base()).unwrap();
    assert_eq!((c.height(), c.width()), (384, 320));
    assert_eq!(c.mean(), [0.48, 0.45, 0.4]);
    assert_eq!(c.std(), [0.26, 0.26, 0.27]);
    assert_eq!(c.rescale_factor(), 1.0 / 255.0);
    assert_eq!(c.resample(), Resample::Bicubic);
    assert_eq!(c.aspect(), Aspect::Pad);
    assert_eq!(c.pad_color(), [122, 116, 104]);
    assert_eq!(c.pixel_len(), 3 * 384 * 320);
}

#[test]
fn missing_keys_are_named() {
    for key in [
        "image.size",
        "image.mean",
        "image.std",
        "image.rescale_factor",
        "image.resample",
        "image.aspect",
        "image.pad_color",
    ] {
        let e = error_with(key, None);
        assert!(e.contains(key), "{key}: {e}");
    }
}

#[test]
fn unknown_resample_and_aspect_are_refused() {
    let e = error_with("image.resample", Some(MetaValue::Str("nearest".into())));
    assert!(
        e.contains("image.resample") && e.contains("\"nearest\""),
        "{e}"
    );
    assert!(e.contains("bicubic"), "lists the supported filters: {e}");
    let e = error_with("image.aspect", Some(MetaValue::Str("anyres".into())));
    assert!(
        e.contains("image.aspect") && e.contains("\"anyres\"") && e.contains("pad"),
        "{e}"
    );
    // Other PIL convolution filters are accepted.
    let mut m = base();
    m.insert("image.resample", MetaValue::Str("lanczos".into()));
    assert_eq!(
        ImageConfig::from_metadata(&m).unwrap().resample(),
        Resample::Lanczos
    );
}

#[test]
fn bad_values_are_refused() {
    let cases = [
        ("image.size", arr(vec![MetaValue::U64(384)])),
        (
            "image.size",
            arr(vec![MetaValue::U64(0), MetaValue::U64(384)]),
        ),
        (
            "image.size",
            arr(vec![MetaValue::U64(1 << 40), MetaValue::U64(384)]),
        ),
        ("image.size", MetaValue::U64(384)),
        ("image.mean", arr(vec![MetaValue::F64(0.5); 2])),
        ("image.mean", arr(vec![MetaValue::F64(f64::NAN); 3])),
        (
            "image.std",
            arr(vec![
                MetaValue::F64(0.5),
                MetaValue::F64(0.0),
                MetaValue::F64(0.5),
            ]),
        ),
        ("image.rescale_factor", MetaValue::F64(-1.0)),
        ("image.rescale_factor", MetaValue::Str("1/255".into())),
        ("image.pad_color", arr(vec![MetaValue::U64(256); 3])),
        ("image.pad_color", arr(vec![MetaValue::I64(-1); 3])),
        ("image.resample", MetaValue::U64(3)),
    ];
    for (key, value) in cases {
        let shown = format!("{value:?}");
        let e = error_with(key, Some(value));
        assert!(e.contains(key), "{key} = {shown}: {e}");
    }
}

/// `square` (what the converter writes when config.json names no aspect) resizes
/// straight to the model size without padding: it agrees with `pad` on square
/// pictures and differs on others.
#[test]
fn square_aspect_resizes_without_padding() {
    use mipha_models::image::{preprocess, RgbImage};
    let config = |aspect: &str| {
        let mut m = base();
        m.insert(
            "image.size",
            arr(vec![MetaValue::U64(32), MetaValue::U64(32)]),
        );
        m.insert("image.aspect", MetaValue::Str(aspect.into()));
        ImageConfig::from_metadata(&m).unwrap()
    };
    let (square, pad) = (config("square"), config("pad"));
    assert_eq!(square.aspect(), Aspect::Square);
    let picture = |w: u32, h: u32| {
        let data: Vec<u8> = (0..w * h * 3).map(|i| (i * 37 % 251) as u8).collect();
        RgbImage::new(w, h, data).unwrap()
    };
    let sq = picture(17, 17);
    assert!(preprocess(&sq, &square).pixels == preprocess(&sq, &pad).pixels);
    let wide = picture(23, 11);
    let a = preprocess(&wide, &square).pixels;
    assert_eq!(a.len(), 3 * 32 * 32);
    assert!(a != preprocess(&wide, &pad).pixels, "square must not pad");
}
