//! (e) A chat completion request body: the server's parser, then the preparation it runs before queueing (on a micro model).
//! The target itself is `mipha_tests::fuzz_support::targets::request`, shared
//! with the stable replay test (`tests/tests/fuzz_replay.rs`); see
//! `docs/fuzzing.md`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mipha_tests::fuzz_support::{install_panic_hook, known, targets};

fuzz_target!(init: install_panic_hook(), |data: &[u8]| {
    if known::skip("request", data).is_some() {
        return;
    }
    // Err (a refused input) is fine: crashes, hangs and leaks are the findings.
    let _ = targets::request(data);
});
