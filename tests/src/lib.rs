//! Shared helpers for the conformance tests: fixture paths, golden files,
//! comparisons, and a capture sink for tapped activations.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use mipha_runtime::Capture;

pub mod fuzz_support;

/// `tests/fixtures/<name>` inside the repository (fixtures are copied in, so the
/// tests pass on a fresh clone without `../shared`). A test binary run from
/// another checkout (prebuilt binaries carried to a GPU machine) finds them under
/// `$MIPHA_FIXTURES`, else `tests/fixtures` of the working directory.
pub fn fixture(name: &str) -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let root = match std::env::var_os("MIPHA_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None if built.is_dir() => built,
        None => PathBuf::from("tests/fixtures"),
    };
    root.join(name)
}

/// A tensor of a golden file, as f32 (float tensors) or i64 (id tensors).
#[derive(Clone, Debug)]
pub struct GoldenTensor {
    pub shape: Vec<usize>,
    pub f32: Vec<f32>,
    pub i64: Vec<i64>,
}

pub struct Golden {
    pub tensors: HashMap<String, GoldenTensor>,
    pub json: serde_json::Value,
}

impl Golden {
    /// Loads `<path>.safetensors` and, if present, the `.json` beside it.
    pub fn load(path: &Path) -> Golden {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            let data = view.data();
            let (f, i) = match view.dtype() {
                safetensors::Dtype::F32 => (
                    data.chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                    Vec::new(),
                ),
                safetensors::Dtype::I64 => (
                    Vec::new(),
                    data.chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                ),
                other => panic!("{name}: unexpected golden dtype {other:?}"),
            };
            tensors.insert(
                name.to_string(),
                GoldenTensor {
                    shape: view.shape().to_vec(),
                    f32: f,
                    i64: i,
                },
            );
        }
        let json_path = path.with_extension("json");
        let json = std::fs::read_to_string(&json_path)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(serde_json::Value::Null);
        Golden { tensors, json }
    }

    pub fn get(&self, name: &str) -> &GoldenTensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("golden tensor `{name}` missing"))
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn ids(&self, name: &str) -> Vec<i64> {
        self.get(name).i64.clone()
    }
}

/// Largest absolute difference; panics on a length mismatch.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(
            0.0,
            |m: f32, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
        )
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        ab += x as f64 * y as f64;
        aa += x as f64 * x as f64;
        bb += y as f64 * y as f64;
    }
    ab / (aa.sqrt() * bb.sqrt())
}

pub fn argmax(v: &[f32]) -> usize {
    mipha_models::sampling::argmax(v) as usize
}

/// Collects tapped buffers, appending the rows of successive steps.
#[derive(Default)]
pub struct Recorder {
    pub taps: HashMap<String, Vec<f32>>,
}

impl Capture for Recorder {
    fn tap(&mut self, name: &str, rows: &[f32], _width: usize) {
        self.taps
            .entry(name.to_string())
            .or_default()
            .extend_from_slice(rows);
    }
}

/// Converts a fixture checkpoint to `.mqf` in `dir` with the given quant types.
/// Greedy decoding of exactly `n` tokens (past any `<|endoftext|>`): answers
/// of a fixed length, to compare runs.
pub fn greedy(n: usize) -> mipha_models::GenerateOptions {
    mipha_models::GenerateOptions {
        max_tokens: n,
        ignore_eos: true,
        ..Default::default()
    }
}

pub fn convert(checkpoint: &Path, dir: &Path, quant: &str, vision_quant: &str) -> PathBuf {
    let out = dir.join(format!("model-{quant}-{vision_quant}.mqf"));
    let status = mipha_convert_run(checkpoint, &out, quant, vision_quant);
    assert!(status, "conversion of {} failed", checkpoint.display());
    out
}

fn mipha_convert_run(checkpoint: &Path, out: &Path, quant: &str, vision_quant: &str) -> bool {
    let q = mipha_runtime::QuantType::from_name(quant).expect("quant name");
    let vq = mipha_runtime::QuantType::from_name(vision_quant).expect("quant name");
    let mut opts = mipha_convert::ConvertOptions::new(checkpoint, out, q);
    opts.vision_quant = vq;
    match mipha_convert::convert_checkpoint(&opts) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("convert: {e}");
            false
        }
    }
}

/// How close a run must land to a golden.
#[derive(Clone, Copy, Debug)]
pub struct Tolerance {
    /// residual stream after each layer, and the final hidden state
    pub hidden: f32,
    /// every logit compared
    pub logits: f32,
}

/// What [`check_lm`] measured (for the assertion messages and the closing notes).
#[derive(Clone, Debug, Default)]
pub struct LmReport {
    pub max_hidden: f32,
    pub max_logits: f32,
    pub tokens: Vec<u32>,
    pub golden_tokens: Vec<u32>,
}

/// Runs the language model of `engine` on a golden's prompt (image positions fed
/// with the golden's own `image_embeds`, so only the LM is under test) and compares
/// every tapped stage, the prompt logits, the teacher-forced generation logits, and
/// free-running greedy tokens. Panics with the stage that is off.
pub fn check_lm(engine: &mipha_models::Engine, golden: &Golden, tol: Tolerance) -> LmReport {
    use mipha_models::Logits;
    use mipha_runtime::Input;

    let ids = golden.ids("input_ids");
    let hidden = engine.config().hidden_size;
    let vocab = engine.config().vocab_size;
    let images = golden
        .has("image_embeds")
        .then(|| golden.get("image_embeds"));
    let mut inputs = Vec::new();
    let mut n_images = 0;
    for &id in &ids {
        if id < 0 {
            let img = images.expect("a placeholder but no image_embeds");
            let per_image = img.f32.len() / hidden;
            // multi-image goldens stack images along the patch dimension
            let patches = if img.shape.len() == 3 {
                img.shape[1]
            } else {
                per_image
            };
            let base = n_images * patches * hidden;
            for p in 0..patches {
                inputs.push(Input::Embedding(
                    &img.f32[base + p * hidden..base + (p + 1) * hidden],
                ));
            }
            n_images += 1;
        } else {
            inputs.push(Input::Token(id as u32));
        }
    }
    let t = inputs.len();
    let seq = engine.new_sequence();
    let mut rec = Recorder::default();
    let mut logits = Vec::new();
    engine
        .forward(seq, &inputs, Logits::All, &mut logits, Some(&mut rec))
        .expect("prompt forward");
    assert_eq!(logits.len(), t * vocab);
    let mut report = LmReport::default();

    let stage = |name: &str, ours: &[f32], gold: &[f32], tol: f32, report: &mut f32| {
        let d = max_abs_diff(ours, gold);
        *report = report.max(d);
        assert!(d <= tol, "{name}: max abs diff {d} > {tol}");
    };
    if golden.has("inputs_embeds") {
        stage(
            "inputs_embeds",
            &rec.taps["inputs_embeds"],
            &golden.get("inputs_embeds").f32,
            tol.hidden,
            &mut report.max_hidden,
        );
    }
    if golden.has("lm.layer_outputs") {
        let lo = golden.get("lm.layer_outputs");
        for l in 0..lo.shape[0] {
            stage(
                &format!("lm.layer_outputs[{l}]"),
                &rec.taps[&format!("lm.layer_outputs.{l}")],
                &lo.f32[l * t * hidden..(l + 1) * t * hidden],
                tol.hidden,
                &mut report.max_hidden,
            );
        }
    }
    if golden.has("lm.final_hidden") {
        stage(
            "lm.final_hidden",
            &rec.taps["lm.final_hidden"],
            &golden.get("lm.final_hidden").f32,
            tol.hidden,
            &mut report.max_hidden,
        );
    }
    if golden.has("prompt_logits") {
        stage(
            "prompt_logits",
            &logits,
            &golden.get("prompt_logits").f32,
            tol.logits,
            &mut report.max_logits,
        );
    }
    if golden.has("prompt_logits_last") {
        stage(
            "prompt_logits_last",
            &logits[(t - 1) * vocab..],
            &golden.get("prompt_logits_last").f32,
            tol.logits,
            &mut report.max_logits,
        );
    }
    if golden.has("prompt_topk_ids") {
        let ids = golden.get("prompt_topk_ids");
        let vals = golden.get("prompt_topk_logits");
        let k = ids.shape[1];
        let mut ours = Vec::with_capacity(t * k);
        for p in 0..t {
            for j in 0..k {
                ours.push(logits[p * vocab + ids.i64[p * k + j] as usize]);
            }
        }
        stage(
            "prompt_topk_logits",
            &ours,
            &vals.f32,
            tol.logits,
            &mut report.max_logits,
        );
    }
    if golden.has("prompt_logsumexp") {
        let ours: Vec<f32> = logits
            .chunks_exact(vocab)
            .map(|row| {
                let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                m + row
                    .iter()
                    .map(|&x| ((x - m) as f64).exp())
                    .sum::<f64>()
                    .ln() as f32
            })
            .collect();
        stage(
            "prompt_logsumexp",
            &ours,
            &golden.get("prompt_logsumexp").f32,
            tol.logits,
            &mut report.max_logits,
        );
    }

    // Teacher-forced generation through the KV cache.
    let gen: Vec<u32> = golden
        .ids("gen_token_ids")
        .iter()
        .map(|&x| x as u32)
        .collect();
    let gen_logits = golden.get("gen_logits");
    let mut row = logits[(t - 1) * vocab..].to_vec();
    for (i, &tok) in gen.iter().enumerate() {
        if i > 0 {
            engine
                .forward(
                    seq,
                    &[Input::Token(gen[i - 1])],
                    Logits::Last,
                    &mut row,
                    None,
                )
                .expect("decode step");
        }
        stage(
            &format!("gen_logits[{i}]"),
            &row,
            &gen_logits.f32[i * vocab..(i + 1) * vocab],
            tol.logits,
            &mut report.max_logits,
        );
        assert_eq!(argmax(&row) as u32, tok, "greedy token {i} differs");
    }
    engine.release_sequence(seq).unwrap();
    report.golden_tokens = gen;
    report
}

/// An engine for conformance runs: small chunks and small KV blocks so that
/// chunked prefill and block-table paging are exercised on tiny prompts, and
/// f32 activations throughout, so quantized weights are exact against an oracle
/// that ran on the dequantized weights.
pub fn conformance_engine(mqf: &Path) -> mipha_models::Engine {
    engine_with(mqf, false)
}

/// [`conformance_engine`] with the default int8 activations for Q8_0/Q4_0
/// weights (what users run): judged by cosine and top-1 agreement.
pub fn conformance_engine_int8(mqf: &Path) -> mipha_models::Engine {
    engine_with(mqf, true)
}

/// [`conformance_engine`] on a GPU (f32 activations throughout: the GEMV
/// kernels for every matmul), or `None` after printing why it skips: no
/// device, or a build without the `cuda` feature.
pub fn conformance_engine_cuda(mqf: &Path) -> Option<mipha_models::Engine> {
    use mipha_runtime::{DeviceChoice, Resolved};
    match DeviceChoice::Auto.resolve() {
        Ok(Resolved::Cpu { reason }) => {
            eprintln!(
                "skipping: no CUDA device: {}",
                reason.unwrap_or_else(|| "cpu".into())
            );
            return None;
        }
        // (the only other arm in a build with the cuda feature)
        #[allow(unreachable_patterns)]
        Ok(_) => {}
        Err(e) => panic!("CUDA device present but unusable: {e}"),
    }
    let mut opts = engine_options(false);
    opts.device = DeviceChoice::Cuda(0);
    Some(mipha_models::Engine::load(mqf, opts).expect("load engine on cuda:0"))
}

fn engine_with(mqf: &Path, int8_activations: bool) -> mipha_models::Engine {
    mipha_models::Engine::load(mqf, engine_options(int8_activations)).expect("load engine")
}

/// The options of [`conformance_engine`].
pub fn conformance_options() -> mipha_models::EngineOptions {
    engine_options(false)
}

fn engine_options(int8_activations: bool) -> mipha_models::EngineOptions {
    mipha_models::EngineOptions {
        threads: 2,
        max_batch_tokens: 16,
        max_outputs: 16,
        kv_block_size: 4,
        // exact against the f32 oracle
        kv_dtype: mipha_models::KvDtype::F32,
        verify: true,
        int8_activations,
        ..Default::default()
    }
}

/// Greedy generation through the public `generate` path.
pub fn greedy_tokens(engine: &mipha_models::Engine, prompt: &[u32], n: usize) -> Vec<u32> {
    let opts = mipha_models::GenerateOptions {
        max_tokens: n,
        ignore_eos: true,
        ..Default::default()
    };
    engine
        .generate(prompt, &opts, |_, _| true)
        .expect("generate")
        .tokens
}
