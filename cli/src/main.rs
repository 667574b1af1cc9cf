//! `mipha-cli`: run Mipha models from a terminal or a script.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use mipha_models::{Engine, EngineOptions, GenerateOptions, Logits, SamplingParams};
use mipha_runtime::Input;

mod hub;

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
    /// Write the logits of every prompt position (conformance and debugging).
    Logits(LogitsArgs),
    /// Download a model from the Hugging Face hub and convert it to a cached .mqf; prints its path.
    Pull(hub::PullArgs),
}

#[derive(Args)]
struct ModelArgs {
    /// The `.mqf` model file.
    #[arg(long, short)]
    model: PathBuf,
    /// CPU threads (default: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The user's message (wrapped in the model's chat template).
    #[arg(long, short)]
    prompt: String,
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
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, short)]
    prompt: String,
    /// Tokenize the prompt as is, without the chat template.
    #[arg(long)]
    raw: bool,
    /// Output `.safetensors` with `input_ids` (i64 [T]) and `logits` (f32 [T, vocab]).
    #[arg(long, short)]
    out: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => run(a),
        Command::Logits(a) => logits(a),
        Command::Pull(a) => hub::pull_command(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

type CliResult = Result<(), Box<dyn std::error::Error>>;

fn load(m: &ModelArgs, max_outputs: usize, max_batch_tokens: usize) -> Result<Engine, String> {
    let opts = EngineOptions {
        threads: m.threads,
        max_outputs,
        max_batch_tokens,
        ..EngineOptions::default()
    };
    Engine::load(&m.model, opts).map_err(|e| e.to_string())
}

fn run(a: RunArgs) -> CliResult {
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    });
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repeat_penalty: a.repeat_penalty,
        repeat_last_n: a.repeat_last_n,
        seed,
    };
    sampling.validate()?;
    let engine = load(&a.model, 1, 512)?;
    let prompt = engine.chat_prompt(&a.prompt)?;
    let opts = GenerateOptions {
        max_tokens: a.max_tokens,
        sampling,
        ignore_eos: a.ignore_eos,
    };
    let stdout = std::io::stdout();
    let gen = engine.generate(&prompt, &opts, |_, piece| {
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
    let t = &gen.timings;
    let per_s = |n: usize, d: std::time::Duration| {
        if d.is_zero() {
            0.0
        } else {
            n as f64 / d.as_secs_f64()
        }
    };
    if a.json {
        let obj = serde_json::json!({
            "prompt_tokens": gen.prompt_tokens.len(),
            "prompt_ids": gen.prompt_tokens,
            "tokens": gen.tokens,
            "text": gen.text,
            "stop_reason": gen.stop_reason.as_str(),
            "seed": seed,
            "timings": {
                "load_ms": engine.load_time().as_secs_f64() * 1e3,
                "prefill_ms": t.prefill.as_secs_f64() * 1e3,
                "prefill_tokens": t.prefill_tokens,
                "prefill_tok_s": per_s(t.prefill_tokens, t.prefill),
                "decode_ms": t.decode.as_secs_f64() * 1e3,
                "decode_tokens": gen.tokens.len(),
                "decode_tok_s": per_s(gen.tokens.len().saturating_sub(1), t.decode),
            },
            "backend": engine.backend_name(),
        });
        println!("{obj}");
    } else {
        println!();
        eprintln!(
            "[{} prompt tokens, prefill {:.1} tok/s; {} tokens, decode {:.1} tok/s; stop: {}]",
            t.prefill_tokens,
            per_s(t.prefill_tokens, t.prefill),
            gen.tokens.len(),
            per_s(gen.tokens.len().saturating_sub(1), t.decode),
            gen.stop_reason.as_str()
        );
    }
    Ok(())
}

fn logits(a: LogitsArgs) -> CliResult {
    let engine = load(&a.model, 64, 64)?;
    let ids = if a.raw {
        engine.tokenizer().encode(&a.prompt)?
    } else {
        engine.chat_prompt(&a.prompt)?
    };
    if ids.is_empty() {
        return Err("the prompt tokenizes to nothing".into());
    }
    let seq = engine.new_sequence();
    let inputs: Vec<Input> = ids.iter().map(|&t| Input::Token(t)).collect();
    let mut logits = Vec::new();
    engine.forward(seq, &inputs, Logits::All, &mut logits, None)?;
    engine.release_sequence(seq)?;
    let vocab = engine.config().vocab_size;
    let ids64: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    write_safetensors(
        &a.out,
        &[
            (
                "input_ids",
                safetensors::Dtype::I64,
                vec![ids.len()],
                bytemuck_i64(&ids64),
            ),
            (
                "logits",
                safetensors::Dtype::F32,
                vec![ids.len(), vocab],
                bytemuck_f32(&logits),
            ),
        ],
    )?;
    eprintln!(
        "wrote {} positions x {} logits to {}",
        ids.len(),
        vocab,
        a.out.display()
    );
    Ok(())
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
