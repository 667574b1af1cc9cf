//! A conversation: images attach to the next question, each turn is rendered
//! whole and queued on the engine, answers stream back on the caller's thread.
//!
//! The session's KV is parked in the engine between turns, so a follow-up
//! computes only what the cache does not hold yet (and the prefix cache covers
//! what another session already computed). When the engine needs the memory,
//! it takes parked KV back first; the next turn then recomputes what is gone.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mipha_runtime::{Error, Result};

use crate::engine::{
    CancelToken, Engine, GenerateOptions, GenerateRequest, PromptItem, SessionSlot, StopReason,
};
pub use crate::engine::{ImageEmbeddings, ImageEmbeds};
use crate::template::Turn;
use crate::tokenizer::PromptId;

/// Where the time of one turn went.
#[derive(Clone, Debug, Default)]
pub struct TurnStats {
    /// decoding and resizing the images attached to this turn
    pub image_preprocess: Duration,
    /// encoding the images attached to this turn (zero for cached ones)
    pub image_encode: Duration,
    pub images_encoded: usize,
    pub images_cached: usize,
    /// positions computed for this turn's prompt (image patches included)
    pub prefill_positions: usize,
    /// positions already in the KV cache and reused
    pub reused_positions: usize,
    /// waiting in the engine's queue behind other requests
    pub queued: Duration,
    pub prefill: Duration,
    /// from the start of the turn to the first token
    pub time_to_first_token: Duration,
    pub decode_tokens: usize,
    pub decode: Duration,
    /// times the answer gave its KV up to others and was recomputed
    pub preemptions: usize,
}

impl TurnStats {
    pub fn prefill_tok_s(&self) -> f64 {
        rate(self.prefill_positions, self.prefill)
    }
    pub fn decode_tok_s(&self) -> f64 {
        rate(self.decode_tokens.saturating_sub(1), self.decode)
    }
}

fn rate(n: usize, d: Duration) -> f64 {
    if d.is_zero() {
        0.0
    } else {
        n as f64 / d.as_secs_f64()
    }
}

/// One answer.
#[derive(Clone, Debug)]
pub struct Reply {
    /// the ids of the whole conversation as fed to the model, this question included
    pub prompt: Vec<PromptId>,
    /// generated ids, including a final `<|endoftext|>` when that stopped it
    pub tokens: Vec<u32>,
    pub text: String,
    pub stop_reason: StopReason,
    pub stats: TurnStats,
}

/// A conversation with its own KV in the engine.
pub struct Session {
    engine: Arc<Engine>,
    /// the engine's name for this session's parked KV
    slot: u64,
    turns: Vec<Turn>,
    /// every image of the conversation, in order of appearance
    images: Vec<ImageEmbeds>,
    /// images attached for the next question
    pending: Vec<ImageEmbeds>,
    pending_stats: TurnStats,
    logits: Vec<f32>,
}

impl Session {
    pub fn new(engine: Arc<Engine>) -> Self {
        let slot = engine.new_slot();
        Session {
            engine,
            slot,
            turns: Vec::new(),
            images: Vec::new(),
            pending: Vec::new(),
            pending_stats: TurnStats::default(),
            logits: Vec::new(),
        }
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub fn turns(&self) -> &[Turn] {
        &self.turns
    }

    /// Positions this conversation holds in the KV cache now (0 once the
    /// engine took them back for others).
    pub fn cached_positions(&self) -> usize {
        self.engine.slot_len(self.slot)
    }

    /// Images waiting for the next question.
    pub fn pending_images(&self) -> usize {
        self.pending.len()
    }

    /// Decodes and preprocesses the picture at `path` and attaches it to the next
    /// question. Unreadable, truncated, empty or oversized images are errors
    /// naming the file; the session is unchanged then.
    pub fn attach_image(&mut self, path: impl AsRef<Path>) -> Result<()> {
        self.check_one_more_image()?;
        let cfg = self
            .engine
            .image_config()
            .ok_or_else(|| Error::Config("this model file has no vision tower".into()))?;
        let t = Instant::now();
        let opts = crate::image::DecodeOptions {
            limits: self.engine.options().image_limits.decode_limits(),
            ..Default::default()
        };
        let decoded = crate::image::decode_file(path, &opts)?;
        let image = crate::image::preprocess(&decoded.image, cfg);
        let preprocess = t.elapsed();
        self.attach_pixels(&image.pixels)?;
        self.pending_stats.image_preprocess += preprocess;
        Ok(())
    }

    /// Attaches preprocessed pixels (CHW, the model's image size) to the next
    /// question. Identical pictures (by a SHA-256 of the pixels) are encoded
    /// once per engine; other sessions' answers keep streaming while this one
    /// is encoded.
    pub fn attach_pixels(&mut self, pixels: &[f32]) -> Result<()> {
        self.check_one_more_image()?;
        let t = Instant::now();
        let (embeds, cached) = self.engine.encode_image_cached(pixels, None)?;
        let st = &mut self.pending_stats;
        if cached {
            st.images_cached += 1;
        } else {
            st.image_encode += t.elapsed();
            st.images_encoded += 1;
        }
        self.pending.push(embeds);
        Ok(())
    }

    /// The conversation's pictures and one more must fit the context (and the
    /// engine's count limit): checked before a picture is decoded or encoded.
    fn check_one_more_image(&self) -> Result<()> {
        self.engine
            .check_image_count(self.images.len() + self.pending.len() + 1)
    }

    /// Forgets the conversation (and any pending images) and gives its KV back;
    /// keeps the engine.
    pub fn reset(&mut self) {
        self.turns.clear();
        self.images.clear();
        self.pending.clear();
        self.pending_stats = TurnStats::default();
        self.logits.clear();
        self.engine.release_slot(self.slot);
    }

    /// Restores a conversation (e.g. loaded from storage) without running it;
    /// the next question prefills whatever the cache lacks.
    pub fn restore(&mut self, turns: Vec<Turn>, images: Vec<ImageEmbeds>) -> Result<()> {
        let wanted: usize = turns.iter().map(|t| t.images).sum();
        if wanted != images.len() {
            return Err(Error::Other(format!(
                "the turns reference {wanted} images, {} were given",
                images.len()
            )));
        }
        self.reset();
        self.turns = turns;
        self.images = images;
        Ok(())
    }

    /// Asks `question` (with the pending images) and streams the answer through
    /// `on_token`, on this thread. Cancelling through `cancel`, the deadline in
    /// `opts` or `on_token` returning false ends the answer early; what was said
    /// so far stays in the conversation (an answer stopped before its first
    /// token withdraws the question, and its images wait for the next one). On
    /// an error the question is withdrawn and the session is as before.
    pub fn ask(
        &mut self,
        question: &str,
        opts: &GenerateOptions,
        cancel: Option<&CancelToken>,
        on_token: impl FnMut(u32, &str) -> bool,
    ) -> Result<Reply> {
        opts.sampling.validate().map_err(Error::Config)?;
        // The whole conversation is rendered and tokenized for each question:
        // refuse what cannot fit before paying for that.
        let text: usize = self
            .turns
            .iter()
            .map(|t| t.user.len() + t.assistant.as_ref().map_or(0, |a| a.len()))
            .sum();
        self.engine
            .check_text_len(text.saturating_add(question.len()))?;
        let start = Instant::now();
        let image_stats = std::mem::take(&mut self.pending_stats);
        let pending = std::mem::take(&mut self.pending);
        self.turns.push(Turn {
            user: question.to_string(),
            images: pending.len(),
            assistant: None,
        });
        let n_images_before = self.images.len();
        self.images.extend(pending);
        let asked = self.render(opts.parse_special).and_then(|(ids, prompt)| {
            let g = self.engine.submit(GenerateRequest {
                prompt,
                options: opts.clone(),
                cancel: cancel.cloned(),
                logits: false,
                last_logits: true,
                session: Some(SessionSlot(self.slot)),
            })?;
            Ok((ids, g.for_each(on_token)?))
        });
        let withdraw = |s: &mut Self| {
            s.turns.pop();
            s.pending = s.images.drain(n_images_before..).collect();
            s.pending_stats = image_stats.clone();
        };
        let (ids, f) = match asked {
            Ok(x) => x,
            Err(e) => {
                withdraw(self);
                return Err(e);
            }
        };
        let mut stats = image_stats.clone();
        stats.prefill_positions = f.stats.prefill_positions;
        stats.reused_positions = f.stats.reused_positions;
        stats.queued = f.stats.queued;
        stats.prefill = f.stats.prefill;
        stats.preemptions = f.stats.preemptions;
        stats.time_to_first_token = match f.tokens.is_empty() {
            true => start.elapsed(),
            false => start.elapsed().saturating_sub(f.stats.decode),
        };
        stats.decode_tokens = f.tokens.len();
        stats.decode = f.stats.decode;
        if let Some(l) = f.last_logits {
            self.logits = l;
        }
        let stopped_early = matches!(f.stop, StopReason::Cancelled | StopReason::Deadline);
        if f.tokens.is_empty() && stopped_early {
            withdraw(self);
        } else {
            self.turns.last_mut().expect("pushed above").assistant =
                Some(f.text.trim().to_string());
        }
        Ok(Reply {
            prompt: ids,
            tokens: f.tokens,
            text: f.text,
            stop_reason: f.stop,
            stats,
        })
    }

    /// The conversation as the model reads it: ids, and the prompt items
    /// (pictures in place of their slots).
    fn render(&self, parse_special: bool) -> Result<(Vec<PromptId>, Vec<PromptItem>)> {
        let segments = self.engine.template().render(&self.turns);
        let ids = self
            .engine
            .tokenizer()
            .encode_segments_with(&segments, parse_special)?;
        let items = ids
            .iter()
            .map(|id| match id {
                PromptId::Token(t) => Ok(PromptItem::Token(*t)),
                PromptId::Image(i) => self
                    .images
                    .get(*i)
                    .map(|img| PromptItem::Image(img.clone()))
                    .ok_or_else(|| {
                        Error::Other(format!("the prompt names image {i}, which is not attached"))
                    }),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((ids, items))
    }

    /// Logits of the last fed position (what chose the latest token), before
    /// any penalty.
    pub fn last_logits(&self) -> &[f32] {
        &self.logits
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.engine.release_slot(self.slot);
    }
}
