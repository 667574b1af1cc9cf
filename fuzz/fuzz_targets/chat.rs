//! (d) A chat: `ChatTemplate::render_messages` / `render`, then `MiphaTokenizer::encode_segments` with the Phi-2 tokenizer.
//! The target itself is `mipha_tests::fuzz_support::targets::chat`, shared
//! with the stable replay test (`tests/tests/fuzz_replay.rs`); see
//! `docs/fuzzing.md`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mipha_tests::fuzz_support::{install_panic_hook, known, targets};

fuzz_target!(init: install_panic_hook(), |data: &[u8]| {
    if known::skip("chat", data).is_some() {
        return;
    }
    // Err (a refused input) is fine: crashes, hangs and leaks are the findings.
    let _ = targets::chat(data);
});
