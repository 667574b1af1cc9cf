//! `mipha-loadgen`: N streaming clients against an OpenAI-compatible server,
//! and the same workload through the library, to measure what HTTP costs.
//!
//! Each client runs a closed loop: it sends its next request as soon as the
//! last one ended, `--requests` of them, greedy with `ignore_eos` so every run
//! does the same work. Every `--image-every`-th request carries a picture
//! (a variant of `--image` with one pixel changed per request, so no picture
//! is served from a cache); the others are text. Client-side timestamps give
//! each request's time to first token and every gap between tokens.
//!
//! With `--model`, the server is `mipha-server` started in this process on
//! 127.0.0.1 (and afterwards the same workload runs through
//! `Engine::submit` on a fresh engine with the same options); with `--url`,
//! any server that speaks the API (llama-server, vLLM, ...) is driven instead.
//! Output: a table, or JSON lines with `--json` (the fields of
//! `mipha-bench`'s rows: `figure`, `streams`, `median`, `min`, `max`, `p50`,
//! `p99`, `unit`, `note`).

use std::io::{BufRead, BufReader, Cursor};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use clap::Parser;
use mipha_models::image::{decode_bytes, preprocess, DecodeOptions};
use mipha_models::{
    Engine, EngineOptions, GenerateOptions, GenerateRequest, Message, Part, PromptId, PromptItem,
    Role, StreamEvent,
};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "mipha-loadgen",
    about = "Streaming clients against an OpenAI-compatible server"
)]
struct Args {
    /// A `.mqf` model: serve it here (and run the library comparison).
    #[arg(long, conflicts_with = "url")]
    model: Option<PathBuf>,
    /// A running server's base URL, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    url: Option<String>,
    /// Concurrent clients (comma separated).
    #[arg(long, default_value = "1,4,8", value_delimiter = ',')]
    clients: Vec<usize>,
    /// Requests per client.
    #[arg(long, default_value_t = 4)]
    requests: usize,
    /// Tokens per answer.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Every n-th request of a client carries a picture (0: none).
    #[arg(long, default_value_t = 4)]
    image_every: usize,
    #[arg(long, default_value = "assets/examples/chelsea.png")]
    image: PathBuf,
    /// CPU threads of the served engine.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// The KV cache of the served engine, MiB.
    #[arg(long, default_value_t = 1024)]
    kv_cache_mb: usize,
    /// The model name sent in requests (with --url).
    #[arg(long, default_value = "mipha")]
    model_name: String,
    #[arg(long)]
    json: bool,
}

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

/// One request's timings as the client saw them.
struct Timed {
    ttft: Duration,
    gaps: Vec<Duration>,
    tokens: usize,
}

/// A closed loop of `clients` clients; every request's timings and the wall time.
struct Run {
    requests: Vec<Timed>,
    wall: Duration,
}

/// What one request asks.
#[derive(Clone)]
struct Ask {
    text: String,
    /// PNG bytes of its picture
    picture: Option<Arc<Vec<u8>>>,
}

fn workload(args: &Args, clients: usize) -> BoxResult<Vec<Vec<Ask>>> {
    let png = std::fs::read(&args.image)?;
    let base = image_decode(&png)?;
    let mut n = 0u32;
    let mut out = Vec::new();
    for c in 0..clients {
        let mut asks = Vec::new();
        for r in 0..args.requests {
            let words = [
                "a lighthouse",
                "a market",
                "the desert",
                "an orchard",
                "a glacier",
            ];
            let text = format!(
                "Client {c}, request {r}: tell me a long, detailed story about {} and the \
                 people who live there, with names, places and what happens each day.",
                words[(c + r) % words.len()]
            );
            let picture = (args.image_every > 0
                && (r + c) % args.image_every == args.image_every - 1)
                .then(|| {
                    n += 1;
                    Arc::new(variant(&base, n))
                });
            asks.push(Ask { text, picture });
        }
        out.push(asks);
    }
    Ok(out)
}

fn image_decode(png: &[u8]) -> BoxResult<image::RgbImage> {
    Ok(image::load_from_memory(png)?.to_rgb8())
}

/// The picture with one pixel changed: another picture to every cache.
fn variant(base: &image::RgbImage, n: u32) -> Vec<u8> {
    let mut img = base.clone();
    let p = img.get_pixel_mut(n % img.width(), (n / img.width()) % img.height());
    p.0[0] = p.0[0].wrapping_add(1 + (n % 250) as u8);
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .expect("PNG encoding into memory");
    out.into_inner()
}

fn messages_json(a: &Ask) -> Value {
    match &a.picture {
        None => json!([{"role": "user", "content": a.text}]),
        Some(png) => {
            let url = format!(
                "data:image/png;base64,{}",
                base64::engine::general_purpose::STANDARD.encode(png.as_slice())
            );
            json!([{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": a.text},
            ]}])
        }
    }
}

/// One streamed request over HTTP.
fn http_request(
    agent: &ureq::Agent,
    url: &str,
    model: &str,
    a: &Ask,
    n: usize,
) -> BoxResult<Timed> {
    let body = json!({
        "model": model,
        "messages": messages_json(a),
        "max_tokens": n,
        "temperature": 0,
        "ignore_eos": true,
        "stream": true,
    });
    let start = Instant::now();
    let mut r = agent
        .post(&format!("{url}/v1/chat/completions"))
        .header("Content-Type", "application/json")
        .send(body.to_string().as_bytes())?;
    if r.status() != 200 {
        return Err(format!("{}: {}", r.status(), r.body_mut().read_to_string()?).into());
    }
    let reader = BufReader::new(r.body_mut().as_reader());
    let mut times = Vec::new();
    for line in reader.lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data)?;
        if v.get("error").is_some() {
            return Err(format!("stream error: {data}").into());
        }
        // One content chunk per token (a token completing no character sends none).
        if v["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
        {
            times.push(Instant::now());
        }
    }
    timed(start, &times)
}

fn timed(start: Instant, times: &[Instant]) -> BoxResult<Timed> {
    let first = *times.first().ok_or("no token came")?;
    Ok(Timed {
        ttft: first - start,
        gaps: times.windows(2).map(|w| w[1] - w[0]).collect(),
        tokens: times.len(),
    })
}

/// The same request through the library: decode, encode, template, submit.
fn library_request(engine: &Engine, a: &Ask, n: usize) -> BoxResult<Timed> {
    let start = Instant::now();
    let mut content = Vec::new();
    let mut images = Vec::new();
    if let Some(png) = &a.picture {
        let cfg = engine
            .image_config()
            .ok_or("the model has no vision tower")?;
        let decoded = decode_bytes(png, "picture", &DecodeOptions::default())?;
        let img = preprocess(&decoded.image, cfg);
        images.push(engine.encode_image(&img.pixels)?);
        content.push(Part::Image);
    }
    content.push(Part::Text(a.text.clone()));
    let segments = engine.template().render_messages(&[Message {
        role: Role::User,
        content,
    }])?;
    let ids = engine.tokenizer().encode_segments(&segments)?;
    let prompt = ids
        .iter()
        .map(|id| match id {
            PromptId::Token(t) => PromptItem::Token(*t),
            PromptId::Image(i) => PromptItem::Image(images[*i].clone()),
        })
        .collect();
    let mut g = engine.submit(GenerateRequest {
        prompt,
        options: GenerateOptions {
            max_tokens: n,
            ignore_eos: true,
            ..Default::default()
        },
        ..Default::default()
    })?;
    let mut times = Vec::new();
    while let StreamEvent::Token { piece, .. } = g.next_event()? {
        if !piece.is_empty() {
            times.push(Instant::now());
        }
    }
    timed(start, &times)
}

fn closed_loop<F>(work: Vec<Vec<Ask>>, request: F) -> BoxResult<Run>
where
    F: Fn(&Ask) -> BoxResult<Timed> + Sync,
{
    let start = Instant::now();
    let results: Vec<BoxResult<Vec<Timed>>> = std::thread::scope(|s| {
        let handles: Vec<_> = work
            .iter()
            .map(|asks| {
                let request = &request;
                s.spawn(move || {
                    asks.iter()
                        .map(|a| request(a).map_err(|e| e.to_string()))
                        .collect::<Result<Vec<_>, String>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a client thread").map_err(Into::into))
            .collect()
    });
    let mut requests = Vec::new();
    for r in results {
        requests.extend(r?);
    }
    Ok(Run {
        requests,
        wall: start.elapsed(),
    })
}

fn percentile(mut v: Vec<f64>, q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let rank = (q * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

struct Row {
    figure: String,
    streams: usize,
    unit: &'static str,
    samples: Vec<f64>,
    note: String,
}

impl Row {
    fn print(&self, json_out: bool) {
        let n = self.samples.len();
        let (min, max) = self
            .samples
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
                (a.min(x), b.max(x))
            });
        let (p50, p99) = (
            percentile(self.samples.clone(), 0.5),
            percentile(self.samples.clone(), 0.99),
        );
        if json_out {
            let v = json!({
                "figure": self.figure, "streams": self.streams, "unit": self.unit,
                "median": p50, "min": min, "max": max,
                "p50": (n > 1).then_some(p50), "p99": (n > 1).then_some(p99),
                "samples": n, "note": self.note,
            });
            println!("{v}");
        } else if n > 1 {
            println!(
                "{:<22} {:>7}  p50 {:>8.2} p99 {:>8.2} ({:.2}–{:.2}) {:<5} {}",
                self.figure, self.streams, p50, p99, min, max, self.unit, self.note
            );
        } else {
            println!(
                "{:<22} {:>7}  {:>8.2} {:<5} {}",
                self.figure, self.streams, p50, self.unit, self.note
            );
        }
    }
}

fn rows(path: &str, clients: usize, run: &Run, engine: Option<(u64, u64)>) -> Vec<Row> {
    let tokens: usize = run.requests.iter().map(|t| t.tokens).sum();
    let rate = tokens as f64 / run.wall.as_secs_f64();
    let ms = |d: &Duration| d.as_secs_f64() * 1e3;
    let engine = engine.map_or(String::new(), |(preempted, hits)| {
        format!("; {preempted} preemptions, {hits} prompt positions from the prefix cache")
    });
    vec![
        Row {
            figure: format!("{path}_clients_tok_s"),
            streams: clients,
            unit: "tok/s",
            samples: vec![rate],
            note: format!(
                "{} requests, {tokens} tokens in {:.1} s{engine}",
                run.requests.len(),
                run.wall.as_secs_f64()
            ),
        },
        Row {
            figure: format!("{path}_ttft_ms"),
            streams: clients,
            unit: "ms",
            samples: run.requests.iter().map(|t| ms(&t.ttft)).collect(),
            note: "submit to first token, every request".into(),
        },
        Row {
            figure: format!("{path}_itl_ms"),
            streams: clients,
            unit: "ms",
            samples: run
                .requests
                .iter()
                .flat_map(|t| t.gaps.iter().map(ms))
                .collect(),
            note: "every gap between tokens".into(),
        },
    ]
}

fn main() -> BoxResult<()> {
    let args = Args::parse();
    let say = |m: String| {
        if !args.json {
            eprintln!("{m}");
        }
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(3600)))
        .build()
        .into();
    let options = EngineOptions {
        threads: args.threads,
        kv_cache: mipha_models::KvCacheSize::Mib(args.kv_cache_mb),
        ..Default::default()
    };
    let mut results: Vec<(usize, f64, f64)> = Vec::new();
    let (url, server, model_name) = match (&args.model, &args.url) {
        (Some(model), _) => {
            let (url, handle) = start_server(model.clone(), options.clone())?;
            (url, Some(handle), "loadgen".to_string())
        }
        (None, Some(u)) => (
            u.trim_end_matches('/').to_string(),
            None,
            args.model_name.clone(),
        ),
        (None, None) => return Err("give --model (served here) or --url".into()),
    };
    if !args.json {
        println!("figure                 clients  value");
    }
    for &c in &args.clients {
        let work = workload(&args, c)?;
        // A first request warms the server (pages in the weights).
        http_request(&agent, &url, &model_name, &work[0][0], 2)?;
        say(format!("http, {c} clients ..."));
        let before = server
            .as_ref()
            .map(|s| engine_counts(s.app.engine_if_loaded().map(|e| &**e)));
        let run = closed_loop(work, |a| {
            http_request(&agent, &url, &model_name, a, args.max_tokens)
        })?;
        let after = server
            .as_ref()
            .map(|s| engine_counts(s.app.engine_if_loaded().map(|e| &**e)));
        let r = rows("http", c, &run, difference(before, after));
        for row in &r {
            row.print(args.json);
        }
        results.push((c, r[0].samples[0], 0.0));
    }
    drop(server);
    if let Some(model) = &args.model {
        let engine = Engine::load(model, options)?;
        for (i, &c) in args.clients.iter().enumerate() {
            let work = workload(&args, c)?;
            library_request(&engine, &work[0][0], 2)?;
            say(format!("library, {c} clients ..."));
            let before = Some(engine_counts(Some(&engine)));
            let run = closed_loop(work, |a| library_request(&engine, a, args.max_tokens))?;
            let after = Some(engine_counts(Some(&engine)));
            let r = rows("library", c, &run, difference(before, after));
            for row in &r {
                row.print(args.json);
            }
            results[i].2 = r[0].samples[0];
        }
        for (c, http, lib) in results {
            Row {
                figure: "http_overhead_pct".into(),
                streams: c,
                unit: "%",
                samples: vec![100.0 * (1.0 - http / lib)],
                note: format!(
                    "1 - http ÷ library aggregate tok/s ({http:.2} ÷ {lib:.2}); target ≤ 3 %"
                ),
            }
            .print(args.json);
        }
    }
    Ok(())
}

/// Preemptions and prefix-cache hit positions so far.
fn engine_counts(e: Option<&Engine>) -> (u64, u64) {
    e.map_or((0, 0), |e| {
        let s = e.stats();
        (s.preemptions, s.prefix_hit_positions)
    })
}

fn difference(a: Option<(u64, u64)>, b: Option<(u64, u64)>) -> Option<(u64, u64)> {
    Some((b?.0 - a?.0, b?.1 - a?.1))
}

/// `mipha-server` on 127.0.0.1, any port, in a runtime of its own; its base
/// URL once ready. Dropping the handle stops it.
fn start_server(model: PathBuf, options: EngineOptions) -> BoxResult<(String, ServerHandle)> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()?;
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    let app = Arc::new(mipha_server::App::new(
        "loadgen".into(),
        None,
        None,
        64 << 20,
    ));
    app.set_engine(Arc::new(Engine::load(&model, options)?));
    let handle_app = app.clone();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let serving = rt.spawn(mipha_server::serve(
        listener,
        app,
        Duration::from_secs(5),
        async {
            let _ = rx.await;
        },
    ));
    Ok((
        format!("http://{addr}"),
        ServerHandle {
            app: handle_app,
            rt: Some(rt),
            stop: Some(tx),
            serving: Some(serving),
        },
    ))
}

struct ServerHandle {
    app: Arc<mipha_server::App>,
    rt: Option<tokio::runtime::Runtime>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    serving: Option<tokio::task::JoinHandle<Result<(), String>>>,
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let (Some(rt), Some(h)) = (self.rt.take(), self.serving.take()) {
            let _ = rt.block_on(h);
        }
    }
}
