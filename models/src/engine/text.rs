//! Streaming text: token ids to UTF-8 pieces that never split a character.

use mipha_runtime::Result;

use crate::tokenizer::MiphaTokenizer;

/// Turns a token stream into text pieces that never split a UTF-8 character
/// (byte-level BPE tokens may hold part of one).
///
/// With a byte-level tokenizer ([`MiphaTokenizer::token_bytes`], every Phi-2
/// file) a piece is assembled from the token's bytes in buffers sized once by
/// [`TextDecoder::new`]: [`TextDecoder::push`] then never allocates. Bytes that can
/// never become valid UTF-8 come out as U+FFFD as `tokenizers` decodes them; an
/// incomplete character waits for the token that completes it. Other decoders fall
/// back to re-decoding a short window through `tokenizers` (which allocates).
#[derive(Default)]
pub struct TextDecoder {
    /// bytes of an incomplete character, then the newest token's bytes
    pending: Vec<u8>,
    /// the last piece
    piece: String,
    /// fallback state: ids of the window (`prefix..`), emitted up to `read`
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl TextDecoder {
    /// A decoder with its buffers sized for `tok`'s longest token.
    pub fn new(tok: &MiphaTokenizer) -> Self {
        let mut d = TextDecoder::default();
        if let Some(b) = tok.token_bytes() {
            d.reserve(b.max_len());
        }
        d
    }

    fn reserve(&mut self, max_token: usize) {
        // at most 3 held bytes + one token; an invalid byte grows to U+FFFD (3 bytes)
        let held = max_token + 4;
        self.pending
            .reserve(held.saturating_sub(self.pending.len()));
        self.piece
            .reserve((3 * held).saturating_sub(self.piece.len()));
    }

    /// Adds `id`; returns the text it completes (possibly empty).
    pub fn push(&mut self, tok: &MiphaTokenizer, id: u32) -> Result<&str> {
        let Some(table) = tok.token_bytes() else {
            return self.push_window(tok, id);
        };
        self.reserve(table.max_len());
        self.pending.extend_from_slice(table.get(id));
        self.piece.clear();
        let mut at = 0;
        while at < self.pending.len() {
            match std::str::from_utf8(&self.pending[at..]) {
                Ok(s) => {
                    self.piece.push_str(s);
                    at = self.pending.len();
                }
                Err(e) => {
                    let valid = &self.pending[at..at + e.valid_up_to()];
                    self.piece
                        .push_str(std::str::from_utf8(valid).expect("checked by from_utf8"));
                    at += e.valid_up_to();
                    match e.error_len() {
                        // as `String::from_utf8_lossy`: one U+FFFD per bad sequence
                        Some(n) => {
                            self.piece.push('\u{fffd}');
                            at += n;
                        }
                        // an incomplete character at the end: wait for more
                        None => break,
                    }
                }
            }
        }
        self.pending.drain(..at);
        Ok(&self.piece)
    }

    /// Tokenizers without a byte table: decode a short window before and after `id`.
    fn push_window(&mut self, tok: &MiphaTokenizer, id: u32) -> Result<&str> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read])?;
        let after = tok.decode(&self.ids[self.prefix..])?;
        self.piece.clear();
        if after.len() <= before.len() || after.ends_with('\u{fffd}') {
            return Ok(&self.piece);
        }
        self.piece
            .push_str(after.get(before.len()..).unwrap_or_default());
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(&self.piece)
    }
}
