//! `mipha-bench`: load time, prefill and decode throughput of a `.mqf` model,
//! each as median (min–max) over repetitions, as a table or JSON lines.
//!
//! Without `--model` it synthesizes the full-size Mipha-3B (random weights in
//! the real shapes) once per quant type and caches it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use mipha_models::{Engine, EngineOptions, Logits};
use mipha_runtime::{Input, QuantType};

#[derive(Parser)]
#[command(
    name = "mipha-bench",
    about = "Measure a Mipha model: load, prefill, decode"
)]
struct Args {
    /// A `.mqf` file; default: a synthesized full-size model per --quant.
    #[arg(long)]
    model: Option<PathBuf>,
    /// config.json of the model to synthesize.
    #[arg(long, default_value = "assets/mipha-3b/config.json")]
    config: PathBuf,
    /// Quant types of the synthesized language model (comma separated).
    #[arg(long, default_value = "q4_0", value_delimiter = ',')]
    quant: Vec<String>,
    /// Where synthesized models are cached.
    #[arg(long, default_value = "target/bench-models")]
    cache_dir: PathBuf,
    /// Thread counts to measure (comma separated; 0 = one per core).
    #[arg(long, default_value = "0", value_delimiter = ',')]
    threads: Vec<usize>,
    /// Prompt lengths for prefill (comma separated).
    #[arg(long, default_value = "64,512", value_delimiter = ',')]
    prompt: Vec<usize>,
    /// Tokens decoded after a short prompt.
    #[arg(long, default_value_t = 32)]
    gen: usize,
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// One JSON object per line and figure.
    #[arg(long)]
    json: bool,
}

struct Figure {
    name: &'static str,
    quant: String,
    threads: usize,
    tokens: Option<usize>,
    samples: Vec<f64>,
    unit: &'static str,
}

impl Figure {
    fn stats(&self) -> (f64, f64, f64) {
        let mut s = self.samples.clone();
        s.sort_by(|a, b| a.total_cmp(b));
        (s[s.len() / 2], s[0], s[s.len() - 1])
    }
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn model_for(args: &Args, quant: &str) -> Result<PathBuf, Box<dyn std::error::Error>> {
    if let Some(m) = &args.model {
        return Ok(m.clone());
    }
    let q = QuantType::from_name(quant).ok_or_else(|| format!("unknown quant type `{quant}`"))?;
    std::fs::create_dir_all(&args.cache_dir)?;
    let path = args.cache_dir.join(format!("mipha-3b-synth-{quant}.mqf"));
    if !path.exists() {
        eprintln!("synthesizing {} ...", path.display());
        let mut opts = mipha_convert::SynthOptions::new(&args.config, &path, q);
        opts.progress = true;
        mipha_convert::synth(&opts)?;
    }
    Ok(path)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let reps = args.reps.max(1);
    let mut figures = Vec::new();
    let quants = if args.model.is_some() {
        vec!["file".to_string()]
    } else {
        args.quant.clone()
    };
    for quant in &quants {
        let path = model_for(&args, quant)?;
        for &threads in &args.threads {
            let max_prompt = args.prompt.iter().copied().max().unwrap_or(1).max(1);
            let opts = EngineOptions {
                threads,
                max_batch_tokens: max_prompt.min(512),
                ..EngineOptions::default()
            };
            let mut load = Vec::new();
            let mut engine = None;
            for _ in 0..reps {
                let t = Instant::now();
                engine = Some(Engine::load(&path, opts.clone())?);
                load.push(ms(t.elapsed()));
            }
            let engine = engine.expect("reps >= 1");
            let threads_used = engine
                .backend_name()
                .split(['(', ' '])
                .filter_map(|w| w.parse().ok())
                .next()
                .unwrap_or(threads);
            let fig = |name, tokens, samples, unit| Figure {
                name,
                quant: quant.clone(),
                threads: threads_used,
                tokens,
                samples,
                unit,
            };
            figures.push(fig("load_ms", None, load, "ms"));
            let mut logits = Vec::new();
            for &n in &args.prompt {
                let inputs: Vec<Input> = (0..n)
                    .map(|i| Input::Token(100 + (i % 5000) as u32))
                    .collect();
                let mut samples = Vec::new();
                for _ in 0..reps {
                    let seq = engine.new_sequence();
                    let t = Instant::now();
                    engine.forward(seq, &inputs, Logits::Last, &mut logits, None)?;
                    samples.push(n as f64 / t.elapsed().as_secs_f64());
                    engine.release_sequence(seq)?;
                }
                figures.push(fig("prefill_tok_s", Some(n), samples, "tok/s"));
            }
            let mut samples = Vec::new();
            for _ in 0..reps {
                let seq = engine.new_sequence();
                let prompt: Vec<Input> = (0..16).map(|i| Input::Token(100 + i)).collect();
                engine.forward(seq, &prompt, Logits::Last, &mut logits, None)?;
                let t = Instant::now();
                for i in 0..args.gen {
                    let tok = Input::Token(200 + (i % 1000) as u32);
                    engine.forward(seq, &[tok], Logits::Last, &mut logits, None)?;
                }
                samples.push(args.gen as f64 / t.elapsed().as_secs_f64());
                engine.release_sequence(seq)?;
            }
            figures.push(fig("decode_tok_s", Some(16), samples, "tok/s"));
        }
    }
    if let Some(rss) = peak_rss_mb() {
        figures.push(Figure {
            name: "peak_rss_mb",
            quant: quants.join(","),
            threads: 0,
            tokens: None,
            samples: vec![rss],
            unit: "MB",
        });
    }
    for f in &figures {
        let (med, min, max) = f.stats();
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "figure": f.name, "quant": f.quant, "threads": f.threads,
                    "tokens": f.tokens, "median": med, "min": min, "max": max,
                })
            );
        }
    }
    if !args.json {
        println!(
            "{:<15} {:>6} {:>7} {:>7} {:>28}",
            "figure", "quant", "threads", "tokens", "median (min-max)"
        );
        for f in &figures {
            let (med, min, max) = f.stats();
            let tokens = f.tokens.map(|t| t.to_string()).unwrap_or_default();
            println!(
                "{:<15} {:>6} {:>7} {:>7} {:>14.2} ({:.2}-{:.2}) {}",
                f.name, f.quant, f.threads, tokens, med, min, max, f.unit
            );
        }
    }
    Ok(())
}

/// Peak resident set of this process (VmHWM), where /proc offers it.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
