use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every failure the runtime reports. Messages name the file, tensor, key or
/// sequence involved so a user can act on them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not an `.mqf` file at all (wrong magic); `detail` names what it looks like.
    #[error("{path}: not an .mqf file ({detail})")]
    NotMqf { path: PathBuf, detail: String },
    /// A well-formed `.mqf` file this build cannot read (e.g. a big-endian one).
    #[error("{path}: unsupported .mqf file: {detail}")]
    Unsupported { path: PathBuf, detail: String },
    /// `MqfWriter` was given something it cannot write (duplicate names, bad shapes,
    /// wrong data length, a tensor written twice or not at all, …).
    #[error("{path}: cannot write .mqf file: {detail}")]
    InvalidWrite { path: PathBuf, detail: String },
    #[error("{path}: .mqf version {major}.{minor} is newer than this reader (supports major {supported})")]
    UnsupportedVersion {
        path: PathBuf,
        major: u16,
        minor: u16,
        supported: u16,
    },
    /// Structural damage: truncation, checksum mismatch, offsets out of range, …
    #[error("{path}: corrupt .mqf file: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error(
        "{path}: tensor `{tensor}` has unknown quant type id {id} (written by a newer converter?)"
    )]
    UnknownQuantType {
        path: PathBuf,
        tensor: String,
        id: u32,
    },
    #[error("{path}: tensor `{tensor}` fails its checksum (stored {stored:#018x}, computed {computed:#018x})")]
    TensorChecksum {
        path: PathBuf,
        tensor: String,
        stored: u64,
        computed: u64,
    },
    #[error("missing tensor `{0}`")]
    MissingTensor(String),
    #[error("missing metadata key `{0}`")]
    MissingMetadata(String),
    #[error("metadata key `{key}`: expected {expected}, found {found}")]
    MetadataType {
        key: String,
        expected: &'static str,
        found: String,
    },
    #[error("tensor `{tensor}`: {detail}")]
    Shape { tensor: String, detail: String },
    #[error("invalid model configuration: {0}")]
    Config(String),
    #[error("KV cache full: sequence {seq} needs {needed} more blocks, {free} free of {total}")]
    KvCacheFull {
        seq: u64,
        needed: usize,
        free: usize,
        total: usize,
    },
    #[error("context overflow: {tokens} positions requested, the model's context holds {max}")]
    ContextOverflow { tokens: usize, max: usize },
    /// What a load would hold exceeds the memory budget (checked before
    /// anything is allocated).
    #[error("not enough memory: {0}")]
    OutOfMemory(String),
    /// Text too long for the context whatever it tokenizes to (checked
    /// before tokenizing it).
    #[error(
        "the text is {bytes} bytes, more than the context of {context} positions can hold \
         ({max_bytes} bytes at most)"
    )]
    TextTooLong {
        bytes: usize,
        max_bytes: usize,
        context: usize,
    },
    #[error("unknown sequence id {0}")]
    UnknownSequence(u64),
    /// The engine's request queue is full: try again later.
    #[error("the engine is busy: {waiting} requests are waiting (at most {max})")]
    Busy { waiting: usize, max: usize },
    /// The caller cancelled the work (or its deadline passed) before it finished.
    #[error("cancelled: {0}")]
    Cancelled(String),
    #[error("{0}")]
    Other(String),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
