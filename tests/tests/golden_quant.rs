//! BF16, Q8_0 and Q4_0 weights against goldens that our generator computed with the
//! same weights round-tripped through the same quantizer (ggml's rules) and f32
//! activations. With `int8_activations` off our kernels also run f32 activations
//! against the dequantized weights, so the only difference left is summation
//! order: the F32 tolerances apply, and greedy tokens must match.
//!
//! With the default int8 activations (Q8_0/Q4_0 only), activation quantization
//! adds its own small error: against the same dequantized oracle the logits'
//! minimum cosine stays above 0.999 and top-1 agrees on every teacher-forced
//! step on gen-hd80; tiny-a's random logits have margins so small that int8
//! noise flips 2 of 8 Q4_0 steps (measured 6/8, cosine 0.9990), so its floors
//! are lower. Against the f32 golden the same floors as f32 activations hold,
//! except tiny-a Q8_0 (measured 0.9976 vs 0.9987).
//!
//! Against the *unquantized* f32 golden we check what a user would notice:
//! cosine similarity of the logits and top-1 agreement (teacher-forced on the f32
//! tokens), with floors below what the oracle itself measured for the same
//! weights (`tiny-a/tolerance_quant.json`: Q8_0 min cosine 0.9987, Q4_0 0.843
//! with 1 of 8 steps agreeing — random tiny models have small logit margins, so
//! Q4_0's noise flips most of them; we land on the same figures).

use mipha_tests::*;

const TIGHT: Tolerance = Tolerance {
    hidden: 1e-4,
    logits: 1e-3,
};

/// Floors for the int8-activation engine: min cosine and top-1 agreement
/// against the dequantized oracle, and min cosine against the f32 golden.
struct Int8Floors {
    oracle_cos: f64,
    oracle_agree: usize,
    f32_cos: f64,
}

const NO_INT8: Int8Floors = Int8Floors {
    oracle_cos: 1.0,
    oracle_agree: 8,
    f32_cos: 1.0,
};

fn check(fixture_name: &str, quant: &str, cos_floor: f64, min_agree: usize, int8: Int8Floors) {
    let dir = tempfile::tempdir().unwrap();
    let mqf = convert(
        &fixture(&format!("{fixture_name}/checkpoint")),
        dir.path(),
        quant,
        quant,
    );
    let e = conformance_engine(&mqf);
    for name in ["golden_text", "golden_image"] {
        let g = Golden::load(&fixture(&format!(
            "{fixture_name}/quant/{name}.{quant}.safetensors"
        )));
        let r = check_lm(&e, &g, TIGHT);
        eprintln!(
            "{fixture_name} {name} {quant} vs dequantized oracle: hidden {:e}, logits {:e}",
            r.max_hidden, r.max_logits
        );

        // Against the f32 golden: teacher-forced on the f32 tokens.
        let f32g = Golden::load(&fixture(&format!("{fixture_name}/{name}.safetensors")));
        let (cos, agree) = logits_vs(&e, &f32g);
        eprintln!("  vs f32 golden: min cosine {cos:.5}, top-1 agreement {agree}/8");
        assert!(
            cos > cos_floor,
            "{quant}: logits cosine {cos} <= {cos_floor}"
        );
        assert!(
            agree >= min_agree,
            "{quant}: top-1 agreed on only {agree} of 8 steps"
        );
    }
    if quant == "bf16" {
        return; // no integer kernels for BF16: the default engine is the one above
    }
    let e8 = conformance_engine_int8(&mqf);
    for name in ["golden_text", "golden_image"] {
        let g = Golden::load(&fixture(&format!(
            "{fixture_name}/quant/{name}.{quant}.safetensors"
        )));
        let (cos, agree) = logits_vs(&e8, &g);
        eprintln!(
            "{fixture_name} {name} {quant} int8 activations vs dequantized oracle: \
             min cosine {cos:.5}, top-1 agreement {agree}/8"
        );
        assert!(
            cos > int8.oracle_cos,
            "{quant} int8: cosine {cos} vs the dequantized oracle"
        );
        assert!(
            agree >= int8.oracle_agree,
            "{quant} int8: top-1 agreed with the dequantized oracle on {agree} of 8 steps"
        );
        let f32g = Golden::load(&fixture(&format!("{fixture_name}/{name}.safetensors")));
        let (cos, agree) = logits_vs(&e8, &f32g);
        eprintln!("  vs f32 golden: min cosine {cos:.5}, top-1 agreement {agree}/8");
        assert!(
            cos > int8.f32_cos,
            "{quant} int8: logits cosine {cos} <= {}",
            int8.f32_cos
        );
        assert!(
            agree >= min_agree,
            "{quant} int8: top-1 agreed on only {agree} of 8 steps"
        );
    }
}

/// Minimum cosine over the generation rows, and how many argmaxes agree.
fn logits_vs(e: &mipha_models::Engine, g: &Golden) -> (f64, usize) {
    use mipha_models::Logits;
    use mipha_runtime::Input;
    let hidden = e.config().hidden_size;
    let vocab = e.config().vocab_size;
    let img = g.has("image_embeds").then(|| g.get("image_embeds"));
    let mut inputs = Vec::new();
    for id in g.ids("input_ids") {
        if id < 0 {
            let img = img.unwrap();
            for p in 0..img.f32.len() / hidden {
                inputs.push(Input::Embedding(&img.f32[p * hidden..(p + 1) * hidden]));
            }
        } else {
            inputs.push(Input::Token(id as u32));
        }
    }
    let seq = e.new_sequence();
    let mut row = Vec::new();
    e.forward(seq, &inputs, Logits::Last, &mut row, None)
        .unwrap();
    let gen = g.ids("gen_token_ids");
    let gl = &g.get("gen_logits").f32;
    let (mut min_cos, mut agree) = (1.0f64, 0);
    for (i, &tok) in gen.iter().enumerate() {
        if i > 0 {
            e.forward(
                seq,
                &[Input::Token(gen[i - 1] as u32)],
                Logits::Last,
                &mut row,
                None,
            )
            .unwrap();
        }
        let gold = &gl[i * vocab..(i + 1) * vocab];
        min_cos = min_cos.min(cosine(&row, gold));
        agree += usize::from(argmax(&row) as i64 == tok);
    }
    e.release_sequence(seq).unwrap();
    (min_cos, agree)
}

#[test]
fn tiny_a_bf16() {
    check("tiny-a", "bf16", 0.9999, 8, NO_INT8);
}

#[test]
fn tiny_a_q8_0() {
    check(
        "tiny-a",
        "q8_0",
        0.998,
        7,
        Int8Floors {
            oracle_cos: 0.999,
            oracle_agree: 8,
            f32_cos: 0.997,
        },
    );
}

#[test]
fn tiny_a_q4_0() {
    check(
        "tiny-a",
        "q4_0",
        0.8,
        0,
        Int8Floors {
            oracle_cos: 0.998,
            oracle_agree: 6,
            f32_cos: 0.8,
        },
    );
}

#[test]
fn gen_hd80_bf16() {
    check("gen-hd80", "bf16", 0.9999, 8, NO_INT8);
}

#[test]
fn gen_hd80_q8_0() {
    check(
        "gen-hd80",
        "q8_0",
        0.999,
        7,
        Int8Floors {
            oracle_cos: 0.9999,
            oracle_agree: 8,
            f32_cos: 0.999,
        },
    );
}

#[test]
fn gen_hd80_q4_0() {
    check(
        "gen-hd80",
        "q4_0",
        0.95,
        2,
        Int8Floors {
            oracle_cos: 0.9999,
            oracle_agree: 8,
            f32_cos: 0.95,
        },
    );
}
