//! The measurements on one model at one thread count. Runs in a child process
//! of `mipha-bench` (one per quant type and thread count, so that each peak RSS
//! is its own) and prints one JSON line of raw samples per figure.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mipha_models::image::load_image;
use mipha_models::{
    DeviceChoice, Engine, EngineOptions, GenerateOptions, GenerateRequest, KvDtype, Logits,
    PromptId, PromptItem, Sampler, SamplingParams, StopReason, Turn,
};
use mipha_runtime::Input;

use crate::streams::{self, StreamsSpec};

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

/// What to measure.
#[derive(Clone, Debug)]
pub struct Spec {
    pub reps: usize,
    /// text prompt lengths for `prefill_tok_s`
    pub prompts: Vec<usize>,
    /// context lengths before the `gen` decoded tokens of `decode_tok_s`
    pub decode_ctx: Vec<usize>,
    pub gen: usize,
    /// the picture of the image figures (`None`: no image figures)
    pub image: Option<PathBuf>,
    /// also prefill the image prompt and time the first token (`ttft_image_ms`)
    pub ttft: bool,
    pub question: String,
    /// where the engine runs (`--device`)
    pub device: DeviceChoice,
    /// the KV cache's element type; the decode bounds read its size
    pub kv_dtype: KvDtype,
    /// concurrency levels of the batch and closed-loop figures (`--streams`)
    pub streams: Vec<usize>,
    /// `streams` of the picture-under-load figures (k − 1 text streams and the
    /// picture); 0: none
    pub image_streams: usize,
}

/// One figure's samples, as the worker reports them.
pub struct Raw {
    pub figure: &'static str,
    pub tokens: Option<usize>,
    /// requests running concurrently while it was measured (`None`: no request)
    pub streams: Option<usize>,
    pub unit: &'static str,
    pub samples: Vec<f64>,
    pub note: Option<String>,
}

impl Raw {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "figure": self.figure, "tokens": self.tokens, "streams": self.streams,
            "unit": self.unit,
            "samples": self.samples, "note": self.note,
        })
    }

    pub fn from_json(v: &serde_json::Value) -> Option<Raw> {
        let figure = super::FIGURES
            .iter()
            .find(|f| Some(**f) == v["figure"].as_str())?;
        let unit = super::UNITS
            .iter()
            .find(|u| Some(**u) == v["unit"].as_str())?;
        Some(Raw {
            figure,
            tokens: v["tokens"].as_u64().map(|t| t as usize),
            streams: v["streams"].as_u64().map(|t| t as usize),
            unit,
            samples: v["samples"]
                .as_array()?
                .iter()
                .filter_map(|s| s.as_f64())
                .collect(),
            note: v["note"].as_str().map(str::to_string),
        })
    }
}

/// Prints a figure for the parent at once (a long run shows progress and
/// keeps what it measured if a later step fails).
pub fn emit(raw: Raw) {
    let mut out = std::io::stdout().lock();
    // A closed pipe means the parent is gone; nothing left to report to.
    let _ = writeln!(out, "{}", raw.to_json());
    let _ = out.flush();
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The ids of a text prompt of `n` ordinary tokens.
fn text_ids(n: usize) -> Vec<u32> {
    (0..n).map(|i| 100 + (i * 37 % 5000) as u32).collect()
}

fn text_prompt(n: usize) -> Vec<Input<'static>> {
    text_ids(n).into_iter().map(Input::Token).collect()
}

/// The note of a `vision_encode_ms` row that holds the projector too, whose
/// bound then adds the projector's.
pub const TOWER_AND_PROJECTOR: &str = "tower + projector";

pub fn run(model: &Path, threads: usize, spec: &Spec, label: &str) -> BoxResult<()> {
    let say = |msg: String| eprintln!("[{label} t={threads}] {msg}");
    let reps = spec.reps.max(1);
    let max_streams = spec
        .streams
        .iter()
        .copied()
        .chain([spec.image_streams])
        .max();
    let defaults = EngineOptions::default();
    let opts = EngineOptions {
        threads,
        device: spec.device,
        kv_dtype: spec.kv_dtype,
        // every stream of a figure runs at once, none waits in the queue
        max_sequences: defaults.max_sequences.max(max_streams.unwrap_or(1)),
        ..defaults
    };
    let mut load = Vec::new();
    let mut engine = None;
    for _ in 0..reps {
        drop(engine.take());
        let t = Instant::now();
        engine = Some(Engine::load(model, opts.clone())?);
        load.push(ms(t.elapsed()));
    }
    let engine = engine.expect("reps >= 1");
    say(format!("loaded: {}", engine.backend_name()));
    emit(Raw {
        figure: "load_ms",
        tokens: None,
        streams: None,
        unit: "ms",
        samples: load,
        note: Some("Engine::load: mmap, bind (and repack) weights, plans".into()),
    });
    // Warm the thread pool and the kernels' first-use paths, and page in the
    // language model's weights that are read from the mapping (the vision
    // tower's are paged in by the first image pass, as in real use; the median
    // of several passes does not see it).
    let mut logits = Vec::new();
    let seq = engine.new_sequence();
    engine.forward(seq, &text_prompt(1), Logits::Last, &mut logits, None)?;
    engine.release_sequence(seq)?;

    for &n in spec.prompts.iter().filter(|&&n| n > 0) {
        if n > engine.context_length() {
            say(format!("prefill {n}: longer than the context, skipped"));
            continue;
        }
        let inputs = text_prompt(n);
        let mut samples = Vec::new();
        for r in 0..reps {
            let seq = engine.new_sequence();
            let t = Instant::now();
            engine.forward(seq, &inputs, Logits::Last, &mut logits, None)?;
            samples.push(n as f64 / t.elapsed().as_secs_f64());
            engine.release_sequence(seq)?;
            say(format!(
                "prefill {n}: {:.2} tok/s ({}/{reps})",
                samples[r],
                r + 1
            ));
        }
        emit(Raw {
            figure: "prefill_tok_s",
            tokens: Some(n),
            streams: Some(1),
            unit: "tok/s",
            samples,
            note: Some("text prompt".into()),
        });
    }

    // Single-stream decode on the serving path: one request through `submit`,
    // read on this thread like any client's stream (sampling and text pieces
    // included). `gen + 1` tokens are sampled, so `gen` decode steps lie between
    // the first token (the prefill's) and the last. Repetitions send the same
    // context again: the prefix cache holds it, and decode reads the same KV.
    for &ctx in spec.decode_ctx.iter().filter(|&&c| c > 0) {
        if ctx + spec.gen + 1 > engine.context_length() || spec.gen == 0 {
            say(format!(
                "decode after {ctx}: does not fit the context, skipped"
            ));
            continue;
        }
        let prompt: Vec<PromptItem> = text_ids(ctx).into_iter().map(PromptItem::Token).collect();
        let mut samples = Vec::new();
        for r in 0..reps {
            let g = engine.submit(GenerateRequest {
                prompt: prompt.clone(),
                options: GenerateOptions {
                    max_tokens: spec.gen + 1,
                    ignore_eos: true,
                    sampling: SamplingParams::default(),
                    ..GenerateOptions::default()
                },
                ..GenerateRequest::default()
            })?;
            let (times, f) = streams::read_stream(g, None)?;
            if f.stop != StopReason::MaxTokens {
                return Err(format!("decode stopped early: {}", f.stop.as_str()).into());
            }
            let (first, last) = (times[0], times[times.len() - 1]);
            samples.push((times.len() - 1) as f64 / (last - first).as_secs_f64());
            say(format!(
                "decode {} after {ctx}: {:.2} tok/s ({}/{reps}; first token after {:.0} ms, \
                 {} of {ctx} context positions reused)",
                times.len() - 1,
                samples[r],
                r + 1,
                ms(f.stats.time_to_first_token),
                f.stats.reused_positions
            ));
        }
        emit(Raw {
            figure: "decode_tok_s",
            tokens: Some(ctx),
            streams: Some(1),
            unit: "tok/s",
            samples,
            note: Some(format!(
                "{} greedy tokens, one stream through Engine::submit",
                spec.gen
            )),
        });
    }

    if let Some(image) = &spec.image {
        if engine.image_config().is_some() {
            image_figures(&engine, image, spec, reps, &say)?;
        } else {
            say("no vision tower in this file: image figures skipped".into());
        }
    }

    // After the image figures, whose first pass pages in the vision weights.
    streams::run(
        &engine,
        &StreamsSpec {
            reps,
            gen: spec.gen,
            streams: &spec.streams,
            image_streams: spec.image_streams,
            image: spec.image.as_deref(),
            question: &spec.question,
        },
        &say,
    )?;

    if let Some(rss) = peak_rss_mb() {
        emit(Raw {
            figure: "peak_rss_mb",
            tokens: None,
            streams: None,
            unit: "MB",
            samples: vec![rss],
            note: Some("VmHWM of this quant and thread count's process".into()),
        });
    }
    Ok(())
}

/// Preprocessing, vision tower, projector, image-prompt prefill and time to
/// first token, all from the same passes: each starts from the file path, with
/// nothing cached.
fn image_figures(
    engine: &Engine,
    image: &Path,
    spec: &Spec,
    reps: usize,
    say: &dyn Fn(String),
) -> BoxResult<()> {
    let cfg = engine.image_config().expect("checked by the caller");
    let mut pre = Vec::new();
    let mut tower = Vec::new();
    let mut projector = Vec::new();
    let mut encode = Vec::new();
    let mut prefill = Vec::new();
    let mut ttft = Vec::new();
    let mut positions = 0;
    let mut logits = Vec::new();
    let mut split = true;
    for r in 0..reps {
        let t0 = Instant::now();
        let img = load_image(image, cfg)?;
        let t1 = Instant::now();
        // The step loop times each slice of the vision plan: one per encoder
        // layer (the first with the patch embedding), the projector last.
        let (embeds, st) = engine.encode_image_timed(&img.pixels)?;
        std::hint::black_box(embeds);
        pre.push(ms(t1 - t0));
        encode.push(ms(st.elapsed));
        match st.slices.split_last() {
            // A device that runs the slices asynchronously returns from each
            // before its work is done; only the whole encode then means anything.
            Some((last, layers))
                if !layers.is_empty()
                    && st.slices.iter().sum::<Duration>().as_secs_f64()
                        >= 0.8 * st.elapsed.as_secs_f64() =>
            {
                tower.push(ms(layers.iter().sum()));
                projector.push(ms(*last));
            }
            _ => split = false,
        }
        if spec.ttft {
            // Time to first token is its own run, image file to sampled token.
            // A hand-driven sequence, so the prefix cache holds nothing of an
            // earlier pass (on a GPU `forward` brings the embeddings back to
            // the host first; the picture-under-load run goes through `submit`).
            let t0 = Instant::now();
            let img = load_image(image, cfg)?;
            let embeds = engine.encode_image(&img.pixels)?;
            let segments = engine.template().render(&[Turn {
                user: spec.question.clone(),
                images: 1,
                assistant: None,
            }]);
            let ids = engine.tokenizer().encode_segments(&segments)?;
            let hidden = engine.config().hidden_size;
            let mut inputs = Vec::new();
            let mut history = Vec::new();
            for id in &ids {
                match id {
                    PromptId::Token(t) => {
                        inputs.push(Input::Token(*t));
                        history.push(*t);
                    }
                    PromptId::Image(_) => embeds.embeddings().push_inputs(hidden, &mut inputs),
                }
            }
            positions = inputs.len();
            let seq = engine.new_sequence();
            let t3 = Instant::now();
            let result = engine.forward(seq, &inputs, Logits::Last, &mut logits, None);
            let t4 = Instant::now();
            engine.release_sequence(seq)?;
            result?;
            let first = Sampler::new(SamplingParams::default()).sample(&mut logits, &history);
            let t5 = Instant::now();
            std::hint::black_box(first);
            prefill.push(positions as f64 / (t4 - t3).as_secs_f64());
            ttft.push(ms(t5 - t0));
            say(format!(
                "image: preprocess {:.1} ms, encode {:.0} ms, prefill {positions} at {:.2} tok/s, \
                 first token after {:.0} ms ({}/{reps})",
                pre[r],
                encode[r],
                prefill[r],
                ttft[r],
                r + 1
            ));
        } else {
            say(format!(
                "image: preprocess {:.1} ms, encode {:.0} ms ({}/{reps})",
                pre[r],
                encode[r],
                r + 1
            ));
        }
    }
    let side = format!("{}x{}", cfg.width(), cfg.height());
    emit(Raw {
        figure: "image_preprocess_ms",
        tokens: None,
        streams: Some(1),
        unit: "ms",
        samples: pre,
        note: Some(format!("decode + resize to {side} + normalise")),
    });
    let patches = engine.vision_config().map_or(0, |v| v.num_patches());
    if split {
        emit(Raw {
            figure: "vision_encode_ms",
            tokens: Some(patches),
            streams: Some(1),
            unit: "ms",
            samples: tower,
            note: Some("SigLIP tower".into()),
        });
        emit(Raw {
            figure: "projector_ms",
            tokens: Some(patches),
            streams: Some(1),
            unit: "ms",
            samples: projector,
            note: None,
        });
    } else {
        emit(Raw {
            figure: "vision_encode_ms",
            tokens: Some(patches),
            streams: Some(1),
            unit: "ms",
            samples: encode,
            note: Some(TOWER_AND_PROJECTOR.into()),
        });
    }
    if spec.ttft {
        let question = engine.tokenizer().encode(&spec.question)?.len();
        let note = Some(format!(
            "image prompt ({patches} image positions, a {question}-token question)"
        ));
        emit(Raw {
            figure: "prefill_tok_s",
            tokens: Some(positions),
            streams: Some(1),
            unit: "tok/s",
            samples: prefill,
            note,
        });
        emit(Raw {
            figure: "ttft_image_ms",
            tokens: Some(positions),
            streams: Some(1),
            unit: "ms",
            samples: ttft,
            note: Some("path to first token, nothing cached".into()),
        });
    }
    Ok(())
}

/// Peak resident set of this process (VmHWM) in MB (1e6 bytes), where /proc offers it.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024.0 / 1e6)
}
