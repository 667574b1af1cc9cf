//! F16 weights on tiny-a: logits within 5e-2 of the f32 golden and greedy tokens
//! identical. The fixture README measured 1.2e-2 for a fully f16 oracle
//! (weights and activations); we hold f16 weights with f32 activations, which
//! lands closer, so 5e-2 leaves room without hiding a real bug.
//!
//! tiny-a's bf16 weights happen to be exact in f16 (small magnitudes, 7 of f16's
//! 10 mantissa bits), so here f16 lands as close as f32; the f32-stored
//! generated fixtures (`golden_generated.rs`) are where f16 rounding shows.

use mipha_tests::*;

#[test]
fn tiny_a_text_and_image_f16() {
    let dir = tempfile::tempdir().unwrap();
    let mqf = convert(&fixture("tiny-a/checkpoint"), dir.path(), "f16", "f16");
    let e = conformance_engine(&mqf);
    let tol = Tolerance {
        hidden: 5e-2,
        logits: 5e-2,
    };
    for golden in ["golden_text", "golden_image"] {
        let g = Golden::load(&fixture(&format!("tiny-a/{golden}.safetensors")));
        let r = check_lm(&e, &g, tol);
        eprintln!(
            "tiny-a {golden} f16: hidden {:e}, logits {:e}",
            r.max_hidden, r.max_logits
        );
    }
}
