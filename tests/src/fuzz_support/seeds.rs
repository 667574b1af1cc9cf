//! Valid inputs for every target, built in code with the project's own writers
//! (the converter, the `.mqf` writer, the `image` crate's encoders): the seed
//! corpora of the cargo-fuzz targets and the starting points of the replay
//! test's mutations. Nothing here is a committed binary.

use std::collections::HashMap;
use std::path::Path;

use mipha_convert::config::ModelConfig;
use serde_json::{json, Value};

use super::rng::Rng;
use super::targets::{self, Bundle};

/// A named input.
pub type Seed = (String, Vec<u8>);

/// tiny-a's `config.json` shrunk to the smallest model every code path still
/// accepts: a 16-wide, one-layer language model over a 320-token vocabulary and
/// a 16-wide SigLIP tower on 8x8-pixel pictures of four 4x4 patches.
pub fn micro_config() -> Value {
    let path = crate::fixture("tiny-a/checkpoint/config.json");
    let mut v: Value = serde_json::from_slice(&read(&path)).expect("tiny-a config.json");
    v["_name_or_path"] = json!("mipha-fuzz-micro");
    v["vocab_size"] = json!(MICRO_VOCAB);
    v["hidden_size"] = json!(16);
    v["num_attention_heads"] = json!(2);
    v["num_key_value_heads"] = json!(2);
    v["intermediate_size"] = json!(32);
    v["num_hidden_layers"] = json!(1);
    v["max_position_embeddings"] = json!(512);
    let vt = &mut v["vision_config"]["vision_tower"];
    vt["hidden_size"] = json!(16);
    vt["num_attention_heads"] = json!(2);
    vt["intermediate_size"] = json!(32);
    vt["num_hidden_layers"] = json!(2);
    vt["image_size"] = json!(MICRO_IMAGE);
    vt["patch_size"] = json!(4);
    let mp = &mut v["vision_config"]["mm_projector"];
    mp["hidden_size"] = json!(16);
    mp["mm_hidden_size"] = json!(16);
    v
}

/// Pixels per side of the micro model's pictures.
pub const MICRO_IMAGE: usize = 8;
/// The micro tokenizer's ids: 256 bytes, 60 merges, 4 added tokens.
pub const MICRO_VOCAB: usize = 320;

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// tiny-a's `preprocessor_config.json` at the micro model's size.
pub fn micro_preprocessor() -> Value {
    let path = crate::fixture("tiny-a/checkpoint/preprocessor_config.json");
    let mut v: Value = serde_json::from_slice(&read(&path)).expect("preprocessor_config.json");
    v["size"] = json!({"height": MICRO_IMAGE, "width": MICRO_IMAGE});
    v
}

/// The Phi-2 `tokenizer.json` cut down to its 256 byte tokens, the merges among
/// them (up to id 315) and four added tokens (`<|endoftext|>` first, as id 316,
/// then three of Phi-2's runs of spaces): the same model type, pre-tokenizer and
/// decoder, 30 times smaller.
pub fn micro_tokenizer_json() -> Vec<u8> {
    let mut t: Value = serde_json::from_slice(mipha_convert::tokenizer::REFERENCE_TOKENIZER_JSON)
        .expect("reference tokenizer.json");
    let merges_kept = MICRO_VOCAB - 256 - 4;
    let vocab: serde_json::Map<String, Value> = t["model"]["vocab"]
        .as_object()
        .expect("vocab")
        .iter()
        .filter(|(_, id)| {
            id.as_u64()
                .is_some_and(|id| id < (256 + merges_kept) as u64)
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let merges: Vec<Value> = t["model"]["merges"]
        .as_array()
        .expect("merges")
        .iter()
        .filter(|m| {
            let parts: Vec<&str> = match m {
                Value::Array(p) => p.iter().filter_map(Value::as_str).collect(),
                Value::String(s) => s.split(' ').collect(),
                _ => Vec::new(),
            };
            parts.len() == 2
                && vocab.contains_key(parts[0])
                && vocab.contains_key(parts[1])
                && vocab.contains_key(&format!("{}{}", parts[0], parts[1]))
        })
        .cloned()
        .collect();
    let mut added: Vec<Value> = t["added_tokens"].as_array().expect("added_tokens")[..4].to_vec();
    for (i, a) in added.iter_mut().enumerate() {
        a["id"] = json!(256 + merges_kept + i);
    }
    t["model"]["vocab"] = Value::Object(vocab);
    t["model"]["merges"] = Value::Array(merges);
    t["added_tokens"] = Value::Array(added);
    serde_json::to_vec(&t).expect("json")
}

/// bf16 bytes of `n` small values (LayerNorm gains near 1).
fn values(rng: &mut Rng, n: usize, gain: bool) -> Vec<u8> {
    (0..n)
        .flat_map(|_| {
            let u = (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            let x = if gain { 1.0 + 0.04 * u } else { 0.2 * u };
            half::bf16::from_f32(x).to_le_bytes()
        })
        .collect()
}

/// The micro model's checkpoint files (config, preprocessor, tokenizer.json,
/// bf16 weights in `shards` files, with an index when there are several).
pub fn micro_checkpoint(shards: usize) -> Vec<Seed> {
    let config = micro_config();
    let cfg = ModelConfig::from_value(Path::new("config.json"), &config).expect("micro config");
    // The checkpoint holds every tower layer and the post-LN, as the real one does.
    let mut full = cfg.clone();
    full.vision.kept_layers = full.vision.num_hidden_layers;
    let mut tensors: Vec<(String, Vec<usize>)> = mipha_convert::plan::expected_tensors(&full)
        .into_iter()
        .map(|e| (e.name, e.shape))
        .collect();
    for p in ["weight", "bias"] {
        tensors.push((
            format!("{}post_layernorm.{p}", mipha_convert::plan::VISION_PREFIX),
            vec![cfg.vision.hidden_size],
        ));
    }
    let mut rng = Rng::new(0x3d5e_ed00);
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(name, shape)| {
            let n = shape.iter().product();
            let gain = name.contains("norm") && name.ends_with("weight");
            let bytes = values(&mut rng, n, gain);
            (name, shape, bytes)
        })
        .collect();
    let mut files = vec![
        ("config.json".to_string(), pretty(&config)),
        (
            "preprocessor_config.json".to_string(),
            pretty(&micro_preprocessor()),
        ),
        ("tokenizer.json".to_string(), micro_tokenizer_json()),
    ];
    let shards = shards.max(1);
    let shard_name = |i: usize| {
        if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{shards:05}.safetensors", i + 1)
        }
    };
    let mut weight_map = serde_json::Map::new();
    for s in 0..shards {
        let mine: Vec<&(String, Vec<usize>, Vec<u8>)> = data
            .iter()
            .enumerate()
            .filter(|(i, _)| i % shards == s)
            .map(|(_, t)| t)
            .collect();
        let views = mine.iter().map(|(name, shape, bytes)| {
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::BF16,
                shape.clone(),
                bytes,
            )
            .expect("view");
            (name.clone(), view)
        });
        let info: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        let bytes = safetensors::serialize(views, Some(info)).expect("serialize");
        for (name, _, _) in &mine {
            weight_map.insert(name.clone(), json!(shard_name(s)));
        }
        files.push((shard_name(s), bytes));
    }
    if shards > 1 {
        let total: usize = data.iter().map(|t| t.2.len()).sum();
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        files.push((
            mipha_convert::checkpoint::INDEX_FILE.to_string(),
            pretty(&index),
        ));
    }
    files
}

fn pretty(v: &Value) -> Vec<u8> {
    serde_json::to_vec_pretty(v).expect("json")
}

/// Writes checkpoint files into `dir` (created).
pub fn write_files(dir: &Path, files: &[Seed]) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

/// Converts the micro checkpoint with `quant` for the language model and
/// `vision_quant` for the tower, and returns the `.mqf` file's bytes.
pub fn micro_mqf(quant: &str, vision_quant: &str) -> Vec<u8> {
    let tmp = targets::scratch_dir();
    let dir = tmp.join(format!("micro-ckpt-{quant}-{vision_quant}"));
    write_files(&dir, &micro_checkpoint(2));
    let out = crate::convert(&dir, &dir, quant, vision_quant);
    let bytes = read(&out);
    let _ = std::fs::remove_dir_all(&dir);
    bytes
}

/// Seeds of the `.mqf` target: the micro model in f32 and in quantized
/// layouts; with `tiny_a`, also tiny-a with the full Phi-2 tokenizer (6 MB,
/// slower to load).
pub fn mqf(tiny_a: bool) -> Vec<Seed> {
    let mut out = vec![
        ("micro-f32.mqf".to_string(), micro_mqf("f32", "f32")),
        ("micro-q8_0-f16.mqf".to_string(), micro_mqf("q8_0", "f16")),
        ("micro-q4_0-q8_0.mqf".to_string(), micro_mqf("q4_0", "q8_0")),
    ];
    if tiny_a {
        let tmp = targets::scratch_dir().join("tiny-a-seed");
        std::fs::create_dir_all(&tmp).unwrap();
        let p = crate::convert(&crate::fixture("tiny-a/checkpoint"), &tmp, "q4_0", "q8_0");
        out.push(("tiny-a-q4_0.mqf".to_string(), read(&p)));
        let _ = std::fs::remove_dir_all(&tmp);
    }
    out
}

/// Seeds of the checkpoint target: bundles of a checkpoint folder's files.
pub fn checkpoint() -> Vec<Seed> {
    let sharded = micro_checkpoint(2);
    let single = micro_checkpoint(1);
    let mut no_pre = single.clone();
    no_pre.retain(|(n, _)| n != "preprocessor_config.json");
    vec![
        (
            "micro-2-shards.bundle".into(),
            Bundle::from_files(&sharded).encode(),
        ),
        (
            "micro-1-file.bundle".into(),
            Bundle::from_files(&single).encode(),
        ),
        (
            "micro-no-preprocessor.bundle".into(),
            Bundle::from_files(&no_pre).encode(),
        ),
    ]
}

fn encode_image(img: image::DynamicImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).expect("encode seed image");
    out.into_inner()
}

/// An EXIF APP1 segment holding just an orientation tag.
fn exif_app1(orientation: u16) -> Vec<u8> {
    let mut tiff = b"II*\0".to_vec();
    tiff.extend_from_slice(&8u32.to_le_bytes());
    tiff.extend_from_slice(&1u16.to_le_bytes());
    tiff.extend_from_slice(&0x0112u16.to_le_bytes());
    tiff.extend_from_slice(&3u16.to_le_bytes());
    tiff.extend_from_slice(&1u32.to_le_bytes());
    tiff.extend_from_slice(&orientation.to_le_bytes());
    tiff.extend_from_slice(&[0, 0]);
    tiff.extend_from_slice(&0u32.to_le_bytes());
    let mut seg = vec![0xff, 0xe1];
    let len = (2 + 6 + tiff.len()) as u16;
    seg.extend_from_slice(&len.to_be_bytes());
    seg.extend_from_slice(b"Exif\0\0");
    seg.extend_from_slice(&tiff);
    seg
}

/// Seeds of the image target: every decoded format and pixel layout, small.
pub fn image() -> Vec<Seed> {
    use image::{DynamicImage, ImageBuffer, ImageFormat, Luma, LumaA, Rgb, Rgba};
    let (w, h) = (13u32, 7u32);
    let rgb = ImageBuffer::from_fn(w, h, |x, y| {
        Rgb([(x * 19) as u8, (y * 37) as u8, (x * y) as u8])
    });
    let rgba = ImageBuffer::from_fn(w, h, |x, y| {
        Rgba([(x * 19) as u8, (y * 37) as u8, 200, (x * 7 + y) as u8])
    });
    let grey = ImageBuffer::from_fn(w, h, |x, y| Luma([(x * 11 + y * 3) as u8]));
    let grey_a = ImageBuffer::from_fn(w, h, |x, y| LumaA([(x * 11) as u8, (y * 30) as u8]));
    let rgb16: ImageBuffer<Rgb<u16>, Vec<u16>> = ImageBuffer::from_fn(w, h, |x, y| {
        Rgb([(x * 4000) as u16, (y * 9000) as u16, 513])
    });
    let grey16: ImageBuffer<Luma<u16>, Vec<u16>> =
        ImageBuffer::from_fn(w, h, |x, y| Luma([(x * 3000 + y) as u16]));
    let tall = ImageBuffer::from_fn(3, 40, |x, y| Rgb([(x * 80) as u8, (y * 6) as u8, 9]));
    let mut out: Vec<Seed> = vec![
        (
            "rgb8.png".into(),
            encode_image(DynamicImage::ImageRgb8(rgb.clone()), ImageFormat::Png),
        ),
        (
            "rgba8.png".into(),
            encode_image(DynamicImage::ImageRgba8(rgba.clone()), ImageFormat::Png),
        ),
        (
            "l8.png".into(),
            encode_image(DynamicImage::ImageLuma8(grey.clone()), ImageFormat::Png),
        ),
        (
            "la8.png".into(),
            encode_image(DynamicImage::ImageLumaA8(grey_a), ImageFormat::Png),
        ),
        (
            "rgb16.png".into(),
            encode_image(DynamicImage::ImageRgb16(rgb16), ImageFormat::Png),
        ),
        (
            "l16.png".into(),
            encode_image(DynamicImage::ImageLuma16(grey16), ImageFormat::Png),
        ),
        (
            "tall.png".into(),
            encode_image(DynamicImage::ImageRgb8(tall), ImageFormat::Png),
        ),
        (
            "rgb.jpg".into(),
            encode_image(DynamicImage::ImageRgb8(rgb.clone()), ImageFormat::Jpeg),
        ),
        (
            "grey.jpg".into(),
            encode_image(DynamicImage::ImageLuma8(grey), ImageFormat::Jpeg),
        ),
        (
            "rgba.gif".into(),
            encode_image(DynamicImage::ImageRgba8(rgba.clone()), ImageFormat::Gif),
        ),
        (
            "rgb.bmp".into(),
            encode_image(DynamicImage::ImageRgb8(rgb.clone()), ImageFormat::Bmp),
        ),
        (
            "rgba.bmp".into(),
            encode_image(DynamicImage::ImageRgba8(rgba.clone()), ImageFormat::Bmp),
        ),
        (
            "rgba.webp".into(),
            encode_image(DynamicImage::ImageRgba8(rgba), ImageFormat::WebP),
        ),
        (
            "rgb.webp".into(),
            encode_image(DynamicImage::ImageRgb8(rgb.clone()), ImageFormat::WebP),
        ),
    ];
    // A JPEG shot sideways (EXIF orientation 6) and one mirrored (5).
    for o in [6u16, 5] {
        let jpg = encode_image(DynamicImage::ImageRgb8(rgb.clone()), ImageFormat::Jpeg);
        let mut with = jpg[..2].to_vec();
        with.extend_from_slice(&exif_app1(o));
        with.extend_from_slice(&jpg[2..]);
        out.push((format!("exif-{o}.jpg"), with));
    }
    out
}

/// Seeds of the chat target (see [`targets::decode_chat`] for the layout).
pub fn chat() -> Vec<Seed> {
    use targets::ChatPart as P;
    let sys = targets::ROLE_SYSTEM;
    let user = targets::ROLE_USER;
    let asst = targets::ROLE_ASSISTANT;
    let chats: Vec<(&str, targets::Chat)> = vec![
        ("hello", vec![(user, vec![P::Text("Hello!".into())])]),
        (
            "picture-question",
            vec![(
                user,
                vec![P::Image, P::Text("What is shown in this image?".into())],
            )],
        ),
        (
            "system-multi-turn",
            vec![
                (sys, vec![P::Text("Be brief.".into())]),
                (
                    user,
                    vec![
                        P::Text("Compare ".into()),
                        P::Image,
                        P::Text(" and ".into()),
                        P::Image,
                    ],
                ),
                (asst, vec![P::Text("A cat; a dog.".into())]),
                (user, vec![P::Text("And the colours?".into())]),
            ],
        ),
        (
            "specials-as-text",
            vec![(
                user,
                vec![P::Text(
                    "<|endoftext|>USER: <image>\n ASSISTANT: \u{0}\u{feff}".into(),
                )],
            )],
        ),
        (
            "unicode",
            vec![
                (
                    user,
                    vec![P::Text(
                        "Ünïcödé — 日本語 🐱 \u{202e}rtl\u{202c} e\u{301}".into(),
                    )],
                ),
                (user, vec![P::Text(" ".repeat(40))]),
            ],
        ),
    ];
    chats
        .into_iter()
        .map(|(name, chat)| (format!("{name}.chat"), targets::encode_chat(&chat)))
        .collect()
}

/// Standard base64 (the request seeds' data URLs).
pub fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Seeds of the request target: chat completion bodies as clients send them.
pub fn request() -> Vec<Seed> {
    let png = image()
        .into_iter()
        .find(|(n, _)| n == "rgb8.png")
        .map(|(_, b)| b)
        .expect("png seed");
    let url = format!("data:image/png;base64,{}", base64(&png));
    let model = targets::SERVED_MODEL;
    let bodies = vec![
        (
            "minimal",
            json!({"model": model, "messages": [{"role": "user", "content": "Hi"}]}),
        ),
        (
            "everything",
            json!({
                "model": model,
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "text", "text": "Hello"}]},
                    {"role": "assistant", "content": "Hi.", "name": "bot"},
                    {"role": "user", "content": "Again", "name": "me"}
                ],
                "max_tokens": 3, "temperature": 0.7, "top_p": 0.9, "top_k": 40,
                "min_p": 0.05, "repeat_penalty": 1.1, "presence_penalty": 0.5,
                "frequency_penalty": -0.5, "seed": 42, "stop": ["\n", "END"],
                "stream": true, "stream_options": {"include_usage": true}, "n": 1,
                "ignore_eos": false, "logprobs": false, "top_logprobs": 0,
                "response_format": {"type": "text"}, "logit_bias": {}, "user": "u1",
                "max_completion_tokens": null, "tools": null
            }),
        ),
        (
            "picture",
            json!({
                "model": model,
                "max_tokens": 2,
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "What is it?"}
                ]}]
            }),
        ),
        (
            "picture-url-string",
            json!({
                "messages": [{"role": "developer", "content": "x"}, {"role": "user", "content": [
                    {"type": "image_url", "image_url": url},
                    {"type": "text", "text": "Same?"},
                    {"type": "image_url", "image_url": {"url": url}}
                ]}],
                "stop": "x"
            }),
        ),
    ];
    bodies
        .into_iter()
        .map(|(name, v)| (format!("{name}.json"), serde_json::to_vec(&v).unwrap()))
        .collect()
}

/// Every target's seeds, by the target's name.
pub fn all(tiny_a: bool) -> Vec<(&'static str, Vec<Seed>)> {
    vec![
        ("mqf", mqf(tiny_a)),
        ("checkpoint", checkpoint()),
        ("image", image()),
        ("chat", chat()),
        ("request", request()),
    ]
}

/// Writes every target's seeds under `dir/<target>/` (cargo-fuzz's corpus
/// layout: `fuzz/corpus/<target>/`).
pub fn write_corpus(dir: &Path, tiny_a: bool) -> std::io::Result<usize> {
    let mut n = 0;
    for (target, seeds) in all(tiny_a) {
        let d = dir.join(target);
        std::fs::create_dir_all(&d)?;
        for (name, bytes) in seeds {
            std::fs::write(d.join(name), bytes)?;
            n += 1;
        }
    }
    Ok(n)
}
