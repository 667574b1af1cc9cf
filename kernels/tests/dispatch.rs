//! Run-time dispatch: the level follows the CPU and `MIPHA_CPU`, so CI can run
//! the whole suite once per level on one machine (`.ci/run` does).

use mipha_kernels::cpu::dispatch::{
    available, best_up_to, cpu, level, tuning, tuning_for, Cpu, Level, Vendor,
};

#[test]
fn the_level_follows_the_cpu_and_the_override() {
    let forced = std::env::var("MIPHA_CPU").ok();
    let got = level();
    eprintln!(
        "dispatch level: {} (MIPHA_CPU={forced:?}); available: {:?}",
        got.name(),
        available()
    );
    // One line for scripts (`.ci/run` skips, and says so, the levels not here).
    let names: Vec<&str> = available().iter().map(|l| l.name()).collect();
    eprintln!("available levels: {}", names.join(" "));
    eprintln!("cpu: {}; tuning: {}", cpu().describe(), tuning().describe());
    assert!(got.is_supported());
    let cap = forced
        .as_deref()
        .and_then(Level::from_name)
        .unwrap_or(Level::TOP);
    assert_eq!(got, best_up_to(cap));
    assert!(got <= cap);
}

#[test]
fn levels_are_ordered_and_named() {
    for l in Level::ALL {
        assert_eq!(Level::from_name(l.name()), Some(l));
    }
    assert!(available().contains(&Level::Portable));
    assert_eq!(best_up_to(Level::Portable), Level::Portable);
    // Each level implies the AVX2 baseline.
    #[cfg(target_arch = "x86_64")]
    for l in available() {
        if l > Level::Portable {
            assert!(std::arch::is_x86_feature_detected!("avx2"));
            assert!(std::arch::is_x86_feature_detected!("fma"));
        }
    }
}

#[test]
fn the_cpu_is_identified() {
    let c = cpu();
    assert!(!c.brand.is_empty());
    #[cfg(target_arch = "x86_64")]
    {
        // /proc/cpuinfo says the same where there is one.
        if let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") {
            let field = |name: &str| {
                info.lines()
                    .find(|l| l.split(':').next().map(str::trim) == Some(name))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|v| v.trim().to_string())
            };
            if let Some(f) = field("cpu family") {
                assert_eq!(f.parse::<u32>().ok(), Some(c.family), "{}", c.describe());
            }
            if let Some(m) = field("model") {
                assert_eq!(m.parse::<u32>().ok(), Some(c.model), "{}", c.describe());
            }
            if let Some(v) = field("vendor_id") {
                let want = match v.as_str() {
                    "GenuineIntel" => Vendor::Intel,
                    "AuthenticAMD" => Vendor::Amd,
                    _ => Vendor::Other,
                };
                assert_eq!(want, c.vendor);
            }
        }
    }
}

fn a_cpu(vendor: Vendor, family: u32, model: u32) -> Cpu {
    Cpu {
        vendor,
        family,
        model,
        brand: "test".into(),
    }
}

#[test]
fn each_cpu_kind_gets_its_row_of_the_tuning_table() {
    // Zen 4 (EPYC 9004: family 0x19, model 0x11), Zen 5 (not measured yet:
    // generic), Emerald Rapids, other.
    let zen4 = tuning_for(&a_cpu(Vendor::Amd, 0x19, 0x11));
    assert_eq!(zen4.name, "amd-family19h");
    assert_eq!(zen4.float_prefetch.distance, 16384);
    assert!(zen4.float_prefetch.l2);
    assert_eq!(tuning_for(&a_cpu(Vendor::Amd, 0x1a, 0x02)).name, "generic");
    assert_eq!(
        tuning_for(&a_cpu(Vendor::Intel, 6, 0xcf)).name,
        "intel-family6"
    );
    assert_eq!(tuning_for(&a_cpu(Vendor::Amd, 0x17, 0x31)).name, "generic");
    assert_eq!(tuning_for(&a_cpu(Vendor::Other, 0, 0)).name, "generic");
}

#[test]
fn tuning_overrides_are_checked() {
    let mut t = tuning_for(&a_cpu(Vendor::Intel, 6, 0xcf));
    t.apply("int8_prefetch=2048, float_prefetch=8192:l2")
        .unwrap();
    assert_eq!(
        (t.int8_prefetch.distance, t.int8_prefetch.l2),
        (2048, false)
    );
    assert_eq!(
        (t.float_prefetch.distance, t.float_prefetch.l2),
        (8192, true)
    );
    assert!(t.name.ends_with("+env"));
    assert!(
        t.describe().contains("int8_prefetch=2048:l1"),
        "{}",
        t.describe()
    );
    assert!(
        t.describe().contains("float_prefetch=8192:l2"),
        "{}",
        t.describe()
    );
    for bad in [
        "int8_prefetch",
        "int8_prefetch=-1",
        "int8_prefetch=1e9",
        "float_prefetch=4096:l3",
        "prefetch=4096",
    ] {
        let err = tuning_for(&a_cpu(Vendor::Intel, 6, 0xcf))
            .apply(bad)
            .unwrap_err();
        assert!(err.contains(bad.split('=').next().unwrap()), "{bad}: {err}");
    }
}
