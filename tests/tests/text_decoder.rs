//! The streaming text decoder (byte table, no tokenizer call per token) against
//! `tokenizers`' own decoding, on random id streams rich in partial UTF-8.

use mipha_models::TextDecoder;
use mipha_tests::*;

#[test]
fn streamed_pieces_concatenate_to_the_tokenizers_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let mqf = convert(&fixture("tiny-a/checkpoint"), dir.path(), "f32", "f32");
    let engine = conformance_engine(&mqf);
    let tok = engine.tokenizer();
    assert!(
        tok.token_bytes().is_some(),
        "Phi-2's decoder is byte-level: the byte table must be built"
    );
    let vocab = tok.vocab_size() as u64;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    for round in 0..300 {
        let len = 1 + next(40) as usize;
        let ids: Vec<u32> = (0..len)
            .map(|_| match next(4) {
                // single-byte tokens: lone lead and continuation bytes, split characters
                0 | 1 => next(256) as u32,
                2 => (vocab - 1 - next(200)) as u32, // added tokens (runs of spaces, tabs)
                _ => next(vocab) as u32,
            })
            .collect();
        let mut d = TextDecoder::new(tok);
        let mut streamed = String::new();
        for (i, &id) in ids.iter().enumerate() {
            streamed.push_str(d.push(tok, id).unwrap());
            let whole = tok.decode(&ids[..=i]).unwrap();
            if whole.ends_with('\u{fffd}') {
                // possibly an incomplete character, held back until completed
                assert!(
                    whole.starts_with(&streamed),
                    "round {round}, ids {:?}: {streamed:?} is not a prefix of {whole:?}",
                    &ids[..=i]
                );
            } else {
                assert_eq!(streamed, whole, "round {round}, ids {:?}", &ids[..=i]);
            }
        }
    }
}
