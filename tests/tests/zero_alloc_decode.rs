//! A decode step allocates nothing after warm-up: a counting global allocator sees
//! every allocation and reallocation on every thread (the engine's rayon workers
//! included) while decode steps run, greedy and sampled, on 2 and 3 threads, f32
//! and Q8_0 weights, through [`Engine::decode_with`] / [`Decoder::step`] and through
//! the loops users run ([`Engine::generate`], [`Session::ask`]), which use the same
//! steps.
//!
//! The steps measured span more than 63 tokens (rayon's injector allocates a block
//! per 63 jobs sent into a pool from outside it) and many KV block boundaries
//! (these engines page every 4 positions). One test goes on to the end of the
//! context (past the length where decode attention splits over the sequence).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use mipha_models::{
    DecodeStep, Engine, EngineOptions, GenerateOptions, Logits, SamplingParams, Session, StopReason,
};
use mipha_runtime::Input;
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

fn sampled() -> SamplingParams {
    SamplingParams {
        temperature: 0.8,
        top_k: 40,
        top_p: 0.95,
        min_p: 0.02,
        repeat_penalty: 1.3,
        repeat_last_n: 64,
        seed: 7,
    }
}

fn options(sampling: SamplingParams) -> GenerateOptions {
    GenerateOptions {
        max_tokens: WARM_UP + MEASURED + 8,
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

/// Prefills a chat prompt, then drives [`Decoder::step`] one step at a time:
/// `WARM_UP` steps, then `measured` steps (`None`: to the end of the context)
/// with the allocator counting.
fn steps_allocate_nothing(
    engine: &Engine,
    sampling: SamplingParams,
    measured: Option<usize>,
    what: &str,
) {
    let prompt = engine
        .chat_prompt("Tell me a long story about a dragon.")
        .unwrap();
    let seq = engine.new_sequence();
    let inputs: Vec<Input> = prompt.iter().map(|&t| Input::Token(t)).collect();
    let mut logits = Vec::new();
    engine
        .forward(seq, &inputs, Logits::Last, &mut logits, None)
        .unwrap();
    let mut history = prompt.clone();
    let room = engine.context_length() - prompt.len();
    let steps = measured.unwrap_or(room);
    let opts = GenerateOptions {
        max_tokens: WARM_UP + steps,
        ..options(sampling)
    };
    let (counted, produced, stop) = engine
        .decode_with(seq, &mut logits, &mut history, &opts, None, |d| {
            for _ in 0..WARM_UP {
                assert!(matches!(d.step().unwrap(), DecodeStep::Token { .. }));
            }
            let window = Window::open();
            let mut produced = 0;
            let mut stop = None;
            for _ in 0..steps + 1 {
                match d.step() {
                    Ok(DecodeStep::Token { .. }) => produced += 1,
                    Ok(DecodeStep::Stop(s)) => {
                        stop = Some(s);
                        break;
                    }
                    Err(_) => break,
                }
            }
            (window.close(), produced, stop)
        })
        .unwrap();
    let positions = engine.sequence_len(seq).unwrap();
    engine.release_sequence(seq).unwrap();
    assert_none(&format!("{what}: {produced} decode steps"), counted);
    match measured {
        Some(n) => {
            assert_eq!(produced, n, "{what}: every step gives a token");
            assert_eq!(stop, Some(StopReason::MaxTokens));
            assert_eq!(positions, prompt.len() + WARM_UP + n - 1);
        }
        None => {
            assert_eq!(stop, Some(StopReason::ContextFull), "{what}");
            assert_eq!(positions, engine.context_length() - 1, "{what}");
        }
    }
}

/// Counts the allocations between consecutive `on_token` calls of a user loop.
struct PerToken {
    marks: Vec<usize>,
}

impl PerToken {
    fn new() -> Self {
        PerToken {
            marks: Vec::with_capacity(WARM_UP + MEASURED + 8),
        }
    }
    /// Called from `on_token`: opens the window at the end of warm-up.
    fn mark(&mut self) {
        if self.marks.len() == WARM_UP {
            std::mem::forget(Window::open());
        }
        self.marks
            .push(ALLOCS.load(Ordering::SeqCst) + REALLOCS.load(Ordering::SeqCst));
    }
    fn check(self, what: &str) {
        let c = Window.close();
        assert!(
            self.marks.len() > WARM_UP + MEASURED / 2,
            "{what}: too short"
        );
        let between = self.marks.last().unwrap() - self.marks[WARM_UP];
        assert_none(
            &format!(
                "{what}: between tokens {WARM_UP} and {} (whole window: {c:?})",
                self.marks.len() - 1
            ),
            Counted {
                allocs: between,
                reallocs: 0,
            },
        );
    }
}

#[test]
fn greedy_decode_steps_do_not_allocate() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path(), "f32", 2);
    let n = Some(MEASURED);
    steps_allocate_nothing(&e, SamplingParams::default(), n, "greedy, f32, 2 threads");
}

#[test]
fn sampled_decode_steps_do_not_allocate() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path(), "f32", 2);
    steps_allocate_nothing(&e, sampled(), Some(MEASURED), "sampled, f32, 2 threads");
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
        None,
        "greedy, f32, 2 threads",
    );
}

#[test]
fn quantized_decode_steps_do_not_allocate() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path(), "q8_0", 3);
    let n = Some(MEASURED);
    steps_allocate_nothing(&e, SamplingParams::default(), n, "greedy, q8_0, 3 threads");
    steps_allocate_nothing(&e, sampled(), n, "sampled, q8_0, 3 threads");
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
    assert_eq!(g.tokens.len(), WARM_UP + MEASURED + 8);

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
