//! The tokenizer stored in the `.mqf` file: the checkpoint's `tokenizer.json`, or one
//! built from the slow-tokenizer files (`vocab.json` + `merges.txt` +
//! `added_tokens.json`) that Mipha-3B ships instead.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use serde_json::Value;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Model, Tokenizer};

use crate::config::read_json;
use crate::error::{ConvertError, Result};

/// The Phi-2 / CodeGen `tokenizer.json` the project ships (see
/// `assets/phi2-tokenizer/SOURCE.md`); `synth` embeds it.
pub const REFERENCE_TOKENIZER_JSON: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../assets/phi2-tokenizer/tokenizer.json"
));

/// The end-of-text token of GPT-2-family tokenizers; Phi-2 uses it as BOS, EOS and PAD.
pub const EOS_TOKEN: &str = "<|endoftext|>";

/// A tokenizer ready to be stored: its JSON bytes and the special ids read from it.
#[derive(Clone, Debug)]
pub struct TokenizerInfo {
    pub json: Vec<u8>,
    pub eos_id: u32,
    /// The files it came from, relative to the checkpoint dir (empty when embedded).
    pub source_files: Vec<String>,
}

impl TokenizerInfo {
    /// Parses `json` with the `tokenizers` crate (the runtime will) and looks up EOS.
    pub fn from_json(json: Vec<u8>, path: &Path, source_files: Vec<String>) -> Result<Self> {
        let err = |detail: String| ConvertError::Tokenizer {
            path: path.into(),
            detail,
        };
        let tok = load(&json).map_err(err)?;
        let eos_id = tok
            .token_to_id(EOS_TOKEN)
            .ok_or_else(|| err(format!("has no `{EOS_TOKEN}` token")))?;
        Ok(TokenizerInfo {
            json,
            eos_id,
            source_files,
        })
    }

    pub fn reference() -> Self {
        Self::from_json(
            REFERENCE_TOKENIZER_JSON.to_vec(),
            Path::new("<embedded phi2 tokenizer.json>"),
            Vec::new(),
        )
        .expect("the embedded reference tokenizer is valid")
    }
}

/// Loads a `tokenizer.json` with the `tokenizers` crate, whose deserialisers
/// panic on some malformed files (`expect("Helper")` on a JSON syntax error inside
/// `decoder`, a `continuing_subword_prefix` longer than a merge's second token,
/// ...): syntax is checked first, and any other panic becomes an error too.
fn load(json: &[u8]) -> std::result::Result<Tokenizer, String> {
    // A full parse (escapes, depth), as the tokenizers crate's own will be.
    serde_json::from_slice::<Value>(json)
        .map_err(|e| format!("cannot load: not valid JSON: {e}"))?;
    match std::panic::catch_unwind(|| Tokenizer::from_bytes(json)) {
        Ok(Ok(tok)) => Ok(tok),
        Ok(Err(e)) => Err(format!("cannot load: {e}")),
        Err(_) => Err("cannot load: the tokenizers crate panicked on this file".into()),
    }
}

/// The checkpoint's tokenizer: `tokenizer.json` if present, else built from the
/// slow-tokenizer files.
pub fn load_checkpoint_tokenizer(dir: &Path) -> Result<TokenizerInfo> {
    let tj = dir.join("tokenizer.json");
    if tj.is_file() {
        let bytes = std::fs::read(&tj).map_err(|e| ConvertError::io(&tj, e))?;
        return TokenizerInfo::from_json(bytes, &tj, vec!["tokenizer.json".into()]);
    }
    if !dir.join("vocab.json").is_file() || !dir.join("merges.txt").is_file() {
        return Err(ConvertError::Tokenizer {
            path: dir.into(),
            detail: "no tokenizer.json, and no vocab.json + merges.txt to build one from".into(),
        });
    }
    let (json, files) = build_tokenizer_json(dir)?;
    TokenizerInfo::from_json(json.into_bytes(), &dir.join("vocab.json"), files)
}

/// Builds the fast tokenizer that transformers' `CodeGenTokenizer` (= GPT-2's
/// byte-level BPE) would convert the slow files into, and serialises it as
/// `tokenizer.json`. Returns the JSON and the files read (relative to `dir`).
///
/// Special tokens come from `special_tokens_map.json` and the `special` flags of
/// `tokenizer_config.json`'s `added_tokens_decoder`; when neither file exists,
/// `<|endoftext|>` is special (GPT-2's only special token).
pub fn build_tokenizer_json(dir: &Path) -> Result<(String, Vec<String>)> {
    let mut files = Vec::new();
    let vocab_path = dir.join("vocab.json");
    let merges_path = dir.join("merges.txt");
    let tok_err = |path: &Path, detail: String| ConvertError::Tokenizer {
        path: path.into(),
        detail,
    };

    let vocab: Vocab = {
        let v = read_json(&vocab_path)?;
        let map: HashMap<String, u32> = serde_json::from_value(v)
            .map_err(|e| tok_err(&vocab_path, format!("not a token -> id map: {e}")))?;
        map.into_iter().collect()
    };
    files.push("vocab.json".to_string());
    let merges_text =
        std::fs::read_to_string(&merges_path).map_err(|e| ConvertError::io(&merges_path, e))?;
    let mut merges = Vec::new();
    for (i, line) in merges_text.lines().enumerate() {
        // Only the first line may be the `#version: ...` header (GPT-2 writes it).
        if (i == 0 && line.starts_with("#version")) || line.is_empty() {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
                merges.push((a.to_string(), b.to_string()))
            }
            _ => {
                return Err(tok_err(
                    &merges_path,
                    format!("line {}: expected two tokens separated by one space", i + 1),
                ))
            }
        }
    }
    files.push("merges.txt".to_string());

    // The same model options as transformers' GPT2Converter.
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix(String::new())
        .fuse_unk(false)
        .build()
        .map_err(|e| tok_err(&merges_path, format!("invalid BPE: {e}")))?;

    // id -> (content, special, normalized/lstrip/... flags when known)
    let mut added: BTreeMap<u32, AddedSpec> = BTreeMap::new();
    let added_path = dir.join("added_tokens.json");
    if added_path.is_file() {
        let v: HashMap<String, u32> = serde_json::from_value(read_json(&added_path)?)
            .map_err(|e| tok_err(&added_path, format!("not a token -> id map: {e}")))?;
        for (content, id) in v {
            added.insert(id, AddedSpec::plain(content));
        }
        files.push("added_tokens.json".to_string());
    }

    let mut special: BTreeSet<String> = BTreeSet::new();
    let cfg_path = dir.join("tokenizer_config.json");
    let mut flags_from_config: HashMap<String, AddedSpec> = HashMap::new();
    if cfg_path.is_file() {
        let cfg = read_json(&cfg_path)?;
        if let Some(Value::Object(dec)) = cfg.get("added_tokens_decoder") {
            for (id, entry) in dec {
                let id: u32 = id.parse().map_err(|_| {
                    tok_err(
                        &cfg_path,
                        format!("added_tokens_decoder key `{id}` is not an id"),
                    )
                })?;
                let spec = AddedSpec::from_json(entry).ok_or_else(|| {
                    tok_err(&cfg_path, format!("added_tokens_decoder.{id} is malformed"))
                })?;
                if spec.special {
                    special.insert(spec.content.clone());
                }
                flags_from_config.insert(spec.content.clone(), spec.clone());
                added.entry(id).or_insert(spec);
            }
        }
        for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
            if let Some(s) = cfg.get(key).and_then(token_content) {
                special.insert(s);
            }
        }
        files.push("tokenizer_config.json".to_string());
    }
    let map_path = dir.join("special_tokens_map.json");
    if map_path.is_file() {
        let map = read_json(&map_path)?;
        if let Value::Object(m) = &map {
            for (key, v) in m {
                if key == "additional_special_tokens" {
                    for t in v.as_array().into_iter().flatten() {
                        special.extend(token_content(t));
                    }
                } else {
                    special.extend(token_content(v));
                }
            }
        }
        files.push("special_tokens_map.json".to_string());
    }
    if special.is_empty() && bpe_has(&bpe, EOS_TOKEN) {
        special.insert(EOS_TOKEN.to_string());
    }

    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::default()));
    tok.with_post_processor(Some(ByteLevel::new(true, false, true)));

    // Special tokens of the base vocabulary (e.g. <|endoftext|> = 50256) first, so that
    // they keep their vocabulary id.
    let model_vocab = tok.get_model().get_vocab();
    for s in &special {
        if let Some(&id) = model_vocab.get(s) {
            let spec = flags_from_config
                .get(s)
                .cloned()
                .unwrap_or_else(|| AddedSpec::plain(s.clone()));
            added.insert(
                id,
                AddedSpec {
                    special: true,
                    ..spec
                },
            );
        }
    }
    for spec in added.values_mut() {
        if special.contains(&spec.content) {
            spec.special = true;
        }
    }

    // `add_tokens` hands out ids in call order, starting after the model vocabulary,
    // so adding in id order reproduces the files' ids; checked below.
    for (&id, spec) in &added {
        let t = spec.to_added_token();
        if spec.special {
            tok.add_special_tokens(&[t]);
        } else {
            tok.add_tokens(&[t]);
        }
        let got = tok.token_to_id(&spec.content);
        if got != Some(id) {
            return Err(tok_err(
                &added_path,
                format!(
                    "added token {:?} should have id {id} but the tokenizer gave it {got:?} (ids must follow the vocabulary without gaps)",
                    spec.content
                ),
            ));
        }
    }
    let json = tok
        .to_string(false)
        .map_err(|e| tok_err(dir, format!("cannot serialise: {e}")))?;
    Ok((json, files))
}

fn bpe_has(bpe: &BPE, token: &str) -> bool {
    bpe.token_to_id(token).is_some()
}

/// `"<|endoftext|>"` or `{"content": "<|endoftext|>", ...}`.
fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

#[derive(Clone, Debug)]
struct AddedSpec {
    content: String,
    special: bool,
    normalized: Option<bool>,
    lstrip: bool,
    rstrip: bool,
    single_word: bool,
}

impl AddedSpec {
    fn plain(content: String) -> Self {
        AddedSpec {
            content,
            special: false,
            normalized: None,
            lstrip: false,
            rstrip: false,
            single_word: false,
        }
    }

    fn from_json(v: &Value) -> Option<Self> {
        let flag = |k: &str| v.get(k).and_then(Value::as_bool);
        Some(AddedSpec {
            content: v.get("content")?.as_str()?.to_string(),
            special: flag("special").unwrap_or(false),
            normalized: flag("normalized"),
            lstrip: flag("lstrip").unwrap_or(false),
            rstrip: flag("rstrip").unwrap_or(false),
            single_word: flag("single_word").unwrap_or(false),
        })
    }

    fn to_added_token(&self) -> AddedToken {
        // transformers' default: special tokens are not normalized, others are.
        let normalized = self.normalized.unwrap_or(!self.special);
        AddedToken::from(self.content.clone(), self.special)
            .normalized(normalized)
            .lstrip(self.lstrip)
            .rstrip(self.rstrip)
            .single_word(self.single_word)
    }
}
