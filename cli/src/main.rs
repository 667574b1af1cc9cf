//! `mipha-cli`: run Mipha models from a terminal or a script.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

mod chat;
mod hub;
mod serve;
use std::sync::Arc;

use mipha_models::{
    DeviceChoice, Engine, EngineOptions, GenerateOptions, ImageLimits, KvCacheSize, KvDtype,
    Logits, PromptId, SamplingParams, Segment, Session, StopReason, Turn, TurnStats,
};
use mipha_runtime::Input;

#[derive(Parser)]
#[command(
    name = "mipha-cli",
    version,
    about = "Run Mipha multimodal small language models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One-shot generation: template the prompt, generate, print.
    Run(RunArgs),
    /// Interactive chat in the terminal, with pictures.
    Chat(ChatArgs),
    /// Write the logits of every prompt position (conformance and debugging).
    Logits(LogitsArgs),
    /// Download a model from the Hugging Face hub and convert it to a cached .mqf; prints its path.
    Pull(hub::PullArgs),
    /// An OpenAI-compatible HTTP server (chat completions with pictures, streaming, metrics).
    Serve(serve::ServeArgs),
}

#[derive(Args)]
pub(crate) struct ModelArgs {
    /// A `.mqf` file, a Hugging Face checkpoint folder (converted once into the
    /// cache), or a hub repository such as `zhumj34/Mipha-3B` (pulled and
    /// converted on first use: Q4_0 language model, Q8_0 vision tower).
    #[arg(long, short)]
    pub(crate) model: String,
    /// CPU threads (default: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Where the model runs: cpu, cuda, cuda:N, or auto (the GPU when one is
    /// usable, else the CPU). CUDA needs a build with `--features cuda`.
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    device: DeviceChoice,
    /// Memory for the KV cache, in MiB, shared by every conversation and the
    /// prefix cache (a sequence's context is capped at what it holds).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1 << 40))]
    kv_cache_mb: u64,
    /// The KV cache's element type: f16 (half the memory and traffic) or f32
    /// (exact against an f32 reference). Default: f16, f32 for `logits`.
    #[arg(long, value_parser = parse_kv_dtype)]
    kv_dtype: Option<KvDtype>,
    /// Check every tensor's checksum while loading (reads the whole file once).
    #[arg(long)]
    verify: bool,
    /// Refuse to load when weights, activations, the KV cache and thread stacks
    /// need more memory than this: a size such as 8G, 512M or 4096 (MiB).
    /// Default: the memory available at load.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_memory: Option<u64>,
    /// Largest picture accepted, in pixels (width x height), checked from its
    /// header before decoding.
    #[arg(long, default_value_t = ImageLimits::default().max_pixels,
          value_parser = clap::value_parser!(u64).range(1..=1 << 32))]
    max_image_pixels: u64,
    /// Largest picture file accepted, in MiB.
    #[arg(long, default_value_t = ImageLimits::default().max_bytes >> 20,
          value_parser = clap::value_parser!(u64).range(1..=4096))]
    max_image_mb: u64,
    /// Most pictures in one conversation or request.
    #[arg(long, default_value_t = ImageLimits::default().max_count as u64,
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    max_images: u64,
}

/// `8G`, `512M`, `64K` or a plain number of MiB, to bytes.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => {
                    return Err(format!(
                        "`{s}`: unknown size suffix `{c}` (use K, M, G or T)"
                    ))
                }
            };
            (&t[..i], m)
        }
        _ => (t, 1 << 20),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 8G, 512M, or MiB as a number)"))?;
    match n.checked_mul(mult) {
        Some(0) => Err("the size must be positive".into()),
        Some(b) => Ok(b),
        None => Err(format!("`{s}` is too large")),
    }
}

fn parse_device(s: &str) -> Result<DeviceChoice, String> {
    s.parse()
}

fn parse_kv_dtype(s: &str) -> Result<KvDtype, String> {
    match s.to_ascii_lowercase().as_str() {
        "f16" => Ok(KvDtype::F16),
        "f32" => Ok(KvDtype::F32),
        _ => Err(format!("unknown KV cache type `{s}` (expected f16 or f32)")),
    }
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The user's message (wrapped in the model's chat template).
    #[arg(long, short)]
    prompt: String,
    /// Pictures to ask about (repeatable; each becomes an image placeholder).
    #[arg(long = "image", value_name = "PATH")]
    images: Vec<PathBuf>,
    #[command(flatten)]
    gen: GenArgs,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
}

/// Generation settings shared by `run` and `chat`.
#[derive(Args, Clone)]
struct GenArgs {
    #[arg(long, short = 'n', default_value_t = 256)]
    max_tokens: usize,
    /// 0 = greedy decoding (the default, as the authors evaluate).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// 0 = off
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// 1 = off
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 = off
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// 0 = off; subtracted from the logits of tokens among the last
    /// `--repeat-last-n` (-2 to 2)
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    presence_penalty: f32,
    /// 0 = off; subtracted once per occurrence among the last
    /// `--repeat-last-n` (-2 to 2)
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    frequency_penalty: f32,
    /// 1 = off
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Tokens the repeat penalty looks back on.
    #[arg(long, default_value_t = 64)]
    repeat_last_n: usize,
    /// Sampling seed (default: random).
    #[arg(long)]
    seed: Option<u64>,
    /// Keep generating past `<|endoftext|>`.
    #[arg(long)]
    ignore_eos: bool,
    /// Recognise special tokens such as `<|endoftext|>` typed in the prompt
    /// (transformers' default, for conformance runs). Off, prompt text is
    /// plain text and only the chat template inserts control tokens.
    #[arg(long)]
    parse_special: bool,
}

impl GenArgs {
    fn options(&self) -> Result<(GenerateOptions, u64), String> {
        let seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
        let sampling = SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed,
        };
        sampling.validate()?;
        let opts = GenerateOptions {
            max_tokens: self.max_tokens,
            sampling,
            ignore_eos: self.ignore_eos,
            deadline: None,
            parse_special: self.parse_special,
        };
        Ok((opts, seed))
    }
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A picture for the first question (repeatable).
    #[arg(long = "image", value_name = "PATH")]
    images: Vec<PathBuf>,
    #[command(flatten)]
    gen: GenArgs,
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, short)]
    prompt: String,
    /// Tokenize the prompt as is, without the chat template (with images, mark
    /// where each goes with `<image>`).
    #[arg(long)]
    raw: bool,
    /// Pictures (repeatable), spliced in at their placeholders.
    #[arg(long = "image", value_name = "PATH")]
    images: Vec<PathBuf>,
    /// Output `.safetensors` with `input_ids` (i64 [n], -200 at each image) and
    /// `logits` (f32 [T, vocab], every position of the expanded sequence).
    #[arg(long, short)]
    out: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => run(a),
        Command::Chat(a) => chat_cmd(a),
        Command::Logits(a) => logits(a),
        Command::Pull(a) => hub::pull_command(a),
        Command::Serve(a) => serve::serve(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

pub(crate) type CliResult = Result<(), Box<dyn std::error::Error>>;

/// A progress bar on stderr for the slow part of loading (repacking the weights
/// for the CPU, uploading them to a GPU); invisible when stderr is not a terminal.
fn load_progress() -> mipha_models::LoadProgress {
    use std::sync::Mutex;
    let bar: Mutex<Option<(String, indicatif::ProgressBar)>> = Mutex::new(None);
    mipha_models::LoadProgress::new(move |stage, done, total| {
        let mut bar = bar.lock().unwrap_or_else(|e| e.into_inner());
        if bar
            .as_ref()
            .is_none_or(|(s, b)| s != stage || b.length() != Some(total))
        {
            let b = indicatif::ProgressBar::new(total).with_style(
                indicatif::ProgressStyle::with_template("{msg} {bar:30} {bytes}/{total_bytes}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b.set_message(stage.to_string());
            *bar = Some((stage.to_string(), b));
        }
        if let Some((_, b)) = bar.as_ref() {
            b.set_position(done);
            if done >= total {
                b.finish_and_clear();
            }
        }
    })
}

fn load(
    m: &ModelArgs,
    max_outputs: usize,
    max_batch_tokens: usize,
    kv_dtype: KvDtype,
) -> Result<Engine, String> {
    load_with(m, max_outputs, max_batch_tokens, kv_dtype, |_| {})
}

/// [`load`], with `tune` adjusting the engine options last.
pub(crate) fn load_with(
    m: &ModelArgs,
    max_outputs: usize,
    max_batch_tokens: usize,
    kv_dtype: KvDtype,
    tune: impl FnOnce(&mut EngineOptions),
) -> Result<Engine, String> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if m.threads > 4 * threads.max(64) {
        return Err(format!(
            "--threads {} is far more than this machine's {threads} cores",
            m.threads
        ));
    }
    let mut opts = EngineOptions {
        threads: m.threads,
        device: m.device,
        max_outputs,
        max_batch_tokens,
        kv_cache: KvCacheSize::Mib(
            usize::try_from(m.kv_cache_mb).map_err(|_| "--kv-cache-mb is too large")?,
        ),
        kv_dtype: m.kv_dtype.unwrap_or(kv_dtype),
        verify: m.verify,
        max_memory: m.max_memory,
        image_limits: ImageLimits {
            max_pixels: m.max_image_pixels,
            max_bytes: m.max_image_mb << 20,
            max_count: m.max_images as usize,
        },
        progress: Some(load_progress()),
        ..EngineOptions::default()
    };
    tune(&mut opts);
    let path = hub::HubOptions::from_env()
        .and_then(|o| hub::resolve_model(&m.model, &o))
        .map_err(|e| e.to_string())?;
    Engine::load(&path, opts).map_err(|e| e.to_string())
}

fn run(a: RunArgs) -> CliResult {
    let (opts, seed) = a.gen.options()?;
    let engine = Arc::new(load(&a.model, 1, 512, KvDtype::F16)?);
    let mut session = Session::new(engine.clone());
    for path in &a.images {
        session.attach_image(path)?;
    }
    let stdout = std::io::stdout();
    let reply = session.ask(&a.prompt, &opts, None, |_, piece| {
        if !a.json {
            let mut out = stdout.lock();
            // A closed pipe (e.g. `| head`) ends the generation quietly.
            return out
                .write_all(piece.as_bytes())
                .and_then(|_| out.flush())
                .is_ok();
        }
        true
    })?;
    let st = &reply.stats;
    if a.json {
        let prompt_ids = engine.tokenizer().to_raw_ids(&reply.prompt);
        let obj = serde_json::json!({
            "prompt_tokens": prompt_ids.len(),
            "prompt_ids": prompt_ids,
            "tokens": reply.tokens,
            "text": reply.text,
            "stop_reason": reply.stop_reason.as_str(),
            "seed": seed,
            "timings": {
                "load_ms": ms(engine.load_time()),
                "image_preprocess_ms": ms(st.image_preprocess),
                "image_encode_ms": ms(st.image_encode),
                "images": a.images.len(),
                "prefill_ms": ms(st.prefill),
                "prefill_positions": st.prefill_positions,
                "prefill_tok_s": st.prefill_tok_s(),
                "ttft_ms": ms(st.time_to_first_token),
                "decode_ms": ms(st.decode),
                "decode_tokens": st.decode_tokens,
                "decode_tok_s": st.decode_tok_s(),
            },
            "backend": engine.backend_name(),
        });
        println!("{obj}");
    } else {
        println!();
        eprintln!("[{}]", stats_line(st, reply.stop_reason));
    }
    Ok(())
}

fn chat_cmd(a: ChatArgs) -> CliResult {
    let (gen, _) = a.gen.options()?;
    let engine = Arc::new(load(&a.model, 1, 512, KvDtype::F16)?);
    chat::chat(
        engine,
        chat::ChatOptions {
            images: a.images,
            gen,
        },
    )
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One line of per-stage figures, for `run` and `/stats`.
fn stats_line(st: &TurnStats, stop: StopReason) -> String {
    let mut parts = Vec::new();
    if st.images_encoded + st.images_cached > 0 {
        parts.push(format!(
            "{} image(s): preprocess {:.0} ms, encode {:.0} ms ({} cached)",
            st.images_encoded + st.images_cached,
            ms(st.image_preprocess),
            ms(st.image_encode),
            st.images_cached
        ));
    }
    parts.push(format!(
        "prefill {} positions in {:.0} ms ({:.1} tok/s, {} reused)",
        st.prefill_positions,
        ms(st.prefill),
        st.prefill_tok_s(),
        st.reused_positions
    ));
    parts.push(format!("first token {:.0} ms", ms(st.time_to_first_token)));
    parts.push(format!(
        "{} tokens at {:.1} tok/s; stop: {}",
        st.decode_tokens,
        st.decode_tok_s(),
        stop.as_str()
    ));
    parts.join("; ")
}

fn logits(a: LogitsArgs) -> CliResult {
    let engine = load(&a.model, 64, 64, KvDtype::F32)?;
    let segments = if a.raw {
        raw_segments(
            &a.prompt,
            a.images.len(),
            &engine.template().image_placeholder,
        )?
    } else {
        engine.template().render(&[Turn {
            user: a.prompt.clone(),
            images: a.images.len(),
            assistant: None,
        }])
    };
    // A raw prompt is a conformance input: its special tokens are meant.
    let prompt = engine.tokenizer().encode_segments_with(&segments, a.raw)?;
    if prompt.is_empty() {
        return Err("the prompt tokenizes to nothing".into());
    }
    engine.check_image_count(a.images.len())?;
    let mut embeds = Vec::new();
    for path in &a.images {
        let cfg = engine
            .image_config()
            .ok_or("this model file has no vision tower")?;
        let opts = mipha_models::image::DecodeOptions {
            limits: engine.options().image_limits.decode_limits(),
            ..Default::default()
        };
        let decoded = mipha_models::image::decode_file(path, &opts)?;
        let img = mipha_models::image::preprocess(&decoded.image, cfg);
        embeds.push(engine.encode_image(&img.pixels)?.to_host()?);
    }
    let hidden = engine.config().hidden_size;
    let mut inputs = Vec::new();
    for id in &prompt {
        match id {
            PromptId::Token(t) => inputs.push(Input::Token(*t)),
            PromptId::Image(i) => {
                inputs.extend(embeds[*i].chunks_exact(hidden).map(Input::Embedding))
            }
        }
    }
    let seq = engine.new_sequence();
    let mut logits = Vec::new();
    let result = engine.forward(seq, &inputs, Logits::All, &mut logits, None);
    engine.release_sequence(seq)?;
    result?;
    let ids64 = engine.tokenizer().to_raw_ids(&prompt);
    let positions = inputs.len();
    let vocab = engine.config().vocab_size;
    write_safetensors(
        &a.out,
        &[
            (
                "input_ids",
                safetensors::Dtype::I64,
                vec![ids64.len()],
                bytemuck_i64(&ids64),
            ),
            (
                "logits",
                safetensors::Dtype::F32,
                vec![positions, vocab],
                bytemuck_f32(&logits),
            ),
        ],
    )?;
    eprintln!(
        "wrote {} positions x {} logits to {}",
        positions,
        vocab,
        a.out.display()
    );
    Ok(())
}

/// A raw prompt split at its image placeholders, one per attached image.
fn raw_segments(prompt: &str, images: usize, placeholder: &str) -> Result<Vec<Segment>, String> {
    let mut segments = Vec::new();
    if images == 0 {
        segments.push(Segment::Text(prompt.to_string()));
        return Ok(segments);
    }
    let pieces: Vec<&str> = prompt.split(placeholder).collect();
    if pieces.len() - 1 != images {
        return Err(format!(
            "the raw prompt has {} `{placeholder}` placeholders for {images} images",
            pieces.len() - 1
        ));
    }
    for (i, piece) in pieces.iter().enumerate() {
        if i > 0 {
            segments.push(Segment::Image(i - 1));
        }
        if !piece.is_empty() {
            segments.push(Segment::Text(piece.to_string()));
        }
    }
    Ok(segments)
}

fn bytemuck_i64(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bytemuck_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes next to `path` and renames, so a failed run leaves no partial file.
fn write_safetensors(
    path: &Path,
    tensors: &[(&str, safetensors::Dtype, Vec<usize>, Vec<u8>)],
) -> CliResult {
    let views = tensors
        .iter()
        .map(|(name, dtype, shape, data)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), data)
                .map(|v| (name.to_string(), v))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bytes = safetensors::serialize(views, None)?;
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|s| s.to_str()).unwrap_or("out"),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("{}: {e}", path.display())
    })?;
    Ok(())
}
