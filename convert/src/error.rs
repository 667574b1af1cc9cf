use std::path::PathBuf;

/// Every failure of conversion, synthesis, inspection and verification. Each message
/// names the file, tensor or key involved so that a user can act on it.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{dir}: no config.json (is this a Hugging Face checkpoint folder?)")]
    MissingConfig { dir: PathBuf },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A key is absent, null, or of the wrong type. `key` is the dotted path inside the file.
    #[error("{path}: key `{key}` {problem}")]
    ConfigKey {
        path: PathBuf,
        key: String,
        problem: String,
    },
    #[error("{path}: {detail}")]
    Unsupported { path: PathBuf, detail: String },
    #[error("{dir}: no weights (neither model.safetensors nor model.safetensors.index.json)")]
    NoWeights { dir: PathBuf },
    #[error("{index}: shard `{shard}` (holding `{tensor}`) does not exist")]
    MissingShard {
        index: PathBuf,
        shard: String,
        tensor: String,
    },
    #[error("{index}: `{tensor}` is mapped to `{shard}`, but that file does not contain it")]
    TensorNotInShard {
        index: PathBuf,
        shard: String,
        tensor: String,
    },
    #[error("{path}: not a valid safetensors file: {detail}")]
    Safetensors { path: PathBuf, detail: String },
    #[error("{path}: truncated: tensor `{tensor}` ends at byte {needed}, the file has {actual}")]
    Truncated {
        path: PathBuf,
        tensor: String,
        needed: u64,
        actual: u64,
    },
    #[error("{path}: tensor `{tensor}` has dtype {dtype}; only F32, F16 and BF16 are supported")]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error("tensor `{tensor}` has shape {found:?}, the config implies {expected:?}")]
    UnexpectedShape {
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("the checkpoint has no tensor `{tensor}`, which the config requires")]
    MissingTensor { tensor: String },
    #[error("{path}: tensor `{tensor}` is not part of the mipha-phi architecture (unsupported model variant?)")]
    UnexpectedTensor { path: PathBuf, tensor: String },
    #[error("{path}: tensor `{tensor}` holds a non-finite value (NaN or infinity)")]
    NonFinite { path: PathBuf, tensor: String },
    #[error("tokenizer ({path}): {detail}")]
    Tokenizer { path: PathBuf, detail: String },
    #[error(transparent)]
    Mqf(#[from] mipha_runtime::Error),
    /// Conversion stopped before `finish`; the destination was not touched.
    #[error("conversion interrupted after {written} tensors; no output was written")]
    Interrupted { written: usize },
}

impl ConvertError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ConvertError::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = ConvertError> = std::result::Result<T, E>;
