//! A step that fails, by an error or by a panic in a kernel, fails only its own
//! requests: the other sequences of the step are run again on their own and
//! finish exactly as alone, the backend's buffers are restored, no KV block
//! leaks, and the engine goes on serving. Faults come from
//! `mipha_runtime::fault` (a poisoned token id makes the CPU backend's first
//! matmul fail after it has taken its output buffer). One test, so that the
//! process-wide poison never meets another test's steps.

use std::sync::Arc;

use mipha_models::{Engine, EngineOptions, GenerateRequest, PromptItem};
use mipha_runtime::fault::{poison_token, Fault};
use mipha_tests::*;

const POISON: u32 = 31337;

fn request(prompt: &[u32]) -> GenerateRequest {
    GenerateRequest {
        prompt: prompt.iter().map(|&t| PromptItem::Token(t)).collect(),
        options: greedy(8),
        ..Default::default()
    }
}

#[test]
fn a_failed_step_fails_only_its_own_requests() {
    let dir = tempfile::tempdir().unwrap();
    let mqf = convert(&fixture("tiny-a/checkpoint"), dir.path(), "f32", "f32");
    let e = Arc::new(
        Engine::load(
            &mqf,
            EngineOptions {
                threads: 2,
                max_batch_tokens: 32,
                kv_block_size: 4,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let good = [32u32, 8537, 11, 257];
    let alone = e.submit(request(&good)).unwrap().wait().unwrap();
    assert!(!alone.tokens.contains(&POISON));

    for fault in [Fault::Panic, Fault::Error] {
        poison_token(Some((POISON, fault)));
        // Submitted together, so they share their first steps.
        let a = e.submit(request(&good)).unwrap();
        let b = e.submit(request(&[32, POISON, 11])).unwrap();
        let c = e.submit(request(&[40, 41, 42, 43, 44])).unwrap();
        let err = b.wait().unwrap_err().to_string();
        assert!(err.contains("injected fault"), "{fault:?}: {err}");
        let a = a.wait().unwrap();
        assert_eq!(
            a.tokens, alone.tokens,
            "{fault:?}: the healthy request changed"
        );
        assert_eq!(c.wait().unwrap().tokens.len(), 8);
        // The engine goes on: the next request is served, and exactly.
        let again = e.submit(request(&good)).unwrap().wait().unwrap();
        assert_eq!(again.tokens, alone.tokens, "{fault:?}: after the fault");
        // The loop counts a sequence out just after its last event.
        let settle = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let s = e.stats();
            if s.running == 0 && s.kv_blocks_used == 0 && s.kv_blocks_free == s.kv_blocks_total {
                break;
            }
            assert!(
                std::time::Instant::now() < settle,
                "{fault:?}: blocks leaked: {s:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    poison_token(None);
    assert_eq!(
        e.submit(request(&[32, POISON, 11]))
            .unwrap()
            .wait()
            .unwrap()
            .tokens
            .len(),
        8
    );
}
