//! Run-time dispatch: the level follows the CPU and `MIPHA_CPU`, so CI can run
//! the kernel tests once per level on one machine (`.ci/run` does).

use mipha_kernels::cpu::dispatch::{level, Level};

#[test]
fn the_level_follows_the_cpu_and_the_override() {
    let forced = std::env::var("MIPHA_CPU").ok();
    let got = level();
    eprintln!("dispatch level: {} (MIPHA_CPU={forced:?})", got.name());
    match forced.as_deref() {
        Some("portable") => assert_eq!(got, Level::Portable),
        _ => {
            #[cfg(target_arch = "x86_64")]
            {
                let avx2 = std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("f16c");
                assert_eq!(got == Level::Avx2, avx2);
            }
        }
    }
}
