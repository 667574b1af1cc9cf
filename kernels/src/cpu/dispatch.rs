//! Which instruction set the CPU kernels use, detected once at run time (never
//! fixed at compile time, so one binary runs on every x86-64 and fast where it
//! can). `MIPHA_CPU=<level>` lowers it, so tests and users can run every path the
//! machine has: each kernel also takes a level explicitly, and the tests loop over
//! [`available`] against the scalar reference.

use std::sync::OnceLock;

/// Kernel paths, from the baseline up. Every level above `Portable` implies
/// AVX2 + FMA + F16C; the int8 kernels differ in how they do the 4-byte dot:
/// `maddubs` + `madd` on 256 (`Avx2`) or 512 bits (`Avx512`), `vpdpbusd` on 256
/// (`AvxVnni`) or 512 bits (`Avx512Vnni`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// what the build targets (SSE2 on x86-64, NEON on aarch64), through `wide`
    Portable,
    /// AVX2 + FMA + F16C
    Avx2,
    /// AVX2 + AVX-VNNI (256-bit `vpdpbusd`)
    AvxVnni,
    /// AVX-512 F/BW/VL/DQ (512-bit `maddubs`)
    Avx512,
    /// AVX-512 F/BW/VL/DQ + VNNI (512-bit `vpdpbusd`)
    Avx512Vnni,
}

impl Level {
    pub const ALL: [Level; 5] = [
        Level::Portable,
        Level::Avx2,
        Level::AvxVnni,
        Level::Avx512,
        Level::Avx512Vnni,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Level::Portable => "portable",
            Level::Avx2 => "avx2",
            Level::AvxVnni => "avxvnni",
            Level::Avx512 => "avx512",
            Level::Avx512Vnni => "avx512vnni",
        }
    }

    pub fn from_name(name: &str) -> Option<Level> {
        Level::ALL.into_iter().find(|l| l.name() == name)
    }

    /// Whether this CPU can run the level's code.
    pub fn is_supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma") && has!("f16c");
            let avx512 =
                avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512dq");
            match self {
                Level::Portable => true,
                Level::Avx2 => avx2,
                Level::AvxVnni => avx2 && has!("avxvnni"),
                Level::Avx512 => avx512,
                Level::Avx512Vnni => avx512 && has!("avx512vnni"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Level::Portable
        }
    }
}

/// Every level this CPU can run, lowest first.
pub fn available() -> Vec<Level> {
    Level::ALL
        .into_iter()
        .filter(|l| l.is_supported())
        .collect()
}

/// The best supported level at or below `cap`.
pub fn best_up_to(cap: Level) -> Level {
    Level::ALL
        .into_iter()
        .filter(|l| *l <= cap && l.is_supported())
        .max()
        .unwrap_or(Level::Portable)
}

/// The level in use: the CPU's best, lowered by `MIPHA_CPU` (`portable`, `avx2`,
/// `avxvnni`, `avx512`, `avx512vnni`). An unknown name is ignored with a warning.
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| match std::env::var("MIPHA_CPU").ok().as_deref() {
        None | Some("") => best_up_to(Level::Avx512Vnni),
        Some(name) => match Level::from_name(name) {
            Some(cap) => best_up_to(cap),
            None => {
                eprintln!(
                    "warning: MIPHA_CPU={name} is not one of portable, avx2, avxvnni, avx512, \
                     avx512vnni; using the CPU's best"
                );
                best_up_to(Level::Avx512Vnni)
            }
        },
    })
}
