//! The step loop with many users: batched results equal unbatched ones,
//! concurrent sessions with pictures and cancellations leave the KV pool as
//! they found it, preemption under a small KV budget changes no token, the
//! prefix cache reuses exactly the shared blocks (and never an evicted one),
//! and queued or half-prefilled requests can be cancelled.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mipha_models::{
    CancelToken, Engine, EngineOptions, Finished, GenerateOptions, GenerateRequest, Generating,
    KvCacheSize, KvDtype, PromptItem, Session, StopReason, StreamEvent,
};
use mipha_runtime::Error;
use mipha_tests::*;

fn tiny_f32(dir: &std::path::Path) -> std::path::PathBuf {
    convert(&fixture("tiny-a/checkpoint"), dir, "f32", "f32")
}

fn options() -> EngineOptions {
    EngineOptions {
        threads: 2,
        max_batch_tokens: 16,
        max_outputs: 16,
        kv_block_size: 4,
        ..Default::default()
    }
}

fn load(mqf: &std::path::Path, o: EngineOptions) -> Arc<Engine> {
    Arc::new(Engine::load(mqf, o).expect("load engine"))
}

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens: n,
        ignore_eos: true,
        ..Default::default()
    }
}

fn tokens(p: &[u32]) -> Vec<PromptItem> {
    p.iter().map(|&t| PromptItem::Token(t)).collect()
}

/// Prompts of different lengths (they share the template's system prompt).
fn prompts(e: &Engine) -> Vec<Vec<u32>> {
    [
        "Hi.",
        "What is the capital of France, and why?",
        "Write a short poem about the sea, the wind and a small boat at night.",
        "List three colours. Then list three animals. Then list three fruits, \
         each with one sentence about where it grows and when it is ripe.",
    ]
    .iter()
    .map(|q| e.chat_prompt(q).unwrap())
    .collect()
}

/// A request's tokens and the logits each was sampled from.
fn collect(mut g: Generating) -> (Vec<u32>, Vec<Vec<f32>>, Finished) {
    let mut toks = Vec::new();
    let mut logits = Vec::new();
    loop {
        match g.next_event().unwrap() {
            StreamEvent::Token { id, logits: l, .. } => {
                toks.push(id);
                logits.push(l.expect("asked for logits"));
            }
            StreamEvent::Done(f) => return (toks, logits, f.clone()),
        }
    }
}

fn submit_logged(e: &Engine, prompt: &[u32], n: usize) -> Generating {
    e.submit(GenerateRequest {
        prompt: tokens(prompt),
        options: greedy(n),
        logits: true,
        ..Default::default()
    })
    .unwrap()
}

#[test]
fn batched_requests_equal_the_same_requests_alone() {
    let dir = tempfile::tempdir().unwrap();
    let mqf = tiny_f32(dir.path());
    for dtype in [KvDtype::F32, KvDtype::F16] {
        let alone_engine = load(
            &mqf,
            EngineOptions {
                kv_dtype: dtype,
                prefix_cache: false,
                ..options()
            },
        );
        let ps = prompts(&alone_engine);
        let alone: Vec<_> = ps
            .iter()
            .map(|p| collect(submit_logged(&alone_engine, p, 12)))
            .collect();
        drop(alone_engine);

        // All four at once: the short prompt decodes while the longer ones
        // are prefilled in chunks beside it (16-row steps), at different lengths.
        let e = load(
            &mqf,
            EngineOptions {
                kv_dtype: dtype,
                ..options()
            },
        );
        let streams: Vec<Generating> = ps.iter().map(|p| submit_logged(&e, p, 12)).collect();
        let readers: Vec<_> = streams
            .into_iter()
            .map(|g| std::thread::spawn(move || collect(g)))
            .collect();
        let batched: Vec<_> = readers.into_iter().map(|r| r.join().unwrap()).collect();
        assert!(e.stats().steps > 0);
        for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
            assert_eq!(a.0, b.0, "{dtype:?} prompt {i}: greedy tokens differ");
            for (t, (la, lb)) in a.1.iter().zip(&b.1).enumerate() {
                let d = max_abs_diff(la, lb);
                assert!(
                    d <= 1e-4,
                    "{dtype:?} prompt {i} token {t}: logits differ by {d}"
                );
            }
            assert_eq!(b.2.stop, StopReason::MaxTokens);
        }
    }
}

/// A small deterministic generator for the random choices below.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// Waits (without timing anything) until the engine has put everything away.
fn settled(e: &Engine) -> mipha_models::EngineStats {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let s = e.stats();
        if s.running == 0 && s.parked == 0 && s.queue_depth == 0 && s.images_pending == 0 {
            return s;
        }
        assert!(Instant::now() < until, "the engine did not settle: {s:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn eight_sessions_with_pictures_and_cancellations_run_to_completion() {
    let dir = tempfile::tempdir().unwrap();
    let e = load(
        &tiny_f32(dir.path()),
        EngineOptions {
            max_sequences: 4,
            ..options()
        },
    );
    let total = e.stats().kv_blocks_total;
    assert_eq!(e.stats().kv_blocks_free, total);
    let g = Golden::load(&fixture("tiny-a/golden_image.safetensors"));
    let pixels = Arc::new(g.get("pixel_values").f32.clone());
    let sessions: Vec<_> = (0..8u64)
        .map(|id| {
            let e = e.clone();
            let pixels = pixels.clone();
            std::thread::spawn(move || {
                let mut rng = Lcg(id * 7919 + 1);
                let mut s = Session::new(e.clone());
                let mut asked = 0;
                let mut answered = 0;
                for turn in 0..3 {
                    if rng.next(2) == 0 {
                        // Three different pictures among eight sessions.
                        let mut px = (*pixels).clone();
                        let key = rng.next(3);
                        px[0] += key as f32;
                        s.attach_pixels(&px).unwrap();
                    }
                    let n = 2 + rng.next(20) as usize;
                    let cancel = CancelToken::new();
                    let stop_after = match rng.next(4) {
                        0 => Some(rng.next(n as u64) as usize),
                        _ => None,
                    };
                    let opts = GenerateOptions {
                        deadline: (rng.next(8) == 0).then(Instant::now),
                        ..greedy(n)
                    };
                    let c2 = cancel.clone();
                    let mut seen = 0;
                    asked += 1;
                    let r = s
                        .ask(
                            &format!("Question {turn} of session {id}?"),
                            &opts,
                            Some(&cancel),
                            |_, _| {
                                seen += 1;
                                if stop_after == Some(seen) {
                                    // from another thread, as a client going away
                                    let c3 = c2.clone();
                                    std::thread::spawn(move || c3.cancel()).join().unwrap();
                                }
                                true
                            },
                        )
                        .unwrap();
                    answered += 1;
                    assert!(r.tokens.len() <= n);
                    assert_eq!(r.tokens.len(), seen, "every token streamed once");
                    match r.stop_reason {
                        StopReason::MaxTokens => assert_eq!(r.tokens.len(), n),
                        StopReason::Cancelled => assert!(stop_after.is_some()),
                        StopReason::Deadline => assert!(opts.deadline.is_some()),
                        other => panic!("unexpected stop {other:?}"),
                    }
                }
                (asked, answered)
            })
        })
        .collect();
    let mut asked = 0;
    for t in sessions {
        let (a, b) = t.join().unwrap();
        assert_eq!(a, b, "a request was lost");
        asked += a;
    }
    let s = settled(&e);
    assert_eq!(s.kv_blocks_free, total, "every KV block came back: {s:?}");
    assert_eq!(s.kv_blocks_used, 0);
    assert_eq!(
        s.requests_finished as usize, asked,
        "each request ended once: {s:?}"
    );
    assert_eq!(s.requests_failed, 0);
}

#[test]
fn preemption_under_a_small_kv_budget_changes_no_token() {
    let dir = tempfile::tempdir().unwrap();
    let mqf = tiny_f32(dir.path());
    let opts = EngineOptions {
        kv_dtype: KvDtype::F32,
        ..options()
    };
    let free = load(&mqf, opts.clone());
    let ps = prompts(&free);
    let n = 40;
    let want: Vec<Vec<u32>> = ps
        .iter()
        .map(|p| free.generate(p, &greedy(n), |_, _| true).unwrap().tokens)
        .collect();
    drop(free);

    // Room for the prompts, not for all four answers.
    let budget = ps.iter().map(|p| p.len()).sum::<usize>();
    let tight = load(
        &mqf,
        EngineOptions {
            kv_cache: KvCacheSize::Positions(budget),
            ..opts
        },
    );
    assert!(budget < ps.iter().map(|p| p.len() + n).sum::<usize>());
    let streams: Vec<Generating> = ps
        .iter()
        .map(|p| {
            tight
                .submit(GenerateRequest {
                    prompt: tokens(p),
                    options: greedy(n),
                    ..Default::default()
                })
                .unwrap()
        })
        .collect();
    let got: Vec<Finished> = streams.into_iter().map(|g| g.wait().unwrap()).collect();
    let s = settled(&tight);
    assert!(s.preemptions > 0, "the budget forced no preemption: {s:?}");
    assert!(got.iter().any(|f| f.stats.preemptions > 0));
    for (i, (f, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            &f.tokens, w,
            "prompt {i} (preempted {} times)",
            f.stats.preemptions
        );
    }
    assert_eq!(s.kv_blocks_free, s.kv_blocks_total);
}

#[test]
fn a_second_session_with_the_same_picture_prefills_only_its_new_positions() {
    let dir = tempfile::tempdir().unwrap();
    let mqf = tiny_f32(dir.path());
    let e = load(
        &mqf,
        EngineOptions {
            kv_dtype: KvDtype::F32,
            ..options()
        },
    );
    let g = Golden::load(&fixture("tiny-a/golden_image.safetensors"));
    let pixels = &g.get("pixel_values").f32;
    let bs = e.options().kv_block_size;

    let ask = |question: &str| {
        let mut s = Session::new(e.clone());
        s.attach_pixels(pixels).unwrap();
        let r = s.ask(question, &greedy(4), None, |_, _| true).unwrap();
        (r, s.last_logits().to_vec())
    };
    let (first, _) = ask("What is in the picture?");
    assert_eq!(first.stats.reused_positions, 0);
    let prompt = first.stats.prefill_positions;

    // Same system prompt and picture, another question: the blocks before the
    // question come from the cache.
    let (second, _) = ask("Which colours does it have?");
    let prompt2 = second.stats.prefill_positions + second.stats.reused_positions;
    let common = first
        .prompt
        .iter()
        .zip(&second.prompt)
        .take_while(|(a, b)| a == b)
        .count();
    let patches = e.vision_config().unwrap().num_patches();
    let common_positions = common - 1 + patches; // one id stands for the picture
    assert_eq!(second.stats.reused_positions, common_positions / bs * bs);
    assert_eq!(
        second.stats.prefill_positions,
        prompt2 - common_positions / bs * bs
    );

    // The very same question again: everything but the last (partial) block.
    let (third, logits3) = ask("What is in the picture?");
    assert_eq!(third.stats.reused_positions, (prompt - 1) / bs * bs);
    assert_eq!(third.tokens, first.tokens);

    // Against an engine without the cache, the reused KV gives the same logits.
    let plain = load(
        &mqf,
        EngineOptions {
            kv_dtype: KvDtype::F32,
            prefix_cache: false,
            ..options()
        },
    );
    let mut s = Session::new(plain.clone());
    s.attach_pixels(pixels).unwrap();
    s.ask("What is in the picture?", &greedy(4), None, |_, _| true)
        .unwrap();
    let d = max_abs_diff(&logits3, s.last_logits());
    assert!(d < 1e-4, "cached KV changed the logits by {d}");
}

#[test]
fn evicted_blocks_are_never_read() {
    let dir = tempfile::tempdir().unwrap();
    let mqf = tiny_f32(dir.path());
    let opts = EngineOptions {
        kv_dtype: KvDtype::F32,
        kv_cache: KvCacheSize::Positions(256),
        ..options()
    };
    let e = load(&mqf, opts.clone());
    let ps = prompts(&e);
    let first = e.generate(&ps[3], &greedy(8), |_, _| true).unwrap();
    // Other long prompts take every block, evicting the first one's.
    for k in 0..6u32 {
        let p: Vec<u32> = (0..200).map(|i| 300 + (i * 13 + k * 101) % 5000).collect();
        e.generate(&p, &greedy(8), |_, _| true).unwrap();
    }
    let s = settled(&e);
    assert!(s.kv_evictions > 0, "{s:?}");
    let again = e
        .submit(GenerateRequest {
            prompt: tokens(&ps[3]),
            options: greedy(8),
            ..Default::default()
        })
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(again.tokens, first.tokens);
    // Whatever it still found in the cache was its own content.
    let fresh = load(
        &mqf,
        EngineOptions {
            prefix_cache: false,
            ..opts
        },
    );
    let want = fresh.generate(&ps[3], &greedy(8), |_, _| true).unwrap();
    assert_eq!(again.tokens, want.tokens);
    assert!(again.stats.reused_positions < ps[3].len());
}

#[test]
fn a_queued_request_can_be_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let e = load(
        &tiny_f32(dir.path()),
        EngineOptions {
            max_sequences: 1,
            ..options()
        },
    );
    let ps = prompts(&e);
    // The one slot is taken by a long answer nobody reads yet (it pauses at
    // the stream window, still holding the slot).
    let mut a = e
        .submit(GenerateRequest {
            prompt: tokens(&ps[0]),
            options: greedy(1000),
            ..Default::default()
        })
        .unwrap();
    assert!(matches!(a.next_event().unwrap(), StreamEvent::Token { .. }));
    let b = e
        .submit(GenerateRequest {
            prompt: tokens(&ps[1]),
            options: greedy(5),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(e.stats().running, 1);
    b.cancel();
    let f = b.wait().unwrap();
    assert_eq!(f.stop, StopReason::Cancelled);
    assert!(f.tokens.is_empty());
    assert_eq!(f.stats.prefill_positions, 0, "it never started");
    // The running answer was not disturbed.
    assert!(matches!(a.next_event().unwrap(), StreamEvent::Token { .. }));
    a.cancel();
    assert_eq!(a.wait().unwrap().stop, StopReason::Cancelled);
}

#[test]
fn a_request_can_be_cancelled_in_the_middle_of_its_prefill() {
    let dir = tempfile::tempdir().unwrap();
    let e = load(
        &tiny_f32(dir.path()),
        EngineOptions {
            max_batch_tokens: 4,
            max_sequences: 2,
            ..options()
        },
    );
    // Hundreds of 4-row steps of prefill.
    let prompt: Vec<u32> = (0..1900).map(|i| 300 + (i * 7) % 4000).collect();
    let g = e
        .submit(GenerateRequest {
            prompt: tokens(&prompt),
            options: greedy(5),
            ..Default::default()
        })
        .unwrap();
    while e.stats().prefill_positions == 0 {
        std::thread::yield_now();
    }
    g.cancel();
    let f = g.wait().unwrap();
    assert_eq!(f.stop, StopReason::Cancelled);
    assert!(f.tokens.is_empty());
    assert!(
        f.stats.prefill_positions > 0 && f.stats.prefill_positions < prompt.len(),
        "{} of {} positions",
        f.stats.prefill_positions,
        prompt.len()
    );
    let s = settled(&e);
    assert_eq!(s.kv_blocks_used, 0);
}

#[test]
fn a_full_queue_is_a_busy_error() {
    let dir = tempfile::tempdir().unwrap();
    let e = load(
        &tiny_f32(dir.path()),
        EngineOptions {
            max_sequences: 1,
            max_queue: 2,
            ..options()
        },
    );
    let ps = prompts(&e);
    let submit = |p: &[u32]| {
        e.submit(GenerateRequest {
            prompt: tokens(p),
            options: greedy(1000),
            ..Default::default()
        })
    };
    let mut a = submit(&ps[0]).unwrap();
    assert!(matches!(a.next_event().unwrap(), StreamEvent::Token { .. }));
    let b = submit(&ps[1]).unwrap();
    let c = submit(&ps[2]).unwrap();
    let err = submit(&ps[3]).unwrap_err();
    assert!(matches!(err, Error::Busy { waiting: 2, max: 2 }), "{err}");
    assert!(err.to_string().contains("busy"), "{err}");
    drop((a, b, c));
    settled(&e);
    // Room again.
    let d = submit(&ps[3]).unwrap();
    d.cancel();
    d.wait().unwrap();
}
