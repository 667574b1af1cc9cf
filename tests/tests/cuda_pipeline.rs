//! The whole pipeline on a GPU against the goldens, with the CPU's own bounds:
//! the language model of tiny-a from F32 and F16 files (every tapped stage,
//! prompt and teacher-forced generation logits, free-running greedy tokens), and
//! pictures end to end (our preprocessing, the vision tower and projector on the
//! GPU, their embeddings handed to the prefill on the device, greedy tokens).
//! Decode steps run as replayed CUDA graphs. Skips without a CUDA device.

use std::sync::Arc;

use mipha_models::image::load_image;
use mipha_models::{GenerateOptions, Session};
use mipha_tests::*;

/// golden_f32.rs's bounds
const F32: Tolerance = Tolerance {
    hidden: 1e-4,
    logits: 1e-3,
};

/// golden_f16.rs's bounds
const F16: Tolerance = Tolerance {
    hidden: 5e-2,
    logits: 5e-2,
};

#[test]
fn tiny_a_language_model_on_gpu_f32_and_f16() {
    for (quant, tol) in [("f32", F32), ("f16", F16)] {
        let dir = tempfile::tempdir().unwrap();
        let mqf = convert(&fixture("tiny-a/checkpoint"), dir.path(), quant, quant);
        let Some(e) = conformance_engine_cuda(&mqf) else {
            return;
        };
        eprintln!("device: {}", e.device());
        for golden in ["golden_text", "golden_image"] {
            let g = Golden::load(&fixture(&format!("tiny-a/{golden}.safetensors")));
            let r = check_lm(&e, &g, tol);
            eprintln!(
                "tiny-a {golden} {quant} on GPU: hidden {:e}, logits {:e}",
                r.max_hidden, r.max_logits
            );
            let prompt: Vec<u32> = g.ids("input_ids").iter().map(|&x| x as u32).collect();
            if golden == "golden_text" {
                assert_eq!(greedy_tokens(&e, &prompt, 8), r.golden_tokens, "{quant}");
            }
        }
    }
}

#[test]
fn pictures_to_tokens_on_gpu() {
    for name in ["tiny-a", "gen-hd80"] {
        let dir = tempfile::tempdir().unwrap();
        let mqf = convert(
            &fixture(&format!("{name}/checkpoint")),
            dir.path(),
            "f32",
            "f32",
        );
        let Some(e) = conformance_engine_cuda(&mqf) else {
            return;
        };
        let e = Arc::new(e);
        let g = Golden::load(&fixture(&format!("{name}/golden_image.safetensors")));
        let file = g.json["image"]["file"].as_str().unwrap();
        let path = fixture(&format!("{name}/{file}"));
        let img = load_image(&path, e.image_config().unwrap()).unwrap();
        // the embeddings stay on the GPU; a copy comes back only to check them
        let (kept, _) = e.encode_image_keyed(&img.pixels, img.hash).unwrap();
        assert!(
            matches!(kept, mipha_models::ImageEmbeddings::Resident(_)),
            "a GPU engine keeps image embeddings on the device"
        );
        let d = max_abs_diff(&kept.to_host().unwrap(), &g.get("image_embeds").f32);
        assert!(d <= 1e-4, "{name}: image embeddings differ by {d}");
        let mut session = Session::new(e.clone());
        session.attach_image(&path).unwrap();
        let opts = GenerateOptions {
            max_tokens: 8,
            ignore_eos: true,
            ..Default::default()
        };
        let question = g.json["prompt_question"].as_str().unwrap();
        let reply = session.ask(question, &opts, None, |_, _| true).unwrap();
        let want: Vec<u32> = g.ids("gen_token_ids").iter().map(|&t| t as u32).collect();
        assert_eq!(reply.tokens, want, "{name}: greedy tokens");
    }
}
