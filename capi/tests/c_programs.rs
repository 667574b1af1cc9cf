//! Builds the C library, then compiles and runs the C examples (and the
//! ctypes one) against it on the tiny-a fixture.
//!
//! How the library is found: the test runs `cargo build -p mipha-capi --lib`
//! itself, with the profile this test binary was built with, and takes the
//! paths of `libmipha.a` / `libmipha.so` from cargo's JSON messages. Cargo
//! does not promise the cdylib/staticlib of a `cargo test` run (they land,
//! unhashed, in a `deps/` folder every profile shares), while the nested build
//! reuses everything `cargo test` just compiled and only (re)links the
//! library: a few seconds. Cargo releases its build lock before it runs tests,
//! so the nested build does not wait on its parent.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Instant;

struct Built {
    _dir: tempfile::TempDir,
    model: PathBuf,
    staticlib: PathBuf,
    cdylib: PathBuf,
}

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(rel: &str) -> PathBuf {
    manifest_dir().join("../tests/fixtures/tiny-a").join(rel)
}

/// `--release`, or the profile of the folder this test runs from.
fn profile_args() -> Vec<String> {
    let exe = std::env::current_exe().unwrap();
    // target/<profile dir>/deps/<test binary>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::file_name)
        .and_then(|d| d.to_str())
        .unwrap_or("debug")
        .to_string();
    match dir.as_str() {
        "release" => vec!["--release".into()],
        // `cargo test` builds the test profile into target/debug.
        "debug" => vec!["--profile".into(), "test".into()],
        other => vec!["--profile".into(), other.into()],
    }
}

fn build_library() -> (PathBuf, PathBuf) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let t = Instant::now();
    let out = Command::new(cargo)
        .args([
            "build",
            "-p",
            "mipha-capi",
            "--lib",
            "--message-format=json",
        ])
        .args(profile_args())
        .current_dir(manifest_dir())
        .output()
        .expect("run cargo");
    assert!(
        out.status.success(),
        "cargo build -p mipha-capi failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (mut a, mut so) = (None, None);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(m) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if m["reason"] != "compiler-artifact" || m["target"]["name"] != "mipha" {
            continue;
        }
        for f in m["filenames"].as_array().into_iter().flatten() {
            let f = PathBuf::from(f.as_str().unwrap());
            match f.extension().and_then(|e| e.to_str()) {
                Some("a") => a = Some(f),
                Some("so") | Some("dylib") => so = Some(f),
                _ => {}
            }
        }
    }
    eprintln!("built the library in {:.1?}", t.elapsed());
    (
        a.expect("cargo named no libmipha.a"),
        so.expect("cargo named no libmipha.so"),
    )
}

fn built() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        let (staticlib, cdylib) = build_library();
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("tiny-a.mqf");
        let opts = mipha_convert::ConvertOptions::new(
            fixture("checkpoint"),
            &model,
            mipha_runtime::QuantType::F32,
        );
        mipha_convert::convert_checkpoint(&opts).unwrap();
        Built {
            _dir: dir,
            model,
            staticlib,
            cdylib,
        }
    })
}

fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn show(what: &str, out: &Output) -> String {
    format!(
        "{what}: {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `cc -std=c11 -Wall -Wextra -I include <src> <link...> -o <exe>`.
fn compile(src: &Path, exe: &Path, extra: &[&str], link: &[String]) -> Output {
    Command::new("cc")
        // No -Werror: a newer compiler's new warning must not fail the test.
        .args(["-std=c11", "-Wall", "-Wextra", "-g", "-I"])
        .arg(manifest_dir().join("include"))
        .args(extra)
        .arg(src)
        .args(link)
        .arg("-o")
        .arg(exe)
        .output()
        .unwrap()
}

fn static_link(b: &Built) -> Vec<String> {
    vec![
        b.staticlib.display().to_string(),
        "-lpthread".into(),
        "-ldl".into(),
        "-lm".into(),
    ]
}

fn dynamic_link(b: &Built) -> Vec<String> {
    let dir = b.cdylib.parent().unwrap().display().to_string();
    vec![
        format!("-L{dir}"),
        format!("-Wl,-rpath,{dir}"),
        "-lmipha".into(),
        "-lpthread".into(),
    ]
}

#[test]
fn describe_c_streams_an_answer() {
    if !have("cc") {
        println!("skipped: no C compiler (`cc`)");
        return;
    }
    let b = built();
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("describe");
    let src = manifest_dir().join("examples/describe.c");
    let out = compile(&src, &exe, &[], &static_link(b));
    assert!(out.status.success(), "{}", show("cc describe.c", &out));
    let t = Instant::now();
    let out = Command::new(&exe)
        .arg(&b.model)
        .arg(fixture("chelsea.png"))
        .arg("What is in the picture?")
        .arg("12")
        .output()
        .unwrap();
    eprintln!("describe ran in {:.1?}", t.elapsed());
    assert!(out.status.success(), "{}", show("describe", &out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tokens/s]"), "{}", show("describe", &out));
    assert!(err.contains("prompt positions"), "{err}");
}

/// The threads program under AddressSanitizer; valgrind when ASan cannot run
/// here (a sandbox without ptrace for LeakSanitizer, a compiler without
/// libasan).
#[test]
fn threads_c_under_a_memory_checker() {
    if !have("cc") {
        println!("skipped: no C compiler (`cc`)");
        return;
    }
    let b = built();
    let dir = tempfile::tempdir().unwrap();
    let src = manifest_dir().join("tests/c/threads.c");
    let args = [b.model.clone(), fixture("chelsea.png")];

    let asan = dir.path().join("threads-asan");
    let cc = compile(
        &src,
        &asan,
        &["-pthread", "-fsanitize=address", "-fno-omit-frame-pointer"],
        &dynamic_link(b),
    );
    if cc.status.success() {
        let t = Instant::now();
        let out = Command::new(&asan)
            .args(&args)
            .env(
                "ASAN_OPTIONS",
                "detect_leaks=1:abort_on_error=0:exitcode=86",
            )
            .output()
            .unwrap();
        eprintln!("threads (ASan) ran in {:.1?}", t.elapsed());
        let err = String::from_utf8_lossy(&out.stderr);
        let environmental = err.contains("LeakSanitizer has encountered a fatal error")
            || err.contains("LeakSanitizer does not work under ptrace")
            || err.contains("Shadow memory range interleaves")
            || err.contains("ASan runtime does not come first");
        if !environmental {
            assert!(out.status.success(), "{}", show("threads (ASan)", &out));
            assert!(String::from_utf8_lossy(&out.stdout).contains("threads: ok"));
            return;
        }
        println!("AddressSanitizer cannot run here; falling back to valgrind:\n{err}");
    } else {
        println!(
            "cc -fsanitize=address failed; falling back to valgrind:\n{}",
            String::from_utf8_lossy(&cc.stderr)
        );
    }
    if !have("valgrind") {
        println!("skipped: neither AddressSanitizer nor valgrind works here");
        return;
    }
    let plain = dir.path().join("threads");
    let cc = compile(&src, &plain, &["-pthread"], &dynamic_link(b));
    assert!(cc.status.success(), "{}", show("cc threads.c", &cc));
    let out = Command::new("valgrind")
        .args(["--error-exitcode=86", "--quiet"])
        .arg(&plain)
        .args(&args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show("threads (valgrind)", &out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("threads: ok"));
}

#[test]
fn describe_py_through_ctypes() {
    if !have("python3") {
        println!("skipped: no python3");
        return;
    }
    let b = built();
    let out = Command::new("python3")
        .arg(manifest_dir().join("examples/describe.py"))
        .arg(&b.model)
        .arg(fixture("chelsea.png"))
        .arg("What is in the picture?")
        .arg("12")
        .env("MIPHA_LIB", &b.cdylib)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show("describe.py", &out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tokens/s]"));
}
