//! Pictures end to end: the fixture's PNG decoded and preprocessed by us, run
//! through the vision tower, projector and language model, compared with the
//! goldens (pixels within 1e-6 — we match PIL exactly — image embeddings within
//! 1e-4 for F32 files, greedy tokens identical), including non-square images both
//! ways, upscaling, and two pictures in one prompt.

use std::sync::Arc;

use mipha_models::image::load_image;
use mipha_models::{GenerateOptions, Session};
use mipha_tests::*;

fn files_of(g: &Golden) -> Vec<String> {
    match g.json["images"].as_array() {
        Some(list) => list
            .iter()
            .map(|i| i["file"].as_str().unwrap().to_string())
            .collect(),
        None => vec![g.json["image"]["file"].as_str().unwrap().to_string()],
    }
}

/// Checks one golden; `embeds_tol` bounds the image embeddings. `source` is the
/// f32 golden naming the picture files and holding the pixels (quantized goldens
/// share them).
fn check(
    e: &Arc<mipha_models::Engine>,
    fixture_name: &str,
    source: &Golden,
    golden: &Golden,
    embeds_tol: f32,
) {
    let cfg = e.image_config().unwrap();
    let files = files_of(source);
    let gold_px = &source.get("pixel_values").f32;
    let gold_emb = &golden.get("image_embeds").f32;
    let per_px = gold_px.len() / files.len();
    let per_emb = gold_emb.len() / files.len();
    let mut session = Session::new(e.clone());
    for (i, file) in files.iter().enumerate() {
        let path = fixture(&format!("{fixture_name}/{file}"));
        let img = load_image(&path, cfg).unwrap();
        let d = max_abs_diff(&img.pixels, &gold_px[i * per_px..(i + 1) * per_px]);
        assert!(d <= 1e-6, "{file}: pixels differ by {d}");
        let emb = e.encode_image(&img.pixels).unwrap().to_host().unwrap();
        let d = max_abs_diff(&emb, &gold_emb[i * per_emb..(i + 1) * per_emb]);
        assert!(d <= embeds_tol, "{file}: image embeddings differ by {d}");
        session.attach_image(&path).unwrap();
    }
    let opts = GenerateOptions {
        max_tokens: 8,
        ignore_eos: true,
        ..Default::default()
    };
    let question = source.json["prompt_question"].as_str().unwrap();
    let reply = session.ask(question, &opts, None, |_, _| true).unwrap();
    let raw = e.tokenizer().to_raw_ids(&reply.prompt);
    assert_eq!(raw, golden.ids("input_ids"), "prompt ids");
    let want: Vec<u32> = golden
        .ids("gen_token_ids")
        .iter()
        .map(|&t| t as u32)
        .collect();
    assert_eq!(reply.tokens, want, "{fixture_name}: greedy tokens");
    assert_eq!(
        reply.stats.images_cached,
        files.len(),
        "encoded once per engine"
    );
}

fn engine(fixture_name: &str, quant: &str, dir: &std::path::Path) -> Arc<mipha_models::Engine> {
    let mqf = convert(
        &fixture(&format!("{fixture_name}/checkpoint")),
        dir,
        quant,
        quant,
    );
    Arc::new(conformance_engine(&mqf))
}

#[test]
fn tiny_a_picture_to_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine("tiny-a", "f32", dir.path());
    let g = Golden::load(&fixture("tiny-a/golden_image.safetensors"));
    check(&e, "tiny-a", &g, &g, 1e-4);
}

#[test]
fn gen_hd80_wide_tall_and_two_pictures() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine("gen-hd80", "f32", dir.path());
    for name in ["golden_image", "golden_image_tall", "golden_two_images"] {
        let g = Golden::load(&fixture(&format!("gen-hd80/{name}.safetensors")));
        check(&e, "gen-hd80", &g, &g, 1e-4);
    }
}

#[test]
fn gen_f32_upscaled_picture() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine("gen-f32", "f32", dir.path());
    let g = Golden::load(&fixture("gen-f32/golden_image.safetensors"));
    check(&e, "gen-f32", &g, &g, 1e-4);
}

/// Quantized vision tower and projector against the goldens computed on the same
/// dequantized weights: activations stay f32 in both, so the F32 bound holds.
#[test]
fn quantized_pictures_match_dequantized_goldens() {
    for (fixture_name, quant) in [
        ("tiny-a", "q8_0"),
        ("gen-hd80", "q8_0"),
        ("gen-hd80", "q4_0"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(fixture_name, quant, dir.path());
        let g = Golden::load(&fixture(&format!(
            "{fixture_name}/quant/golden_image.{quant}.safetensors"
        )));
        let source = Golden::load(&fixture(&format!(
            "{fixture_name}/golden_image.safetensors"
        )));
        check(&e, fixture_name, &source, &g, 1e-4);
    }
}
