//! Ask a Mipha model about a picture from your own program.
//!
//! ```sh
//! cargo run --release -p mipha-convert -- tests/fixtures/tiny-a/checkpoint -o tiny-a.mqf --quant f32
//! cargo run --release -p mipha-models --example describe -- tiny-a.mqf assets/examples/chelsea.png "What is in this picture?"
//! ```

use std::io::Write;
use std::sync::Arc;

use mipha_models::{CancelToken, Engine, EngineOptions, GenerateOptions, Session};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(model), Some(image)) = (args.next(), args.next()) else {
        eprintln!("usage: describe MODEL.mqf IMAGE [QUESTION]");
        std::process::exit(2);
    };
    let question = args
        .next()
        .unwrap_or_else(|| "Describe this image briefly.".into());

    // One engine per model file, shared by every session (and thread).
    let engine = Arc::new(Engine::load(&model, EngineOptions::default())?);
    let mut session = Session::new(engine);
    session.attach_image(&image)?;

    // Another thread (a request handler, a Ctrl-C handler) may cancel.
    let cancel = CancelToken::new();
    let opts = GenerateOptions {
        max_tokens: 64,
        ..Default::default()
    };
    let reply = session.ask(&question, &opts, Some(&cancel), |_, piece| {
        print!("{piece}");
        std::io::stdout().flush().is_ok()
    })?;
    println!();
    eprintln!(
        "stop: {}; first token after {:.0} ms; {:.1} tokens/s",
        reply.stop_reason.as_str(),
        reply.stats.time_to_first_token.as_secs_f64() * 1e3,
        reply.stats.decode_tok_s()
    );

    // A follow-up about the same picture reuses the KV cache: only the new
    // question is prefilled.
    let reply = session.ask("Anything else?", &opts, Some(&cancel), |_, _| true)?;
    eprintln!(
        "follow-up: {} positions reused, {} new",
        reply.stats.reused_positions, reply.stats.prefill_positions
    );
    Ok(())
}
