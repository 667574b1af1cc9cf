//! Which instruction set the CPU kernels use, detected once at run time (never
//! fixed at compile time, so one binary runs on every x86-64 and fast where it
//! can). `MIPHA_CPU=portable` forces the baseline path, so tests and users can
//! run each level on one machine.

use std::sync::OnceLock;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// what the build targets (SSE2 on x86-64), through `wide`
    Portable,
    /// AVX2 + FMA + F16C code generation of the same kernels
    Avx2,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Portable => "portable",
            Level::Avx2 => "avx2",
        }
    }
}

fn detect() -> Level {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
    {
        return Level::Avx2;
    }
    Level::Portable
}

/// The level in use: the CPU's best, lowered by `MIPHA_CPU` (`portable`, `avx2`).
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let best = detect();
        match std::env::var("MIPHA_CPU").ok().as_deref() {
            Some("portable") => Level::Portable,
            Some("avx2") => best.min(Level::Avx2),
            _ => best,
        }
    })
}
