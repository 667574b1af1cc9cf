//! Conversion of Hugging Face Mipha checkpoints to `.mqf`, plus `inspect`, `verify`
//! and `synth` (a random-weight model in a config's real shapes).
//!
//! Conversion reads each tensor with positioned reads, a block of rows at a time, and
//! holds at most one tensor's stored bytes, so memory stays far below the model size.

pub mod checkpoint;
pub mod config;
mod convert;
pub mod error;
mod inspect;
pub mod metadata;
pub mod plan;
mod progress;
mod synth;
pub mod tokenizer;

pub use convert::{convert_checkpoint, ConvertOptions, ConvertReport};
pub use error::{ConvertError, Result};
pub use inspect::{inspect, verify, VerifyReport};
pub use mipha_kernels::QuantType;
pub use synth::{synth, SynthOptions, SynthReport};
