//! The CUDA backend (feature `cuda`): executes a [`Plan`] with the kernels of
//! `mipha_kernels::cuda`. Activation buffers, the plan's weights (uploaded once, in
//! their stored layout, when the backend is made) and the paged KV pool all live
//! in device memory; only the step's inputs go up and the output rows (and taps)
//! come back. See `docs/cuda.md`.

use std::str::FromStr;
use std::sync::Arc;

use mipha_kernels::cuda::{CudaError, Device, DeviceBuffer, DeviceKv, DeviceWeight};

use crate::backend::{Backend, Capture, Input, Step};
use crate::cpu::KvConfig;
use crate::error::{Error, Result};
use crate::graph::{BufId, Epilogue, GeluKind, Op, Plan, Rows, WeightId, Weights};

pub use mipha_kernels::cuda::Device as CudaDevice;

fn cu(e: CudaError) -> Error {
    Error::Other(format!("cuda: {e}"))
}

fn drv(e: mipha_kernels::cuda::DriverError) -> Error {
    cu(CudaError::Driver(e))
}

/// What `--device` asks for: `cpu`, `cuda`, `cuda:N` or `auto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    Cuda(usize),
    /// the first GPU when one is usable, else the CPU
    Auto,
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "cpu" => Ok(DeviceChoice::Cpu),
            "auto" => Ok(DeviceChoice::Auto),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda(0)),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map(DeviceChoice::Cuda)
                    .map_err(|_| format!("bad device `{s}`: expected cuda:N with N a number")),
                None => Err(format!(
                    "unknown device `{s}` (expected cpu, cuda, cuda:N or auto)"
                )),
            },
        }
    }
}

/// A [`DeviceChoice`] made concrete.
#[derive(Clone, Debug)]
pub enum Resolved {
    Cpu {
        /// why `auto` fell back to the CPU (None when the CPU was asked for)
        reason: Option<String>,
    },
    Cuda(Arc<Device>),
}

impl DeviceChoice {
    /// Opens the device. `cuda[:N]` fails with the reason when it is not usable;
    /// `auto` falls back to the CPU when there is no driver, device or NVRTC.
    pub fn resolve(self) -> Result<Resolved> {
        match self {
            DeviceChoice::Cpu => Ok(Resolved::Cpu { reason: None }),
            DeviceChoice::Cuda(n) => Device::new(n)
                .map(|d| Resolved::Cuda(Arc::new(d)))
                .map_err(cu),
            DeviceChoice::Auto => match Device::new(0) {
                Ok(d) => Ok(Resolved::Cuda(Arc::new(d))),
                Err(e) if e.is_unavailable() => Ok(Resolved::Cpu {
                    reason: Some(e.to_string()),
                }),
                Err(e) => Err(cu(e)),
            },
        }
    }
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
    positions: DeviceBuffer<u32>,
    host_positions: Vec<u32>,
    /// the step's block table
    table: DeviceBuffer<u32>,
    /// `[0]`: one block covering a self-attention's rows
    one_block: DeviceBuffer<u32>,
    staging: Vec<f32>,
    kv: Option<KvStorage>,
    last_output: Option<(BufId, usize)>,
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
        let mut output_rows = vec![false; plan.buffers.len()];
        let mut gather_width = 0;
        let mut accumulate_width = 0;
        let mut f32_weights: Vec<WeightId> = Vec::new();
        let mut matrices: Vec<WeightId> = Vec::new();
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
        for id in matrices {
            if dw[id.0].is_none() {
                let m = dev.upload_weight(weights.get(id).view()).map_err(cu)?;
                dw[id.0] = Some(DevWeight::Matrix(m));
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
        Ok(CudaBackend {
            gather: alloc(&dev, plan.max_outputs * gather_width)?,
            scratch: alloc(&dev, plan.max_tokens * accumulate_width)?,
            positions: dev.zeros::<u32>(plan.max_tokens.max(1)).map_err(cu)?,
            host_positions: Vec::with_capacity(plan.max_tokens),
            table: dev.zeros::<u32>(table_len.max(1)).map_err(cu)?,
            one_block: dev.zeros::<u32>(1).map_err(cu)?,
            staging: Vec::new(),
            buffers,
            output_rows,
            weights: dw,
            kv,
            last_output: None,
            dev,
        })
    }

    pub fn device(&self) -> &Arc<Device> {
        &self.dev
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

    fn embed(&mut self, plan: &Plan, table: WeightId, out: BufId, step: &Step) -> Result<()> {
        let width = plan.buffer(out).width;
        let mut o = self.take(out);
        let result = (|| {
            let t = self.matrix(table);
            let mut i = 0;
            let inputs = step.inputs;
            while i < inputs.len() {
                match inputs[i] {
                    Input::Token(_) => {
                        let start = i;
                        let mut ids = Vec::new();
                        while let Some(Input::Token(id)) = inputs.get(i) {
                            ids.push(*id);
                            i += 1;
                        }
                        let mut view = o.slice_mut(start * width..i * width);
                        self.dev
                            .embedding(t, &ids, &mut view)
                            .map_err(|e| match e {
                                CudaError::TokenOutOfRange(id) => Error::Other(format!(
                                    "token id {id} is outside the vocabulary ({} rows)",
                                    t.rows
                                )),
                                e => cu(e),
                            })?;
                    }
                    Input::Embedding(v) => {
                        if v.len() != width {
                            return Err(Error::Other(format!(
                                "input embedding {i} has {} values, the model takes {width}",
                                v.len()
                            )));
                        }
                        let mut view = o.slice_mut(i * width..(i + 1) * width);
                        self.dev.stream().memcpy_htod(v, &mut view).map_err(drv)?;
                        i += 1;
                    }
                }
            }
            Ok(())
        })();
        self.buffers[out.0] = Some(o);
        result
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
        self.host_positions.clear();
        self.host_positions
            .extend((step.first_pos..step.first_pos + n).map(|p| p as u32));
        dev.stream()
            .memcpy_htod(&self.host_positions, &mut self.positions.slice_mut(..n))
            .map_err(drv)?;
        if let Some(kv) = &self.kv {
            if plan.ops.iter().any(|op| matches!(op, Op::Attention { .. })) {
                let total = step.first_pos + n;
                let bs = kv.block_size;
                let used = total.div_ceil(bs);
                if step.block_table.len() < used {
                    return Err(Error::Other(format!(
                        "block table covers {} positions, the step needs {total}",
                        step.block_table.len() * bs
                    )));
                }
                if let Some(&b) = step.block_table[..used]
                    .iter()
                    .find(|&&b| b as usize >= kv.n_blocks)
                {
                    return Err(Error::Other(format!(
                        "block {b} is outside the KV pool of {}",
                        kv.n_blocks
                    )));
                }
                dev.stream()
                    .memcpy_htod(&step.block_table[..used], &mut self.table.slice_mut(..used))
                    .map_err(drv)?;
            }
        }
        for op in &plan.ops {
            match op {
                Op::Embed { table, out } => self.embed(plan, *table, *out, step)?,
                Op::Input { out } => {
                    let width = plan.buffer(*out).width;
                    self.staging.clear();
                    for (i, input) in step.inputs.iter().enumerate() {
                        match input {
                            Input::Embedding(v) if v.len() == width => {
                                self.staging.extend_from_slice(v)
                            }
                            Input::Embedding(v) => {
                                return Err(Error::Other(format!(
                                    "input row {i} has {} values, the model takes {width}",
                                    v.len()
                                )))
                            }
                            Input::Token(_) => {
                                return Err(Error::Other(
                                    "this plan takes vectors, not token ids".into(),
                                ))
                            }
                        }
                    }
                    let mut o = self.take(*out);
                    let r = dev
                        .stream()
                        .memcpy_htod(&self.staging, &mut o.slice_mut(..n * width))
                        .map_err(drv);
                    self.buffers[out.0] = Some(o);
                    r?;
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
                    let table = self.table.slice(..used);
                    let kbuf = self.buffers[kb.0].as_ref().expect("k buffer");
                    let vbuf = self.buffers[v.0].as_ref().expect("v buffer");
                    dev.kv_scatter(
                        &kbuf.slice(..n * d),
                        n,
                        d,
                        &mut kv.k[*layer],
                        &table,
                        bs,
                        step.first_pos,
                    )
                    .map_err(cu)?;
                    dev.kv_scatter(
                        &vbuf.slice(..n * d),
                        n,
                        d,
                        &mut kv.v[*layer],
                        &table,
                        bs,
                        step.first_pos,
                    )
                    .map_err(cu)?;
                    let width = n_heads * head_dim;
                    let mut o = self.buffers[out.0].take().expect("out buffer");
                    let kv = self.kv.as_ref().expect("checked above");
                    let view = DeviceKv {
                        k: &kv.k[*layer],
                        v: &kv.v[*layer],
                        block_size: bs,
                        block_table: &self.table,
                        n_blocks: used,
                        kv_dim: d,
                    };
                    let r = dev.attention(
                        &self.buf(*q).slice(..n * width),
                        n,
                        *n_heads,
                        *n_kv_heads,
                        *head_dim,
                        &view,
                        step.first_pos,
                        *causal,
                        *scale,
                        &mut o.slice_mut(..n * width),
                    );
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
        match epilogue {
            Epilogue::Store => dev.matmul(&xv, m, wm, bias, &mut ov),
            Epilogue::GeluTanh | Epilogue::GeluErf => {
                dev.matmul(&xv, m, wm, bias, &mut ov).and_then(|()| {
                    let kind = if epilogue == Epilogue::GeluTanh {
                        mipha_kernels::cuda::GeluKind::Tanh
                    } else {
                        mipha_kernels::cuda::GeluKind::Erf
                    };
                    dev.gelu(&mut ov, None, nw, kind)
                })
            }
            Epilogue::Accumulate => {
                let mut t = self.scratch.slice_mut(..m * nw);
                dev.matmul(&xv, m, wm, bias, &mut t)
                    .and_then(|()| dev.add_assign(&mut ov, &t))
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
        let n = step.inputs.len();
        if n == 0 || n > plan.max_tokens {
            return Err(Error::Other(format!(
                "a step carries 1..={} rows, got {n}",
                plan.max_tokens
            )));
        }
        if step.outputs.len() > plan.max_outputs {
            return Err(Error::Other(format!(
                "a step may ask for at most {} output rows, got {}",
                plan.max_outputs,
                step.outputs.len()
            )));
        }
        let result = self.run_ops(plan, step, capture);
        let rows = self.rows(plan.output, n, step.outputs.len());
        self.last_output = Some((plan.output, rows * plan.buffer(plan.output).width));
        result
    }

    fn read_output(&mut self, out: &mut [f32]) -> Result<()> {
        let (buf, len) = self
            .last_output
            .ok_or_else(|| Error::Other("no step has run yet".into()))?;
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
}
