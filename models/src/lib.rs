//! Mipha-3B model code: the SigLIP vision tower, projector and Phi-2 language
//! model as graph plans; image preprocessing; the tokenizer and conversation
//! template; sampling; and the [`Engine`] and [`Session`] that run them.
//!
//! An [`Engine`] is loaded once from a `.mqf` file and shared between threads.
//! Its step loop serves every caller at once (continuous batching, chunked
//! prefill, a shared prefix cache: see `docs/scheduler.md`); each conversation
//! is a [`Session`] whose KV stays in the engine between turns, and
//! [`Engine::submit`] queues a one-off request and returns its token stream.
//!
//! ```no_run
//! use std::sync::Arc;
//! use mipha_models::{CancelToken, Engine, EngineOptions, GenerateOptions, Session};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let engine = Arc::new(Engine::load("mipha-3b.mqf", EngineOptions::default())?);
//! let mut session = Session::new(engine.clone());
//! session.attach_image("photo.jpg")?;
//! let cancel = CancelToken::new(); // cancel() from any thread stops the answer
//! let reply = session.ask(
//!     "What is shown in this image?",
//!     &GenerateOptions::default(),
//!     Some(&cancel),
//!     |_id, piece| {
//!         print!("{piece}");
//!         true // false stops the answer too
//!     },
//! )?;
//! eprintln!("{:.1} tokens/s", reply.stats.decode_tok_s());
//! // A follow-up costs only its own tokens: the picture stays in the KV cache.
//! session.ask("And the colours?", &GenerateOptions::default(), None, |_, _| true)?;
//! # Ok(())
//! # }
//! ```
//!
//! A runnable program: `examples/describe.rs`.

pub mod config;
pub mod engine;
pub mod image;
pub mod limits;
pub mod phi;
pub mod sampling;
pub mod session;
pub mod siglip;
pub mod template;
pub mod tokenizer;

pub use config::{PhiConfig, VisionConfig};
pub use engine::{available_memory, MemoryNeed};
pub use engine::{
    CancelToken, EncodeStats, Engine, EngineOptions, EngineStats, Finished, GenerateOptions,
    GenerateRequest, Generating, Generation, ImageEmbeddings, ImageEmbeds, KvCacheSize, Logits,
    PromptItem, RequestStats, SessionSlot, StopReason, StreamEvent, TextDecoder, Timings,
    STREAM_WINDOW,
};
pub use limits::{ImageLimits, ModelLimits};
pub use mipha_runtime::{DeviceChoice, KvDtype, LoadProgress};
pub use sampling::{Sampler, SamplingParams};
pub use session::{Reply, Session, TurnStats};
pub use template::{ChatTemplate, Message, Part, Role, Segment, Turn};
pub use tokenizer::{MiphaTokenizer, PromptId, TokenBytes};
