//! Mipha-3B model code: the Phi-2 language model as a graph plan, the tokenizer
//! and conversation template, sampling, and the engine that runs them.

pub mod config;
pub mod engine;
pub mod image;
pub mod phi;
pub mod sampling;
pub mod session;
pub mod siglip;
pub mod template;
pub mod tokenizer;

pub use config::{PhiConfig, VisionConfig};
pub use engine::{
    CancelToken, Engine, EngineOptions, GenerateOptions, Generation, Logits, StopReason,
    TextDecoder, Timings,
};
pub use sampling::{Sampler, SamplingParams};
pub use session::{ImageEmbeds, Reply, Session, TurnStats};
pub use template::{ChatTemplate, Segment, Turn};
pub use tokenizer::{MiphaTokenizer, PromptId};
