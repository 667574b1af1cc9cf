//! Tokens from the step loop to whoever asked, outside the compute.
//!
//! The loop only appends events to a request's queue and wakes its consumer;
//! text decoding, callbacks and everything else a caller does happen on the
//! caller's thread. The queue is sized when the request is made for every event
//! it can produce (one per token up to its token limit, plus the end), so the
//! loop never waits for a slow consumer and never allocates to send.
//!
//! A stream holds at most [`STREAM_WINDOW`] unread tokens: a sequence whose
//! consumer lags that far skips decode steps until it reads on (flow control,
//! as a TCP window). Other sequences are not held up, and a consumer that
//! stalls does not make its sequence run far past what anyone reads.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use mipha_runtime::{Error, Result};

use super::options::StopReason;
use super::queue::Queue;
use super::text::TextDecoder;
use super::Model;

/// Unread tokens after which a stream's sequence pauses.
pub const STREAM_WINDOW: usize = 64;

/// Stops a generation from another thread (e.g. Ctrl-C in a chat, a client
/// that went away). Cheap to clone; all clones share one flag. The step loop
/// looks at it while the request waits, between prompt chunks, between slices
/// of a picture's encoding and at every decode step.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
    /// Re-arms the token for the next generation.
    pub fn reset(&self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// Where one request's time went, as the step loop saw it.
#[derive(Clone, Debug, Default)]
pub struct RequestStats {
    /// from submission to the start of its prefill
    pub queued: Duration,
    /// positions of the prompt (image patches included)
    pub prompt_positions: usize,
    /// prompt positions whose KV was already there (the session's own, or the
    /// shared prefix cache's) and were not computed
    pub reused_positions: usize,
    /// positions computed for the prompt (more than `prompt_positions -
    /// reused_positions` after a preemption, which recomputes)
    pub prefill_positions: usize,
    /// from the start of the prefill to the first token
    pub prefill: Duration,
    /// from submission to the first token
    pub time_to_first_token: Duration,
    /// from the first token to the end
    pub decode: Duration,
    /// times the request gave up its KV to others and was recomputed
    pub preemptions: usize,
}

/// How a request ended.
#[derive(Clone, Debug)]
pub struct Finished {
    /// every generated id, a final `<|endoftext|>` included when that stopped it
    pub tokens: Vec<u32>,
    /// their text (the streamed pieces, concatenated)
    pub text: String,
    pub stop: StopReason,
    /// how many of `tokens` went into the KV cache (all but a final one that
    /// was sampled when the generation stopped)
    pub fed: usize,
    pub stats: RequestStats,
    /// the logits the last token was sampled from, before any penalty, when
    /// asked for ([`crate::GenerateRequest::last_logits`])
    pub last_logits: Option<Vec<f32>>,
}

/// What the loop sends.
pub(crate) enum Event {
    Token {
        id: u32,
        /// the logits the token was sampled from, before any penalty, when
        /// the request asked for them
        logits: Option<Vec<f32>>,
    },
    Done {
        tokens: Vec<u32>,
        stop: StopReason,
        fed: usize,
        stats: RequestStats,
        last_logits: Option<Vec<f32>>,
    },
    Failed(Error),
}

struct State {
    events: VecDeque<Event>,
    /// an async reader waiting for the next event
    waker: Option<Waker>,
}

pub(crate) struct Shared {
    state: Mutex<State>,
    ready: Condvar,
    /// set when the consumer is dropped: the loop then stops the request
    gone: AtomicBool,
    /// tokens sent and not yet read
    unread: AtomicUsize,
    /// the loop's queue, woken when a paused stream is read again
    wake: Arc<Queue>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding it (pushes into reserved space).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The loop's end of a request's stream.
pub(crate) struct Writer {
    shared: Arc<Shared>,
    /// the end (`Done` or `Failed`) was sent
    ended: bool,
}

impl Writer {
    /// Hands `event` to the consumer. Never blocks.
    pub fn send(&mut self, event: Event) {
        if self.ended {
            return;
        }
        match event {
            Event::Token { .. } => {
                self.shared.unread.fetch_add(1, Ordering::Relaxed);
            }
            _ => self.ended = true,
        }
        let mut s = self.shared.lock();
        s.events.push_back(event);
        let waker = s.waker.take();
        drop(s);
        self.shared.ready.notify_one();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Whether the consumer went away (the request should stop).
    pub fn consumer_gone(&self) -> bool {
        self.shared.gone.load(Ordering::Relaxed)
    }

    /// Whether the consumer lags [`STREAM_WINDOW`] tokens behind (the
    /// sequence should wait).
    pub fn lagging(&self) -> bool {
        self.shared.unread.load(Ordering::Relaxed) >= STREAM_WINDOW
    }
}

impl Drop for Writer {
    /// A request dropped without an end (the engine stopped on a fault) still
    /// tells its consumer, which would otherwise wait forever.
    fn drop(&mut self) {
        self.send(Event::Failed(Error::Other(
            "the engine stopped before finishing this request".into(),
        )));
    }
}

/// A stream and its two ends, with room for `capacity` events.
pub(crate) fn channel(capacity: usize, wake: Arc<Queue>) -> (Writer, Arc<Shared>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            events: VecDeque::with_capacity(capacity),
            waker: None,
        }),
        ready: Condvar::new(),
        gone: AtomicBool::new(false),
        unread: AtomicUsize::new(0),
        wake,
    });
    let writer = Writer {
        shared: shared.clone(),
        ended: false,
    };
    (writer, shared)
}

/// One event of a [`Generating`] stream.
#[derive(Debug)]
pub enum StreamEvent<'a> {
    /// a new token and the text it completes (possibly empty: part of a character)
    Token {
        id: u32,
        piece: &'a str,
        /// the logits it was sampled from (before penalties), when asked for
        /// ([`crate::GenerateRequest::logits`])
        logits: Option<Vec<f32>>,
    },
    /// the generation is over
    Done(&'a Finished),
}

/// A running request: its tokens as they come, on the caller's thread.
/// Dropping it cancels the request.
pub struct Generating {
    shared: Arc<Shared>,
    model: Arc<Model>,
    cancel: CancelToken,
    text: TextDecoder,
    submitted: Instant,
    first: Option<Duration>,
    done: Option<Result<Finished, String>>,
}

impl Generating {
    pub(crate) fn new(shared: Arc<Shared>, model: Arc<Model>, cancel: CancelToken) -> Self {
        let text = TextDecoder::new(&model.tokenizer);
        Generating {
            shared,
            model,
            cancel,
            text,
            submitted: Instant::now(),
            first: None,
            done: None,
        }
    }

    /// Stops the request (what has been generated stays; the end follows).
    pub fn cancel(&self) {
        self.cancel.cancel();
        self.shared.wake.notify();
    }

    pub fn cancel_token(&self) -> &CancelToken {
        &self.cancel
    }

    /// From submission to the first token, once there is one.
    pub fn time_to_first_token(&self) -> Option<Duration> {
        self.first
    }

    /// Waits for the next event. After [`StreamEvent::Done`] it returns `Done`
    /// again. A failed request gives its error (once; then an error saying so).
    pub fn next_event(&mut self) -> Result<StreamEvent<'_>> {
        self.next_event_until(None)
            .map(|e| e.expect("no deadline given"))
    }

    /// [`Generating::next_event`], giving up at `until` with `Ok(None)`.
    pub fn next_event_until(&mut self, until: Option<Instant>) -> Result<Option<StreamEvent<'_>>> {
        if self.done.is_some() {
            return self.done_event().map(Some);
        }
        let event = {
            let mut s = self.shared.lock();
            loop {
                if let Some(e) = s.events.pop_front() {
                    break e;
                }
                match until {
                    None => s = self.shared.ready.wait(s).unwrap_or_else(|e| e.into_inner()),
                    Some(t) => {
                        let now = Instant::now();
                        if now >= t {
                            return Ok(None);
                        }
                        s = self
                            .shared
                            .ready
                            .wait_timeout(s, t - now)
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    }
                }
            }
        };
        self.take(event).map(Some)
    }

    /// [`Generating::next_event`] for async callers: waits without holding a
    /// thread (the step loop wakes the task when the next event is there).
    pub async fn next_event_async(&mut self) -> Result<StreamEvent<'_>> {
        if self.done.is_some() {
            return self.done_event();
        }
        let event = std::future::poll_fn(|cx| self.poll_raw(cx)).await;
        self.take(event)
    }

    fn poll_raw(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        let mut s = self.shared.lock();
        match s.events.pop_front() {
            Some(e) => Poll::Ready(e),
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    /// Turns the loop's event into the caller's: text, timings, the end.
    fn take(&mut self, event: Event) -> Result<StreamEvent<'_>> {
        match event {
            Event::Token { id, logits } => {
                if self.shared.unread.fetch_sub(1, Ordering::Relaxed) == STREAM_WINDOW {
                    // the sequence was paused for this reader
                    self.shared.wake.notify();
                }
                if self.first.is_none() {
                    self.first = Some(self.submitted.elapsed());
                }
                let piece = self.text.push(&self.model.tokenizer, id)?;
                Ok(StreamEvent::Token { id, piece, logits })
            }
            Event::Done {
                tokens,
                stop,
                fed,
                mut stats,
                last_logits,
            } => {
                let mut d = TextDecoder::new(&self.model.tokenizer);
                let mut text = String::new();
                // A final EOS was never streamed: its text is not part of the answer.
                let streamed = tokens.len() - (stop == StopReason::Eos) as usize;
                let decoded = tokens[..streamed].iter().try_for_each(|&id| {
                    text.push_str(d.push(&self.model.tokenizer, id)?);
                    Ok::<_, Error>(())
                });
                if let Err(e) = decoded {
                    self.done = Some(Err(e.to_string()));
                    return Err(e);
                }
                stats.time_to_first_token = self.first.unwrap_or(stats.time_to_first_token);
                self.done = Some(Ok(Finished {
                    tokens,
                    text,
                    stop,
                    fed,
                    stats,
                    last_logits,
                }));
                self.done_event()
            }
            Event::Failed(e) => {
                self.done = Some(Err(e.to_string()));
                Err(e)
            }
        }
    }

    fn done_event(&self) -> Result<StreamEvent<'_>> {
        match self.done.as_ref().expect("set by the caller") {
            Ok(f) => Ok(StreamEvent::Done(f)),
            Err(e) => Err(Error::Other(format!("this request failed earlier: {e}"))),
        }
    }

    /// Runs the request to its end, handing each token and its text to
    /// `on_token` on this thread (returning false stops the request).
    pub fn for_each(mut self, mut on_token: impl FnMut(u32, &str) -> bool) -> Result<Finished> {
        while let StreamEvent::Token { id, piece, .. } = self.next_event()? {
            if !on_token(id, piece) {
                self.cancel();
            }
        }
        match self.done.take() {
            Some(Ok(f)) => Ok(f),
            _ => unreachable!("Done was just returned"),
        }
    }

    /// Runs the request to its end and returns how it ended.
    pub fn wait(self) -> Result<Finished> {
        self.for_each(|_, _| true)
    }
}

impl Drop for Generating {
    fn drop(&mut self) {
        if self.done.is_none() {
            self.shared.gone.store(true, Ordering::Relaxed);
            self.shared.wake.notify();
        }
    }
}

impl std::fmt::Debug for Generating {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generating")
            .field("done", &self.done.is_some())
            .finish_non_exhaustive()
    }
}
