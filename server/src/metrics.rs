//! `/metrics` in the Prometheus text format (the `prometheus` crate). Names
//! follow vLLM's (`…_time_to_first_token_seconds`, `…_num_requests_waiting`,
//! …) so existing dashboards fit. Request figures are recorded as requests
//! end; the engine's own state (queue, KV blocks, caches) is read at scrape
//! time from `Engine::stats`.

use std::sync::Mutex;

use mipha_models::EngineStats;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub cached_prompt_tokens: IntCounter,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    waiting: IntGauge,
    running: IntGauge,
    parked: IntGauge,
    images_pending: IntGauge,
    kv_total: IntGauge,
    kv_used: IntGauge,
    kv_free: IntGauge,
    kv_cached: IntGauge,
    engine: EngineCounters,
    /// the engine's totals at the last scrape (counters move by the difference)
    last: Mutex<EngineStats>,
}

struct EngineCounters {
    prefix_hits: IntCounter,
    prompt_positions: IntCounter,
    preemptions: IntCounter,
    evictions: IntCounter,
    image_hits: IntCounter,
    image_misses: IntCounter,
    steps: IntCounter,
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("a valid metric");
    r.register(Box::new(c.clone())).expect("registered once");
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("a valid metric");
    r.register(Box::new(g.clone())).expect("registered once");
    g
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("a valid metric");
    r.register(Box::new(h.clone())).expect("registered once");
    h
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "mipha_requests_total",
                "HTTP requests by endpoint and status code",
            ),
            &["endpoint", "status"],
        )
        .expect("a valid metric");
        r.register(Box::new(requests.clone()))
            .expect("registered once");
        // A CPU decodes a token in tens to hundreds of milliseconds, a GPU in a
        // few; first tokens take up to tens of seconds behind a picture.
        let latency = [
            0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
        ];
        let long = [
            0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
        ];
        Metrics {
            requests,
            prompt_tokens: counter(
                &r,
                "mipha_prompt_tokens_total",
                "Prompt positions of finished requests (picture patches included)",
            ),
            generation_tokens: counter(&r, "mipha_generation_tokens_total", "Tokens generated"),
            cached_prompt_tokens: counter(
                &r,
                "mipha_prompt_tokens_cached_total",
                "Prompt positions of finished requests taken from the prefix cache",
            ),
            ttft: histogram(
                &r,
                "mipha_time_to_first_token_seconds",
                "From the request's arrival to its first token",
                &long,
            ),
            itl: histogram(
                &r,
                "mipha_inter_token_latency_seconds",
                "Between consecutive tokens of a request",
                &latency,
            ),
            e2e: histogram(
                &r,
                "mipha_e2e_request_latency_seconds",
                "From a request's arrival to its end",
                &long,
            ),
            waiting: gauge(
                &r,
                "mipha_num_requests_waiting",
                "Requests queued and not started (the engine's queue depth)",
            ),
            running: gauge(
                &r,
                "mipha_num_requests_running",
                "Sequences being prefilled or decoded",
            ),
            parked: gauge(
                &r,
                "mipha_num_sessions_parked",
                "Sessions whose KV waits for their next turn",
            ),
            images_pending: gauge(
                &r,
                "mipha_num_images_pending",
                "Pictures waiting for or in the vision tower",
            ),
            kv_total: gauge(
                &r,
                "mipha_kv_cache_blocks_total",
                "KV cache blocks in the pool",
            ),
            kv_used: gauge(
                &r,
                "mipha_kv_cache_blocks_used",
                "KV cache blocks held by some sequence",
            ),
            kv_free: gauge(
                &r,
                "mipha_kv_cache_blocks_free",
                "KV cache blocks nobody holds (cached ones included)",
            ),
            kv_cached: gauge(
                &r,
                "mipha_kv_cache_blocks_cached",
                "KV cache blocks the prefix cache can hand out",
            ),
            engine: EngineCounters {
                prefix_hits: counter(
                    &r,
                    "mipha_prefix_cache_hit_positions_total",
                    "Prompt positions reused from the prefix cache or a session's own KV",
                ),
                prompt_positions: counter(
                    &r,
                    "mipha_prefix_cache_query_positions_total",
                    "Prompt positions of started requests (the hits' denominator)",
                ),
                preemptions: counter(
                    &r,
                    "mipha_preemptions_total",
                    "Sequences that gave up their KV and were recomputed",
                ),
                evictions: counter(
                    &r,
                    "mipha_kv_cache_evictions_total",
                    "Cached KV blocks evicted to make room",
                ),
                image_hits: counter(
                    &r,
                    "mipha_image_cache_hits_total",
                    "Pictures whose embeddings came from the cache",
                ),
                image_misses: counter(&r, "mipha_image_cache_misses_total", "Pictures encoded"),
                steps: counter(
                    &r,
                    "mipha_engine_steps_total",
                    "Forward steps the engine ran",
                ),
            },
            last: Mutex::new(EngineStats::default()),
            registry: r,
        }
    }

    /// The text format, with the engine's state as of now (`None` while the
    /// model loads).
    pub fn render(&self, stats: Option<&EngineStats>) -> String {
        if let Some(s) = stats {
            self.waiting.set(s.queue_depth as i64);
            self.running.set(s.running as i64);
            self.parked.set(s.parked as i64);
            self.images_pending.set(s.images_pending as i64);
            self.kv_total.set(s.kv_blocks_total as i64);
            self.kv_used.set(s.kv_blocks_used as i64);
            self.kv_free.set(s.kv_blocks_free as i64);
            self.kv_cached.set(s.kv_blocks_cached as i64);
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            let e = &self.engine;
            for (c, now, before) in [
                (
                    &e.prefix_hits,
                    s.prefix_hit_positions,
                    last.prefix_hit_positions,
                ),
                (
                    &e.prompt_positions,
                    s.prompt_positions,
                    last.prompt_positions,
                ),
                (&e.preemptions, s.preemptions, last.preemptions),
                (&e.evictions, s.kv_evictions, last.kv_evictions),
                (&e.image_hits, s.image_cache_hits, last.image_cache_hits),
                (
                    &e.image_misses,
                    s.image_cache_misses,
                    last.image_cache_misses,
                ),
                (&e.steps, s.steps, last.steps),
            ] {
                c.inc_by(now.saturating_sub(before));
            }
            *last = s.clone();
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding of well-formed metrics");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
