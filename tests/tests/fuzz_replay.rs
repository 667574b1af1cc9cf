//! The fuzz targets replayed on stable Rust (CI has no nightly; the cargo-fuzz
//! targets in `fuzz/` run the same functions, see `docs/fuzzing.md`): a seed
//! corpus built in code, plus deterministic mutations of it per target (a
//! seeded xorshift PRNG: byte flips, truncations, splices, and structure-aware
//! rewrites that keep each format's framing and checksums valid, including
//! every `.mqf` metadata key set to every boundary value).
//!
//! Each case must end in `Ok` or `Err` (a refused input is fine). A case fails
//! when it panics (anywhere: the panic hook sees every thread's), aborts (a
//! SIGABRT handler names the case before the process dies), hangs (more than
//! `MIPHA_FUZZ_HANG_SECS`, default 20 s) or allocates beyond the budget (one
//! allocation over 512 MiB, or over 2 GiB more live than at the case's start).
//! An over-budget allocation is never made: the counting allocator records it
//! and parks the allocating thread, and the test fails naming the case, so a
//! runaway allocation is a test failure with a case id, not an OOM kill or an
//! "memory allocation failed" abort. Failing cases are listed together at the
//! end of each target, with the file of the input (to replay with
//! `cargo fuzz run <target> <file>`).
//!
//! Knobs: `MIPHA_FUZZ_CASES` (random cases per target, default 600, times 5
//! for images, 3 for requests, 1/2 for checkpoints; the systematic cases
//! always run),
//! `MIPHA_FUZZ_SEED`, `MIPHA_FUZZ_ONLY=<target>#<case>` (one case, verbosely),
//! `MIPHA_FUZZ_VERBOSE` (every case and why it was refused),
//! `MIPHA_FUZZ_WRITE_CORPUS=<dir>` (writes the cargo-fuzz seed corpora).

use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use mipha_tests::fuzz_support::mutate::{self, MqfImage, Mutated};
use mipha_tests::fuzz_support::targets::{self, Bundle};
use mipha_tests::fuzz_support::{in_dependency, known, rng, seeds, Rng};

// ------------------------------------------------------------ allocation guard

/// Largest single allocation a case may make.
const MAX_SINGLE: usize = 512 << 20;
/// Most bytes a case may hold beyond what was live when it started.
const MAX_LIVE: usize = 2 << 30;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static ARMED: AtomicBool = AtomicBool::new(false);
static CASE_BASE: AtomicUsize = AtomicUsize::new(0);
/// The first over-budget request of the current case: size (0 = none), the
/// live bytes it would have made, and whether it was the single-size limit.
static VIOLATION_SIZE: AtomicUsize = AtomicUsize::new(0);
static VIOLATION_LIVE: AtomicUsize = AtomicUsize::new(0);
static VIOLATION_SINGLE: AtomicBool = AtomicBool::new(false);

/// Counts live bytes; refuses to serve an over-budget request by parking the
/// thread that made it (the harness sees the record and fails the case).
struct Guard;

fn check(size: usize, grow: usize) {
    if !ARMED.load(Relaxed) {
        return;
    }
    let live = LIVE.load(Relaxed).saturating_add(grow);
    let single = size > MAX_SINGLE;
    if single || live.saturating_sub(CASE_BASE.load(Relaxed)) > MAX_LIVE {
        if VIOLATION_SIZE
            .compare_exchange(0, size.max(1), Relaxed, Relaxed)
            .is_ok()
        {
            VIOLATION_LIVE.store(live, Relaxed);
            VIOLATION_SINGLE.store(single, Relaxed);
        }
        // Unwinding out of an allocator is undefined behaviour, and returning
        // null would abort the whole run with an anonymous message: park the
        // thread instead (nanosleep allocates nothing). It never resumes.
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

unsafe impl GlobalAlloc for Guard {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        check(l.size(), l.size());
        let p = System.alloc(l);
        if !p.is_null() {
            LIVE.fetch_add(l.size(), Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        check(l.size(), l.size());
        let p = System.alloc_zeroed(l);
        if !p.is_null() {
            LIVE.fetch_add(l.size(), Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        LIVE.fetch_sub(l.size(), Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        check(new, new.saturating_sub(l.size()));
        let q = System.realloc(p, l, new);
        if !q.is_null() {
            LIVE.fetch_sub(l.size(), Relaxed);
            LIVE.fetch_add(new, Relaxed);
        }
        q
    }
}

#[global_allocator]
static GUARD: Guard = Guard;

// ------------------------------------------------------------ abort reporting

/// The running case's label, readable from a signal handler.
static LABEL: [AtomicU8; 256] = [const { AtomicU8::new(0) }; 256];
static LABEL_LEN: AtomicUsize = AtomicUsize::new(0);

fn set_label(s: &str) {
    let b = s.as_bytes();
    let n = b.len().min(LABEL.len());
    for (slot, &c) in LABEL.iter().zip(&b[..n]) {
        slot.store(c, Relaxed);
    }
    LABEL_LEN.store(n, Relaxed);
}

extern "C" fn on_abort(_: libc::c_int) {
    let mut buf = [0u8; 256];
    let n = LABEL_LEN.load(Relaxed);
    for (b, slot) in buf.iter_mut().zip(&LABEL[..n]) {
        *b = slot.load(Relaxed);
    }
    let head = b"\nfuzz_replay: the process aborted during case ";
    // SAFETY: write(2) is async-signal-safe; the buffers are valid for their lengths.
    unsafe {
        libc::write(2, head.as_ptr().cast(), head.len());
        libc::write(2, buf.as_ptr().cast(), n);
        libc::write(2, b"\n".as_ptr().cast(), 1);
    }
}

extern "C" fn remove_scratch() {
    targets::remove_scratch_dir();
}

// ------------------------------------------------------------ the harness

/// Panics seen by the hook since the case started (any thread): where, and
/// the whole report.
static PANICS: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

fn panics() -> MutexGuard<'static, Vec<(String, String)>> {
    PANICS.lock().unwrap_or_else(|e| e.into_inner())
}

type Job = Box<dyn FnOnce() -> Result<(), String> + Send>;
type Done = Result<Result<(), String>, String>;

struct Worker {
    jobs: mpsc::Sender<Job>,
    done: mpsc::Receiver<Done>,
}

fn spawn_worker() -> Worker {
    let (jobs, job_rx) = mpsc::channel::<Job>();
    let (done_tx, done) = mpsc::channel();
    std::thread::Builder::new()
        .name("fuzz-case".into())
        // What tokio gives the server's blocking pool.
        .stack_size(2 << 20)
        .spawn(move || {
            for job in job_rx {
                let r = catch_unwind(AssertUnwindSafe(job)).map_err(|p| {
                    p.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "non-string panic".into())
                });
                if done_tx.send(r).is_err() {
                    break;
                }
            }
        })
        .expect("spawn the case worker");
    Worker { jobs, done }
}

/// How a case ended.
enum Outcome {
    Ok,
    Refused(String),
    /// `Ok` or `Err`, after a panic inside a dependency that the code under
    /// test caught (as it should: the image decoders and the converter's
    /// tokenizer loading are guarded so): where.
    Contained(Vec<String>),
    Finding(String),
}

/// Runs cases one at a time on a worker thread, watching for panics, hangs and
/// over-budget allocations. A worker stuck in a case is abandoned.
struct Harness {
    worker: Option<Worker>,
    hang: Duration,
}

impl Harness {
    fn get() -> MutexGuard<'static, Harness> {
        static H: OnceLock<Mutex<Harness>> = OnceLock::new();
        let h = H.get_or_init(|| {
            let default = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                // Outside a case (the tests' own assertions): as usual.
                if !ARMED.load(Relaxed) {
                    return default(info);
                }
                let thread = std::thread::current();
                let msg = info
                    .payload()
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                let at = info
                    .location()
                    .map_or("?".into(), |l| format!("{}:{}", l.file(), l.line()));
                let text = format!(
                    "panic in thread `{}` at {at}: {msg}",
                    thread.name().unwrap_or("?")
                );
                panics().push((at, text));
            }));
            // SAFETY: installs a handler that only reads atomics and calls
            // write(2), and an exit hook (libtest ends with `exit`) that removes
            // this process's scratch files.
            unsafe {
                libc::signal(libc::SIGABRT, on_abort as *const () as libc::sighandler_t);
                libc::atexit(remove_scratch);
            }
            let secs = env_usize("MIPHA_FUZZ_HANG_SECS").unwrap_or(20);
            Mutex::new(Harness {
                worker: None,
                hang: Duration::from_secs(secs as u64),
            })
        });
        h.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(&mut self, label: &str, job: Job) -> Outcome {
        let worker = self.worker.get_or_insert_with(spawn_worker);
        set_label(label);
        panics().clear();
        VIOLATION_SIZE.store(0, Relaxed);
        CASE_BASE.store(LIVE.load(Relaxed), Relaxed);
        ARMED.store(true, Relaxed);
        let start = Instant::now();
        worker.jobs.send(job).expect("worker alive");
        let result = loop {
            match worker.done.recv_timeout(Duration::from_millis(20)) {
                Ok(r) => break Some(r),
                Err(mpsc::RecvTimeoutError::Disconnected) => break None,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            let v = VIOLATION_SIZE.load(Relaxed);
            if v != 0 {
                ARMED.store(false, Relaxed);
                self.worker = None;
                let why = if VIOLATION_SINGLE.load(Relaxed) {
                    format!("asked for one allocation of {v} bytes (limit {MAX_SINGLE})")
                } else {
                    let live = VIOLATION_LIVE.load(Relaxed) - CASE_BASE.load(Relaxed);
                    format!(
                        "would hold {live} bytes more than at its start (limit {MAX_LIVE}; last request {v} bytes)"
                    )
                };
                return Outcome::Finding(format!("allocation over budget: {why}"));
            }
            if start.elapsed() > self.hang {
                ARMED.store(false, Relaxed);
                self.worker = None;
                return Outcome::Finding(format!("hang: no answer after {:?}", self.hang));
            }
        };
        ARMED.store(false, Relaxed);
        let seen = std::mem::take(&mut *panics());
        let texts = || {
            seen.iter()
                .map(|p| p.1.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        };
        match result {
            None => {
                self.worker = None;
                Outcome::Finding("the case worker died".into())
            }
            Some(Err(msg)) => Outcome::Finding(format!("panic escaped: {msg}; {}", texts())),
            Some(Ok(_)) if seen.iter().all(|p| in_dependency(&p.0)) && !seen.is_empty() => {
                Outcome::Contained(seen.into_iter().map(|p| p.0).collect())
            }
            Some(Ok(_)) if !seen.is_empty() => Outcome::Finding(format!(
                "panic (caught inside the code under test): {}",
                texts()
            )),
            Some(Ok(Ok(()))) => Outcome::Ok,
            Some(Ok(Err(e))) => Outcome::Refused(e),
        }
    }
}

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn cases() -> usize {
    env_usize("MIPHA_FUZZ_CASES").unwrap_or(600)
}

fn base_seed() -> u64 {
    std::env::var("MIPHA_FUZZ_SEED")
        .ok()
        .and_then(|v| {
            let v = v.trim_start_matches("0x");
            u64::from_str_radix(v, 16).ok()
        })
        .unwrap_or(0x5eed_f022)
}

fn case_seed(target: &str, i: usize) -> u64 {
    let t = target.bytes().fold(0u64, |h, b| rng::mix(h ^ b as u64));
    rng::mix(base_seed() ^ t ^ rng::mix(i as u64))
}

/// A target's cases: how many systematic ones, and case `i`'s input (`None`:
/// left out, with the known finding it would reach).
struct Plan {
    name: &'static str,
    systematic: usize,
    random: usize,
    case: Box<dyn Fn(usize) -> Result<Mutated, &'static str>>,
}

/// Runs a plan's cases and fails with every finding.
fn replay(plan: Plan) {
    let mut h = Harness::get();
    let only = std::env::var("MIPHA_FUZZ_ONLY").ok();
    let verbose = std::env::var_os("MIPHA_FUZZ_VERBOSE").is_some();
    let total = plan.systematic + plan.random;
    let t0 = Instant::now();
    let (mut ok, mut refused, mut skipped) = (0, 0, 0);
    let mut contained: Vec<String> = Vec::new();
    let mut findings = Vec::new();
    let mut skips: Vec<&str> = Vec::new();
    for i in 0..total {
        let label = format!("{}#{i}", plan.name);
        if let Some(o) = &only {
            if *o != label {
                continue;
            }
        }
        let (input, what) = match (plan.case)(i) {
            Ok(m) => m,
            Err(why) => {
                skipped += 1;
                if !skips.contains(&why) {
                    skips.push(why);
                }
                continue;
            }
        };
        let kind = if i < plan.systematic {
            "systematic"
        } else {
            "random"
        };
        let desc = format!(
            "{label} ({kind}, seed {:#018x}, {} bytes): {what}",
            case_seed(plan.name, i),
            input.len()
        );
        if only.is_some() || verbose {
            eprintln!("{desc}");
        }
        let name = plan.name;
        let data = input.clone();
        let outcome = h.run(&label, Box::new(move || targets::run(name, &data)));
        match outcome {
            Outcome::Ok => ok += 1,
            // The seeds are the valid inputs the mutations start from.
            Outcome::Refused(e) if what.starts_with("seed ") => {
                eprintln!("FINDING {desc}\n  a seed is refused: {e}");
                findings.push(format!("{desc}\n    a seed is refused: {e}"));
            }
            Outcome::Refused(e) => {
                if only.is_some() || verbose {
                    eprintln!("  refused: {e}");
                }
                refused += 1;
            }
            Outcome::Contained(at) => {
                refused += 1;
                for a in at {
                    if !contained.contains(&a) {
                        eprintln!(
                            "{desc}\n  a dependency panicked at {a}; the code under test caught it"
                        );
                        contained.push(a);
                    }
                }
            }
            Outcome::Finding(f) => {
                let file = save(&label, &input);
                eprintln!("FINDING {desc}\n  {f}\n  input: {}", file.display());
                let hang = f.starts_with("hang");
                findings.push(format!("{desc}\n    {f}\n    input: {}", file.display()));
                if hang {
                    // The stuck thread may spin on a core: stop this target here.
                    findings.push(format!(
                        "(the rest of {} was not run after the hang)",
                        plan.name
                    ));
                    break;
                }
            }
        }
    }
    eprintln!(
        "{}: {total} cases ({} systematic) in {:.1} s: {ok} ok, {refused} refused, {skipped} left out{}, {} dependency panics contained, {} findings",
        plan.name,
        plan.systematic,
        t0.elapsed().as_secs_f64(),
        if skips.is_empty() {
            String::new()
        } else {
            format!(" (known: {})", skips.join("; "))
        },
        contained.len(),
        findings.len()
    );
    assert!(
        findings.is_empty(),
        "{} of {total} {} cases failed:\n  {}",
        findings.len(),
        plan.name,
        findings.join("\n  ")
    );
}

/// Keeps a failing input for replaying (`cargo fuzz run <target> <file>`).
fn save(label: &str, input: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join("mipha-fuzz-findings");
    let _ = std::fs::create_dir_all(&dir);
    let p = dir.join(label.replace('#', "-"));
    let _ = std::fs::write(&p, input);
    p
}

/// Picks one of `seeds` for a case, the first ones more often.
fn pick_seed<'a, T>(rng: &mut Rng, seeds: &'a [T]) -> &'a T {
    let i = rng.below(seeds.len() * 2).min(rng.below(seeds.len() * 2)) % seeds.len();
    &seeds[i]
}

// ------------------------------------------------------------ the targets

#[test]
fn mqf_files() {
    // tiny-a (the full Phi-2 tokenizer) takes ~0.1 s a load: a few cases only.
    let seeds = seeds::mqf(true);
    let images: Vec<MqfImage> = seeds
        .iter()
        .map(|(n, b)| MqfImage::parse(b).unwrap_or_else(|| panic!("seed {n} does not open")))
        .collect();
    let raw: Vec<Vec<u8>> = seeds.iter().map(|s| s.1.clone()).collect();
    let micro = images[0].clone();
    let systematic = mutate::mqf_systematic_count(&micro);
    let n_seeds = raw.len();
    let plan = Plan {
        name: "mqf",
        systematic,
        random: n_seeds + cases(),
        case: Box::new(move |i| {
            let (bytes, what) = if i < systematic {
                let (img, what) = mutate::mqf_systematic(&micro, i);
                (img.encode(), what)
            } else if i < systematic + n_seeds {
                let k = i - systematic;
                (raw[k].clone(), format!("seed {}", seeds[k].0))
            } else {
                let mut rng = Rng::new(case_seed("mqf", i));
                // tiny-a only now and then.
                let k = if rng.chance(1, 40) {
                    n_seeds - 1
                } else {
                    rng.below(n_seeds - 1)
                };
                let allow =
                    |p: &str, v: &serde_json::Value| known::tokenizer_json_skip(p, v).is_none();
                let (b, what) = if rng.chance(1, 10) {
                    let donors: Vec<&[u8]> = raw.iter().map(Vec::as_slice).collect();
                    mutate::bytes(&mut rng, &raw[k], &donors)
                } else {
                    mutate::mqf(&mut rng, &images[k], &allow)
                };
                (b, format!("{}: {what}", seeds[k].0))
            };
            match MqfImage::parse(&bytes).and_then(|img| known::mqf_skip(&img)) {
                Some(why) => Err(why),
                None => Ok((bytes, what)),
            }
        }),
    };
    replay(plan);
}

#[test]
fn checkpoint_folders() {
    let seeds = seeds::checkpoint();
    let bundles: Vec<Bundle> = seeds.iter().map(|(_, b)| Bundle::decode(b)).collect();
    let systematic = mutate::checkpoint_systematic_count(&bundles[0]);
    let n_seeds = seeds.len();
    let plan = Plan {
        name: "checkpoint",
        systematic,
        random: n_seeds + cases() / 2,
        case: Box::new(move |i| {
            if i < systematic {
                return mutate::checkpoint_systematic(&bundles[0], i).ok_or("no such case");
            }
            if i < systematic + n_seeds {
                let k = i - systematic;
                return Ok((seeds[k].1.clone(), format!("seed {}", seeds[k].0)));
            }
            let mut rng = Rng::new(case_seed("checkpoint", i));
            let k = pick_seed(&mut rng, &bundles);
            Ok(mutate::checkpoint(&mut rng, k))
        }),
    };
    replay(plan);
}

#[test]
fn images() {
    let seeds = seeds::image();
    let n_seeds = seeds.len();
    let plan = Plan {
        name: "image",
        systematic: 0,
        random: n_seeds + cases() * 5,
        case: Box::new(move |i| {
            if i < n_seeds {
                return Ok((seeds[i].1.clone(), format!("seed {}", seeds[i].0)));
            }
            let mut rng = Rng::new(case_seed("image", i));
            let (name, b) = pick_seed(&mut rng, &seeds);
            let donors: Vec<&[u8]> = seeds.iter().map(|s| s.1.as_slice()).collect();
            let (out, what) = mutate::image(&mut rng, b, &donors);
            Ok((out, format!("{name}: {what}")))
        }),
    };
    replay(plan);
}

#[test]
fn chats() {
    // Built outside any case (a case that hung inside a OnceLock's init would
    // block every later one).
    let _ = targets::phi2_tokenizer();
    let seeds = seeds::chat();
    let n_seeds = seeds.len();
    let plan = Plan {
        name: "chat",
        systematic: 0,
        random: n_seeds + cases(),
        case: Box::new(move |i| {
            if i < n_seeds {
                return Ok((seeds[i].1.clone(), format!("seed {}", seeds[i].0)));
            }
            let mut rng = Rng::new(case_seed("chat", i));
            let (name, b) = pick_seed(&mut rng, &seeds);
            let donors: Vec<&[u8]> = seeds.iter().map(|s| s.1.as_slice()).collect();
            let (mut out, mut what) = mutate::chat(&mut rng, b, &donors);
            if rng.chance(1, 3) {
                let (o, w) = mutate::chat(&mut rng, &out, &donors);
                out = o;
                what = format!("{what}, {w}");
            }
            Ok((out, format!("{name}: {what}")))
        }),
    };
    replay(plan);
}

#[test]
fn requests() {
    let _ = (targets::phi2_tokenizer(), targets::micro_engine());
    let seeds = seeds::request();
    let values: Vec<serde_json::Value> = seeds
        .iter()
        .map(|(_, b)| serde_json::from_slice(b).unwrap())
        .collect();
    // Every number of the fullest body at every boundary value.
    let full = values[1].clone();
    let systematic = mutate::json_number_paths(&full).len() * mutate::json_numbers().len();
    let n_seeds = seeds.len();
    let plan = Plan {
        name: "request",
        systematic,
        random: n_seeds + cases() * 3,
        case: Box::new(move |i| {
            if i < systematic {
                return mutate::request_systematic(&full, i).ok_or("no such case");
            }
            if i < systematic + n_seeds {
                let k = i - systematic;
                return Ok((seeds[k].1.clone(), format!("seed {}", seeds[k].0)));
            }
            let mut rng = Rng::new(case_seed("request", i));
            let (name, b) = pick_seed(&mut rng, &seeds);
            let donors: Vec<&[u8]> = seeds.iter().map(|s| s.1.as_slice()).collect();
            let (out, what) = mutate::request(&mut rng, b, &donors);
            Ok((out, format!("{name}: {what}")))
        }),
    };
    replay(plan);
}

// ------------------------------------------------------------ the harness itself

#[test]
fn the_harness_reports_panics_hangs_and_huge_allocations() {
    let mut h = Harness::get();
    let saved = h.hang;
    h.hang = Duration::from_millis(500);
    let outcome = |o: Outcome| match o {
        Outcome::Finding(f) => f,
        Outcome::Ok => "ok".into(),
        Outcome::Refused(_) => "refused".into(),
        Outcome::Contained(at) => format!("contained at {at:?}"),
    };
    let f = outcome(h.run("self#panic", Box::new(|| panic!("deliberate"))));
    assert!(
        f.contains("deliberate") && f.contains("fuzz_replay.rs"),
        "{f}"
    );
    let f = outcome(h.run(
        "self#caught",
        Box::new(|| {
            let _ = catch_unwind(|| panic!("swallowed"));
            Ok(())
        }),
    ));
    assert!(
        f.contains("caught inside") && f.contains("swallowed"),
        "{f}"
    );
    let f = outcome(h.run(
        "self#alloc",
        Box::new(|| {
            let v = std::hint::black_box(vec![0u8; 1 << 30]);
            Err(format!("{}", v.len()))
        }),
    ));
    assert!(f.contains("one allocation of 1073741824 bytes"), "{f}");
    let f = outcome(h.run(
        "self#live",
        Box::new(|| {
            let v: Vec<Vec<u8>> = (0..5)
                .map(|_| std::hint::black_box(vec![0u8; 500 << 20]))
                .collect();
            Err(format!("{}", v.len()))
        }),
    ));
    assert!(f.contains("more than at its start"), "{f}");
    let f = outcome(h.run(
        "self#hang",
        Box::new(|| {
            std::thread::sleep(Duration::from_secs(3));
            Ok(())
        }),
    ));
    assert!(f.starts_with("hang"), "{f}");
    assert_eq!(outcome(h.run("self#ok", Box::new(|| Ok(())))), "ok");
    assert_eq!(
        outcome(h.run("self#err", Box::new(|| Err("no".into())))),
        "refused"
    );
    h.hang = saved;
}

/// A case that aborts takes the process down; the SIGABRT handler must have
/// named it first. (Run in a child process: this binary, this test, with
/// `MIPHA_FUZZ_SELFTEST_ABORT` set.)
#[test]
fn an_abort_names_its_case() {
    if std::env::var_os("MIPHA_FUZZ_SELFTEST_ABORT").is_some() {
        let mut h = Harness::get();
        h.run("self#abort", Box::new(|| std::process::abort()));
        unreachable!("the case aborts");
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "an_abort_names_its_case",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("MIPHA_FUZZ_SELFTEST_ABORT", "1")
        .output()
        .expect("run the child");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the child did not abort: {stderr}");
    assert!(
        stderr.contains("the process aborted during case self#abort"),
        "{stderr}"
    );
}

/// `MIPHA_FUZZ_WRITE_CORPUS=<dir>` writes every target's seeds to
/// `<dir>/<target>/` (a relative dir is taken from the repository root), the
/// cargo-fuzz corpus layout: `MIPHA_FUZZ_WRITE_CORPUS=fuzz/corpus`.
#[test]
fn write_corpus_when_asked() {
    let Some(dir) = std::env::var_os("MIPHA_FUZZ_WRITE_CORPUS") else {
        return;
    };
    let dir = PathBuf::from(dir);
    let dir = if dir.is_relative() {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(dir)
    } else {
        dir
    };
    // Without tiny-a's 6 MB file: libFuzzer sizes its inputs by the largest seed.
    let n = seeds::write_corpus(&dir, false).expect("write the corpus");
    eprintln!("wrote {n} seed files under {}", dir.display());
}

#[test]
fn known_findings_still_skipped_are_listed() {
    for (name, what) in known::active() {
        eprintln!("skipped while unfixed: {name}: {what}");
    }
}
