//! The tokenizer built from vocab.json + merges.txt + added_tokens.json (what the
//! real Mipha-3B ships) behaves exactly like the reference tokenizer.json.

mod common;

use common::*;
use mipha_convert::tokenizer::{build_tokenizer_json, REFERENCE_TOKENIZER_JSON};
use tokenizers::Tokenizer;

fn strings() -> Vec<String> {
    let mut v: Vec<String> = [
        "",
        "Hello world",
        "a  b",
        "a   b    c     d",
        "x\ty\t\tz\t\t\t\tw",
        "  leading and trailing  ",
        "\n\n\nnewlines\r\nand CRLF\r\n",
        "<|endoftext|>",
        "before<|endoftext|>after <|endoftext|> spaced",
        "<|endoftext|><|endoftext|>",
        "A chat between a curious user and an artificial intelligence assistant. USER: <image>\nWhat is in the picture? ASSISTANT:",
        "def f(x):\n    if x:\n        return [i ** 2 for i in range(10)]\n\treturn None\n",
        "fn main() {\n    println!(\"{}\", 1 + 2);\n}\n",
        "naïve café résumé — “quotes” ‘single’ … ñ ü ß",
        "中文字符和日本語のテキスト、한국어",
        "emoji 😀🎉👩‍👩‍👧‍👦 and flags 🇫🇷",
        "numbers 1234567890 3.14159 -42 1e-5 0x1F",
        "it's they're we'll I'd you've he's",
        "                                        forty spaces",
        "\t\t\t\t\t\t\t\t\t\t\t\tmany tabs",
        " \t \t mixed \t\t  whitespace",
        "URL: https://example.com/path?q=1&r=2#frag",
        "Ġ Ċ weird byte-level lookalikes ĠĠ",
        "\u{0}\u{1}\u{7f} control chars \u{200b}zero width",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Deterministic random mixes of the awkward pieces.
    let pieces = [
        " ",
        "  ",
        "\t",
        "\t\t",
        "\n",
        "a",
        "Z",
        "é",
        "中",
        "😀",
        "<|endoftext|>",
        "ing",
        "'s",
        "123",
        ".",
        "    ",
        "_",
        "\u{a0}",
    ];
    let mut state = 0x1234_5678_9abc_def0u64;
    for _ in 0..300 {
        let mut s = String::new();
        for _ in 0..12 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            s.push_str(pieces[(state % pieces.len() as u64) as usize]);
        }
        v.push(s);
    }
    v
}

#[test]
fn built_tokenizer_matches_reference() {
    let (json, files) = build_tokenizer_json(&tiny_a()).unwrap();
    assert_eq!(
        files,
        [
            "vocab.json",
            "merges.txt",
            "added_tokens.json",
            "tokenizer_config.json",
            "special_tokens_map.json"
        ]
    );
    let built = Tokenizer::from_bytes(json.as_bytes()).unwrap();
    let reference = Tokenizer::from_bytes(REFERENCE_TOKENIZER_JSON).unwrap();

    // Same pipeline, vocabulary, merges and added tokens.
    let a: serde_json::Value = serde_json::from_str(&json).unwrap();
    let b: serde_json::Value = serde_json::from_slice(REFERENCE_TOKENIZER_JSON).unwrap();
    assert_eq!(a, b, "built tokenizer.json differs from the reference");

    assert_eq!(
        built.encode("a  b", false).unwrap().get_ids(),
        [64, 50286, 65]
    );
    assert_eq!(
        built.encode("Hello world", false).unwrap().get_ids(),
        [15496, 995]
    );
    assert_eq!(
        built.encode("<|endoftext|>", false).unwrap().get_ids(),
        [50256]
    );
    assert_eq!(built.token_to_id("<|endoftext|>"), Some(50256));
    assert_eq!(built.get_vocab_size(true), 50295);

    for s in strings() {
        let x = built.encode(s.as_str(), false).unwrap();
        let y = reference.encode(s.as_str(), false).unwrap();
        assert_eq!(x.get_ids(), y.get_ids(), "{s:?}");
        assert_eq!(x.get_offsets(), y.get_offsets(), "{s:?}");
        let d1 = built.decode(x.get_ids(), false).unwrap();
        let d2 = reference.decode(y.get_ids(), false).unwrap();
        assert_eq!(d1, d2, "{s:?}");
        assert_eq!(d1, s, "byte-level BPE round-trips");
    }
}

/// Without tokenizer_config.json and special_tokens_map.json, `<|endoftext|>` is
/// still the special token (GPT-2's only one).
#[test]
fn minimal_slow_files_suffice() {
    let tmp = tempfile::tempdir().unwrap();
    for f in ["vocab.json", "merges.txt", "added_tokens.json"] {
        std::fs::copy(tiny_a().join(f), tmp.path().join(f)).unwrap();
    }
    let (json, files) = build_tokenizer_json(tmp.path()).unwrap();
    assert_eq!(files, ["vocab.json", "merges.txt", "added_tokens.json"]);
    let a: serde_json::Value = serde_json::from_str(&json).unwrap();
    let b: serde_json::Value = serde_json::from_slice(REFERENCE_TOKENIZER_JSON).unwrap();
    assert_eq!(a, b);
}

#[test]
fn bad_merges_line_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(tiny_a().join("vocab.json"), tmp.path().join("vocab.json")).unwrap();
    std::fs::write(
        tmp.path().join("merges.txt"),
        "#version: 0.2\nĠ t\nbroken\n",
    )
    .unwrap();
    let e = build_tokenizer_json(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("merges.txt") && e.contains("line 3"), "{e}");
}

#[test]
fn added_token_id_gap_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(tiny_a().join(f), tmp.path().join(f)).unwrap();
    }
    std::fs::write(tmp.path().join("added_tokens.json"), r#"{"  ": 50300}"#).unwrap();
    let e = build_tokenizer_json(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("50300"), "{e}");
}
