//! The CUDA backend (feature `cuda`): executes a [`Plan`] with the kernels of
//! `mipha_kernels::cuda`. Activation buffers, the plan's weights (uploaded once, in
//! their stored layout, when the backend is made) and the paged KV pool (f32, or
//! f16 stored as 16-bit words) all live in device memory. Per step, only the
//! step's small values go up (token ids, every row's position, the sequences'
//! block tables concatenated with each row's start into them: written into
//! device buffers before the kernels run) plus any host embedding rows; the
//! output rows (and taps) come back. Image embeddings kept on the device by the
//! vision plan's backend ([`Backend::keep_output`]) are copied device to device.
//!
//! A step may carry several sequences (continuous batching): every row's K/V go
//! into its own sequence's blocks in one scatter, then runs of consecutive short
//! sequences (decode rows) attend in one batched decode launch and each longer
//! sequence (a prefill chunk) through the prefill kernel with its own table.
//!
//! A single-sequence decode step (one token, one output row) is captured once as
//! a CUDA graph and replayed: every kernel of it reads the per-step values from
//! those device buffers, and the decode attention's split count is sized for the
//! whole pool, so the same launches serve every position. Batched steps launch
//! plainly. See `docs/cuda.md`.

use std::any::Any;
use std::ops::Range;
use std::sync::Arc;

use mipha_kernels::cuda::{
    decode_workspace_len, CudaError, CudaGraph, CudaView, CudaViewMut, Device, DeviceBuffer,
    DeviceKv, DeviceKvElem, DeviceKvLayer, DeviceRows, DeviceWeight, DECODE_CHUNK, DECODE_MAX_ROWS,
    MAX_GRID_YZ,
};
use mipha_kernels::KvDtype;

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

/// One pool per layer for K and one for V, `[n_blocks * block_size, kv_dim]` of `E`.
struct KvPools<E: DeviceKvElem> {
    k: Vec<DeviceBuffer<E>>,
    v: Vec<DeviceBuffer<E>>,
}

impl<E: DeviceKvElem> KvPools<E> {
    fn new(dev: &Device, layers: usize, elems: usize) -> Result<Self> {
        let pool = || dev.zeros::<E>(elems.max(1)).map_err(cu);
        let k = (0..layers).map(|_| pool()).collect::<Result<_>>()?;
        let v = (0..layers).map(|_| pool()).collect::<Result<_>>()?;
        Ok(KvPools { k, v })
    }
}

/// f16 pools hold raw 16-bit words (see [`DeviceKvElem`]).
enum KvStore {
    F32(KvPools<f32>),
    F16(KvPools<u16>),
}

struct KvStorage {
    store: KvStore,
    block_size: usize,
    n_blocks: usize,
    kv_dim: usize,
}

/// How one attention op runs a step's sequences, worked out on the host once per
/// step (the op repeats it for every layer).
#[derive(Clone, Debug)]
enum AttnGroup {
    /// consecutive sequences of at most `DECODE_MAX_ROWS` rows each: one batched
    /// decode launch, splits sized for `max_keys` keys
    Decode { rows: Range<usize>, max_keys: usize },
    /// one longer sequence: the prefill kernel through its own table, entries
    /// `table` of the concatenated tables
    Prefill {
        rows: Range<usize>,
        first_pos: usize,
        table: Range<usize>,
    },
}

/// Rows of the decode attention's workspace at the pool's full length: a batched
/// decode launch takes as many rows as fit (more when its sequences are shorter).
const DECODE_WS_ROWS: usize = 8;

pub struct CudaBackend {
    dev: Arc<Device>,
    /// `None` only while an op holds the buffer it writes
    buffers: Vec<Option<DeviceBuffer<f32>>>,
    /// each buffer's length, to remake one a panicking step left taken
    buffer_lens: Vec<usize>,
    output_rows: Vec<bool>,
    weights: Vec<Option<DevWeight>>,
    /// gathered input rows of a `Rows::Outputs` matmul
    gather: DeviceBuffer<f32>,
    /// results of an accumulating matmul before the add
    scratch: DeviceBuffer<f32>,
    /// per-step values, written before the step's kernels (and before a graph
    /// replay): position of each row, token id of each row (0 for vector rows),
    /// the sequences' block tables one after another, and per row where its
    /// sequence's table starts and where its sequence ends
    positions: DeviceBuffer<u32>,
    ids: DeviceBuffer<u32>,
    table: DeviceBuffer<u32>,
    table_start: DeviceBuffer<u32>,
    seq_end: DeviceBuffer<u32>,
    host_positions: Vec<u32>,
    host_ids: Vec<u32>,
    host_table: Vec<u32>,
    host_table_start: Vec<u32>,
    host_seq_end: Vec<u32>,
    groups: Vec<AttnGroup>,
    /// whether the plan has a paged attention op (the step's tables go up)
    attends: bool,
    /// `[0]`: one block covering a self-attention's rows
    one_block: DeviceBuffer<u32>,
    /// decode attention's split partials: `DECODE_WS_ROWS` rows over the whole pool
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
        let layout = plan.buffer_layout()?;
        let mut f32_weights: Vec<WeightId> = Vec::new();
        let mut matrices: Vec<WeightId> = Vec::new();
        let mut attn_heads = (0, 0);
        for op in &plan.ops {
            match op {
                Op::MatMul { w, bias, .. } => {
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
        let buffers = layout
            .lens
            .iter()
            .map(|&len| alloc(&dev, len).map(Some))
            .collect::<Result<Vec<_>>>()?;
        let buffer_lens = layout.lens;
        let output_rows = layout.output_rows;
        let kv = match (plan.kv, kv) {
            (Some(shape), Some(cfg)) => {
                let elems = cfg
                    .n_blocks
                    .checked_mul(cfg.block_size)
                    .and_then(|n| n.checked_mul(shape.kv_dim))
                    .ok_or_else(|| Error::Other("KV cache size overflows".into()))?;
                if cfg.block_size == 0 || cfg.n_blocks == 0 {
                    return Err(Error::Other(
                        "the KV cache needs at least one block of one position".into(),
                    ));
                }
                let store = match cfg.dtype {
                    KvDtype::F32 => KvStore::F32(KvPools::new(&dev, shape.n_layers, elems)?),
                    KvDtype::F16 => KvStore::F16(KvPools::new(&dev, shape.n_layers, elems)?),
                };
                Some(KvStorage {
                    store,
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
        let attends = kv.is_some() && plan.ops.iter().any(|op| matches!(op, Op::Attention { .. }));
        // One sequence's table fits; a batch whose tables add up to more grows it.
        let table_len = kv.as_ref().map_or(1, |k| k.n_blocks);
        let pool_keys = kv.as_ref().map_or(0, |k| k.n_blocks * k.block_size);
        // A single-sequence decode launch splits the whole pool's keys.
        if pool_keys.div_ceil(DECODE_CHUNK) > MAX_GRID_YZ {
            return Err(Error::Other(format!(
                "a KV pool of {pool_keys} positions is more than the CUDA decode kernel \
                 splits ({} at most)",
                MAX_GRID_YZ * DECODE_CHUNK
            )));
        }
        let ws_rows = DECODE_WS_ROWS.min(plan.max_tokens).max(1);
        let ws = decode_workspace_len(ws_rows, attn_heads.0, attn_heads.1, pool_keys);
        let rows = plan.max_tokens.max(1);
        let u32s = |n: usize| dev.zeros::<u32>(n.max(1)).map_err(cu);
        Ok(CudaBackend {
            gather: alloc(&dev, layout.gather_len)?,
            scratch: alloc(&dev, layout.scratch_len)?,
            positions: u32s(rows)?,
            ids: u32s(rows)?,
            table: u32s(table_len)?,
            table_start: u32s(rows)?,
            seq_end: u32s(rows)?,
            host_positions: Vec::with_capacity(rows),
            host_ids: Vec::with_capacity(rows),
            host_table: Vec::with_capacity(table_len),
            host_table_start: Vec::with_capacity(rows),
            host_seq_end: Vec::with_capacity(rows),
            groups: Vec::with_capacity(rows),
            attends,
            one_block: u32s(1)?,
            attn_ws: alloc(&dev, if attends { ws } else { 1 })?,
            staging: Vec::new(),
            buffers,
            buffer_lens,
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

    /// The KV pool's element type, when the plan has one.
    pub fn kv_dtype(&self) -> Option<KvDtype> {
        self.kv.as_ref().map(|kv| match kv.store {
            KvStore::F32(_) => KvDtype::F32,
            KvStore::F16(_) => KvDtype::F16,
        })
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

    /// Gives back buffers a step that panicked left taken (an op holds its output
    /// buffer while it runs), as fresh zeroed ones, so one failed step does not
    /// fail the next. A captured graph read the old ones: it is dropped.
    fn restore_buffers(&mut self) -> Result<()> {
        let mut remade = false;
        for (b, &len) in self.buffers.iter_mut().zip(&self.buffer_lens) {
            if b.is_none() {
                *b = Some(alloc(&self.dev, len)?);
                remade = true;
            }
        }
        if remade {
            self.graph = None;
        }
        Ok(())
    }

    /// Writes the step's values into the device buffers the kernels read:
    /// positions, token ids (checked against the vocabulary), and for a plan
    /// that attends the block tables and the attention groups.
    fn upload_step(&mut self, plan: &Plan, step: &Step) -> Result<()> {
        let n = step.inputs.len();
        let dev = self.dev.clone();
        self.host_positions.clear();
        for s in step.seqs {
            // the kernels index positions as int
            if s.first_pos + s.rows > i32::MAX as usize {
                return Err(Error::Other(format!(
                    "position {} is beyond what the CUDA kernels address",
                    s.first_pos + s.rows - 1
                )));
            }
            self.host_positions
                .extend((s.first_pos..s.first_pos + s.rows).map(|p| p as u32));
        }
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
        if self.attends {
            self.upload_tables(step)?;
        }
        Ok(())
    }

    /// The sequences' tables one after another (each cut to the blocks its
    /// positions use), each row's start into them and its sequence's end, and
    /// the attention groups. The tables were checked by `Step::check_kv`.
    fn upload_tables(&mut self, step: &Step) -> Result<()> {
        let kv = self
            .kv
            .as_ref()
            .expect("a plan that attends has a KV cache");
        let (bs, pool_keys) = (kv.block_size, kv.n_blocks * kv.block_size);
        let n = step.inputs.len();
        // A one-token single-sequence step has the shape of the captured decode
        // graph: its decode launch is sized for the whole pool, so replays (and
        // plain launches of the same step) serve every position.
        let graph_shaped = step.seqs.len() == 1 && n == 1;
        self.host_table.clear();
        self.host_table_start.clear();
        self.host_seq_end.clear();
        self.groups.clear();
        let mut r0 = 0;
        for s in step.seqs {
            let end = s.first_pos + s.rows;
            let used = end.div_ceil(bs);
            let start = self.host_table.len();
            let start32 = u32::try_from(start)
                .map_err(|_| Error::Other("the step's block tables are too long".into()))?;
            self.host_table.extend_from_slice(&s.block_table[..used]);
            for _ in 0..s.rows {
                self.host_table_start.push(start32);
                // below i32::MAX: checked with the positions
                self.host_seq_end.push(end as u32);
            }
            let rows = r0..r0 + s.rows;
            // A sequence longer than the pool (a table naming blocks more than
            // once) would need more splits than the workspace holds: the prefill
            // kernel has no such limit.
            if s.rows <= DECODE_MAX_ROWS && end <= pool_keys {
                match self.groups.last_mut() {
                    Some(AttnGroup::Decode { rows: g, max_keys }) if g.end == r0 => {
                        g.end = rows.end;
                        *max_keys = (*max_keys).max(end);
                    }
                    _ => self.groups.push(AttnGroup::Decode {
                        rows,
                        max_keys: if graph_shaped { pool_keys } else { end },
                    }),
                }
            } else {
                self.groups.push(AttnGroup::Prefill {
                    rows,
                    first_pos: s.first_pos,
                    table: start..start + used,
                });
            }
            r0 += s.rows;
        }
        let dev = self.dev.clone();
        if self.host_table.len() > self.table.len() {
            // A captured graph reads the old buffer: drop it (it is captured again).
            self.graph = None;
            self.table = dev
                .zeros::<u32>(self.host_table.len().next_power_of_two())
                .map_err(cu)?;
        }
        let len = self.host_table.len();
        let stream = dev.stream();
        stream
            .memcpy_htod(&self.host_table, &mut self.table.slice_mut(..len))
            .map_err(drv)?;
        stream
            .memcpy_htod(&self.host_table_start, &mut self.table_start.slice_mut(..n))
            .map_err(drv)?;
        stream
            .memcpy_htod(&self.host_seq_end, &mut self.seq_end.slice_mut(..n))
            .map_err(drv)?;
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

    /// Whether `step` is a decode step a captured graph serves: one sequence of one
    /// token row, its output wanted, nothing tapped, a plan that attends, the
    /// sequence within the pool (its decode launch sized for the whole pool).
    fn graph_step(&self, step: &Step, capture: bool) -> bool {
        self.graphs
            && !capture
            && self.attends
            && step.seqs.len() == 1
            && step.inputs.len() == 1
            && matches!(step.inputs[0], Input::Token(_))
            && step.outputs == [0]
            && matches!(self.groups.as_slice(), [AttnGroup::Decode { .. }])
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
        /// Ends a capture that a panic interrupted, so the stream takes plain
        /// work again when the caller catches the panic and retries.
        struct EndOnUnwind<'a>(&'a Device, bool);
        impl Drop for EndOnUnwind<'_> {
            fn drop(&mut self) {
                if !self.1 {
                    let _ = self.0.end_capture();
                }
            }
        }
        let dev = self.dev.clone();
        dev.begin_capture()
            .map_err(|e| format!("begin capture: {e}"))?;
        let mut guard = EndOnUnwind(&dev, false);
        let ran = self.run_ops(plan, step, 0..plan.ops.len(), None);
        guard.1 = true;
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
        ops: Range<usize>,
        mut capture: Option<&mut (dyn Capture + '_)>,
    ) -> Result<()> {
        let n = step.inputs.len();
        let n_out = step.outputs.len();
        let dev = self.dev.clone();
        for op in &plan.ops[ops] {
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
                        block_table: self.one_block.as_view(),
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
                    let mut o = self.take(*out);
                    let shape = AttnShape {
                        n_heads: *n_heads,
                        n_kv_heads: *n_kv_heads,
                        head_dim: *head_dim,
                        causal: *causal,
                        scale: *scale,
                    };
                    let r = self.attend(*layer, [*q, *kb, *v], &mut o, &shape, n);
                    self.buffers[out.0] = Some(o);
                    r?;
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

    /// One paged attention op over the step's sequences: their new K/V rows into
    /// the layer's pools, then every group of rows attends (see [`AttnGroup`]).
    fn attend(
        &mut self,
        layer: usize,
        [q, k, v]: [BufId; 3],
        o: &mut DeviceBuffer<f32>,
        shape: &AttnShape,
        n: usize,
    ) -> Result<()> {
        let kv = self
            .kv
            .as_mut()
            .ok_or_else(|| Error::Other("no KV cache".into()))?;
        let (bs, d) = (kv.block_size, kv.kv_dim);
        let width = shape.n_heads * shape.head_dim;
        let buf = |b: BufId| {
            self.buffers[b.0]
                .as_ref()
                .expect("a plan op reads the buffer it writes")
        };
        let a = Attend {
            dev: &self.dev,
            q: buf(q).slice(..n * width),
            k: buf(k).slice(..n * d),
            v: buf(v).slice(..n * d),
            rows: DeviceRows {
                positions: self.positions.slice(..n),
                tables: self.table.as_view(),
                table_start: self.table_start.slice(..n),
                seq_end: self.seq_end.slice(..n),
            },
            groups: &self.groups,
            shape,
            block_size: bs,
            kv_dim: d,
        };
        let mut out = o.slice_mut(..n * width);
        let missing = || Error::Other(format!("layer {layer} is outside the KV cache"));
        match &mut kv.store {
            KvStore::F32(p) => {
                let (kp, vp) = (p.k.get_mut(layer), p.v.get_mut(layer));
                let (kp, vp) = kp.zip(vp).ok_or_else(missing)?;
                a.run(kp, vp, &mut self.attn_ws, &mut out)
            }
            KvStore::F16(p) => {
                let (kp, vp) = (p.k.get_mut(layer), p.v.get_mut(layer));
                let (kp, vp) = kp.zip(vp).ok_or_else(missing)?;
                a.run(kp, vp, &mut self.attn_ws, &mut out)
            }
        }
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
                // (rows checked by Step::check) Runs of consecutive rows, e.g. the
                // last rows of a batch's one-row sequences, go in one copy.
                let outs = step.outputs;
                let src = self.buffers[x.0].as_ref().expect("x buffer");
                let mut j = 0;
                while j < outs.len() {
                    let r = outs[j];
                    let mut k = j + 1;
                    while k < outs.len() && outs[k] == r + (k - j) {
                        k += 1;
                    }
                    let rows = k - j;
                    dev.stream()
                        .memcpy_dtod(
                            &src.slice(r * kdim..(r + rows) * kdim),
                            &mut self.gather.slice_mut(j * kdim..k * kdim),
                        )
                        .map_err(drv)?;
                    j = k;
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

struct AttnShape {
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    causal: bool,
    scale: f32,
}

/// One attention op's inputs on the device, for either pool element type.
struct Attend<'a> {
    dev: &'a Device,
    /// `[n, n_heads * head_dim]`
    q: CudaView<'a, f32>,
    /// the step's new keys and values, `[n, kv_dim]`
    k: CudaView<'a, f32>,
    v: CudaView<'a, f32>,
    rows: DeviceRows<'a>,
    groups: &'a [AttnGroup],
    shape: &'a AttnShape,
    block_size: usize,
    kv_dim: usize,
}

impl Attend<'_> {
    fn run<E: DeviceKvElem>(
        &self,
        kp: &mut DeviceBuffer<E>,
        vp: &mut DeviceBuffer<E>,
        ws: &mut DeviceBuffer<f32>,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let (dev, sh) = (self.dev, self.shape);
        let (bs, d) = (self.block_size, self.kv_dim);
        let n = self.rows.positions.len();
        // Every row's K/V to its own sequence's slot, one launch each for the batch.
        dev.kv_scatter_rows(&self.k, n, d, kp, bs, &self.rows)
            .map_err(cu)?;
        dev.kv_scatter_rows(&self.v, n, d, vp, bs, &self.rows)
            .map_err(cu)?;
        let pools = DeviceKvLayer {
            k: &*kp,
            v: &*vp,
            block_size: bs,
            kv_dim: d,
        };
        let w = sh.n_heads * sh.head_dim;
        for g in self.groups {
            match g {
                AttnGroup::Decode { rows, max_keys } => {
                    // As many rows per launch as the workspace holds at this length
                    // (the backend sized it for at least one row over the pool).
                    let per_row = decode_workspace_len(1, sh.n_heads, sh.head_dim, *max_keys);
                    let chunk = (ws.len() / per_row).clamp(1, MAX_GRID_YZ);
                    let mut r0 = rows.start;
                    while r0 < rows.end {
                        let r1 = (r0 + chunk).min(rows.end);
                        dev.attention_decode_rows(
                            &self.q.slice(r0 * w..r1 * w),
                            r1 - r0,
                            sh.n_heads,
                            sh.n_kv_heads,
                            sh.head_dim,
                            &pools,
                            &self.rows.rows(r0..r1),
                            *max_keys,
                            sh.causal,
                            sh.scale,
                            ws,
                            &mut out.slice_mut(r0 * w..r1 * w),
                        )
                        .map_err(cu)?;
                        r0 = r1;
                    }
                }
                AttnGroup::Prefill {
                    rows,
                    first_pos,
                    table,
                } => {
                    let kv = pools.with_table(self.rows.tables.slice(table.clone()), table.len());
                    dev.attention_prefill(
                        &self.q.slice(rows.start * w..rows.end * w),
                        rows.len(),
                        sh.n_heads,
                        sh.n_kv_heads,
                        sh.head_dim,
                        &kv,
                        *first_pos,
                        sh.causal,
                        sh.scale,
                        &mut out.slice_mut(rows.start * w..rows.end * w),
                    )
                    .map_err(cu)?;
                }
            }
        }
        Ok(())
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> String {
        self.dev.describe()
    }

    fn execute_ops(
        &mut self,
        plan: &Plan,
        _weights: &Weights,
        step: &Step,
        ops: Range<usize>,
        capture: Option<&mut (dyn Capture + '_)>,
    ) -> Result<()> {
        step.check(plan)?;
        if ops.end > plan.ops.len() || ops.start > ops.end {
            return Err(Error::Other(format!(
                "ops {ops:?} are outside the plan's {}",
                plan.ops.len()
            )));
        }
        if let (Some(kv), Some(_)) = (&self.kv, plan.kv) {
            step.check_kv(kv.block_size, kv.n_blocks)?;
        }
        self.restore_buffers()?;
        // Only a whole forward is captured and replayed: a slice's launches are
        // not a decode step's.
        let whole = ops.start == 0 && ops.end == plan.ops.len();
        let result = self.upload_step(plan, step).and_then(|()| {
            if whole && self.graph_step(step, capture.is_some()) && self.run_graph(plan, step)? {
                return Ok(());
            }
            self.run_ops(plan, step, ops, capture)
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
