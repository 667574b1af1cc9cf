//! `convert_checkpoint`: a Hugging Face Mipha checkpoint -> `.mqf`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use mipha_kernels::quant::quantize_row;
use mipha_kernels::QuantType;
use mipha_runtime::{MqfWriter, TensorSpec};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::checkpoint::{Checkpoint, Reader, SourceDtype, SourceTensor};
use crate::config::{ImageConfig, ModelConfig};
use crate::error::{ConvertError, Result};
use crate::metadata::{self, Provenance};
use crate::plan::{self, Expected};
use crate::progress;
use crate::tokenizer;

/// Source bytes read per positioned read: large enough for sequential throughput,
/// small against the largest tensor.
const READ_CHUNK: usize = 16 << 20;
/// Bytes per read of the hashing pass, which runs one thread per shard: each holds
/// this plus twice as much decoded.
const SCAN_CHUNK: usize = 2 << 20;

#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// The Hugging Face checkpoint folder.
    pub input: PathBuf,
    pub output: PathBuf,
    /// Language model, embeddings and lm_head.
    pub quant: QuantType,
    /// Vision tower and projector.
    pub vision_quant: QuantType,
    /// Draw a progress bar (only when stderr is a terminal).
    pub progress: bool,
    /// Test hook: fail as an interrupted run would after this many tensors were
    /// written, to show that no output appears.
    #[doc(hidden)]
    pub fail_after_tensors: Option<usize>,
}

impl ConvertOptions {
    /// `vision_quant` = `quant`, no progress bar.
    pub fn new(input: impl Into<PathBuf>, output: impl Into<PathBuf>, quant: QuantType) -> Self {
        ConvertOptions {
            input: input.into(),
            output: output.into(),
            quant,
            vision_quant: quant,
            progress: false,
            fail_after_tensors: None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct ConvertReport {
    pub output: PathBuf,
    pub tensors: usize,
    /// Stored tensor bytes (the data section without alignment padding).
    pub tensor_bytes: u64,
    pub file_size: u64,
    /// Bytes of checkpoint files read (hashed).
    pub source_bytes: u64,
    pub dropped: Vec<String>,
    pub fallbacks: Vec<String>,
    /// Things the user should know that did not stop the conversion.
    pub warnings: Vec<String>,
    pub seconds: f64,
}

/// A kept tensor: where it comes from and how it is stored.
struct Job<'a> {
    src: &'a SourceTensor,
    dtype: SourceDtype,
    spec_index: usize,
    ty: QuantType,
}

pub fn convert_checkpoint(opts: &ConvertOptions) -> Result<ConvertReport> {
    let t0 = Instant::now();
    let dir = &opts.input;
    if !dir.is_dir() {
        return Err(ConvertError::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory"),
        ));
    }
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(ConvertError::MissingConfig { dir: dir.clone() });
    }
    let cfg = ModelConfig::from_file(&config_path)?;
    let mut warnings = Vec::new();
    let mut small_files = vec!["config.json".to_string()];
    let pre_path = dir.join("preprocessor_config.json");
    let image = if pre_path.is_file() {
        small_files.push("preprocessor_config.json".into());
        ImageConfig::from_file(&pre_path)?
    } else {
        warnings.push(format!(
            "{}: no preprocessor_config.json; using SigLIP's defaults ({}px, mean = std = 0.5, bicubic)",
            dir.display(),
            cfg.vision.image_size
        ));
        ImageConfig::siglip_default(cfg.vision.image_size)
    };
    let tok = tokenizer::load_checkpoint_tokenizer(dir)?;
    small_files.extend(tok.source_files.iter().cloned());
    let ckpt = Checkpoint::open(dir)?;

    let expected = plan::expected_tensors(&cfg);
    let Matched {
        pairs: jobs_src,
        dropped,
    } = match_tensors(&ckpt, &cfg, &expected)?;

    // Pass 1: hash every source file; on the way, find each kept tensor's range so
    // the stored type can be decided before the writer fixes the layout.
    let weight_bytes: u64 = ckpt.files.iter().map(|f| f.size).sum();
    let pb = progress::bar(opts.progress, weight_bytes, "hashing");
    let mut source_files = Vec::new();
    let mut source_sha256 = Vec::new();
    let mut source_bytes = 0u64;
    for rel in small_files.iter().chain(ckpt.index_file.iter()) {
        let path = dir.join(rel);
        let bytes = std::fs::read(&path).map_err(|e| ConvertError::io(&path, e))?;
        source_bytes += bytes.len() as u64;
        source_files.push(rel.clone());
        source_sha256.push(hex(&Sha256::digest(&bytes)));
    }
    let mut max_abs = vec![0f32; expected.len()];
    let per_file: Vec<Result<FileScan>> = (0..ckpt.files.len())
        .into_par_iter()
        .map(|fi| scan_file(&ckpt, fi, &jobs_src, &pb))
        .collect();
    for (fi, r) in per_file.into_iter().enumerate() {
        let scan = r?;
        source_files.push(ckpt.files[fi].rel.clone());
        source_sha256.push(scan.sha256);
        source_bytes += ckpt.files[fi].size;
        for (ei, m) in scan.max_abs {
            max_abs[ei] = m;
        }
    }
    pb.finish_and_clear();

    let mut fallbacks = Vec::new();
    let mut specs = Vec::with_capacity(expected.len());
    for (e, &m) in expected.iter().zip(&max_abs) {
        let (ty, fb) = plan::choose_type(e, opts.quant, opts.vision_quant, m);
        fallbacks.extend(fb);
        specs.push(TensorSpec {
            name: e.name.clone(),
            ty,
            shape: e.shape.iter().map(|&d| d as u64).collect(),
        });
    }
    let prov = Provenance {
        name: cfg.name.clone().unwrap_or_else(|| folder_name(dir)),
        source_files,
        source_sha256,
        quant: opts.quant,
        vision_quant: opts.vision_quant,
        fallbacks: fallbacks.clone(),
        dropped: dropped.clone(),
        synth_seed: None,
    };
    let meta = metadata::build(&cfg, &image, &tok, &prov);

    // Pass 2: convert in file order, so each shard is read front to back.
    let mut jobs: Vec<Job> = jobs_src
        .iter()
        .map(|&(ti, ei)| {
            let src = &ckpt.tensors[ti];
            Job {
                src,
                dtype: src.dtype.clone().expect("checked in match_tensors"),
                spec_index: ei,
                ty: specs[ei].ty,
            }
        })
        .collect();
    jobs.sort_by_key(|j| (j.src.file, j.src.start));
    let total: u64 = jobs.iter().map(|j| j.src.end - j.src.start).sum();
    let readers: Vec<Reader> = ckpt
        .files
        .iter()
        .map(|f| Reader::open(&f.path))
        .collect::<Result<_>>()?;

    let mut writer = MqfWriter::create(&opts.output, meta, specs)?;
    let pb = progress::bar(opts.progress, total, "converting");
    let mut tensor_bytes = 0u64;
    for (n, job) in jobs.iter().enumerate() {
        if opts.fail_after_tensors == Some(n) {
            return Err(ConvertError::Interrupted { written: n });
        }
        pb.set_message(format!("{}/{} tensors", n, jobs.len()));
        let data = convert_tensor(&readers[job.src.file], job, &pb)?;
        tensor_bytes += data.len() as u64;
        writer.write_tensor(job.spec_index, &data)?;
    }
    pb.set_message(format!("{0}/{0} tensors", jobs.len()));
    writer.finish()?;
    pb.finish_and_clear();
    let file_size = std::fs::metadata(&opts.output)
        .map_err(|e| ConvertError::io(&opts.output, e))?
        .len();
    Ok(ConvertReport {
        output: opts.output.clone(),
        tensors: jobs.len(),
        tensor_bytes,
        file_size,
        source_bytes,
        dropped,
        fallbacks,
        warnings,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

struct Matched {
    /// `(checkpoint tensor index, expected tensor index)`
    pairs: Vec<(usize, usize)>,
    dropped: Vec<String>,
}

struct FileScan {
    sha256: String,
    /// `(expected tensor index, largest finite |x|)`
    max_abs: Vec<(usize, f32)>,
}

/// Pairs checkpoint tensors with the expected ones: `(tensor index, expected index)`
/// for kept tensors, plus the names of dropped ones. Fails on a missing, misshapen,
/// unreadable or unknown tensor.
fn match_tensors(ckpt: &Checkpoint, cfg: &ModelConfig, expected: &[Expected]) -> Result<Matched> {
    let mut pairs = Vec::with_capacity(expected.len());
    for (ei, e) in expected.iter().enumerate() {
        let Some(&ti) = ckpt.by_name.get(&e.name) else {
            return Err(ConvertError::MissingTensor {
                tensor: e.name.clone(),
            });
        };
        let t = &ckpt.tensors[ti];
        if t.shape != e.shape {
            return Err(ConvertError::UnexpectedShape {
                tensor: e.name.clone(),
                expected: e.shape.clone(),
                found: t.shape.clone(),
            });
        }
        if let Err(dtype) = &t.dtype {
            return Err(ConvertError::UnsupportedDtype {
                path: ckpt.files[t.file].path.clone(),
                tensor: e.name.clone(),
                dtype: dtype.clone(),
            });
        }
        pairs.push((ti, ei));
    }
    let kept: std::collections::HashSet<&str> = expected.iter().map(|e| e.name.as_str()).collect();
    let mut dropped = Vec::new();
    for t in &ckpt.tensors {
        if kept.contains(t.name.as_str()) {
            continue;
        }
        if plan::is_droppable(&t.name, cfg) {
            dropped.push(t.name.clone());
        } else {
            return Err(ConvertError::UnexpectedTensor {
                path: ckpt.files[t.file].path.clone(),
                tensor: t.name.clone(),
            });
        }
    }
    dropped.sort();
    Ok(Matched { pairs, dropped })
}

/// Hashes one weight file front to back; for each kept tensor in it, returns the
/// largest finite magnitude, failing on NaN or infinity.
fn scan_file(
    ckpt: &Checkpoint,
    fi: usize,
    pairs: &[(usize, usize)],
    pb: &indicatif::ProgressBar,
) -> Result<FileScan> {
    let file = &ckpt.files[fi];
    let reader = Reader::open(&file.path)?;
    // Regions in file order: kept tensors are scanned, everything else only hashed.
    let mut kept: Vec<(u64, u64, usize, SourceDtype, &str)> = pairs
        .iter()
        .filter_map(|&(ti, ei)| {
            let t = &ckpt.tensors[ti];
            (t.file == fi).then(|| {
                (
                    t.start,
                    t.end,
                    ei,
                    t.dtype.clone().expect("checked"),
                    t.name.as_str(),
                )
            })
        })
        .collect();
    kept.sort_by_key(|k| k.0);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; SCAN_CHUNK];
    let mut floats = vec![0f32; SCAN_CHUNK / 2];
    let mut stats = Vec::with_capacity(kept.len());
    let mut pos = 0u64;
    let hash_range = |from: u64, to: u64, buf: &mut Vec<u8>, hasher: &mut Sha256| -> Result<()> {
        let mut p = from;
        while p < to {
            let n = ((to - p) as usize).min(buf.len());
            reader.read_at(p, &mut buf[..n])?;
            hasher.update(&buf[..n]);
            pb.inc(n as u64);
            p += n as u64;
        }
        Ok(())
    };
    for &(start, end, ei, dtype, name) in &kept {
        hash_range(pos, start, &mut buf, &mut hasher)?;
        let mut m = 0f32;
        let mut finite = true;
        let mut p = start;
        // SCAN_CHUNK is a multiple of every element size, so no element is split.
        while p < end {
            let n = ((end - p) as usize).min(SCAN_CHUNK);
            reader.read_at(p, &mut buf[..n])?;
            hasher.update(&buf[..n]);
            let f = &mut floats[..n / dtype.size()];
            dtype.decode(&buf[..n], f);
            for &x in f.iter() {
                finite &= x.is_finite();
                m = m.max(x.abs());
            }
            pb.inc(n as u64);
            p += n as u64;
        }
        if !finite {
            return Err(ConvertError::NonFinite {
                path: file.path.clone(),
                tensor: name.to_string(),
            });
        }
        stats.push((ei, m));
        pos = end;
    }
    hash_range(pos, file.size, &mut buf, &mut hasher)?;
    Ok(FileScan {
        sha256: hex(&hasher.finalize()),
        max_abs: stats,
    })
}

/// Reads one tensor a block of rows at a time and encodes it into its stored bytes.
fn convert_tensor(reader: &Reader, job: &Job, pb: &indicatif::ProgressBar) -> Result<Vec<u8>> {
    let shape = &job.src.shape;
    let cols = shape.last().copied().unwrap_or(1).max(1);
    let rows = if shape.len() <= 1 {
        1
    } else {
        shape[..shape.len() - 1].iter().product()
    };
    let esz = job.dtype.size();
    let row_bytes = job.ty.row_bytes(cols);
    let mut out = vec![0u8; rows * row_bytes];
    if rows == 0 || shape.contains(&0) {
        return Ok(out);
    }
    let src_row = cols * esz;
    let rows_per_chunk = (READ_CHUNK / src_row).max(1);
    let mut buf = vec![0u8; rows_per_chunk.min(rows) * src_row];
    let mut r = 0;
    while r < rows {
        let nr = rows_per_chunk.min(rows - r);
        let src = &mut buf[..nr * src_row];
        reader.read_at(job.src.start + (r * src_row) as u64, src)?;
        let dst = &mut out[r * row_bytes..(r + nr) * row_bytes];
        let (dtype, ty) = (job.dtype, job.ty);
        dst.par_chunks_mut(row_bytes)
            .zip(src.par_chunks(src_row))
            .for_each_init(
                || vec![0f32; cols],
                |row, (d, s)| {
                    dtype.decode(s, row);
                    quantize_row(ty, row, d);
                },
            );
        pb.inc(src.len() as u64);
        r += nr;
    }
    Ok(out)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn folder_name(dir: &Path) -> String {
    dir.canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "mipha".to_string())
}
