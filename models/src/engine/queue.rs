//! The one way into the step loop: callers put requests here, the loop takes
//! them. The queue is bounded: a request that would wait behind `max_queue`
//! others is refused at once with a busy error, so a burst of callers cannot
//! grow memory or latency without bound. Its lock is only ever held to move a
//! request in or out, never across a step.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

use mipha_runtime::{Error, Result, SeqId};

use super::scheduler::Job;

/// Requests that need an answer but no queue slot: they manage sequences and
/// sessions the caller already holds (at most one message each), so they are
/// never refused.
pub(crate) enum Control {
    NewSequence(std::sync::mpsc::SyncSender<SeqId>),
    Release(SeqId),
    Len(SeqId, std::sync::mpsc::SyncSender<Result<usize>>),
    Truncate(SeqId, usize, std::sync::mpsc::SyncSender<Result<usize>>),
    /// a session ended: its parked KV goes back to the pool
    ReleaseSlot(u64),
    /// positions a session's parked KV holds
    SlotLen(u64, std::sync::mpsc::SyncSender<usize>),
}

pub(crate) struct Inbox {
    pub jobs: VecDeque<Job>,
    pub control: Vec<Control>,
    /// requests accepted and not yet started, here or held by the loop
    pub waiting: usize,
    pub shutdown: bool,
    /// why the loop stopped, when it failed
    pub dead: Option<String>,
}

pub(crate) struct Queue {
    inbox: Mutex<Inbox>,
    wake: Condvar,
    max_queue: usize,
}

impl Queue {
    pub fn new(max_queue: usize) -> Self {
        Queue {
            inbox: Mutex::new(Inbox {
                jobs: VecDeque::with_capacity(max_queue),
                control: Vec::new(),
                waiting: 0,
                shutdown: false,
                dead: None,
            }),
            wake: Condvar::new(),
            max_queue,
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Inbox> {
        // Holders only move values in and out: a panic cannot leave it half-done.
        self.inbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Accepts `job`, or refuses it when `max_queue` requests already wait.
    pub fn submit(&self, job: Job) -> Result<()> {
        let mut q = self.lock();
        if let Some(why) = &q.dead {
            return Err(Error::Other(format!("the engine stopped: {why}")));
        }
        if q.shutdown {
            return Err(Error::Other("the engine is shutting down".into()));
        }
        if q.waiting >= self.max_queue {
            return Err(Error::Busy {
                waiting: q.waiting,
                max: self.max_queue,
            });
        }
        q.waiting += 1;
        q.jobs.push_back(job);
        drop(q);
        self.wake.notify_one();
        Ok(())
    }

    pub fn control(&self, c: Control) -> Result<()> {
        let mut q = self.lock();
        if let Some(why) = &q.dead {
            return Err(Error::Other(format!("the engine stopped: {why}")));
        }
        q.control.push(c);
        drop(q);
        self.wake.notify_one();
        Ok(())
    }

    /// Wakes the loop if it sleeps (shutdown, or a caller gave up).
    pub fn notify(&self) {
        self.wake.notify_one();
    }

    /// Sleeps until something arrives, or until `until`.
    pub fn wait<'a>(
        &'a self,
        q: MutexGuard<'a, Inbox>,
        until: Option<Instant>,
    ) -> MutexGuard<'a, Inbox> {
        match until {
            None => self.wake.wait(q).unwrap_or_else(|e| e.into_inner()),
            Some(t) => {
                let d = t.saturating_duration_since(Instant::now());
                self.wake
                    .wait_timeout(q, d)
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
        }
    }
}
