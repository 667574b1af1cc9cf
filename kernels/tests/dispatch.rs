//! Run-time dispatch: the level follows the CPU and `MIPHA_CPU`, so CI can run
//! the whole suite once per level on one machine (`.ci/run` does).

use mipha_kernels::cpu::dispatch::{available, best_up_to, level, Level};

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
    assert!(got.is_supported());
    let cap = forced
        .as_deref()
        .and_then(Level::from_name)
        .unwrap_or(Level::Avx512Vnni);
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
