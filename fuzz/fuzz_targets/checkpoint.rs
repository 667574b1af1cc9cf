//! (b) A checkpoint folder (a bundle of its files): `config.json`, `preprocessor_config.json`, the safetensors headers and index, the tokenizer, then a whole conversion.
//! The target itself is `mipha_tests::fuzz_support::targets::checkpoint`, shared
//! with the stable replay test (`tests/tests/fuzz_replay.rs`); see
//! `docs/fuzzing.md`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mipha_tests::fuzz_support::{install_panic_hook, known, targets};

fuzz_target!(init: install_panic_hook(), |data: &[u8]| {
    if known::skip("checkpoint", data).is_some() {
        return;
    }
    // Err (a refused input) is fine: crashes, hangs and leaks are the findings.
    let _ = targets::checkpoint(data);
});
