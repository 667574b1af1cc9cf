//! A generation's state in the loop (its content, sampler, KV and block
//! hashes), a session's parked KV, and a forward call in progress.

use std::time::Instant;

use mipha_runtime::{BlockHash, Input, PosKey, SeqId};

use super::{FwdJob, GenJob};
use crate::engine::options::StopReason;
use crate::engine::stream::RequestStats;
use crate::engine::vision::Taps;
use crate::engine::PromptItem;
use crate::sampling::Sampler;

/// A generation in the loop, from admission to its end (and back to the
/// queue when preempted).
pub(super) struct Seq {
    pub(super) job: GenJob,
    /// where each prompt item starts, and the prompt's end
    pub(super) item_start: Vec<usize>,
    pub(super) prompt_positions: usize,
    pub(super) generated: Vec<u32>,
    /// prompt tokens and generated ones, for the repetition penalty
    pub(super) history: Vec<u32>,
    pub(super) sampler: Sampler,
    /// hashes of the content's full blocks, as far as computed
    pub(super) chain: Vec<BlockHash>,
    /// blocks of the pool sequence published to the prefix cache
    pub(super) committed: usize,
    /// the pool sequence, while it holds KV
    pub(super) kv: Option<SeqId>,
    /// positions in the KV cache
    pub(super) len: usize,
    /// admission order (the newest is preempted first)
    pub(super) order: u64,
    /// first admitted (it then left the queue's count)
    pub(super) started: Option<Instant>,
    pub(super) first_token: Option<Instant>,
    pub(super) stats: RequestStats,
    /// rows scheduled in the step being built
    pub(super) chunk: usize,
    /// the last sampled token's logits, when the request wants them
    pub(super) last: Vec<f32>,
}

impl Seq {
    pub(super) fn new(
        job: GenJob,
        vocab: usize,
        patches: usize,
        context: usize,
        block_size: usize,
    ) -> Self {
        let mut item_start = Vec::with_capacity(job.prompt.len() + 1);
        let mut at = 0;
        let mut history = Vec::new();
        for item in &job.prompt {
            item_start.push(at);
            at += match item {
                PromptItem::Token(t) => {
                    history.push(*t);
                    1
                }
                PromptItem::Image(_) => patches,
            };
        }
        item_start.push(at);
        let most = job.opts.max_tokens.min(context) + 1;
        history.reserve(most);
        let mut sampler = Sampler::new(job.opts.sampling.clone());
        sampler.reserve(vocab);
        Seq {
            item_start,
            prompt_positions: at,
            generated: Vec::with_capacity(most),
            history,
            sampler,
            chain: Vec::with_capacity(context.div_ceil(block_size) + 1),
            committed: 0,
            kv: None,
            len: 0,
            order: 0,
            started: None,
            first_token: None,
            stats: RequestStats {
                prompt_positions: at,
                ..Default::default()
            },
            chunk: 0,
            last: match job.last_logits {
                true => Vec::with_capacity(vocab),
                false => Vec::new(),
            },
            job,
        }
    }

    pub(super) fn content_len(&self) -> usize {
        self.prompt_positions + self.generated.len()
    }

    /// Positions left to feed before the next token is sampled (1 while decoding).
    pub(super) fn remaining(&self) -> usize {
        self.content_len() - self.len
    }

    pub(super) fn key_at(&self, p: usize) -> PosKey {
        if p >= self.prompt_positions {
            return PosKey::Token(self.generated[p - self.prompt_positions]);
        }
        let i = self.item_start.partition_point(|&s| s <= p) - 1;
        match &self.job.prompt[i] {
            PromptItem::Token(t) => PosKey::Token(*t),
            PromptItem::Image(img) => PosKey::Image {
                image: img.key(),
                index: (p - self.item_start[i]) as u32,
            },
        }
    }

    /// Hashes the content's full blocks up to `blocks`.
    pub(super) fn extend_chain(&mut self, blocks: usize, bs: usize) {
        while self.chain.len() < blocks {
            let b = self.chain.len();
            let h = BlockHash::chain(
                self.chain.last(),
                (b * bs..(b + 1) * bs).map(|p| self.key_at(p)),
            );
            self.chain.push(h);
        }
    }

    /// The input rows of positions `from..from + n`.
    pub(super) fn push_inputs<'a>(
        &'a self,
        from: usize,
        n: usize,
        hidden: usize,
        inputs: &mut Vec<Input<'a>>,
    ) {
        let end = from + n;
        let mut p = from;
        if p < self.prompt_positions {
            let mut i = self.item_start.partition_point(|&s| s <= p) - 1;
            while p < end.min(self.prompt_positions) {
                let (start, stop) = (self.item_start[i], self.item_start[i + 1].min(end));
                match &self.job.prompt[i] {
                    PromptItem::Token(t) => inputs.push(Input::Token(*t)),
                    PromptItem::Image(img) => {
                        img.embeddings()
                            .push_rows(hidden, p - start..stop - start, inputs)
                    }
                }
                p = stop;
                i += 1;
            }
        }
        for q in p..end {
            inputs.push(Input::Token(self.generated[q - self.prompt_positions]));
        }
    }

    /// The prompt items and tokens the first `len` positions hold, cut before
    /// a picture they hold only part of. Returns them and their positions.
    pub(super) fn held_items(&self, len: usize) -> (Vec<PromptItem>, usize) {
        let mut items = Vec::new();
        let mut at = 0;
        for (i, item) in self.job.prompt.iter().enumerate() {
            if self.item_start[i + 1] > len {
                return (items, at);
            }
            items.push(item.clone());
            at = self.item_start[i + 1];
        }
        let fed = len - self.prompt_positions;
        items.extend(self.generated[..fed].iter().map(|&t| PromptItem::Token(t)));
        (items, len)
    }

    pub(super) fn stopped(&self, now: Instant) -> Option<StopReason> {
        if self.job.cancel.is_cancelled() || self.job.out.consumer_gone() {
            Some(StopReason::Cancelled)
        } else if self.job.opts.deadline.is_some_and(|d| now >= d) {
            Some(StopReason::Deadline)
        } else {
            None
        }
    }
}

/// A session's KV between its turns.
pub(super) struct Parked {
    pub(super) slot: u64,
    pub(super) kv: SeqId,
    /// what the KV holds, item by item
    pub(super) items: Vec<PromptItem>,
}

/// A forward call in progress.
pub(super) struct Fwd {
    pub(super) job: FwdJob,
    /// the sequence's length before the call (restored on failure)
    pub(super) start_len: usize,
    /// rows fed so far
    pub(super) fed: usize,
    pub(super) logits: Vec<f32>,
    pub(super) taps: Option<Taps>,
    pub(super) chunk: usize,
    pub(super) started: bool,
}

/// Positions at the start of `held` (what a session's KV holds) that `prompt`
/// repeats, item by item (a picture matches by its content key).
pub(super) fn common_prefix(held: &[PromptItem], prompt: &[PromptItem], patches: usize) -> usize {
    let mut n = 0;
    for (a, b) in held.iter().zip(prompt) {
        match (a, b) {
            (PromptItem::Token(x), PromptItem::Token(y)) if x == y => n += 1,
            (PromptItem::Image(x), PromptItem::Image(y)) if x.key() == y.key() => n += patches,
            _ => break,
        }
    }
    n
}
