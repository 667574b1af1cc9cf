//! What callers choose: how an engine is loaded and scheduled
//! ([`EngineOptions`]), and how one answer is generated ([`GenerateOptions`]).

use std::time::{Duration, Instant};

use mipha_runtime::{DeviceChoice, KvDtype, LoadProgress};

use crate::limits::{ImageLimits, ModelLimits};
use crate::sampling::SamplingParams;

/// How much memory the KV cache gets. Every sequence, running or parked,
/// and the prefix cache share it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvCacheSize {
    /// a byte budget in MiB (`--kv-cache-mb`)
    Mib(usize),
    /// room for this many positions in all, whatever they cost (as
    /// llama.cpp's `-c`)
    Positions(usize),
}

#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// CPU threads; 0 = one per core
    pub threads: usize,
    /// most rows one forward step carries: decode rows of running sequences
    /// plus chunks of prompts (longer prompts run over several steps)
    pub max_batch_tokens: usize,
    /// most rows of one step whose logits a [`crate::Engine::forward`] call with
    /// [`crate::Logits::All`] gets back (conformance runs); generation needs one per
    /// running sequence and is sized by `max_sequences`
    pub max_outputs: usize,
    /// positions per KV block (the unit of paging and of prefix caching)
    pub kv_block_size: usize,
    /// most sequences decoded together (continuous batching; llama.cpp's `-np`,
    /// vLLM's `max_num_seqs`); later requests wait in the queue
    pub max_sequences: usize,
    /// most requests waiting to start; more are refused as busy
    pub max_queue: usize,
    /// the KV cache's size
    pub kv_cache: KvCacheSize,
    /// the KV cache's element type: f16 (default) halves memory and long-context
    /// decode traffic; f32 is exact against an f32 oracle (conformance tests)
    pub kv_dtype: KvDtype,
    /// while sequences are decoding, prompt chunks are sized so that one step
    /// (decode rows + chunk + a slice of a picture's encoding) takes about this
    /// long: the inter-token gap running streams see while others start
    pub step_target: Duration,
    /// reuse the KV of identical prompt prefixes across requests (content-
    /// addressed blocks)
    pub prefix_cache: bool,
    /// check every tensor's checksum at load (reads the whole file once)
    pub verify: bool,
    /// refuse to load when weights, activation buffers, the KV cache and thread
    /// stacks together need more bytes than this; `None`: the memory available
    /// at load (`MemAvailable`, or the container's cgroup limit when lower)
    pub max_memory: Option<u64>,
    /// bounds every hyper-parameter of the file is checked against
    pub limits: ModelLimits,
    /// bounds on callers' pictures (pixels, file bytes, pictures per request)
    pub image_limits: ImageLimits,
    /// image embeddings kept for reuse (an LRU keyed by pixel content)
    pub image_cache: usize,
    /// Q8_0/Q4_0 weights multiply int8-quantized activations (per 32-block, as
    /// llama.cpp does) through integer SIMD kernels on weights repacked at load,
    /// and BF16 weights BF16-rounded activations with `vdpbf16ps` where the CPU
    /// has it (as llama.cpp does; `MIPHA_BF16_DOT=0|1` overrides). Off: f32
    /// activations against every weight type (Q8_0/Q4_0 read in place, several
    /// times slower; the math of a dequantized-weights oracle, for conformance).
    pub int8_activations: bool,
    /// BF16 weights on the CPU: `Some(true)` rounds activations to BF16 and
    /// runs the BF16 dot (`vdpbf16ps`, or two FMAs per pair on CPUs without
    /// it), `Some(false)` multiplies f32 activations exactly; `None`: the BF16
    /// dot where the CPU has `vdpbf16ps` and `int8_activations` is on
    /// (`MIPHA_BF16_DOT=0|1` overrides the CPU's default). F16 weights always
    /// take the exact path.
    pub bf16_dot: Option<bool>,
    /// where the plans run: the CPU (default), a CUDA GPU, or `auto` (the GPU when
    /// one is usable, else the CPU; [`crate::Engine::device`] says which)
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
            max_sequences: 16,
            max_queue: 256,
            kv_cache: KvCacheSize::Mib(1024),
            kv_dtype: KvDtype::F16,
            step_target: Duration::from_millis(250),
            prefix_cache: true,
            verify: false,
            max_memory: None,
            limits: ModelLimits::default(),
            image_limits: ImageLimits::default(),
            image_cache: 8,
            int8_activations: true,
            bf16_dot: None,
            device: DeviceChoice::Cpu,
            progress: None,
        }
    }
}

/// How one answer is generated. Each request keeps its own options and seed:
/// the same request gives the same tokens alone or batched with others.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// keep going past `<|endoftext|>`
    pub ignore_eos: bool,
    /// stop (with [`StopReason::Deadline`]) once this instant has passed, queued
    /// or running
    pub deadline: Option<Instant>,
    /// recognise special tokens (`<|endoftext|>`) spelled in the user's text,
    /// as transformers does by default; off (the default), users' text is
    /// plain text and only the chat template inserts control tokens
    pub parse_special: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 256,
            sampling: SamplingParams::default(),
            ignore_eos: false,
            deadline: None,
            parse_special: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// the model wrote `<|endoftext|>`
    Eos,
    MaxTokens,
    /// the sequence filled the model's context (or the whole KV cache)
    ContextFull,
    /// the caller stopped it (or went away)
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

/// Which positions of a forward call return logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    Last,
    All,
}
