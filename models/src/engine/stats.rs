//! What the engine is doing and has done, for callers and metrics: counters the
//! step loop updates as it goes (plain atomics: reading them never waits for a
//! step).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

/// A snapshot of [`crate::Engine::stats`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// requests accepted and not started
    pub queue_depth: usize,
    /// sequences being prefilled or decoded
    pub running: usize,
    /// sessions whose KV waits for their next turn
    pub parked: usize,
    /// pictures waiting for or in the vision tower
    pub images_pending: usize,
    pub kv_blocks_total: usize,
    /// blocks some sequence holds
    pub kv_blocks_used: usize,
    /// blocks nobody holds (cached ones included)
    pub kv_blocks_free: usize,
    /// blocks the prefix cache can hand out by content
    pub kv_blocks_cached: usize,
    pub steps: u64,
    /// prompt positions of started requests
    pub prompt_positions: u64,
    /// prompt positions reused from the prefix cache or a session's own KV
    pub prefix_hit_positions: u64,
    /// positions computed for prompts (recomputation included)
    pub prefill_positions: u64,
    pub generated_tokens: u64,
    pub preemptions: u64,
    pub kv_evictions: u64,
    pub image_cache_hits: u64,
    pub image_cache_misses: u64,
    pub requests_finished: u64,
    pub requests_failed: u64,
}

#[derive(Default)]
pub(crate) struct Stats {
    pub running: AtomicUsize,
    pub parked: AtomicUsize,
    pub images_pending: AtomicUsize,
    pub kv_total: AtomicUsize,
    pub kv_used: AtomicUsize,
    pub kv_free: AtomicUsize,
    pub kv_cached: AtomicUsize,
    pub steps: AtomicU64,
    pub prompt_positions: AtomicU64,
    pub prefix_hits: AtomicU64,
    pub prefill_positions: AtomicU64,
    pub generated: AtomicU64,
    pub preemptions: AtomicU64,
    pub evictions: AtomicU64,
    pub image_hits: AtomicU64,
    pub image_misses: AtomicU64,
    pub finished: AtomicU64,
    pub failed: AtomicU64,
}

impl Stats {
    pub fn new(kv_blocks: usize) -> Self {
        let s = Stats::default();
        s.kv_total.store(kv_blocks, Relaxed);
        s.kv_free.store(kv_blocks, Relaxed);
        s
    }

    pub fn image_hit(&self) {
        self.image_hits.fetch_add(1, Relaxed);
    }

    pub fn image_miss(&self) {
        self.image_misses.fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> EngineStats {
        EngineStats {
            queue_depth: 0,
            running: self.running.load(Relaxed),
            parked: self.parked.load(Relaxed),
            images_pending: self.images_pending.load(Relaxed),
            kv_blocks_total: self.kv_total.load(Relaxed),
            kv_blocks_used: self.kv_used.load(Relaxed),
            kv_blocks_free: self.kv_free.load(Relaxed),
            kv_blocks_cached: self.kv_cached.load(Relaxed),
            steps: self.steps.load(Relaxed),
            prompt_positions: self.prompt_positions.load(Relaxed),
            prefix_hit_positions: self.prefix_hits.load(Relaxed),
            prefill_positions: self.prefill_positions.load(Relaxed),
            generated_tokens: self.generated.load(Relaxed),
            preemptions: self.preemptions.load(Relaxed),
            kv_evictions: self.evictions.load(Relaxed),
            image_cache_hits: self.image_hits.load(Relaxed),
            image_cache_misses: self.image_misses.load(Relaxed),
            requests_finished: self.finished.load(Relaxed),
            requests_failed: self.failed.load(Relaxed),
        }
    }
}
