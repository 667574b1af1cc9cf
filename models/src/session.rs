//! A conversation with its own KV cache: images attach to the next question,
//! each turn feeds only what the cache does not hold yet, answers stream.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mipha_runtime::{Error, Input, Result, SeqId};

use crate::engine::{CancelToken, Engine, GenerateOptions, ImageEmbeddings, Logits, StopReason};
use crate::template::Turn;
use crate::tokenizer::PromptId;

/// An image's projected embeddings, `[num_patches, hidden]`, shared through the
/// engine's cache (on the GPU when the engine runs there).
#[derive(Clone, Debug)]
pub struct ImageEmbeds {
    /// content hash of the decoded pixels (the cache key)
    pub key: u128,
    pub embeds: ImageEmbeddings,
}

/// Where the time of one turn went.
#[derive(Clone, Debug, Default)]
pub struct TurnStats {
    /// decoding and resizing the images attached to this turn
    pub image_preprocess: Duration,
    /// encoding the images attached to this turn (zero for cached ones)
    pub image_encode: Duration,
    pub images_encoded: usize,
    pub images_cached: usize,
    /// positions fed to the model for this turn (image patches included)
    pub prefill_positions: usize,
    /// positions already in the KV cache and reused
    pub reused_positions: usize,
    pub prefill: Duration,
    /// from the start of the turn to the first token
    pub time_to_first_token: Duration,
    pub decode_tokens: usize,
    pub decode: Duration,
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

/// A conversation. Holds a sequence of the engine's paged KV cache for its
/// whole life, so a follow-up question costs only its own new tokens.
pub struct Session {
    engine: Arc<Engine>,
    seq: SeqId,
    turns: Vec<Turn>,
    /// every image of the conversation, in order of appearance
    images: Vec<ImageEmbeds>,
    /// images attached for the next question
    pending: Vec<ImageEmbeds>,
    pending_stats: TurnStats,
    /// what the KV cache holds, in order
    fed: Vec<PromptId>,
    /// ids so far, for the repetition penalty
    history: Vec<u32>,
    logits: Vec<f32>,
}

impl Session {
    pub fn new(engine: Arc<Engine>) -> Self {
        let seq = engine.new_sequence();
        Session {
            engine,
            seq,
            turns: Vec::new(),
            images: Vec::new(),
            pending: Vec::new(),
            pending_stats: TurnStats::default(),
            fed: Vec::new(),
            history: Vec::new(),
            logits: Vec::new(),
        }
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub fn turns(&self) -> &[Turn] {
        &self.turns
    }

    /// Positions this conversation holds in the KV cache.
    pub fn cached_positions(&self) -> usize {
        self.engine.sequence_len(self.seq).unwrap_or(0)
    }

    /// Images waiting for the next question.
    pub fn pending_images(&self) -> usize {
        self.pending.len()
    }

    /// Decodes and preprocesses the picture at `path` and attaches it to the next
    /// question. Unreadable, truncated, empty or oversized images are errors
    /// naming the file; the session is unchanged then.
    pub fn attach_image(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let cfg = self
            .engine
            .image_config()
            .ok_or_else(|| Error::Config("this model file has no vision tower".into()))?;
        let t = Instant::now();
        let image = crate::image::load_image(path, cfg)?;
        let preprocess = t.elapsed();
        self.attach_pixels(&image.pixels, image.hash)?;
        self.pending_stats.image_preprocess += preprocess;
        Ok(())
    }

    /// Attaches preprocessed pixels (CHW, the model's image size) to the next
    /// question. Identical pictures are encoded once per engine.
    pub fn attach_pixels(&mut self, pixels: &[f32], key: u128) -> Result<()> {
        let t = Instant::now();
        let (embeds, cached) = self.engine.encode_image_keyed(pixels, key)?;
        let st = &mut self.pending_stats;
        if cached {
            st.images_cached += 1;
        } else {
            st.image_encode += t.elapsed();
            st.images_encoded += 1;
        }
        self.pending.push(ImageEmbeds { key, embeds });
        Ok(())
    }

    /// Forgets the conversation (and any pending images); keeps the engine.
    pub fn reset(&mut self) {
        self.turns.clear();
        self.images.clear();
        self.pending.clear();
        self.pending_stats = TurnStats::default();
        self.fed.clear();
        self.history.clear();
        // Truncating a live sequence only fails for an unknown id, which ours is not.
        let _ = self.engine.truncate_sequence(self.seq, 0);
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
    /// `on_token`. Cancelling through `cancel`, the deadline in `opts` or
    /// `on_token` returning false ends the answer early; what was said so far
    /// stays in the conversation. On an error the question is withdrawn and the
    /// session is as before.
    ///
    /// `on_token` runs on one of the engine's threads while the engine is held
    /// for the answer (see [`Engine::decode_with`]): it must be `Send` and must not
    /// call into the engine. The answer's decode steps do not allocate.
    pub fn ask(
        &mut self,
        question: &str,
        opts: &GenerateOptions,
        cancel: Option<&CancelToken>,
        on_token: impl FnMut(u32, &str) -> bool + Send,
    ) -> Result<Reply> {
        opts.sampling.validate().map_err(Error::Config)?;
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
        let mut stats = image_stats.clone();
        match self.prefill(cancel, &mut stats) {
            Ok(true) => {}
            Ok(false) => {
                // Cancelled before the first token: the question is withdrawn and
                // its images wait for the next one.
                self.turns.pop();
                self.pending = self.images.drain(n_images_before..).collect();
                self.pending_stats = image_stats;
                stats.time_to_first_token = start.elapsed();
                return Ok(Reply {
                    prompt: Vec::new(),
                    tokens: Vec::new(),
                    text: String::new(),
                    stop_reason: StopReason::Cancelled,
                    stats,
                });
            }
            Err(e) => {
                self.turns.pop();
                self.pending = self.images.drain(n_images_before..).collect();
                self.pending_stats = image_stats;
                return Err(e);
            }
        }
        let prompt = self.fed.clone();
        let mut first = true;
        let mut on_token = on_token;
        let engine = self.engine.clone();
        let decoded = engine.decode(
            self.seq,
            &mut self.logits,
            &mut self.history,
            opts,
            cancel,
            |id, piece| {
                if first {
                    stats.time_to_first_token = start.elapsed();
                    first = false;
                }
                on_token(id, piece)
            },
        );
        let d = match decoded {
            Ok(d) => d,
            Err(e) => {
                // Keep the conversation consistent with the cache: forget the turn.
                self.turns.pop();
                self.images.truncate(n_images_before);
                self.resync()?;
                return Err(e);
            }
        };
        if first {
            stats.time_to_first_token = start.elapsed();
        }
        self.fed
            .extend(d.tokens[..d.fed].iter().map(|&t| PromptId::Token(t)));
        stats.decode_tokens = d.tokens.len();
        stats.decode = d.elapsed;
        self.turns.last_mut().expect("pushed above").assistant = Some(d.text.trim().to_string());
        Ok(Reply {
            prompt,
            tokens: d.tokens,
            text: d.text,
            stop_reason: d.stop,
            stats,
        })
    }

    /// Feeds the rendered conversation past what the cache already holds, leaving
    /// the last position's logits. Returns false if cancelled.
    fn prefill(&mut self, cancel: Option<&CancelToken>, stats: &mut TurnStats) -> Result<bool> {
        let engine = self.engine.clone();
        let segments = engine.template().render(&self.turns);
        let ids = engine.tokenizer().encode_segments(&segments)?;
        let common = self
            .fed
            .iter()
            .zip(&ids)
            .take_while(|(a, b)| self.same(a, b))
            .count()
            // the last position must be fed again to get its logits
            .min(ids.len() - 1);
        let keep = self.positions(&self.fed[..common]);
        if common < self.fed.len() {
            engine.truncate_sequence(self.seq, keep)?;
            self.fed.truncate(common);
        }
        let total = keep + self.positions(&ids[common..]);
        if total > engine.context_length() {
            return Err(Error::ContextOverflow {
                tokens: total,
                max: engine.context_length(),
            });
        }
        let mut inputs = Vec::new();
        for id in &ids[common..] {
            match id {
                PromptId::Token(t) => inputs.push(Input::Token(*t)),
                PromptId::Image(i) => {
                    let img = self.images.get(*i).ok_or_else(|| {
                        Error::Other(format!("the prompt names image {i}, which is not attached"))
                    })?;
                    let h = engine.config().hidden_size;
                    img.embeds.push_inputs(h, &mut inputs);
                }
            }
        }
        stats.reused_positions = keep;
        stats.prefill_positions = inputs.len();
        let t = Instant::now();
        let chunk = engine.options().max_batch_tokens;
        for part in inputs.chunks(chunk) {
            if cancel.is_some_and(|c| c.is_cancelled()) {
                engine.truncate_sequence(self.seq, keep)?;
                stats.prefill = t.elapsed();
                return Ok(false);
            }
            if let Err(e) = engine.forward(self.seq, part, Logits::Last, &mut self.logits, None) {
                engine.truncate_sequence(self.seq, keep)?;
                return Err(e);
            }
        }
        stats.prefill = t.elapsed();
        self.history = ids
            .iter()
            .filter_map(|id| match id {
                PromptId::Token(t) => Some(*t),
                PromptId::Image(_) => None,
            })
            .collect();
        self.fed = ids;
        Ok(true)
    }

    fn same(&self, a: &PromptId, b: &PromptId) -> bool {
        match (a, b) {
            (PromptId::Token(x), PromptId::Token(y)) => x == y,
            (PromptId::Image(x), PromptId::Image(y)) => {
                x == y && self.images.get(*x).map(|i| i.key) == self.images.get(*y).map(|i| i.key)
            }
            _ => false,
        }
    }

    fn positions(&self, ids: &[PromptId]) -> usize {
        let patches = self
            .engine
            .vision_config()
            .map(|v| v.num_patches())
            .unwrap_or(0);
        ids.iter()
            .map(|id| match id {
                PromptId::Token(_) => 1,
                PromptId::Image(_) => patches,
            })
            .sum()
    }

    /// After a failed step: make the cache hold a prefix of `fed` again.
    fn resync(&mut self) -> Result<()> {
        let held = self.engine.sequence_len(self.seq)?;
        let mut n = 0;
        let mut pos = 0;
        for id in &self.fed {
            let p = self.positions(std::slice::from_ref(id));
            if pos + p > held {
                break;
            }
            pos += p;
            n += 1;
        }
        self.fed.truncate(n);
        self.engine.truncate_sequence(self.seq, pos)
    }

    /// Logits of the last fed position (what chose the latest token).
    pub fn last_logits(&self) -> &[f32] {
        &self.logits
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.engine.release_sequence(self.seq);
    }
}
