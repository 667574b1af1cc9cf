//! The CPU backend: executes a plan with the `mipha_kernels::cpu` kernels on a
//! dedicated rayon pool, KV storage in host memory.

use half::f16;
use mipha_kernels::{cpu as k, KvDtype, KvElem, KvLayer, KvView};

use crate::backend::{Backend, Capture, Input, Step};
use crate::error::{Error, Result};
use crate::graph::{BufId, Epilogue, GeluKind, Op, Plan, Rows, Weights};

/// Most CPU threads a pool may have: far above any machine's cores, far below
/// what would exhaust the process's threads or address space.
pub const MAX_THREADS: usize = 1024;

/// Host-memory K and V pools, `[n_blocks, block_size, kv_dim]` per layer.
struct KvPools<E> {
    k: Vec<Vec<E>>,
    v: Vec<Vec<E>>,
}

enum KvStore {
    F32(KvPools<f32>),
    F16(KvPools<f16>),
}

struct KvStorage {
    store: KvStore,
    block_size: usize,
    n_blocks: usize,
    kv_dim: usize,
}

pub struct CpuBackend {
    pool: std::sync::Arc<rayon::ThreadPool>,
    threads: usize,
    buffers: Vec<Vec<f32>>,
    /// each buffer's length, to restore one an interrupted step left taken
    buffer_lens: Vec<usize>,
    /// true for buffers that hold only the step's output rows
    output_rows: Vec<bool>,
    /// gathered input rows of a `Rows::Outputs` matmul
    gather: Vec<f32>,
    gather_len: usize,
    /// results of an accumulating matmul over unpacked weights, before the add
    epilogue_scratch: Vec<f32>,
    epilogue_len: usize,
    positions: Vec<usize>,
    kv: Option<KvStorage>,
    /// output buffer and length of the last step
    last_output: Option<(BufId, usize)>,
    /// int8 activations shared by consecutive Q8_0/Q4_0 matmuls of one input
    acts: k::QuantizedActs,
    /// the buffer `acts` holds, while nothing has written it since
    acts_of: Option<BufId>,
}

/// Size and element type of the KV pool a backend allocates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvConfig {
    pub n_blocks: usize,
    pub block_size: usize,
    pub dtype: KvDtype,
}

/// A zero-filled vector of `n` elements, or a clear error when the memory is
/// not there (instead of the abort of `vec!`). The pages are the allocator's
/// zeroed ones: untouched memory costs nothing until written.
pub(crate) fn zeroed<T: bytemuck::Zeroable>(n: usize, what: &str) -> Result<Vec<T>> {
    if n == 0 || std::mem::size_of::<T>() == 0 {
        return Ok(Vec::new());
    }
    let too_big = || {
        Error::Other(format!(
            "cannot allocate {what}: {n} elements of {} bytes",
            std::mem::size_of::<T>()
        ))
    };
    let layout = std::alloc::Layout::array::<T>(n).map_err(|_| too_big())?;
    // SAFETY: the layout has a non-zero size; a zeroed `T` is valid
    // (`Zeroable`), and the vector takes the allocation with its layout.
    unsafe {
        let p = std::alloc::alloc_zeroed(layout) as *mut T;
        if p.is_null() {
            return Err(too_big());
        }
        advise_huge_pages(p as *mut u8, layout.size());
        Ok(Vec::from_raw_parts(p, n, n))
    }
}

/// Asks Linux to back the 2 MiB-aligned part of a large allocation (the KV
/// pools, the activation buffers) with huge pages, since transparent huge
/// pages are often `madvise`-only. Decode attention reads each head's K/V
/// slice a `kv_dim` row apart, a new 4 KiB page per key: with 4 KiB pages a
/// layer's pool outgrows the TLB and every key pays a page walk (Zen 4 VM,
/// Q4_0 at 1024 keys: attention 57 -> 43 ms a token). Advice only: where it is
/// refused or unsupported, nothing changes.
fn advise_huge_pages(p: *mut u8, len: usize) {
    const HUGE: usize = 2 << 20;
    #[cfg(target_os = "linux")]
    {
        let start = (p as usize).next_multiple_of(HUGE);
        let end = (p as usize + len) & !(HUGE - 1);
        if end > start {
            // SAFETY: the range lies inside an allocation we own; MADV_HUGEPAGE
            // changes no contents.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (p, len, HUGE);
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
        if threads > MAX_THREADS {
            return Err(Error::Config(format!(
                "{threads} CPU threads asked for; at most {MAX_THREADS} are allowed"
            )));
        }
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
        let layout = plan.buffer_layout()?;
        let buffer_lens = layout.lens;
        let output_rows = layout.output_rows;
        let buffers = buffer_lens
            .iter()
            .zip(&plan.buffers)
            .map(|(&len, b)| zeroed(len, &format!("activation buffer `{}`", b.name)))
            .collect::<Result<Vec<_>>>()?;
        let kv = match (plan.kv, kv) {
            (Some(shape), Some(cfg)) => {
                let elems = cfg
                    .n_blocks
                    .checked_mul(cfg.block_size)
                    .and_then(|n| n.checked_mul(shape.kv_dim))
                    .ok_or_else(|| Error::Other("KV cache size overflows".into()))?;
                let what = format!(
                    "the KV cache ({} blocks of {} positions, {})",
                    cfg.n_blocks,
                    cfg.block_size,
                    cfg.dtype.name()
                );
                fn pools<E: bytemuck::Zeroable>(
                    layers: usize,
                    elems: usize,
                    what: &str,
                ) -> Result<KvPools<E>> {
                    let layer = || {
                        (0..layers)
                            .map(|_| zeroed::<E>(elems, what))
                            .collect::<Result<Vec<_>>>()
                    };
                    Ok(KvPools {
                        k: layer()?,
                        v: layer()?,
                    })
                }
                let store = match cfg.dtype {
                    KvDtype::F32 => KvStore::F32(pools(shape.n_layers, elems, &what)?),
                    KvDtype::F16 => KvStore::F16(pools(shape.n_layers, elems, &what)?),
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
        let gather_len = layout.gather_len;
        let epilogue_len = layout.scratch_len;
        Ok(CpuBackend {
            pool,
            threads,
            buffers,
            buffer_lens,
            output_rows,
            gather: zeroed(gather_len, "the output-row gather buffer")?,
            gather_len,
            epilogue_scratch: zeroed(epilogue_len, "the epilogue buffer")?,
            epilogue_len,
            positions: Vec::with_capacity(plan.max_tokens),
            kv,
            last_output: None,
            acts: k::QuantizedActs::default(),
            acts_of: None,
        })
    }

    /// The KV pool's element type, when the plan has one.
    pub fn kv_dtype(&self) -> Option<KvDtype> {
        self.kv.as_ref().map(|kv| match kv.store {
            KvStore::F32(_) => KvDtype::F32,
            KvStore::F16(_) => KvDtype::F16,
        })
    }

    /// Gives back buffers a step that panicked left taken (an op holds its
    /// output buffer while it runs), so one failed step does not fail the next.
    fn restore_buffers(&mut self) -> Result<()> {
        for (i, b) in self.buffers.iter_mut().enumerate() {
            if b.len() != self.buffer_lens[i] {
                *b = zeroed(self.buffer_lens[i], "an activation buffer")?;
            }
        }
        if self.gather.len() != self.gather_len {
            self.gather = zeroed(self.gather_len, "the output-row gather buffer")?;
        }
        if self.epilogue_scratch.len() != self.epilogue_len {
            self.epilogue_scratch = zeroed(self.epilogue_len, "the epilogue buffer")?;
        }
        Ok(())
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
        ops: std::ops::Range<usize>,
        mut capture: Option<&mut (dyn Capture + '_)>,
    ) -> Result<()> {
        let n = step.inputs.len();
        let n_out = step.outputs.len();
        self.positions.clear();
        self.positions.extend(step.positions());
        self.acts_of = None;
        for (i, op) in plan.ops.iter().enumerate().take(ops.end).skip(ops.start) {
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
                    #[cfg(feature = "fault-injection")]
                    crate::fault::check(step)?;
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
                            // (rows checked by Step::check)
                            for (j, &r) in step.outputs.iter().enumerate() {
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
                    let (bs, d) = (kv.block_size, kv.kv_dim);
                    let width = n_heads * head_dim;
                    let mut o = std::mem::take(&mut self.buffers[out.0]);
                    let a = Attend {
                        layer: *layer,
                        block_size: bs,
                        kv_dim: d,
                        k: &self.buffers[kb.0][..n * d],
                        v: &self.buffers[v.0][..n * d],
                        q: &self.buffers[q.0][..n * width],
                        n_heads: *n_heads,
                        n_kv_heads: *n_kv_heads,
                        head_dim: *head_dim,
                        causal: *causal,
                        scale: *scale,
                    };
                    match &mut kv.store {
                        KvStore::F32(p) => a.run(p, step, &mut o[..n * width]),
                        KvStore::F16(p) => a.run(p, step, &mut o[..n * width]),
                    }
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

/// One attention op over a step's sequences: their new K/V rows go into the
/// pool (converted to its element type), then every row attends through its
/// own sequence's block table.
struct Attend<'a> {
    layer: usize,
    block_size: usize,
    kv_dim: usize,
    k: &'a [f32],
    v: &'a [f32],
    q: &'a [f32],
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    causal: bool,
    scale: f32,
}

impl Attend<'_> {
    fn run<E: KvElem>(&self, pools: &mut KvPools<E>, step: &Step, out: &mut [f32]) {
        let (bs, d) = (self.block_size, self.kv_dim);
        let (kp, vp) = (&mut pools.k[self.layer], &mut pools.v[self.layer]);
        let mut row = 0;
        for s in step.seqs {
            for pos in s.first_pos..s.first_pos + s.rows {
                let block = s.block_table[pos / bs] as usize;
                let slot = (block * bs + pos % bs) * d;
                let src = row * d..(row + 1) * d;
                k::kv_store(&self.k[src.clone()], &mut kp[slot..slot + d]);
                k::kv_store(&self.v[src], &mut vp[slot..slot + d]);
                row += 1;
            }
        }
        let layer = KvLayer {
            k: &kp[..],
            v: &vp[..],
            block_size: bs,
            kv_dim: d,
        };
        k::attention_batch(
            self.q,
            self.n_heads,
            self.n_kv_heads,
            self.head_dim,
            &layer,
            step.seqs,
            self.causal,
            self.scale,
            out,
        );
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> String {
        format!("cpu ({} threads)", self.threads)
    }

    fn execute_ops(
        &mut self,
        plan: &Plan,
        weights: &Weights,
        step: &Step,
        ops: std::ops::Range<usize>,
        capture: Option<&mut (dyn Capture + '_)>,
    ) -> Result<()> {
        step.check(plan)?;
        if ops.end > plan.ops.len() || ops.start > ops.end {
            return Err(Error::Other(format!(
                "ops {ops:?} are outside the plan's {}",
                plan.ops.len()
            )));
        }
        if let Some(kv) = &self.kv {
            if plan.kv.is_some() {
                step.check_kv(kv.block_size, kv.n_blocks)?;
            }
        }
        self.restore_buffers()?;
        // A clone of the Arc lets the closure borrow `self` mutably.
        let pool = self.pool.clone();
        let result = pool.install(|| self.run_ops(plan, weights, step, ops, capture));
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
