//! Steady-state decode allocates nothing: a counting global allocator sees every
//! allocation and reallocation on every thread (the step loop, the engine's
//! rayon workers and the consumers' threads) while decode steps run, greedy and
//! sampled, on 2 and 3 threads, f32 and Q8_0 weights, one sequence and several
//! decoded together in batched steps, and through the loops users run
//! ([`Engine::generate`], [`Session::ask`]).
//!
//! The loop runs ahead of a stream's reader by at most [`STREAM_WINDOW`] tokens
//! (flow control), so a reader at token `WARM_UP` knows the loop is past its
//! request's first steps (admission, prefill: those allocate) and no further
//! than `WARM_UP + STREAM_WINDOW`, and a reader at token `total - STREAM_WINDOW
//! - 1` knows the loop has not yet ended the request. The window between those
//! two points holds at least `MEASURED` steady-state steps of the loop.
//!
//! The steps measured span many KV block boundaries (these engines page every 4
//! positions). One test goes on to the end of the context (past the length where
//! decode attention splits over the sequence).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use mipha_models::{
    Engine, EngineOptions, GenerateOptions, GenerateRequest, PromptItem, SamplingParams, Session,
    StopReason, StreamEvent, STREAM_WINDOW,
};
use mipha_tests::*;

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicUsize = AtomicUsize::new(0);
static REALLOCS: AtomicUsize = AtomicUsize::new(0);
/// Backtraces of the first allocations of a window, as a hint to where they are.
static TRACES: Mutex<Vec<String>> = Mutex::new(Vec::new());
const TRACED: usize = 3;

thread_local! {
    /// Set while this thread records a backtrace (which allocates, uncounted).
    static TRACING: Cell<bool> = const { Cell::new(false) };
}

#[global_allocator]
static GLOBAL: Counting = Counting;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(&ALLOCS);
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(&ALLOCS);
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(&REALLOCS);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

fn note(counter: &AtomicUsize) {
    if !COUNTING.load(Ordering::SeqCst) || TRACING.with(|t| t.get()) {
        return;
    }
    let before = ALLOCS.load(Ordering::SeqCst) + REALLOCS.load(Ordering::SeqCst);
    counter.fetch_add(1, Ordering::SeqCst);
    if before < TRACED {
        TRACING.with(|t| t.set(true));
        let trace = std::backtrace::Backtrace::force_capture().to_string();
        if let Ok(mut traces) = TRACES.lock() {
            traces.push(trace);
        }
        TRACING.with(|t| t.set(false));
    }
}

/// Allocations seen between [`Window::open`] and [`Window::close`].
struct Window;

#[derive(Debug)]
struct Counted {
    allocs: usize,
    reallocs: usize,
}

impl Window {
    fn open() -> Window {
        TRACES.lock().unwrap().clear();
        ALLOCS.store(0, Ordering::SeqCst);
        REALLOCS.store(0, Ordering::SeqCst);
        COUNTING.store(true, Ordering::SeqCst);
        Window
    }
    fn close(self) -> Counted {
        COUNTING.store(false, Ordering::SeqCst);
        Counted {
            allocs: ALLOCS.load(Ordering::SeqCst),
            reallocs: REALLOCS.load(Ordering::SeqCst),
        }
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        COUNTING.store(false, Ordering::SeqCst);
    }
}

/// Panics with the counts and where the first allocations came from.
fn assert_none(what: &str, c: Counted) {
    if c.allocs + c.reallocs == 0 {
        return;
    }
    let traces = TRACES.lock().unwrap().clone();
    let mut hint = String::new();
    for t in &traces {
        // skip the allocator's own frames; keep the rest short
        let frames: Vec<&str> = t
            .lines()
            .skip_while(|l| !l.contains("zero_alloc_decode::note"))
            .skip(2)
            .take(40)
            .collect();
        hint.push_str("\n--- allocation site ---\n");
        hint.push_str(&frames.join("\n"));
    }
    panic!(
        "{what}: {} allocations and {} reallocations after warm-up, expected none{hint}",
        c.allocs, c.reallocs
    );
}

/// The tests share the counters: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const WARM_UP: usize = 2;
const MEASURED: usize = 100;

/// Tokens a request makes so that `MEASURED` steady steps fall in the window.
fn total_tokens() -> usize {
    WARM_UP + 2 * STREAM_WINDOW + MEASURED + 1
}

/// The token at which a reader closes the window (the loop is then still
/// running the request).
fn closing(total: usize) -> usize {
    total - STREAM_WINDOW - 1
}

fn sampled() -> SamplingParams {
    SamplingParams {
        temperature: 0.8,
        top_k: 40,
        top_p: 0.95,
        min_p: 0.02,
        repeat_penalty: 1.3,
        repeat_last_n: 64,
        presence_penalty: 0.2,
        frequency_penalty: 0.1,
        seed: 7,
    }
}

fn options(sampling: SamplingParams) -> GenerateOptions {
    GenerateOptions {
        max_tokens: total_tokens(),
        sampling,
        ignore_eos: true,
        ..Default::default()
    }
}

fn engine(dir: &std::path::Path, quant: &str, threads: usize) -> Arc<Engine> {
    let mqf = convert(&fixture("tiny-a/checkpoint"), dir, quant, "f32");
    let opts = EngineOptions {
        threads,
        max_batch_tokens: 16,
        max_outputs: 16,
        kv_block_size: 4,
        ..Default::default()
    };
    Arc::new(Engine::load(mqf, opts).expect("load engine"))
}

/// Runs `streams` requests at once, each read on a thread of its own, and
/// counts allocations on every thread from the moment every reader is at token
/// `WARM_UP` to the moment every reader is at its closing token. `tokens`:
/// how many each makes (`None`: to the end of the context).
fn steps_allocate_nothing(
    engine: &Arc<Engine>,
    sampling: SamplingParams,
    streams: usize,
    tokens: Option<usize>,
    what: &str,
) {
    let prompts: Vec<Vec<u32>> = (0..streams)
        .map(|i| {
            let words = ["a dragon", "the sea", "a robot", "a garden", "the moon"];
            engine
                .chat_prompt(&format!(
                    "Tell me a long story about {}.",
                    words[i % words.len()]
                ))
                .unwrap()
        })
        .collect();
    let longest = prompts.iter().map(|p| p.len()).max().unwrap();
    let total = tokens.unwrap_or(engine.context_length() - longest);
    assert!(closing(total) > WARM_UP + STREAM_WINDOW + MEASURED / 2);
    let barrier = Arc::new(std::sync::Barrier::new(streams + 1));
    let readers: Vec<_> = prompts
        .into_iter()
        .map(|prompt| {
            let g = engine
                .submit(GenerateRequest {
                    prompt: prompt.iter().map(|&t| PromptItem::Token(t)).collect(),
                    options: GenerateOptions {
                        // to the end of the context: the context stops it first
                        max_tokens: total + tokens.is_none() as usize,
                        ..options(sampling.clone())
                    },
                    ..Default::default()
                })
                .unwrap();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut g = g;
                let mut n = 0;
                let stop = loop {
                    match g.next_event().unwrap() {
                        StreamEvent::Token { .. } => {
                            n += 1;
                            if n == WARM_UP || n == closing(total) {
                                barrier.wait();
                                barrier.wait();
                            }
                        }
                        StreamEvent::Done(f) => break (f.stop, f.tokens.len(), prompt.len()),
                    }
                };
                stop
            })
        })
        .collect();
    barrier.wait();
    let window = Window::open();
    barrier.wait();
    barrier.wait();
    let counted = window.close();
    barrier.wait();
    let ends: Vec<_> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    assert_none(
        &format!(
            "{what}: {streams} streams, {} tokens each after warm-up",
            closing(total) - WARM_UP
        ),
        counted,
    );
    for (stop, produced, prompt) in ends {
        match tokens {
            Some(n) => {
                assert_eq!(stop, StopReason::MaxTokens, "{what}");
                assert_eq!(produced, n, "{what}");
            }
            None => {
                assert_eq!(stop, StopReason::ContextFull, "{what}");
                assert_eq!(prompt + produced, engine.context_length(), "{what}");
            }
        }
    }
}

/// Counts the allocations between a user loop's `on_token` calls `WARM_UP`
/// and its closing token.
struct PerToken {
    n: usize,
    total: usize,
    open: Option<Window>,
    counted: Option<Counted>,
}

impl PerToken {
    fn new() -> Self {
        PerToken {
            n: 0,
            total: total_tokens(),
            open: None,
            counted: None,
        }
    }
    /// Called from `on_token`.
    fn mark(&mut self) {
        self.n += 1;
        if self.n == WARM_UP {
            self.open = Some(Window::open());
        } else if self.n == closing(self.total) {
            self.counted = self.open.take().map(Window::close);
        }
    }
    fn check(self, what: &str) {
        let c = self
            .counted
            .unwrap_or_else(|| panic!("{what}: too short ({} tokens)", self.n));
        assert_none(
            &format!(
                "{what}: between tokens {WARM_UP} and {}",
                closing(self.total)
            ),
            c,
        );
    }
}

#[test]
fn greedy_decode_steps_do_not_allocate() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path(), "f32", 2);
    let n = Some(total_tokens());
    steps_allocate_nothing(
        &e,
        SamplingParams::default(),
        1,
        n,
        "greedy, f32, 2 threads",
    );
}

#[test]
fn sampled_decode_steps_do_not_allocate() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path(), "f32", 2);
    let n = Some(total_tokens());
    steps_allocate_nothing(&e, sampled(), 1, n, "sampled, f32, 2 threads");
}

/// Several sequences decoded together in every step.
#[test]
fn batched_decode_steps_do_not_allocate() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path(), "f32", 2);
    let n = Some(total_tokens());
    steps_allocate_nothing(
        &e,
        SamplingParams::default(),
        4,
        n,
        "greedy, f32, 2 threads",
    );
    steps_allocate_nothing(&e, sampled(), 3, n, "sampled, f32, 2 threads");
}

/// Every KV block and every attention length up to the end of the context.
#[test]
fn decode_steps_to_the_end_of_the_context_do_not_allocate() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path(), "f32", 2);
    steps_allocate_nothing(
        &e,
        SamplingParams::default(),
        1,
        None,
        "greedy, f32, 2 threads",
    );
}

#[test]
fn quantized_decode_steps_do_not_allocate() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path(), "q8_0", 3);
    let n = Some(total_tokens());
    steps_allocate_nothing(
        &e,
        SamplingParams::default(),
        1,
        n,
        "greedy, q8_0, 3 threads",
    );
    steps_allocate_nothing(&e, sampled(), 4, n, "sampled, q8_0, 3 threads, batched");
}

#[test]
fn generate_and_ask_do_not_allocate_between_tokens() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path(), "f32", 2);
    let prompt = e
        .chat_prompt("Tell me a long story about a dragon.")
        .unwrap();

    let mut per = PerToken::new();
    let g = e
        .generate(&prompt, &options(SamplingParams::default()), |_, _| {
            per.mark();
            true
        })
        .unwrap();
    per.check("Engine::generate, greedy");
    assert_eq!(g.tokens.len(), total_tokens());

    let mut s = Session::new(e.clone());
    for turn in ["Tell me a long story about a dragon.", "And then?"] {
        let mut per = PerToken::new();
        let mut text = String::with_capacity(1 << 16);
        let r = s
            .ask(turn, &options(sampled()), None, |_, piece| {
                per.mark();
                // the caller's own buffer, sized ahead
                text.push_str(piece);
                true
            })
            .unwrap();
        per.check(&format!("Session::ask, sampled, turn {turn:?}"));
        assert_eq!(r.text, text, "the reply's text is the streamed pieces");
    }
}
