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

/// The rows of one sequence in a step: `rows` consecutive inputs at positions
/// `first_pos..first_pos + rows`, whose K/V live through `block_table`.
pub use mipha_kernels::AttnSeq as SeqRows;

/// What one execution of a plan works on: the rows of one or more sequences
/// (a continuous batch: decode rows of running sequences and chunks of
/// prefills), each attending through its own block table.
#[derive(Clone, Copy, Debug)]
pub struct Step<'a> {
    pub inputs: &'a [Input<'a>],
    /// `inputs` grouped by sequence, in order: the rows of `seqs[0]` first. A
    /// plan without a KV cache (the vision tower) takes one group.
    pub seqs: &'a [SeqRows<'a>],
    /// rows (indices into `inputs`) whose outputs are wanted, e.g. the last row
    /// of each sequence that samples
    pub outputs: &'a [usize],
}

impl<'a> Step<'a> {
    /// Row `i`'s position in its sequence, for every row.
    pub fn positions(&self) -> impl Iterator<Item = usize> + 'a {
        self.seqs
            .iter()
            .flat_map(|s| s.first_pos..s.first_pos + s.rows)
    }

    /// Checks the step against `plan`'s sizes: 1 to `max_tokens` rows, grouped
    /// into sequences that cover them exactly, at most `max_outputs` output rows,
    /// each inside the step. Every backend calls it before running ops.
    pub fn check(&self, plan: &Plan) -> Result<()> {
        let n = self.inputs.len();
        if n == 0 || n > plan.max_tokens {
            return Err(Error::Other(format!(
                "a step carries 1..={} rows, got {n}",
                plan.max_tokens
            )));
        }
        let mut rows = 0usize;
        for s in self.seqs {
            if s.rows == 0 {
                return Err(Error::Other("a step's sequence has no rows".into()));
            }
            rows += s.rows;
            if s.first_pos.checked_add(s.rows).is_none() {
                return Err(Error::Other(format!("position {} overflows", s.first_pos)));
            }
        }
        if rows != n {
            return Err(Error::Other(format!(
                "a step's sequences cover {rows} rows, it carries {n}"
            )));
        }
        if plan.kv.is_none() && self.seqs.len() != 1 {
            return Err(Error::Other(format!(
                "a plan without a KV cache runs one sequence per step, got {}",
                self.seqs.len()
            )));
        }
        if self.outputs.len() > plan.max_outputs {
            return Err(Error::Other(format!(
                "a step may ask for at most {} output rows, got {}",
                plan.max_outputs,
                self.outputs.len()
            )));
        }
        if let Some(&r) = self.outputs.iter().find(|&&r| r >= n) {
            return Err(Error::Other(format!(
                "output row {r} is outside the step's {n} rows"
            )));
        }
        Ok(())
    }

    /// Checks that every sequence's block table holds its positions
    /// `0..first_pos + rows`, each block inside a KV pool of `n_blocks` blocks of
    /// `block_size`.
    pub fn check_kv(&self, block_size: usize, n_blocks: usize) -> Result<()> {
        for s in self.seqs {
            let total = s.first_pos + s.rows;
            let used = total.div_ceil(block_size);
            if s.block_table.len() < used {
                return Err(Error::Other(format!(
                    "block table covers {} positions, the step needs {total}",
                    s.block_table.len() * block_size
                )));
            }
            if let Some(&b) = s.block_table[..used]
                .iter()
                .find(|&&b| b as usize >= n_blocks)
            {
                return Err(Error::Other(format!(
                    "block {b} is outside the KV pool of {n_blocks}"
                )));
            }
        }
        Ok(())
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

    /// Runs every op of `plan` over `step`. After it returns, [`Backend::read_output`]
    /// reads the plan's output rows.
    fn execute(
        &mut self,
        plan: &Plan,
        weights: &Weights,
        step: &Step,
        capture: Option<&mut (dyn Capture + '_)>,
    ) -> Result<()> {
        self.execute_ops(plan, weights, step, 0..plan.ops.len(), capture)
    }

    /// Runs ops `ops` of `plan` over `step`: a slice of a long forward (the
    /// vision tower, a few layers at a time between decode steps). Activation
    /// buffers keep their contents between calls, so running the slices of a
    /// plan in order over the same step equals one [`Backend::execute`]; the
    /// slices should end at the plan's [`Plan::breaks`].
    fn execute_ops(
        &mut self,
        plan: &Plan,
        weights: &Weights,
        step: &Step,
        ops: std::ops::Range<usize>,
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
