//! The step loop: the one owner of the backends, the KV pool and the vision
//! backend. Every iteration it
//!
//! 1. takes new requests from the [`Queue`] (first come, first served) and
//!    answers control messages;
//! 2. ends requests that were cancelled, passed their deadline or lost their
//!    consumer, queued or running;
//! 3. runs one slice of a picture's encoding, if one is waiting;
//! 4. builds one forward step (continuous batching): the next token of every
//!    decoding sequence first, then chunks of prompts up to a row budget
//!    (chunked prefill), admitting waiting requests while the KV cache holds
//!    them, each row attending through its own sequence's block table;
//! 5. samples each sequence that reached its end with its own sampler and
//!    hands the token to the sequence's stream.
//!
//! While sequences decode, prompt chunks are sized from measured step times so
//! a step stays near [`EngineOptions::step_target`]: a long prompt or a picture
//! never stalls running streams for more than a step.
//!
//! **KV.** Sequences that start with the same content share its blocks through
//! the prefix cache (`mipha_runtime::kv`). A session's KV is *parked* between
//! its turns, so a follow-up computes only its new positions. When a step needs
//! blocks and none are free, parked sessions give theirs up first (oldest
//! first), then the most recently admitted sequence is preempted: its blocks go
//! back (the committed ones stay cached) and it waits at the front of the queue
//! to be recomputed, as vLLM does. Its sampler and tokens are kept, so it
//! continues exactly where it was.
//!
//! **Faults.** A step that fails (an error or a panic in a kernel) is run again
//! one sequence at a time, so only the sequences whose own rows fail are
//! failed. A bug in the loop itself stops the engine: every waiting caller is
//! answered with the reason.

use std::collections::{HashSet, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mipha_runtime::{Backend, BlockPool, Capture, Error, Input, Result, SeqId, SeqRows, Step};

mod plan;
mod sequence;

use plan::Cost;
use sequence::{Fwd, Parked, Seq};

use super::options::{EngineOptions, GenerateOptions, Logits, StopReason};
use super::queue::{Control, Queue};
use super::stats::Stats;
use super::stream::{Event, Writer};
use super::vision::{EncodeJob, Taps, VisionExec};
use super::{Model, PromptItem};

/// Work for the loop, as queued.
pub(crate) enum Job {
    Generate(Box<GenJob>),
    Forward(Box<FwdJob>),
    Encode(Box<EncodeJob>),
}

pub(crate) struct GenJob {
    pub prompt: Vec<PromptItem>,
    pub opts: GenerateOptions,
    pub cancel: super::CancelToken,
    pub out: Writer,
    pub logits: bool,
    pub last_logits: bool,
    pub slot: Option<u64>,
    pub submitted: Instant,
}

/// A row of a forward call: a token, or an embedding at this offset of the
/// job's `embeddings`.
pub(crate) enum FwdRow {
    Token(u32),
    Embedding(usize),
}

pub(crate) struct FwdJob {
    pub seq: SeqId,
    pub rows: Vec<FwdRow>,
    pub embeddings: Vec<f32>,
    pub which: Logits,
    pub capture: bool,
    pub reply: SyncSender<Result<FwdOut>>,
}

pub(crate) struct FwdOut {
    pub logits: Vec<f32>,
    pub taps: Option<Taps>,
}

/// Runs `f`, turning a panic into an error (a kernel's assertion must fail
/// its step, not the engine).
pub(crate) fn guard<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(Error::Other(format!(
            "a step failed: {}",
            panic_message(&*p)
        ))),
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Starts the loop on a thread of its own that lives in the compute pool, so
/// a step hands no work across threads.
pub(crate) fn start(
    model: Arc<Model>,
    queue: Arc<Queue>,
    stats: Arc<Stats>,
    backend: Box<dyn Backend>,
    vision: Option<Box<dyn Backend>>,
    pool: BlockPool,
    threads: Arc<rayon::ThreadPool>,
) -> Result<std::thread::JoinHandle<()>> {
    let vision = vision.map(|b| VisionExec::new(b, &model));
    let mut lp = Loop::new(model, queue.clone(), stats, backend, vision, pool);
    std::thread::Builder::new()
        .name("mipha-steps".into())
        .spawn(move || {
            let ran = catch_unwind(AssertUnwindSafe(|| threads.install(|| lp.run())));
            if let Err(p) = ran {
                let why = format!("internal error: {}", panic_message(&*p));
                let mut q = queue.lock();
                q.dead = Some(why);
                // Dropped here: their callers get "the engine stopped".
                let jobs: Vec<Job> = q.jobs.drain(..).collect();
                let control = std::mem::take(&mut q.control);
                drop(q);
                drop((jobs, control));
                drop(lp);
            }
        })
        .map_err(|e| Error::Other(format!("cannot start the step loop: {e}")))
}

#[derive(Clone, Copy)]
enum Owner {
    /// index into `running`
    Gen(usize),
    Fwd,
}

/// One sequence's rows in the step being run.
struct Group {
    owner: Owner,
    rows: usize,
    /// its first row in the step
    row: usize,
    /// its output rows: `outputs[out.0..out.1]`
    out: (usize, usize),
    failed: Option<Error>,
}

struct Loop {
    model: Arc<Model>,
    queue: Arc<Queue>,
    stats: Arc<Stats>,
    backend: Box<dyn Backend>,
    pool: BlockPool,
    vision: Option<VisionExec>,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    forwards: VecDeque<Fwd>,
    parked: Vec<Parked>,
    /// sessions that ended while a request of theirs still ran
    ended_slots: HashSet<u64>,
    /// sequences made through `Engine::new_sequence`
    manual: HashSet<SeqId>,
    next_order: u64,
    // The step being built (kept between steps: a step allocates nothing).
    groups: Vec<Group>,
    outputs: Vec<usize>,
    logits: Vec<f32>,
    inputs: Vec<Input<'static>>,
    seqs: Vec<SeqRows<'static>>,
    iso_outputs: Vec<usize>,
    cost: Cost,
}

/// The same allocation for another lifetime's rows.
fn reuse<'b>(mut v: Vec<Input<'_>>) -> Vec<Input<'b>> {
    v.clear();
    v.into_iter().map(|_| unreachable!()).collect()
}

fn reuse_seqs<'b>(mut v: Vec<SeqRows<'_>>) -> Vec<SeqRows<'b>> {
    v.clear();
    v.into_iter().map(|_| unreachable!()).collect()
}

impl Loop {
    fn new(
        model: Arc<Model>,
        queue: Arc<Queue>,
        stats: Arc<Stats>,
        backend: Box<dyn Backend>,
        vision: Option<VisionExec>,
        pool: BlockPool,
    ) -> Self {
        let plan = &model.plan;
        let o: &EngineOptions = &model.options;
        Loop {
            logits: vec![0.0; plan.max_outputs * model.config.vocab_size],
            inputs: Vec::with_capacity(plan.max_tokens),
            seqs: Vec::with_capacity(o.max_sequences + 2),
            groups: Vec::with_capacity(o.max_sequences + 2),
            outputs: Vec::with_capacity(plan.max_outputs),
            iso_outputs: Vec::with_capacity(plan.max_outputs),
            waiting: VecDeque::new(),
            running: Vec::with_capacity(o.max_sequences),
            forwards: VecDeque::new(),
            parked: Vec::new(),
            ended_slots: HashSet::new(),
            manual: HashSet::new(),
            next_order: 0,
            cost: Cost::new(),
            model,
            queue,
            stats,
            backend,
            pool,
            vision,
        }
    }

    fn run(&mut self) {
        let mut idle = false;
        while self.pull(idle) {
            let now = Instant::now();
            self.expire(now);
            idle = true;
            if let Some(v) = self.vision.as_mut().filter(|v| !v.is_idle()) {
                let t = Instant::now();
                let left = v.run_slice(&self.model);
                self.cost.observe_vision(t.elapsed().as_secs_f64() * 1e3);
                self.dequeue(left);
                idle = false;
            }
            if self.plan() {
                self.step();
                idle = false;
            }
            self.admit_blocked();
            self.publish();
        }
        self.shut_down();
    }

    /// Takes what callers sent; sleeps while there is nothing to do (or, when
    /// `idle`, while everything waits for its reader). False once the engine
    /// shuts down.
    fn pull(&mut self, mut idle: bool) -> bool {
        let queue = self.queue.clone();
        let mut q = queue.lock();
        loop {
            let control = std::mem::take(&mut q.control);
            let mut jobs = Vec::new();
            if !q.jobs.is_empty() {
                jobs.extend(q.jobs.drain(..));
            }
            let shutdown = q.shutdown;
            let nothing_new = control.is_empty() && jobs.is_empty() && !shutdown;
            if nothing_new && !self.has_work() {
                q = queue.wait(q, None);
                continue;
            }
            if nothing_new && idle {
                // Paused streams resume when read (their reader wakes us);
                // deadlines and cancel tokens are looked at now and then.
                q = queue.wait(q, Some(self.next_check()));
                idle = false;
                continue;
            }
            drop(q);
            for c in control {
                self.control(c);
            }
            for j in jobs {
                self.accept(j);
            }
            self.publish();
            if shutdown {
                return false;
            }
            if self.has_work() {
                return true;
            }
            q = queue.lock();
        }
    }

    /// When a loop with only paused streams looks at them again.
    fn next_check(&self) -> Instant {
        let poll = Instant::now() + Duration::from_millis(50);
        self.running
            .iter()
            .chain(self.waiting.iter())
            .filter_map(|s| s.job.opts.deadline)
            .fold(poll, |a, d| a.min(d))
    }

    fn has_work(&self) -> bool {
        !self.running.is_empty()
            || !self.waiting.is_empty()
            || !self.forwards.is_empty()
            || self.vision.as_ref().is_some_and(|v| !v.is_idle())
    }

    /// Requests leave the queue's count when they start (or end unstarted).
    fn dequeue(&self, n: usize) {
        if n > 0 {
            let mut q = self.queue.lock();
            q.waiting = q.waiting.saturating_sub(n);
        }
    }

    fn accept(&mut self, job: Job) {
        match job {
            Job::Generate(g) => {
                let m = &self.model;
                let bs = m.options.kv_block_size;
                let seq = Seq::new(*g, m.config.vocab_size, m.patches, m.context, bs);
                if seq.job.opts.max_tokens == 0 {
                    self.dequeue(1);
                    self.finish(seq, StopReason::MaxTokens);
                    return;
                }
                self.waiting.push_back(seq);
            }
            Job::Forward(f) => {
                self.forwards.push_back(Fwd {
                    job: *f,
                    start_len: 0,
                    fed: 0,
                    logits: Vec::new(),
                    taps: None,
                    chunk: 0,
                    started: false,
                });
            }
            Job::Encode(e) => match self.vision.as_mut() {
                Some(v) => {
                    if !v.push(*e) {
                        self.dequeue(1);
                    }
                }
                None => {
                    self.dequeue(1);
                    for w in e.waiters {
                        let _ = w.reply.try_send(Err(Error::Config(
                            "this model file has no vision tower".into(),
                        )));
                    }
                }
            },
        }
    }

    fn control(&mut self, c: Control) {
        let unknown = |seq| Error::UnknownSequence(seq);
        match c {
            Control::NewSequence(reply) => {
                let seq = self.pool.new_sequence();
                self.manual.insert(seq);
                let _ = reply.try_send(seq);
            }
            Control::Release(seq) => {
                if self.manual.remove(&seq) {
                    let _ = self.pool.release(seq);
                }
            }
            Control::Len(seq, reply) => {
                let r = match self.manual.contains(&seq) {
                    true => self.pool.len(seq),
                    false => Err(unknown(seq)),
                };
                let _ = reply.try_send(r);
            }
            Control::Truncate(seq, len, reply) => {
                let r = match self.manual.contains(&seq) {
                    true => self.pool.truncate(seq, len),
                    false => Err(unknown(seq)),
                };
                let _ = reply.try_send(r);
            }
            Control::ReleaseSlot(slot) => match self.parked.iter().position(|p| p.slot == slot) {
                Some(i) => {
                    let p = self.parked.remove(i);
                    let _ = self.pool.release(p.kv);
                }
                None => {
                    // Still running (its caller went away): release it when it ends.
                    let live = self
                        .running
                        .iter()
                        .chain(self.waiting.iter())
                        .any(|s| s.job.slot == Some(slot));
                    if live {
                        self.ended_slots.insert(slot);
                    }
                }
            },
            Control::SlotLen(slot, reply) => {
                let len = self
                    .parked
                    .iter()
                    .find(|p| p.slot == slot)
                    .and_then(|p| self.pool.len(p.kv).ok())
                    .unwrap_or(0);
                let _ = reply.try_send(len);
            }
        }
    }

    /// Ends requests that were cancelled or passed their deadline, queued or running.
    fn expire(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.waiting.len() {
            match self.waiting[i].stopped(now) {
                Some(stop) => {
                    let s = self.waiting.remove(i).expect("in range");
                    if s.started.is_none() {
                        self.dequeue(1);
                    }
                    self.finish(s, stop);
                }
                None => i += 1,
            }
        }
        let mut i = 0;
        while i < self.running.len() {
            match self.running[i].stopped(now) {
                Some(stop) => {
                    let s = self.running.remove(i);
                    self.finish(s, stop);
                }
                None => i += 1,
            }
        }
    }

    // ---- running a step

    fn step(&mut self) {
        let hidden = self.model.config.hidden_size;
        let vocab = self.model.config.vocab_size;
        self.groups.clear();
        self.outputs.clear();
        let mut inputs = reuse(std::mem::take(&mut self.inputs));
        let mut seqs = reuse_seqs(std::mem::take(&mut self.seqs));
        let mut decode_rows = 0;
        let mut prompt_rows = 0;
        let t = Instant::now();
        let mut capture: Option<&mut Taps> = None;
        {
            let Loop {
                running,
                forwards,
                pool,
                groups,
                outputs,
                ..
            } = self;
            for (i, s) in running.iter().enumerate().filter(|(_, s)| s.chunk > 0) {
                let row = inputs.len();
                s.push_inputs(s.len, s.chunk, hidden, &mut inputs);
                let first = outputs.len();
                if s.len + s.chunk == s.content_len() {
                    outputs.push(row + s.chunk - 1);
                }
                if s.remaining() == 1 {
                    decode_rows += 1;
                } else {
                    prompt_rows += s.chunk;
                }
                seqs.push(SeqRows {
                    rows: s.chunk,
                    first_pos: s.len,
                    block_table: pool.block_table(s.kv.expect("scheduled")).unwrap_or(&[]),
                });
                groups.push(Group {
                    owner: Owner::Gen(i),
                    rows: s.chunk,
                    row,
                    out: (first, outputs.len()),
                    failed: None,
                });
            }
            if let Some(f) = forwards.front_mut().filter(|f| f.chunk > 0) {
                let row = inputs.len();
                let first = outputs.len();
                for (k, r) in f.job.rows[f.fed..f.fed + f.chunk].iter().enumerate() {
                    inputs.push(match r {
                        FwdRow::Token(t) => Input::Token(*t),
                        FwdRow::Embedding(at) => {
                            Input::Embedding(&f.job.embeddings[*at..*at + hidden])
                        }
                    });
                    let last = f.fed + k + 1 == f.job.rows.len();
                    if f.job.which == Logits::All || last {
                        outputs.push(row + k);
                    }
                }
                prompt_rows += f.chunk;
                seqs.push(SeqRows {
                    rows: f.chunk,
                    first_pos: f.start_len + f.fed,
                    block_table: pool.block_table(f.job.seq).unwrap_or(&[]),
                });
                groups.push(Group {
                    owner: Owner::Fwd,
                    rows: f.chunk,
                    row,
                    out: (first, outputs.len()),
                    failed: None,
                });
                capture = f.taps.as_mut();
            }
        }
        let m = self.model.clone();
        let n_out = self.outputs.len();
        let step = Step {
            inputs: &inputs,
            seqs: &seqs,
            outputs: &self.outputs,
        };
        let backend = &mut self.backend;
        let logits = &mut self.logits;
        let ran = guard(|| {
            backend.execute(
                &m.plan,
                &m.weights,
                &step,
                capture.map(|c| c as &mut dyn Capture),
            )?;
            if n_out > 0 {
                backend.read_output(&mut logits[..n_out * vocab])?;
            }
            Ok(())
        });
        if let Err(e) = ran {
            if self.groups.len() == 1 {
                self.groups[0].failed = Some(e);
            } else {
                // One sequence at a time, so only the ones at fault fail.
                for (g, sr) in self.groups.iter_mut().zip(seqs.iter()) {
                    self.iso_outputs.clear();
                    self.iso_outputs
                        .extend(self.outputs[g.out.0..g.out.1].iter().map(|&r| r - g.row));
                    let one = Step {
                        inputs: &inputs[g.row..g.row + g.rows],
                        seqs: std::slice::from_ref(sr),
                        outputs: &self.iso_outputs,
                    };
                    let (o0, o1) = g.out;
                    let r = guard(|| {
                        backend.execute(&m.plan, &m.weights, &one, None)?;
                        if o1 > o0 {
                            backend.read_output(&mut logits[o0 * vocab..o1 * vocab])?;
                        }
                        Ok(())
                    });
                    g.failed = r.err();
                }
            }
        }
        self.inputs = reuse(inputs);
        self.seqs = reuse_seqs(seqs);
        self.cost
            .observe(decode_rows, prompt_rows, t.elapsed().as_secs_f64() * 1e3);
        self.stats.steps.fetch_add(1, Relaxed);
        self.stats
            .prefill_positions
            .fetch_add(prompt_rows as u64, Relaxed);
        self.finish_step();
    }

    /// After a step: lengths, cache commits, sampling, stops.
    fn finish_step(&mut self) {
        let vocab = self.model.config.vocab_size;
        let bs = self.pool.block_size();
        let mut groups = std::mem::take(&mut self.groups);
        // Finished sequences leave `running` after the loop (indices stay valid).
        let mut ended: Vec<(usize, Result<StopReason>)> = Vec::new();
        for g in groups.iter_mut() {
            match g.owner {
                Owner::Fwd => {
                    if let Some(e) = g.failed.take() {
                        self.end_forward(Err(e));
                        continue;
                    }
                    let f = self.forwards.front_mut().expect("scheduled");
                    f.fed += g.rows;
                    let len = f.start_len + f.fed;
                    let _ = self.pool.set_len(f.job.seq, len);
                    f.logits
                        .extend_from_slice(&self.logits[g.out.0 * vocab..g.out.1 * vocab]);
                    if f.fed == f.job.rows.len() {
                        self.end_forward(Ok(()));
                    }
                }
                Owner::Gen(i) => {
                    if let Some(e) = g.failed.take() {
                        ended.push((i, Err(e)));
                        continue;
                    }
                    let s = &mut self.running[i];
                    let kv = s.kv.expect("scheduled");
                    s.len += g.rows;
                    let _ = self.pool.set_len(kv, s.len);
                    if s.first_token.is_none() {
                        s.stats.prefill_positions += g.rows;
                    }
                    if self.model.options.prefix_cache {
                        let full = s.len / bs;
                        s.extend_chain(full, bs);
                        for b in s.committed..full {
                            let _ = self.pool.commit(kv, b, s.chain[b]);
                        }
                        s.committed = full;
                    }
                    if g.out.1 > g.out.0 {
                        if let Some(stop) = self.sample(i, g.out.0) {
                            ended.push((i, Ok(stop)));
                        }
                    }
                }
            }
        }
        groups.clear();
        self.groups = groups;
        // Highest index first, so the others stay where they are.
        ended.sort_by_key(|e| std::cmp::Reverse(e.0));
        for (i, r) in ended {
            let s = self.running.remove(i);
            match r {
                Ok(stop) => self.finish(s, stop),
                Err(e) => self.fail(s, e),
            }
        }
    }

    /// Samples `running[i]`'s next token from output row `o` and sends it.
    /// Returns the stop it reached, if any.
    fn sample(&mut self, i: usize, o: usize) -> Option<StopReason> {
        let eos = self.model.tokenizer.eos_token_id();
        let context = self.model.context;
        let vocab = self.model.config.vocab_size;
        let row = &mut self.logits[o * vocab..(o + 1) * vocab];
        let s = &mut self.running[i];
        let logits = s.job.logits.then(|| row.to_vec());
        if s.job.last_logits {
            s.last.clear();
            s.last.extend_from_slice(row);
        }
        let tok = s.sampler.sample(row, &s.history);
        s.generated.push(tok);
        s.history.push(tok);
        self.stats.generated.fetch_add(1, Relaxed);
        if s.first_token.is_none() {
            let now = Instant::now();
            s.first_token = Some(now);
            s.stats.prefill = now - s.started.unwrap_or(now);
            s.stats.time_to_first_token = now - s.job.submitted;
        }
        if tok == eos && !s.job.opts.ignore_eos {
            return Some(StopReason::Eos);
        }
        s.job.out.send(Event::Token { id: tok, logits });
        if s.generated.len() >= s.job.opts.max_tokens {
            Some(StopReason::MaxTokens)
        } else if s.content_len() >= context {
            Some(StopReason::ContextFull)
        } else {
            None
        }
    }

    // ---- ending requests

    /// Ends a request with `stop`, parking its session's KV or giving it back.
    fn finish(&mut self, mut s: Seq, stop: StopReason) {
        let now = Instant::now();
        if let Some(t) = s.first_token {
            s.stats.decode = now - t;
        }
        let fed = s
            .len
            .saturating_sub(s.prompt_positions)
            .min(s.generated.len());
        let last_logits =
            (s.job.last_logits && !s.last.is_empty()).then(|| std::mem::take(&mut s.last));
        s.job.out.send(Event::Done {
            tokens: s.generated.clone(),
            stop,
            fed,
            stats: s.stats.clone(),
            last_logits,
        });
        self.stats.finished.fetch_add(1, Relaxed);
        self.put_away(&mut s);
    }

    fn fail(&mut self, mut s: Seq, e: Error) {
        s.job.out.send(Event::Failed(e));
        self.stats.failed.fetch_add(1, Relaxed);
        // Its KV holds only what it fed successfully: a session may keep it.
        self.put_away(&mut s);
    }

    /// Parks the request's KV for its session, or gives it back.
    fn put_away(&mut self, s: &mut Seq) {
        if let Some(kv) = s.kv.take() {
            self.release_or_park(s, kv);
        }
    }

    fn release_or_park(&mut self, s: &Seq, kv: SeqId) {
        match s.job.slot {
            Some(slot) if !self.ended_slots.remove(&slot) => {
                let (items, len) = s.held_items(s.len);
                let kept = self.pool.truncate(kv, len).unwrap_or(0);
                let items = if kept == len {
                    items
                } else {
                    // (a picture cut at a shared block: keep what is whole)
                    s.held_items(kept).0
                };
                if let Some(i) = self.parked.iter().position(|p| p.slot == slot) {
                    let old = self.parked.remove(i);
                    let _ = self.pool.release(old.kv);
                }
                self.parked.push(Parked { slot, kv, items });
            }
            _ => {
                let _ = self.pool.release(kv);
            }
        }
    }

    fn publish(&self) {
        let st = &self.stats;
        st.running.store(self.running.len(), Relaxed);
        st.parked.store(self.parked.len(), Relaxed);
        st.images_pending
            .store(self.vision.as_ref().map_or(0, |v| v.pending()), Relaxed);
        st.kv_used.store(self.pool.used_blocks(), Relaxed);
        st.kv_free.store(self.pool.free_blocks(), Relaxed);
        st.kv_cached.store(self.pool.cached_blocks(), Relaxed);
        st.evictions.store(self.pool.evictions(), Relaxed);
    }

    fn shut_down(&mut self) {
        let why = || Error::Other("the engine is shutting down".into());
        for mut s in std::mem::take(&mut self.running) {
            s.job.out.send(Event::Failed(why()));
        }
        for mut s in std::mem::take(&mut self.waiting) {
            s.job.out.send(Event::Failed(why()));
        }
        while !self.forwards.is_empty() {
            self.end_forward(Err(why()));
        }
        if let Some(v) = self.vision.as_mut() {
            v.fail_all("the engine is shutting down");
        }
        // Requests that arrived after the last look.
        let mut q = self.queue.lock();
        let jobs: Vec<Job> = q.jobs.drain(..).collect();
        q.waiting = 0;
        drop(q);
        for j in jobs {
            match j {
                Job::Generate(mut g) => g.out.send(Event::Failed(why())),
                Job::Forward(f) => {
                    let _ = f.reply.try_send(Err(why()));
                }
                Job::Encode(e) => {
                    for w in e.waiters {
                        let _ = w.reply.try_send(Err(why()));
                    }
                }
            }
        }
        self.publish();
    }
}
