//! (c) Picture bytes: `decode_bytes` and the preprocessing to pixels with tiny-a's settings.
//! The target itself is `mipha_tests::fuzz_support::targets::image`, shared
//! with the stable replay test (`tests/tests/fuzz_replay.rs`); see
//! `docs/fuzzing.md`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mipha_tests::fuzz_support::{install_panic_hook, known, targets};

fuzz_target!(init: install_panic_hook(), |data: &[u8]| {
    if known::skip("image", data).is_some() {
        return;
    }
    // Err (a refused input) is fine: crashes, hangs and leaks are the findings.
    let _ = targets::image(data);
});
