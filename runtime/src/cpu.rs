//! The CPU backend: executes a plan with the `mipha_kernels::cpu` kernels on a
//! dedicated rayon pool, KV storage in host memory.

use mipha_kernels::{cpu as k, KvView};

use crate::backend::{Backend, Capture, Input, Step};
use crate::error::{Error, Result};
use crate::graph::{BufId, Epilogue, GeluKind, Op, Plan, Rows, Weights};

/// Host-memory K and V pools, `[n_blocks, block_size, kv_dim]` per layer.
struct KvStorage {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    block_size: usize,
    n_blocks: usize,
    kv_dim: usize,
}

pub struct CpuBackend {
    pool: std::sync::Arc<rayon::ThreadPool>,
    threads: usize,
    buffers: Vec<Vec<f32>>,
    /// true for buffers that hold only the step's output rows
    output_rows: Vec<bool>,
    /// gathered input rows of a `Rows::Outputs` matmul
    gather: Vec<f32>,
    /// results of an accumulating matmul over unpacked weights, before the add
    epilogue_scratch: Vec<f32>,
    positions: Vec<usize>,
    kv: Option<KvStorage>,
    /// output buffer and length of the last step
    last_output: Option<(BufId, usize)>,
    /// int8 activations shared by consecutive Q8_0/Q4_0 matmuls of one input
    acts: k::QuantizedActs,
    /// the buffer `acts` holds, while nothing has written it since
    acts_of: Option<BufId>,
}

/// Size of the KV pool a backend allocates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvConfig {
    pub n_blocks: usize,
    pub block_size: usize,
}

impl CpuBackend {
    /// Lays out every buffer of `plan` (and the KV pool, if the plan attends) once.
    /// `threads == 0` uses one thread per core.
    pub fn new(plan: &Plan, kv: Option<KvConfig>, threads: usize) -> Result<Self> {
        Self::with_pool(plan, kv, Self::thread_pool(threads)?)
    }

    /// A pool for [`CpuBackend::with_pool`], so several plans of one model share
    /// their threads instead of oversubscribing the cores.
    pub fn thread_pool(threads: usize) -> Result<std::sync::Arc<rayon::ThreadPool>> {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("mipha-cpu-{i}"))
            .build()
            .map(std::sync::Arc::new)
            .map_err(|e| Error::Other(format!("cannot start the CPU thread pool: {e}")))
    }

    pub fn with_pool(
        plan: &Plan,
        kv: Option<KvConfig>,
        pool: std::sync::Arc<rayon::ThreadPool>,
    ) -> Result<Self> {
        let threads = pool.current_num_threads();
        let mut output_rows = vec![false; plan.buffers.len()];
        let mut gather_width = 0;
        let mut accumulate_width = 0;
        for op in &plan.ops {
            if let Op::MatMul {
                out,
                epilogue: Epilogue::Accumulate,
                ..
            } = op
            {
                accumulate_width = accumulate_width.max(plan.buffer(*out).width);
            }
            if let Op::MatMul {
                x,
                out,
                rows: Rows::Outputs,
                ..
            } = op
            {
                output_rows[out.0] = true;
                gather_width = gather_width.max(plan.buffer(*x).width);
            }
        }
        let buffers = plan
            .buffers
            .iter()
            .zip(&output_rows)
            .map(|(b, &o)| {
                let rows = if o { plan.max_outputs } else { plan.max_tokens };
                vec![0.0f32; rows * b.width]
            })
            .collect();
        let kv = match (plan.kv, kv) {
            (Some(shape), Some(cfg)) => {
                let elems = cfg
                    .n_blocks
                    .checked_mul(cfg.block_size)
                    .and_then(|n| n.checked_mul(shape.kv_dim))
                    .ok_or_else(|| Error::Other("KV cache size overflows".into()))?;
                Some(KvStorage {
                    k: (0..shape.n_layers).map(|_| vec![0.0; elems]).collect(),
                    v: (0..shape.n_layers).map(|_| vec![0.0; elems]).collect(),
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
        Ok(CpuBackend {
            pool,
            threads,
            buffers,
            output_rows,
            gather: vec![0.0; plan.max_outputs * gather_width],
            epilogue_scratch: vec![0.0; plan.max_tokens * accumulate_width],
            positions: Vec::with_capacity(plan.max_tokens),
            kv,
            last_output: None,
            acts: k::QuantizedActs::default(),
            acts_of: None,
        })
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    fn rows(&self, b: BufId, n_tokens: usize, n_outputs: usize) -> usize {
        if self.output_rows[b.0] {
            n_outputs
        } else {
            n_tokens
        }
    }

    /// Whether `op` is a matmul over all rows of `x` with int8 activations.
    fn int8_matmul_of(op: Option<&Op>, weights: &Weights, x: BufId) -> bool {
        matches!(op, Some(Op::MatMul { x: mx, w, rows: Rows::All, .. })
            if *mx == x && weights.packed(*w).is_some_and(|p| p.ty().is_block_quantized()))
    }

    fn run_ops(
        &mut self,
        plan: &Plan,
        weights: &Weights,
        step: &Step,
        mut capture: Option<&mut (dyn Capture + '_)>,
    ) -> Result<()> {
        let n = step.inputs.len();
        let n_out = step.outputs.len();
        self.positions.clear();
        self.positions.extend(step.first_pos..step.first_pos + n);
        self.acts_of = None;
        for (i, op) in plan.ops.iter().enumerate() {
            // Shared int8 activations stay valid across matmuls (which never
            // write their input); any other op may change the buffer.
            match op {
                Op::MatMul { out, .. } if Some(*out) != self.acts_of => {}
                _ => self.acts_of = None,
            }
            match op {
                Op::Embed { table, out } => {
                    let table = weights.get(*table);
                    let width = plan.buffer(*out).width;
                    let out = &mut self.buffers[out.0];
                    for (i, input) in step.inputs.iter().enumerate() {
                        let row = &mut out[i * width..(i + 1) * width];
                        match input {
                            Input::Token(id) => {
                                k::embedding(table.view(), std::slice::from_ref(id), row).map_err(
                                    |id| {
                                        Error::Other(format!(
                                            "token id {id} is outside the vocabulary ({} rows)",
                                            table.rows
                                        ))
                                    },
                                )?
                            }
                            Input::Embedding(v) => {
                                if v.len() != width {
                                    return Err(Error::Other(format!(
                                        "input embedding {i} has {} values, the model takes {width}",
                                        v.len()
                                    )));
                                }
                                row.copy_from_slice(v);
                            }
                            Input::Resident { rows, .. } => return Err(resident(*rows)),
                        }
                    }
                }
                Op::Input { out } => {
                    let width = plan.buffer(*out).width;
                    let out = &mut self.buffers[out.0];
                    for (i, input) in step.inputs.iter().enumerate() {
                        match input {
                            Input::Embedding(v) if v.len() == width => {
                                out[i * width..(i + 1) * width].copy_from_slice(v)
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
                            Input::Resident { rows, .. } => return Err(resident(*rows)),
                        }
                    }
                }
                Op::AddRows { x, table } => {
                    let width = plan.buffer(*x).width;
                    let table = weights.get(*table).f32s();
                    if n * width > table.len() {
                        return Err(Error::Other(format!(
                            "{n} rows exceed the {} rows of the position table",
                            table.len() / width
                        )));
                    }
                    k::add_assign(&mut self.buffers[x.0][..n * width], &table[..n * width]);
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
                    let mut o = std::mem::take(&mut self.buffers[out.0]);
                    let view = KvView {
                        k: &self.buffers[kb.0][..n * width],
                        v: &self.buffers[v.0][..n * width],
                        block_size: n,
                        block_table: &[0],
                        kv_dim: width,
                    };
                    k::attention(
                        &self.buffers[q.0][..n * width],
                        n,
                        *n_heads,
                        *n_heads,
                        *head_dim,
                        &view,
                        0,
                        *causal,
                        *scale,
                        &mut o[..n * width],
                    );
                    self.buffers[out.0] = o;
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
                    let mut o = std::mem::take(&mut self.buffers[out.0]);
                    let (x, w, b) = (
                        &self.buffers[x.0][..rows * width],
                        weights.get(*weight).f32s(),
                        weights.get(*bias).f32s(),
                    );
                    let o_rows = &mut o[..rows * width];
                    // LayerNorm into the quantization of the int8 matmuls that read it.
                    if Self::int8_matmul_of(plan.ops.get(i + 1), weights, *out) {
                        k::layer_norm_quantize(x, width, w, b, *eps, o_rows, &mut self.acts);
                        self.acts_of = Some(*out);
                    } else {
                        k::layer_norm(x, width, w, b, *eps, o_rows);
                    }
                    self.buffers[out.0] = o;
                }
                Op::MatMul {
                    x,
                    w,
                    bias,
                    out,
                    rows,
                    epilogue,
                } => {
                    let packed = weights.packed(*w);
                    let w = weights.get(*w);
                    let bias = bias.map(|b| weights.get(b).f32s());
                    let epilogue = *epilogue;
                    let mut scratch = std::mem::take(&mut self.epilogue_scratch);
                    // Packed kernels apply the epilogue as they write; weights read
                    // in place (F32, or int8 activations off) take a second pass.
                    let mut matmul = |x: &[f32], m: usize, out: &mut [f32]| match packed {
                        Some(p) => k::matmul_packed_with(x, m, p, bias, epilogue, out),
                        None => match epilogue {
                            Epilogue::Store => k::matmul(x, m, w.view(), bias, out),
                            Epilogue::GeluTanh => {
                                k::matmul(x, m, w.view(), bias, out);
                                k::gelu_tanh(out);
                            }
                            Epilogue::GeluErf => {
                                k::matmul(x, m, w.view(), bias, out);
                                k::gelu_erf(out);
                            }
                            Epilogue::Accumulate => {
                                let t = &mut scratch[..out.len()];
                                k::matmul(x, m, w.view(), bias, t);
                                k::add_assign(out, t);
                            }
                        },
                    };
                    let kdim = plan.buffer(*x).width;
                    let mut o = std::mem::take(&mut self.buffers[out.0]);
                    let xb = &self.buffers[x.0];
                    match rows {
                        Rows::All if Self::int8_matmul_of(Some(op), weights, *x) => {
                            let m = self.rows(*x, n, n_out);
                            if self.acts_of != Some(*x) || self.acts.shape() != (m, kdim) {
                                k::quantize_acts(&xb[..m * kdim], m, kdim, &mut self.acts);
                                self.acts_of = Some(*x);
                            }
                            let p = packed.expect("int8 matmuls are packed");
                            k::matmul_quantized(
                                &mut self.acts,
                                p,
                                bias,
                                epilogue,
                                &mut o[..m * w.rows],
                            );
                        }
                        Rows::All => {
                            let m = self.rows(*x, n, n_out);
                            matmul(&xb[..m * kdim], m, &mut o[..m * w.rows]);
                        }
                        Rows::Outputs => {
                            for (j, &r) in step.outputs.iter().enumerate() {
                                if r >= n {
                                    return Err(Error::Other(format!(
                                        "output row {r} is outside the step's {n} rows"
                                    )));
                                }
                                self.gather[j * kdim..(j + 1) * kdim]
                                    .copy_from_slice(&xb[r * kdim..(r + 1) * kdim]);
                            }
                            matmul(
                                &self.gather[..n_out * kdim],
                                n_out,
                                &mut o[..n_out * w.rows],
                            );
                        }
                    }
                    self.buffers[out.0] = o;
                    self.epilogue_scratch = scratch;
                }
                Op::Gelu { x, kind } => {
                    let len = self.rows(*x, n, n_out) * plan.buffer(*x).width;
                    let b = &mut self.buffers[x.0][..len];
                    match kind {
                        GeluKind::Tanh => k::gelu_tanh(b),
                        GeluKind::Erf => k::gelu_erf(b),
                    }
                }
                Op::Add { dst, src } => {
                    let len = self.rows(*dst, n, n_out) * plan.buffer(*dst).width;
                    let s = std::mem::take(&mut self.buffers[src.0]);
                    k::add_assign(&mut self.buffers[dst.0][..len], &s[..len]);
                    self.buffers[src.0] = s;
                }
                Op::Rope {
                    x,
                    n_heads,
                    head_dim,
                    rot_dims,
                    theta,
                } => {
                    let len = n * plan.buffer(*x).width;
                    k::rope_partial(
                        &mut self.buffers[x.0][..len],
                        *n_heads,
                        *head_dim,
                        *rot_dims,
                        &self.positions,
                        *theta,
                    );
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
                    let kv = self
                        .kv
                        .as_mut()
                        .ok_or_else(|| Error::Other("no KV cache".into()))?;
                    let bs = kv.block_size;
                    let table = step.kv_blocks(bs, kv.n_blocks)?;
                    let d = kv.kv_dim;
                    for i in 0..n {
                        let pos = step.first_pos + i;
                        let block = table[pos / bs] as usize;
                        let slot = (block * bs + pos % bs) * d;
                        kv.k[*layer][slot..slot + d]
                            .copy_from_slice(&self.buffers[kb.0][i * d..(i + 1) * d]);
                        kv.v[*layer][slot..slot + d]
                            .copy_from_slice(&self.buffers[v.0][i * d..(i + 1) * d]);
                    }
                    let view = KvView {
                        k: &kv.k[*layer],
                        v: &kv.v[*layer],
                        block_size: bs,
                        block_table: step.block_table,
                        kv_dim: d,
                    };
                    let width = n_heads * head_dim;
                    let mut o = std::mem::take(&mut self.buffers[out.0]);
                    k::attention(
                        &self.buffers[q.0][..n * width],
                        n,
                        *n_heads,
                        *n_kv_heads,
                        *head_dim,
                        &view,
                        step.first_pos,
                        *causal,
                        *scale,
                        &mut o[..n * width],
                    );
                    self.buffers[out.0] = o;
                }
                Op::Tap { x, name } => {
                    if let Some(c) = capture.as_deref_mut() {
                        let width = plan.buffer(*x).width;
                        let rows = self.rows(*x, n, n_out);
                        c.tap(name, &self.buffers[x.0][..rows * width], width);
                    }
                }
            }
        }
        Ok(())
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> String {
        format!("cpu ({} threads)", self.threads)
    }

    fn execute(
        &mut self,
        plan: &Plan,
        weights: &Weights,
        step: &Step,
        capture: Option<&mut (dyn Capture + '_)>,
    ) -> Result<()> {
        step.check(plan)?;
        // A clone of the Arc lets the closure borrow `self` mutably.
        let pool = self.pool.clone();
        let result = pool.install(|| self.run_ops(plan, weights, step, capture));
        let rows = self.rows(plan.output, step.inputs.len(), step.outputs.len());
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
        out.copy_from_slice(&self.buffers[buf.0][..len]);
        Ok(())
    }
}

/// Rows kept on a device reach the CPU backend only by a caller's mistake.
fn resident(rows: &dyn crate::backend::ResidentRows) -> Error {
    Error::Other(format!(
        "input rows kept on {} given to the CPU backend (copy them to the host first)",
        rows.location()
    ))
}
