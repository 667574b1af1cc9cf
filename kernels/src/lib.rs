//! Compute kernels with no model knowledge: quantized block layouts, a scalar
//! reference for every op, and the CPU implementations tested against them.

pub mod quant;

pub use quant::{BlockQ4_0, BlockQ8_0, QuantType, QK};
