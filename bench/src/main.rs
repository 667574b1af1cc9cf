//! `mipha-bench`: the machine's bounds and a Mipha model's figures against them.
//!
//! First it probes the machine: sustained memory read bandwidth and peak f32 FMA
//! and int8 dot-product rates, per thread count. Then, per quant type and
//! thread count, in a child process of its own (so each peak RSS is its own):
//! load time, image preprocessing, SigLIP tower and projector, prefill at each
//! prompt length and for the image prompt, decode after a short and a long
//! context, time to first token for a picture and a question, several streams
//! at once (aggregate decode, inter-token gaps, time to first token under
//! load, a picture arriving while others decode), peak RSS. Every figure is a
//! median (min–max) over repetitions, or p50 and p99 of a distribution, and,
//! where it has one, a fraction of its bound: decode against bandwidth ÷ bytes
//! read per token, prefill and vision against operations ÷ peak rate. Output: a
//! table, or JSON lines with `--json`. See `bench/README.md`.
//!
//! Without `--model` it synthesizes the full-size Mipha-3B (random weights in
//! the real shapes) once per quant type and caches it.

mod cost;
mod probe;
mod streams;
mod worker;

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use clap::Parser;
use mipha_models::{EngineOptions, KvDtype};
use mipha_runtime::DeviceChoice;
use mipha_runtime::{MqfFile, QuantType};

use cost::{ModelCost, Peaks};
use worker::{Raw, Spec};

/// Every figure name, as written in the JSON lines.
pub const FIGURES: [&str; 17] = [
    "mem_read_gb_s",
    "f32_fma_gflop_s",
    "int8_dot_gop_s",
    "load_ms",
    "image_preprocess_ms",
    "vision_encode_ms",
    "projector_ms",
    "prefill_tok_s",
    "ttft_image_ms",
    "decode_tok_s",
    "batch_decode_tok_s",
    "itl_ms",
    "ttft_ms",
    "clients_tok_s",
    "image_itl_ms",
    "ttft_image_under_load_ms",
    "peak_rss_mb",
];
/// Figures whose samples are a distribution (every gap, every request) rather
/// than one value per repetition: their rows also give `p50` and `p99`.
pub const PERCENTILE_FIGURES: [&str; 3] = ["itl_ms", "ttft_ms", "image_itl_ms"];
pub const UNITS: [&str; 6] = ["ms", "tok/s", "MB", "GB/s", "GFLOP/s", "GOP/s"];

/// About 20 tokens, asked about the picture for the image figures.
const QUESTION: &str =
    "What is shown in this image? Describe the animal, its fur and the background in one sentence.";

#[derive(Parser)]
#[command(
    name = "mipha-bench",
    about = "Measure the machine's bounds and a Mipha model's figures against them"
)]
struct Args {
    /// A `.mqf` file; default: a synthesized full-size model per --quant.
    #[arg(long)]
    model: Option<PathBuf>,
    /// config.json of the model to synthesize.
    #[arg(long, default_value = "assets/mipha-3b/config.json")]
    config: PathBuf,
    /// Language-model quant types to synthesize [default: f16,q8_0,q4_0; --quick: q4_0].
    #[arg(long, value_delimiter = ',')]
    quant: Option<Vec<String>>,
    /// Quant type of the synthesized vision tower and projector [default: the --quant of each model, as `mipha-convert synth`].
    #[arg(long)]
    vision_quant: Option<String>,
    /// Where synthesized models are cached.
    #[arg(long, default_value = "target/bench-models")]
    cache_dir: PathBuf,
    /// Thread counts (comma separated; 0 = one per core).
    #[arg(long, default_value = "0", value_delimiter = ',')]
    threads: Vec<usize>,
    /// Repetitions of each figure [default: 3; --quick: 1].
    #[arg(long)]
    reps: Option<usize>,
    /// Text prompt lengths for prefill, 0 for none [default: 64,512; --quick: 64].
    #[arg(long, value_delimiter = ',')]
    prompt: Option<Vec<usize>>,
    /// Context lengths before decoding, 0 for none [default: 16,1024; --quick: 16].
    #[arg(long, value_delimiter = ',')]
    decode_ctx: Option<Vec<usize>>,
    /// Tokens decoded after each context, and by each stream or client request of
    /// the streams figures [default: 128; --quick: 16].
    #[arg(long)]
    gen: Option<usize>,
    /// Requests running at once in the batch-decode and closed-loop figures, 0
    /// for none [default: 1,2,4,8; --quick: 1,4].
    #[arg(long, value_delimiter = ',')]
    streams: Option<Vec<usize>>,
    /// `streams` of the picture-under-load figures: this many minus one text
    /// streams decode while a picture request comes in; 0 skips them.
    #[arg(long, default_value_t = 4)]
    image_streams: usize,
    /// The KV cache's element type, f16 or f32 [default: the engine's].
    #[arg(long, value_parser = parse_kv_dtype)]
    kv_dtype: Option<KvDtype>,
    /// The picture of the image figures (preprocessed to the model's size).
    #[arg(long, default_value = "assets/examples/chelsea.png")]
    image: PathBuf,
    /// The question asked about the picture.
    #[arg(long, default_value = QUESTION)]
    question: String,
    /// Skip the image figures.
    #[arg(long)]
    no_image: bool,
    /// Skip the image-prompt prefill and time to first token (vision still runs)
    /// [default with --quick].
    #[arg(long)]
    no_ttft: bool,
    /// Buffer of the bandwidth probe, MiB; keep it well above the last-level
    /// cache (300 MiB on some Xeons) or the probe measures the cache.
    #[arg(long, default_value_t = 1024)]
    probe_mib: usize,
    /// Seconds per probe and thread count [default: 0.5; --quick: 0.2].
    #[arg(long)]
    probe_seconds: Option<f64>,
    /// A smoke run of about a minute: q4_0 only, 1 repetition, prefill 64, 16
    /// tokens decoded after 16, one vision encode, 1 and 4 streams, one picture
    /// under load, short probes.
    #[arg(long)]
    quick: bool,
    /// One JSON object per line and figure.
    #[arg(long)]
    json: bool,
    /// Also write the JSON lines to this file (with the table on stdout).
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Where the model runs: cpu, cuda, cuda:N or auto. On a GPU the bounds are
    /// the device's own: device-to-device copy bandwidth for decode, the cuBLAS
    /// f16 GEMM rate for prefill and vision (the CPU probes are skipped).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    device: DeviceChoice,
    /// Internal: measure --model at one thread count, print raw samples.
    #[arg(long, hide = true)]
    worker: bool,
}

fn parse_device(s: &str) -> Result<DeviceChoice, String> {
    s.parse()
}

fn parse_kv_dtype(s: &str) -> Result<KvDtype, String> {
    [KvDtype::F16, KvDtype::F32]
        .into_iter()
        .find(|d| d.name() == s)
        .ok_or_else(|| format!("`{s}`: the KV cache holds f16 or f32"))
}

/// What the run measures, after `--quick` filled in what was not given.
struct Settings {
    quants: Vec<String>,
    threads: Vec<usize>,
    spec: Spec,
    probe_bytes: usize,
    probe_time: Duration,
}

fn settings(a: &Args) -> Settings {
    let q = a.quick;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut threads: Vec<usize> = a
        .threads
        .iter()
        .map(|&t| if t == 0 { cores } else { t })
        .collect();
    threads.dedup();
    Settings {
        quants: a.quant.clone().unwrap_or_else(|| {
            let d: &[&str] = if q {
                &["q4_0"]
            } else {
                &["f16", "q8_0", "q4_0"]
            };
            d.iter().map(|s| s.to_string()).collect()
        }),
        threads,
        spec: Spec {
            reps: a.reps.unwrap_or(if q { 1 } else { 3 }).max(1),
            prompts: a
                .prompt
                .clone()
                .unwrap_or_else(|| if q { vec![64] } else { vec![64, 512] }),
            decode_ctx: a.decode_ctx.clone().unwrap_or_else(|| {
                if q {
                    vec![16]
                } else {
                    vec![16, 1024]
                }
            }),
            gen: a.gen.unwrap_or(if q { 16 } else { 128 }),
            image: (!a.no_image).then(|| a.image.clone()),
            ttft: !a.no_ttft && !q,
            question: a.question.clone(),
            device: a.device,
            kv_dtype: a
                .kv_dtype
                .unwrap_or_else(|| EngineOptions::default().kv_dtype),
            streams: a
                .streams
                .clone()
                .unwrap_or_else(|| if q { vec![1, 4] } else { vec![1, 2, 4, 8] })
                .into_iter()
                .filter(|&k| k > 0)
                .collect(),
            image_streams: a.image_streams,
        },
        probe_bytes: a.probe_mib.max(1) << 20,
        probe_time: Duration::from_secs_f64(
            a.probe_seconds
                .unwrap_or(if q { 0.2 } else { 0.5 })
                .max(0.001),
        ),
    }
}

/// One reported figure.
struct Figure {
    name: &'static str,
    quant: Option<String>,
    vision_quant: Option<String>,
    threads: usize,
    tokens: Option<usize>,
    /// requests running at once while it was measured (`None`: no request)
    streams: Option<usize>,
    unit: &'static str,
    samples: Vec<f64>,
    /// the best the machine allows, in `unit`
    bound: Option<f64>,
    note: Option<String>,
}

impl Figure {
    fn stats(&self) -> (f64, f64, f64) {
        let mut s = self.samples.clone();
        s.sort_by(|a, b| a.total_cmp(b));
        let n = s.len();
        let med = if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        };
        (med, s[0], s[n - 1])
    }

    /// p50 (the median) and p99 (nearest rank), for distributions.
    fn percentiles(&self) -> Option<(f64, f64)> {
        if !PERCENTILE_FIGURES.contains(&self.name) {
            return None;
        }
        let mut s = self.samples.clone();
        s.sort_by(|a, b| a.total_cmp(b));
        let rank = (0.99 * s.len() as f64).ceil().max(1.0) as usize;
        Some((self.stats().0, s[rank.min(s.len()) - 1]))
    }

    /// Rates are better high, times low; the fraction is ≤ 1 either way.
    fn bound_fraction(&self) -> Option<f64> {
        let (med, _, _) = self.stats();
        let b = self.bound?;
        Some(if self.unit.ends_with("/s") {
            med / b
        } else {
            b / med
        })
    }

    /// One JSON line; every row names the machine and the kernels it ran
    /// (`cpu`, `level`, `tuning`), so rows from different machines can be
    /// pooled without losing what they measured.
    fn json(&self) -> serde_json::Value {
        let (median, min, max) = self.stats();
        let p = self.percentiles();
        let d = &mipha_kernels::cpu::dispatch::cpu();
        serde_json::json!({
            "cpu": d.brand, "cpu_id": format!("{:?} family {:#x} model {:#x}", d.vendor, d.family, d.model),
            "level": mipha_kernels::cpu::dispatch::level().name(),
            "tuning": mipha_kernels::cpu::dispatch::tuning().describe(),
            "figure": self.name, "quant": self.quant, "vision_quant": self.vision_quant,
            "threads": self.threads, "tokens": self.tokens, "streams": self.streams,
            "median": median, "min": min, "max": max,
            "p50": p.map(|p| p.0), "p99": p.map(|p| p.1),
            "bound_fraction": self.bound_fraction(), "bound": self.bound,
            "unit": self.unit, "note": self.note,
        })
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = if args.worker {
        run_worker(&args)
    } else {
        run(&args)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

fn run_worker(args: &Args) -> BoxResult<()> {
    let s = settings(args);
    let model = args.model.as_ref().ok_or("--worker needs --model")?;
    let [threads] = s.threads[..] else {
        return Err("--worker takes one thread count".into());
    };
    let label = model
        .file_stem()
        .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    worker::run(model, threads, &s.spec, &label)
}

/// 64-bit FNV-1a: a stable key for the config files of a cached model.
fn fnv1a(bytes: &[u8], mut h: u64) -> u64 {
    for &b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// The cached synthesized model for `quant` (synthesized now if missing or
/// unreadable), keyed by the config's content and both quant types.
fn synthesized(args: &Args, quant: &str) -> BoxResult<PathBuf> {
    let q = QuantType::from_name(quant).ok_or_else(|| format!("unknown quant type `{quant}`"))?;
    let vq = match &args.vision_quant {
        Some(v) => QuantType::from_name(v).ok_or_else(|| format!("unknown quant type `{v}`"))?,
        None => q,
    };
    let config = std::fs::read(&args.config)
        .map_err(|e| format!("{}: {e} (use --model or --config)", args.config.display()))?;
    let mut key = fnv1a(&config, 0xcbf2_9ce4_8422_2325);
    let dir = args.config.parent().unwrap_or(Path::new("."));
    if let Ok(pre) = std::fs::read(dir.join("preprocessor_config.json")) {
        key = fnv1a(&pre, key);
    }
    let stem = dir
        .file_name()
        .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
    std::fs::create_dir_all(&args.cache_dir)?;
    let path = args
        .cache_dir
        .join(format!("{stem}-synth-{key:016x}-{q}-v{vq}.mqf"));
    if path.exists() && MqfFile::open(&path).is_ok() {
        return Ok(path);
    }
    eprintln!("synthesizing {} ...", path.display());
    let mut opts = mipha_convert::SynthOptions::new(&args.config, &path, q);
    opts.vision_quant = vq;
    opts.progress = !args.json;
    mipha_convert::synth(&opts)?;
    Ok(path)
}

/// Machine bounds at one thread count.
#[derive(Clone, Copy)]
struct Bounds {
    bandwidth: f64,
    peaks: Peaks,
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// The 1, 5 and 15 minute load averages: other work on the machine skews every figure.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

/// Where figures go as soon as they are known: JSON lines on stdout (`--json`)
/// and in `--json-out`, so a run that is stopped keeps what it measured.
struct Sink {
    stdout: bool,
    file: Option<std::fs::File>,
    figures: Vec<Figure>,
}

impl Sink {
    fn push(&mut self, f: Figure) -> BoxResult<()> {
        let line = f.json().to_string();
        if self.stdout {
            println!("{line}");
        }
        if let Some(file) = &mut self.file {
            writeln!(file, "{line}")?;
            file.flush()?;
        }
        self.figures.push(f);
        Ok(())
    }
}

/// The CPU's bounds at each thread count: memory read bandwidth, f32 FMA and
/// int8 dot peaks (figures to `sink`, a header line per thread count).
fn cpu_bounds(s: &Settings, header: &mut Vec<String>, sink: &mut Sink) -> BoxResult<Vec<Bounds>> {
    let max_threads = s.threads.iter().copied().max().unwrap_or(1);
    eprintln!(
        "probing memory bandwidth ({} MiB) and peak rates ...",
        s.probe_bytes >> 20
    );
    let buf = probe::ReadBuffer::new(s.probe_bytes, max_threads);
    let bw: Vec<_> = s
        .threads
        .iter()
        .map(|&t| probe::mem_read_gb_s(&buf, t, s.probe_time))
        .collect();
    drop(buf);
    let fma = probe::f32_fma_gflop_s(&s.threads, s.probe_time);
    let int8 = probe::int8_dot_gop_s(&s.threads, s.probe_time);
    let mut bounds = Vec::new();
    for (i, &t) in s.threads.iter().enumerate() {
        bounds.push(Bounds {
            bandwidth: bw[i].best() * 1e9,
            peaks: Peaks {
                f32_flops: fma[i].best() * 1e9,
                int8_ops: int8[i].best() * 1e9,
            },
        });
        header.push(format!(
            "  {t} thread{}: memory read {:.1} GB/s, f32 FMA {:.1} GFLOP/s ({}), int8 dot {:.1} GOP/s ({})",
            if t == 1 { "" } else { "s" },
            bw[i].best(),
            fma[i].best(),
            fma[i].isa,
            int8[i].best(),
            int8[i].isa
        ));
        for (name, unit, r, note) in [
            (
                "mem_read_gb_s",
                "GB/s",
                &bw[i],
                format!("{} MiB buffer, {} loads", s.probe_bytes >> 20, bw[i].isa),
            ),
            (
                "f32_fma_gflop_s",
                "GFLOP/s",
                &fma[i],
                fma[i].isa.to_string(),
            ),
            ("int8_dot_gop_s", "GOP/s", &int8[i], int8[i].isa.to_string()),
        ] {
            sink.push(Figure {
                name,
                quant: None,
                vision_quant: None,
                threads: t,
                tokens: None,
                streams: None,
                unit,
                samples: r.samples.clone(),
                bound: None,
                note: Some(note),
            })?;
        }
    }

    Ok(bounds)
}

fn run(args: &Args) -> BoxResult<()> {
    let s = settings(args);
    let file = match &args.json_out {
        Some(p) => Some(std::fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()))?),
        None => None,
    };
    let mut sink = Sink {
        stdout: args.json,
        file,
        figures: Vec::new(),
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let level = mipha_kernels::cpu::dispatch::level().name();
    let mut header = vec![format!(
        "machine: {} ({}), {cores} cores, kernels dispatched to {level}, tuning {}; load average at the start: {}",
        cpu_model(),
        mipha_kernels::cpu::dispatch::cpu().describe(),
        mipha_kernels::cpu::dispatch::tuning().describe(),
        load_average()
    )];
    eprintln!("{}", header[0]);

    let gpu = s.spec.device.resolve()?;
    let mut bounds = Vec::new();
    if gpu.is_cuda() {
        header.push(format!("device: {}", gpu.describe()));
        eprintln!(
            "{}; probing its copy bandwidth and f16 GEMM rate ...",
            header[1]
        );
        let b = gpu_bounds(&gpu, &s, &mut header, &mut sink)?;
        bounds = vec![b; s.threads.len()];
    }
    // the workers open their own context
    drop(gpu);
    if bounds.is_empty() {
        bounds = cpu_bounds(&s, &mut header, &mut sink)?;
    }
    for h in &header[1..] {
        eprintln!("{h}");
    }

    // The models.
    let models: Vec<(Option<String>, PathBuf)> = match &args.model {
        Some(m) => vec![(None, m.clone())],
        None => s
            .quants
            .iter()
            .map(|q| Ok((Some(q.clone()), synthesized(args, q)?)))
            .collect::<BoxResult<_>>()?,
    };
    let mut failures = Vec::new();
    for (_, path) in &models {
        let file = MqfFile::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let cost = ModelCost::of(&file)?;
        drop(file);
        let quant = cost.lm_quant.to_string();
        let vq = cost.vision_quant.map(|q| q.to_string());
        header.push(format!(
            "model {quant}: {} ({:.2} GB; language model {quant}, vision tower and projector {}; \
             a decoded token reads {:.2} GB of weights; KV cache {})",
            path.display(),
            cost.file_bytes as f64 / 1e9,
            vq.as_deref().unwrap_or("none"),
            cost.lm_stream_bytes as f64 / 1e9,
            s.spec.kv_dtype.name(),
        ));
        eprintln!("{}", header.last().expect("pushed"));
        for (i, &t) in s.threads.iter().enumerate() {
            let ok = spawn_worker(path, t, &s.spec, &mut |raw| {
                if raw.samples.is_empty() {
                    return Ok(());
                }
                let bound = bound_of(&raw, &cost, &bounds[i], &s.spec);
                sink.push(Figure {
                    name: raw.figure,
                    quant: Some(quant.clone()),
                    vision_quant: vq.clone(),
                    threads: t,
                    tokens: raw.tokens,
                    streams: raw.streams,
                    unit: raw.unit,
                    samples: raw.samples,
                    bound,
                    note: raw.note,
                })
            })?;
            if let Err(e) = ok {
                eprintln!("warning: {quant} at {t} threads: {e}");
                failures.push(format!("{quant} at {t} threads: {e}"));
            }
        }
    }

    header.push(format!("load average at the end: {}", load_average()));
    if args.json {
        eprintln!("{}", header.last().expect("pushed"));
    } else {
        print_table(&header, &sink.figures);
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("some measurements failed: {}", failures.join("; ")).into())
    }
}

/// Runs the measurements of `model` at `threads` in a child process, handing
/// each figure to `on_raw` as it arrives; returns whether the child finished.
fn spawn_worker(
    model: &Path,
    threads: usize,
    spec: &Spec,
    on_raw: &mut dyn FnMut(Raw) -> BoxResult<()>,
) -> BoxResult<Result<(), String>> {
    let list = |v: &[usize]| {
        let v: Vec<String> = v.iter().map(|n| n.to_string()).collect();
        if v.is_empty() {
            "0".to_string()
        } else {
            v.join(",")
        }
    };
    // This very binary, even if a rebuild replaced the file since the start (a
    // long run would otherwise measure later quant types with other code, or
    // fail to find itself).
    let proc_exe = Path::new("/proc/self/exe");
    let exe = if proc_exe.exists() {
        proc_exe.to_path_buf()
    } else {
        std::env::current_exe()?
    };
    let mut cmd = Command::new(exe);
    cmd.arg("--worker")
        .arg("--model")
        .arg(model)
        .args(["--threads", &threads.to_string()])
        .args(["--reps", &spec.reps.to_string()])
        .args(["--prompt", &list(&spec.prompts)])
        .args(["--decode-ctx", &list(&spec.decode_ctx)])
        .args(["--gen", &spec.gen.to_string()])
        .args(["--question", &spec.question])
        .args(["--device", &device_arg(spec.device)])
        .args(["--kv-dtype", spec.kv_dtype.name()])
        .args(["--streams", &list(&spec.streams)])
        .args(["--image-streams", &spec.image_streams.to_string()]);
    match &spec.image {
        Some(img) => cmd.arg("--image").arg(img),
        None => cmd.arg("--no-image"),
    };
    if !spec.ttft {
        cmd.arg("--no-ttft");
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().expect("piped");
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line?;
        match serde_json::from_str(&line)
            .ok()
            .and_then(|v| Raw::from_json(&v))
        {
            Some(r) => on_raw(r)?,
            None => eprintln!("warning: unexpected worker output: {line}"),
        }
    }
    let status = child.wait()?;
    let ok = if status.success() {
        Ok(())
    } else {
        Err(format!("the measuring process exited with {status}"))
    };
    Ok(ok)
}

fn device_arg(d: DeviceChoice) -> String {
    match d {
        DeviceChoice::Cpu => "cpu".into(),
        DeviceChoice::Cuda(n) => format!("cuda:{n}"),
        DeviceChoice::Auto => "auto".into(),
    }
}

/// The GPU's own bounds, measured on it: device-to-device copy bandwidth (read +
/// write bytes) and the cuBLAS f16 GEMM rate at 8192³, the best of `reps`
/// samples each; the figures go to `sink`. The same bounds serve every thread
/// count (threads only size the CPU pool then).
fn gpu_bounds(
    gpu: &mipha_runtime::Resolved,
    s: &Settings,
    header: &mut Vec<String>,
    sink: &mut Sink,
) -> BoxResult<Bounds> {
    let reps = s.spec.reps.max(3);
    let mut copy = Vec::new();
    let mut gemm = Vec::new();
    for _ in 0..reps {
        copy.push(gpu.copy_gb_s(s.probe_bytes, 20)?.ok_or("not a GPU")?);
        gemm.push(gpu.gemm_tflop_s(8192, 10)?.ok_or("not a GPU")?);
    }
    let best = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    header.push(format!(
        "  device: copy {:.0} GB/s (device to device, read + write), f16 GEMM {:.1} TFLOP/s (cuBLAS, 8192³)",
        best(&copy),
        best(&gemm)
    ));
    for (name, unit, samples, note) in [
        (
            "hbm_copy_gb_s",
            "GB/s",
            copy.clone(),
            format!("{} MiB device-to-device copies", s.probe_bytes >> 20),
        ),
        (
            "f16_gemm_tflop_s",
            "TFLOP/s",
            gemm.clone(),
            "cuBLAS GemmEx f16 in, f32 accumulate, 8192³".to_string(),
        ),
    ] {
        sink.push(Figure {
            name,
            quant: None,
            vision_quant: None,
            threads: 0,
            tokens: None,
            streams: None,
            unit,
            samples,
            bound: None,
            note: Some(note),
        })?;
    }
    // Every matmul of prefill and vision runs through the f16 GEMM on the GPU.
    let rate = best(&gemm) * 1e12;
    Ok(Bounds {
        bandwidth: best(&copy) * 1e9,
        peaks: Peaks {
            f32_flops: rate,
            int8_ops: rate,
        },
    })
}

/// The bound of a figure in its own unit, where it has one.
fn bound_of(raw: &Raw, cost: &ModelCost, b: &Bounds, spec: &Spec) -> Option<f64> {
    let kv = spec.kv_dtype.size_bytes();
    match raw.figure {
        "decode_tok_s" => Some(cost.decode_bound(b.bandwidth, raw.tokens?, spec.gen, 1, kv)),
        "batch_decode_tok_s" => {
            Some(cost.decode_bound(b.bandwidth, raw.tokens?, spec.gen, raw.streams?, kv))
        }
        "prefill_tok_s" => Some(cost.prefill_bound(raw.tokens?, &b.peaks)),
        "vision_encode_ms" => {
            let tower = cost.tower_seconds(&b.peaks)?;
            let with_projector = raw.note.as_deref() == Some(worker::TOWER_AND_PROJECTOR);
            let proj = if with_projector {
                cost.projector_seconds(&b.peaks)?
            } else {
                0.0
            };
            Some((tower + proj) * 1e3)
        }
        "projector_ms" => Some(cost.projector_seconds(&b.peaks)? * 1e3),
        _ => None,
    }
}

fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn print_table(header: &[String], figures: &[Figure]) {
    for h in header {
        println!("{h}");
    }
    println!();
    println!(
        "{:<24} {:<5} {:>7} {:>6} {:>7}  {:<40} {:>8}  note",
        "figure", "quant", "threads", "tokens", "streams", "median (min–max)", "of bound"
    );
    for f in figures {
        let (med, min, max) = f.stats();
        let value = match f.percentiles() {
            Some((p50, p99)) => format!(
                "p50 {} p99 {} ({}–{}) {}",
                fmt_num(p50),
                fmt_num(p99),
                fmt_num(min),
                fmt_num(max),
                f.unit
            ),
            None => format!(
                "{} ({}–{}) {}",
                fmt_num(med),
                fmt_num(min),
                fmt_num(max),
                f.unit
            ),
        };
        let frac = f
            .bound_fraction()
            .map_or_else(String::new, |x| format!("{:.1}%", x * 100.0));
        let opt = |v: Option<usize>| v.map_or_else(String::new, |t| t.to_string());
        println!(
            "{:<24} {:<5} {:>7} {:>6} {:>7}  {:<40} {:>8}  {}",
            f.name,
            f.quant.as_deref().unwrap_or("-"),
            f.threads,
            opt(f.tokens),
            opt(f.streams),
            value,
            frac,
            f.note.as_deref().unwrap_or("")
        );
    }
    println!();
    println!(
        "Bounds: decode = memory read bandwidth ÷ bytes per token (language-model weights, one \
         embedding row, K and V rows at the average context in the KV cache's element type); \
         batch_decode_tok_s = streams × bandwidth ÷ (weights + streams × K and V rows) per step; \
         prefill = (2 × matmul params per position + 4 × context × hidden per position and layer \
         for attention) ÷ peak; vision = (2 × tower or projector params × patches + 4 × patches² × \
         hidden per layer) ÷ peak. Matmuls with Q8_0/Q4_0 weights use the int8 dot peak, others and \
         attention the f32 FMA peak. vision_encode_ms is the SigLIP tower alone when a projector_ms \
         row follows (the step loop's per-slice times: every layer slice, then the projector \
         slice). ttft_image_ms: image file to first token (decode, preprocess, tower, projector, \
         tokenize, prefill, first sample). Distributions (itl_ms, ttft_ms, image_itl_ms) show p50 \
         and p99 of every sample, with min–max. Targets: batch_decode_tok_s ≥ 3.2× one stream at \
         4 streams, ≥ 5× at 8; itl_ms p99 at 4 streams ≤ 1.6× one stream's; image_itl_ms p99 ≤ \
         400 ms (reference: 2 cores)."
    );
}
