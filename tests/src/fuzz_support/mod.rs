//! Fuzzing support shared by the cargo-fuzz targets in `fuzz/` and the stable
//! replay test `tests/tests/fuzz_replay.rs` (see `docs/fuzzing.md`):
//!
//! * [`targets`]: the five targets as functions of the input bytes;
//! * [`seeds`]: valid inputs for each, built in code (the seed corpora);
//! * [`mutate`]: deterministic byte-level and structure-aware mutations;
//! * [`known`]: findings not fixed yet, and the inputs that reach them;
//! * [`rng`]: the seeded PRNG behind every mutation.

pub mod known;
pub mod mutate;
pub mod rng;
pub mod seeds;
pub mod targets;

pub use rng::Rng;

/// Whether a panic location (`file:line`) is inside a dependency rather than
/// this workspace.
pub fn in_dependency(location: &str) -> bool {
    location.contains("/.cargo/registry/") || location.contains("/.cargo/git/")
}

/// For the cargo-fuzz targets (after libfuzzer-sys's own hook, which aborts on
/// every panic): prints each panic, and aborts, so that libFuzzer records a
/// crash, unless the panic is inside a dependency, which the code under test
/// may catch on purpose (the image decoders, the converter's tokenizer
/// loading). A dependency panic that is not caught still ends as a crash:
/// libfuzzer-sys aborts when a panic leaves the target.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let at = info
            .location()
            .map_or(String::new(), |l| format!("{}:{}", l.file(), l.line()));
        eprintln!("{info}");
        if !in_dependency(&at) {
            std::process::abort();
        }
    }));
}
