//! The C ABI of the Mipha runtime: `include/mipha.h` declares every function
//! and type here (a test checks the two agree). See `docs/c-api.md`.
//!
//! Design:
//! * Handles are opaque pointers to reference-counted objects kept in a
//!   registry: every call looks its handle up first, so a NULL, freed or
//!   foreign pointer (or a session passed as an engine) is an error, never a
//!   dereference. A handle freed while another thread is inside a call on it
//!   stays alive until that call returns.
//! * Every entry point runs under `catch_unwind`: a panic becomes
//!   `MIPHA_ERR_INTERNAL`, never an unwind into C.
//! * Options and reply structs start with `struct_size`: fields beyond the
//!   caller's size are neither read nor written, so a program built against an
//!   older (smaller) header keeps working with a newer library.

// The C names, as the header spells them.
#![allow(non_camel_case_types)]

use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::mem::{align_of, offset_of, size_of};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use mipha_models::image::{decode_bytes, preprocess, DecodeOptions, ImageError, RgbImage};
use mipha_models::{
    CancelToken, DeviceChoice, Engine, EngineOptions, GenerateOptions, KvCacheSize, KvDtype, Reply,
    SamplingParams, Session, StopReason,
};
use mipha_runtime::Error;

/// `MIPHA_ABI_VERSION` of `mipha.h`: bumped on any incompatible change (a
/// removed or changed function or field). Appending fields to the structs or
/// adding functions does not bump it.
pub const MIPHA_ABI_VERSION: u32 = 1;

/// `mipha_status`: what every fallible call returns.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok = 0,
    InvalidArgument = 1,
    Io = 2,
    Format = 3,
    Image = 4,
    ContextFull = 5,
    Busy = 6,
    Cancelled = 7,
    Internal = 8,
    OutOfMemory = 9,
}

/// `mipha_stop_reason` values of `mipha_reply::stop_reason`.
pub mod stop {
    pub const NONE: i32 = 0;
    pub const EOS: i32 = 1;
    pub const MAX_TOKENS: i32 = 2;
    pub const CONTEXT_FULL: i32 = 3;
    pub const CANCELLED: i32 = 4;
    pub const DEADLINE: i32 = 5;
    pub const CALLBACK: i32 = 6;
}

/// `mipha_kv_dtype` values of `mipha_engine_options::kv_dtype`.
pub mod kv_dtype {
    pub const F16: u32 = 0;
    pub const F32: u32 = 1;
}

// ---------------------------------------------------------------------------
// Structs shared with C. No trailing padding (tests check it): a field added
// later always grows `struct_size`.

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct mipha_engine_options {
    pub struct_size: usize,
    /// CPU threads; 0 = one per core
    pub threads: u32,
    /// "cpu" (NULL), "cuda", "cuda:N" or "auto"
    pub device: *const c_char,
    /// KV cache budget in MiB; 0 = the default (1024)
    pub kv_cache_mb: u64,
    // --- after the first version's minimum ---
    /// refuse to load above this many MiB in all; 0 = the memory available
    pub max_memory_mb: u64,
    /// sequences decoded together; 0 = the default (16)
    pub max_sequences: u32,
    /// `MIPHA_KV_F16` (0, default) or `MIPHA_KV_F32`
    pub kv_dtype: u32,
    /// non-zero: check every tensor's checksum at load
    pub verify: c_int,
    /// requests waiting before `MIPHA_ERR_BUSY`; 0 = the default (256)
    pub max_queue: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct mipha_generate_options {
    pub struct_size: usize,
    /// 0 = the default (256)
    pub max_tokens: u32,
    /// 0 = greedy
    pub temperature: f32,
    /// 0 = off
    pub top_k: u32,
    /// 1 = off (0 reads as 1)
    pub top_p: f32,
    /// 0 = off
    pub min_p: f32,
    /// 1 = off (0 reads as 1)
    pub repeat_penalty: f32,
    pub seed: u64,
    pub ignore_eos: c_int,
    // --- after the first version's minimum ---
    /// non-zero: `<|endoftext|>` spelled in the prompt is the control token
    pub parse_special: c_int,
    /// stop (`MIPHA_STOP_DEADLINE`) this many ms after the call starts; 0 = none
    pub deadline_ms: u64,
    /// in [-2, 2]; 0 = off
    pub presence_penalty: f32,
    /// in [-2, 2]; 0 = off
    pub frequency_penalty: f32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct mipha_reply {
    pub struct_size: usize,
    /// UTF-8, NUL-terminated, owned by the caller: `mipha_reply_free`
    pub text: *mut c_char,
    /// bytes of `text`, the NUL excluded
    pub text_len: usize,
    /// positions of the whole conversation's prompt (pictures included)
    pub prompt_tokens: u32,
    pub generated_tokens: u32,
    /// prompt positions found in the KV cache and not computed again
    pub reused_positions: u32,
    /// a `mipha_stop_reason`
    pub stop_reason: c_int,
    pub prefill_ms: f64,
    pub ttft_ms: f64,
    pub decode_tok_s: f64,
    // --- after the first version's minimum ---
    /// prompt positions computed for this turn
    pub prefill_positions: u32,
    pub images_encoded: u32,
    pub images_cached: u32,
    /// times the answer gave its KV up to others and was recomputed
    pub preemptions: u32,
    pub queued_ms: f64,
    pub decode_ms: f64,
    /// decoding, preprocessing and encoding this turn's pictures
    pub image_ms: f64,
    pub prefill_tok_s: f64,
}

/// `int (*)(const char* piece, size_t len, void* user_data)`; non-zero stops.
pub type mipha_token_callback =
    Option<unsafe extern "C" fn(piece: *const c_char, len: usize, user_data: *mut c_void) -> c_int>;

/// Sizes of the first ABI version's structs up to their last required field:
/// smaller `struct_size`s are refused.
pub const ENGINE_OPTIONS_MIN_SIZE: usize = offset_of!(mipha_engine_options, max_memory_mb);
pub const GENERATE_OPTIONS_MIN_SIZE: usize = offset_of!(mipha_generate_options, parse_special);
pub const REPLY_MIN_SIZE: usize = offset_of!(mipha_reply, prefill_positions);

fn field_size<T, F>(_: fn(&T) -> &F) -> usize {
    size_of::<F>()
}

/// `(offset, size)` of each named field of a struct.
macro_rules! fields {
    ($t:ty; $($f:ident),* $(,)?) => {
        [$((offset_of!($t, $f), field_size(|s: &$t| &s.$f))),*]
    };
}

fn engine_options_fields() -> [(usize, usize); 9] {
    fields!(mipha_engine_options; struct_size, threads, device, kv_cache_mb, max_memory_mb,
        max_sequences, kv_dtype, verify, max_queue)
}

fn generate_options_fields() -> [(usize, usize); 13] {
    fields!(mipha_generate_options; struct_size, max_tokens, temperature, top_k, top_p, min_p,
        repeat_penalty, seed, ignore_eos, parse_special, deadline_ms, presence_penalty,
        frequency_penalty)
}

fn reply_fields() -> [(usize, usize); 18] {
    fields!(mipha_reply; struct_size, text, text_len, prompt_tokens, generated_tokens,
        reused_positions, stop_reason, prefill_ms, ttft_ms, decode_tok_s, prefill_positions,
        images_encoded, images_cached, preemptions, queued_ms, decode_ms, image_ms, prefill_tok_s)
}

// ---------------------------------------------------------------------------
// Handles and their registry.

/// `mipha_engine`: a loaded model shared by any number of threads.
pub struct mipha_engine {
    engine: Arc<Engine>,
}

/// `mipha_session`: one conversation; one call at a time.
pub struct mipha_session {
    session: Mutex<Session>,
}

/// `mipha_cancel_token`: stops an answer from any thread.
pub struct mipha_cancel_token {
    token: CancelToken,
}

#[derive(Default)]
struct Registry {
    engines: HashMap<usize, Arc<mipha_engine>>,
    sessions: HashMap<usize, Arc<mipha_session>>,
    tokens: HashMap<usize, Arc<mipha_cancel_token>>,
}

static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(Default::default);

fn registry() -> MutexGuard<'static, Registry> {
    // Nothing panics while holding it; a poisoned lock still holds a sound map.
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

fn register<T>(map: impl FnOnce(&mut Registry) -> &mut HashMap<usize, Arc<T>>, v: T) -> *mut T {
    let arc = Arc::new(v);
    let ptr = Arc::as_ptr(&arc) as *mut T;
    map(&mut registry()).insert(ptr as usize, arc);
    ptr
}

fn lookup<T>(
    map: impl FnOnce(&Registry) -> &HashMap<usize, Arc<T>>,
    ptr: *const T,
    what: &str,
) -> R<Arc<T>> {
    if ptr.is_null() {
        return Err(invalid(format!("the {what} is NULL")));
    }
    map(&registry())
        .get(&(ptr as usize))
        .cloned()
        .ok_or_else(|| invalid(format!("{ptr:p} is not a live {what} handle")))
}

fn unregister<T>(
    map: impl FnOnce(&mut Registry) -> &mut HashMap<usize, Arc<T>>,
    ptr: *const T,
    what: &str,
) {
    if ptr.is_null() {
        return;
    }
    // Dropped outside the registry lock (an engine's drop joins its thread).
    let removed = map(&mut registry()).remove(&(ptr as usize));
    match removed {
        Some(v) => {
            drop(v);
            set_error("");
        }
        None => set_error(&format!("{ptr:p} is not a live {what} handle")),
    }
}

// ---------------------------------------------------------------------------
// Errors.

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: &str) {
    let c = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
    // `try_with`: nothing to record into while the thread's storage is torn down.
    let _ = LAST_ERROR.try_with(|e| *e.borrow_mut() = c);
}

/// Why a call failed.
#[derive(Debug)]
pub struct Failure {
    status: Status,
    message: String,
}

type R<T = ()> = Result<T, Failure>;

fn fail(status: Status, message: impl Into<String>) -> Failure {
    Failure {
        status,
        message: message.into(),
    }
}

fn invalid(message: impl Into<String>) -> Failure {
    fail(Status::InvalidArgument, message)
}

/// Where an error came from: the same runtime error means different things
/// while loading a file and while answering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ctx {
    Load,
    Image,
    Ask,
}

/// The status of a runtime error.
fn status_of(e: &Error, ctx: Ctx) -> Status {
    match e {
        Error::Io { .. } => Status::Io,
        Error::NotMqf { .. }
        | Error::Unsupported { .. }
        | Error::UnsupportedVersion { .. }
        | Error::Corrupt { .. }
        | Error::UnknownQuantType { .. }
        | Error::TensorChecksum { .. }
        | Error::MissingTensor(_)
        | Error::MissingMetadata(_)
        | Error::MetadataType { .. }
        | Error::Shape { .. } => Status::Format,
        // The memory check at load (models/src/engine/memory.rs).
        Error::OutOfMemory(_) => Status::OutOfMemory,
        Error::Config(_) if ctx == Ctx::Load => Status::Format,
        // Outside a load: a request the model cannot take (no vision tower, ...).
        Error::Config(_) => Status::InvalidArgument,
        Error::KvCacheFull { .. } | Error::ContextOverflow { .. } | Error::TextTooLong { .. } => {
            Status::ContextFull
        }
        Error::Busy { .. } => Status::Busy,
        Error::Cancelled(_) => Status::Cancelled,
        // The image decoder's errors (and the picture count) reach us as `Other`.
        Error::Other(_) if ctx == Ctx::Image => Status::Image,
        _ => Status::Internal,
    }
}

fn from_error(e: Error, ctx: Ctx) -> Failure {
    fail(status_of(&e, ctx), e.to_string())
}

fn from_image_error(e: ImageError) -> Failure {
    let status = match e {
        ImageError::Io { .. } => Status::Io,
        _ => Status::Image,
    };
    fail(status, e.to_string())
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}

/// Runs an entry point: its failure (or panic) becomes a status and the
/// thread's last error; success clears the last error.
fn guard(f: impl FnOnce() -> R) -> Status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            set_error("");
            Status::Ok
        }
        Ok(Err(failure)) => {
            set_error(&failure.message);
            failure.status
        }
        Err(p) => {
            set_error(&format!("internal error: {}", panic_message(p.as_ref())));
            Status::Internal
        }
    }
}

/// As [`guard`] for entry points without a status: `fallback` on a panic.
fn guard_value<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(p) => {
            set_error(&format!("internal error: {}", panic_message(p.as_ref())));
            fallback
        }
    }
}

// ---------------------------------------------------------------------------
// Reading the caller's structs.

/// Reads a caller's options struct: the fields that fit in its `struct_size`,
/// our defaults for the rest. A `struct_size` below the first version's
/// minimum is refused; one above ours (a newer header) is accepted when the
/// bytes we do not know are all zero (fields left at their defaults).
///
/// # Safety
/// `ptr` must point to `struct_size` readable bytes.
unsafe fn read_struct<T: Copy>(
    ptr: *const T,
    default: T,
    min: usize,
    fields: &[(usize, usize)],
    what: &str,
) -> R<T> {
    // SAFETY: every version of the struct starts with a `size_t struct_size`.
    let size = unsafe { std::ptr::read_unaligned(ptr as *const usize) };
    if size < min {
        return Err(invalid(format!(
            "{what}.struct_size is {size}, less than the {min} bytes of the first version \
             (set it to sizeof({what}) or start from {what}_default())"
        )));
    }
    let ours = size_of::<T>();
    if size > ours {
        // SAFETY: the caller vouches for `size` readable bytes.
        let tail = unsafe { std::slice::from_raw_parts((ptr as *const u8).add(ours), size - ours) };
        if tail.iter().any(|&b| b != 0) {
            return Err(invalid(format!(
                "{what}.struct_size is {size}: this library knows {ours} bytes and the caller \
                 set fields beyond them (built against a newer mipha.h?)"
            )));
        }
    }
    let mut out = default;
    let n = size.min(ours);
    for &(off, len) in fields {
        if off + len <= n {
            // SAFETY: `off..off+len` is one field, inside both structs.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    (ptr as *const u8).add(off),
                    (&mut out as *mut T as *mut u8).add(off),
                    len,
                )
            };
        }
    }
    Ok(out)
}

fn engine_options(o: &mipha_engine_options) -> R<EngineOptions> {
    let mut e = EngineOptions {
        threads: o.threads as usize,
        ..EngineOptions::default()
    };
    if e.threads > mipha_runtime::cpu::MAX_THREADS {
        return Err(invalid(format!(
            "threads = {} is above the limit of {}",
            o.threads,
            mipha_runtime::cpu::MAX_THREADS
        )));
    }
    if !o.device.is_null() {
        // SAFETY: a non-NULL `device` is a NUL-terminated string (header contract).
        let s = unsafe { CStr::from_ptr(o.device) };
        let s = s
            .to_str()
            .map_err(|_| invalid("the device name is not UTF-8"))?;
        e.device = s.parse::<DeviceChoice>().map_err(invalid)?;
    }
    if o.kv_cache_mb != 0 {
        let mb = usize::try_from(o.kv_cache_mb)
            .ok()
            .filter(|mb| mb.checked_mul(1 << 20).is_some())
            .ok_or_else(|| invalid(format!("kv_cache_mb = {} overflows", o.kv_cache_mb)))?;
        e.kv_cache = KvCacheSize::Mib(mb);
    }
    if o.max_memory_mb != 0 {
        let bytes = o
            .max_memory_mb
            .checked_mul(1 << 20)
            .ok_or_else(|| invalid(format!("max_memory_mb = {} overflows", o.max_memory_mb)))?;
        e.max_memory = Some(bytes);
    }
    if o.max_sequences != 0 {
        if o.max_sequences > 4096 {
            return Err(invalid(format!(
                "max_sequences = {} is above the limit of 4096",
                o.max_sequences
            )));
        }
        e.max_sequences = o.max_sequences as usize;
        e.max_batch_tokens = e.max_batch_tokens.max(e.max_sequences);
    }
    e.kv_dtype = match o.kv_dtype {
        kv_dtype::F16 => KvDtype::F16,
        kv_dtype::F32 => KvDtype::F32,
        other => {
            return Err(invalid(format!(
                "kv_dtype = {other}: expected 0 (f16) or 1 (f32)"
            )))
        }
    };
    e.verify = o.verify != 0;
    if o.max_queue != 0 {
        if o.max_queue > 1 << 20 {
            return Err(invalid(format!(
                "max_queue = {} is above the limit of {}",
                o.max_queue,
                1 << 20
            )));
        }
        e.max_queue = o.max_queue as usize;
    }
    Ok(e)
}

fn generate_options(o: &mipha_generate_options, start: Instant) -> R<GenerateOptions> {
    let d = GenerateOptions::default();
    let or = |v: f32, zero_means: f32| if v == 0.0 { zero_means } else { v };
    let sampling = SamplingParams {
        temperature: o.temperature,
        top_k: o.top_k as usize,
        top_p: or(o.top_p, 1.0),
        min_p: o.min_p,
        repeat_penalty: or(o.repeat_penalty, 1.0),
        presence_penalty: o.presence_penalty,
        frequency_penalty: o.frequency_penalty,
        seed: o.seed,
        ..SamplingParams::default()
    };
    sampling.validate().map_err(invalid)?;
    let deadline = match o.deadline_ms {
        0 => None,
        ms => Some(
            start
                .checked_add(Duration::from_millis(ms))
                .ok_or_else(|| invalid(format!("deadline_ms = {ms} overflows")))?,
        ),
    };
    Ok(GenerateOptions {
        max_tokens: match o.max_tokens {
            0 => d.max_tokens,
            n => n as usize,
        },
        sampling,
        ignore_eos: o.ignore_eos != 0,
        deadline,
        parse_special: o.parse_special != 0,
    })
}

// ---------------------------------------------------------------------------
// Reply text: allocated here, freed by `mipha_reply_free`. The length lives in
// a header before the text, so freeing trusts nothing the caller can change.

const TEXT_HEADER: usize = size_of::<usize>();

fn text_layout(len: usize) -> Layout {
    Layout::from_size_align(TEXT_HEADER + len + 1, align_of::<usize>()).expect("text layout")
}

fn alloc_text(s: &str) -> *mut c_char {
    let layout = text_layout(s.len());
    // SAFETY: the layout is non-zero-sized; the writes stay inside it.
    unsafe {
        let p = alloc(layout);
        if p.is_null() {
            handle_alloc_error(layout);
        }
        (p as *mut usize).write(s.len());
        let text = p.add(TEXT_HEADER);
        std::ptr::copy_nonoverlapping(s.as_ptr(), text, s.len());
        text.add(s.len()).write(0);
        text as *mut c_char
    }
}

/// # Safety
/// `text` came from [`alloc_text`] and was not freed.
unsafe fn free_text(text: *mut c_char) {
    // SAFETY: `alloc_text` put the length `TEXT_HEADER` bytes before the text.
    unsafe {
        let p = (text as *mut u8).sub(TEXT_HEADER);
        let len = (p as *const usize).read();
        dealloc(p, text_layout(len));
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn stop_code(r: StopReason) -> i32 {
    match r {
        StopReason::Eos => stop::EOS,
        StopReason::MaxTokens => stop::MAX_TOKENS,
        StopReason::ContextFull => stop::CONTEXT_FULL,
        StopReason::Cancelled => stop::CANCELLED,
        StopReason::Deadline => stop::DEADLINE,
    }
}

fn sat32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Our reply (text not yet allocated) and its struct: the fields written.
fn reply_struct(r: Option<(&Reply, i32)>) -> mipha_reply {
    let mut out = mipha_reply {
        struct_size: 0,
        text: std::ptr::null_mut(),
        text_len: 0,
        prompt_tokens: 0,
        generated_tokens: 0,
        reused_positions: 0,
        stop_reason: stop::NONE,
        prefill_ms: 0.0,
        ttft_ms: 0.0,
        decode_tok_s: 0.0,
        prefill_positions: 0,
        images_encoded: 0,
        images_cached: 0,
        preemptions: 0,
        queued_ms: 0.0,
        decode_ms: 0.0,
        image_ms: 0.0,
        prefill_tok_s: 0.0,
    };
    if let Some((r, stop)) = r {
        let s = &r.stats;
        // The prompt's positions: the cached ones plus those computed this turn
        // (a preemption recomputes, so count the cached ones only once).
        out.prompt_tokens = sat32(s.reused_positions + s.prefill_positions);
        out.text_len = r.text.len();
        out.generated_tokens = sat32(r.tokens.len());
        out.reused_positions = sat32(s.reused_positions);
        out.stop_reason = stop;
        out.prefill_ms = ms(s.prefill);
        out.ttft_ms = ms(s.time_to_first_token);
        out.decode_tok_s = s.decode_tok_s();
        out.prefill_positions = sat32(s.prefill_positions);
        out.images_encoded = sat32(s.images_encoded);
        out.images_cached = sat32(s.images_cached);
        out.preemptions = sat32(s.preemptions);
        out.queued_ms = ms(s.queued);
        out.decode_ms = ms(s.decode);
        out.image_ms = ms(s.image_preprocess + s.image_encode);
        out.prefill_tok_s = s.prefill_tok_s();
    }
    out
}

/// Writes the fields of `src` that fit in the caller's `size` bytes (zeroing
/// bytes beyond the fields we know); `struct_size` is left as it is.
///
/// # Safety
/// `dst` points to `size` writable bytes, `size >= REPLY_MIN_SIZE`.
unsafe fn write_reply(dst: *mut mipha_reply, size: usize, src: &mipha_reply) {
    let ours = size_of::<mipha_reply>();
    for (off, len) in reply_fields().into_iter().skip(1) {
        if off + len <= size {
            // SAFETY: one field, inside both structs.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    (src as *const mipha_reply as *const u8).add(off),
                    (dst as *mut u8).add(off),
                    len,
                )
            };
        }
    }
    if size > ours {
        // SAFETY: the caller vouches for `size` writable bytes.
        unsafe { std::ptr::write_bytes((dst as *mut u8).add(ours), 0, size - ours) };
    }
}

/// The caller's reply size, checked before any work is done.
///
/// # Safety
/// `out` is NULL or points to a `size_t` at least.
unsafe fn reply_size(out: *mut mipha_reply) -> R<Option<usize>> {
    if out.is_null() {
        return Ok(None);
    }
    // SAFETY: every version of the struct starts with `struct_size`.
    let size = unsafe { std::ptr::read_unaligned(out as *const usize) };
    if size < REPLY_MIN_SIZE {
        return Err(invalid(format!(
            "mipha_reply.struct_size is {size}, less than the {REPLY_MIN_SIZE} bytes of the \
             first version (set it to sizeof(mipha_reply))"
        )));
    }
    Ok(Some(size))
}

// ---------------------------------------------------------------------------
// Small helpers.

/// # Safety
/// `s` is NULL or NUL-terminated.
unsafe fn path_arg(s: *const c_char, what: &str) -> R<PathBuf> {
    if s.is_null() {
        return Err(invalid(format!("the {what} is NULL")));
    }
    // SAFETY: NUL-terminated (header contract).
    let bytes = unsafe { CStr::from_ptr(s) }.to_bytes();
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Ok(PathBuf::from(std::ffi::OsStr::from_bytes(bytes)))
    }
    #[cfg(not(unix))]
    {
        std::str::from_utf8(bytes)
            .map(PathBuf::from)
            .map_err(|_| invalid(format!("the {what} is not UTF-8")))
    }
}

fn lock(h: &mipha_session) -> R<MutexGuard<'_, Session>> {
    match h.session.try_lock() {
        Ok(g) => Ok(g),
        Err(TryLockError::WouldBlock) => Err(fail(
            Status::Busy,
            "the session is in use by another call (a session takes one call at a time)",
        )),
        Err(TryLockError::Poisoned(_)) => Err(fail(
            Status::Internal,
            "the session is unusable after an internal error: free it",
        )),
    }
}

fn session_arg(s: *mut mipha_session) -> R<Arc<mipha_session>> {
    lookup(|r| &r.sessions, s, "session")
}

/// Attaches decoded RGB pixels to the session's next question.
fn attach_rgb(session: &mut Session, image: &RgbImage) -> R {
    let engine = session.engine().clone();
    let cfg = engine
        .image_config()
        .ok_or_else(|| invalid("this model file has no vision tower"))?;
    let prepared = preprocess(image, cfg);
    session
        .attach_pixels(&prepared.pixels)
        .map_err(|e| from_error(e, Ctx::Image))
}

/// The picture count check `Session::attach_image` makes, before decoding.
fn check_one_more_image(session: &Session) -> R {
    let count =
        session.turns().iter().map(|t| t.images).sum::<usize>() + session.pending_images() + 1;
    session
        .engine()
        .check_image_count(count)
        .map_err(|e| from_error(e, Ctx::Image))
}

// ---------------------------------------------------------------------------
// The API.

/// The ABI version this library implements (`MIPHA_ABI_VERSION`).
#[no_mangle]
pub extern "C" fn mipha_abi_version() -> u32 {
    MIPHA_ABI_VERSION
}

/// This thread's message for its last failed call ("" after a success);
/// valid until the next call on this thread. Never NULL.
#[no_mangle]
pub extern "C" fn mipha_last_error() -> *const c_char {
    LAST_ERROR
        .try_with(|e| e.borrow().as_ptr())
        .unwrap_or(c"".as_ptr())
}

/// Defaults for every field.
#[no_mangle]
pub extern "C" fn mipha_engine_options_default() -> mipha_engine_options {
    mipha_engine_options {
        struct_size: size_of::<mipha_engine_options>(),
        threads: 0,
        device: c"cpu".as_ptr(),
        kv_cache_mb: 1024,
        max_memory_mb: 0,
        max_sequences: 16,
        kv_dtype: kv_dtype::F16,
        verify: 0,
        max_queue: 256,
    }
}

/// Defaults for every field (greedy decoding, 256 tokens).
#[no_mangle]
pub extern "C" fn mipha_generate_options_default() -> mipha_generate_options {
    let d = GenerateOptions::default();
    let s = &d.sampling;
    mipha_generate_options {
        struct_size: size_of::<mipha_generate_options>(),
        max_tokens: sat32(d.max_tokens),
        temperature: s.temperature,
        top_k: sat32(s.top_k),
        top_p: s.top_p,
        min_p: s.min_p,
        repeat_penalty: s.repeat_penalty,
        seed: s.seed,
        ignore_eos: d.ignore_eos as c_int,
        parse_special: d.parse_special as c_int,
        deadline_ms: 0,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
    }
}

/// Loads a `.mqf` model file.
///
/// # Safety
/// `path` is NULL or NUL-terminated; `opts` is NULL or points to
/// `opts->struct_size` readable bytes; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn mipha_engine_load(
    path: *const c_char,
    opts: *const mipha_engine_options,
    out: *mut *mut mipha_engine,
) -> Status {
    guard(|| {
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        // SAFETY: `out` is writable (checked non-NULL).
        unsafe { out.write(std::ptr::null_mut()) };
        // SAFETY: header contract.
        let path = unsafe { path_arg(path, "model path") }?;
        let options = if opts.is_null() {
            mipha_engine_options_default()
        } else {
            // SAFETY: `opts` points to `struct_size` readable bytes.
            unsafe {
                read_struct(
                    opts,
                    mipha_engine_options_default(),
                    ENGINE_OPTIONS_MIN_SIZE,
                    &engine_options_fields(),
                    "mipha_engine_options",
                )
            }?
        };
        let options = engine_options(&options)?;
        let engine = Engine::load(&path, options).map_err(|e| from_error(e, Ctx::Load))?;
        let handle = register(
            |r| &mut r.engines,
            mipha_engine {
                engine: Arc::new(engine),
            },
        );
        // SAFETY: as above.
        unsafe { out.write(handle) };
        Ok(())
    })
}

/// Releases the caller's reference; the model stays loaded until its last
/// session is freed too. NULL: no-op.
///
/// # Safety
/// `engine` is NULL or a handle (an invalid one is reported, not used).
#[no_mangle]
pub unsafe extern "C" fn mipha_engine_free(engine: *mut mipha_engine) {
    guard_value((), || unregister(|r| &mut r.engines, engine, "engine"))
}

/// A new, empty conversation on `engine`.
///
/// # Safety
/// `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn mipha_session_new(
    engine: *mut mipha_engine,
    out: *mut *mut mipha_session,
) -> Status {
    guard(|| {
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        // SAFETY: `out` is writable.
        unsafe { out.write(std::ptr::null_mut()) };
        let e = lookup(|r| &r.engines, engine, "engine")?;
        let session = Session::new(e.engine.clone());
        let handle = register(
            |r| &mut r.sessions,
            mipha_session {
                session: Mutex::new(session),
            },
        );
        // SAFETY: as above.
        unsafe { out.write(handle) };
        Ok(())
    })
}

/// Frees a session and gives its KV back. NULL: no-op.
///
/// # Safety
/// `session` is NULL or a handle.
#[no_mangle]
pub unsafe extern "C" fn mipha_session_free(session: *mut mipha_session) {
    guard_value((), || unregister(|r| &mut r.sessions, session, "session"))
}

/// Forgets the conversation and pending pictures; keeps the engine.
///
/// # Safety
/// `session` is NULL or a handle.
#[no_mangle]
pub unsafe extern "C" fn mipha_session_reset(session: *mut mipha_session) -> Status {
    guard(|| {
        let s = session_arg(session)?;
        lock(&s)?.reset();
        Ok(())
    })
}

/// Decodes the picture file at `path` and attaches it to the next question.
///
/// # Safety
/// `path` is NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn mipha_session_attach_image_file(
    session: *mut mipha_session,
    path: *const c_char,
) -> Status {
    guard(|| {
        let s = session_arg(session)?;
        // SAFETY: header contract.
        let path = unsafe { path_arg(path, "image path") }?;
        let mut session = lock(&s)?;
        if session.engine().image_config().is_none() {
            return Err(invalid("this model file has no vision tower"));
        }
        session
            .attach_image(&path)
            .map_err(|e| from_error(e, Ctx::Image))
    })
}

/// Decodes an encoded picture (JPEG, PNG, WebP, GIF, BMP) held in memory and
/// attaches it to the next question.
///
/// # Safety
/// `data` is NULL or points to `len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn mipha_session_attach_image_bytes(
    session: *mut mipha_session,
    data: *const u8,
    len: usize,
) -> Status {
    guard(|| {
        let s = session_arg(session)?;
        if data.is_null() && len != 0 {
            return Err(invalid("data is NULL"));
        }
        let bytes: &[u8] = if len == 0 {
            &[]
        } else {
            // SAFETY: `data` points to `len` readable bytes.
            unsafe { std::slice::from_raw_parts(data, len) }
        };
        let mut session = lock(&s)?;
        if session.engine().image_config().is_none() {
            return Err(invalid("this model file has no vision tower"));
        }
        check_one_more_image(&session)?;
        let opts = DecodeOptions {
            limits: session.engine().options().image_limits.decode_limits(),
            ..Default::default()
        };
        let decoded = decode_bytes(bytes, "image bytes", &opts).map_err(from_image_error)?;
        attach_rgb(&mut session, &decoded.image)
    })
}

/// Attaches raw 8-bit RGB pixels (rows `stride` bytes apart; 0 = `width * 3`).
///
/// # Safety
/// `rgb` is NULL or points to `stride * (height - 1) + width * 3` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn mipha_session_attach_image_rgb8(
    session: *mut mipha_session,
    rgb: *const u8,
    width: u32,
    height: u32,
    stride: usize,
) -> Status {
    guard(|| {
        let s = session_arg(session)?;
        if rgb.is_null() {
            return Err(invalid("rgb is NULL"));
        }
        if width == 0 || height == 0 {
            return Err(invalid(format!(
                "the picture is {width}x{height}: no pixels"
            )));
        }
        let row = width as usize * 3;
        let stride = if stride == 0 { row } else { stride };
        if stride < row {
            return Err(invalid(format!(
                "stride {stride} is less than a row of {width} RGB pixels ({row} bytes)"
            )));
        }
        let mut session = lock(&s)?;
        if session.engine().image_config().is_none() {
            return Err(invalid("this model file has no vision tower"));
        }
        check_one_more_image(&session)?;
        let max = session.engine().options().image_limits.max_pixels;
        let pixels = u64::from(width) * u64::from(height);
        if pixels > max {
            return Err(fail(
                Status::Image,
                format!("the picture is {width}x{height}, more than {max} pixels"),
            ));
        }
        let mut data = Vec::with_capacity(row * height as usize);
        for y in 0..height as usize {
            // SAFETY: row `y` lies inside the caller's buffer (contract above).
            let r = unsafe { std::slice::from_raw_parts(rgb.add(y * stride), row) };
            data.extend_from_slice(r);
        }
        let image = RgbImage::new(width, height, data).expect("width * height * 3 bytes");
        attach_rgb(&mut session, &image)
    })
}

/// Asks `prompt` (with the pictures attached since the last question) and
/// streams the answer through `on_token` on this thread.
///
/// # Safety
/// `prompt` is NULL or NUL-terminated; `opts` is NULL or points to
/// `opts->struct_size` readable bytes; `out` is NULL or points to
/// `out->struct_size` writable bytes; `on_token` is NULL or callable with
/// `user_data`.
#[no_mangle]
pub unsafe extern "C" fn mipha_session_ask(
    session: *mut mipha_session,
    prompt: *const c_char,
    opts: *const mipha_generate_options,
    cancel: *const mipha_cancel_token,
    on_token: mipha_token_callback,
    user_data: *mut c_void,
    out: *mut mipha_reply,
) -> Status {
    let start = Instant::now();
    // SAFETY: `out` is NULL or starts with `struct_size`.
    let out_size = match catch_unwind(|| unsafe { reply_size(out) }) {
        Ok(Ok(size)) => size,
        Ok(Err(f)) => return guard(|| Err(f)),
        Err(_) => return guard(|| Err(fail(Status::Internal, "reply_size panicked"))),
    };
    if let Some(size) = out_size {
        // On every failure the reply is empty: text NULL, safe to free.
        // SAFETY: `out` points to `size` writable bytes.
        unsafe { write_reply(out, size, &reply_struct(None)) };
    }
    guard(|| {
        let s = session_arg(session)?;
        let token = if cancel.is_null() {
            None
        } else {
            Some(lookup(|r| &r.tokens, cancel, "cancel token")?.token.clone())
        };
        if prompt.is_null() {
            return Err(invalid("the prompt is NULL"));
        }
        // SAFETY: NUL-terminated (header contract).
        let prompt = unsafe { CStr::from_ptr(prompt) }
            .to_str()
            .map_err(|e| invalid(format!("the prompt is not valid UTF-8: {e}")))?;
        let opts = if opts.is_null() {
            mipha_generate_options_default()
        } else {
            // SAFETY: `opts` points to `struct_size` readable bytes.
            unsafe {
                read_struct(
                    opts,
                    mipha_generate_options_default(),
                    GENERATE_OPTIONS_MIN_SIZE,
                    &generate_options_fields(),
                    "mipha_generate_options",
                )
            }?
        };
        let opts = generate_options(&opts, start)?;
        let mut session = lock(&s)?;
        let mut piece_buf: Vec<u8> = Vec::new();
        let mut stopped_by_callback = false;
        let reply = session
            .ask(prompt, &opts, token.as_ref(), |_id, piece| {
                let Some(cb) = on_token else { return true };
                if piece.is_empty() {
                    return true;
                }
                piece_buf.clear();
                piece_buf.extend_from_slice(piece.as_bytes());
                piece_buf.push(0);
                // SAFETY: the caller's callback with its own `user_data`; the
                // piece is NUL-terminated and lives until the call returns.
                let rc = unsafe { cb(piece_buf.as_ptr() as *const c_char, piece.len(), user_data) };
                if rc != 0 {
                    stopped_by_callback = true;
                }
                rc == 0
            })
            .map_err(|e| from_error(e, Ctx::Ask))?;
        drop(session);
        let cancelled_by_token = reply.stop_reason == StopReason::Cancelled
            && token.as_ref().is_some_and(|t| t.is_cancelled());
        let stop = if reply.stop_reason == StopReason::Cancelled && stopped_by_callback {
            stop::CALLBACK
        } else {
            stop_code(reply.stop_reason)
        };
        if let Some(size) = out_size {
            let mut r = reply_struct(Some((&reply, stop)));
            r.text = alloc_text(&reply.text);
            // SAFETY: `out` points to `size` writable bytes.
            unsafe { write_reply(out, size, &r) };
        }
        if cancelled_by_token && !stopped_by_callback {
            return Err(fail(
                Status::Cancelled,
                format!(
                    "cancelled after {} tokens (the reply holds what was said)",
                    reply.tokens.len()
                ),
            ));
        }
        Ok(())
    })
}

/// Frees `reply->text` and sets it to NULL (twice is harmless). NULL: no-op.
///
/// # Safety
/// `reply` is NULL or a reply written by `mipha_session_ask`.
#[no_mangle]
pub unsafe extern "C" fn mipha_reply_free(reply: *mut mipha_reply) {
    guard_value((), || {
        if reply.is_null() {
            return;
        }
        // SAFETY: a reply `mipha_session_ask` wrote: `text` and `text_len` are
        // inside every version of it.
        unsafe {
            let r = &mut *reply;
            if !r.text.is_null() {
                free_text(r.text);
            }
            r.text = std::ptr::null_mut();
            r.text_len = 0;
        }
    })
}

/// A new token, not cancelled; free with `mipha_cancel_token_free`. NULL only
/// if the library failed internally.
#[no_mangle]
pub extern "C" fn mipha_cancel_token_new() -> *mut mipha_cancel_token {
    guard_value(std::ptr::null_mut(), || {
        register(
            |r| &mut r.tokens,
            mipha_cancel_token {
                token: CancelToken::new(),
            },
        )
    })
}

/// Cancels every answer using `t`, from any thread; it stays cancelled.
/// NULL or a freed token: no-op.
#[no_mangle]
pub extern "C" fn mipha_cancel_token_cancel(t: *const mipha_cancel_token) {
    guard_value((), || {
        if let Ok(t) = lookup(|r| &r.tokens, t, "cancel token") {
            t.token.cancel();
        }
    })
}

/// Frees a token (an answer using it keeps its own reference). NULL: no-op.
#[no_mangle]
pub extern "C" fn mipha_cancel_token_free(t: *mut mipha_cancel_token) {
    guard_value((), || unregister(|r| &mut r.tokens, t, "cancel token"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_packed(fields: &[(usize, usize)], size: usize) {
        let mut end = 0;
        for &(off, len) in fields {
            assert!(off >= end, "fields overlap or are out of order");
            end = off + len;
        }
        assert_eq!(
            end, size,
            "trailing padding: a future field would hide in it"
        );
    }

    #[test]
    fn structs_have_no_trailing_padding() {
        assert_packed(&engine_options_fields(), size_of::<mipha_engine_options>());
        assert_packed(
            &generate_options_fields(),
            size_of::<mipha_generate_options>(),
        );
        assert_packed(&reply_fields(), size_of::<mipha_reply>());
    }

    #[cfg(target_pointer_width = "64")]
    #[test]
    fn struct_sizes_on_64_bit() {
        assert_eq!(size_of::<mipha_engine_options>(), 56);
        assert_eq!(size_of::<mipha_generate_options>(), 64);
        assert_eq!(size_of::<mipha_reply>(), 112);
        assert_eq!(ENGINE_OPTIONS_MIN_SIZE, 32);
        assert_eq!(GENERATE_OPTIONS_MIN_SIZE, 44);
        assert_eq!(REPLY_MIN_SIZE, 64);
    }

    #[test]
    fn smaller_struct_reads_defaults_beyond_it() {
        let mut o = mipha_generate_options_default();
        o.struct_size = GENERATE_OPTIONS_MIN_SIZE;
        o.max_tokens = 7;
        o.presence_penalty = 9.0; // beyond the caller's size: not read
                                  // SAFETY: a whole struct.
        let r = unsafe {
            read_struct(
                &o,
                mipha_generate_options_default(),
                GENERATE_OPTIONS_MIN_SIZE,
                &generate_options_fields(),
                "g",
            )
        }
        .unwrap();
        assert_eq!(r.max_tokens, 7);
        assert_eq!(r.presence_penalty, 0.0);
        assert!(generate_options(&r, Instant::now()).is_ok());
    }

    #[test]
    fn too_small_and_unknown_nonzero_tail_are_refused() {
        let mut o = mipha_engine_options_default();
        o.struct_size = 8;
        // SAFETY: a whole struct.
        let r = unsafe {
            read_struct(
                &o,
                mipha_engine_options_default(),
                32,
                &engine_options_fields(),
                "e",
            )
        };
        assert_eq!(r.unwrap_err().status, Status::InvalidArgument);
        #[repr(C)]
        struct Newer {
            o: mipha_engine_options,
            extra: u64,
        }
        let mut n = Newer {
            o: mipha_engine_options_default(),
            extra: 0,
        };
        n.o.struct_size = size_of::<Newer>();
        let read = |n: &Newer| {
            // SAFETY: `struct_size` bytes are readable.
            unsafe {
                read_struct(
                    &n.o as *const _,
                    mipha_engine_options_default(),
                    32,
                    &engine_options_fields(),
                    "e",
                )
            }
        };
        assert!(read(&n).is_ok());
        n.extra = 1;
        assert_eq!(read(&n).unwrap_err().status, Status::InvalidArgument);
    }

    #[test]
    fn text_round_trips() {
        let t = alloc_text("héllo\0x");
        // SAFETY: just allocated.
        unsafe {
            assert_eq!(CStr::from_ptr(t).to_bytes(), "héllo".as_bytes());
            free_text(t);
        }
    }

    #[test]
    fn bad_options_are_invalid_arguments() {
        let mut o = mipha_generate_options_default();
        o.temperature = -1.0;
        assert_eq!(
            generate_options(&o, Instant::now()).unwrap_err().status,
            Status::InvalidArgument
        );
        let mut e = mipha_engine_options_default();
        e.device = c"tpu".as_ptr();
        assert_eq!(
            engine_options(&e).unwrap_err().status,
            Status::InvalidArgument
        );
        e.device = std::ptr::null();
        e.kv_dtype = 7;
        assert_eq!(
            engine_options(&e).unwrap_err().status,
            Status::InvalidArgument
        );
    }

    #[test]
    fn null_and_foreign_handles_are_errors() {
        let mut out = std::ptr::null_mut();
        // SAFETY: NULL and a foreign pointer are exactly what is under test.
        unsafe {
            assert_eq!(
                mipha_session_new(std::ptr::null_mut(), &mut out),
                Status::InvalidArgument
            );
            let fake = 0x1000 as *mut mipha_engine;
            assert_eq!(mipha_session_new(fake, &mut out), Status::InvalidArgument);
            assert!(out.is_null());
            assert_eq!(
                mipha_session_reset(std::ptr::null_mut()),
                Status::InvalidArgument
            );
            let msg = CStr::from_ptr(mipha_last_error()).to_str().unwrap();
            assert!(msg.contains("NULL"), "{msg}");
            mipha_engine_free(std::ptr::null_mut());
            mipha_session_free(std::ptr::null_mut());
            mipha_cancel_token_free(std::ptr::null_mut());
            mipha_reply_free(std::ptr::null_mut());
            // A token passed where a session is wanted.
            let t = mipha_cancel_token_new();
            assert_eq!(
                mipha_session_reset(t as *mut mipha_session),
                Status::InvalidArgument
            );
            mipha_cancel_token_cancel(t);
            mipha_cancel_token_free(t);
            mipha_cancel_token_cancel(t); // freed: no-op
        }
    }
}
