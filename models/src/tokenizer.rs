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
    inner: tokenizers::Tokenizer,
    eos: u32,
    image_token_index: i64,
}

impl MiphaTokenizer {
    pub fn from_metadata(m: &Metadata) -> Result<Self> {
        let json = m.get_bytes("tokenizer.huggingface.json")?;
        let inner = tokenizers::Tokenizer::from_bytes(json)
            .map_err(|e| Error::Config(format!("tokenizer.huggingface.json: {e}")))?;
        let eos = m.get_u64("tokenizer.eos_token_id")?;
        let eos = u32::try_from(eos)
            .map_err(|_| Error::Config(format!("tokenizer.eos_token_id {eos} is out of range")))?;
        Ok(MiphaTokenizer {
            inner,
            eos,
            image_token_index: m.get_i64("tokenizer.image_token_index").unwrap_or(-200),
        })
    }

    pub fn eos_token_id(&self) -> u32 {
        self.eos
    }

    pub fn image_token_index(&self) -> i64 {
        self.image_token_index
    }

    /// Plain text to ids: no BOS (Phi-2 prepends none), special tokens such as
    /// `<|endoftext|>` recognised.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Other(format!("tokenizer: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Each text segment is tokenized on its own, as the authors'
    /// `tokenizer_image_token` does (so the space before an image is its own token).
    pub fn encode_segments(&self, segments: &[Segment]) -> Result<Vec<PromptId>> {
        let mut ids = Vec::new();
        for seg in segments {
            match seg {
                Segment::Text(t) => ids.extend(self.encode(t)?.into_iter().map(PromptId::Token)),
                Segment::Image(i) => ids.push(PromptId::Image(*i)),
            }
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

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
