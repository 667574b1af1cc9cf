//! BF16 weights with the BF16 dot (`EngineOptions::bf16_dot = Some(true)`:
//! activations rounded to BF16 before every matmul, products summed in f32
//! pairs — `vdpbf16ps` on CPUs with AVX512_BF16, the same arithmetic with two
//! FMAs elsewhere) against the f32 transformers goldens of tiny-a (text and
//! picture prompts, greedy tokens identical) and the vision tower of tiny-a
//! and gen-hd80 (odd MLP width: an odd `k` pads its last BF16 pair).
//!
//! Stated tolerances (max absolute difference), with what was measured on the
//! 2-vCPU Xeon (emulated arithmetic) and the same again on a 2-vCPU AMD EPYC
//! Zen 4 (native `vdpbf16ps`, the same sums): every logit and hidden state 1.5e-1 (measured 6.3e-2 logits, 6.9e-2
//! hidden on tiny-a text and picture prompts, greedy tokens identical); image
//! embeddings 5e-2 (measured 1.1e-2 tiny-a, 2.3e-2 gen-hd80). The exact BF16
//! path (`Some(false)`) is held to 1e-4 on tiny-a (measured 9.3e-6; tiny-a's
//! weights are BF16 already) and printed beside it, to show what rounding the
//! activations costs; gen-hd80's f32-stored weights lose 1.2e-2 to BF16 alone.

use mipha_tests::*;

fn engine(mqf: &std::path::Path, dot: bool) -> mipha_models::Engine {
    let level = mipha_kernels::cpu::dispatch::level();
    eprintln!(
        "BF16 dot {}: dispatch level {} ({})",
        if dot { "on" } else { "off" },
        level.name(),
        if !dot {
            "exact f32 activations"
        } else if level.bf16_dot() {
            "native vdpbf16ps"
        } else {
            "emulated with FMAs: this CPU lacks AVX512_BF16"
        }
    );
    let mut opts = conformance_options();
    opts.bf16_dot = Some(dot);
    mipha_models::Engine::load(mqf, opts).expect("load engine")
}

#[test]
fn tiny_a_text_and_image_bf16_dot() {
    let dir = tempfile::tempdir().unwrap();
    let mqf = convert(&fixture("tiny-a/checkpoint"), dir.path(), "bf16", "bf16");
    for (dot, tol) in [
        (
            true,
            Tolerance {
                hidden: 1.5e-1,
                logits: 1.5e-1,
            },
        ),
        (
            false,
            Tolerance {
                hidden: 1e-4,
                logits: 1e-4,
            },
        ),
    ] {
        let e = engine(&mqf, dot);
        for golden in ["golden_text", "golden_image"] {
            let g = Golden::load(&fixture(&format!("tiny-a/{golden}.safetensors")));
            let r = check_lm(&e, &g, tol);
            eprintln!(
                "tiny-a {golden} bf16 {}: hidden {:e}, logits {:e}",
                if dot { "dot" } else { "exact" },
                r.max_hidden,
                r.max_logits
            );
        }
    }
}

fn vision(fixture_name: &str, golden: &str, tol: f32) {
    let dir = tempfile::tempdir().unwrap();
    let mqf = convert(
        &fixture(&format!("{fixture_name}/checkpoint")),
        dir.path(),
        "bf16",
        "bf16",
    );
    let g = Golden::load(&fixture(&format!("{fixture_name}/{golden}.safetensors")));
    for dot in [true, false] {
        let e = engine(&mqf, dot);
        let cfg = e.vision_config().expect("vision tower").clone();
        let pixels = &g.get("pixel_values").f32;
        let per_image = cfg.num_channels * cfg.image_size * cfg.image_size;
        let (p, h) = (cfg.num_patches(), cfg.projector_hidden);
        let mut worst = 0.0f32;
        for img in 0..pixels.len() / per_image {
            let embeds = e
                .encode_pixels(&pixels[img * per_image..(img + 1) * per_image], None)
                .unwrap();
            let gold = &g.get("image_embeds").f32[img * p * h..(img + 1) * p * h];
            let diff = max_abs_diff(&embeds, gold);
            worst = worst.max(diff);
            assert!(
                diff <= tol,
                "{fixture_name}/{golden} image {img} bf16 dot={dot}: image_embeds {diff}"
            );
        }
        eprintln!(
            "{fixture_name}/{golden} bf16 {}: image_embeds max abs diff {worst:e}",
            if dot { "dot" } else { "exact" }
        );
    }
}

#[test]
fn tiny_a_vision_bf16_dot() {
    vision("tiny-a", "golden_image", 5e-2);
}

#[test]
fn gen_hd80_vision_bf16_dot_odd_width() {
    vision("gen-hd80", "golden_image", 5e-2);
}
