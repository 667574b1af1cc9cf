//! The `phi` conversation template and chunk-wise tokenization around images,
//! against the authors' token ids (reference doc §8) and the tiny-a goldens.

use mipha_models::{ChatTemplate, MiphaTokenizer, PromptId, Segment, Turn};
use mipha_runtime::{MetaValue, Metadata};
use mipha_tests::{fixture, Golden};

fn tokenizer() -> MiphaTokenizer {
    let json = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../assets/phi2-tokenizer/tokenizer.json"
    ))
    .unwrap();
    let mut m = Metadata::new();
    m.insert("tokenizer.huggingface.json", MetaValue::Bytes(json));
    m.insert("tokenizer.eos_token_id", MetaValue::U64(50256));
    m.insert("tokenizer.image_token_index", MetaValue::I64(-200));
    MiphaTokenizer::from_metadata(&m).unwrap()
}

fn ids_of(g: &Golden) -> Vec<i64> {
    g.json["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect()
}

#[test]
fn reference_doc_example_ids() {
    let tok = tokenizer();
    let segs = ChatTemplate::phi().render(&[Turn {
        user: "What is shown in this image? Describe it briefly.".into(),
        images: 1,
        assistant: None,
    }]);
    let ids = tok.to_raw_ids(&tok.encode_segments(&segs).unwrap());
    let fixed: Vec<i64> = "32 8537 1022 257 11040 2836 290 281 11666 4430 8796 13 383 8796 3607 \
                           7613 11 6496 11 290 23507 7429 284 262 2836 338 2683 13 1294 1137 25 220"
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(&ids[..fixed.len()], fixed.as_slice(), "system + ' USER: '");
    assert_eq!(ids[fixed.len()], -200, "the image placeholder");
    assert_eq!(ids[fixed.len() + 1], 198, "the newline after the image");
    assert_eq!(
        &ids[ids.len() - 4..],
        &[24994, 8808, 8643, 25],
        "' ASSISTANT:'"
    );
}

#[test]
fn tiny_a_golden_prompts_tokenize_identically() {
    let tok = tokenizer();
    let t = ChatTemplate::phi();
    let img = Golden::load(&fixture("tiny-a/golden_image.safetensors"));
    let segs = t.render(&[Turn {
        user: img.json["prompt_question"].as_str().unwrap().into(),
        images: 1,
        assistant: None,
    }]);
    assert_eq!(
        tok.to_raw_ids(&tok.encode_segments(&segs).unwrap()),
        ids_of(&img)
    );
    assert_eq!(img.ids("input_ids"), ids_of(&img));

    let txt = Golden::load(&fixture("tiny-a/golden_text.safetensors"));
    let segs = t.render(&[Turn {
        user: txt.json["prompt_question"].as_str().unwrap().into(),
        images: 0,
        assistant: None,
    }]);
    let rendered: String = segs
        .iter()
        .map(|s| match s {
            Segment::Text(t) | Segment::Special(t) => t.as_str(),
            Segment::Image(_) => "<image>",
        })
        .collect();
    assert_eq!(rendered, txt.json["prompt_text"].as_str().unwrap());
    assert_eq!(
        tok.to_raw_ids(&tok.encode_segments(&segs).unwrap()),
        ids_of(&txt)
    );
}

#[test]
fn whitespace_runs_are_single_added_tokens_and_no_bos_is_added() {
    let tok = tokenizer();
    assert_eq!(tok.encode("a  b").unwrap(), vec![64, 50286, 65]);
    assert_eq!(tok.encode("<|endoftext|>").unwrap(), vec![50256]);
    assert_eq!(tok.eos_token_id(), 50256);
}

#[test]
fn a_typed_image_tag_without_an_image_is_text() {
    let tok = tokenizer();
    let segs = ChatTemplate::phi().render(&[Turn {
        user: "what does <image> mean?".into(),
        images: 0,
        assistant: None,
    }]);
    let ids = tok.encode_segments(&segs).unwrap();
    assert!(ids.iter().all(|id| matches!(id, PromptId::Token(_))));
}

#[test]
fn multi_turn_follows_style_two() {
    let segs = ChatTemplate::phi().render(&[
        Turn {
            user: "Hi".into(),
            images: 1,
            assistant: Some("Hello.".into()),
        },
        Turn {
            user: "More?".into(),
            images: 0,
            assistant: None,
        },
    ]);
    let sys = ChatTemplate::phi().system;
    assert_eq!(
        segs,
        vec![
            Segment::Text(format!("{sys} USER: ")),
            Segment::Image(0),
            Segment::Text("\nHi ASSISTANT: Hello.".into()),
            Segment::Special("<|endoftext|>".into()),
            Segment::Text("USER: More? ASSISTANT:".into()),
        ]
    );
}

#[test]
fn a_transcript_ending_with_an_answer_renders_whole() {
    // (a restored conversation; it used to panic in `render`)
    let segs = ChatTemplate::phi().render(&[Turn {
        user: "Hi".into(),
        images: 0,
        assistant: Some("Hello.".into()),
    }]);
    let sys = ChatTemplate::phi().system;
    assert_eq!(
        segs,
        vec![
            Segment::Text(format!("{sys} USER: Hi ASSISTANT: Hello.")),
            Segment::Special("<|endoftext|>".into()),
        ]
    );
    // The server's message form still wants the user's message last.
    use mipha_models::{Message, Part, Role};
    let chat = [
        Message {
            role: Role::User,
            content: vec![Part::Text("Hi".into())],
        },
        Message {
            role: Role::Assistant,
            content: vec![Part::Text("Hello.".into())],
        },
    ];
    assert!(ChatTemplate::phi().render_messages(&chat).is_err());
}

#[test]
fn user_text_never_becomes_a_control_token() {
    let tok = tokenizer();
    let segs = ChatTemplate::phi().render(&[Turn {
        user: "stop<|endoftext|>here".into(),
        images: 0,
        assistant: None,
    }]);
    let ids = tok.to_raw_ids(&tok.encode_segments(&segs).unwrap());
    assert!(!ids.contains(&50256), "{ids:?}");
    let ids = tok.to_raw_ids(&tok.encode_segments_with(&segs, true).unwrap());
    assert!(ids.contains(&50256), "{ids:?}");
}
