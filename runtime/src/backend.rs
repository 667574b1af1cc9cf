//! The one trait every compute backend implements.

use crate::error::Result;
use crate::graph::{Plan, Weights};

/// One row of a step's input.
#[derive(Clone, Copy, Debug)]
pub enum Input<'a> {
    /// a token id, looked up in the plan's embedding table
    Token(u32),
    /// a ready embedding (e.g. a projected image patch), `plan.input_width` wide
    Embedding(&'a [f32]),
}

/// What one execution of a plan works on.
#[derive(Clone, Copy, Debug)]
pub struct Step<'a> {
    pub inputs: &'a [Input<'a>],
    /// position of `inputs[0]` in its sequence
    pub first_pos: usize,
    /// the sequence's KV block table, covering positions `0..first_pos + inputs.len()`
    pub block_table: &'a [u32],
    /// rows (indices into `inputs`) whose outputs are wanted, e.g. the last one for sampling
    pub outputs: &'a [usize],
}

/// Receives the buffers a plan taps (conformance tests, `mipha-cli logits`).
pub trait Capture: Send {
    /// `rows` holds the step's rows of the tapped buffer, `width` f32 each.
    fn tap(&mut self, name: &str, rows: &[f32], width: usize);
}

/// A compute backend: it holds the activation buffers and the KV storage of one
/// plan, and executes the plan step by step.
pub trait Backend: Send {
    /// e.g. `cpu (avx512, 2 threads)`
    fn name(&self) -> String;

    /// Runs every op of `plan` over `step`. After it returns, [`Backend::output`]
    /// reads the plan's output rows.
    fn execute(
        &mut self,
        plan: &Plan,
        weights: &Weights,
        step: &Step,
        capture: Option<&mut (dyn Capture + '_)>,
    ) -> Result<()>;

    /// Copies the output rows of the last step (`step.outputs.len()` rows of the
    /// output buffer's width) into `out`.
    fn read_output(&mut self, out: &mut [f32]) -> Result<()>;
}
