//! The Phi-2 byte-level BPE tokenizer from the file's `tokenizer.json`, with
//! Mipha's chunk-wise tokenization around image placeholders.

use mipha_runtime::{Error, Metadata, Result};

use crate::template::Segment;

/// One id of a prompt: a token, or the place of an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PromptId {
    Token(u32),
    /// the `n`-th image of the prompt (written as -200 in the authors' ids)
    Image(usize),
}

pub struct MiphaTokenizer {
    /// special tokens recognised in the text (`<|endoftext|>` is one id)
    inner: tokenizers::Tokenizer,
    /// special tokens' spellings are plain text (transformers'
    /// `split_special_tokens`): for what users write
    plain: tokenizers::Tokenizer,
    eos: u32,
    image_token_index: i64,
    /// every id's decoded bytes, for a byte-level decoder (see [`TokenBytes`])
    bytes: Option<TokenBytes>,
}

/// The bytes each token id decodes to, taken from the vocabulary once at load so
/// that streaming text needs no tokenizer call (and no allocation) per token.
/// Built only when the tokenizer's decoder is plain `ByteLevel`, whose decoding is
/// exactly "concatenate each token's bytes, then UTF-8 (lossy)"; ids the tokenizer
/// does not know decode to nothing, as `tokenizers` skips them.
pub struct TokenBytes {
    bytes: Vec<u8>,
    /// `bytes[offsets[id]..offsets[id + 1]]` is the id's text
    offsets: Vec<u32>,
    max_len: usize,
}

impl TokenBytes {
    fn build(inner: &tokenizers::Tokenizer) -> Option<Self> {
        if !matches!(
            inner.get_decoder(),
            Some(tokenizers::DecoderWrapper::ByteLevel(_))
        ) {
            return None;
        }
        let n = inner
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&m| m as usize + 1);
        let mut bytes = Vec::new();
        let mut offsets = Vec::with_capacity(n + 1);
        offsets.push(0u32);
        let mut max_len = 0;
        for id in 0..n as u32 {
            let start = bytes.len();
            if let Some(token) = inner.id_to_token(id) {
                // As `ByteLevel::decode_chain`: every char through the GPT-2 byte
                // alphabet, or the token's own UTF-8 if any char is outside it
                // (added tokens such as runs of spaces).
                let mapped: Option<Vec<u8>> = token.chars().map(byte_level_byte).collect();
                bytes.extend_from_slice(mapped.as_deref().unwrap_or(token.as_bytes()));
            }
            max_len = max_len.max(bytes.len() - start);
            offsets.push(u32::try_from(bytes.len()).ok()?);
        }
        Some(TokenBytes {
            bytes,
            offsets,
            max_len,
        })
    }

    /// The bytes of `id` (empty for an unknown id).
    pub fn get(&self, id: u32) -> &[u8] {
        let i = id as usize;
        if i + 1 >= self.offsets.len() {
            return &[];
        }
        &self.bytes[self.offsets[i] as usize..self.offsets[i + 1] as usize]
    }

    /// Most bytes one token decodes to.
    pub fn max_len(&self) -> usize {
        self.max_len
    }
}

/// The byte a char of GPT-2's byte-level alphabet stands for: printable Latin-1
/// stands for itself, the other 68 bytes (controls, space, DEL, NBSP, soft hyphen)
/// were moved, in order, to U+0100.. (`bytes_to_unicode` in the GPT-2 encoder).
fn byte_level_byte(c: char) -> Option<u8> {
    let c = c as u32;
    let printable = |b: u32| {
        (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
    };
    if printable(c) {
        return Some(c as u8);
    }
    let n = c.checked_sub(0x100)?;
    (0u32..=0xff)
        .filter(|&b| !printable(b))
        .nth(n as usize)
        .map(|b| b as u8)
}

impl MiphaTokenizer {
    /// The tokenizer of a file, its ids bounded by `lm.vocab_size` (or by
    /// [`crate::ModelLimits`]' vocabulary bound in a file without one).
    pub fn from_metadata(m: &Metadata) -> Result<Self> {
        let vocab = match m.get_u64("lm.vocab_size") {
            Ok(v) => crate::limits::check_range("lm.vocab_size", v, 1, usize::MAX)?,
            Err(_) => crate::ModelLimits::default().max_vocab,
        };
        Self::from_metadata_with_vocab(m, vocab)
    }

    /// The tokenizer of a file whose model has `vocab` rows: every id the
    /// tokenizer can produce, and `<|endoftext|>`, must name one of them.
    pub fn from_metadata_with_vocab(m: &Metadata, vocab: usize) -> Result<Self> {
        let key = "tokenizer.huggingface.json";
        let json = m.get_bytes(key)?;
        // The `tokenizers` crate panics on some malformed files; a hostile file
        // must be an error, not a crash.
        let parsed = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(json));
        let inner = match parsed {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => return Err(Error::Config(format!("{key}: {e}"))),
            Err(_) => {
                return Err(Error::Config(format!(
                    "{key}: the tokenizer library crashed reading it (malformed)"
                )))
            }
        };
        if let Some((token, &id)) = inner
            .get_vocab(true)
            .iter()
            .find(|(_, &id)| id as usize >= vocab)
        {
            return Err(Error::Config(format!(
                "{key}: token {token:?} has id {id}, outside the model's {vocab} rows \
                 (`lm.vocab_size`)"
            )));
        }
        let eos = m.get_u64("tokenizer.eos_token_id")?;
        if eos >= vocab as u64 {
            return Err(Error::Config(format!(
                "`tokenizer.eos_token_id` = {eos} is outside the model's {vocab} rows"
            )));
        }
        let mut plain = inner.clone();
        plain.set_encode_special_tokens(true);
        Ok(MiphaTokenizer {
            bytes: TokenBytes::build(&inner),
            plain,
            inner,
            eos: eos as u32,
            image_token_index: m.get_i64("tokenizer.image_token_index").unwrap_or(-200),
        })
    }

    pub fn eos_token_id(&self) -> u32 {
        self.eos
    }

    pub fn image_token_index(&self) -> i64 {
        self.image_token_index
    }

    /// Text to ids: no BOS (Phi-2 prepends none), special tokens such as
    /// `<|endoftext|>` recognised (as transformers does by default).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Self::ids(&self.inner, text)
    }

    /// Text to ids with every special token's spelling taken as plain text,
    /// as transformers' `split_special_tokens` does: what a user writes.
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        Self::ids(&self.plain, text)
    }

    fn ids(t: &tokenizers::Tokenizer, text: &str) -> Result<Vec<u32>> {
        let enc = t
            .encode(text, false)
            .map_err(|e| Error::Other(format!("tokenizer: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Each text segment is tokenized on its own, as the authors'
    /// `tokenizer_image_token` does (so the space before an image is its own
    /// token). Text segments take special tokens' spellings as text, so a user
    /// cannot type `<|endoftext|>` into a conversation; only the template's
    /// [`Segment::Special`]s become control tokens.
    pub fn encode_segments(&self, segments: &[Segment]) -> Result<Vec<PromptId>> {
        self.encode_segments_with(segments, false)
    }

    /// [`MiphaTokenizer::encode_segments`]; with `parse_special`, special tokens
    /// in text segments are recognised too (transformers' default, for
    /// conformance runs).
    pub fn encode_segments_with(
        &self,
        segments: &[Segment],
        parse_special: bool,
    ) -> Result<Vec<PromptId>> {
        let mut ids = Vec::new();
        for seg in segments {
            let toks = match seg {
                Segment::Text(t) if parse_special => self.encode(t)?,
                Segment::Text(t) => self.encode_text(t)?,
                Segment::Special(t) => self.encode(t)?,
                Segment::Image(i) => {
                    ids.push(PromptId::Image(*i));
                    continue;
                }
            };
            ids.extend(toks.into_iter().map(PromptId::Token));
        }
        Ok(ids)
    }

    /// Ids as the authors write them: images as `image_token_index` (-200).
    pub fn to_raw_ids(&self, ids: &[PromptId]) -> Vec<i64> {
        ids.iter()
            .map(|id| match id {
                PromptId::Token(t) => *t as i64,
                PromptId::Image(_) => self.image_token_index,
            })
            .collect()
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| Error::Other(format!("tokenizer: {e}")))
    }

    /// Each id's bytes, when the decoder is byte-level (streaming text then needs
    /// no tokenizer call per token); `None` for other decoders.
    pub fn token_bytes(&self) -> Option<&TokenBytes> {
        self.bytes.as_ref()
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
