//! Findings of the fuzzing, and the inputs that reach each (listed in
//! `docs/fuzzing.md` with input, symptom and place). While a finding's `SKIP_*`
//! constant is true, the replay test leaves out the inputs that reach it (and
//! the cargo-fuzz targets return early on them), so that everything else keeps
//! being checked while it is fixed; false checks it like any other input.
//!
//! All are false: every finding below is fixed, and the replay test passes
//! with none skipped. The constants stay as the switch for a regression (and
//! the template for the next finding).

use mipha_runtime::MetaValue;
use serde_json::Value;

use super::mutate::MqfImage;

/// `lm.num_hidden_layers` far above the layers in the file: `Engine::load`
/// built the plan of every layer before looking for any tensor, and
/// `PlanBuilder::weight` searched all earlier weights linearly (quadratic):
/// 65535 layers took minutes, 2^32 never finished.
pub const SKIP_LM_LAYERS_HUGE: bool = false;
/// The same for `vision.num_hidden_layers` (which took any u64).
pub const SKIP_VISION_LAYERS_HUGE: bool = false;
/// Token ids near 2^32 in the tokenizer JSON: `TokenBytes::build` sizes its
/// tables by the largest id (16 GiB for 2^32 - 1).
pub const SKIP_TOKENIZER_HUGE_IDS: bool = false;
/// A tokenizer JSON in a `.mqf` file that the `tokenizers` crate panics on
/// (`expect("Helper")` on a syntax error inside `decoder`, a BPE
/// `continuing_subword_prefix` longer than a merge's second token, ...):
/// `MiphaTokenizer::from_metadata` called `Tokenizer::from_bytes` unguarded, so
/// `Engine::load` panicked instead of failing.
pub const SKIP_TOKENIZER_LOAD_PANICS: bool = false;
/// `ChatTemplate::render` with a last turn that already has an answer
/// panicked (an `expect` on `render_messages`' "the last message must be the
/// user's"): the chat target then renders such turns with the answer left out.
pub const SKIP_RENDER_ANSWERED_LAST_TURN: bool = false;

/// Layer counts at most this large are always run.
const LAYERS_OK: u64 = 4096;
/// Token ids at most this large are always run.
const TOKEN_ID_OK: u64 = 1 << 20;

/// The known findings still skipped: (constant, what it leaves out).
pub fn active() -> Vec<(&'static str, &'static str)> {
    let all = [
        (
            "SKIP_LM_LAYERS_HUGE",
            SKIP_LM_LAYERS_HUGE,
            ".mqf files with lm.num_hidden_layers > 4096",
        ),
        (
            "SKIP_VISION_LAYERS_HUGE",
            SKIP_VISION_LAYERS_HUGE,
            ".mqf files with vision.num_hidden_layers > 4096",
        ),
        (
            "SKIP_TOKENIZER_HUGE_IDS",
            SKIP_TOKENIZER_HUGE_IDS,
            "tokenizer JSON ids above 2^20 in .mqf files",
        ),
        (
            "SKIP_TOKENIZER_LOAD_PANICS",
            SKIP_TOKENIZER_LOAD_PANICS,
            ".mqf files whose tokenizer JSON the tokenizers crate panics on",
        ),
        (
            "SKIP_RENDER_ANSWERED_LAST_TURN",
            SKIP_RENDER_ANSWERED_LAST_TURN,
            "ChatTemplate::render of turns whose last one is answered",
        ),
    ];
    all.into_iter()
        .filter(|(_, on, _)| *on)
        .map(|(name, _, what)| (name, what))
        .collect()
}

/// Why a `.mqf` input is left out, if it is: the metadata of `img` (a parsed
/// candidate) reaches a known finding.
pub fn mqf_skip(img: &MqfImage) -> Option<&'static str> {
    let big = |key: &str, limit: u64| match img.get(key) {
        Some(v) => v.as_u64().is_some_and(|n| n > limit),
        None => false,
    };
    if SKIP_LM_LAYERS_HUGE && big("lm.num_hidden_layers", LAYERS_OK) {
        return Some("SKIP_LM_LAYERS_HUGE");
    }
    if SKIP_VISION_LAYERS_HUGE && big("vision.num_hidden_layers", LAYERS_OK) {
        return Some("SKIP_VISION_LAYERS_HUGE");
    }
    if let Some(MetaValue::Bytes(b)) = img.get(super::mutate::TOKENIZER_KEY) {
        if SKIP_TOKENIZER_HUGE_IDS && max_token_id(b).is_some_and(|m| m > TOKEN_ID_OK) {
            return Some("SKIP_TOKENIZER_HUGE_IDS");
        }
        if SKIP_TOKENIZER_LOAD_PANICS && tokenizer_load_panics(b) {
            return Some("SKIP_TOKENIZER_LOAD_PANICS");
        }
    }
    None
}

/// Whether `tokenizers::Tokenizer::from_bytes` panics on `json` (tried with
/// the panic hook silenced; the last few answers are remembered, as most cases
/// carry a seed's tokenizer unchanged).
pub fn tokenizer_load_panics(json: &[u8]) -> bool {
    use std::sync::Mutex;
    type Seen = Vec<(u64, bool)>;
    static SEEN: Mutex<Seen> = Mutex::new(Vec::new());
    let key = fnv1a(json);
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(&(_, p)) = seen.iter().find(|(k, _)| *k == key) {
        return p;
    }
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let panics = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(json)).is_err();
    std::panic::set_hook(hook);
    if seen.len() >= 16 {
        seen.remove(0);
    }
    seen.push((key, panics));
    panics
}

fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// The largest id of a tokenizer JSON's vocabulary and added tokens.
fn max_token_id(json: &[u8]) -> Option<u64> {
    let v: Value = serde_json::from_slice(json).ok()?;
    let vocab = v["model"]["vocab"]
        .as_object()
        .into_iter()
        .flat_map(|m| m.values());
    let added = v["added_tokens"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| &t["id"]);
    vocab.chain(added).filter_map(Value::as_u64).max()
}

/// Why a replacement inside a `.mqf` file's tokenizer JSON is left out, if it is.
pub fn tokenizer_json_skip(path: &str, new: &Value) -> Option<&'static str> {
    let id = path.starts_with("/model/vocab/") || path.ends_with("/id");
    if SKIP_TOKENIZER_HUGE_IDS && id && new.as_u64().is_some_and(|n| n > TOKEN_ID_OK) {
        return Some("SKIP_TOKENIZER_HUGE_IDS");
    }
    None
}

/// Why an input of target `target` is left out, if it is (for the cargo-fuzz
/// targets, which see raw inputs).
pub fn skip(target: &str, data: &[u8]) -> Option<&'static str> {
    match target {
        "mqf" => MqfImage::parse(data).and_then(|img| mqf_skip(&img)),
        _ => None,
    }
}
