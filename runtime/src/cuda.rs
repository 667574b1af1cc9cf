//! The CUDA backend (feature `cuda`): executes a [`Plan`] with the kernels of
//! `mipha_kernels::cuda`. Activation buffers, the plan's weights (uploaded once, in
//! their stored layout, when the backend is made) and the paged KV pool all live
//! in device memory. Per step, only the step's small values go up (token ids,
//! positions, the block table: written into device buffers before the kernels
//! run) plus any host embedding rows; the output rows (and taps) come back.
//! Image embeddings kept on the device by the vision plan's backend
//! ([`Backend::keep_output`]) are copied device to device.
//!
//! A decode step (one token, one output row) is captured once as a CUDA graph and
//! replayed: every kernel of it reads the per-step values from those device
//! buffers, and the decode attention's split count is sized for the whole table,
//! so the same launches serve every position. See `docs/cuda.md`.

use std::any::Any;
use std::sync::Arc;

use mipha_kernels::cuda::{
    decode_workspace_len, CudaError, CudaGraph, Device, DeviceBuffer, DeviceKv, DeviceWeight,
    DECODE_MAX_ROWS,
};

use crate::backend::{Backend, Capture, Input, ResidentRows, Step};
use crate::cpu::KvConfig;
use crate::error::{Error, Result};
use crate::graph::{BufId, Epilogue, GeluKind, LoadProgress, Op, Plan, Rows, WeightId, Weights};

pub use crate::device::{DeviceChoice, Resolved};
pub use mipha_kernels::cuda::Device as CudaDevice;

fn cu(e: CudaError) -> Error {
    Error::Other(format!("cuda: {e}"))
}

fn drv(e: mipha_kernels::cuda::DriverError) -> Error {
    cu(CudaError::Driver(e))
}

/// Output rows kept on the device ([`Backend::keep_output`]).
pub struct CudaRows {
    dev: Arc<Device>,
    data: DeviceBuffer<f32>,
    rows: usize,
    width: usize,
}

impl std::fmt::Debug for CudaRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaRows({} x {} on {})",
            self.rows,
            self.width,
            self.dev.describe()
        )
    }
}

impl ResidentRows for CudaRows {
    fn rows(&self) -> usize {
        self.rows
    }
    fn width(&self) -> usize {
        self.width
    }
    fn to_host(&self) -> Result<Vec<f32>> {
        self.dev.download(&self.data).map_err(cu)
    }
    fn location(&self) -> String {
        self.dev.describe()
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A captured decode step. SAFETY of Send: the graph is only touched through
/// `&mut CudaBackend` (one thread at a time), as cudarc's docs require.
struct DecodeGraph {
    graph: CudaGraph,
}

unsafe impl Send for DecodeGraph {}

/// Whether decode steps are captured as CUDA graphs: on unless
/// `MIPHA_CUDA_GRAPH=0` (or [`CudaBackend::set_graphs`]).
fn graphs_from_env() -> bool {
    std::env::var("MIPHA_CUDA_GRAPH").map_or(true, |v| v != "0")
}

enum DevWeight {
    Matrix(DeviceWeight),
    F32(DeviceBuffer<f32>),
}

struct KvStorage {
    k: Vec<DeviceBuffer<f32>>,
    v: Vec<DeviceBuffer<f32>>,
    block_size: usize,
    n_blocks: usize,
    kv_dim: usize,
}

pub struct CudaBackend {
    dev: Arc<Device>,
    /// `None` only while an op holds the buffer it writes
    buffers: Vec<Option<DeviceBuffer<f32>>>,
    output_rows: Vec<bool>,
    weights: Vec<Option<DevWeight>>,
    /// gathered input rows of a `Rows::Outputs` matmul
    gather: DeviceBuffer<f32>,
    /// results of an accumulating matmul before the add
    scratch: DeviceBuffer<f32>,
    /// per-step values, written before the step's kernels (and before a graph
    /// replay): position of each row, token id of each row (0 for vector rows),
    /// the sequence's block table
    positions: DeviceBuffer<u32>,
    ids: DeviceBuffer<u32>,
    table: DeviceBuffer<u32>,
    host_positions: Vec<u32>,
    host_ids: Vec<u32>,
    /// `[0]`: one block covering a self-attention's rows
    one_block: DeviceBuffer<u32>,
    /// decode attention's split partials, sized for the whole table
    attn_ws: DeviceBuffer<f32>,
    staging: Vec<f32>,
    kv: Option<KvStorage>,
    /// (buffer, rows, width) of the last step's output
    last_output: Option<(BufId, usize, usize)>,
    graphs: bool,
    graph: Option<DecodeGraph>,
    /// why capture failed (decode then runs plain launches)
    graph_error: Option<String>,
    graph_replays: u64,
    /// steps of more than GEMV_MAX_ROWS rows multiply through the f16 GEMM
    f16_gemm: bool,
}

fn alloc(dev: &Device, n: usize) -> Result<DeviceBuffer<f32>> {
    dev.zeros::<f32>(n.max(1)).map_err(cu)
}

impl CudaBackend {
    /// Lays out every buffer of `plan` and the KV pool on `dev`, and uploads every
    /// weight the plan reads.
    pub fn new(
        plan: &Plan,
        weights: &Weights,
        kv: Option<KvConfig>,
        dev: Arc<Device>,
    ) -> Result<Self> {
        Self::new_reporting(plan, weights, kv, dev, None)
    }

    /// [`CudaBackend::new`], reporting the weight upload to `progress`.
    pub fn new_reporting(
        plan: &Plan,
        weights: &Weights,
        kv: Option<KvConfig>,
        dev: Arc<Device>,
        progress: Option<&LoadProgress>,
    ) -> Result<Self> {
        let mut output_rows = vec![false; plan.buffers.len()];
        let mut gather_width = 0;
        let mut accumulate_width = 0;
        let mut f32_weights: Vec<WeightId> = Vec::new();
        let mut matrices: Vec<WeightId> = Vec::new();
        let mut attn_heads = (0, 0);
        for op in &plan.ops {
            match op {
                Op::MatMul {
                    x,
                    w,
                    bias,
                    out,
                    rows,
                    epilogue,
                } => {
                    if *epilogue == Epilogue::Accumulate {
                        accumulate_width = accumulate_width.max(plan.buffer(*out).width);
                    }
                    if *rows == Rows::Outputs {
                        output_rows[out.0] = true;
                        gather_width = gather_width.max(plan.buffer(*x).width);
                    }
                    matrices.push(*w);
                    f32_weights.extend(bias);
                }
                Op::Embed { table, .. } => matrices.push(*table),
                Op::LayerNorm { weight, bias, .. } => f32_weights.extend([*weight, *bias]),
                Op::AddRows { table, .. } => f32_weights.push(*table),
                Op::Attention {
                    n_heads, head_dim, ..
                } => attn_heads = (attn_heads.0.max(*n_heads), attn_heads.1.max(*head_dim)),
                _ => {}
            }
        }
        let mut dw: Vec<Option<DevWeight>> = (0..plan.weights.len()).map(|_| None).collect();
        for id in f32_weights {
            if dw[id.0].is_none() {
                let data = dev.upload(weights.get(id).f32s()).map_err(cu)?;
                dw[id.0] = Some(DevWeight::F32(data));
            }
        }
        matrices.sort_by_key(|id| id.0);
        matrices.dedup();
        let bytes = |id: &WeightId| weights.get(*id).data.len() as u64;
        let total: u64 = matrices.iter().map(bytes).sum();
        let mut done = 0;
        for id in matrices {
            if dw[id.0].is_none() {
                let m = dev.upload_weight(weights.get(id).view()).map_err(cu)?;
                dw[id.0] = Some(DevWeight::Matrix(m));
            }
            done += bytes(&id);
            if let Some(p) = progress {
                p.report("uploading weights", done, total);
            }
        }
        let mut buffers = Vec::with_capacity(plan.buffers.len());
        for (b, &o) in plan.buffers.iter().zip(&output_rows) {
            let rows = if o { plan.max_outputs } else { plan.max_tokens };
            buffers.push(Some(alloc(&dev, rows * b.width)?));
        }
        let kv = match (plan.kv, kv) {
            (Some(shape), Some(cfg)) => {
                let elems = cfg
                    .n_blocks
                    .checked_mul(cfg.block_size)
                    .and_then(|n| n.checked_mul(shape.kv_dim))
                    .ok_or_else(|| Error::Other("KV cache size overflows".into()))?;
                let mut k = Vec::with_capacity(shape.n_layers);
                let mut v = Vec::with_capacity(shape.n_layers);
                for _ in 0..shape.n_layers {
                    k.push(alloc(&dev, elems)?);
                    v.push(alloc(&dev, elems)?);
                }
                Some(KvStorage {
                    k,
                    v,
                    block_size: cfg.block_size,
                    n_blocks: cfg.n_blocks,
                    kv_dim: shape.kv_dim,
                })
            }
            (Some(_), None) => {
                return Err(Error::Other(
                    "this plan attends over a KV cache but none was configured".into(),
                ))
            }
            (None, _) => None,
        };
        let table_len = kv.as_ref().map_or(1, |k| k.n_blocks);
        let max_keys = kv.as_ref().map_or(0, |k| k.n_blocks * k.block_size);
        let ws = decode_workspace_len(DECODE_MAX_ROWS, attn_heads.0, attn_heads.1, max_keys);
        Ok(CudaBackend {
            gather: alloc(&dev, plan.max_outputs * gather_width)?,
            scratch: alloc(&dev, plan.max_tokens * accumulate_width)?,
            positions: dev.zeros::<u32>(plan.max_tokens.max(1)).map_err(cu)?,
            ids: dev.zeros::<u32>(plan.max_tokens.max(1)).map_err(cu)?,
            table: dev.zeros::<u32>(table_len.max(1)).map_err(cu)?,
            host_positions: Vec::with_capacity(plan.max_tokens),
            host_ids: Vec::with_capacity(plan.max_tokens),
            one_block: dev.zeros::<u32>(1).map_err(cu)?,
            attn_ws: alloc(&dev, if kv.is_some() { ws } else { 1 })?,
            staging: Vec::new(),
            buffers,
            output_rows,
            weights: dw,
            kv,
            last_output: None,
            graphs: graphs_from_env(),
            graph: None,
            graph_error: None,
            graph_replays: 0,
            f16_gemm: true,
            dev,
        })
    }

    pub fn device(&self) -> &Arc<Device> {
        &self.dev
    }

    /// Turns CUDA-graph capture of decode steps on or off (on by default unless
    /// `MIPHA_CUDA_GRAPH=0`); off drops a captured graph.
    pub fn set_graphs(&mut self, on: bool) {
        self.graphs = on;
        if !on {
            self.graph = None;
        }
    }

    /// Whether matmuls of more than `GEMV_MAX_ROWS` rows use cuBLAS's f16
    /// tensor-core GEMM (on by default: prefill and vision speed) or stay on the
    /// f32 GEMV kernels (exact f32 activations, as the conformance tests want).
    pub fn set_f16_gemm(&mut self, on: bool) {
        self.f16_gemm = on;
    }

    /// Decode steps replayed from the captured graph so far.
    pub fn graph_replays(&self) -> u64 {
        self.graph_replays
    }

    /// Why decode-step capture failed, if it did (decode then launches plainly).
    pub fn graph_error(&self) -> Option<&str> {
        self.graph_error.as_deref()
    }

    fn rows(&self, b: BufId, n_tokens: usize, n_outputs: usize) -> usize {
        if self.output_rows[b.0] {
            n_outputs
        } else {
            n_tokens
        }
    }

    fn buf(&self, b: BufId) -> &DeviceBuffer<f32> {
        self.buffers[b.0]
            .as_ref()
            .expect("a plan op reads the buffer it writes")
    }

    fn take(&mut self, b: BufId) -> DeviceBuffer<f32> {
        self.buffers[b.0]
            .take()
            .expect("a plan op reads the buffer it writes")
    }

    fn matrix(&self, id: WeightId) -> &DeviceWeight {
        matrix_of(&self.weights, id)
    }

    fn f32w(&self, id: WeightId) -> &DeviceBuffer<f32> {
        f32_of(&self.weights, id)
    }

    /// Checks the step's values on the host and writes them into the device
    /// buffers the kernels read: positions, token ids, the block table.
    fn upload_step(&mut self, plan: &Plan, step: &Step) -> Result<()> {
        let n = step.inputs.len();
        let dev = self.dev.clone();
        self.host_positions.clear();
        self.host_positions
            .extend((step.first_pos..step.first_pos + n).map(|p| p as u32));
        dev.stream()
            .memcpy_htod(&self.host_positions, &mut self.positions.slice_mut(..n))
            .map_err(drv)?;
        let embeds = plan.ops.iter().find_map(|op| match op {
            Op::Embed { table, .. } => Some(*table),
            _ => None,
        });
        if let Some(table) = embeds {
            let vocab = self.matrix(table).rows;
            self.host_ids.clear();
            for input in step.inputs {
                let id = match input {
                    Input::Token(id) if *id as usize >= vocab => {
                        return Err(Error::Other(format!(
                            "token id {id} is outside the vocabulary ({vocab} rows)"
                        )))
                    }
                    Input::Token(id) => *id,
                    _ => 0,
                };
                self.host_ids.push(id);
            }
            dev.stream()
                .memcpy_htod(&self.host_ids, &mut self.ids.slice_mut(..n))
                .map_err(drv)?;
        }
        if let Some(kv) = &self.kv {
            if plan.ops.iter().any(|op| matches!(op, Op::Attention { .. })) {
                let blocks = step.kv_blocks(kv.block_size, kv.n_blocks)?;
                dev.stream()
                    .memcpy_htod(blocks, &mut self.table.slice_mut(..blocks.len()))
                    .map_err(drv)?;
            }
        }
        Ok(())
    }

    /// Rows of the step's inputs into `out` (`width` wide): token rows gathered
    /// from `table` by the ids on the device, vector rows copied from the host,
    /// resident rows copied on the device.
    fn fill_inputs(
        &mut self,
        out: BufId,
        width: usize,
        table: Option<WeightId>,
        step: &Step,
    ) -> Result<()> {
        let mut o = self.take(out);
        let result = self.fill_into(&mut o, width, table, step);
        self.buffers[out.0] = Some(o);
        result
    }

    fn fill_into(
        &mut self,
        o: &mut DeviceBuffer<f32>,
        width: usize,
        table: Option<WeightId>,
        step: &Step,
    ) -> Result<()> {
        let dev = self.dev.clone();
        let inputs = step.inputs;
        let mut i = 0;
        while i < inputs.len() {
            match inputs[i] {
                Input::Token(_) => {
                    let Some(table) = table else {
                        return Err(Error::Other(
                            "this plan takes vectors, not token ids".into(),
                        ));
                    };
                    let start = i;
                    while let Some(Input::Token(_)) = inputs.get(i) {
                        i += 1;
                    }
                    let t = self.matrix(table);
                    let mut view = o.slice_mut(start * width..i * width);
                    dev.embedding_at(t, &self.ids.slice(start..i), &mut view)
                        .map_err(cu)?;
                }
                Input::Embedding(v) => {
                    if v.len() != width {
                        return Err(Error::Other(format!(
                            "input row {i} has {} values, the model takes {width}",
                            v.len()
                        )));
                    }
                    // consecutive host rows go up in one copy
                    self.staging.clear();
                    let start = i;
                    while let Some(Input::Embedding(v)) = inputs.get(i) {
                        if v.len() != width {
                            break;
                        }
                        self.staging.extend_from_slice(v);
                        i += 1;
                    }
                    let mut view = o.slice_mut(start * width..i * width);
                    dev.stream()
                        .memcpy_htod(&self.staging, &mut view)
                        .map_err(drv)?;
                }
                Input::Resident { rows, row } => {
                    let src = self.resident(rows, width)?;
                    // consecutive rows of the same resident block: one copy
                    let start = i;
                    let mut next = row;
                    while let Some(Input::Resident { rows: r, row: k }) = inputs.get(i) {
                        if !std::ptr::addr_eq(*r as *const dyn ResidentRows, rows) || *k != next {
                            break;
                        }
                        if *k >= src.rows {
                            return Err(Error::Other(format!(
                                "input row {i} asks for resident row {k} of {}",
                                src.rows
                            )));
                        }
                        next += 1;
                        i += 1;
                    }
                    let n = i - start;
                    let mut view = o.slice_mut(start * width..i * width);
                    dev.stream()
                        .memcpy_dtod(&src.data.slice(row * width..(row + n) * width), &mut view)
                        .map_err(drv)?;
                }
            }
        }
        Ok(())
    }

    fn resident<'r>(&self, rows: &'r dyn ResidentRows, width: usize) -> Result<&'r CudaRows> {
        let Some(r) = rows.as_any().downcast_ref::<CudaRows>() else {
            return Err(Error::Other(format!(
                "input rows kept on {} cannot be read by {}",
                rows.location(),
                self.dev.describe()
            )));
        };
        if !Arc::ptr_eq(r.dev.context(), self.dev.context()) {
            return Err(Error::Other(format!(
                "input rows kept on {} cannot be read by {}",
                r.dev.describe(),
                self.dev.describe()
            )));
        }
        if r.width != width {
            return Err(Error::Other(format!(
                "resident rows are {} wide, the model takes {width}",
                r.width
            )));
        }
        Ok(r)
    }

    /// Whether `step` is a decode step a captured graph serves: one token row,
    /// its output wanted, nothing tapped, a KV plan.
    fn graph_step(&self, step: &Step, capture: bool) -> bool {
        self.graphs
            && !capture
            && self.kv.is_some()
            && step.inputs.len() == 1
            && matches!(step.inputs[0], Input::Token(_))
            && step.outputs == [0]
    }

    /// Runs the decode step from the captured graph, capturing it first when
    /// there is none. Returns false (and runs nothing) when capture failed; the
    /// caller then launches the step plainly.
    fn run_graph(&mut self, plan: &Plan, step: &Step) -> Result<bool> {
        if self.graph.is_none() {
            if self.graph_error.is_some() {
                return Ok(false);
            }
            match self.capture(plan, step) {
                Ok(g) => self.graph = Some(DecodeGraph { graph: g }),
                Err(e) => {
                    eprintln!(
                        "mipha: CUDA graph capture of the decode step failed, using plain \
                         launches: {e}"
                    );
                    self.graph_error = Some(e);
                    return Ok(false);
                }
            }
        }
        let g = self.graph.as_ref().expect("captured above");
        g.graph.launch().map_err(drv)?;
        self.graph_replays += 1;
        Ok(true)
    }

    fn capture(&mut self, plan: &Plan, step: &Step) -> std::result::Result<CudaGraph, String> {
        let dev = self.dev.clone();
        dev.begin_capture()
            .map_err(|e| format!("begin capture: {e}"))?;
        let ran = self.run_ops(plan, step, None);
        // End the capture whatever happened, so the stream is usable again.
        let ended = dev.end_capture();
        ran.map_err(|e| format!("while capturing: {e}"))?;
        match ended {
            Ok(Some(g)) => Ok(g),
            Ok(None) => Err("the driver invalidated the capture".into()),
            Err(e) => Err(format!("end capture: {e}")),
        }
    }

    fn run_ops(
        &mut self,
        plan: &Plan,
        step: &Step,
        mut capture: Option<&mut (dyn Capture + '_)>,
    ) -> Result<()> {
        let n = step.inputs.len();
        let n_out = step.outputs.len();
        let dev = self.dev.clone();
        for op in &plan.ops {
            match op {
                Op::Embed { table, out } => {
                    let width = plan.buffer(*out).width;
                    self.fill_inputs(*out, width, Some(*table), step)?
                }
                Op::Input { out } => {
                    let width = plan.buffer(*out).width;
                    self.fill_inputs(*out, width, None, step)?
                }
                Op::AddRows { x, table } => {
                    let width = plan.buffer(*x).width;
                    let t_len = self.f32w(*table).len();
                    if n * width > t_len {
                        return Err(Error::Other(format!(
                            "{n} rows exceed the {} rows of the position table",
                            t_len / width
                        )));
                    }
                    let mut xb = self.take(*x);
                    let t = self.f32w(*table);
                    let r = dev.add_rows(&mut xb.slice_mut(..n * width), &t.slice(..n * width));
                    self.buffers[x.0] = Some(xb);
                    r.map_err(cu)?;
                }
                Op::SelfAttention {
                    q,
                    k: kb,
                    v,
                    out,
                    n_heads,
                    head_dim,
                    causal,
                    scale,
                } => {
                    let width = n_heads * head_dim;
                    let mut o = self.take(*out);
                    let kv = DeviceKv {
                        k: self.buf(*kb),
                        v: self.buf(*v),
                        block_size: n,
                        block_table: &self.one_block,
                        n_blocks: 1,
                        kv_dim: width,
                    };
                    let r = dev.attention(
                        &self.buf(*q).slice(..n * width),
                        n,
                        *n_heads,
                        *n_heads,
                        *head_dim,
                        &kv,
                        0,
                        *causal,
                        *scale,
                        &mut o.slice_mut(..n * width),
                    );
                    self.buffers[out.0] = Some(o);
                    r.map_err(cu)?;
                }
                Op::LayerNorm {
                    x,
                    weight,
                    bias,
                    eps,
                    out,
                } => {
                    let width = plan.buffer(*x).width;
                    let rows = self.rows(*x, n, n_out);
                    let mut o = self.take(*out);
                    let r = dev.layer_norm(
                        &self.buf(*x).slice(..rows * width),
                        width,
                        self.f32w(*weight),
                        self.f32w(*bias),
                        *eps,
                        &mut o.slice_mut(..rows * width),
                    );
                    self.buffers[out.0] = Some(o);
                    r.map_err(cu)?;
                }
                Op::MatMul {
                    x,
                    w,
                    bias,
                    out,
                    rows,
                    epilogue,
                } => {
                    let kdim = plan.buffer(*x).width;
                    let mut o = self.take(*out);
                    let r = self.matmul(
                        step, *x, *w, *bias, &mut o, *rows, *epilogue, kdim, n, n_out,
                    );
                    self.buffers[out.0] = Some(o);
                    r?;
                }
                Op::Gelu { x, kind } => {
                    let width = plan.buffer(*x).width;
                    let len = self.rows(*x, n, n_out) * width;
                    let mut xb = self.take(*x);
                    let r = dev.gelu(&mut xb.slice_mut(..len), None, width, gelu_kind(*kind));
                    self.buffers[x.0] = Some(xb);
                    r.map_err(cu)?;
                }
                Op::Add { dst, src } => {
                    let len = self.rows(*dst, n, n_out) * plan.buffer(*dst).width;
                    let mut d = self.take(*dst);
                    let r = dev.add_assign(&mut d.slice_mut(..len), &self.buf(*src).slice(..len));
                    self.buffers[dst.0] = Some(d);
                    r.map_err(cu)?;
                }
                Op::Rope {
                    x,
                    n_heads,
                    head_dim,
                    rot_dims,
                    theta,
                } => {
                    let len = n * plan.buffer(*x).width;
                    let mut xb = self.take(*x);
                    let r = dev.rope_partial(
                        &mut xb.slice_mut(..len),
                        *n_heads,
                        *head_dim,
                        *rot_dims,
                        &self.positions.slice(..n),
                        *theta,
                    );
                    self.buffers[x.0] = Some(xb);
                    r.map_err(cu)?;
                }
                Op::Attention {
                    layer,
                    q,
                    k: kb,
                    v,
                    out,
                    n_heads,
                    n_kv_heads,
                    head_dim,
                    causal,
                    scale,
                } => {
                    let Some(kv) = self.kv.as_mut() else {
                        return Err(Error::Other("no KV cache".into()));
                    };
                    let (bs, d) = (kv.block_size, kv.kv_dim);
                    let used = (step.first_pos + n).div_ceil(bs);
                    let kbuf = self.buffers[kb.0].as_ref().expect("k buffer");
                    let vbuf = self.buffers[v.0].as_ref().expect("v buffer");
                    // Positions from the device buffer: the same launch serves every
                    // position (a replayed decode graph).
                    let pos = self.positions.slice(..n);
                    for (src, pool) in [(kbuf, &mut kv.k[*layer]), (vbuf, &mut kv.v[*layer])] {
                        dev.kv_scatter_at(&src.slice(..n * d), n, d, pool, &self.table, bs, &pos)
                            .map_err(cu)?;
                    }
                    let width = n_heads * head_dim;
                    let mut o = self.buffers[out.0].take().expect("out buffer");
                    let kv = self.kv.as_ref().expect("checked above");
                    let qv = self.buffers[q.0]
                        .as_ref()
                        .expect("q buffer")
                        .slice(..n * width);
                    let r = if n <= DECODE_MAX_ROWS {
                        // split count sized for the whole table, not this length
                        let view = DeviceKv {
                            k: &kv.k[*layer],
                            v: &kv.v[*layer],
                            block_size: bs,
                            block_table: &self.table,
                            n_blocks: self.table.len(),
                            kv_dim: d,
                        };
                        dev.attention_decode_at(
                            &qv,
                            n,
                            *n_heads,
                            *n_kv_heads,
                            *head_dim,
                            &view,
                            &pos,
                            *causal,
                            *scale,
                            &mut self.attn_ws,
                            &mut o.slice_mut(..n * width),
                        )
                    } else {
                        let view = DeviceKv {
                            k: &kv.k[*layer],
                            v: &kv.v[*layer],
                            block_size: bs,
                            block_table: &self.table,
                            n_blocks: used,
                            kv_dim: d,
                        };
                        dev.attention_prefill(
                            &qv,
                            n,
                            *n_heads,
                            *n_kv_heads,
                            *head_dim,
                            &view,
                            step.first_pos,
                            *causal,
                            *scale,
                            &mut o.slice_mut(..n * width),
                        )
                    };
                    self.buffers[out.0] = Some(o);
                    r.map_err(cu)?;
                }
                Op::Tap { x, name } => {
                    if let Some(c) = capture.as_deref_mut() {
                        let width = plan.buffer(*x).width;
                        let rows = self.rows(*x, n, n_out);
                        let host = dev
                            .stream()
                            .clone_dtoh(&self.buf(*x).slice(..rows * width))
                            .map_err(drv)?;
                        c.tap(name, &host, width);
                    }
                }
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &mut self,
        step: &Step,
        x: BufId,
        w: WeightId,
        bias: Option<WeightId>,
        o: &mut DeviceBuffer<f32>,
        rows: Rows,
        epilogue: Epilogue,
        kdim: usize,
        n: usize,
        n_out: usize,
    ) -> Result<()> {
        let dev = self.dev.clone();
        let m = match rows {
            Rows::All => self.rows(x, n, n_out),
            Rows::Outputs => {
                for (j, &r) in step.outputs.iter().enumerate() {
                    if r >= n {
                        return Err(Error::Other(format!(
                            "output row {r} is outside the step's {n} rows"
                        )));
                    }
                    let src = self.buffers[x.0].as_ref().expect("x buffer");
                    dev.stream()
                        .memcpy_dtod(
                            &src.slice(r * kdim..(r + 1) * kdim),
                            &mut self.gather.slice_mut(j * kdim..(j + 1) * kdim),
                        )
                        .map_err(drv)?;
                }
                n_out
            }
        };
        let wm = matrix_of(&self.weights, w);
        let nw = wm.rows;
        let bias = bias.map(|b| f32_of(&self.weights, b));
        let xv = match rows {
            Rows::All => self.buffers[x.0]
                .as_ref()
                .expect("a plan op reads the buffer it writes")
                .slice(..m * kdim),
            Rows::Outputs => self.gather.slice(..m * kdim),
        };
        let mut ov = o.slice_mut(..m * nw);
        let f16_gemm = self.f16_gemm;
        let mm = |x: &_, out: &mut _| {
            if f16_gemm {
                dev.matmul(x, m, wm, bias, out)
            } else {
                dev.gemv(x, m, wm, bias, out)
            }
        };
        match epilogue {
            Epilogue::Store => mm(&xv, &mut ov),
            Epilogue::GeluTanh | Epilogue::GeluErf => mm(&xv, &mut ov).and_then(|()| {
                let kind = if epilogue == Epilogue::GeluTanh {
                    mipha_kernels::cuda::GeluKind::Tanh
                } else {
                    mipha_kernels::cuda::GeluKind::Erf
                };
                dev.gelu(&mut ov, None, nw, kind)
            }),
            Epilogue::Accumulate => {
                let mut t = self.scratch.slice_mut(..m * nw);
                mm(&xv, &mut t).and_then(|()| dev.add_assign(&mut ov, &t))
            }
        }
        .map_err(cu)
    }
}

fn matrix_of(weights: &[Option<DevWeight>], id: WeightId) -> &DeviceWeight {
    match &weights[id.0] {
        Some(DevWeight::Matrix(m)) => m,
        _ => unreachable!("matrix weights are uploaded by CudaBackend::new"),
    }
}

fn f32_of(weights: &[Option<DevWeight>], id: WeightId) -> &DeviceBuffer<f32> {
    match &weights[id.0] {
        Some(DevWeight::F32(b)) => b,
        _ => unreachable!("f32 weights are uploaded by CudaBackend::new"),
    }
}

fn gelu_kind(k: GeluKind) -> mipha_kernels::cuda::GeluKind {
    match k {
        GeluKind::Tanh => mipha_kernels::cuda::GeluKind::Tanh,
        GeluKind::Erf => mipha_kernels::cuda::GeluKind::Erf,
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> String {
        self.dev.describe()
    }

    fn execute(
        &mut self,
        plan: &Plan,
        _weights: &Weights,
        step: &Step,
        capture: Option<&mut (dyn Capture + '_)>,
    ) -> Result<()> {
        step.check(plan)?;
        let result = self.upload_step(plan, step).and_then(|()| {
            if self.graph_step(step, capture.is_some()) && self.run_graph(plan, step)? {
                return Ok(());
            }
            self.run_ops(plan, step, capture)
        });
        let rows = self.rows(plan.output, step.inputs.len(), step.outputs.len());
        self.last_output = Some((plan.output, rows, plan.buffer(plan.output).width));
        result
    }

    fn read_output(&mut self, out: &mut [f32]) -> Result<()> {
        let (buf, rows, width) = self
            .last_output
            .ok_or_else(|| Error::Other("no step has run yet".into()))?;
        let len = rows * width;
        if out.len() != len {
            return Err(Error::Other(format!(
                "output holds {len} values, the destination {}",
                out.len()
            )));
        }
        let src = self.buf(buf).slice(..len);
        self.dev.stream().memcpy_dtoh(&src, out).map_err(drv)?;
        Ok(())
    }

    fn keep_output(&mut self) -> Result<Option<Arc<dyn ResidentRows>>> {
        let (buf, rows, width) = self
            .last_output
            .ok_or_else(|| Error::Other("no step has run yet".into()))?;
        let len = rows * width;
        let mut data = alloc(&self.dev, len)?;
        self.dev
            .stream()
            .memcpy_dtod(&self.buf(buf).slice(..len), &mut data)
            .map_err(drv)?;
        Ok(Some(Arc::new(CudaRows {
            dev: self.dev.clone(),
            data,
            rows,
            width,
        })))
    }
}
