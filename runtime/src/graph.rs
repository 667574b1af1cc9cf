//! The graph plan: a model's forward pass as a flat list of ops over named
//! activation buffers and weights, laid out once at load time.
//!
//! Every buffer is `[max_tokens, width]` f32 and is reused by every layer, so a
//! step allocates nothing; a step runs the same plan over its `n_tokens` rows.
//! Backends execute plans; models only build them.

use std::sync::Arc;

use mipha_kernels::cpu::PackedMatrix;
pub use mipha_kernels::Epilogue;
use mipha_kernels::{KvDtype, QuantType};

use crate::error::{Error, Result};
use crate::format::MqfFile;

/// Index of an activation buffer of a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BufId(pub usize);

/// Index of a weight of a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WeightId(pub usize);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GeluKind {
    /// tanh approximation (`gelu_new`, `gelu_pytorch_tanh`)
    Tanh,
    /// exact erf form (`nn.GELU()`)
    Erf,
}

/// Which rows of a step a row-selective op computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rows {
    /// every row of the step
    All,
    /// the rows the step asks outputs for ([`crate::Step::outputs`]), packed from row 0
    Outputs,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Row t of `out` = the step's input t: a token's embedding row or a given vector.
    Embed {
        table: WeightId,
        out: BufId,
    },
    /// Row t of `out` = the step's input t, which must be a given vector (e.g. an
    /// image patch flattened in the conv weight's `[c, kh, kw]` order).
    Input {
        out: BufId,
    },
    /// Row t of `x` += row t of `table` (learned position embeddings); the step
    /// must not have more rows than the table.
    AddRows {
        x: BufId,
        table: WeightId,
    },
    /// Attention of the step's rows over themselves, without a KV cache (SigLIP).
    SelfAttention {
        q: BufId,
        k: BufId,
        v: BufId,
        out: BufId,
        n_heads: usize,
        head_dim: usize,
        causal: bool,
        scale: f32,
    },
    LayerNorm {
        x: BufId,
        weight: WeightId,
        bias: WeightId,
        eps: f32,
        out: BufId,
    },
    /// out = epilogue(x · wᵀ + bias): stored, through a GELU, or added to `out`
    MatMul {
        x: BufId,
        w: WeightId,
        bias: Option<WeightId>,
        out: BufId,
        rows: Rows,
        epilogue: Epilogue,
    },
    Gelu {
        x: BufId,
        kind: GeluKind,
    },
    /// dst += src
    Add {
        dst: BufId,
        src: BufId,
    },
    /// Partial rotate-half rotary embedding at the step's positions, in place.
    Rope {
        x: BufId,
        n_heads: usize,
        head_dim: usize,
        rot_dims: usize,
        theta: f32,
    },
    /// Appends the step's k/v rows to layer `layer` of the sequence's KV cache, then
    /// attends q over every cached position (causally or not).
    Attention {
        layer: usize,
        q: BufId,
        k: BufId,
        v: BufId,
        out: BufId,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        causal: bool,
        scale: f32,
    },
    /// Hands `x` to the step's capture sink under `name` (debugging and conformance);
    /// a no-op when the step has no sink.
    Tap {
        x: BufId,
        name: String,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct BufferDesc {
    pub name: String,
    /// f32 elements per row
    pub width: usize,
}

/// A weight the plan reads, with the shape the model expects.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightDesc {
    pub name: String,
    pub shape: Vec<u64>,
}

/// Shapes of the KV cache a plan's attention ops need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvShape {
    pub n_layers: usize,
    /// elements of one position's K (or V) row in one layer
    pub kv_dim: usize,
}

impl KvShape {
    /// Bytes of one KV block of `block_size` positions across every layer, K
    /// and V, or `None` when that overflows.
    pub fn block_bytes(&self, block_size: usize, dtype: KvDtype) -> Option<usize> {
        block_size
            .checked_mul(self.kv_dim)?
            .checked_mul(self.n_layers)?
            .checked_mul(2 * dtype.size_bytes())
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub buffers: Vec<BufferDesc>,
    pub weights: Vec<WeightDesc>,
    pub ops: Vec<Op>,
    /// most rows one step may carry
    pub max_tokens: usize,
    /// most output rows one step may ask for (rows of [`Rows::Outputs`] buffers)
    pub max_outputs: usize,
    /// width of a step's input rows (the embedding width)
    pub input_width: usize,
    /// the buffer holding the step's result
    pub output: BufId,
    pub kv: Option<KvShape>,
    /// op indices where a long forward may pause between slices
    /// ([`crate::Backend::execute_ops`]), e.g. after each encoder layer; sorted
    pub breaks: Vec<usize>,
}

impl Plan {
    pub fn buffer(&self, id: BufId) -> &BufferDesc {
        &self.buffers[id.0]
    }

    /// How a backend lays out the plan's activation buffers (every backend
    /// the same way): sizes checked against overflow.
    pub fn buffer_layout(&self) -> Result<BufferLayout> {
        let mut output_rows = vec![false; self.buffers.len()];
        let mut gather_width = 0;
        let mut accumulate_width = 0;
        for op in &self.ops {
            if let Op::MatMul {
                x,
                out,
                rows,
                epilogue,
                ..
            } = op
            {
                if *epilogue == Epilogue::Accumulate {
                    accumulate_width = accumulate_width.max(self.buffer(*out).width);
                }
                if *rows == Rows::Outputs {
                    output_rows[out.0] = true;
                    gather_width = gather_width.max(self.buffer(*x).width);
                }
            }
        }
        let mut lens = Vec::with_capacity(self.buffers.len());
        for (b, &o) in self.buffers.iter().zip(&output_rows) {
            let rows = if o { self.max_outputs } else { self.max_tokens };
            let len = rows
                .checked_mul(b.width)
                .ok_or_else(|| Error::Other(format!("buffer `{}` size overflows", b.name)))?;
            lens.push(len);
        }
        let checked = |rows: usize, width: usize, what: &str| {
            rows.checked_mul(width)
                .ok_or_else(|| Error::Other(format!("the {what} buffer size overflows")))
        };
        Ok(BufferLayout {
            gather_len: checked(self.max_outputs, gather_width, "output-row gather")?,
            scratch_len: checked(self.max_tokens, accumulate_width, "epilogue")?,
            output_rows,
            lens,
        })
    }

    /// The plan's ops cut at its breaks: ranges covering `0..ops.len()` in order.
    pub fn slices(&self) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        let ends = self
            .breaks
            .iter()
            .copied()
            .filter(|&b| b > 0 && b < self.ops.len())
            .chain(std::iter::once(self.ops.len()));
        let mut start = 0;
        ends.filter_map(move |end| {
            let r = start..end;
            start = end;
            (!r.is_empty()).then_some(r)
        })
    }
}

/// [`Plan::buffer_layout`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BufferLayout {
    /// buffers that hold only a step's output rows (written by `Rows::Outputs`
    /// matmuls): `max_outputs` rows instead of `max_tokens`
    pub output_rows: Vec<bool>,
    /// f32 elements of each buffer
    pub lens: Vec<usize>,
    /// elements of the gathered input rows of a `Rows::Outputs` matmul
    pub gather_len: usize,
    /// elements of an accumulating matmul's results before the add
    pub scratch_len: usize,
}

/// Builds a [`Plan`] op by op; models call it from their `forward` methods.
pub struct PlanBuilder {
    plan: Plan,
    /// weight name -> index in `plan.weights` (a plan of many layers must not
    /// search its weights linearly)
    weight_ids: std::collections::HashMap<String, usize>,
}

impl PlanBuilder {
    pub fn new(max_tokens: usize, max_outputs: usize, input_width: usize) -> Self {
        PlanBuilder {
            plan: Plan {
                buffers: Vec::new(),
                weights: Vec::new(),
                ops: Vec::new(),
                max_tokens,
                max_outputs,
                input_width,
                output: BufId(0),
                kv: None,
                breaks: Vec::new(),
            },
            weight_ids: std::collections::HashMap::new(),
        }
    }

    /// A new activation buffer of `width` f32 per row.
    pub fn buffer(&mut self, name: impl Into<String>, width: usize) -> BufId {
        self.plan.buffers.push(BufferDesc {
            name: name.into(),
            width,
        });
        BufId(self.plan.buffers.len() - 1)
    }

    /// A weight the plan reads; the same name twice gives the same id.
    pub fn weight(&mut self, name: impl Into<String>, shape: &[usize]) -> WeightId {
        let name = name.into();
        if let Some(&i) = self.weight_ids.get(&name) {
            return WeightId(i);
        }
        self.weight_ids
            .insert(name.clone(), self.plan.weights.len());
        self.plan.weights.push(WeightDesc {
            name,
            shape: shape.iter().map(|&d| d as u64).collect(),
        });
        WeightId(self.plan.weights.len() - 1)
    }

    pub fn width(&self, id: BufId) -> usize {
        self.plan.buffers[id.0].width
    }

    pub fn push(&mut self, op: Op) {
        self.plan.ops.push(op);
    }

    /// Marks the ops so far as a slice a scheduler may run on its own.
    pub fn mark_break(&mut self) {
        let at = self.plan.ops.len();
        if self.plan.breaks.last() != Some(&at) {
            self.plan.breaks.push(at);
        }
    }

    pub fn set_kv(&mut self, kv: KvShape) {
        self.plan.kv = Some(kv);
    }

    pub fn finish(mut self, output: BufId) -> Plan {
        self.plan.output = output;
        self.plan
    }
}

/// A weight bound to its bytes in the mapped file.
#[derive(Clone, Copy, Debug)]
pub struct BoundWeight<'a> {
    pub ty: QuantType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

impl<'a> BoundWeight<'a> {
    pub fn view(&self) -> mipha_kernels::WeightView<'a> {
        mipha_kernels::WeightView::new(self.ty, self.data, self.rows, self.cols)
    }

    /// The weight as f32 values; only for F32 tensors (norms, biases, embeddings).
    pub fn f32s(&self) -> &'a [f32] {
        debug_assert_eq!(self.ty, QuantType::F32);
        bytemuck::cast_slice(self.data)
    }
}

#[derive(Clone, Copy, Debug)]
struct RawWeight {
    ty: QuantType,
    rows: usize,
    cols: usize,
    ptr: *const u8,
    len: usize,
}

/// The plan's weights resolved against a file, shapes checked once at load.
/// Holds the file, so weights and file travel together (engines are shared
/// between threads and live as long as any session).
pub struct Weights {
    file: Arc<MqfFile>,
    raw: Vec<RawWeight>,
    /// Q8_0/Q4_0 matmul weights repacked for the CPU's integer kernels
    packed: Vec<Option<PackedMatrix>>,
}

/// How [`Weights::bind_with`] prepares weights. Matmul weights stored as F16 or
/// BF16 are always repacked into the panel layout of the CPU kernels (same math:
/// f32 activations).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BindOptions {
    /// Repack Q8_0/Q4_0 matmul weights for the CPU's int8 kernels (activations
    /// quantized to int8 per 32-block, as llama.cpp does), and let BF16 weights
    /// take the BF16 dot where the CPU has it (activations rounded to BF16,
    /// `mipha_kernels::cpu::dispatch::bf16_dot`). Off: Q8_0/Q4_0 weights are
    /// read in place and every weight type multiplies f32 activations (slower;
    /// exact against a dequantized-weights oracle).
    pub int8_activations: bool,
    /// BF16 weights: `Some(dot)` picks the BF16 dot or the exact path;
    /// `None`: the dot where `int8_activations` is on and
    /// `mipha_kernels::cpu::dispatch::bf16_dot` says so.
    pub bf16_dot: Option<bool>,
    /// Repack matmul weights into the CPU kernels' panels at all. A GPU engine
    /// turns it off: its plans read the file's layouts, uploaded once.
    pub cpu_repack: bool,
}

impl Default for BindOptions {
    fn default() -> Self {
        BindOptions {
            int8_activations: true,
            bf16_dot: None,
            cpu_repack: true,
        }
    }
}

/// Reports the slow part of loading a model, for progress bars: called with a
/// stage (`"repacking weights"` for the CPU panels, `"uploading weights"` to a
/// GPU), the bytes done and the stage's total, after each weight.
#[derive(Clone)]
pub struct LoadProgress(Arc<ProgressFn>);

/// `(stage, bytes done, bytes total)`
type ProgressFn = dyn Fn(&str, u64, u64) + Send + Sync;

impl LoadProgress {
    pub fn new(f: impl Fn(&str, u64, u64) + Send + Sync + 'static) -> Self {
        LoadProgress(Arc::new(f))
    }

    pub fn report(&self, stage: &str, done: u64, total: u64) {
        (self.0)(stage, done, total)
    }
}

impl std::fmt::Debug for LoadProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoadProgress(..)")
    }
}

// SAFETY: the pointers point into `file`'s read-only memory map, which is kept
// alive by the Arc and never written or remapped.
unsafe impl Send for Weights {}
unsafe impl Sync for Weights {}

impl Weights {
    /// Looks up every weight of `plan` in `file`, checks its shape, and checks that
    /// weights read as plain f32 (norms, biases) are stored as F32.
    pub fn bind(plan: &Plan, file: Arc<MqfFile>) -> Result<Self> {
        Self::bind_with(plan, file, BindOptions::default())
    }

    /// [`Weights::bind`] with options. Repacked weights are copied once here and
    /// their pages of the file released, so memory holds one copy of each.
    pub fn bind_with(plan: &Plan, file: Arc<MqfFile>, options: BindOptions) -> Result<Self> {
        Self::bind_reporting(plan, file, options, None)
    }

    /// [`Weights::bind_with`], reporting the repacking to `progress`.
    pub fn bind_reporting(
        plan: &Plan,
        file: Arc<MqfFile>,
        options: BindOptions,
        progress: Option<&LoadProgress>,
    ) -> Result<Self> {
        let f32_only = f32_only_weights(plan);
        let mut raw = Vec::with_capacity(plan.weights.len());
        for (i, desc) in plan.weights.iter().enumerate() {
            let t = file.tensor(&desc.name)?;
            if t.info.shape != desc.shape {
                return Err(Error::Shape {
                    tensor: desc.name.clone(),
                    detail: format!(
                        "the model expects shape {:?}, the file has {:?}",
                        desc.shape, t.info.shape
                    ),
                });
            }
            if f32_only[i] && t.info.ty != QuantType::F32 {
                return Err(Error::Shape {
                    tensor: desc.name.clone(),
                    detail: format!("must be stored as f32, the file has {}", t.info.ty),
                });
            }
            // An F32 tensor of more than two dims (a conv kernel) is also a matrix of
            // shape[0] rows: F32 rows are never padded, so the bytes are the same.
            let (rows, cols) = if t.info.ty == QuantType::F32 && t.info.shape.len() > 2 {
                let rows = t.info.shape[0] as usize;
                (rows, t.info.numel() / rows)
            } else {
                (t.info.rows(), t.info.cols())
            };
            raw.push(RawWeight {
                ty: t.info.ty,
                rows,
                cols,
                ptr: t.data.as_ptr(),
                len: t.data.len(),
            });
        }
        let mut packed: Vec<Option<PackedMatrix>> = (0..raw.len()).map(|_| None).collect();
        let mut wanted = vec![false; raw.len()];
        for op in &plan.ops {
            if let Op::MatMul { w, .. } = op {
                wanted[w.0] = options.cpu_repack
                    && match raw[w.0].ty {
                        QuantType::Q8_0 | QuantType::Q4_0 => options.int8_activations,
                        QuantType::F16 | QuantType::BF16 => true,
                        QuantType::F32 => false,
                    };
            }
        }
        let total: u64 = (0..raw.len())
            .filter(|&i| wanted[i])
            .map(|i| raw[i].len as u64)
            .sum();
        let mut done = 0;
        for (i, r) in raw.iter().enumerate() {
            if wanted[i] {
                // SAFETY: as in `get`.
                let data = unsafe { std::slice::from_raw_parts(r.ptr, r.len) };
                let view = mipha_kernels::WeightView::new(r.ty, data, r.rows, r.cols);
                // Exact mode keeps BF16 on f32 activations too.
                let bf16_dot = options.bf16_dot.unwrap_or_else(|| {
                    options.int8_activations && mipha_kernels::cpu::dispatch::bf16_dot()
                });
                packed[i] = PackedMatrix::pack_with(view, bf16_dot);
                file.release(data);
                done += r.len as u64;
                if let Some(p) = progress {
                    p.report("repacking weights", done, total);
                }
            }
        }
        Ok(Weights { file, raw, packed })
    }

    /// The repacked form of a matmul weight, if it has one.
    pub fn packed(&self, id: WeightId) -> Option<&PackedMatrix> {
        self.packed[id.0].as_ref()
    }

    pub fn file(&self) -> &Arc<MqfFile> {
        &self.file
    }

    pub fn get(&self, id: WeightId) -> BoundWeight<'_> {
        let r = &self.raw[id.0];
        BoundWeight {
            ty: r.ty,
            rows: r.rows,
            cols: r.cols,
            // SAFETY: see the Send/Sync impls; ptr/len came from a slice of the map.
            data: unsafe { std::slice::from_raw_parts(r.ptr, r.len) },
        }
    }
}

fn f32_only_weights(plan: &Plan) -> Vec<bool> {
    let mut only = vec![false; plan.weights.len()];
    for op in &plan.ops {
        match op {
            Op::LayerNorm { weight, bias, .. } => {
                only[weight.0] = true;
                only[bias.0] = true;
            }
            Op::MatMul { bias: Some(b), .. } => only[b.0] = true,
            Op::AddRows { table, .. } => only[table.0] = true,
            _ => {}
        }
    }
    only
}
