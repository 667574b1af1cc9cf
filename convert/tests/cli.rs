//! The command line: convert, inspect (text and JSON), verify (and its exit code on a
//! damaged file).

mod common;

use std::process::Command;

use common::*;
use mipha_runtime::MqfFile;

fn run(args: &[&std::ffi::OsStr]) -> (i32, String, String) {
    let o = Command::new(BIN).args(args).output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn convert_inspect_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("tiny.mqf");
    let (code, _, err) = run(&[
        TINY_A.as_ref(),
        "-o".as_ref(),
        out.as_os_str(),
        "--quant".as_ref(),
        "q8_0".as_ref(),
        "--vision-quant".as_ref(),
        "f16".as_ref(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("56 tensors (29 dropped, 0 fallbacks)"),
        "{err}"
    );
    assert!(
        !err.contains('\u{1b}'),
        "no progress bar off a terminal: {err:?}"
    );

    let (code, stdout, err) = run(&[
        "--quiet".as_ref(),
        TINY_A.as_ref(),
        "-o".as_ref(),
        out.as_os_str(),
        "--quant".as_ref(),
        "f32".as_ref(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        stdout.is_empty() && err.is_empty(),
        "--quiet: {stdout:?} {err:?}"
    );

    let (code, text, err) = run(&["inspect".as_ref(), out.as_os_str()]);
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("version:   1.0"), "{text}");
    assert!(text.contains("tokenizer.huggingface.json"), "{text}");
    assert!(text.contains("<bytes: "), "{text}");
    assert!(text.contains("general.dropped_tensors"), "{text}");
    assert!(
        text.contains("... (21 more)]"),
        "long arrays are cut: {text}"
    );
    assert!(
        text.contains("tokenizer.eos_token_id               u64        50256"),
        "{text}"
    );
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("model.embed_tokens.weight "))
        .unwrap();
    let cols: Vec<&str> = line.split_whitespace().collect();
    // name, type, shape "[51200," "64]", row stride, offset, bytes
    assert_eq!(cols[1], "f32");
    assert_eq!(cols[4], "256");
    assert_eq!(cols[6], (51200 * 256).to_string());

    let (code, json, _) = run(&["inspect".as_ref(), "--json".as_ref(), out.as_os_str()]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["metadata"]["tokenizer.eos_token_id"]["value"], 50256);
    assert_eq!(v["metadata"]["tokenizer.huggingface.json"]["type"], "bytes");
    assert_eq!(
        v["metadata"]["general.dropped_tensors"]["value"]
            .as_array()
            .unwrap()
            .len(),
        29
    );
    assert_eq!(v["tensors"].as_array().unwrap().len(), 56);

    let (code, stdout, _) = run(&["verify".as_ref(), out.as_os_str()]);
    assert_eq!(code, 0);
    let f = MqfFile::open(&out).unwrap();
    let bytes: u64 = f.tensors().iter().map(|t| t.len).sum();
    assert_eq!(
        stdout.trim(),
        format!("OK: 56 tensors, {bytes} bytes verified")
    );

    // Flip one byte inside a tensor: verify names it and exits 1.
    let name = "model.layers.1.mlp.fc1.weight";
    let pos = f.data_offset() + f.tensor(name).unwrap().info.offset + 5;
    drop(f);
    let mut data = std::fs::read(&out).unwrap();
    data[pos as usize] ^= 0x40;
    std::fs::write(&out, data).unwrap();
    let (code, _, err) = run(&["verify".as_ref(), out.as_os_str()]);
    assert_eq!(code, 1);
    assert!(err.contains(name), "{err}");
}

#[test]
fn errors_exit_1_with_the_message() {
    let tmp = tempfile::tempdir().unwrap();
    let (code, _, err) = run(&[
        tmp.path().as_os_str(),
        "-o".as_ref(),
        tmp.path().join("x.mqf").as_os_str(),
        "--quant".as_ref(),
        "q4_0".as_ref(),
    ]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with("error: ") && err.contains("no config.json"),
        "{err}"
    );

    let (code, _, err) = run(&[
        "verify".as_ref(),
        tmp.path().join("missing.mqf").as_os_str(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("missing.mqf"), "{err}");

    std::fs::write(tmp.path().join("not.mqf"), b"hello").unwrap();
    let (code, _, err) = run(&["inspect".as_ref(), tmp.path().join("not.mqf").as_os_str()]);
    assert_eq!(code, 1);
    assert!(err.contains("not.mqf"), "{err}");
}

#[test]
fn usage_errors() {
    // Convert arguments are required without a subcommand...
    let (code, _, err) = run(&[TINY_A.as_ref()]);
    assert_eq!(code, 2);
    assert!(err.contains("--output") && err.contains("--quant"), "{err}");
    // ...and not with one.
    let (code, _, err) = run(&["verify".as_ref()]);
    assert_eq!(code, 2);
    assert!(err.contains("<FILE>"), "{err}");
    let (code, out, _) = run(&["--help".as_ref()]);
    assert_eq!(code, 0);
    for word in ["inspect", "verify", "synth", "--vision-quant", "q4_0"] {
        assert!(out.contains(word), "{word}: {out}");
    }
}
