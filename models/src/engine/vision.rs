//! Pictures: the vision tower's work in the step loop, one slice (a few
//! encoder layers) per iteration between decode steps, so running streams keep
//! producing tokens while a picture is encoded; and the embeddings' LRU.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mipha_runtime::{Backend, Capture, Error, Input, ResidentRows, Result, SeqRows, Step};

use super::stream::CancelToken;
use super::Model;
use crate::siglip::patchify;

/// An image's projected embeddings, `[num_patches, hidden]`: on the host, or
/// kept on the GPU when the engine runs there (they then feed the prefill
/// device to device, never coming back to the host).
#[derive(Clone, Debug)]
pub enum ImageEmbeddings {
    Host(Arc<Vec<f32>>),
    Resident(Arc<dyn ResidentRows>),
}

impl From<Arc<Vec<f32>>> for ImageEmbeddings {
    fn from(v: Arc<Vec<f32>>) -> Self {
        ImageEmbeddings::Host(v)
    }
}

impl ImageEmbeddings {
    /// Appends one input row per patch (`width` = the model's hidden size).
    pub fn push_inputs<'a>(&'a self, width: usize, inputs: &mut Vec<Input<'a>>) {
        self.push_rows(width, 0..self.rows(width), inputs)
    }

    /// Appends input rows `rows` (patch indices).
    pub fn push_rows<'a>(&'a self, width: usize, rows: Range<usize>, inputs: &mut Vec<Input<'a>>) {
        match self {
            ImageEmbeddings::Host(v) => inputs.extend(
                v[rows.start * width..rows.end * width]
                    .chunks_exact(width)
                    .map(Input::Embedding),
            ),
            ImageEmbeddings::Resident(r) => inputs.extend(rows.map(|row| Input::Resident {
                rows: r.as_ref(),
                row,
            })),
        }
    }

    /// Patches held.
    pub fn rows(&self, width: usize) -> usize {
        match self {
            ImageEmbeddings::Host(v) => v.len() / width.max(1),
            ImageEmbeddings::Resident(r) => r.rows(),
        }
    }

    /// Values per row.
    pub fn width(&self, width: usize) -> usize {
        match self {
            ImageEmbeddings::Host(_) => width,
            ImageEmbeddings::Resident(r) => r.width(),
        }
    }

    /// The values on the host (a download for device-resident ones).
    pub fn to_host(&self) -> Result<Arc<Vec<f32>>> {
        match self {
            ImageEmbeddings::Host(v) => Ok(v.clone()),
            ImageEmbeddings::Resident(r) => Ok(Arc::new(r.to_host()?)),
        }
    }
}

/// A picture in a prompt: its embeddings and the content key that decides
/// reuse (the image cache, and the picture's part of the prefix cache's block
/// hashes). Only the engine makes keys, from content: from the pixels it
/// encodes ([`crate::Engine::encode_image`]) or from the embeddings themselves
/// ([`ImageEmbeds::from_host`]). A caller cannot name a key, so it cannot make
/// another request reuse embeddings or KV of a different picture.
#[derive(Clone, Debug)]
pub struct ImageEmbeds {
    key: u128,
    embeds: ImageEmbeddings,
}

impl ImageEmbeds {
    pub(crate) fn new(key: u128, embeds: ImageEmbeddings) -> Self {
        ImageEmbeds { key, embeds }
    }

    /// Embeddings computed elsewhere (`[num_patches, hidden]`, e.g. kept from an
    /// earlier run), keyed by a SHA-256 of their own values.
    pub fn from_host(embeddings: Vec<f32>) -> Self {
        let key = content_key(b"mipha-embeds-v1\0", &embeddings);
        ImageEmbeds {
            key,
            embeds: ImageEmbeddings::Host(Arc::new(embeddings)),
        }
    }

    /// The content key: 128 bits of a SHA-256 of the pixels (or embeddings).
    pub fn key(&self) -> u128 {
        self.key
    }

    pub fn embeddings(&self) -> &ImageEmbeddings {
        &self.embeds
    }

    /// The values on the host (a download for device-resident ones).
    pub fn to_host(&self) -> Result<Arc<Vec<f32>>> {
        self.embeds.to_host()
    }
}

/// 128 bits of a SHA-256 over a domain tag, the value count and the values'
/// little-endian bytes: collision-resistant, so equal keys mean equal content.
pub(crate) fn content_key(domain: &[u8], values: &[f32]) -> u128 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(domain);
    h.update((values.len() as u64).to_le_bytes());
    h.update(bytemuck::cast_slice::<f32, u8>(values));
    let d = h.finalize();
    u128::from_le_bytes(d[..16].try_into().expect("a SHA-256 has 32 bytes"))
}

/// The key of preprocessed pixels.
pub(crate) fn pixel_key(pixels: &[f32]) -> u128 {
    content_key(b"mipha-pixels-v1\0", pixels)
}

/// Buffers a plan tapped, recorded on the step loop and replayed to the
/// caller's [`Capture`] on the caller's thread (no caller code runs on the loop).
#[derive(Debug, Default)]
pub(crate) struct Taps(Vec<(String, Vec<f32>, usize)>);

impl Capture for Taps {
    fn tap(&mut self, name: &str, rows: &[f32], width: usize) {
        match self.0.iter_mut().find(|(n, _, w)| n == name && *w == width) {
            // a forward in several steps taps each buffer once per step
            Some((_, v, _)) => v.extend_from_slice(rows),
            None => self.0.push((name.to_string(), rows.to_vec(), width)),
        }
    }
}

impl Taps {
    pub fn replay(&self, to: &mut dyn Capture) {
        for (name, rows, width) in &self.0 {
            to.tap(name, rows, *width);
        }
    }
}

/// Where a picture's encoding time went.
#[derive(Clone, Debug, Default)]
pub struct EncodeStats {
    /// from the request to the first slice (other pictures ahead of it)
    pub queued: Duration,
    /// each slice of the vision plan in order: an encoder layer each (the
    /// first also holds the patch embedding), the last one the projector
    pub slices: Vec<Duration>,
    /// from the first slice to the end, decode steps of other streams between
    /// the slices included
    pub elapsed: Duration,
}

/// What an encode gives back.
pub(crate) struct Encoded {
    pub embeds: ImageEmbeddings,
    pub taps: Option<Taps>,
    pub stats: EncodeStats,
}

/// One picture to encode, with everyone waiting for it.
pub(crate) struct EncodeJob {
    pub pixels: Vec<f32>,
    /// identical pictures waiting at once are encoded once
    pub key: Option<u128>,
    /// keep the embeddings in the device's memory when the engine runs on one
    pub keep: bool,
    pub capture: bool,
    pub waiters: Vec<Waiter>,
    pub submitted: Instant,
}

pub(crate) struct Waiter {
    pub cancel: Option<CancelToken>,
    pub reply: SyncSender<Result<Encoded>>,
}

impl EncodeJob {
    /// Whether nobody wants the result any more.
    fn abandoned(&self) -> bool {
        self.waiters
            .iter()
            .all(|w| w.cancel.as_ref().is_some_and(|c| c.is_cancelled()))
    }

    fn reply(self, mut result: impl FnMut() -> Result<Encoded>) {
        for w in self.waiters {
            // A waiter that went away needs no answer.
            let _ = w.reply.try_send(result());
        }
    }
}

/// The loop's vision state: the backend, the queue of pictures, and the one
/// being encoded.
pub(crate) struct VisionExec {
    pub backend: Box<dyn Backend>,
    queue: VecDeque<EncodeJob>,
    active: Option<Active>,
    patches: Vec<f32>,
    /// the plan's slices, in order
    slices: Vec<Range<usize>>,
}

struct Active {
    job: EncodeJob,
    next: usize,
    taps: Option<Taps>,
    stats: EncodeStats,
    started: Instant,
}

impl VisionExec {
    pub fn new(backend: Box<dyn Backend>, model: &Model) -> Self {
        let slices = model
            .vision
            .as_ref()
            .map(|v| v.plan.slices().collect())
            .unwrap_or_default();
        VisionExec {
            backend,
            queue: VecDeque::new(),
            active: None,
            patches: Vec::new(),
            slices,
        }
    }

    /// Pictures queued or in progress.
    pub fn pending(&self) -> usize {
        self.queue.len() + self.active.is_some() as usize
    }

    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.active.is_none()
    }

    /// Queues `job`, joining an identical one already waiting or running.
    /// Returns false when it joined another (it takes no queue place of its own).
    pub fn push(&mut self, mut job: EncodeJob) -> bool {
        if let (Some(key), false) = (job.key, job.capture) {
            let same = |j: &EncodeJob| j.key == Some(key) && j.keep == job.keep && !j.capture;
            let target = match self.active.as_mut() {
                Some(a) if same(&a.job) => Some(&mut a.job),
                _ => self.queue.iter_mut().find(|j| same(j)),
            };
            if let Some(t) = target {
                t.waiters.append(&mut job.waiters);
                return false;
            }
        }
        self.queue.push_back(job);
        true
    }

    /// Fails every picture (the engine is stopping).
    pub fn fail_all(&mut self, why: &str) {
        let jobs = self.active.take().map(|a| a.job).into_iter();
        for job in jobs.chain(self.queue.drain(..)) {
            job.reply(|| Err(Error::Other(why.to_string())));
        }
    }

    /// Runs the next slice of the picture in progress (starting the next
    /// picture if none is). Returns the pictures that left the queue (finished,
    /// failed or abandoned), for the queue's count.
    pub fn run_slice(&mut self, model: &Model) -> usize {
        let mut left = 0;
        // Drop abandoned pictures before spending anything on them.
        if self.active.as_ref().is_some_and(|a| a.job.abandoned()) {
            let a = self.active.take().expect("checked");
            a.job
                .reply(|| Err(Error::Cancelled("the picture's encoding".into())));
            left += 1;
        }
        while self.active.is_none() {
            let Some(job) = self.queue.pop_front() else {
                return left;
            };
            if job.abandoned() {
                job.reply(|| Err(Error::Cancelled("the picture's encoding".into())));
                left += 1;
                continue;
            }
            let vision = model.vision.as_ref().expect("jobs are checked at submit");
            patchify(&vision.config, &job.pixels, &mut self.patches);
            let taps = job.capture.then(Taps::default);
            let started = Instant::now();
            let stats = EncodeStats {
                queued: started - job.submitted,
                slices: Vec::with_capacity(self.slices.len()),
                elapsed: Duration::ZERO,
            };
            self.active = Some(Active {
                job,
                next: 0,
                taps,
                stats,
                started,
            });
        }
        let vision = model.vision.as_ref().expect("checked at submit");
        let a = self.active.as_mut().expect("set above");
        let range = self.slices[a.next].clone();
        let cfg = &vision.config;
        let inputs: Vec<Input> = self
            .patches
            .chunks_exact(cfg.patch_len())
            .map(Input::Embedding)
            .collect();
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
        let t = Instant::now();
        let ran = super::scheduler::guard(|| {
            self.backend.execute_ops(
                &vision.plan,
                &vision.weights,
                &step,
                range,
                a.taps.as_mut().map(|t| t as &mut dyn Capture),
            )
        });
        a.next += 1;
        a.stats.slices.push(t.elapsed());
        let result = match ran {
            Err(e) => Err(e),
            Ok(()) if a.next < self.slices.len() => return left,
            Ok(()) => self.output(model),
        };
        let a = self.active.take().expect("set above");
        left += 1;
        match result {
            Ok(embeds) => {
                let mut stats = a.stats;
                stats.elapsed = a.started.elapsed();
                let mut once = Some(a.taps);
                a.job.reply(|| {
                    Ok(Encoded {
                        embeds: embeds.clone(),
                        taps: once.take().flatten(),
                        stats: stats.clone(),
                    })
                });
            }
            Err(e) => {
                let msg = e.to_string();
                a.job
                    .reply(|| Err(Error::Other(format!("encoding a picture failed: {msg}"))));
            }
        }
        left
    }

    fn output(&mut self, model: &Model) -> Result<ImageEmbeddings> {
        let keep = self.active.as_ref().is_some_and(|a| a.job.keep);
        if keep {
            if let Some(rows) = self.backend.keep_output()? {
                return Ok(ImageEmbeddings::Resident(rows));
            }
        }
        let cfg = &model.vision.as_ref().expect("checked at submit").config;
        let mut out = vec![0.0; cfg.num_patches() * cfg.projector_hidden];
        self.backend.read_output(&mut out)?;
        Ok(ImageEmbeddings::Host(Arc::new(out)))
    }
}
