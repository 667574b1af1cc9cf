//! Sessions: the image golden end to end (pixels → tokens), exact KV reuse across
//! turns, cancellation, deadlines and the image-embedding cache.

use std::sync::Arc;

use mipha_models::{
    CancelToken, Engine, EngineOptions, GenerateOptions, Session, StopReason, Turn,
};
use mipha_tests::*;

fn engine(dir: &std::path::Path) -> Arc<Engine> {
    let mqf = convert(&fixture("tiny-a/checkpoint"), dir, "f32", "f32");
    Arc::new(conformance_engine(&mqf))
}

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens: n,
        ignore_eos: true,
        ..Default::default()
    }
}

#[test]
fn image_question_from_golden_pixels_gives_the_golden_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    let g = Golden::load(&fixture("tiny-a/golden_image.safetensors"));
    let mut s = Session::new(e);
    s.attach_pixels(&g.get("pixel_values").f32).unwrap();
    let mut streamed = String::new();
    let r = s
        .ask(
            g.json["prompt_question"].as_str().unwrap(),
            &greedy(8),
            None,
            |_, piece| {
                streamed.push_str(piece);
                true
            },
        )
        .unwrap();
    let want: Vec<u32> = g.ids("gen_token_ids").iter().map(|&t| t as u32).collect();
    assert_eq!(r.tokens, want);
    assert_eq!(r.text, streamed);
    assert_eq!(r.text, g.json["gen_text"].as_str().unwrap());
    assert_eq!(r.stats.images_encoded, 1);
    assert_eq!(
        r.stats.prefill_positions, 58,
        "49 ids - 1 placeholder + 9 patches"
    );
}

#[test]
fn a_second_turn_reuses_the_cache_and_equals_a_fresh_session() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    let g = Golden::load(&fixture("tiny-a/golden_image.safetensors"));
    let pixels = &g.get("pixel_values").f32;

    let mut s = Session::new(e.clone());
    s.attach_pixels(pixels).unwrap();
    let first = s
        .ask("What is shown here?", &greedy(6), None, |_, _| true)
        .unwrap();
    let held = s.cached_positions();
    let second = s
        .ask("And the colours?", &greedy(1), None, |_, _| true)
        .unwrap();
    assert_eq!(second.stats.images_encoded, 0);
    assert!(
        second.stats.reused_positions >= held - 1,
        "reused {} of {held}",
        second.stats.reused_positions
    );
    assert!(
        second.stats.prefill_positions < 20,
        "only the new question is fed"
    );
    let reused = s.last_logits().to_vec();

    // A fresh session given the same transcript on the same engine finds the
    // conversation's full KV blocks in the shared prefix cache; on an engine
    // without the prefix cache it computes everything from scratch. All three
    // agree.
    let mut turns: Vec<Turn> = s.turns()[..1].to_vec();
    assert_eq!(turns[0].assistant.as_deref(), Some(first.text.trim()));
    turns[0].images = 1;
    let (image, cached) = e.encode_image_cached(pixels, None).unwrap();
    assert!(cached, "the engine's LRU holds the image");
    let mqf = convert(&fixture("tiny-a/checkpoint"), dir.path(), "f32", "f32");
    let scratch = Arc::new(
        Engine::load(
            &mqf,
            EngineOptions {
                prefix_cache: false,
                ..conformance_options()
            },
        )
        .unwrap(),
    );
    let block = e.options().kv_block_size;
    for (engine, shared) in [(e.clone(), true), (scratch, false)] {
        let mut fresh = Session::new(engine);
        fresh.restore(turns.clone(), vec![image.clone()]).unwrap();
        let again = fresh
            .ask("And the colours?", &greedy(1), None, |_, _| true)
            .unwrap();
        let r = again.stats.reused_positions;
        if shared {
            assert!(
                r > 0 && r.is_multiple_of(block),
                "{r} positions from the prefix cache"
            );
            let prompt = second.stats.reused_positions + second.stats.prefill_positions;
            assert!(r < prompt, "{r} of {prompt}");
        } else {
            assert_eq!(r, 0);
        }
        let d = max_abs_diff(&reused, fresh.last_logits());
        assert!(d < 1e-4, "KV reuse changed the logits by {d}");
        assert_eq!(again.tokens, second.tokens);
    }
}

#[test]
fn cancel_from_another_thread_keeps_the_session_usable() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    let mut s = Session::new(e);
    let cancel = CancelToken::new();
    let c2 = cancel.clone();
    let r = s
        .ask(
            "Tell me a long story.",
            &greedy(1000),
            Some(&cancel),
            move |_, _| {
                // a "Ctrl-C" arriving from elsewhere after the first token
                let c3 = c2.clone();
                std::thread::spawn(move || c3.cancel()).join().unwrap();
                true
            },
        )
        .unwrap();
    assert_eq!(r.stop_reason, StopReason::Cancelled);
    assert!(r.tokens.len() < 5, "{} tokens after cancel", r.tokens.len());
    cancel.reset();
    let next = s
        .ask("Shorter, please.", &greedy(3), Some(&cancel), |_, _| true)
        .unwrap();
    assert_eq!(next.tokens.len(), 3);
    assert_eq!(s.turns().len(), 2);

    // cancelled before the prefill: the question is withdrawn
    cancel.cancel();
    let r = s
        .ask("Never mind.", &greedy(3), Some(&cancel), |_, _| true)
        .unwrap();
    assert_eq!(r.stop_reason, StopReason::Cancelled);
    assert!(r.tokens.is_empty());
    assert_eq!(s.turns().len(), 2);
}

#[test]
fn deadline_and_reset() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    let mut s = Session::new(e);
    let opts = GenerateOptions {
        deadline: Some(std::time::Instant::now()),
        ..greedy(50)
    };
    let r = s.ask("Hi", &opts, None, |_, _| true).unwrap();
    assert_eq!(r.stop_reason, StopReason::Deadline);
    s.reset();
    assert_eq!(s.cached_positions(), 0);
    assert!(s.turns().is_empty());
    let r = s.ask("Hi", &greedy(2), None, |_, _| true).unwrap();
    assert_eq!(r.tokens.len(), 2);
}

#[test]
fn a_conversation_past_the_context_is_an_error_and_the_session_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    let mut s = Session::new(e.clone());
    s.ask("Hi", &greedy(2), None, |_, _| true).unwrap();
    let before = s.cached_positions();
    let long = "word ".repeat(e.context_length());
    let err = s.ask(&long, &greedy(2), None, |_, _| true).unwrap_err();
    assert!(err.to_string().contains("context"), "{err}");
    assert_eq!(s.turns().len(), 1);
    assert!(s.cached_positions() <= before);
    s.ask("Bye", &greedy(2), None, |_, _| true).unwrap();
}
