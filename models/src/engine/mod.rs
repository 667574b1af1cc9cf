//! The engine: a loaded model, and the one step loop that runs every caller's
//! work on it.
//!
//! * [`Engine`] (this file) loads a file into a [`Model`] (what never changes:
//!   configs, tokenizer, plans, weights) and starts the step loop; its methods
//!   are the callers' side: they check requests, queue them and wait or stream.
//! * [`scheduler`] is the step loop. It alone owns the backends, the KV pool
//!   and the vision backend, and builds each step from every sequence's work
//!   (continuous batching, chunked prefill, the prefix cache, preemption).
//! * [`queue`] is the bounded way in; [`stream`] the way out (tokens reach
//!   callers through a per-request queue, decoded to text on their thread).
//! * [`vision`] encodes pictures a slice at a time inside the loop; [`text`]
//!   turns token ids into UTF-8 pieces; [`options`] holds what callers choose.
//!
//! No lock is held across an answer and no caller code runs on the loop: a slow
//! consumer or a callback cannot stall other streams.

mod memory;
mod options;
mod queue;
pub(crate) mod scheduler;
mod stats;
mod stream;
mod text;
mod vision;

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use mipha_runtime::{
    BindOptions, BlockPool, Capture, CpuBackend, Error, Input, KvConfig, MqfFile, Plan, Result,
    SeqId, Weights,
};

pub use memory::{available_memory, MemoryNeed};
pub use options::{
    EngineOptions, GenerateOptions, Generation, KvCacheSize, Logits, StopReason, Timings,
};
pub use stats::EngineStats;
pub use stream::{CancelToken, Finished, Generating, RequestStats, StreamEvent, STREAM_WINDOW};
pub use text::TextDecoder;
pub use vision::{EncodeStats, ImageEmbeddings, ImageEmbeds};

use crate::config::{PhiConfig, VisionConfig};
use crate::image::ImageConfig;
use crate::limits;
use crate::phi::PhiForCausalLM;
use crate::siglip::SiglipVisionTower;
use crate::template::{ChatTemplate, Turn};
use crate::tokenizer::{MiphaTokenizer, PromptId};
use queue::{Control, Queue};
use scheduler::{FwdJob, FwdRow, GenJob, Job};
use vision::{EncodeJob, Waiter};

/// One item of a prompt: a token, or a whole picture (one position per patch).
#[derive(Clone, Debug)]
pub enum PromptItem {
    Token(u32),
    Image(ImageEmbeds),
}

/// A generation to run: [`Engine::submit`].
#[derive(Clone, Debug, Default)]
pub struct GenerateRequest {
    pub prompt: Vec<PromptItem>,
    pub options: GenerateOptions,
    /// stops the request from any thread (a token is made when `None`;
    /// [`Generating::cancel`] reaches it either way)
    pub cancel: Option<CancelToken>,
    /// send each token's logits (before any penalty) with it
    pub logits: bool,
    /// return the logits of the last sampled token with the end
    /// ([`Finished::last_logits`])
    pub last_logits: bool,
    /// the session whose parked KV this continues ([`crate::Session`] sets it)
    pub session: Option<SessionSlot>,
}

/// A session's claim on KV parked in the engine between its turns. Only a
/// [`crate::Session`] makes one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionSlot(pub(crate) u64);

/// The vision tower's plan and weights, for files that have one.
pub(crate) struct Vision {
    pub config: VisionConfig,
    pub image: ImageConfig,
    pub plan: Plan,
    pub weights: Weights,
}

/// What a loaded model never changes, shared by the engine's callers and its
/// step loop.
pub(crate) struct Model {
    pub file: Arc<MqfFile>,
    pub config: PhiConfig,
    pub tokenizer: MiphaTokenizer,
    pub template: ChatTemplate,
    pub plan: Plan,
    pub weights: Weights,
    pub vision: Option<Vision>,
    pub options: EngineOptions,
    /// most positions one sequence may hold: the model's context, or the whole
    /// KV cache when that is smaller
    pub context: usize,
    /// positions one picture takes
    pub patches: usize,
}

/// A loaded model. Share it (`Arc<Engine>`) between threads: every call queues
/// work for the engine's step loop, which batches all callers' sequences into
/// shared forward steps.
pub struct Engine {
    model: Arc<Model>,
    queue: Arc<Queue>,
    stats: Arc<stats::Stats>,
    thread: Option<std::thread::JoinHandle<()>>,
    image_cache: Mutex<VecDeque<(u128, ImageEmbeddings)>>,
    next_slot: AtomicU64,
    backend_name: String,
    /// the device the plans run on, e.g. `cuda:0 (...)` or `cpu (auto: ...)`
    device: String,
    kv_blocks: usize,
    load_time: Duration,
}

impl Engine {
    /// Opens and checks a model file, sizes everything from its metadata
    /// (each value checked against `options.limits` and the file's tensor
    /// table), checks the memory budget, then binds the weights and starts the
    /// step loop. Nothing large is allocated before every check has passed.
    pub fn load(path: impl AsRef<Path>, options: EngineOptions) -> Result<Self> {
        let start = Instant::now();
        check_options(&options)?;
        let file = Arc::new(MqfFile::open(path)?);
        if options.verify {
            file.verify()?;
        }
        let meta = file.metadata();
        let limits = &options.limits;
        let config = PhiConfig::from_metadata_with(meta, limits)?;
        check_language_model(&file, &config)?;
        // Every cheap check before the tokenizer is parsed (the slow one).
        let vision_parts = match VisionConfig::from_metadata_with(meta, limits)? {
            Some(vc) => Some(check_vision(&file, &config, vc, meta)?),
            None => None,
        };
        let tokenizer = MiphaTokenizer::from_metadata_with_vocab(meta, config.vocab_size)?;
        let template = ChatTemplate::from_metadata(meta)?;
        // Generation wants one output row per running sequence.
        let max_outputs = options
            .max_outputs
            .max(options.max_sequences)
            .min(options.max_batch_tokens);
        let plan = PhiForCausalLM::plan(&config, options.max_batch_tokens, max_outputs);
        let device = options.device.resolve()?;
        let kv = kv_config(&plan, &options)?;
        let vision_plan = vision_parts
            .as_ref()
            .map(|(vc, _)| SiglipVisionTower::plan(vc));
        let threads = match options.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let mut need = MemoryNeed {
            threads: threads as u64 * memory::THREAD_STACK,
            ..MemoryNeed::default()
        };
        need.add_plan(&plan, &file)?;
        if let Some(vp) = &vision_plan {
            need.add_plan(vp, &file)?;
        }
        let shape = plan.kv.expect("kv_config checked it");
        need.add_kv(&kv, shape.block_bytes(kv.block_size, kv.dtype).unwrap_or(0));
        // A GPU holds weights, activations and KV in its own memory (its
        // allocator reports a shortage as an error).
        if !device.is_cuda() {
            match (options.max_memory, available_memory()) {
                (Some(limit), _) => need.check(limit, "set by max_memory")?,
                (None, Some(free)) => need.check(free, "available now")?,
                (None, None) => {}
            }
        }
        let bind = BindOptions {
            int8_activations: options.int8_activations,
            bf16_dot: options.bf16_dot,
            // A GPU reads the file's layouts: CPU panels would only cost time and memory.
            cpu_repack: !device.is_cuda(),
        };
        let progress = options.progress.as_ref();
        let weights = Weights::bind_reporting(&plan, file.clone(), bind, progress)?;
        // The pool runs the CPU backend's kernels, and the step loop on any device.
        let pool = CpuBackend::thread_pool(options.threads)?;
        let backend = device.backend(&plan, &weights, Some(kv), pool.clone(), bind, progress)?;
        let context = config
            .max_position_embeddings
            .min(kv.n_blocks * kv.block_size);
        // Block tables hold a full context from the start: a decode step never grows one.
        let blocks = BlockPool::new(kv.n_blocks, kv.block_size).with_sequence_capacity(context);
        let vision = match (vision_parts, vision_plan) {
            (Some((config, image)), Some(plan)) => {
                let weights = Weights::bind_reporting(&plan, file.clone(), bind, progress)?;
                Some(Vision {
                    config,
                    image,
                    plan,
                    weights,
                })
            }
            _ => None,
        };
        let vision_backend = match &vision {
            Some(v) => {
                Some(device.backend(&v.plan, &v.weights, None, pool.clone(), bind, progress)?)
            }
            None => None,
        };
        let patches = vision.as_ref().map_or(0, |v| v.config.num_patches());
        let backend_name = backend.name();
        let model = Arc::new(Model {
            file,
            config,
            tokenizer,
            template,
            plan,
            weights,
            vision,
            options: options.clone(),
            context,
            patches,
        });
        let queue = Arc::new(Queue::new(options.max_queue));
        let stats = Arc::new(stats::Stats::new(kv.n_blocks));
        let thread = scheduler::start(
            model.clone(),
            queue.clone(),
            stats.clone(),
            backend,
            vision_backend,
            blocks,
            pool,
        )?;
        Ok(Engine {
            model,
            queue,
            stats,
            thread: Some(thread),
            image_cache: Mutex::new(VecDeque::new()),
            next_slot: AtomicU64::new(1),
            backend_name,
            device: device.describe(),
            kv_blocks: kv.n_blocks,
            load_time: start.elapsed(),
        })
    }

    pub fn config(&self) -> &PhiConfig {
        &self.model.config
    }
    pub fn tokenizer(&self) -> &MiphaTokenizer {
        &self.model.tokenizer
    }
    pub fn template(&self) -> &ChatTemplate {
        &self.model.template
    }
    pub fn file(&self) -> &MqfFile {
        &self.model.file
    }
    pub fn options(&self) -> &EngineOptions {
        &self.model.options
    }
    pub fn load_time(&self) -> Duration {
        self.load_time
    }
    /// The text backend's own description, e.g. `cpu (avx2, 8 threads)`, plus
    /// why `auto` fell back to the CPU when it did.
    pub fn backend_name(&self) -> String {
        match self.device.strip_prefix("cpu (") {
            Some(why) => format!("{} ({}", self.backend_name, why),
            None => self.backend_name.clone(),
        }
    }
    /// The device the plans run on, as `--device` resolved: `cpu`,
    /// `cpu (auto: <why no GPU>)` or the GPU, e.g. `cuda:0 (NVIDIA H100 ..., sm_90, ...)`.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Most positions (prompt + generated) one sequence may hold: the model's
    /// context, or the whole KV cache when that is smaller.
    pub fn context_length(&self) -> usize {
        self.model.context
    }

    /// Most bytes of text a prompt can have and still fit the context: every
    /// token decodes to at most the vocabulary's longest token, so longer text
    /// cannot fit whatever it tokenizes to.
    pub fn max_text_bytes(&self) -> usize {
        // Without a byte-level table, a generous bound per position.
        let per_token = self
            .model
            .tokenizer
            .token_bytes()
            .map_or(1024, |t| t.max_len().max(1));
        self.model.context.saturating_mul(per_token)
    }

    /// Refuses text that cannot fit the context, before it is tokenized (a
    /// 100 MB question costs nothing).
    pub fn check_text_len(&self, bytes: usize) -> Result<()> {
        let max_bytes = self.max_text_bytes();
        if bytes > max_bytes {
            return Err(Error::TextTooLong {
                bytes,
                max_bytes,
                context: self.model.context,
            });
        }
        Ok(())
    }

    /// Refuses `count` pictures in one prompt when that is more than
    /// [`EngineOptions::image_limits`] allow or their positions alone fill the
    /// context: checked before any of them is decoded or encoded.
    pub fn check_image_count(&self, count: usize) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        if self.model.vision.is_none() {
            return Err(Error::Config("this model file has no vision tower".into()));
        }
        let max = self.model.options.image_limits.max_count;
        if count > max {
            return Err(Error::Other(format!(
                "{count} pictures in one conversation; at most {max} are allowed"
            )));
        }
        let positions = count.saturating_mul(self.model.patches);
        if positions >= self.model.context {
            return Err(Error::ContextOverflow {
                tokens: positions + 1,
                max: self.model.context,
            });
        }
        Ok(())
    }

    /// KV blocks in the pool, and positions per block.
    pub fn kv_cache_blocks(&self) -> (usize, usize) {
        (self.kv_blocks, self.model.options.kv_block_size)
    }

    /// What the engine is doing now, and its totals so far (for metrics).
    pub fn stats(&self) -> EngineStats {
        let mut s = self.stats.snapshot();
        s.queue_depth = self.queue.lock().waiting;
        s
    }

    pub fn vision_config(&self) -> Option<&VisionConfig> {
        self.model.vision.as_ref().map(|v| &v.config)
    }

    /// How pictures are prepared for this model (`None` without a vision tower).
    pub fn image_config(&self) -> Option<&ImageConfig> {
        self.model.vision.as_ref().map(|v| &v.image)
    }

    /// Queues a generation and returns its stream at once (the busy error when
    /// the queue is full). Tokens come through [`Generating`] on the caller's
    /// thread; dropping it cancels the request.
    pub fn submit(&self, request: GenerateRequest) -> Result<Generating> {
        let GenerateRequest {
            prompt,
            options,
            cancel,
            logits,
            last_logits,
            session,
        } = request;
        options.sampling.validate().map_err(Error::Config)?;
        self.check_prompt(&prompt)?;
        let cancel = cancel.unwrap_or_default();
        // One event per token the request may make, and its end.
        let (out, shared) = stream::channel(
            options.max_tokens.min(self.model.context) + 2,
            self.queue.clone(),
        );
        let job = GenJob {
            prompt,
            opts: options,
            cancel: cancel.clone(),
            out,
            logits,
            last_logits,
            slot: session.map(|s| s.0),
            submitted: Instant::now(),
        };
        self.queue.submit(Job::Generate(Box::new(job)))?;
        Ok(Generating::new(shared, self.model.clone(), cancel))
    }

    /// Checks a prompt before it is queued: ids in the vocabulary, pictures of
    /// the model's shape, and a length the context holds.
    fn check_prompt(&self, prompt: &[PromptItem]) -> Result<()> {
        if prompt.is_empty() {
            return Err(Error::Other("the prompt is empty".into()));
        }
        let vocab = self.model.config.vocab_size;
        let hidden = self.model.config.hidden_size;
        let mut positions = 0usize;
        for item in prompt {
            positions += match item {
                PromptItem::Token(t) if *t as usize >= vocab => {
                    return Err(Error::Other(format!(
                        "token id {t} is outside the vocabulary ({vocab} ids)"
                    )))
                }
                PromptItem::Token(_) => 1,
                PromptItem::Image(img) => {
                    let rows = img.embeddings().rows(hidden);
                    if self.model.vision.is_none() {
                        return Err(Error::Config("this model file has no vision tower".into()));
                    }
                    if rows != self.model.patches || img.embeddings().width(hidden) != hidden {
                        return Err(Error::Other(format!(
                            "a picture's embeddings are {rows} rows of {}, the model takes \
                             {} rows of {hidden}",
                            img.embeddings().width(hidden),
                            self.model.patches
                        )));
                    }
                    rows
                }
            };
        }
        if positions > self.model.context {
            return Err(Error::ContextOverflow {
                tokens: positions,
                max: self.model.context,
            });
        }
        Ok(())
    }

    /// Prefills `prompt` into a fresh sequence and decodes up to
    /// `opts.max_tokens` tokens. `on_token` sees each new token and the text it
    /// completes, on the calling thread; returning `false` stops the generation.
    pub fn generate(
        &self,
        prompt: &[u32],
        opts: &GenerateOptions,
        on_token: impl FnMut(u32, &str) -> bool,
    ) -> Result<Generation> {
        let start = Instant::now();
        let g = self.submit(GenerateRequest {
            prompt: prompt.iter().map(|&t| PromptItem::Token(t)).collect(),
            options: opts.clone(),
            ..Default::default()
        })?;
        let f = g.for_each(on_token)?;
        let prefill = f
            .stats
            .time_to_first_token
            .min(start.elapsed())
            .saturating_sub(f.stats.queued);
        Ok(Generation {
            prompt_tokens: prompt.to_vec(),
            tokens: f.tokens,
            text: f.text,
            stop_reason: f.stop,
            timings: Timings {
                prefill,
                prefill_tokens: f.stats.prefill_positions,
                decode: f.stats.decode,
            },
        })
    }

    /// The prompt ids of a single-turn text chat.
    pub fn chat_prompt(&self, user: &str) -> Result<Vec<u32>> {
        let segments = self.model.template.render(&[Turn {
            user: user.to_string(),
            images: 0,
            assistant: None,
        }]);
        self.model
            .tokenizer
            .encode_segments(&segments)?
            .into_iter()
            .map(|id| match id {
                PromptId::Token(t) => Ok(t),
                PromptId::Image(_) => Err(Error::Other("this prompt has no images".into())),
            })
            .collect()
    }

    // ---- sequences driven by hand (conformance runs, `mipha-cli logits`)

    /// A sequence the caller feeds with [`Engine::forward`] and ends with
    /// [`Engine::release_sequence`]. It holds its KV until then and is never
    /// preempted.
    pub fn new_sequence(&self) -> SeqId {
        let (tx, rx) = mpsc::sync_channel(1);
        // A stopped engine has no sequences to give: an id it never made
        // makes every later call on it a clear error.
        if self.queue.control(Control::NewSequence(tx)).is_err() {
            return SeqId::MAX;
        }
        rx.recv().unwrap_or(SeqId::MAX)
    }

    pub fn release_sequence(&self, seq: SeqId) -> Result<()> {
        self.queue.control(Control::Release(seq))
    }

    /// Positions of `seq` already in the KV cache.
    pub fn sequence_len(&self, seq: SeqId) -> Result<usize> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.queue.control(Control::Len(seq, tx))?;
        rx.recv().map_err(|_| stopped())?
    }

    /// Forgets positions `len..` of `seq`. Returns the positions kept: fewer
    /// when `len` cuts into a block the prefix cache shares (it is not written
    /// again).
    pub fn truncate_sequence(&self, seq: SeqId, len: usize) -> Result<usize> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.queue.control(Control::Truncate(seq, len, tx))?;
        rx.recv().map_err(|_| stopped())?
    }

    /// Appends `inputs` to `seq` and runs them through the model (in chunks of
    /// `max_batch_tokens`, batched with other callers' work). `logits` receives
    /// `[rows, vocab]` for the last row or every row. On failure the sequence
    /// is left as it was. Taps reach `capture` after the call, on this thread;
    /// a forward with a capture runs in steps of its own.
    ///
    /// The inputs are copied for the step loop (device-resident rows come back
    /// to the host first: prompts with pictures go faster through
    /// [`Engine::submit`]).
    pub fn forward(
        &self,
        seq: SeqId,
        inputs: &[Input],
        which: Logits,
        logits: &mut Vec<f32>,
        capture: Option<&mut (dyn Capture + '_)>,
    ) -> Result<()> {
        if inputs.is_empty() {
            return Err(Error::Other("forward: no inputs".into()));
        }
        let hidden = self.model.config.hidden_size;
        let vocab = self.model.config.vocab_size;
        let mut rows = Vec::with_capacity(inputs.len());
        let mut embeddings = Vec::new();
        let push_row = |v: &[f32], i: usize, embeddings: &mut Vec<f32>| {
            if v.len() != hidden {
                return Err(Error::Other(format!(
                    "input embedding {i} has {} values, the model takes {hidden}",
                    v.len()
                )));
            }
            embeddings.extend_from_slice(v);
            Ok(FwdRow::Embedding(embeddings.len() - hidden))
        };
        for (i, input) in inputs.iter().enumerate() {
            rows.push(match input {
                Input::Token(t) if *t as usize >= vocab => {
                    return Err(Error::Other(format!(
                        "token id {t} is outside the vocabulary ({vocab} rows)"
                    )))
                }
                Input::Token(t) => FwdRow::Token(*t),
                Input::Embedding(v) => push_row(v, i, &mut embeddings)?,
                Input::Resident { rows: r, row } => {
                    if *row >= r.rows() {
                        return Err(Error::Other(format!(
                            "input row {i} asks for resident row {row} of {}",
                            r.rows()
                        )));
                    }
                    let host = r.to_host()?;
                    let w = r.width();
                    push_row(&host[row * w..(row + 1) * w], i, &mut embeddings)?
                }
            });
        }
        let (tx, rx) = mpsc::sync_channel(1);
        let job = FwdJob {
            seq,
            rows,
            embeddings,
            which,
            capture: capture.is_some(),
            reply: tx,
        };
        self.queue.submit(Job::Forward(Box::new(job)))?;
        let out = rx.recv().map_err(|_| stopped())??;
        *logits = out.logits;
        if let (Some(c), Some(taps)) = (capture, out.taps) {
            taps.replay(c);
        }
        Ok(())
    }

    // ---- pictures

    /// Runs preprocessed CHW pixels (`image.size` square, normalized) through the
    /// vision tower and projector: `[num_patches, hidden]` image embeddings.
    /// Taps reach `capture` after the call, on this thread.
    pub fn encode_pixels(
        &self,
        pixels: &[f32],
        capture: Option<&mut (dyn Capture + '_)>,
    ) -> Result<Vec<f32>> {
        self.check_pixels(pixels)?;
        let e = self.encode(pixels, None, false, capture.is_some(), None)?;
        if let (Some(c), Some(t)) = (capture, &e.taps) {
            t.replay(c);
        }
        Ok(Arc::unwrap_or_clone(e.embeds.to_host()?))
    }

    /// The picture's embeddings where the language model reads them (kept on
    /// the GPU when the engine runs there, else on the host), keyed by a SHA-256
    /// of `pixels`, through the engine's small LRU: a second question about the
    /// same picture costs no encode. Other streams keep decoding while it is
    /// encoded.
    pub fn encode_image(&self, pixels: &[f32]) -> Result<ImageEmbeds> {
        Ok(self.encode_image_cached(pixels, None)?.0)
    }

    /// [`Engine::encode_image`], saying whether the embeddings came from the
    /// cache, and given up (with [`Error::Cancelled`]) when `cancel` fires
    /// between two slices of the encoding.
    pub fn encode_image_cached(
        &self,
        pixels: &[f32],
        cancel: Option<&CancelToken>,
    ) -> Result<(ImageEmbeds, bool)> {
        self.check_pixels(pixels)?;
        let key = vision::pixel_key(pixels);
        let lookup = |cache: &mut VecDeque<(u128, ImageEmbeddings)>| {
            let at = cache.iter().position(|(k, _)| *k == key)?;
            let hit = cache.remove(at)?;
            let embeds = hit.1.clone();
            cache.push_front(hit);
            Some(embeds)
        };
        if let Some(e) = lookup(&mut self.cache()) {
            self.stats.image_hit();
            return Ok((ImageEmbeds::new(key, e), true));
        }
        self.stats.image_miss();
        let embeds = self.encode(pixels, Some(key), true, false, cancel)?.embeds;
        let mut cache = self.cache();
        if self.model.options.image_cache > 0 && !cache.iter().any(|(k, _)| *k == key) {
            cache.push_front((key, embeds.clone()));
            cache.truncate(self.model.options.image_cache);
        }
        Ok((ImageEmbeds::new(key, embeds), false))
    }

    /// [`Engine::encode_image`] without the cache, with where the time went.
    pub fn encode_image_timed(&self, pixels: &[f32]) -> Result<(ImageEmbeds, EncodeStats)> {
        self.check_pixels(pixels)?;
        let key = vision::pixel_key(pixels);
        let e = self.encode(pixels, Some(key), true, false, None)?;
        Ok((ImageEmbeds::new(key, e.embeds), e.stats))
    }

    fn encode(
        &self,
        pixels: &[f32],
        key: Option<u128>,
        keep: bool,
        capture: bool,
        cancel: Option<&CancelToken>,
    ) -> Result<vision::Encoded> {
        // (callers have checked the pixels: a wrong buffer is neither hashed
        // nor counted as a cache miss)
        let (tx, rx) = mpsc::sync_channel(1);
        let job = EncodeJob {
            pixels: pixels.to_vec(),
            key,
            keep,
            capture,
            waiters: vec![Waiter {
                cancel: cancel.cloned(),
                reply: tx,
            }],
            submitted: Instant::now(),
        };
        self.queue.submit(Job::Encode(Box::new(job)))?;
        rx.recv().map_err(|_| stopped())?
    }

    fn check_pixels(&self, pixels: &[f32]) -> Result<()> {
        let vision = self
            .model
            .vision
            .as_ref()
            .ok_or_else(|| Error::Config("this model file has no vision tower".into()))?;
        let cfg = &vision.config;
        let want = cfg.num_channels * cfg.image_size * cfg.image_size;
        if pixels.len() != want {
            return Err(Error::Other(format!(
                "pixel buffer holds {} values, the vision tower takes {want} ({}x{}x{})",
                pixels.len(),
                cfg.num_channels,
                cfg.image_size,
                cfg.image_size
            )));
        }
        Ok(())
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, VecDeque<(u128, ImageEmbeddings)>> {
        self.image_cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    // ---- sessions

    /// A new session's id: its KV stays parked in the loop between turns.
    pub(crate) fn new_slot(&self) -> u64 {
        self.next_slot.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn release_slot(&self, slot: u64) {
        // A stopped engine holds nothing to release.
        let _ = self.queue.control(Control::ReleaseSlot(slot));
    }

    /// Positions a session's parked KV holds (0 once given up to others).
    pub(crate) fn slot_len(&self, slot: u64) -> usize {
        let (tx, rx) = mpsc::sync_channel(1);
        if self.queue.control(Control::SlotLen(slot, tx)).is_err() {
            return 0;
        }
        rx.recv().unwrap_or(0)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.queue.lock().shutdown = true;
        self.queue.notify();
        if let Some(t) = self.thread.take() {
            // The loop answers everything still queued before it ends.
            let _ = t.join();
        }
    }
}

fn stopped() -> Error {
    Error::Other("the engine stopped before answering".into())
}

/// Cross-checks the language model's hyper-parameters against the tensor
/// table before a plan is sized from them.
fn check_language_model(file: &MqfFile, c: &PhiConfig) -> Result<()> {
    limits::check_layers(
        file,
        "lm.num_hidden_layers",
        "model.layers",
        c.num_hidden_layers,
    )?;
    limits::check_shape(
        file,
        "model.embed_tokens.weight",
        &[c.vocab_size, c.hidden_size],
        "`lm.vocab_size` and `lm.hidden_size`",
    )?;
    limits::check_shape(
        file,
        "model.layers.0.mlp.fc1.weight",
        &[c.intermediate_size, c.hidden_size],
        "`lm.intermediate_size` and `lm.hidden_size`",
    )?;
    limits::check_shape(
        file,
        "model.layers.0.self_attn.k_proj.weight",
        &[c.kv_dim(), c.hidden_size],
        "`lm.num_key_value_heads` x `lm.head_dim` and `lm.hidden_size`",
    )
}

/// The vision tower's config checked against the language model, the image
/// preprocessing and the tensor table.
fn check_vision(
    file: &MqfFile,
    lm: &PhiConfig,
    vc: VisionConfig,
    meta: &mipha_runtime::Metadata,
) -> Result<(VisionConfig, ImageConfig)> {
    if vc.projector_hidden != lm.hidden_size {
        return Err(Error::Config(format!(
            "the projector writes {}-wide embeddings, the language model takes {}",
            vc.projector_hidden, lm.hidden_size
        )));
    }
    let image = ImageConfig::from_metadata(meta)?;
    if image.height() != vc.image_size || image.width() != vc.image_size {
        return Err(Error::Config(format!(
            "images are resized to {}x{}, the vision tower takes {}x{}",
            image.height(),
            image.width(),
            vc.image_size,
            vc.image_size
        )));
    }
    limits::check_layers(
        file,
        "vision.num_hidden_layers",
        "model.vision_tower.vision_model.encoder.layers",
        vc.num_hidden_layers,
    )?;
    limits::check_shape(
        file,
        "model.vision_tower.vision_model.embeddings.position_embedding.weight",
        &[vc.num_patches(), vc.hidden_size],
        "`vision.image_size`, `vision.patch_size` and `vision.hidden_size`",
    )?;
    Ok((vc, image))
}

/// Checks the options' sizes before anything is allocated.
fn check_options(o: &EngineOptions) -> Result<()> {
    let positive = [
        ("max_batch_tokens", o.max_batch_tokens),
        ("max_outputs", o.max_outputs),
        ("kv_block_size", o.kv_block_size),
        ("max_sequences", o.max_sequences),
        ("max_queue", o.max_queue),
    ];
    if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
        return Err(Error::Config(format!("{name} must be positive")));
    }
    let bounded = [
        ("threads", o.threads, mipha_runtime::cpu::MAX_THREADS),
        ("max_batch_tokens", o.max_batch_tokens, 1 << 16),
        ("max_outputs", o.max_outputs, 1 << 16),
        ("kv_block_size", o.kv_block_size, 1 << 12),
        ("max_sequences", o.max_sequences, 1 << 12),
        ("max_queue", o.max_queue, 1 << 20),
        ("image_cache", o.image_cache, 1 << 12),
    ];
    if let Some((name, v, max)) = bounded.iter().find(|(_, v, max)| v > max) {
        return Err(Error::Config(format!(
            "{name} = {v} is above the limit of {max}"
        )));
    }
    o.image_limits.validate()?;
    if o.max_sequences > o.max_batch_tokens {
        return Err(Error::Config(format!(
            "max_sequences ({}) must not exceed max_batch_tokens ({}): every running \
             sequence decodes a row per step",
            o.max_sequences, o.max_batch_tokens
        )));
    }
    Ok(())
}

/// The KV pool the budget buys: whole blocks, each holding every layer's K and V.
fn kv_config(plan: &Plan, o: &EngineOptions) -> Result<KvConfig> {
    let shape = plan
        .kv
        .ok_or_else(|| Error::Config("the language model plan has no KV cache".into()))?;
    let bs = o.kv_block_size;
    let block_bytes = shape.block_bytes(bs, o.kv_dtype).ok_or_else(|| {
        Error::Config(format!(
            "a KV block of {bs} positions overflows ({} layers of {} values)",
            shape.n_layers, shape.kv_dim
        ))
    })?;
    let n_blocks = match o.kv_cache {
        KvCacheSize::Mib(mib) => {
            let bytes = mib
                .checked_mul(1 << 20)
                .ok_or_else(|| Error::Config(format!("a KV cache of {mib} MiB overflows")))?;
            bytes / block_bytes.max(1)
        }
        KvCacheSize::Positions(p) => p.div_ceil(bs),
    };
    if n_blocks == 0 {
        return Err(Error::Config(format!(
            "the KV cache budget ({:?}) holds no block of {bs} positions ({} bytes each in {})",
            o.kv_cache,
            block_bytes,
            o.kv_dtype.name()
        )));
    }
    n_blocks.checked_mul(block_bytes).ok_or_else(|| {
        Error::Config(format!(
            "a KV cache of {n_blocks} blocks of {block_bytes} bytes overflows"
        ))
    })?;
    if n_blocks >= u32::MAX as usize {
        return Err(Error::Config(format!(
            "a KV cache of {n_blocks} blocks is more than a block table can name"
        )));
    }
    Ok(KvConfig {
        n_blocks,
        block_size: bs,
        dtype: o.kv_dtype,
    })
}
