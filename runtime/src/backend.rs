//! The one trait every compute backend implements.

use std::any::Any;
use std::fmt::Debug;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::graph::{Plan, Weights};

/// One row of a step's input.
#[derive(Clone, Copy, Debug)]
pub enum Input<'a> {
    /// a token id, looked up in the plan's embedding table
    Token(u32),
    /// a ready embedding (e.g. a projected image patch), `plan.input_width` wide
    Embedding(&'a [f32]),
    /// row `row` of rows another backend kept in its own memory
    /// ([`Backend::keep_output`]), e.g. projected image tokens on the GPU: only a
    /// backend of that memory takes them
    Resident {
        rows: &'a dyn ResidentRows,
        row: usize,
    },
}

/// Rows a backend kept in its own (device) memory, handed to another backend of
/// the same device without a round trip through the host.
pub trait ResidentRows: Debug + Send + Sync {
    fn rows(&self) -> usize;
    /// f32 values per row
    fn width(&self) -> usize;
    /// A copy on the host (tests, `mipha-cli logits`; not on the fast path).
    fn to_host(&self) -> Result<Vec<f32>>;
    /// e.g. `cuda:0`: rows are only taken by backends of the same memory
    fn location(&self) -> String;
    /// For the backend that made them, to reach its own type.
    fn as_any(&self) -> &dyn Any;
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

impl Step<'_> {
    /// Checks the step against `plan`'s sizes: 1 to `max_tokens` rows, at most
    /// `max_outputs` output rows. Every backend calls it before running ops.
    pub fn check(&self, plan: &Plan) -> Result<()> {
        let n = self.inputs.len();
        if n == 0 || n > plan.max_tokens {
            return Err(Error::Other(format!(
                "a step carries 1..={} rows, got {n}",
                plan.max_tokens
            )));
        }
        if self.outputs.len() > plan.max_outputs {
            return Err(Error::Other(format!(
                "a step may ask for at most {} output rows, got {}",
                plan.max_outputs,
                self.outputs.len()
            )));
        }
        Ok(())
    }

    /// The blocks of the block table that hold positions `0..first_pos + rows`,
    /// each checked to lie inside a KV pool of `n_blocks` blocks of `block_size`.
    pub fn kv_blocks(&self, block_size: usize, n_blocks: usize) -> Result<&[u32]> {
        let total = self.first_pos + self.inputs.len();
        let used = total.div_ceil(block_size);
        if self.block_table.len() < used {
            return Err(Error::Other(format!(
                "block table covers {} positions, the step needs {total}",
                self.block_table.len() * block_size
            )));
        }
        let blocks = &self.block_table[..used];
        if let Some(&b) = blocks.iter().find(|&&b| b as usize >= n_blocks) {
            return Err(Error::Other(format!(
                "block {b} is outside the KV pool of {n_blocks}"
            )));
        }
        Ok(blocks)
    }
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

    /// Keeps the output rows of the last step in this backend's memory and
    /// returns them as a handle that a backend of the same memory takes as
    /// [`Input::Resident`] rows. `None` (the default) means this backend's memory
    /// is the host's: use [`Backend::read_output`].
    fn keep_output(&mut self) -> Result<Option<Arc<dyn ResidentRows>>> {
        Ok(None)
    }
}
