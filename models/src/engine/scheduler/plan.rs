//! Building a step: which rows run, admission of waiting requests, KV growth,
//! giving up parked KV and preemption, and the step-time model that sizes
//! prompt chunks next to decode rows.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use mipha_runtime::{Error, Result};

use super::sequence::common_prefix;
use super::{FwdOut, Loop, Parked};
use crate::engine::options::Logits;
use crate::engine::vision::Taps;

/// Step times, to size prompt chunks next to decode rows.
pub(super) struct Cost {
    /// a step of only decode rows, in ms (EMA)
    decode_ms: Option<f64>,
    /// marginal ms per prompt row, from steps with many rows (EMA)
    row_ms: Option<f64>,
    /// one slice of a picture's encoding, in ms (EMA)
    vision_ms: Option<f64>,
}

fn ema(old: Option<f64>, new: f64) -> Option<f64> {
    Some(old.map_or(new, |o| 0.8 * o + 0.2 * new))
}

impl Cost {
    pub(super) fn new() -> Self {
        Cost {
            decode_ms: None,
            row_ms: None,
            vision_ms: None,
        }
    }

    pub(super) fn observe_vision(&mut self, ms: f64) {
        self.vision_ms = ema(self.vision_ms, ms);
    }

    pub(super) fn observe(&mut self, decode_rows: usize, prompt_rows: usize, ms: f64) {
        if prompt_rows == 0 {
            self.decode_ms = ema(self.decode_ms, ms);
        } else if prompt_rows >= 8 {
            let base = if decode_rows > 0 {
                self.decode_ms.unwrap_or(0.0)
            } else {
                0.0
            };
            let per = ((ms - base) / prompt_rows as f64).max(ms / prompt_rows as f64 / 4.0);
            self.row_ms = ema(self.row_ms, per);
        }
    }

    /// Prompt rows to add to a step with decode rows so it takes about `target`.
    pub(super) fn prompt_rows(
        &self,
        target: Duration,
        vision: bool,
        floor: usize,
        max: usize,
    ) -> usize {
        let Some(base) = self.decode_ms else {
            return floor.min(max);
        };
        let extra = if vision {
            self.vision_ms.unwrap_or(0.0)
        } else {
            0.0
        };
        // Before a measurement a prompt row is guessed at an eighth of a decode
        // step (the weights are read once for all rows).
        let row = self.row_ms.unwrap_or(base / 8.0).max(1e-3);
        let left = target.as_secs_f64() * 1e3 - base - extra;
        ((left / row).max(0.0) as usize).clamp(floor.min(max), max)
    }
}

enum Admit {
    Started,
    /// it can never fit: failed, try the next one
    Failed,
    /// it fits once others end
    Wait,
}

/// Fewest prompt rows a step next to decode rows carries, so a new request
/// always moves on.
const MIN_PROMPT_ROWS: usize = 4;

impl Loop {
    // ---- building a step

    /// Chooses the step's rows and reserves their KV. False when there are none.
    pub(super) fn plan(&mut self) -> bool {
        let max_rows = self.model.plan.max_tokens;
        let max_out = self.model.plan.max_outputs;
        let mut rows = 0;
        let mut outs = 0;
        for s in &mut self.running {
            s.chunk = 0;
        }
        let exclusive = self.forwards.front().is_some_and(|f| f.job.capture);

        // 1. The next token of every decoding sequence, oldest first.
        if !exclusive {
            let mut i = 0;
            while i < self.running.len() {
                let s = &self.running[i];
                let ready = s.remaining() == 1 && !s.job.out.lagging();
                if ready && rows < max_rows && outs < max_out {
                    // (when it preempted itself, `i` is the next one now)
                    if self.grow(i, 1, &mut rows, &mut outs) {
                        self.running[i].chunk = 1;
                        rows += 1;
                        outs += 1;
                        i += 1;
                    }
                } else {
                    i += 1;
                }
            }
        }
        let decode_rows = rows;

        // 2. A forward call's next chunk.
        self.plan_forward(&mut rows, &mut outs);
        if exclusive {
            return rows > 0;
        }

        // 3. Prompt chunks, then new requests, within the row budget.
        let vision_busy = self.vision.as_ref().is_some_and(|v| !v.is_idle());
        let cap = if decode_rows > 0 {
            self.cost.prompt_rows(
                self.model.options.step_target,
                vision_busy,
                MIN_PROMPT_ROWS,
                max_rows,
            )
        } else {
            max_rows
        };
        let mut prompt_rows = 0;
        let mut i = 0;
        while i < self.running.len() {
            let budget = cap.saturating_sub(prompt_rows).min(max_rows - rows);
            let s = &self.running[i];
            if s.chunk > 0 || s.remaining() <= 1 || budget == 0 {
                i += 1;
                continue;
            }
            if let Some(n) = self.schedule(i, budget, &mut rows, &mut outs) {
                prompt_rows += n;
                i += 1;
            }
        }
        while self.running.len() < self.model.options.max_sequences {
            let budget = cap.saturating_sub(prompt_rows).min(max_rows - rows);
            if budget == 0 || self.waiting.is_empty() {
                break;
            }
            match self.admit() {
                Admit::Started => {}
                Admit::Failed => continue,
                Admit::Wait => break,
            }
            let i = self.running.len() - 1;
            if self.running[i].remaining() == 1 {
                if outs < max_out && self.grow(i, 1, &mut rows, &mut outs) {
                    self.running[i].chunk = 1;
                    rows += 1;
                    outs += 1;
                    prompt_rows += 1;
                }
            } else if let Some(n) = self.schedule(i, budget, &mut rows, &mut outs) {
                prompt_rows += n;
            }
        }
        rows > 0
    }

    /// Schedules a prompt chunk of up to `budget` rows for `running[i]`.
    /// `None` when it was preempted instead.
    fn schedule(
        &mut self,
        i: usize,
        budget: usize,
        rows: &mut usize,
        outs: &mut usize,
    ) -> Option<usize> {
        let s = &self.running[i];
        let rem = s.remaining();
        let mut n = rem.min(budget);
        if n == rem && *outs >= self.model.plan.max_outputs {
            // No output row left for its token: stop one short of the end.
            n -= 1;
        }
        if n == 0 {
            return Some(0);
        }
        if !self.grow(i, n, rows, outs) {
            return None;
        }
        let s = &mut self.running[i];
        s.chunk = n;
        *rows += n;
        if n == rem {
            *outs += 1;
        }
        Some(n)
    }

    /// Reserves KV for `n` more rows of `running[i]`, making room if needed.
    /// False when `running[i]` itself was preempted (it was the newest).
    fn grow(&mut self, i: usize, n: usize, rows: &mut usize, outs: &mut usize) -> bool {
        let s = &self.running[i];
        let kv = s.kv.expect("running sequences hold KV");
        let target = s.len + n;
        loop {
            let need = self.pool.blocks_needed(kv, target).unwrap_or(usize::MAX);
            if need <= self.pool.free_blocks() {
                self.pool
                    .reserve(kv, target)
                    .expect("checked against the free blocks");
                return true;
            }
            if self.release_parked() {
                continue;
            }
            let victim = self.running.len() - 1;
            self.preempt(victim, rows, outs);
            if victim == i {
                return false;
            }
        }
    }

    /// Gives up the oldest parked session's KV. False when none is parked.
    fn release_parked(&mut self) -> bool {
        if self.parked.is_empty() {
            return false;
        }
        let p = self.parked.remove(0);
        let _ = self.pool.release(p.kv);
        true
    }

    /// Sends `running[i]` back to the front of the queue without its KV; its
    /// rows scheduled in this step are taken out of the counts.
    fn preempt(&mut self, i: usize, rows: &mut usize, outs: &mut usize) {
        let mut s = self.running.remove(i);
        if s.chunk > 0 {
            *rows -= s.chunk;
            if s.chunk == s.remaining() {
                *outs -= 1;
            }
            s.chunk = 0;
        }
        if let Some(kv) = s.kv.take() {
            let _ = self.pool.release(kv);
        }
        s.len = 0;
        s.committed = 0;
        s.stats.preemptions += 1;
        self.stats.preemptions.fetch_add(1, Relaxed);
        self.waiting.push_front(s);
    }

    /// Starts the request at the front of the queue when the KV cache holds
    /// its content: on its session's parked KV, or on the prefix cache's
    /// blocks.
    fn admit(&mut self) -> Admit {
        let bs = self.pool.block_size();
        let mut s = self.waiting.pop_front().expect("checked by the caller");
        let content = s.content_len();
        // At least the last position is computed: its logits give the next token.
        let reusable = content - 1;
        let parked = s
            .job
            .slot
            .and_then(|slot| self.parked.iter().position(|p| p.slot == slot));
        let (kv, held) = match parked {
            Some(at) => {
                let p = self.parked.remove(at);
                let common =
                    common_prefix(&p.items, &s.job.prompt, self.model.patches).min(reusable);
                let kept = self.pool.truncate(p.kv, common).unwrap_or(0);
                (p.kv, kept)
            }
            None => {
                let kv = self.pool.new_sequence();
                (kv, 0)
            }
        };
        // Cached blocks beyond what the session holds (none without a session).
        let mut hits = (0, 0);
        if held == 0 && self.model.options.prefix_cache {
            s.extend_chain(reusable / bs, bs);
            hits = self.pool.lookup(&s.chain[..reusable / bs]);
        }
        let have = if held > 0 {
            self.pool.block_table(kv).map_or(0, |t| t.len())
        } else {
            hits.0
        };
        let need = self.pool.blocks_for(content).saturating_sub(have);
        while need > self.pool.free_blocks().saturating_sub(hits.1) && self.release_parked() {}
        if need > self.pool.free_blocks().saturating_sub(hits.1) {
            if self.running.is_empty() && self.forwards.is_empty() {
                // Nothing will free blocks: hand-driven sequences hold them.
                let _ = self.pool.release(kv);
                if s.started.is_none() {
                    self.dequeue(1);
                }
                let total = self.pool.total_blocks();
                let free = self.pool.free_blocks();
                self.fail(
                    s,
                    Error::KvCacheFull {
                        seq: kv,
                        needed: need,
                        free,
                        total,
                    },
                );
                return Admit::Failed;
            }
            // Wait for running sequences to end, keeping the session's KV parked.
            match (parked, s.job.slot) {
                (Some(_), Some(slot)) => {
                    let (items, len) = s.held_items(held);
                    let _ = self.pool.truncate(kv, len);
                    self.parked.push(Parked { slot, kv, items });
                }
                _ => {
                    let _ = self.pool.release(kv);
                }
            }
            self.waiting.push_front(s);
            return Admit::Wait;
        }
        let reused = if held > 0 {
            held
        } else if hits.0 > 0 {
            self.pool
                .attach_cached(kv, &s.chain[..hits.0])
                .map_or(0, |n| n * bs)
        } else {
            0
        };
        s.kv = Some(kv);
        s.len = reused;
        s.committed = 0;
        s.order = self.next_order;
        self.next_order += 1;
        self.stats.prefix_hits.fetch_add(reused as u64, Relaxed);
        if s.started.is_none() {
            let now = Instant::now();
            s.started = Some(now);
            s.stats.queued = now - s.job.submitted;
            s.stats.reused_positions = reused;
            self.stats
                .prompt_positions
                .fetch_add(s.prompt_positions as u64, Relaxed);
            self.dequeue(1);
        }
        self.running.push(s);
        Admit::Started
    }

    /// With nothing running, requests the KV cache cannot hold now never will
    /// be: `admit` fails them. Called after a step, so the queue keeps moving.
    pub(super) fn admit_blocked(&mut self) {
        if self.running.is_empty() && self.forwards.is_empty() {
            while !self.waiting.is_empty() && self.running.len() < self.model.options.max_sequences
            {
                if let Admit::Wait = self.admit() {
                    break;
                }
            }
        }
    }

    fn plan_forward(&mut self, rows: &mut usize, outs: &mut usize) {
        let max_rows = self.model.plan.max_tokens;
        let max_out = self.model.plan.max_outputs;
        while let Some(f) = self.forwards.front_mut() {
            f.chunk = 0;
            if !f.started {
                let seq = f.job.seq;
                let start = match self.manual.contains(&seq) {
                    true => self.pool.len(seq),
                    false => Err(Error::UnknownSequence(seq)),
                };
                let start = start.and_then(|len| {
                    let total = len + f.job.rows.len();
                    if total > self.model.context {
                        return Err(Error::ContextOverflow {
                            tokens: total,
                            max: self.model.context,
                        });
                    }
                    Ok(len)
                });
                match start {
                    Ok(len) => {
                        f.start_len = len;
                        f.started = true;
                        f.taps = f.job.capture.then(Taps::default);
                    }
                    Err(e) => {
                        self.end_forward(Err(e));
                        continue;
                    }
                }
            }
            let f = self.forwards.front().expect("checked");
            let left = f.job.rows.len() - f.fed;
            let mut n = left.min(max_rows - *rows);
            let outputs_left = max_out - *outs;
            n = match f.job.which {
                Logits::All => n.min(outputs_left),
                Logits::Last if n == left && outputs_left == 0 => n - 1,
                Logits::Last => n,
            };
            if n == 0 {
                return;
            }
            let (seq, target) = (f.job.seq, f.start_len + f.fed + n);
            loop {
                let need = self.pool.blocks_needed(seq, target).unwrap_or(usize::MAX);
                if need <= self.pool.free_blocks() {
                    break;
                }
                if self.release_parked() {
                    continue;
                }
                if self.running.is_empty() {
                    let e = Error::KvCacheFull {
                        seq,
                        needed: need,
                        free: self.pool.free_blocks(),
                        total: self.pool.total_blocks(),
                    };
                    self.end_forward(Err(e));
                    return;
                }
                let victim = self.running.len() - 1;
                self.preempt(victim, rows, outs);
            }
            self.pool.reserve(seq, target).expect("checked above");
            let f = self.forwards.front_mut().expect("checked");
            f.chunk = n;
            *rows += n;
            *outs += match f.job.which {
                Logits::All => n,
                Logits::Last => (n == left) as usize,
            };
            return;
        }
    }

    /// Answers the forward call at the front and takes it off.
    pub(super) fn end_forward(&mut self, result: Result<()>) {
        let f = self.forwards.pop_front().expect("the caller checked");
        self.dequeue(1);
        let reply = match result {
            Ok(()) => Ok(FwdOut {
                logits: f.logits,
                taps: f.taps,
            }),
            Err(e) => {
                if f.started {
                    let _ = self.pool.truncate(f.job.seq, f.start_len);
                }
                Err(e)
            }
        };
        let _ = f.job.reply.try_send(reply);
    }
}
