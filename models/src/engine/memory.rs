//! The memory budget at load: what an engine will hold (weights, activation
//! buffers, the KV pool, thread stacks), computed from the plans and the
//! file's tensor table before anything is allocated, and refused with a clear
//! error when it exceeds `EngineOptions::max_memory` (by default the memory
//! available now: `MemAvailable`, or a container's cgroup limit when lower).

use mipha_runtime::{Error, KvConfig, MqfFile, Plan, Result};

/// What one engine will hold, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryNeed {
    /// one copy of every weight the plans read: mapped from the file, or
    /// repacked for the CPU kernels (the file's pages are then released)
    pub weights: u64,
    /// every plan's activation buffers
    pub activations: u64,
    pub kv_cache: u64,
    /// the compute threads' stacks
    pub threads: u64,
}

impl MemoryNeed {
    pub fn total(&self) -> u64 {
        self.weights
            .saturating_add(self.activations)
            .saturating_add(self.kv_cache)
            .saturating_add(self.threads)
    }

    pub(crate) fn add_plan(&mut self, plan: &Plan, file: &MqfFile) -> Result<()> {
        self.activations = self.activations.saturating_add(activation_bytes(plan)?);
        self.weights = self.weights.saturating_add(weight_bytes(plan, file));
        Ok(())
    }

    pub(crate) fn add_kv(&mut self, kv: &KvConfig, block_bytes: usize) {
        let bytes = (kv.n_blocks as u64).saturating_mul(block_bytes as u64);
        self.kv_cache = self.kv_cache.saturating_add(bytes);
    }

    /// Refuses a need above `limit`, itemised so the caller sees what to cut.
    pub(crate) fn check(&self, limit: u64, source: &str) -> Result<()> {
        let total = self.total();
        if total <= limit {
            return Ok(());
        }
        Err(Error::OutOfMemory(format!(
            "the engine needs {} (weights {}, activations {}, KV cache {}, thread stacks {}), \
             more than the {} {source}; lower --kv-cache-mb, max_batch_tokens or --threads, \
             or raise --max-memory",
            mib(total),
            mib(self.weights),
            mib(self.activations),
            mib(self.kv_cache),
            mib(self.threads),
            mib(limit),
        )))
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

/// The f32 activation buffers a backend allocates for `plan`.
fn activation_bytes(plan: &Plan) -> Result<u64> {
    let layout = plan.buffer_layout()?;
    let elems = layout
        .lens
        .iter()
        .fold(0u64, |a, &l| a.saturating_add(l as u64))
        .saturating_add(layout.gather_len as u64)
        .saturating_add(layout.scratch_len as u64);
    Ok(elems.saturating_mul(4))
}

/// Bytes of the plan's weights in the file (missing ones count nothing: binding
/// names them).
fn weight_bytes(plan: &Plan, file: &MqfFile) -> u64 {
    plan.weights
        .iter()
        .filter_map(|w| file.tensor(&w.name).ok())
        .fold(0u64, |a, t| a.saturating_add(t.info.len))
}

/// Stack bytes a compute thread reserves (rayon's default).
pub(crate) const THREAD_STACK: u64 = 2 << 20;

/// Memory this process may still take: `MemAvailable`, or the cgroup's limit
/// less its usage when that is lower (a container). `None` where neither can
/// be read (then nothing is checked unless a limit is given).
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|kb| kb.saturating_mul(1024))
    });
    let read = |p: &str| -> Option<u64> { std::fs::read_to_string(p).ok()?.trim().parse().ok() };
    let cgroup = read("/sys/fs/cgroup/memory.max")
        .map(|max| max.saturating_sub(read("/sys/fs/cgroup/memory.current").unwrap_or(0)));
    match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
