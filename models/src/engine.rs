//! The engine: a loaded model shared by every caller, and the generation loop.

use std::cell::Cell;
use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mipha_runtime::{
    Backend, BindOptions, BlockPool, Capture, CpuBackend, DeviceChoice, Error, Input, KvConfig,
    LoadProgress, MqfFile, Plan, ResidentRows, Result, SeqId, Step, Weights,
};

use crate::config::{PhiConfig, VisionConfig};
use crate::image::ImageConfig;
use crate::phi::PhiForCausalLM;
use crate::sampling::{Sampler, SamplingParams};
use crate::siglip::{patchify, SiglipVisionTower};
use crate::template::{ChatTemplate, Turn};
use crate::tokenizer::{MiphaTokenizer, PromptId};

#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// CPU threads; 0 = one per core
    pub threads: usize,
    /// most positions one forward step carries (longer prompts run in chunks)
    pub max_batch_tokens: usize,
    /// most positions of one step whose logits are wanted (1 for generation;
    /// more for `logits`-style conformance runs)
    pub max_outputs: usize,
    /// positions per KV block
    pub kv_block_size: usize,
    /// sequences that may hold a full context at once (sizes the KV pool)
    pub max_sequences: usize,
    /// check every tensor checksum at load
    pub verify: bool,
    /// image embeddings kept for reuse (an LRU keyed by pixel content)
    pub image_cache: usize,
    /// Q8_0/Q4_0 weights multiply int8-quantized activations (per 32-block, as
    /// llama.cpp does) through integer SIMD kernels on weights repacked at load.
    /// Off: f32 activations against the weights in place (several times slower;
    /// bit-for-bit the math of a dequantized-weights oracle, for conformance).
    pub int8_activations: bool,
    /// where the plans run: the CPU (default), a CUDA GPU, or `auto` (the GPU when
    /// one is usable, else the CPU; [`Engine::device`] says which)
    pub device: DeviceChoice,
    /// told how repacking (CPU) or uploading (GPU) the weights advances
    pub progress: Option<LoadProgress>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            threads: 0,
            max_batch_tokens: 512,
            max_outputs: 1,
            kv_block_size: 16,
            max_sequences: 1,
            verify: false,
            image_cache: 8,
            int8_activations: true,
            device: DeviceChoice::Cpu,
            progress: None,
        }
    }
}

/// An image's projected embeddings, `[num_patches, hidden]`: on the host, or
/// kept on the GPU when the engine runs there (they then feed the prefill
/// device to device, never coming back to the host).
#[derive(Clone, Debug)]
pub enum ImageEmbeddings {
    Host(Arc<Vec<f32>>),
    Resident(Arc<dyn ResidentRows>),
}

impl From<Arc<Vec<f32>>> for ImageEmbeddings {
    fn from(v: Arc<Vec<f32>>) -> Self {
        ImageEmbeddings::Host(v)
    }
}

impl ImageEmbeddings {
    /// Appends one input row per patch (`width` = the model's hidden size).
    pub fn push_inputs<'a>(&'a self, width: usize, inputs: &mut Vec<Input<'a>>) {
        match self {
            ImageEmbeddings::Host(v) => inputs.extend(v.chunks_exact(width).map(Input::Embedding)),
            ImageEmbeddings::Resident(r) => {
                inputs.extend((0..r.rows()).map(|row| Input::Resident {
                    rows: r.as_ref(),
                    row,
                }))
            }
        }
    }

    /// The values on the host (a download for device-resident ones).
    pub fn to_host(&self) -> Result<Arc<Vec<f32>>> {
        match self {
            ImageEmbeddings::Host(v) => Ok(v.clone()),
            ImageEmbeddings::Resident(r) => Ok(Arc::new(r.to_host()?)),
        }
    }
}

/// Which positions of a forward call return logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    Last,
    All,
}

struct Exec {
    backend: Box<dyn Backend>,
    blocks: BlockPool,
    vision: Option<VisionExec>,
}

struct VisionExec {
    backend: Box<dyn Backend>,
    patches: Vec<f32>,
}

/// The vision tower's plan and weights, for files that have one.
struct Vision {
    config: VisionConfig,
    image: ImageConfig,
    plan: Plan,
    weights: Weights,
}

/// A loaded model. Cheap to share (`Arc<Engine>`); forward steps of different
/// sequences are serialised on its backend (a whole answer at a time, see
/// [`Engine::decode_with`]).
pub struct Engine {
    file: Arc<MqfFile>,
    config: PhiConfig,
    tokenizer: MiphaTokenizer,
    template: ChatTemplate,
    plan: Plan,
    weights: Weights,
    vision: Option<Vision>,
    exec: Mutex<Exec>,
    /// the backends' threads; decode loops run on one of them
    pool: Arc<rayon::ThreadPool>,
    image_cache: Mutex<VecDeque<(u128, ImageEmbeddings)>>,
    options: EngineOptions,
    /// the device the plans run on, e.g. `cuda:0 (...)` or `cpu (auto: ...)`
    device: String,
    load_time: Duration,
}

impl Engine {
    pub fn load(path: impl AsRef<Path>, options: EngineOptions) -> Result<Self> {
        let start = Instant::now();
        if options.max_batch_tokens == 0 || options.max_outputs == 0 || options.kv_block_size == 0 {
            return Err(Error::Config(
                "batch size, outputs and KV block size must be positive".into(),
            ));
        }
        let file = Arc::new(MqfFile::open(path)?);
        if options.verify {
            file.verify()?;
        }
        let meta = file.metadata();
        let config = PhiConfig::from_metadata(meta)?;
        let tokenizer = MiphaTokenizer::from_metadata(meta)?;
        let template = ChatTemplate::from_metadata(meta)?;
        let max_outputs = options.max_outputs.min(options.max_batch_tokens);
        let plan = PhiForCausalLM::plan(&config, options.max_batch_tokens, max_outputs);
        let device = options.device.resolve()?;
        let bind = BindOptions {
            int8_activations: options.int8_activations,
            // A GPU reads the file's layouts: CPU panels would only cost time and memory.
            cpu_repack: !device.is_cuda(),
        };
        let progress = options.progress.as_ref();
        let weights = Weights::bind_reporting(&plan, file.clone(), bind, progress)?;
        let blocks_per_seq = config
            .max_position_embeddings
            .div_ceil(options.kv_block_size);
        let kv = KvConfig {
            n_blocks: blocks_per_seq * options.max_sequences.max(1),
            block_size: options.kv_block_size,
        };
        // The pool runs the CPU backend's kernels, and decode loops on any device.
        let pool = CpuBackend::thread_pool(options.threads)?;
        let backend = device.backend(&plan, &weights, Some(kv), pool.clone(), bind, progress)?;
        // Block tables hold a full context from the start: a decode step never grows one.
        let blocks = BlockPool::new(kv.n_blocks, kv.block_size)
            .with_sequence_capacity(config.max_position_embeddings);
        let vision = match VisionConfig::from_metadata(meta)? {
            Some(vc) => {
                if vc.projector_hidden != config.hidden_size {
                    return Err(Error::Config(format!(
                        "the projector writes {}-wide embeddings, the language model takes {}",
                        vc.projector_hidden, config.hidden_size
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
                let plan = SiglipVisionTower::plan(&vc);
                let weights = Weights::bind_reporting(&plan, file.clone(), bind, progress)?;
                Some(Vision {
                    config: vc,
                    image,
                    plan,
                    weights,
                })
            }
            None => None,
        };
        let vision_exec = match &vision {
            Some(v) => Some(VisionExec {
                backend: device.backend(&v.plan, &v.weights, None, pool.clone(), bind, progress)?,
                patches: Vec::new(),
            }),
            None => None,
        };
        Ok(Engine {
            file,
            config,
            tokenizer,
            template,
            plan,
            weights,
            vision,
            exec: Mutex::new(Exec {
                backend,
                blocks,
                vision: vision_exec,
            }),
            pool,
            image_cache: Mutex::new(VecDeque::new()),
            options,
            device: device.describe(),
            load_time: start.elapsed(),
        })
    }

    pub fn config(&self) -> &PhiConfig {
        &self.config
    }
    pub fn tokenizer(&self) -> &MiphaTokenizer {
        &self.tokenizer
    }
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }
    pub fn file(&self) -> &MqfFile {
        &self.file
    }
    pub fn options(&self) -> &EngineOptions {
        &self.options
    }
    pub fn load_time(&self) -> Duration {
        self.load_time
    }
    /// The text backend's own description, e.g. `cpu (avx2, 8 threads)`, plus
    /// why `auto` fell back to the CPU when it did.
    pub fn backend_name(&self) -> String {
        let name = self.lock().backend.name();
        match self.device.strip_prefix("cpu (") {
            Some(why) => format!("{name} ({}", why),
            None => name,
        }
    }
    /// The device the plans run on, as `--device` resolved: `cpu`,
    /// `cpu (auto: <why no GPU>)` or the GPU, e.g. `cuda:0 (NVIDIA H100 ..., sm_90, ...)`.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Most positions (prompt + generated) one sequence may hold.
    pub fn context_length(&self) -> usize {
        self.config.max_position_embeddings
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Exec> {
        assert!(
            DECODING.get() != self as *const Engine as usize,
            "an engine was called from inside its own decode loop (e.g. from an on_token \
             callback); that would deadlock"
        );
        // A panic in another caller cannot leave the pool half-updated (every
        // change is a single call), so a poisoned lock is still usable.
        self.exec.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn new_sequence(&self) -> SeqId {
        self.lock().blocks.new_sequence()
    }

    pub fn release_sequence(&self, seq: SeqId) -> Result<()> {
        self.lock().blocks.release(seq)
    }

    /// Positions of `seq` already in the KV cache.
    pub fn sequence_len(&self, seq: SeqId) -> Result<usize> {
        self.lock().blocks.len(seq)
    }

    /// Forgets positions `len..` of `seq`.
    pub fn truncate_sequence(&self, seq: SeqId, len: usize) -> Result<()> {
        self.lock().blocks.truncate(seq, len)
    }

    /// Appends `inputs` to `seq` and runs them through the model, in chunks of
    /// `max_batch_tokens`. `logits` receives `[rows, vocab]` for the last row or
    /// every row. On failure the sequence is left as it was.
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
        self.forward_in(&mut self.lock(), seq, inputs, which, logits, capture)
    }

    /// [`Engine::forward`] with the engine already locked. Allocates nothing when
    /// `which` is [`Logits::Last`] and `logits` already holds a row.
    fn forward_in(
        &self,
        exec: &mut Exec,
        seq: SeqId,
        inputs: &[Input],
        which: Logits,
        logits: &mut Vec<f32>,
        mut capture: Option<&mut (dyn Capture + '_)>,
    ) -> Result<()> {
        let Exec {
            backend, blocks, ..
        } = exec;
        let start = blocks.len(seq)?;
        let total = start + inputs.len();
        if total > self.context_length() {
            return Err(Error::ContextOverflow {
                tokens: total,
                max: self.context_length(),
            });
        }
        blocks.reserve(seq, total)?;
        let vocab = self.config.vocab_size;
        let chunk = match which {
            Logits::Last => self.plan.max_tokens,
            Logits::All => self.plan.max_tokens.min(self.plan.max_outputs),
        };
        logits.clear();
        // Row indices whose logits are wanted: all rows of a chunk, or the last row
        // of the last chunk. Built without allocating on the decode path.
        let all_rows: Vec<usize> = match which {
            Logits::All => (0..chunk).collect(),
            Logits::Last => Vec::new(),
        };
        let mut pos = start;
        let result = (|| {
            for part in inputs.chunks(chunk) {
                let last = [part.len() - 1];
                let outputs: &[usize] = match which {
                    Logits::All => &all_rows[..part.len()],
                    Logits::Last if pos + part.len() == total => &last,
                    Logits::Last => &[],
                };
                let step = Step {
                    inputs: part,
                    first_pos: pos,
                    block_table: blocks.block_table(seq)?,
                    outputs,
                };
                backend.execute(&self.plan, &self.weights, &step, capture.as_deref_mut())?;
                if !outputs.is_empty() {
                    let at = logits.len();
                    logits.resize(at + outputs.len() * vocab, 0.0);
                    backend.read_output(&mut logits[at..])?;
                }
                pos += part.len();
            }
            Ok(())
        })();
        match result {
            Ok(()) => blocks.set_len(seq, total),
            Err(e) => {
                blocks.truncate(seq, start)?;
                Err(e)
            }
        }
    }

    pub fn vision_config(&self) -> Option<&VisionConfig> {
        self.vision.as_ref().map(|v| &v.config)
    }

    /// How pictures are prepared for this model (`None` without a vision tower).
    pub fn image_config(&self) -> Option<&ImageConfig> {
        self.vision.as_ref().map(|v| &v.image)
    }

    /// Runs preprocessed CHW pixels (`image.size` square, normalized) through the
    /// vision tower and projector: `[num_patches, hidden]` image embeddings.
    pub fn encode_pixels(
        &self,
        pixels: &[f32],
        capture: Option<&mut (dyn Capture + '_)>,
    ) -> Result<Vec<f32>> {
        self.check_pixels(pixels)?;
        let cfg = &self.vision.as_ref().expect("checked above").config;
        let mut out = vec![0.0; cfg.num_patches() * cfg.projector_hidden];
        let mut guard = self.lock();
        let exec = self.run_vision(&mut guard, pixels, capture)?;
        exec.backend.read_output(&mut out)?;
        Ok(out)
    }

    /// Runs the vision plan over `pixels` (checked by the caller); its output
    /// stays in the backend.
    fn run_vision<'g>(
        &self,
        guard: &'g mut Exec,
        pixels: &[f32],
        capture: Option<&mut (dyn Capture + '_)>,
    ) -> Result<&'g mut VisionExec> {
        let vision = self.vision.as_ref().expect("checked by the callers");
        let cfg = &vision.config;
        let exec = guard.vision.as_mut().expect("built with the vision plan");
        patchify(cfg, pixels, &mut exec.patches);
        let inputs: Vec<Input> = exec
            .patches
            .chunks_exact(cfg.patch_len())
            .map(Input::Embedding)
            .collect();
        let step = Step {
            inputs: &inputs,
            first_pos: 0,
            block_table: &[],
            outputs: &[],
        };
        exec.backend
            .execute(&vision.plan, &vision.weights, &step, capture)?;
        Ok(exec)
    }

    /// The image embeddings of `pixels` where the language model reads them: kept
    /// on the GPU when the engine runs there (no round trip through the host),
    /// else on the host.
    pub fn encode_image(&self, pixels: &[f32]) -> Result<ImageEmbeddings> {
        self.check_pixels(pixels)?;
        let mut guard = self.lock();
        let exec = self.run_vision(&mut guard, pixels, None)?;
        if let Some(rows) = exec.backend.keep_output()? {
            return Ok(ImageEmbeddings::Resident(rows));
        }
        let cfg = &self.vision.as_ref().expect("checked above").config;
        let mut out = vec![0.0; cfg.num_patches() * cfg.projector_hidden];
        exec.backend.read_output(&mut out)?;
        Ok(ImageEmbeddings::Host(Arc::new(out)))
    }

    fn check_pixels(&self, pixels: &[f32]) -> Result<()> {
        let vision = self
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

    /// [`Engine::encode_image`] through a small LRU keyed by `key` (a content
    /// hash of the image): the second question about a picture costs no encode.
    /// Returns the embeddings and whether they came from the cache.
    pub fn encode_image_keyed(&self, pixels: &[f32], key: u128) -> Result<(ImageEmbeddings, bool)> {
        let lookup = |cache: &mut VecDeque<(u128, ImageEmbeddings)>| {
            let at = cache.iter().position(|(k, _)| *k == key)?;
            let hit = cache.remove(at)?;
            let embeds = hit.1.clone();
            cache.push_front(hit);
            Some(embeds)
        };
        if let Some(e) = lookup(&mut self.cache()) {
            return Ok((e, true));
        }
        let embeds = self.encode_image(pixels)?;
        let mut cache = self.cache();
        if self.options.image_cache > 0 {
            cache.push_front((key, embeds.clone()));
            cache.truncate(self.options.image_cache);
        }
        Ok((embeds, false))
    }

    /// [`Engine::encode_image_keyed`] with the embeddings on the host (a download
    /// when the engine keeps them on the GPU).
    pub fn encode_image_cached(&self, pixels: &[f32], key: u128) -> Result<(Arc<Vec<f32>>, bool)> {
        let (e, cached) = self.encode_image_keyed(pixels, key)?;
        Ok((e.to_host()?, cached))
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, VecDeque<(u128, ImageEmbeddings)>> {
        self.image_cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The prompt ids of a single-turn text chat.
    pub fn chat_prompt(&self, user: &str) -> Result<Vec<u32>> {
        let segments = self.template.render(&[Turn {
            user: user.to_string(),
            images: 0,
            assistant: None,
        }]);
        self.tokenizer
            .encode_segments(&segments)?
            .into_iter()
            .map(|id| match id {
                PromptId::Token(t) => Ok(t),
                PromptId::Image(_) => Err(Error::Other("this prompt has no images".into())),
            })
            .collect()
    }

    /// Prefills `prompt` into a fresh sequence and decodes up to
    /// `opts.max_tokens` tokens. `on_token` sees each new token and the text it
    /// completes; returning `false` stops the generation. It runs on one of the
    /// engine's threads while the engine is held (see [`Engine::decode_with`]), so
    /// it must be `Send` and must not call into this engine.
    pub fn generate(
        &self,
        prompt: &[u32],
        opts: &GenerateOptions,
        on_token: impl FnMut(u32, &str) -> bool + Send,
    ) -> Result<Generation> {
        opts.sampling.validate().map_err(Error::Config)?;
        if prompt.is_empty() {
            return Err(Error::Other("the prompt is empty".into()));
        }
        let seq = self.new_sequence();
        let result = (|| {
            let mut logits = Vec::new();
            let inputs: Vec<Input> = prompt.iter().map(|&t| Input::Token(t)).collect();
            let t0 = Instant::now();
            self.forward(seq, &inputs, Logits::Last, &mut logits, None)?;
            let prefill = t0.elapsed();
            let mut history = prompt.to_vec();
            let d = self.decode(seq, &mut logits, &mut history, opts, None, on_token)?;
            Ok(Generation {
                prompt_tokens: prompt.to_vec(),
                tokens: d.tokens,
                text: d.text,
                stop_reason: d.stop,
                timings: Timings {
                    prefill,
                    prefill_tokens: prompt.len(),
                    decode: d.elapsed,
                },
            })
        })();
        self.release_sequence(seq)?;
        result
    }

    /// The decode loop shared by [`Engine::generate`] and sessions: [`Decoder::step`]
    /// until a stop, handing each token to `on_token` (returning false stops it).
    /// Every token it returns except a final EOS (or one sampled at a stop) is in
    /// the KV cache; `history` gains them all.
    pub(crate) fn decode(
        &self,
        seq: SeqId,
        logits: &mut Vec<f32>,
        history: &mut Vec<u32>,
        opts: &GenerateOptions,
        cancel: Option<&CancelToken>,
        mut on_token: impl FnMut(u32, &str) -> bool + Send,
    ) -> Result<Decoded> {
        self.decode_with(seq, logits, history, opts, cancel, |d| {
            let stop = loop {
                match d.step()? {
                    DecodeStep::Token { id, piece } => {
                        if !on_token(id, piece) {
                            break d.stop(StopReason::Cancelled);
                        }
                    }
                    DecodeStep::Stop(s) => break s,
                }
            };
            d.finish(stop)
        })?
    }

    /// Runs `f` with a [`Decoder`] that generates `seq`'s continuation token by
    /// token. `logits` must hold the logits of the sequence's last position (a
    /// [`Logits::Last`] forward) and `history` the ids so far (for the repetition
    /// penalty); both are updated as the decoder goes.
    ///
    /// The engine is held for the whole call (one lock per answer, none per
    /// token; other callers wait) and `f` runs on one of the engine's compute
    /// threads, so a step hands no work across threads. Hence `f` must be `Send`
    /// and must not call into this engine (from its own thread that panics
    /// rather than deadlocks).
    ///
    /// After warm-up (the first step or two, which may size per-thread scratch),
    /// [`Decoder::step`] does not allocate: see there.
    pub fn decode_with<R: Send>(
        &self,
        seq: SeqId,
        logits: &mut Vec<f32>,
        history: &mut Vec<u32>,
        opts: &GenerateOptions,
        cancel: Option<&CancelToken>,
        f: impl FnOnce(&mut Decoder<'_>) -> R + Send,
    ) -> Result<R> {
        opts.sampling.validate().map_err(Error::Config)?;
        let vocab = self.config.vocab_size;
        if logits.len() != vocab {
            return Err(Error::Other(format!(
                "decoding starts from one row of {vocab} logits (a Logits::Last forward), \
                 got {} values",
                logits.len()
            )));
        }
        let mut guard = self.lock();
        let exec = &mut *guard;
        let held = exec.blocks.len(seq)?;
        // Everything a step appends to is sized here, for the longest answer
        // the context leaves room for.
        let most = opts
            .max_tokens
            .min(self.context_length().saturating_sub(held) + 1);
        history.reserve(most);
        let mut sampler = Sampler::new(opts.sampling.clone());
        sampler.reserve(vocab);
        let mut decoder = Decoder {
            engine: self,
            exec,
            seq,
            logits,
            history,
            opts,
            cancel,
            sampler,
            tokens: Vec::with_capacity(most),
            text: TextDecoder::new(&self.tokenizer),
            text_tokens: 0,
            pending: None,
            fed: 0,
            stop: None,
            failed: false,
            start: Instant::now(),
        };
        Ok(self.pool.install(|| {
            let _inside = Inside::enter(self);
            f(&mut decoder)
        }))
    }
}

thread_local! {
    /// The engine whose decode loop this thread is running (its address), so a
    /// callback calling back into it fails loudly instead of deadlocking.
    static DECODING: Cell<usize> = const { Cell::new(0) };
}

/// Marks this thread as inside an engine's decode loop until dropped.
struct Inside(usize);

impl Inside {
    fn enter(engine: &Engine) -> Self {
        Inside(DECODING.replace(engine as *const Engine as usize))
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        DECODING.set(self.0);
    }
}

/// What one [`Decoder::step`] produced.
#[derive(Debug, PartialEq, Eq)]
pub enum DecodeStep<'a> {
    /// a new token and the text it completes (possibly empty: part of a character)
    Token { id: u32, piece: &'a str },
    /// generation is over (a final EOS is in [`Decoder::tokens`] but not fed)
    Stop(StopReason),
}

/// One sequence's generation, step by step: made by [`Engine::decode_with`],
/// used by [`Engine::generate`] and [`crate::Session::ask`] for every token.
pub struct Decoder<'a> {
    engine: &'a Engine,
    exec: &'a mut Exec,
    seq: SeqId,
    logits: &'a mut Vec<f32>,
    history: &'a mut Vec<u32>,
    opts: &'a GenerateOptions,
    cancel: Option<&'a CancelToken>,
    sampler: Sampler,
    tokens: Vec<u32>,
    text: TextDecoder,
    /// how many of `tokens` went through `text`
    text_tokens: usize,
    /// the latest token, fed to the model at the start of the next step
    pending: Option<u32>,
    fed: usize,
    stop: Option<StopReason>,
    failed: bool,
    start: Instant,
}

impl Decoder<'_> {
    /// One decode step: feeds the previous token through the model (KV cache
    /// write and logits of its position), checks the stop conditions (cancel,
    /// deadline, `max_tokens`, context end), samples the next token from the
    /// logits (greedy, or temperature / top-k / top-p / min-p / repetition
    /// penalty), stops at EOS, and decodes the token's text. The first step
    /// samples from the logits the decoder was given.
    ///
    /// **A step does not allocate** once warmed up (the first step or two may
    /// size per-thread scratch): activation and KV buffers, block tables,
    /// token lists, sampling scratch and text buffers are all sized in advance
    /// (the zero-allocation test, `tests/tests/zero_alloc_decode.rs`, counts
    /// every allocation on every thread). The exception is a tokenizer whose
    /// decoder is not byte-level (`mipha-convert` always writes a byte-level
    /// one): its text goes through `tokenizers`, which allocates. A step takes no lock either: the engine is
    /// held by [`Engine::decode_with`] for the whole answer.
    ///
    /// After `Stop`, further steps return the same stop. After an error the
    /// decoder is done: further steps fail.
    pub fn step(&mut self) -> Result<DecodeStep<'_>> {
        if self.failed {
            return Err(Error::Other("this decoder failed earlier".into()));
        }
        if let Some(s) = self.stop {
            return Ok(DecodeStep::Stop(s));
        }
        if let Some(prev) = self.pending.take() {
            if let Some(s) = self.stopped() {
                return Ok(DecodeStep::Stop(self.stop(s)));
            }
            let held = self.exec.blocks.len(self.seq)?;
            if held + 1 >= self.engine.context_length() {
                return Ok(DecodeStep::Stop(self.stop(StopReason::ContextFull)));
            }
            let fed = self.engine.forward_in(
                self.exec,
                self.seq,
                &[Input::Token(prev)],
                Logits::Last,
                self.logits,
                None,
            );
            if let Err(e) = fed {
                self.failed = true;
                return Err(e);
            }
            self.fed += 1;
        }
        if let Some(s) = self.stopped() {
            return Ok(DecodeStep::Stop(self.stop(s)));
        }
        let next = self.sampler.sample(self.logits, self.history);
        self.tokens.push(next);
        self.history.push(next);
        if next == self.engine.tokenizer.eos_token_id() && !self.opts.ignore_eos {
            return Ok(DecodeStep::Stop(self.stop(StopReason::Eos)));
        }
        self.pending = Some(next);
        self.text_tokens += 1;
        match self.text.push(&self.engine.tokenizer, next) {
            Ok(piece) => Ok(DecodeStep::Token { id: next, piece }),
            Err(e) => {
                self.failed = true;
                Err(e)
            }
        }
    }

    /// Ends the generation here (e.g. the consumer went away): the latest token
    /// is not fed. Returns `reason`, or the stop already reached.
    pub fn stop(&mut self, reason: StopReason) -> StopReason {
        self.pending = None;
        *self.stop.get_or_insert(reason)
    }

    fn stopped(&self) -> Option<StopReason> {
        if self.cancel.is_some_and(|c| c.is_cancelled()) {
            Some(StopReason::Cancelled)
        } else if self.opts.deadline.is_some_and(|d| Instant::now() >= d) {
            Some(StopReason::Deadline)
        } else if self.tokens.len() >= self.opts.max_tokens {
            Some(StopReason::MaxTokens)
        } else {
            None
        }
    }

    /// The tokens generated so far (a final EOS included).
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// How many of [`Decoder::tokens`] are in the KV cache.
    pub fn fed(&self) -> usize {
        self.fed
    }

    /// The logits the latest token was sampled from (after the repetition penalty).
    pub fn logits(&self) -> &[f32] {
        self.logits
    }

    /// The text of the tokens so far, as the steps' pieces concatenated
    /// (allocates; not part of a step).
    pub fn text(&self) -> Result<String> {
        let mut d = TextDecoder::new(&self.engine.tokenizer);
        let mut text = String::new();
        for &id in &self.tokens[..self.text_tokens] {
            text.push_str(d.push(&self.engine.tokenizer, id)?);
        }
        Ok(text)
    }

    fn finish(&mut self, stop: StopReason) -> Result<Decoded> {
        Ok(Decoded {
            text: self.text()?,
            tokens: std::mem::take(&mut self.tokens),
            stop,
            fed: self.fed,
            elapsed: self.start.elapsed(),
        })
    }
}

/// What a decode loop produced.
pub(crate) struct Decoded {
    pub tokens: Vec<u32>,
    pub text: String,
    pub stop: StopReason,
    /// how many of `tokens` went into the KV cache (all but the last)
    pub fed: usize,
    pub elapsed: Duration,
}

/// Stops a generation from another thread (e.g. Ctrl-C in a chat, a client
/// that went away). Cheap to clone; all clones share one flag.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
    /// Re-arms the token for the next generation.
    pub fn reset(&self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

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

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// keep going past `<|endoftext|>`
    pub ignore_eos: bool,
    /// stop (with [`StopReason::Deadline`]) once this instant has passed
    pub deadline: Option<Instant>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 256,
            sampling: SamplingParams::default(),
            ignore_eos: false,
            deadline: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// the model wrote `<|endoftext|>`
    Eos,
    MaxTokens,
    /// the sequence filled the model's context
    ContextFull,
    /// the caller stopped it
    Cancelled,
    /// the options' deadline passed
    Deadline,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Eos => "eos",
            StopReason::MaxTokens => "max_tokens",
            StopReason::ContextFull => "context_full",
            StopReason::Cancelled => "cancelled",
            StopReason::Deadline => "deadline",
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Timings {
    pub prefill: Duration,
    pub prefill_tokens: usize,
    /// from the first sampled token to the end
    pub decode: Duration,
}

#[derive(Clone, Debug)]
pub struct Generation {
    pub prompt_tokens: Vec<u32>,
    /// generated ids, including a final `<|endoftext|>` when that stopped it
    pub tokens: Vec<u32>,
    pub text: String,
    pub stop_reason: StopReason,
    pub timings: Timings,
}
