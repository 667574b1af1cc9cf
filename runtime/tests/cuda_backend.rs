//! The CUDA backend against the CPU backend on tiny generated models that use
//! every op of the plan language: a Phi-like text plan (token embedding, LayerNorm,
//! F16/BF16/Q8_0/Q4_0 matmuls with every epilogue, partial rotary, paged causal
//! attention over a shuffled block table, a `Rows::Outputs` head) run as a prefill
//! then decode steps, and a SigLIP-like vision plan (vector inputs, position rows,
//! non-causal self-attention). Skips without a CUDA device.
//!
//! The CPU reference binds with int8 activations off, so both backends multiply
//! f32 activations with the same dequantized weights. Bounds, relative to the
//! largest |output| of the step: 1e-4 where the GPU used its f32 GEMV (steps of at
//! most 8 rows), 2e-2 where it used the f16 cuBLAS GEMM (longer prefills).

#![cfg(feature = "cuda")]

use std::sync::Arc;

use mipha_kernels::quant::quantize_row;
use mipha_runtime::cuda::{CudaBackend, DeviceChoice, Resolved};
use mipha_runtime::graph::KvShape;
use mipha_runtime::{
    Backend, BindOptions, CpuBackend, Epilogue, GeluKind, Input, KvConfig, KvDtype, MqfFile,
    MqfWriter, Op, Plan, PlanBuilder, QuantType, Rows, SeqRows, Step, TensorSpec, Weights,
};

fn device() -> Option<Arc<mipha_kernels::cuda::Device>> {
    match DeviceChoice::Auto.resolve() {
        Ok(Resolved::Cuda(d)) => Some(d),
        Ok(Resolved::Cpu { reason }) => {
            eprintln!(
                "skipping: no CUDA device: {}",
                reason.unwrap_or_else(|| "cpu".into())
            );
            None
        }
        Err(e) => panic!("CUDA device present but unusable: {e}"),
    }
}

fn floats(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Writes every weight of `plan` with the type `ty_of(name)` and random values.
fn write_model(
    dir: &std::path::Path,
    plan: &Plan,
    ty_of: impl Fn(&str) -> QuantType,
) -> Arc<MqfFile> {
    let path = dir.join("tiny.mqf");
    let specs: Vec<TensorSpec> = plan
        .weights
        .iter()
        .map(|w| TensorSpec::new(w.name.clone(), ty_of(&w.name), w.shape.clone()))
        .collect();
    let mut wr = MqfWriter::create(&path, Vec::new(), specs.clone()).unwrap();
    for (i, s) in specs.iter().enumerate() {
        let cols = *s.shape.last().unwrap() as usize;
        let rows: usize = s.shape[..s.shape.len() - 1].iter().product::<u64>().max(1) as usize;
        let rows = if s.shape.len() == 1 { 1 } else { rows };
        let scale = if s.name.ends_with("ln.w") { 1.0 } else { 0.3 };
        let vals = floats(rows * cols, i as u64 + 7, scale);
        let rb = s.ty.row_bytes(cols);
        let mut bytes = vec![0u8; rows * rb];
        for (src, dst) in vals.chunks_exact(cols).zip(bytes.chunks_exact_mut(rb)) {
            quantize_row(s.ty, src, dst);
        }
        wr.write_tensor(i, &bytes).unwrap();
    }
    wr.finish().unwrap();
    Arc::new(MqfFile::open(&path).unwrap())
}

const D: usize = 64;
const HEADS: usize = 2;
const HD: usize = 32;
const FFN: usize = 96;
const VOCAB: usize = 50;

fn text_plan() -> Plan {
    let mut b = PlanBuilder::new(16, 4, D);
    let h = b.buffer("h", D);
    let hn = b.buffer("hn", D);
    let q = b.buffer("q", D);
    let k = b.buffer("k", D);
    let v = b.buffer("v", D);
    let att = b.buffer("att", D);
    let f = b.buffer("f", FFN);
    let logits = b.buffer("logits", VOCAB);
    let emb = b.weight("emb", &[VOCAB, D]);
    b.push(Op::Embed { table: emb, out: h });
    for layer in 0..2 {
        let p = format!("l{layer}.");
        let lw = b.weight(format!("{p}ln.w"), &[D]);
        let lb = b.weight(format!("{p}ln.b"), &[D]);
        b.push(Op::LayerNorm {
            x: h,
            weight: lw,
            bias: lb,
            eps: 1e-5,
            out: hn,
        });
        for (name, out) in [("q", q), ("k", k), ("v", v)] {
            let w = b.weight(format!("{p}{name}.w"), &[D, D]);
            let bias = b.weight(format!("{p}{name}.b"), &[D]);
            b.push(Op::MatMul {
                x: hn,
                w,
                bias: Some(bias),
                out,
                rows: Rows::All,
                epilogue: Epilogue::Store,
            });
        }
        for x in [q, k] {
            b.push(Op::Rope {
                x,
                n_heads: HEADS,
                head_dim: HD,
                rot_dims: 12,
                theta: 10000.0,
            });
        }
        b.push(Op::Attention {
            layer,
            q,
            k,
            v,
            out: att,
            n_heads: HEADS,
            n_kv_heads: HEADS,
            head_dim: HD,
            causal: true,
            scale: 1.0 / (HD as f32).sqrt(),
        });
        let wo = b.weight(format!("{p}o.w"), &[D, D]);
        b.push(Op::MatMul {
            x: att,
            w: wo,
            bias: None,
            out: h,
            rows: Rows::All,
            epilogue: Epilogue::Accumulate,
        });
        let w1 = b.weight(format!("{p}fc1.w"), &[FFN, D]);
        let b1 = b.weight(format!("{p}fc1.b"), &[FFN]);
        let epi = if layer == 0 {
            Epilogue::GeluTanh
        } else {
            Epilogue::GeluErf
        };
        b.push(Op::MatMul {
            x: hn,
            w: w1,
            bias: Some(b1),
            out: f,
            rows: Rows::All,
            epilogue: epi,
        });
        let w2 = b.weight(format!("{p}fc2.w"), &[D, FFN]);
        let b2 = b.weight(format!("{p}fc2.b"), &[D]);
        b.push(Op::MatMul {
            x: f,
            w: w2,
            bias: Some(b2),
            out: h,
            rows: Rows::All,
            epilogue: Epilogue::Accumulate,
        });
        // slices a layer at a time (`execute_ops` over `Plan::slices`)
        b.mark_break();
    }
    let lw = b.weight("final.ln.w", &[D]);
    let lb = b.weight("final.ln.b", &[D]);
    b.push(Op::LayerNorm {
        x: h,
        weight: lw,
        bias: lb,
        eps: 1e-5,
        out: hn,
    });
    b.push(Op::Tap {
        x: hn,
        name: "final_norm".into(),
    });
    let head = b.weight("head.w", &[VOCAB, D]);
    b.push(Op::MatMul {
        x: hn,
        w: head,
        bias: None,
        out: logits,
        rows: Rows::Outputs,
        epilogue: Epilogue::Store,
    });
    b.set_kv(KvShape {
        n_layers: 2,
        kv_dim: D,
    });
    b.finish(logits)
}

fn text_type(name: &str) -> QuantType {
    if name.ends_with(".b") || name.contains("ln.") {
        QuantType::F32
    } else if name.contains("q.w") || name == "head.w" {
        QuantType::F16
    } else if name.contains("k.w") || name == "emb" {
        QuantType::Q8_0
    } else if name.contains("v.w") || name.contains("fc2") {
        QuantType::Q4_0
    } else {
        QuantType::BF16
    }
}

#[track_caller]
fn close(what: &str, got: &[f32], want: &[f32], rel: f32) {
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-3);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= rel * scale,
            "{what}: element {i}: cuda {g}, cpu {w} (bound {})",
            rel * scale
        );
    }
}

#[test]
fn text_plan_matches_cpu_over_prefill_and_decode() {
    let dev = device(); // the CPU half runs (and checks the fixture) regardless
    let dir = tempfile::tempdir().unwrap();
    let plan = text_plan();
    let file = write_model(dir.path(), &plan, text_type);
    let weights = Weights::bind_with(
        &plan,
        file,
        BindOptions {
            int8_activations: false,
            bf16_dot: None,
            cpu_repack: true,
        },
    )
    .unwrap();
    let kv = KvConfig {
        n_blocks: 8,
        block_size: 4,
        dtype: KvDtype::F32,
    };
    let mut cpu = CpuBackend::new(&plan, Some(kv), 1).unwrap();
    let mut gpu = dev.map(|d| CudaBackend::new(&plan, &weights, Some(kv), d).unwrap());
    let table = [5u32, 0, 7, 2, 6, 1];
    // a 12-row prefill (GEMM path), then a 3-row chunk, then single-token decodes
    let mut pos = 0;
    for (n, rel) in [(12usize, 2e-2f32), (3, 2e-2), (1, 2e-2), (1, 2e-2)] {
        let inputs: Vec<Input> = (0..n)
            .map(|i| Input::Token(((pos + i) * 7 % VOCAB) as u32))
            .collect();
        let outputs = if n > 1 { vec![0, n - 1] } else { vec![0] };
        let seqs = [SeqRows {
            rows: inputs.len(),
            first_pos: pos,
            block_table: &table,
        }];
        let step = Step {
            inputs: &inputs,
            seqs: &seqs,
            outputs: &outputs,
        };
        cpu.execute(&plan, &weights, &step, None).unwrap();
        let mut want = vec![0.0; outputs.len() * VOCAB];
        cpu.read_output(&mut want).unwrap();
        assert!(want.iter().all(|v| v.is_finite()));
        if let Some(gpu) = gpu.as_mut() {
            gpu.execute(&plan, &weights, &step, None).unwrap();
            let mut got = vec![f32::NAN; outputs.len() * VOCAB];
            gpu.read_output(&mut got).unwrap();
            // later steps attend over the GEMM-rounded prefill's cache, hence 2e-2 throughout
            close(&format!("logits at pos {pos} (+{n})"), &got, &want, rel);
        }
        pos += n;
    }
    // a token outside the vocabulary is an error, not a crash
    let bad = [Input::Token(VOCAB as u32)];
    let seqs = [SeqRows {
        rows: bad.len(),
        first_pos: pos,
        block_table: &table,
    }];
    let step = Step {
        inputs: &bad,
        seqs: &seqs,
        outputs: &[0],
    };
    if let Some(gpu) = gpu.as_mut() {
        assert!(gpu.execute(&plan, &weights, &step, None).is_err());
    }
}

#[test]
fn decode_only_plan_matches_cpu_tightly() {
    // Steps of at most 8 rows: the GPU's f32 GEMV throughout.
    let dev = device(); // the CPU half runs (and checks the fixture) regardless
    let dir = tempfile::tempdir().unwrap();
    let plan = text_plan();
    let file = write_model(dir.path(), &plan, text_type);
    let weights = Weights::bind_with(
        &plan,
        file,
        BindOptions {
            int8_activations: false,
            bf16_dot: None,
            cpu_repack: true,
        },
    )
    .unwrap();
    let kv = KvConfig {
        n_blocks: 8,
        block_size: 4,
        dtype: KvDtype::F32,
    };
    let mut cpu = CpuBackend::new(&plan, Some(kv), 1).unwrap();
    let mut gpu = dev.map(|d| CudaBackend::new(&plan, &weights, Some(kv), d).unwrap());
    let table = [3u32, 6, 1, 0, 4];
    let mut pos = 0;
    for n in [5usize, 1, 1, 2, 1] {
        let inputs: Vec<Input> = (0..n)
            .map(|i| Input::Token(((pos + i) * 11 % VOCAB) as u32))
            .collect();
        let outputs = vec![n - 1];
        let seqs = [SeqRows {
            rows: inputs.len(),
            first_pos: pos,
            block_table: &table,
        }];
        let step = Step {
            inputs: &inputs,
            seqs: &seqs,
            outputs: &outputs,
        };
        cpu.execute(&plan, &weights, &step, None).unwrap();
        let mut want = vec![0.0; VOCAB];
        cpu.read_output(&mut want).unwrap();
        if let Some(gpu) = gpu.as_mut() {
            gpu.execute(&plan, &weights, &step, None).unwrap();
            let mut got = vec![f32::NAN; VOCAB];
            gpu.read_output(&mut got).unwrap();
            close(&format!("logits at pos {pos} (+{n})"), &got, &want, 1e-4);
        }
        pos += n;
    }
}

/// Patch width, model width and patches of [`vision_plan`].
const PATCH: usize = 12;
const VW: usize = 16;
const PATCHES: usize = 10;

/// A SigLIP-like plan: vector inputs, position rows, non-causal self-attention,
/// with breaks between its stages (`Plan::slices`).
fn vision_plan() -> Plan {
    let (patch, width, heads, hd, n) = (PATCH, VW, 2usize, 8usize, PATCHES);
    let mut b = PlanBuilder::new(n, 1, patch);
    let x = b.buffer("x", patch);
    let h = b.buffer("h", width);
    let q = b.buffer("q", width);
    let k = b.buffer("k", width);
    let v = b.buffer("v", width);
    let o = b.buffer("o", width);
    b.push(Op::Input { out: x });
    let pw = b.weight("patch.w", &[width, patch]);
    let pb = b.weight("patch.b", &[width]);
    b.push(Op::MatMul {
        x,
        w: pw,
        bias: Some(pb),
        out: h,
        rows: Rows::All,
        epilogue: Epilogue::Store,
    });
    let pos = b.weight("pos", &[n, width]);
    b.push(Op::AddRows { x: h, table: pos });
    b.mark_break();
    for (name, out) in [("q", q), ("k", k), ("v", v)] {
        let w = b.weight(format!("{name}.w"), &[width, width]);
        b.push(Op::MatMul {
            x: h,
            w,
            bias: None,
            out,
            rows: Rows::All,
            epilogue: Epilogue::Store,
        });
    }
    b.push(Op::SelfAttention {
        q,
        k,
        v,
        out: o,
        n_heads: heads,
        head_dim: hd,
        causal: false,
        scale: 0.35,
    });
    b.mark_break();
    b.push(Op::Gelu {
        x: o,
        kind: GeluKind::Erf,
    });
    b.push(Op::Add { dst: o, src: h });
    b.finish(o)
}

#[test]
fn vision_plan_matches_cpu() {
    let dev = device(); // the CPU half runs (and checks the fixture) regardless
    let (patch, width, n) = (PATCH, VW, PATCHES);
    let plan = vision_plan();
    let dir = tempfile::tempdir().unwrap();
    let file = write_model(dir.path(), &plan, |_| QuantType::F32);
    let weights = Weights::bind(&plan, file).unwrap();
    let mut cpu = CpuBackend::new(&plan, None, 1).unwrap();
    let mut gpu = dev.map(|d| CudaBackend::new(&plan, &weights, None, d).unwrap());
    let rows: Vec<Vec<f32>> = (0..n).map(|i| floats(patch, 100 + i as u64, 1.0)).collect();
    let inputs: Vec<Input> = rows.iter().map(|r| Input::Embedding(r)).collect();
    let seqs = [SeqRows {
        rows: inputs.len(),
        first_pos: 0,
        block_table: &[],
    }];
    let step = Step {
        inputs: &inputs,
        seqs: &seqs,
        outputs: &[],
    };
    cpu.execute(&plan, &weights, &step, None).unwrap();
    let mut want = vec![0.0; n * width];
    cpu.read_output(&mut want).unwrap();
    assert!(want.iter().all(|v| v.is_finite()));
    if let Some(gpu) = gpu.as_mut() {
        gpu.execute(&plan, &weights, &step, None).unwrap();
        let mut got = vec![f32::NAN; n * width];
        gpu.read_output(&mut got).unwrap();
        // 10 rows: the f16 GEMM path
        close("vision output", &got, &want, 2e-2);
    }
}

#[test]
fn device_choice_parses() {
    assert_eq!("cpu".parse(), Ok(DeviceChoice::Cpu));
    assert_eq!("auto".parse(), Ok(DeviceChoice::Auto));
    assert_eq!("cuda".parse(), Ok(DeviceChoice::Cuda(0)));
    assert_eq!("CUDA:1".parse(), Ok(DeviceChoice::Cuda(1)));
    assert!("cuda:x".parse::<DeviceChoice>().is_err());
    assert!("tpu".parse::<DeviceChoice>().is_err());
    // without CUDA, auto falls back to the CPU with the reason, cuda:0 is an error
    if let Ok(Resolved::Cpu { reason }) = DeviceChoice::Auto.resolve() {
        let why = reason.expect("auto says why it chose the CPU");
        assert!(DeviceChoice::Cuda(0).resolve().is_err(), "{why}");
    }
}

fn text_setup(dir: &std::path::Path) -> (Plan, Weights, KvConfig) {
    let plan = text_plan();
    let file = write_model(dir, &plan, text_type);
    let weights = Weights::bind_with(
        &plan,
        file,
        BindOptions {
            int8_activations: false,
            bf16_dot: None,
            cpu_repack: true,
        },
    )
    .unwrap();
    let kv = KvConfig {
        n_blocks: 8,
        block_size: 4,
        dtype: KvDtype::F32,
    };
    (plan, weights, kv)
}

#[test]
fn decode_graph_replays_match_plain_launches() {
    let Some(dev) = device() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (plan, weights, kv) = text_setup(dir.path());
    let mut graph = CudaBackend::new(&plan, &weights, Some(kv), dev.clone()).unwrap();
    graph.set_graphs(true);
    let mut plain = CudaBackend::new(&plan, &weights, Some(kv), dev).unwrap();
    plain.set_graphs(false);
    let table = [5u32, 0, 7, 2, 6, 1, 3, 4];
    // a 5-token prefill, then 24 decode steps: positions 5..29, over six blocks
    let mut pos = 0;
    let mut steps = 0;
    for n in std::iter::once(5usize).chain(std::iter::repeat_n(1, 24)) {
        let inputs: Vec<Input> = (0..n)
            .map(|i| Input::Token(((pos + i) * 13 % VOCAB) as u32))
            .collect();
        let seqs = [SeqRows {
            rows: inputs.len(),
            first_pos: pos,
            block_table: &table,
        }];
        let step = Step {
            inputs: &inputs,
            seqs: &seqs,
            outputs: &[n - 1],
        };
        let mut out = [vec![f32::NAN; VOCAB], vec![f32::NAN; VOCAB]];
        for (b, o) in [&mut graph, &mut plain].into_iter().zip(out.iter_mut()) {
            b.execute(&plan, &weights, &step, None).unwrap();
            b.read_output(o).unwrap();
        }
        // the same kernels with the same launches: bit for bit
        assert_eq!(out[0], out[1], "logits at position {pos} (+{n})");
        assert!(out[0].iter().all(|v| v.is_finite()));
        steps += (n == 1) as u64;
        pos += n;
    }
    assert_eq!(graph.graph_error(), None, "capture failed");
    assert_eq!(graph.graph_replays(), steps, "every decode step replayed");
    assert_eq!(plain.graph_replays(), 0);
}

#[test]
fn resident_rows_feed_the_text_plan_on_device() {
    let Some(dev) = device() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (plan, weights, kv) = text_setup(dir.path());
    // A plan that returns its input rows: its output stands for image embeddings.
    let mut b = PlanBuilder::new(4, 1, D);
    let out = b.buffer("rows", D);
    b.push(Op::Input { out });
    let identity = b.finish(out);
    let id_dir = tempfile::tempdir().unwrap();
    let id_file = write_model(id_dir.path(), &identity, |_| QuantType::F32);
    let idw = Weights::bind(&identity, id_file).unwrap();
    let rows: Vec<Vec<f32>> = (0..3).map(|i| floats(D, 500 + i, 1.0)).collect();
    let mut src = CudaBackend::new(&identity, &idw, None, dev.clone()).unwrap();
    let inputs: Vec<Input> = rows.iter().map(|r| Input::Embedding(r)).collect();
    let seqs = [SeqRows {
        rows: inputs.len(),
        first_pos: 0,
        block_table: &[],
    }];
    let step = Step {
        inputs: &inputs,
        seqs: &seqs,
        outputs: &[],
    };
    src.execute(&identity, &idw, &step, None).unwrap();
    let kept = src
        .keep_output()
        .unwrap()
        .expect("the GPU keeps its output");
    assert_eq!((kept.rows(), kept.width()), (3, D));
    assert_eq!(kept.to_host().unwrap(), rows.concat());
    // token, three resident rows, token -- against the same rows from the host
    let table = [1u32, 4, 2];
    let mut logits = Vec::new();
    for resident in [true, false] {
        let mut text = CudaBackend::new(&plan, &weights, Some(kv), dev.clone()).unwrap();
        let mut inputs = vec![Input::Token(3)];
        for (i, r) in rows.iter().enumerate() {
            inputs.push(if resident {
                Input::Resident {
                    rows: kept.as_ref(),
                    row: i,
                }
            } else {
                Input::Embedding(r)
            });
        }
        inputs.push(Input::Token(7));
        let seqs = [SeqRows {
            rows: inputs.len(),
            first_pos: 0,
            block_table: &table,
        }];
        let step = Step {
            inputs: &inputs,
            seqs: &seqs,
            outputs: &[4],
        };
        text.execute(&plan, &weights, &step, None).unwrap();
        let mut out = vec![f32::NAN; VOCAB];
        text.read_output(&mut out).unwrap();
        logits.push(out);
    }
    assert_eq!(
        logits[0], logits[1],
        "resident rows = the same rows from the host"
    );
}

/// Several sequences sharing one KV pool, stepped together (continuous batching)
/// or each alone: the batched step must give every sequence what running it
/// alone gives.
struct Scenario {
    /// each sequence's block table, blocks of the pool dealt out interleaved
    tables: Vec<Vec<u32>>,
    /// `(sequence, positions)`: a sequence that starts with another's first
    /// positions, whose K/V it reads from that one's blocks (a shared prefix)
    shares: Vec<Option<(usize, usize)>>,
    /// each step: (sequence, rows), in the step's order
    steps: Vec<Vec<(usize, usize)>>,
    n_blocks: usize,
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// each step as one `execute`
    Batched,
    /// each step as `execute_ops` over the plan's slices
    Slices,
    /// each sequence of each step on its own
    Alone,
}

impl Scenario {
    /// Sequences A, B, C, D over a pool of 11 blocks of 4: a prefill chunk of A
    /// between decodes of B and C at other lengths, a lone decode of B (a CUDA
    /// graph), batched decodes, then D, which shares A's first two blocks, joins
    /// them: the step's tables (12 blocks, one named twice) outgrow the pool's
    /// size and a graph captured before must be captured again.
    fn mixed() -> Scenario {
        Scenario {
            tables: vec![vec![7, 0, 10, 3], vec![5, 9], vec![1, 4, 8], vec![7, 0, 6]],
            shares: vec![None, None, None, Some((0, 8))],
            steps: vec![
                vec![(0, 7)],
                vec![(1, 3)],
                vec![(2, 9)],
                vec![(1, 1), (0, 5), (2, 1)],
                vec![(1, 1)],
                vec![(0, 1), (1, 1), (2, 1)],
                vec![(0, 1), (1, 1), (2, 1), (3, 1)],
                vec![(1, 1)],
            ],
            n_blocks: 11,
        }
    }

    fn kv(&self, dtype: KvDtype) -> KvConfig {
        KvConfig {
            n_blocks: self.n_blocks,
            block_size: 4,
            dtype,
        }
    }

    fn token(&self, seq: usize, pos: usize) -> u32 {
        match self.shares[seq] {
            Some((src, len)) if pos < len => self.token(src, pos),
            _ => ((seq * 31 + pos * 7 + 3) % VOCAB) as u32,
        }
    }

    /// Every step's logits, one labelled row per (step, sequence), in step order.
    fn run(
        &self,
        b: &mut dyn Backend,
        plan: &Plan,
        weights: &Weights,
        mode: Mode,
    ) -> Vec<(String, Vec<f32>)> {
        let mut pos: Vec<usize> = self.shares.iter().map(|s| s.map_or(0, |s| s.1)).collect();
        let mut logits = Vec::new();
        for (k, step) in self.steps.iter().enumerate() {
            let groups: Vec<&[(usize, usize)]> = match mode {
                Mode::Alone => step.chunks(1).collect(),
                _ => vec![&step[..]],
            };
            for g in groups {
                let mut inputs = Vec::new();
                let mut outputs = Vec::new();
                for &(s, n) in g {
                    inputs.extend((0..n).map(|i| Input::Token(self.token(s, pos[s] + i))));
                    outputs.push(inputs.len() - 1);
                }
                let seqs: Vec<SeqRows> = g
                    .iter()
                    .map(|&(s, n)| SeqRows {
                        rows: n,
                        first_pos: pos[s],
                        block_table: &self.tables[s],
                    })
                    .collect();
                let st = Step {
                    inputs: &inputs,
                    seqs: &seqs,
                    outputs: &outputs,
                };
                if mode == Mode::Slices {
                    for ops in plan.slices() {
                        b.execute_ops(plan, weights, &st, ops, None).unwrap();
                    }
                } else {
                    b.execute(plan, weights, &st, None).unwrap();
                }
                let mut out = vec![f32::NAN; outputs.len() * VOCAB];
                b.read_output(&mut out).unwrap();
                for (&(s, n), o) in g.iter().zip(out.chunks_exact(VOCAB)) {
                    assert!(o.iter().all(|v| v.is_finite()), "step {k} seq {s}");
                    let at = pos[s] + n - 1;
                    logits.push((format!("step {k}, sequence {s} at {at}"), o.to_vec()));
                }
                for &(s, n) in g {
                    pos[s] += n;
                }
            }
        }
        logits
    }
}

#[track_caller]
fn all_close(what: &str, got: &[(String, Vec<f32>)], want: &[(String, Vec<f32>)], rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: outputs");
    for ((label, g), (wl, w)) in got.iter().zip(want) {
        assert_eq!(label, wl);
        close(&format!("{what}: {label}"), g, w, rel);
    }
}

/// The text plan's weights with f32 activations (the GPU's GEMV for every matmul,
/// `set_f16_gemm(false)`), so the backends compare at 1e-4.
fn exact_setup(dir: &std::path::Path) -> (Plan, Weights) {
    let (plan, weights, _) = text_setup(dir);
    (plan, weights)
}

fn gpu_backend(
    plan: &Plan,
    weights: &Weights,
    kv: KvConfig,
    dev: &Arc<mipha_kernels::cuda::Device>,
) -> CudaBackend {
    let mut b = CudaBackend::new(plan, weights, Some(kv), dev.clone()).unwrap();
    b.set_f16_gemm(false);
    b.set_graphs(true);
    b
}

#[test]
fn mixed_steps_match_cpu_and_each_sequence_alone() {
    let dev = device(); // the CPU half runs (and checks the fixture) regardless
    let dir = tempfile::tempdir().unwrap();
    let (plan, weights) = exact_setup(dir.path());
    let sc = Scenario::mixed();
    let kv = sc.kv(KvDtype::F32);
    let mut cpu = CpuBackend::new(&plan, Some(kv), 1).unwrap();
    let cpu_batched = sc.run(&mut cpu, &plan, &weights, Mode::Batched);
    let mut cpu = CpuBackend::new(&plan, Some(kv), 1).unwrap();
    let cpu_alone = sc.run(&mut cpu, &plan, &weights, Mode::Alone);
    all_close("cpu batched vs alone", &cpu_batched, &cpu_alone, 1e-4);
    let Some(dev) = dev else { return };
    let mut gpu = gpu_backend(&plan, &weights, kv, &dev);
    let batched = sc.run(&mut gpu, &plan, &weights, Mode::Batched);
    // the lone decodes of B, the second after the tables grew: captured twice
    assert_eq!(gpu.graph_error(), None, "capture failed");
    assert_eq!(gpu.graph_replays(), 2, "lone decodes replayed from a graph");
    let mut gpu = gpu_backend(&plan, &weights, kv, &dev);
    let alone = sc.run(&mut gpu, &plan, &weights, Mode::Alone);
    all_close("cuda batched vs cpu batched", &batched, &cpu_batched, 1e-4);
    all_close("cuda batched vs cuda alone", &batched, &alone, 1e-4);
}

#[test]
fn f16_kv_matches_cpu_f16_kv() {
    let dev = device(); // the CPU half runs (and checks the fixture) regardless
    let dir = tempfile::tempdir().unwrap();
    let (plan, weights) = exact_setup(dir.path());
    let sc = Scenario::mixed();
    let mut cpu = CpuBackend::new(&plan, Some(sc.kv(KvDtype::F16)), 1).unwrap();
    assert_eq!(cpu.kv_dtype(), Some(KvDtype::F16));
    let cpu16 = sc.run(&mut cpu, &plan, &weights, Mode::Batched);
    let mut cpu = CpuBackend::new(&plan, Some(sc.kv(KvDtype::F32)), 1).unwrap();
    let cpu32 = sc.run(&mut cpu, &plan, &weights, Mode::Batched);
    // f16 storage moves the logits, a little
    all_close("cpu f16 vs f32 KV", &cpu16, &cpu32, 2e-2);
    let Some(dev) = dev else { return };
    let mut gpu = gpu_backend(&plan, &weights, sc.kv(KvDtype::F16), &dev);
    assert_eq!(gpu.kv_dtype(), Some(KvDtype::F16));
    let batched = sc.run(&mut gpu, &plan, &weights, Mode::Batched);
    let mut gpu = gpu_backend(&plan, &weights, sc.kv(KvDtype::F16), &dev);
    let alone = sc.run(&mut gpu, &plan, &weights, Mode::Alone);
    // Both store the same halves of K/V rows that agree to ~1e-6, so a value
    // may round to the neighbouring half (2^-11 relative) on one side: 1e-3
    // leaves room for that and none for a misread or unrounded pool.
    all_close("cuda f16 vs cpu f16 KV", &batched, &cpu16, 1e-3);
    all_close("cuda f16 batched vs alone", &batched, &alone, 1e-3);
}

#[test]
fn slices_equal_one_execute() {
    let dev = device(); // the CPU half runs (and checks the fixture) regardless
    let dir = tempfile::tempdir().unwrap();
    let (plan, weights) = exact_setup(dir.path());
    assert!(
        plan.slices().count() >= 3,
        "the text plan has a break per layer"
    );
    let sc = Scenario::mixed();
    let kv = sc.kv(KvDtype::F16);
    let mut cpu = CpuBackend::new(&plan, Some(kv), 1).unwrap();
    let whole = sc.run(&mut cpu, &plan, &weights, Mode::Batched);
    let mut cpu = CpuBackend::new(&plan, Some(kv), 1).unwrap();
    let sliced = sc.run(&mut cpu, &plan, &weights, Mode::Slices);
    all_close("cpu slices", &sliced, &whole, 1e-6);
    let vplan = vision_plan();
    assert_eq!(vplan.slices().count(), 3);
    let vdir = tempfile::tempdir().unwrap();
    let vfile = write_model(vdir.path(), &vplan, |_| QuantType::F32);
    let vweights = Weights::bind(&vplan, vfile).unwrap();
    let rows: Vec<Vec<f32>> = (0..PATCHES)
        .map(|i| floats(PATCH, 300 + i as u64, 1.0))
        .collect();
    let inputs: Vec<Input> = rows.iter().map(|r| Input::Embedding(r)).collect();
    let seqs = [SeqRows {
        rows: PATCHES,
        first_pos: 0,
        block_table: &[],
    }];
    let step = Step {
        inputs: &inputs,
        seqs: &seqs,
        outputs: &[],
    };
    let vision = |b: &mut dyn Backend, sliced: bool| {
        if sliced {
            for ops in vplan.slices() {
                b.execute_ops(&vplan, &vweights, &step, ops, None).unwrap();
            }
        } else {
            b.execute(&vplan, &vweights, &step, None).unwrap();
        }
        let mut out = vec![f32::NAN; PATCHES * VW];
        b.read_output(&mut out).unwrap();
        out
    };
    let mut cpu = CpuBackend::new(&vplan, None, 1).unwrap();
    let want = vision(&mut cpu, false);
    let got = vision(&mut cpu, true);
    close("cpu vision slices", &got, &want, 1e-6);
    let Some(dev) = dev else { return };
    // The same kernels with the same arguments in the same order: bit for bit,
    // whether the lone decodes replay a graph (whole) or launch plainly (slices).
    let mut gpu = gpu_backend(&plan, &weights, kv, &dev);
    let whole = sc.run(&mut gpu, &plan, &weights, Mode::Batched);
    assert!(gpu.graph_replays() > 0);
    let mut gpu = gpu_backend(&plan, &weights, kv, &dev);
    let sliced = sc.run(&mut gpu, &plan, &weights, Mode::Slices);
    assert_eq!(gpu.graph_replays(), 0, "a slice never replays a graph");
    all_close("cuda slices", &sliced, &whole, 0.0);
    let mut gpu = CudaBackend::new(&vplan, &vweights, None, dev.clone()).unwrap();
    let want = vision(&mut gpu, false);
    let got = vision(&mut gpu, true);
    assert_eq!(got, want, "cuda vision slices");
}

#[test]
fn failed_steps_leave_the_backend_usable() {
    let Some(dev) = device() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (plan, weights) = exact_setup(dir.path());
    let kv = KvConfig {
        n_blocks: 8,
        block_size: 4,
        dtype: KvDtype::F16,
    };
    let table = [3u32, 6, 1];
    let prompt: Vec<Input> = (0..6).map(|i| Input::Token(i * 5 + 1)).collect();
    let next = [Input::Token(9)];
    let run = |b: &mut CudaBackend, inputs: &[Input], first_pos: usize, fail_between: bool| {
        let seqs = [SeqRows {
            rows: inputs.len(),
            first_pos,
            block_table: &table,
        }];
        let outputs = [inputs.len() - 1];
        let step = Step {
            inputs,
            seqs: &seqs,
            outputs: &outputs,
        };
        if fail_between {
            // an input row of the wrong width: fails inside the first op, with
            // its output buffer taken
            let short = [0.5f32; 3];
            let bad_rows = [Input::Token(2), Input::Embedding(&short)];
            let bad_seqs = [SeqRows {
                rows: 2,
                first_pos,
                block_table: &table,
            }];
            let bad = Step {
                inputs: &bad_rows,
                seqs: &bad_seqs,
                outputs: &[1],
            };
            assert!(b.execute(&plan, &weights, &bad, None).is_err());
            // a block outside the pool, a token outside the vocabulary
            let one = [Input::Token(1)];
            let far = [SeqRows {
                rows: 1,
                first_pos: 8,
                block_table: &[3, 6, 8],
            }];
            let bad = Step {
                inputs: &one,
                seqs: &far,
                outputs: &[0],
            };
            assert!(b.execute(&plan, &weights, &bad, None).is_err());
            let oov = [Input::Token(VOCAB as u32)];
            let one_seq = [SeqRows {
                rows: 1,
                first_pos,
                block_table: &table,
            }];
            let bad = Step {
                inputs: &oov,
                seqs: &one_seq,
                outputs: &[0],
            };
            assert!(b.execute(&plan, &weights, &bad, None).is_err());
            // ops outside the plan
            let past = plan.ops.len() + 1;
            assert!(b
                .execute_ops(&plan, &weights, &step, 0..past, None)
                .is_err());
        }
        b.execute(&plan, &weights, &step, None).unwrap();
        let mut out = vec![f32::NAN; VOCAB];
        b.read_output(&mut out).unwrap();
        out
    };
    let mut clean = gpu_backend(&plan, &weights, kv, &dev);
    let mut failed = gpu_backend(&plan, &weights, kv, &dev);
    for (inputs, pos) in [(&prompt[..], 0), (&next[..], 6)] {
        let want = run(&mut clean, inputs, pos, false);
        let got = run(&mut failed, inputs, pos, true);
        // nothing the failed steps did reached the buffers or the cache
        assert_eq!(got, want, "after failed steps at position {pos}");
    }
}
