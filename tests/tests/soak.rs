//! A soak: many sessions and one-off requests at once for a bounded time, with
//! random pictures, random cancellations (from other threads and from the
//! token callback), random deadlines, requests that cannot fit, and a KV
//! budget far too small for all of them (parking, eviction and preemption all
//! run). Nothing may panic, every request either completes or gets a clear
//! error of an expected kind, and at the end no block is held, nothing is
//! queued, and a greedy answer is what it was before the storm.
//!
//! `MIPHA_SOAK_SECS` sets the length (default 60 s, CI mode; run it longer
//! by hand: `MIPHA_SOAK_SECS=1800 cargo test -p mipha-tests --test soak`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mipha_models::{
    CancelToken, Engine, EngineOptions, GenerateRequest, ImageLimits, KvCacheSize, PromptItem,
    Session, StopReason,
};
use mipha_runtime::Error;
use mipha_tests::*;

/// A small deterministic generator per worker (reproducible runs).
struct Rng(u64);

impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// A token callback that stops the answer after `n` tokens (the caller going
/// away mid-stream).
fn stopper(n: u64) -> impl FnMut(u32, &str) -> bool {
    let mut seen = 0;
    move |_, _| {
        seen += 1;
        seen < n
    }
}

/// What happened to one request, for the tally.
fn outcome<T>(r: &Result<T, Error>) -> Result<&'static str, String> {
    match r {
        Ok(_) => Ok("completed"),
        Err(Error::Busy { .. }) => Ok("busy"),
        Err(Error::ContextOverflow { .. }) => Ok("context overflow"),
        Err(Error::TextTooLong { .. }) => Ok("text too long"),
        Err(Error::Cancelled(_)) => Ok("cancelled"),
        Err(e) => Err(format!("unexpected error: {e}")),
    }
}

#[test]
fn many_sessions_with_pictures_cancellations_and_deadlines() {
    let secs: u64 = std::env::var("MIPHA_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let dir = tempfile::tempdir().unwrap();
    let mqf = convert(&fixture("tiny-a/checkpoint"), dir.path(), "f32", "f32");
    let e = Arc::new(
        Engine::load(
            &mqf,
            EngineOptions {
                threads: 2,
                max_batch_tokens: 32,
                max_sequences: 6,
                max_queue: 24,
                kv_block_size: 4,
                // ~3 conversations' worth for 12 workers
                kv_cache: KvCacheSize::Positions(160),
                image_cache: 2,
                image_limits: ImageLimits {
                    max_count: 4,
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let reference = e
        .generate(&[32, 8537, 11], &greedy(12), |_, _| true)
        .unwrap()
        .tokens;
    let base = Golden::load(&fixture("tiny-a/golden_image.safetensors"))
        .get("pixel_values")
        .f32
        .clone();
    let pictures: Arc<Vec<Vec<f32>>> = Arc::new(
        (0..5)
            .map(|i| {
                let mut p = base.clone();
                p[i * 31] += i as f32 * 0.25;
                p
            })
            .collect(),
    );
    let tally: Arc<Mutex<BTreeMap<&'static str, usize>>> = Arc::default();
    let end = Instant::now() + Duration::from_secs(secs);
    let workers: Vec<_> = (0..12u64)
        .map(|w| {
            let (e, pictures, tally) = (e.clone(), pictures.clone(), tally.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((w + 1) * 0x1234_5677));
                let count =
                    |what: &'static str| *tally.lock().unwrap().entry(what).or_default() += 1;
                while Instant::now() < end {
                    let cancel = CancelToken::new();
                    // A canceller from another thread, some of the time.
                    if rng.next(4) == 0 {
                        let (c, ms) = (cancel.clone(), rng.next(300));
                        std::thread::spawn(move || {
                            std::thread::sleep(Duration::from_millis(ms));
                            c.cancel();
                        });
                    }
                    let mut opts = greedy(1 + rng.next(24) as usize);
                    opts.ignore_eos = rng.next(2) == 0;
                    if rng.next(5) == 0 {
                        opts.deadline = Some(Instant::now() + Duration::from_millis(rng.next(400)));
                    }
                    if rng.next(3) == 0 {
                        // A one-off request through `submit`.
                        let prompt: Vec<PromptItem> = (0..1 + rng.next(40))
                            .map(|_| PromptItem::Token(100 + rng.next(5000) as u32))
                            .collect();
                        let r = e
                            .submit(GenerateRequest {
                                prompt,
                                options: opts,
                                cancel: Some(cancel),
                                ..Default::default()
                            })
                            .and_then(|g| g.for_each(stopper(rng.next(30))));
                        if let Ok(f) = &r {
                            assert!(f.tokens.len() <= 24);
                        }
                        count(outcome(&r).unwrap_or_else(|m| panic!("worker {w}: {m}")));
                        continue;
                    }
                    // A conversation of a few turns, some with pictures (a few
                    // asking for more than the context holds).
                    let mut s = Session::new(e.clone());
                    for _ in 0..1 + rng.next(3) {
                        for _ in 0..rng.next(3) {
                            let p = &pictures[rng.next(pictures.len() as u64) as usize];
                            match s.attach_pixels(p) {
                                Ok(()) => count("picture attached"),
                                Err(err) => count(
                                    outcome::<()>(&Err(err))
                                        .or_else(|m| match m.contains("pictures in one") {
                                            true => Ok("too many pictures"),
                                            false => Err(m),
                                        })
                                        .unwrap_or_else(|m| panic!("worker {w}: {m}")),
                                ),
                            }
                        }
                        let question = "What is this? ".repeat(1 + rng.next(6) as usize);
                        let stop = stopper(rng.next(30));
                        let r = s.ask(&question, &opts, Some(&cancel), stop);
                        if let Ok(reply) = &r {
                            assert!(matches!(
                                reply.stop_reason,
                                StopReason::Eos
                                    | StopReason::MaxTokens
                                    | StopReason::ContextFull
                                    | StopReason::Cancelled
                                    | StopReason::Deadline
                            ));
                        }
                        count(outcome(&r).unwrap_or_else(|m| panic!("worker {w}: {m}")));
                        if r.is_err() || rng.next(4) == 0 {
                            break;
                        }
                    }
                    if rng.next(2) == 0 {
                        // Leave it parked a while: the pool must reclaim it.
                        std::thread::sleep(Duration::from_millis(rng.next(50)));
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("no worker panicked");
    }
    let tally = tally.lock().unwrap().clone();
    eprintln!("soak of {secs} s: {tally:?}; engine: {:?}", e.stats());
    assert!(
        tally.get("completed").copied().unwrap_or(0) > 0,
        "{tally:?}"
    );
    // Cancellers may still be asleep: the engine settles once they are done.
    let settle = Instant::now() + Duration::from_secs(10);
    loop {
        let s = e.stats();
        let idle = s.running == 0
            && s.parked == 0
            && s.queue_depth == 0
            && s.images_pending == 0
            && s.kv_blocks_used == 0
            && s.kv_blocks_free == s.kv_blocks_total;
        if idle {
            break;
        }
        assert!(Instant::now() < settle, "the engine did not settle: {s:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = e
        .generate(&[32, 8537, 11], &greedy(12), |_, _| true)
        .unwrap()
        .tokens;
    assert_eq!(after, reference, "the storm changed a greedy answer");
}
