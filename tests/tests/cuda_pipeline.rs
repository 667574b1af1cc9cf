//! The whole pipeline on a GPU against the goldens, with the CPU's own bounds:
//! the language model of tiny-a from F32 and F16 files (every tapped stage,
//! prompt and teacher-forced generation logits, free-running greedy tokens), and
//! pictures end to end (our preprocessing, the vision tower and projector on the
//! GPU, their embeddings handed to the prefill on the device, greedy tokens).
//! Decode steps run as replayed CUDA graphs. Then continuous batching on the
//! GPU: several requests at once (prefill chunks beside decodes, each sequence
//! through its own blocks) give what each gives alone, with f32 and f16 KV.
//! Skips without a CUDA device.

use std::sync::Arc;

use mipha_models::image::load_image;
use mipha_models::{
    DeviceChoice, Engine, EngineOptions, GenerateOptions, GenerateRequest, Generating, KvDtype,
    PromptItem, Session, StreamEvent,
};
use mipha_runtime::Resolved;
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
        let kept = e.encode_image(&img.pixels).unwrap().embeddings().clone();
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

/// Greedy tokens of a request and the logits each came from.
fn greedy_logged(e: &Engine, prompt: &[u32], n: usize) -> Generating {
    e.submit(GenerateRequest {
        prompt: prompt.iter().map(|&t| PromptItem::Token(t)).collect(),
        options: GenerateOptions {
            max_tokens: n,
            ignore_eos: true,
            ..Default::default()
        },
        logits: true,
        ..Default::default()
    })
    .unwrap()
}

fn collect(mut g: Generating) -> (Vec<u32>, Vec<Vec<f32>>) {
    let (mut toks, mut logits) = (Vec::new(), Vec::new());
    loop {
        match g.next_event().unwrap() {
            StreamEvent::Token { id, logits: l, .. } => {
                toks.push(id);
                logits.push(l.expect("asked for logits"));
            }
            StreamEvent::Done(_) => return (toks, logits),
        }
    }
}

#[test]
fn batched_requests_on_gpu_equal_the_same_requests_alone() {
    match DeviceChoice::Auto.resolve() {
        Ok(Resolved::Cpu { reason }) => {
            eprintln!(
                "skipping: no CUDA device: {}",
                reason.unwrap_or_else(|| "cpu".into())
            );
            return;
        }
        #[allow(unreachable_patterns)]
        Ok(_) => {}
        Err(e) => panic!("CUDA device present but unusable: {e}"),
    }
    let dir = tempfile::tempdir().unwrap();
    let mqf = convert(&fixture("tiny-a/checkpoint"), dir.path(), "f32", "f32");
    for dtype in [KvDtype::F32, KvDtype::F16] {
        let options = |device, prefix_cache| EngineOptions {
            threads: 2,
            max_batch_tokens: 16,
            max_outputs: 16,
            kv_block_size: 4,
            kv_dtype: dtype,
            prefix_cache,
            // f32 activations: the GPU's GEMV for every matmul
            int8_activations: false,
            device,
            ..Default::default()
        };
        let cpu = Engine::load(&mqf, options(DeviceChoice::Cpu, false)).unwrap();
        let alone_engine = Engine::load(&mqf, options(DeviceChoice::Cuda(0), false)).unwrap();
        let prompts: Vec<Vec<u32>> = [
            "Hi.",
            "What is the capital of France, and why?",
            "Write a short poem about the sea, the wind and a small boat at night.",
            "List three colours. Then list three animals. Then list three fruits, \
             each with one sentence about where it grows and when it is ripe.",
        ]
        .iter()
        .map(|q| alone_engine.chat_prompt(q).unwrap())
        .collect();
        let alone: Vec<_> = prompts
            .iter()
            .map(|p| collect(greedy_logged(&alone_engine, p, 12)))
            .collect();
        drop(alone_engine);
        // the GPU against the CPU on the prompt's logits (a prefill through the
        // KV pool of this element type)
        for (i, (p, a)) in prompts.iter().zip(&alone).enumerate() {
            let (_, want) = collect(greedy_logged(&cpu, p, 1));
            let d = max_abs_diff(&a.1[0], &want[0]);
            assert!(
                d <= 1e-3,
                "{dtype:?} prompt {i}: GPU and CPU logits differ by {d}"
            );
        }
        drop(cpu);
        // All four at once: the short prompt decodes while the longer ones are
        // prefilled in chunks beside it, then they decode together.
        let e = Engine::load(&mqf, options(DeviceChoice::Cuda(0), true)).unwrap();
        let streams: Vec<Generating> = prompts.iter().map(|p| greedy_logged(&e, p, 12)).collect();
        let readers: Vec<_> = streams
            .into_iter()
            .map(|g| std::thread::spawn(move || collect(g)))
            .collect();
        let batched: Vec<_> = readers.into_iter().map(|r| r.join().unwrap()).collect();
        for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
            assert_eq!(a.0, b.0, "{dtype:?} prompt {i}: greedy tokens differ");
            for (t, (la, lb)) in a.1.iter().zip(&b.1).enumerate() {
                let d = max_abs_diff(la, lb);
                assert!(
                    d <= 1e-4,
                    "{dtype:?} prompt {i} token {t}: logits differ by {d}"
                );
            }
        }
    }
}
