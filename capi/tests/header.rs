//! `include/mipha.h` against the crate: the same functions, the same ABI
//! version, the same enum values, and (when a C compiler is present) the same
//! struct sizes and offsets.

use std::collections::BTreeSet;
use std::mem::{offset_of, size_of};
use std::path::Path;
use std::process::Command;

use mipha::{
    kv_dtype, mipha_engine_options, mipha_generate_options, mipha_reply, stop, Status,
    ENGINE_OPTIONS_MIN_SIZE, GENERATE_OPTIONS_MIN_SIZE, MIPHA_ABI_VERSION, REPLY_MIN_SIZE,
};

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).unwrap()
}

fn ident_before_paren(s: &str) -> Option<&str> {
    let end = s.find('(')?;
    let name = s[..end]
        .trim_end()
        .rsplit(|c: char| !(c.is_alphanumeric() || c == '_'))
        .next()?;
    Some(name)
}

/// Every `mipha_*(` function the header declares (typedefs and macros aside).
fn header_functions(h: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    // Declarations may span lines: join, then split at `;`.
    let no_comments = strip_comments(h);
    for decl in no_comments.split(';') {
        let decl = decl.trim();
        if decl.starts_with("typedef") || decl.starts_with('#') || decl.contains("#define") {
            continue;
        }
        if let Some(name) = ident_before_paren(decl) {
            if name.starts_with("mipha_") {
                out.insert(name.to_string());
            }
        }
    }
    out
}

fn strip_comments(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("/*") {
        out.push_str(&rest[..i]);
        rest = &rest[i + 2..];
        rest = &rest[rest.find("*/").expect("closed comment") + 2..];
    }
    out.push_str(rest);
    // Preprocessor lines (`#define X (offsetof(...))`) are not declarations.
    out.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Every `#[no_mangle] pub [unsafe] extern "C" fn` of the crate.
fn rust_exports(src: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let lines: Vec<&str> = src.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        if l.trim() != "#[no_mangle]" {
            continue;
        }
        let next = lines[i + 1].trim();
        let rest = next
            .strip_prefix("pub extern \"C\" fn ")
            .or_else(|| next.strip_prefix("pub unsafe extern \"C\" fn "))
            .unwrap_or_else(|| panic!("line {}: #[no_mangle] on `{next}`", i + 2));
        out.insert(rest[..rest.find('(').unwrap()].to_string());
    }
    out
}

#[test]
fn header_declares_exactly_the_exported_functions() {
    let header = header_functions(&read("include/mipha.h"));
    let exports = rust_exports(&read("src/lib.rs"));
    assert!(header.len() >= 17, "parsed {header:?}");
    assert_eq!(header, exports, "mipha.h and src/lib.rs disagree");
}

fn define(h: &str, name: &str) -> i64 {
    for l in h.lines() {
        let mut w = l.split_whitespace();
        if w.next() == Some("#define") && w.next() == Some(name) {
            return w.next().unwrap().parse().unwrap();
        }
    }
    panic!("no #define {name}")
}

/// `NAME = value` inside the header's enums.
fn enum_value(h: &str, name: &str) -> i64 {
    for l in h.lines() {
        let l = l.trim();
        if let Some(rest) = l.strip_prefix(name) {
            if let Some(v) = rest.trim_start().strip_prefix('=') {
                let v = v.trim().trim_end_matches(|c: char| !c.is_ascii_digit());
                let v: String = v.chars().take_while(|c| c.is_ascii_digit()).collect();
                return v.parse().unwrap();
            }
        }
    }
    panic!("no enum value {name}")
}

#[test]
fn versions_and_enum_values_match() {
    let h = read("include/mipha.h");
    assert_eq!(
        define(&h, "MIPHA_ABI_VERSION"),
        i64::from(MIPHA_ABI_VERSION)
    );
    assert_eq!(mipha::mipha_abi_version(), MIPHA_ABI_VERSION);
    let statuses = [
        ("MIPHA_OK", Status::Ok),
        ("MIPHA_ERR_INVALID_ARGUMENT", Status::InvalidArgument),
        ("MIPHA_ERR_IO", Status::Io),
        ("MIPHA_ERR_FORMAT", Status::Format),
        ("MIPHA_ERR_IMAGE", Status::Image),
        ("MIPHA_ERR_CONTEXT_FULL", Status::ContextFull),
        ("MIPHA_ERR_BUSY", Status::Busy),
        ("MIPHA_ERR_CANCELLED", Status::Cancelled),
        ("MIPHA_ERR_INTERNAL", Status::Internal),
        ("MIPHA_ERR_OUT_OF_MEMORY", Status::OutOfMemory),
    ];
    for (name, s) in statuses {
        assert_eq!(enum_value(&h, name), s as i64, "{name}");
    }
    let stops = [
        ("MIPHA_STOP_NONE", stop::NONE),
        ("MIPHA_STOP_EOS", stop::EOS),
        ("MIPHA_STOP_MAX_TOKENS", stop::MAX_TOKENS),
        ("MIPHA_STOP_CONTEXT_FULL", stop::CONTEXT_FULL),
        ("MIPHA_STOP_CANCELLED", stop::CANCELLED),
        ("MIPHA_STOP_DEADLINE", stop::DEADLINE),
        ("MIPHA_STOP_CALLBACK", stop::CALLBACK),
    ];
    for (name, v) in stops {
        assert_eq!(enum_value(&h, name), i64::from(v), "{name}");
    }
    assert_eq!(enum_value(&h, "MIPHA_KV_F16"), i64::from(kv_dtype::F16));
    assert_eq!(enum_value(&h, "MIPHA_KV_F32"), i64::from(kv_dtype::F32));
}

/// Compiles a C program that prints the header's sizes and offsets.
#[test]
fn c_layouts_match() {
    if Command::new("cc").arg("--version").output().is_err() {
        println!("skipped: no C compiler (`cc`)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("layout.c");
    let fields = |t: &str, fs: &[&str]| {
        let mut s = format!("printf(\"%zu\\n\", sizeof({t}));\n");
        for f in fs {
            s += &format!("printf(\"%zu\\n\", offsetof({t}, {f}));\n");
        }
        s
    };
    let engine = [
        "threads",
        "device",
        "kv_cache_mb",
        "max_memory_mb",
        "max_sequences",
        "kv_dtype",
        "verify",
        "max_queue",
    ];
    let gen = [
        "max_tokens",
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "repeat_penalty",
        "seed",
        "ignore_eos",
        "parse_special",
        "deadline_ms",
        "presence_penalty",
        "frequency_penalty",
    ];
    let reply = [
        "text",
        "text_len",
        "prompt_tokens",
        "generated_tokens",
        "reused_positions",
        "stop_reason",
        "prefill_ms",
        "ttft_ms",
        "decode_tok_s",
        "prefill_positions",
        "images_encoded",
        "images_cached",
        "preemptions",
        "queued_ms",
        "decode_ms",
        "image_ms",
        "prefill_tok_s",
    ];
    let body = [
        fields("mipha_engine_options", &engine),
        fields("mipha_generate_options", &gen),
        fields("mipha_reply", &reply),
        "printf(\"%zu\\n%zu\\n%zu\\n\", MIPHA_ENGINE_OPTIONS_MIN_SIZE, \
         MIPHA_GENERATE_OPTIONS_MIN_SIZE, MIPHA_REPLY_MIN_SIZE);\n"
            .to_string(),
    ]
    .concat();
    std::fs::write(
        &src,
        format!(
            "#include <stdio.h>\n#include \"mipha.h\"\nint main(void) {{\n{body}return 0;\n}}\n"
        ),
    )
    .unwrap();
    let exe = dir.path().join("layout");
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("include");
    let st = Command::new("cc")
        .args(["-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror", "-I"])
        .arg(&include)
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .status()
        .unwrap();
    assert!(st.success(), "the header does not compile as C99");
    let out = Command::new(&exe).output().unwrap();
    let got: Vec<usize> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    macro_rules! layout {
        ($t:ty; $($f:ident),*) => { vec![size_of::<$t>(), $(offset_of!($t, $f)),*] };
    }
    let want = [
        layout!(mipha_engine_options; threads, device, kv_cache_mb, max_memory_mb, max_sequences,
            kv_dtype, verify, max_queue),
        layout!(mipha_generate_options; max_tokens, temperature, top_k, top_p, min_p,
            repeat_penalty, seed, ignore_eos, parse_special, deadline_ms, presence_penalty,
            frequency_penalty),
        layout!(mipha_reply; text, text_len, prompt_tokens, generated_tokens, reused_positions,
            stop_reason, prefill_ms, ttft_ms, decode_tok_s, prefill_positions, images_encoded,
            images_cached, preemptions, queued_ms, decode_ms, image_ms, prefill_tok_s),
        vec![
            ENGINE_OPTIONS_MIN_SIZE,
            GENERATE_OPTIONS_MIN_SIZE,
            REPLY_MIN_SIZE,
        ],
    ]
    .concat();
    assert_eq!(got, want, "C and Rust lay the structs out differently");
}

/// The header is valid C++ too (`extern "C"`, no C-only constructs).
#[test]
fn header_compiles_as_cpp() {
    if Command::new("c++").arg("--version").output().is_err() {
        println!("skipped: no C++ compiler (`c++`)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("h.cc");
    std::fs::write(
        &src,
        "#include \"mipha.h\"\nint main() { mipha_reply r = {}; r.struct_size = sizeof r; \
         return (int)(mipha_abi_version() != MIPHA_ABI_VERSION); }\n",
    )
    .unwrap();
    let out = Command::new("c++")
        .args([
            "-std=c++11",
            "-Wall",
            "-Wextra",
            "-pedantic",
            "-fsyntax-only",
            "-I",
        ])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("include"))
        .arg(&src)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
