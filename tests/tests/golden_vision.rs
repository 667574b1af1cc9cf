//! The vision tower and projector fed the goldens' own `pixel_values` (numerics
//! apart from image decoding and resizing): hidden states after every kept
//! encoder layer, the selected features, the projector's GELU and output.
//!
//! Tolerance 1e-4 absolute (F32 files): the fixture README measured 7e-7 and
//! 1.4e-6 between two f32 oracle runs on vision.selected and image_embeds.

use mipha_tests::*;

fn check(fixture_name: &str, golden: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mqf = convert(
        &fixture(&format!("{fixture_name}/checkpoint")),
        dir.path(),
        "f32",
        "f32",
    );
    let e = conformance_engine(&mqf);
    let cfg = e.vision_config().expect("vision tower").clone();
    let g = Golden::load(&fixture(&format!("{fixture_name}/{golden}.safetensors")));
    let pixels = &g.get("pixel_values").f32;
    let per_image = cfg.num_channels * cfg.image_size * cfg.image_size;
    let n_images = pixels.len() / per_image;
    let (p, d, h) = (cfg.num_patches(), cfg.hidden_size, cfg.projector_hidden);
    let hs = g.get("vision.hidden_states");
    let kept = cfg.num_hidden_layers;
    let mut worst = 0.0f32;
    for img in 0..n_images {
        let mut rec = Recorder::default();
        let embeds = e
            .encode_pixels(
                &pixels[img * per_image..(img + 1) * per_image],
                Some(&mut rec),
            )
            .unwrap();
        let mut cmp = |name: &str, ours: &[f32], gold: &[f32]| {
            let diff = max_abs_diff(ours, gold);
            worst = worst.max(diff);
            assert!(
                diff <= 1e-4,
                "{fixture_name}/{golden} image {img} {name}: {diff}"
            );
        };
        // hidden_states has every checkpoint layer; the file keeps those up to the
        // selected one, whose output is the last we compute.
        let layers_in_golden = hs.shape[hs.shape.len() - 3];
        let base = img * layers_in_golden * p * d;
        for k in 0..=kept {
            cmp(
                &format!("vision.hidden_states[{k}]"),
                &rec.taps[&format!("vision.hidden_states.{k}")],
                &hs.f32[base + k * p * d..base + (k + 1) * p * d],
            );
        }
        let sel = &g.get("vision.selected").f32[img * p * d..(img + 1) * p * d];
        cmp(
            "vision.selected",
            &rec.taps[&format!("vision.hidden_states.{kept}")],
            sel,
        );
        cmp(
            "projector.fc1_gelu",
            &rec.taps["projector.fc1_gelu"],
            &g.get("projector.fc1_gelu").f32[img * p * h..(img + 1) * p * h],
        );
        cmp(
            "image_embeds",
            &embeds,
            &g.get("image_embeds").f32[img * p * h..(img + 1) * p * h],
        );
    }
    eprintln!("{fixture_name}/{golden}: vision max abs diff {worst:e}");
}

#[test]
fn tiny_a_vision_from_golden_pixels() {
    check("tiny-a", "golden_image");
}

#[test]
fn gen_hd80_vision_head_dim_72_odd_mlp_width() {
    check("gen-hd80", "golden_image");
    check("gen-hd80", "golden_two_images");
}

#[test]
fn gen_f32_vision() {
    check("gen-f32", "golden_image");
}
