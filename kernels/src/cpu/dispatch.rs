//! What the CPU kernels run on, decided once at run time (never fixed at compile
//! time, so one binary runs on every x86-64 and fast where it can):
//!
//! - the instruction-set [`Level`], lowered by `MIPHA_CPU=<level>` so tests and
//!   users can run every path the machine has (each kernel also takes a level
//!   explicitly, and the tests loop over [`available`] against the scalar
//!   reference);
//! - the [`Cpu`] itself (vendor, family, model, brand string), from CPUID;
//! - the per-CPU [`Tuning`]: choices that are not about instructions (how far
//!   ahead a weight stream prefetches, into which cache), one row of one table per CPU
//!   kind, overridable by `MIPHA_TUNING=key=value,...` so a new machine can be
//!   tuned with the benchmarks without a rebuild.

use std::sync::OnceLock;

/// Kernel paths, from the baseline up. Every level above `Portable` implies
/// AVX2 + FMA + F16C; the int8 kernels differ in how they do the 4-byte dot:
/// `maddubs` + `madd` on 256 (`Avx2`) or 512 bits (`Avx512`), `vpdpbusd` on 256
/// (`AvxVnni`) or 512 bits (`Avx512Vnni`, `Avx512Bf16`). `Avx512Bf16` adds
/// `vdpbf16ps` for BF16 weights (AMD Zen 4 and later, Intel Cooper Lake,
/// Sapphire Rapids and later).
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
    /// AVX-512 F/BW/VL/DQ + VNNI + BF16 (`vdpbf16ps`)
    Avx512Bf16,
}

impl Level {
    pub const ALL: [Level; 6] = [
        Level::Portable,
        Level::Avx2,
        Level::AvxVnni,
        Level::Avx512,
        Level::Avx512Vnni,
        Level::Avx512Bf16,
    ];

    /// The highest level there is (what an unset `MIPHA_CPU` caps at).
    pub const TOP: Level = Level::Avx512Bf16;

    pub fn name(self) -> &'static str {
        match self {
            Level::Portable => "portable",
            Level::Avx2 => "avx2",
            Level::AvxVnni => "avxvnni",
            Level::Avx512 => "avx512",
            Level::Avx512Vnni => "avx512vnni",
            Level::Avx512Bf16 => "avx512bf16",
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
                Level::Avx512Bf16 => avx512 && has!("avx512vnni") && has!("avx512bf16"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Level::Portable
        }
    }

    /// Whether BF16 weights multiply with `vdpbf16ps` here: activations rounded
    /// to BF16, products summed in f32 pairs (see
    /// [`crate::reference::matmul_bf16_dot`]). Below it, BF16 weights widen to
    /// f32 and multiply f32 activations exactly.
    pub fn bf16_dot(self) -> bool {
        self >= Level::Avx512Bf16
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
/// `avxvnni`, `avx512`, `avx512vnni`, `avx512bf16`). An unknown name is ignored
/// with a warning.
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| match std::env::var("MIPHA_CPU").ok().as_deref() {
        None | Some("") => best_up_to(Level::TOP),
        Some(name) => match Level::from_name(name) {
            Some(cap) => best_up_to(cap),
            None => {
                let names: Vec<&str> = Level::ALL.iter().map(|l| l.name()).collect();
                eprintln!(
                    "warning: MIPHA_CPU={name} is not one of {}; using the CPU's best",
                    names.join(", ")
                );
                best_up_to(Level::TOP)
            }
        },
    })
}

/// Whether BF16 weights packed from now on multiply with the BF16 dot
/// ([`Level::bf16_dot`] of the level in use), unless `MIPHA_BF16_DOT` says
/// otherwise: `0` keeps f32 activations (exact) even where `vdpbf16ps` is,
/// `1` rounds activations to BF16 everywhere (two FMAs emulate the
/// instruction where it is missing: slower, for measuring its numerics).
pub fn bf16_dot() -> bool {
    static DOT: OnceLock<bool> = OnceLock::new();
    *DOT.get_or_init(|| match std::env::var("MIPHA_BF16_DOT").ok().as_deref() {
        Some("1") => true,
        Some("0") => false,
        None | Some("") => level().bf16_dot(),
        Some(other) => {
            eprintln!("warning: MIPHA_BF16_DOT={other} is not 0 or 1; using the CPU's default");
            level().bf16_dot()
        }
    })
}

/// Who made the CPU, as CPUID says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vendor {
    Intel,
    Amd,
    Other,
}

/// The CPU the kernels run on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cpu {
    pub vendor: Vendor,
    /// display family (base family, plus the extended family when the base is 0xF)
    pub family: u32,
    /// display model (with the extended model bits for families 6 and 0xF+)
    pub model: u32,
    /// the brand string, e.g. "AMD EPYC 9R14 96-Core Processor"
    pub brand: String,
}

impl Cpu {
    /// One line for logs and benchmark rows: brand, vendor, family and model.
    pub fn describe(&self) -> String {
        format!(
            "{} ({:?} family {:#x} model {:#x})",
            self.brand, self.vendor, self.family, self.model
        )
    }
}

/// This machine's CPU, read once.
pub fn cpu() -> &'static Cpu {
    static CPU: OnceLock<Cpu> = OnceLock::new();
    CPU.get_or_init(read_cpu)
}

#[cfg(target_arch = "x86_64")]
fn read_cpu() -> Cpu {
    use std::arch::x86_64::__cpuid;
    // SAFETY: CPUID exists on every x86-64 CPU; leaves above the maximum the
    // CPU reports are not asked for.
    let leaf0 = __cpuid(0);
    let id: Vec<u8> = [leaf0.ebx, leaf0.edx, leaf0.ecx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .collect();
    let vendor = match &id[..] {
        b"GenuineIntel" => Vendor::Intel,
        b"AuthenticAMD" => Vendor::Amd,
        _ => Vendor::Other,
    };
    let (mut family, mut model) = (0, 0);
    if leaf0.eax >= 1 {
        let eax = __cpuid(1).eax;
        let base_family = (eax >> 8) & 0xf;
        let base_model = (eax >> 4) & 0xf;
        family = base_family;
        model = base_model;
        if base_family == 0xf {
            family += (eax >> 20) & 0xff;
        }
        if base_family == 0x6 || base_family == 0xf {
            model += ((eax >> 16) & 0xf) << 4;
        }
    }
    let ext = __cpuid(0x8000_0000).eax;
    let brand = if ext >= 0x8000_0004 {
        let bytes: Vec<u8> = (0x8000_0002u32..=0x8000_0004)
            .flat_map(|leaf| {
                let r = __cpuid(leaf);
                [r.eax, r.ebx, r.ecx, r.edx]
            })
            .flat_map(|r| r.to_le_bytes())
            .take_while(|&b| b != 0)
            .collect();
        String::from_utf8_lossy(&bytes).trim().to_string()
    } else {
        String::new()
    };
    Cpu {
        vendor,
        family,
        model,
        brand: if brand.is_empty() {
            "unknown x86-64".to_string()
        } else {
            brand
        },
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn read_cpu() -> Cpu {
    Cpu {
        vendor: Vendor::Other,
        family: 0,
        model: 0,
        brand: std::env::consts::ARCH.to_string(),
    }
}

/// A software prefetch of a weight stream: how many bytes ahead of the read
/// position, and into which cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefetch {
    /// bytes ahead; 0: none, the hardware prefetchers alone
    pub distance: usize,
    /// into L2 only (`prefetcht1`), not L1 (`prefetcht0`)
    pub l2: bool,
}

impl Prefetch {
    const fn l1(distance: usize) -> Self {
        Prefetch {
            distance,
            l2: false,
        }
    }
    const fn l2(distance: usize) -> Self {
        Prefetch { distance, l2: true }
    }

    /// `4096:l1`, `16384:l2`, `0:l1`.
    pub fn describe(&self) -> String {
        format!("{}:{}", self.distance, if self.l2 { "l2" } else { "l1" })
    }

    /// `BYTES[:l1|:l2]` (L1 when the cache is not named).
    fn parse(value: &str) -> Option<Self> {
        let (bytes, cache) = value.split_once(':').unwrap_or((value, "l1"));
        let distance = bytes
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|d| *d <= 1 << 20)?;
        let l2 = match cache.trim() {
            "l1" => false,
            "l2" => true,
            _ => return None,
        };
        Some(Prefetch { distance, l2 })
    }
}

/// Per-CPU choices of the kernels that are not about instructions. One row of
/// [`TABLE`] per CPU kind; every field can be overridden at run time
/// (`MIPHA_TUNING=int8_prefetch=16384:l2,float_prefetch=4096:l1`), which is how
/// `scripts/tune-decode.sh` measures a new machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// which row of the table (plus `+env` when `MIPHA_TUNING` changed it)
    pub name: String,
    /// the Q8_0/Q4_0 decode tiles' prefetch of their panels (one to a dozen
    /// activation rows stream each panel once)
    pub int8_prefetch: Prefetch,
    /// the F16/BF16 decode tiles' prefetch of their panels
    pub float_prefetch: Prefetch,
}

impl Tuning {
    /// `name: key=value ...`, for logs and benchmark rows.
    pub fn describe(&self) -> String {
        format!(
            "{}: int8_prefetch={} float_prefetch={}",
            self.name,
            self.int8_prefetch.describe(),
            self.float_prefetch.describe()
        )
    }

    /// Applies `key=value` pairs (comma-separated); the first unknown key or
    /// bad value is an error naming it.
    pub fn apply(&mut self, spec: &str) -> Result<(), String> {
        for pair in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("`{pair}` is not key=value"))?;
            let prefetch = || {
                Prefetch::parse(value).ok_or_else(|| {
                    format!("{key}={value}: expected BYTES (0..=1048576), BYTES:l1 or BYTES:l2")
                })
            };
            match key.trim() {
                "int8_prefetch" => self.int8_prefetch = prefetch()?,
                "float_prefetch" => self.float_prefetch = prefetch()?,
                other => {
                    return Err(format!(
                        "unknown tuning key `{other}` (known: int8_prefetch, float_prefetch)"
                    ))
                }
            }
        }
        self.name.push_str("+env");
        Ok(())
    }
}

/// Which CPUs a [`TABLE`] row is for.
struct Kind {
    vendor: Vendor,
    /// display families, inclusive
    families: (u32, u32),
}

/// One row: a name, the CPUs it is for, and its values.
struct Row {
    name: &'static str,
    kind: Kind,
    int8_prefetch: Prefetch,
    float_prefetch: Prefetch,
}

/// Rows are tried in order; the last matches everything. Each row says where
/// its values were measured (`scripts/tune-decode.sh`, a model-sized weight
/// set streamed by one-row decode matmuls); a CPU kind no one has measured
/// copies the generic values and says so, rather than guessing.
const TABLE: &[Row] = &[
    // Xeon (Emerald Rapids VM, 2 vCPUs, 29 GB/s): int8 panels prefetched 16 KiB
    // ahead into L2 stream at 20.5 (Q4_0) / 23.3 (Q8_0) GB/s, against 19.3 /
    // 22.5 at 4 KiB into L1; the float panels do best at 4 KiB into L1 (F16
    // 2.5 -> 3.2 tok/s against none; 16 KiB into L2 loses 10 %).
    Row {
        name: "intel-family6",
        kind: Kind {
            vendor: Vendor::Intel,
            families: (6, 6),
        },
        int8_prefetch: Prefetch::l2(16384),
        float_prefetch: Prefetch::l1(4096),
    },
    // Zen 4 (EPYC VM, family 0x19 model 0x11, 2 vCPUs, probe 27-32 GB/s; Zen 3
    // shares the family): three sweeps, medians. Q4_0 streams at 26.8 GB/s
    // with 16 KiB into L2 (26.6 at 32 KiB, 22.0 with none); Q8_0 24.4 (no
    // setting clearly better); BF16 27.1 at 16 KiB into L2 against 24.0 at
    // 4 KiB into L1, F16 level (27.2 / 28.7). The run-to-run spread on this
    // VM (+-15 %) is wider than any of these gaps but none-vs-some for Q4_0.
    Row {
        name: "amd-family19h",
        kind: Kind {
            vendor: Vendor::Amd,
            families: (0x19, 0x19),
        },
        int8_prefetch: Prefetch::l2(16384),
        float_prefetch: Prefetch::l2(16384),
    },
    Row {
        name: "generic",
        kind: Kind {
            vendor: Vendor::Other,
            families: (0, u32::MAX),
        },
        int8_prefetch: Prefetch::l2(16384),
        float_prefetch: Prefetch::l1(4096),
    },
];

/// The table's row for `cpu`.
pub fn tuning_for(cpu: &Cpu) -> Tuning {
    let row = TABLE
        .iter()
        .find(|r| {
            (r.kind.vendor == Vendor::Other || r.kind.vendor == cpu.vendor)
                && (r.kind.families.0..=r.kind.families.1).contains(&cpu.family)
        })
        .expect("the last row matches every CPU");
    Tuning {
        name: row.name.to_string(),
        int8_prefetch: row.int8_prefetch,
        float_prefetch: row.float_prefetch,
    }
}

/// The tuning in use: this CPU's row, with `MIPHA_TUNING` applied (a bad
/// override is ignored with a warning naming it).
pub fn tuning() -> &'static Tuning {
    static TUNING: OnceLock<Tuning> = OnceLock::new();
    TUNING.get_or_init(|| {
        let mut t = tuning_for(cpu());
        if let Ok(spec) = std::env::var("MIPHA_TUNING") {
            let mut changed = t.clone();
            match changed.apply(&spec) {
                Ok(()) => t = changed,
                Err(e) => eprintln!("warning: MIPHA_TUNING ignored: {e}"),
            }
        }
        t
    })
}
