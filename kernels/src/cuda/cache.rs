//! NVRTC compilation with an on-disk cache of the PTX.
//!
//! The cache directory is `$MIPHA_CUDA_CACHE`, else `$XDG_CACHE_HOME/mipha/cuda`,
//! else `~/.cache/mipha/cuda`. An entry's name holds the module, the target
//! architecture, the driver version and a 64-bit FNV-1a hash of everything that
//! decides the output (the source with `common.cuh`, the options, the NVRTC
//! version), so a changed source, another GPU or a driver update compiles afresh.
//! Entries are written to a temporary file and renamed into place, so concurrent
//! processes never read a partial one. A cache that cannot be read or written is
//! only a lost speed-up: compilation goes on without it.

use std::path::PathBuf;

use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions, Ptx};

use super::{CudaError, Result, COMMON_SRC};

/// Bumped when the cache format or key changes.
const CACHE_VERSION: u32 = 2;

/// The cache directory (it may not exist yet).
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("MIPHA_CUDA_CACHE").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("mipha").join("cuda"));
    }
    std::env::var_os("HOME")
        .filter(|d| !d.is_empty())
        .map(|h| PathBuf::from(h).join(".cache").join("mipha").join("cuda"))
}

/// 64-bit FNV-1a: stable across Rust versions and platforms (unlike `DefaultHasher`).
pub fn fnv1a64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in p.iter() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // separator, so ("ab", "c") and ("a", "bc") differ
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The full source NVRTC compiles for `module`.
pub fn full_source(src: &str) -> String {
    format!("{COMMON_SRC}\n{src}")
}

fn options(arch: &str) -> Vec<String> {
    // A virtual architecture (`compute_XY`) makes NVRTC emit PTX for exactly the
    // device's capability (a real `sm_XY` would make a CUBIN, with no PTX to get);
    // the driver turns it into machine code when the module loads.
    let virt = arch.replacen("sm_", "compute_", 1);
    vec![
        format!("--gpu-architecture={virt}"),
        // IEEE division and square root, no flush-to-zero: the kernels are compared
        // against an f64 reference with tight bounds.
        "--ftz=false".into(),
        "--prec-div=true".into(),
        "--prec-sqrt=true".into(),
        "--fmad=true".into(),
    ]
}

fn nvrtc_version() -> (i32, i32) {
    let (mut a, mut b) = (0, 0);
    // SAFETY: valid out-pointers; NVRTC is loaded (checked by Device::new).
    let _ = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut a, &mut b) };
    (a, b)
}

/// Cache file name for `module` (exposed for tests and `scripts/gpu-check.sh`).
pub fn cache_key(module: &str, src: &str, arch: &str, driver: i32, nvrtc: (i32, i32)) -> String {
    let opts = options(arch).join(" ");
    let full = full_source(src);
    let nv = format!("{}.{}", nvrtc.0, nvrtc.1);
    let ver = CACHE_VERSION.to_string();
    let h = fnv1a64(&[
        full.as_bytes(),
        opts.as_bytes(),
        nv.as_bytes(),
        ver.as_bytes(),
    ]);
    format!("{module}-{arch}-drv{driver}-{h:016x}.ptx")
}

/// PTX of `module` for `arch`: from the cache, or compiled by NVRTC and stored.
pub fn compile(module: &str, src: &str, arch: &str, driver: i32) -> Result<Ptx> {
    let key = cache_key(module, src, arch, driver, nvrtc_version());
    let path = cache_dir().map(|d| d.join(&key));
    if let Some(p) = &path {
        if let Ok(text) = std::fs::read_to_string(p) {
            if text.contains(".entry") {
                return Ok(Ptx::from_src(text));
            }
        }
    }
    let opts = CompileOptions {
        options: options(arch),
        name: Some(format!("{module}.cu")),
        ..Default::default()
    };
    let ptx = compile_ptx_with_opts(full_source(src), opts).map_err(|e| match e {
        CompileError::CompileError { log, .. } => CudaError::Compile {
            module: module.to_string(),
            log: log.to_string_lossy().into_owned(),
        },
        other => CudaError::Compile {
            module: module.to_string(),
            log: format!("{other:?}"),
        },
    })?;
    let text = ptx.to_src();
    if let Some(p) = &path {
        store(p, &text);
    }
    Ok(Ptx::from_src(text))
}

fn store(path: &std::path::Path, text: &str) {
    let Some(dir) = path.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    if std::fs::write(&tmp, text).is_ok() && std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_depends_on_source_arch_and_driver() {
        let a = cache_key("m", "x", "sm_90", 12040, (12, 4));
        assert_eq!(a, cache_key("m", "x", "sm_90", 12040, (12, 4)));
        assert_ne!(a, cache_key("m", "y", "sm_90", 12040, (12, 4)));
        assert_ne!(a, cache_key("m", "x", "sm_80", 12040, (12, 4)));
        assert_ne!(a, cache_key("m", "x", "sm_90", 12050, (12, 4)));
        assert_ne!(a, cache_key("m", "x", "sm_90", 12040, (12, 5)));
        assert!(a.starts_with("m-sm_90-drv12040-") && a.ends_with(".ptx"));
    }

    #[test]
    fn fnv_is_stable() {
        // FNV-1a of "" then the separator byte, fixed forever.
        assert_eq!(fnv1a64(&[]), 0xcbf2_9ce4_8422_2325);
        assert_ne!(fnv1a64(&[b"ab", b"c"]), fnv1a64(&[b"a", b"bc"]));
    }
}
