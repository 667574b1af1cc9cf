//! The five fuzz targets as plain functions of the input bytes, shared by the
//! cargo-fuzz binaries and the replay test. Each returns `Err` with the error
//! text for an input the code refused (expected, and fine); a panic, a hang,
//! an abort or a runaway allocation is the bug being looked for.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use mipha_models::image::{decode_bytes, preprocess, Aspect, DecodeOptions, ImageConfig, Resample};
use mipha_models::{
    ChatTemplate, Engine, EngineOptions, GenerateOptions, KvCacheSize, Message, MiphaTokenizer,
    Part, PromptId, Role, Segment, Turn,
};
use mipha_runtime::{MetaValue, Metadata, MqfFile};

/// The model name the request target's server serves.
pub const SERVED_MODEL: &str = "mipha-fuzz";

/// A folder for the targets' temporary files, on tmpfs when there is one
/// (`/dev/shm`: writes and fsyncs cost nothing there), one per process;
/// folders of processes that are gone are removed when it is made.
pub fn scratch_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        if let Ok(entries) = std::fs::read_dir(&base) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix("mipha-fuzz-") {
                    if !Path::new("/proc").join(pid).exists() {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
        }
        let dir = base.join(format!("mipha-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    })
}

/// Removes this process's scratch folder (the replay test calls it at the end).
pub fn remove_scratch_dir() {
    let _ = std::fs::remove_dir_all(scratch_dir());
}

/// A fresh path in the scratch folder, removed (file or folder) on drop.
pub struct ScratchPath(pub PathBuf);

impl ScratchPath {
    pub fn new(name: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        ScratchPath(scratch_dir().join(format!("{n}-{name}")))
    }
}

impl Drop for ScratchPath {
    fn drop(&mut self) {
        if self.0.is_dir() {
            let _ = std::fs::remove_dir_all(&self.0);
        } else {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Engine options of the `.mqf` target: small enough to load hundreds of files a
/// second.
pub fn engine_options() -> EngineOptions {
    EngineOptions {
        threads: 1,
        kv_cache: KvCacheSize::Mib(8),
        max_batch_tokens: 16,
        max_sequences: 1,
        image_cache: 0,
        ..Default::default()
    }
}

/// (a) A `.mqf` file: the reader on its own (structure, metadata, every tensor's
/// bytes and checksum), then `Engine::load`, and on a file that loads, a short
/// use of everything the metadata configures (tokenizer, template, a picture,
/// two generated tokens).
pub fn mqf(bytes: &[u8]) -> Result<(), String> {
    let file = ScratchPath::new("case.mqf");
    std::fs::write(&file.0, bytes).map_err(err)?;
    if let Ok(f) = MqfFile::open(&file.0) {
        let _ = f.verify();
        for i in 0..f.tensors().len() {
            if let Ok(t) = f.tensor_at(i) {
                let _ = t.row(0);
                let _ = t.row(t.info.rows().saturating_sub(1));
            }
        }
        for (_, v) in f.metadata().iter() {
            let _ = (v.type_name(), v.as_u64(), v.as_i64(), v.as_f64());
        }
    }
    let engine = Engine::load(&file.0, engine_options()).map_err(err)?;
    exercise(&engine)
}

fn exercise(engine: &Engine) -> Result<(), String> {
    let tok = engine.tokenizer();
    let ids = tok.encode("Hi there <|endoftext|> <image>!").map_err(err)?;
    let _ = tok.decode(&ids);
    if let Some(tb) = tok.token_bytes() {
        for &id in &ids {
            let _ = tb.get(id);
        }
        let _ = tb.get(u32::MAX);
    }
    let chat = [Message {
        role: Role::User,
        content: vec![Part::Image, Part::Text("What is it?".into())],
    }];
    if let Ok(segments) = engine.template().render_messages(&chat) {
        let _ = tok.encode_segments(&segments);
    }
    if let Some(cfg) = engine.image_config() {
        let img = mipha_models::image::RgbImage::new(5, 3, (0..45).map(|i| i as u8 * 5).collect())
            .expect("5x3 picture");
        let prepared = preprocess(&img, cfg);
        let _ = engine.encode_image(&prepared.pixels);
    }
    let vocab = engine.config().vocab_size;
    let mut prompt: Vec<u32> = ids
        .into_iter()
        .filter(|&t| (t as usize) < vocab)
        .take(4)
        .collect();
    if prompt.is_empty() {
        prompt.push(0);
    }
    let opts = GenerateOptions {
        max_tokens: 2,
        ignore_eos: true,
        ..Default::default()
    };
    engine.generate(&prompt, &opts, |_, _| true).map_err(err)?;
    Ok(())
}

/// Files a checkpoint bundle may hold, by index.
pub const BUNDLE_FILES: [&str; 12] = [
    "config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// A checkpoint folder as one fuzz input: records of `[file index u8][length
/// u32 LE][bytes]` (the index taken modulo [`BUNDLE_FILES`], a length past the
/// end taken as "the rest"); a later record of a file replaces an earlier one.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Bundle {
    pub files: Vec<(usize, Vec<u8>)>,
}

impl Bundle {
    pub fn decode(mut b: &[u8]) -> Bundle {
        let mut out = Bundle::default();
        while let Some((&idx, rest)) = b.split_first() {
            let (len, rest) = match rest.split_first_chunk::<4>() {
                Some((l, r)) => (u32::from_le_bytes(*l) as usize, r),
                None => (rest.len(), rest),
            };
            let len = len.min(rest.len());
            out.set(idx as usize % BUNDLE_FILES.len(), rest[..len].to_vec());
            b = &rest[len..];
        }
        out
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, bytes) in &self.files {
            out.push(*i as u8);
            out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            out.extend_from_slice(bytes);
        }
        out
    }

    /// From `(file name, bytes)` pairs; names outside [`BUNDLE_FILES`] are left out.
    pub fn from_files(files: &[(String, Vec<u8>)]) -> Bundle {
        let mut out = Bundle::default();
        for (name, bytes) in files {
            if let Some(i) = BUNDLE_FILES.iter().position(|f| f == name) {
                out.set(i, bytes.clone());
            }
        }
        out
    }

    pub fn set(&mut self, idx: usize, bytes: Vec<u8>) {
        match self.files.iter_mut().find(|(i, _)| *i == idx) {
            Some(f) => f.1 = bytes,
            None => self.files.push((idx, bytes)),
        }
    }

    pub fn get(&self, name: &str) -> Option<&[u8]> {
        let idx = BUNDLE_FILES.iter().position(|f| *f == name)?;
        self.files
            .iter()
            .find(|(i, _)| *i == idx)
            .map(|(_, b)| b.as_slice())
    }

    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        for (i, bytes) in &self.files {
            std::fs::write(dir.join(BUNDLE_FILES[*i]), bytes)?;
        }
        Ok(())
    }
}

/// (b) A checkpoint folder through mipha-convert's public API: `config.json`
/// and `preprocessor_config.json` on their own, the safetensors headers and
/// index (`Checkpoint::open`), the tokenizer, then a whole conversion, whose
/// output must be a valid `.mqf` file.
pub fn checkpoint(bytes: &[u8]) -> Result<(), String> {
    use mipha_convert::checkpoint::Checkpoint;
    use mipha_convert::config::{ImageConfig as PreConfig, ModelConfig};
    let bundle = Bundle::decode(bytes);
    let dir = ScratchPath::new("ckpt");
    bundle.write(&dir.0).map_err(err)?;
    let _ = ModelConfig::from_file(&dir.0.join("config.json"));
    if let Ok(pre) = PreConfig::from_file(&dir.0.join("preprocessor_config.json")) {
        let _ = pre.pad_color();
    }
    if let Ok(c) = Checkpoint::open(&dir.0) {
        for t in &c.tensors {
            let _ = (c.get(&t.name), t.numel(), t.end - t.start);
        }
        let _ = c.weight_files();
    }
    let _ = mipha_convert::tokenizer::load_checkpoint_tokenizer(&dir.0);
    let out = dir.0.join("out.mqf");
    let mut opts = mipha_convert::ConvertOptions::new(&dir.0, &out, mipha_convert::QuantType::Q8_0);
    opts.vision_quant = mipha_convert::QuantType::F16;
    mipha_convert::convert_checkpoint(&opts).map_err(err)?;
    let f = MqfFile::open(&out).map_err(|e| format!("the converter wrote a bad file: {e}"))?;
    f.verify()
        .map_err(|e| format!("the converter wrote a bad file: {e}"))?;
    Ok(())
}

/// tiny-a's preprocessing: 42x42, mean = std = 0.5, bicubic, padded to square.
pub fn tiny_a_image_config() -> ImageConfig {
    ImageConfig::new(
        [42, 42],
        [0.5; 3],
        [0.5; 3],
        1.0 / 255.0,
        Resample::Bicubic,
        Aspect::Pad,
        [127; 3],
    )
    .expect("tiny-a image config")
}

/// (c) Picture bytes: `decode_bytes` with the default limits, then the
/// preprocessing to pixels with tiny-a's settings (and with a non-square
/// output, plain resize, Lanczos, for the other resampling paths).
pub fn image(bytes: &[u8]) -> Result<(), String> {
    let d = decode_bytes(bytes, "fuzz input", &DecodeOptions::default()).map_err(err)?;
    let cfg = tiny_a_image_config();
    let p = preprocess(&d.image, &cfg);
    if p.pixels.len() != 3 * 42 * 42 || p.pixels.iter().any(|x| !x.is_finite()) {
        return Err("preprocess returned wrong or non-finite pixels".into());
    }
    let odd = ImageConfig::new(
        [5, 9],
        [0.48, 0.45, 0.4],
        [0.26, 0.26, 0.27],
        1.0 / 255.0,
        Resample::Lanczos,
        Aspect::Square,
        [0; 3],
    )
    .expect("odd image config");
    let _ = preprocess(&d.image, &odd);
    Ok(())
}

/// Role of a message in a chat input (see [`decode_chat`]).
pub const ROLE_SYSTEM: u8 = 0;
pub const ROLE_USER: u8 = 1;
pub const ROLE_ASSISTANT: u8 = 2;
/// Separates messages in a chat input.
pub const MESSAGE_SEP: u8 = 0x1e;
/// Separates the parts of a message.
pub const PART_SEP: u8 = 0x1f;

/// A chat input's messages: (role, parts).
pub type Chat = Vec<(u8, Vec<ChatPart>)>;

/// A part of a message of a chat input.
#[derive(Clone, Debug, PartialEq)]
pub enum ChatPart {
    Text(String),
    Image,
}

/// A chat as bytes: messages separated by 0x1e, each a role byte (low two bits:
/// 0 system, 1 user, 2 assistant, 3 user) then parts separated by 0x1f, an
/// empty part being a picture and any other text (UTF-8, lossily).
pub fn decode_chat(bytes: &[u8]) -> Chat {
    let mut out = Vec::new();
    for m in bytes.split(|&b| b == MESSAGE_SEP) {
        let Some((&role, body)) = m.split_first() else {
            continue;
        };
        let parts = body
            .split(|&b| b == PART_SEP)
            .map(|p| {
                if p.is_empty() {
                    ChatPart::Image
                } else {
                    ChatPart::Text(String::from_utf8_lossy(p).into_owned())
                }
            })
            .collect();
        out.push((role & 3, parts));
    }
    out
}

/// The inverse of [`decode_chat`] (texts must not contain 0x1e or 0x1f).
pub fn encode_chat(chat: &[(u8, Vec<ChatPart>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, (role, parts)) in chat.iter().enumerate() {
        if i > 0 {
            out.push(MESSAGE_SEP);
        }
        out.push(*role);
        for (j, p) in parts.iter().enumerate() {
            if j > 0 {
                out.push(PART_SEP);
            }
            if let ChatPart::Text(t) = p {
                out.extend_from_slice(t.as_bytes());
            }
        }
    }
    out
}

/// The Phi-2 tokenizer as a `.mqf` file carries it (built once per process).
pub fn phi2_tokenizer() -> &'static MiphaTokenizer {
    static TOK: OnceLock<MiphaTokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let mut m = Metadata::new();
        m.insert(
            "tokenizer.huggingface.json",
            MetaValue::Bytes(mipha_convert::tokenizer::REFERENCE_TOKENIZER_JSON.to_vec()),
        );
        m.insert("tokenizer.eos_token_id", MetaValue::U64(50256));
        m.insert("tokenizer.image_token_index", MetaValue::I64(-200));
        MiphaTokenizer::from_metadata(&m).expect("the Phi-2 tokenizer")
    })
}

/// (d) A chat: `ChatTemplate::render_messages` (and `render` on the same chat
/// as turns) with the `phi` template, then `MiphaTokenizer::encode_segments`
/// with the Phi-2 tokenizer; every picture must come out as its own id, in
/// order, and every id must decode.
pub fn chat(bytes: &[u8]) -> Result<(), String> {
    let chat = decode_chat(bytes);
    let template = ChatTemplate::phi();
    let tok = phi2_tokenizer();
    let messages: Vec<Message> = chat
        .iter()
        .map(|(role, parts)| Message {
            role: match *role {
                ROLE_SYSTEM => Role::System,
                ROLE_ASSISTANT => Role::Assistant,
                _ => Role::User,
            },
            content: parts
                .iter()
                .map(|p| match p {
                    ChatPart::Text(t) => Part::Text(t.clone()),
                    ChatPart::Image => Part::Image,
                })
                .collect(),
        })
        .collect();
    // The same chat as turns: user messages open one, an answer closes it.
    let mut turns: Vec<Turn> = Vec::new();
    for (role, parts) in &chat {
        let text: String = parts
            .iter()
            .filter_map(|p| match p {
                ChatPart::Text(t) => Some(t.as_str()),
                ChatPart::Image => None,
            })
            .collect();
        match *role {
            ROLE_SYSTEM => {}
            ROLE_ASSISTANT => match turns.last_mut() {
                Some(t) if t.assistant.is_none() => t.assistant = Some(text),
                _ => {}
            },
            _ => turns.push(Turn {
                user: text,
                images: parts.iter().filter(|p| **p == ChatPart::Image).count(),
                assistant: None,
            }),
        }
    }
    if super::known::SKIP_RENDER_ANSWERED_LAST_TURN {
        if let Some(t) = turns.last_mut() {
            t.assistant = None;
        }
    }
    let rendered = template.render_messages(&messages);
    if !turns.is_empty() {
        let segments = template.render(&turns);
        check_segments(tok, &segments)?;
    }
    let segments = rendered?;
    check_segments(tok, &segments)
}

fn check_segments(tok: &MiphaTokenizer, segments: &[Segment]) -> Result<(), String> {
    let images = segments
        .iter()
        .filter(|s| matches!(s, Segment::Image(_)))
        .count();
    let ids = tok.encode_segments(segments).map_err(err)?;
    let mut next = 0;
    let mut tokens = Vec::new();
    for id in &ids {
        match id {
            PromptId::Image(i) => {
                if *i != next {
                    return Err(format!("picture {i} where {next} was due"));
                }
                next += 1;
            }
            PromptId::Token(t) => tokens.push(*t),
        }
    }
    if next != images {
        return Err(format!("{images} pictures rendered, {next} encoded"));
    }
    let _ = tok.decode(&tokens);
    if let Some(tb) = tok.token_bytes() {
        for &t in &tokens {
            let _ = tb.get(t);
        }
    }
    let _ = tok.to_raw_ids(&ids);
    Ok(())
}

/// The micro model (f32), loaded once per process for the request target.
pub fn micro_engine() -> &'static Arc<Engine> {
    static ENGINE: OnceLock<Arc<Engine>> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let path = scratch_dir().join("micro-engine.mqf");
        std::fs::write(&path, super::seeds::micro_mqf("f32", "f32")).expect("write micro model");
        Arc::new(Engine::load(&path, engine_options()).expect("load the micro model"))
    })
}

/// (e) A chat completion request body: the server's parser
/// (`mipha_server::validation::parse`), then, for a request it accepts, the
/// preparation the server runs before queueing it (render, tokenize, count
/// against the context, decode and encode the pictures) on the micro model.
pub fn request(bytes: &[u8]) -> Result<(), String> {
    let r = mipha_server::validation::parse(bytes, SERVED_MODEL).map_err(|e| e.message)?;
    let engine = micro_engine();
    let cancel = mipha_models::CancelToken::new();
    mipha_server::validation::prepare(&r, engine, &cancel).map_err(|e| e.message)?;
    Ok(())
}

/// The targets by name, in the order the docs list them.
pub const NAMES: [&str; 5] = ["mqf", "checkpoint", "image", "chat", "request"];

/// Runs target `name` on `bytes`.
pub fn run(name: &str, bytes: &[u8]) -> Result<(), String> {
    match name {
        "mqf" => mqf(bytes),
        "checkpoint" => checkpoint(bytes),
        "image" => image(bytes),
        "chat" => chat(bytes),
        "request" => request(bytes),
        other => panic!("no fuzz target `{other}`"),
    }
}
