//! Figures with several requests at once, sent through `Engine::submit` the
//! way a server's clients send them, each stream read on a thread of its own
//! that notes when every token arrives (what a client sees: the step loop's
//! batching, flow control and text decoding included).
//!
//! - `batch_decode_tok_s` and `itl_ms`: k streams decoding together, nothing
//!   else running;
//! - `ttft_ms` and `clients_tok_s`: k clients in a closed loop, each sending
//!   its next request as soon as its previous one ends;
//! - `image_itl_ms` and `ttft_image_under_load_ms`: a picture request arriving
//!   while k − 1 text streams decode.
//!
//! `bench/README.md` defines each figure; the constants here are its numbers.

use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mipha_models::image::load_image;
use mipha_models::{
    Engine, Finished, GenerateOptions, GenerateRequest, Generating, PromptId, PromptItem,
    SamplingParams, StopReason, StreamEvent, Turn,
};

use crate::worker::{emit, Raw};

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

/// Tokens of each stream left out before the steady-state window opens: the
/// first comes from the prefill, and the next steps still see the other
/// streams' prefills and the loop settling.
pub const WARMUP_TOKENS: usize = 4;
/// Prompt length of the streams that decode (as `decode_tok_s`'s short context).
pub const DECODE_PROMPT: usize = 16;
/// Prompt length of each closed-loop client request.
pub const CLIENT_PROMPT: usize = 64;
/// Most tokens a text stream decodes while a picture request is on its way
/// (the streams are cancelled once the picture's first token is out).
const BACKGROUND_TOKENS: usize = 1024;

/// What the streams figures need from the run's settings.
pub struct StreamsSpec<'a> {
    pub reps: usize,
    pub gen: usize,
    /// concurrency levels of the batch and closed-loop figures
    pub streams: &'a [usize],
    /// the picture request's `streams` (k − 1 text streams plus it); 0: none
    pub image_streams: usize,
    pub image: Option<&'a Path>,
    pub question: &'a str,
}

static NEXT_PROMPT: AtomicU64 = AtomicU64::new(1);

/// `n` ordinary token ids that no other prompt of this process shares a block
/// with: the first two ids number the prompt, so the prefix cache, which names
/// blocks by their content from the start, shares nothing between them.
pub fn distinct_ids(n: usize) -> Vec<u32> {
    let id = NEXT_PROMPT.fetch_add(1, Ordering::Relaxed);
    (0..n as u64)
        .map(|i| {
            let v = match i {
                0 => id % 5000,
                1 => id / 5000 % 5000,
                _ => splitmix64(id << 20 ^ i) % 5000,
            };
            100 + v as u32
        })
        .collect()
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn text_request(ids: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        prompt: ids.into_iter().map(PromptItem::Token).collect(),
        options: GenerateOptions {
            max_tokens,
            ignore_eos: true,
            sampling: SamplingParams::default(),
            ..GenerateOptions::default()
        },
        ..GenerateRequest::default()
    }
}

/// Reads `g` to its end on this thread: when each token arrived, and how the
/// request ended. `count`, when given, follows the tokens read so far.
pub fn read_stream(
    mut g: Generating,
    count: Option<&AtomicUsize>,
) -> BoxResult<(Vec<Instant>, Finished)> {
    let mut times = Vec::new();
    loop {
        match g.next_event()? {
            StreamEvent::Token { .. } => {
                times.push(Instant::now());
                if let Some(c) = count {
                    c.fetch_add(1, Ordering::Release);
                }
            }
            StreamEvent::Done(f) => return Ok((times, f.clone())),
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The `p`-quantile of `v` by nearest rank, as `main.rs` reports `p99`.
fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = (p * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

/// The median, as `main.rs` reports it (and `p50`).
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    match n % 2 {
        1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// One stream's gaps between consecutive tokens with both ends in `[from, to]`,
/// in ms.
fn gaps_within(times: &[Instant], from: Instant, to: Instant) -> Vec<f64> {
    times
        .windows(2)
        .filter(|w| w[0] >= from && w[1] <= to)
        .map(|w| ms(w[1] - w[0]))
        .collect()
}

/// Runs every streams figure, emitting each as soon as it is known.
pub fn run(engine: &Engine, spec: &StreamsSpec, say: &dyn Fn(String)) -> BoxResult<()> {
    batch_figures(engine, spec, say)?;
    client_figures(engine, spec, say)?;
    if let (Some(image), k) = (spec.image, spec.image_streams) {
        if k > 0 && engine.image_config().is_some() {
            image_under_load(engine, spec, image, k, say)?;
        }
    }
    Ok(())
}

/// A note's ratio against one stream's figure and the target.
fn gain(of: f64, one: Option<f64>, what: &str, target: Option<&str>) -> String {
    let mut s = match one {
        Some(one) if one > 0.0 => format!("{:.2}× {what}", of / one),
        _ => String::new(),
    };
    if let Some(t) = target {
        if !s.is_empty() {
            s.push_str(", ");
        }
        s.push_str(t);
    }
    s
}

fn preempted(engine: &Engine, before: u64) -> String {
    match engine.stats().preemptions - before {
        0 => String::new(),
        n => format!("; {n} preemptions"),
    }
}

// ---- k streams decoding together

/// One pass of `k` streams: the aggregate rate over the window, the gaps
/// inside it, and whether there was no window (see [`whole_run`]).
fn batch_once(engine: &Engine, k: usize, gen: usize) -> BoxResult<(f64, Vec<f64>, bool)> {
    // Submitted back to back, before any reader starts: the loop admits them
    // together (or within a step of each other; the warm-up covers that).
    let streams = (0..k)
        .map(|_| engine.submit(text_request(distinct_ids(DECODE_PROMPT), gen)))
        .collect::<Result<Vec<_>, _>>()?;
    let read = std::thread::scope(|s| {
        let readers: Vec<_> = streams
            .into_iter()
            .map(|g| s.spawn(move || read_stream(g, None).map_err(|e| e.to_string())))
            .collect();
        readers
            .into_iter()
            .map(|r| r.join().expect("reader thread"))
            .collect::<Result<Vec<_>, String>>()
    })?;
    for (_, f) in &read {
        if f.stop != StopReason::MaxTokens {
            return Err(format!("a stream stopped early: {}", f.stop.as_str()).into());
        }
    }
    let times: Vec<&Vec<Instant>> = read.iter().map(|(t, _)| t).collect();
    let from = times
        .iter()
        .map(|t| t[WARMUP_TOKENS - 1])
        .max()
        .expect("k >= 1");
    let to = times
        .iter()
        .map(|t| *t.last().expect("max_tokens reached"))
        .min()
        .expect("k >= 1");
    // Each stream's own rate over the window, summed: tokens of one step reach
    // their readers microseconds apart, so counting all streams' tokens between
    // two instants would add or drop a step's tokens at each edge.
    let mut rate = 0.0;
    let mut all = Vec::new();
    for t in &times {
        let gaps = gaps_within(t, from, to);
        let span: f64 = gaps.iter().sum();
        if gaps.is_empty() || span <= 0.0 {
            return Ok(whole_run(&times));
        }
        rate += gaps.len() as f64 / (span / 1e3);
        all.extend(gaps);
    }
    Ok((rate, all, false))
}

/// The rate and gaps after every stream's warm-up, when the streams never
/// all ran at once past it (a model so small that a stream ends before
/// another's reader has read its first tokens): the whole run's tokens over
/// its time, marked so.
fn whole_run(times: &[&Vec<Instant>]) -> (f64, Vec<f64>, bool) {
    let after: Vec<&[Instant]> = times.iter().map(|t| &t[WARMUP_TOKENS - 1..]).collect();
    let from = after.iter().map(|t| t[0]).min().expect("k >= 1");
    let to = after.iter().map(|t| t[t.len() - 1]).max().expect("k >= 1");
    let tokens: usize = after.iter().map(|t| t.len() - 1).sum();
    let gaps = after
        .iter()
        .flat_map(|t| t.windows(2).map(|w| ms(w[1] - w[0])))
        .collect();
    let secs = (to - from).as_secs_f64().max(1e-9);
    (tokens as f64 / secs, gaps, true)
}

fn batch_figures(engine: &Engine, spec: &StreamsSpec, say: &dyn Fn(String)) -> BoxResult<()> {
    if spec.gen < WARMUP_TOKENS + 2 {
        say(format!(
            "batch decode: --gen {} leaves no window after {WARMUP_TOKENS} warm-up tokens, skipped",
            spec.gen
        ));
        return Ok(());
    }
    let mut one: Option<(f64, f64)> = None;
    for &k in spec.streams {
        let before = engine.stats().preemptions;
        let mut rates = Vec::new();
        let mut gaps = Vec::new();
        let mut no_window = false;
        for r in 0..spec.reps {
            let (rate, g, whole) = batch_once(engine, k, spec.gen)?;
            no_window |= whole;
            say(format!(
                "{k} streams: {rate:.2} tok/s aggregate ({}/{})",
                r + 1,
                spec.reps
            ));
            rates.push(rate);
            gaps.extend(g);
        }
        let median_rate = median(&rates);
        let p99 = percentile(&gaps, 0.99);
        if k == 1 {
            one = Some((median_rate, p99));
        }
        let mut tail = preempted(engine, before);
        if no_window {
            tail.push_str("; the streams never decoded all at once: whole-run rate");
        }
        let rate_target = match k {
            4 => Some("target ≥ 3.2×"),
            8 => Some("target ≥ 5×"),
            _ => None,
        };
        let base = format!("{k} × {} greedy tokens", spec.gen);
        let note = |extra: String| match (extra.is_empty(), k) {
            (_, 1) | (true, _) => format!("{base}{tail}"),
            _ => format!("{extra}; {base}{tail}"),
        };
        emit(Raw {
            figure: "batch_decode_tok_s",
            tokens: Some(DECODE_PROMPT),
            streams: Some(k),
            unit: "tok/s",
            samples: rates,
            note: Some(note(gain(
                median_rate,
                one.map(|o| o.0),
                "1 stream",
                rate_target,
            ))),
        });
        emit(Raw {
            figure: "itl_ms",
            tokens: Some(DECODE_PROMPT),
            streams: Some(k),
            unit: "ms",
            samples: gaps,
            note: Some(note(gain(
                p99,
                one.map(|o| o.1),
                "1 stream's p99",
                (k == 4).then_some("target ≤ 1.6×"),
            ))),
        });
    }
    Ok(())
}

// ---- k clients in a closed loop

/// One client request as its client saw it.
struct Sent {
    measured: bool,
    submitted: Instant,
    first: Option<Instant>,
    tokens: Vec<Instant>,
    ended: Instant,
}

/// One client: a staggered warm-up request, then `measured` requests of `gen`
/// tokens, each sent as soon as the previous one ended.
fn client(
    engine: &Engine,
    index: usize,
    k: usize,
    gen: usize,
    measured: usize,
) -> BoxResult<Vec<Sent>> {
    let mut sent = Vec::new();
    for r in 0..=measured {
        // The first requests all arrive at once; their lengths 1/k, 2/k, … of
        // `gen` spread the later arrivals over a request's span, so each
        // measured request arrives while the other clients decode.
        let max_tokens = match r {
            0 => (gen * (index + 1)).div_ceil(k).max(1),
            _ => gen,
        };
        let submitted = Instant::now();
        let g = engine.submit(text_request(distinct_ids(CLIENT_PROMPT), max_tokens))?;
        let (tokens, f) = read_stream(g, None)?;
        let ended = Instant::now();
        if f.stop != StopReason::MaxTokens {
            return Err(format!("a client request stopped early: {}", f.stop.as_str()).into());
        }
        sent.push(Sent {
            measured: r > 0,
            submitted,
            first: tokens.first().copied(),
            tokens,
            ended,
        });
    }
    Ok(sent)
}

fn client_figures(engine: &Engine, spec: &StreamsSpec, say: &dyn Fn(String)) -> BoxResult<()> {
    if spec.gen == 0 {
        return Ok(());
    }
    let measured = spec.reps;
    let mut one: Option<f64> = None;
    for &k in spec.streams {
        let before = engine.stats().preemptions;
        let clients = std::thread::scope(|s| {
            let handles: Vec<_> = (0..k)
                .map(|c| {
                    s.spawn(move || {
                        client(engine, c, k, spec.gen, measured).map_err(|e| e.to_string())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("client thread"))
                .collect::<Result<Vec<_>, String>>()
        })?;
        let ttft: Vec<f64> = clients
            .iter()
            .flatten()
            .filter(|r| r.measured)
            .filter_map(|r| r.first.map(|f| ms(f - r.submitted)))
            .collect();
        // Steady state: every client past its warm-up request, none done yet.
        let from = clients
            .iter()
            .filter_map(|c| c.iter().find(|r| r.measured).map(|r| r.submitted))
            .max()
            .expect("k >= 1");
        let to = clients
            .iter()
            .filter_map(|c| c.last().map(|r| r.ended))
            .min()
            .expect("k >= 1");
        let tokens = clients
            .iter()
            .flatten()
            .flat_map(|r| &r.tokens)
            .filter(|&&t| t > from && t <= to)
            .count();
        let window = to.saturating_duration_since(from).as_secs_f64();
        if ttft.is_empty() {
            return Err(format!("{k} clients: no first token came").into());
        }
        let p99 = percentile(&ttft, 0.99);
        let p50 = median(&ttft);
        say(format!(
            "{k} clients: time to first token p50 {p50:.0} ms, p99 {p99:.0} ms; {} tokens in {window:.1} s",
            tokens
        ));
        let tail = preempted(engine, before);
        emit(Raw {
            figure: "ttft_ms",
            tokens: Some(CLIENT_PROMPT),
            streams: Some(k),
            unit: "ms",
            samples: ttft,
            note: Some(format!(
                "closed loop: {k} clients × {measured} requests of {} tokens{tail}",
                spec.gen
            )),
        });
        if window > 0.0 && tokens > 0 {
            let rate = tokens as f64 / window;
            if k == 1 {
                one = Some(rate);
            }
            let g = gain(rate, one.filter(|_| k > 1), "1 client", None);
            emit(Raw {
                figure: "clients_tok_s",
                tokens: Some(CLIENT_PROMPT),
                streams: Some(k),
                unit: "tok/s",
                samples: vec![rate],
                note: Some(match g.is_empty() {
                    true => format!("closed loop, prefills included{tail}"),
                    false => format!("{g}; closed loop, prefills included{tail}"),
                }),
            });
        }
    }
    Ok(())
}

// ---- a picture arriving while text streams decode

fn image_under_load(
    engine: &Engine,
    spec: &StreamsSpec,
    image: &Path,
    k: usize,
    say: &dyn Fn(String),
) -> BoxResult<()> {
    let cfg = engine.image_config().expect("checked by the caller");
    let hidden = engine.config().hidden_size;
    let background = k - 1;
    let max_tokens = BACKGROUND_TOKENS.min(
        engine
            .context_length()
            .saturating_sub(DECODE_PROMPT + 1)
            .max(1),
    );
    let before = engine.stats().preemptions;
    let mut gaps = Vec::new();
    let mut ttft = Vec::new();
    let mut positions = 0;
    let mut early = 0;
    for r in 0..spec.reps {
        let streams = (0..background)
            .map(|_| engine.submit(text_request(distinct_ids(DECODE_PROMPT), max_tokens)))
            .collect::<Result<Vec<_>, _>>()?;
        let cancels: Vec<_> = streams.iter().map(|g| g.cancel_token().clone()).collect();
        let counts: Vec<AtomicUsize> = (0..background).map(|_| AtomicUsize::new(0)).collect();
        let (window, read) = std::thread::scope(|s| {
            let readers: Vec<_> = streams
                .into_iter()
                .zip(&counts)
                .map(|(g, c)| s.spawn(move || read_stream(g, Some(c)).map_err(|e| e.to_string())))
                .collect();
            // The picture arrives once every stream decodes steadily.
            while counts
                .iter()
                .any(|c| c.load(Ordering::Acquire) < WARMUP_TOKENS)
                && !readers.iter().any(|r| r.is_finished())
            {
                std::thread::sleep(Duration::from_millis(2));
            }
            let window = picture_request(engine, image, cfg, spec.question, hidden, r);
            for c in &cancels {
                c.cancel();
            }
            let read = readers
                .into_iter()
                .map(|h| h.join().expect("reader thread"))
                .collect::<Result<Vec<_>, String>>();
            (window, read)
        });
        let (t0, t1, n) = window?;
        positions = n;
        for (times, f) in read? {
            // A stream that ended by itself (its token limit, or the context)
            // before being cancelled missed part of what the picture costs.
            if f.stop != StopReason::Cancelled {
                early += 1;
            }
            // Every gap that overlaps the window, the two it cuts included.
            gaps.extend(
                times
                    .windows(2)
                    .filter(|w| w[1] > t0 && w[0] < t1)
                    .map(|w| ms(w[1] - w[0])),
            );
        }
        ttft.push(ms(t1 - t0));
        say(format!(
            "picture under load ({background} text streams): first token after {:.0} ms ({}/{})",
            ttft[r],
            r + 1,
            spec.reps
        ));
    }
    if gaps.is_empty() {
        say("picture under load: no gap of the text streams in the window".into());
        return Ok(());
    }
    let mut tail = preempted(engine, before);
    if early > 0 {
        tail.push_str(&format!(
            "; {early} text streams ended before the picture's first token"
        ));
    }
    emit(Raw {
        figure: "image_itl_ms",
        tokens: Some(positions),
        streams: Some(k),
        unit: "ms",
        samples: gaps,
        note: Some(format!(
            "target p99 ≤ 400 ms; {background} text streams' gaps, picture path to first token{tail}"
        )),
    });
    emit(Raw {
        figure: "ttft_image_under_load_ms",
        tokens: Some(positions),
        streams: Some(k),
        unit: "ms",
        samples: ttft,
        note: Some(format!(
            "path to first token while {background} text streams decode{tail}"
        )),
    });
    Ok(())
}

/// A client's picture request on the library's path, from the image's path to
/// its first token: when it started and got there, and its prompt positions.
fn picture_request(
    engine: &Engine,
    image: &Path,
    cfg: &mipha_models::image::ImageConfig,
    question: &str,
    hidden: usize,
    rep: usize,
) -> BoxResult<(Instant, Instant, usize)> {
    let t0 = Instant::now();
    let mut pixels = load_image(image, cfg)?.pixels;
    // A new picture each time (one value's lowest bit differs): encoded
    // again, and new to the prefix cache (the system prompt's blocks are
    // shared, as on a server).
    pixels[0] = f32::from_bits(pixels[0].to_bits() ^ (rep as u32 + 1));
    let embeds = engine.encode_image(&pixels)?;
    let segments = engine.template().render(&[Turn {
        user: question.to_string(),
        images: 1,
        assistant: None,
    }]);
    let ids = engine.tokenizer().encode_segments(&segments)?;
    let prompt: Vec<PromptItem> = ids
        .iter()
        .map(|id| match id {
            PromptId::Token(t) => PromptItem::Token(*t),
            PromptId::Image(_) => PromptItem::Image(embeds.clone()),
        })
        .collect();
    let positions = prompt
        .iter()
        .map(|p| match p {
            PromptItem::Token(_) => 1,
            PromptItem::Image(i) => i.embeddings().rows(hidden),
        })
        .sum();
    let mut g = engine.submit(GenerateRequest {
        prompt,
        options: GenerateOptions {
            max_tokens: 1,
            ignore_eos: true,
            ..GenerateOptions::default()
        },
        ..GenerateRequest::default()
    })?;
    match g.next_event()? {
        StreamEvent::Token { .. } => Ok((t0, Instant::now(), positions)),
        StreamEvent::Done(f) => Err(format!(
            "the picture request ended without a token: {}",
            f.stop.as_str()
        )
        .into()),
    }
}
