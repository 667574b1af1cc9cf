use std::path::PathBuf;

/// What to do when the hub is out of reach; repeated in every error that can be
/// caused by having no network, because that is when the user needs it.
pub const LOCAL_HINT: &str = "To run without the hub, point --model at an existing .mqf file, \
or at a local Hugging Face checkpoint directory (converted into the cache on first use; \
by hand: `mipha-convert <DIR> -o model.mqf --quant q4_0`). \
HF_ENDPOINT selects a mirror; HF_HUB_OFFLINE=1 uses the cache only.";

const TOKEN_HINT: &str =
    "set HF_TOKEN to a token that can read it (or write the token to $HF_HOME/token)";

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// No HTTP answer at all: DNS failure, connection refused, no route, TLS failure.
    #[error("could not reach the Hugging Face hub at {origin} ({detail}).\n{LOCAL_HINT}")]
    Unreachable { origin: String, detail: String },
    /// The transfer started but kept failing.
    #[error("downloading {url} failed after {tries} tries: {detail}. Run the same command again to resume.")]
    Network {
        url: String,
        tries: u32,
        detail: String,
    },
    #[error(
        "{what} was not found on {endpoint} (HTTP {status}). Check the repository id \
(org/name, e.g. zhumj34/Mipha-3B) and --revision; a private or gated repository also answers \
this way without a token: {TOKEN_HINT}."
    )]
    NotFound {
        what: String,
        endpoint: String,
        status: u16,
    },
    #[error(
        "access to {repo} was refused (HTTP {status}{detail}). If it is gated, accept its \
conditions on its hub page first; then {TOKEN_HINT}."
    )]
    Denied {
        repo: String,
        status: u16,
        detail: String,
    },
    #[error("{url}: unexpected HTTP {status}{detail}")]
    Http {
        url: String,
        status: u16,
        detail: String,
    },
    #[error("{url}: unexpected answer from the hub: {detail}")]
    BadResponse { url: String, detail: String },
    #[error(
        "HF_HUB_OFFLINE is set and {what} is not in the cache ({detail}). Unset HF_HUB_OFFLINE \
to download it.\n{LOCAL_HINT}"
    )]
    Offline { what: String, detail: String },
    #[error("{file}: received {actual} bytes, expected {expected}; the partial download was deleted, run again")]
    SizeMismatch {
        file: String,
        expected: u64,
        actual: u64,
    },
    #[error("{file}: SHA-256 mismatch (expected {expected}, got {actual}); the corrupt download was deleted, run again")]
    HashMismatch {
        file: String,
        expected: String,
        actual: String,
    },
    #[error("{repo} at {commit} is not a Mipha checkpoint in safetensors form: {detail}")]
    NotAModel {
        repo: String,
        commit: String,
        detail: String,
    },
    #[error("`{spec}` {detail}")]
    BadSpec { spec: String, detail: String },
    #[error("no cache directory: set HF_HOME and MIPHA_CACHE (or HOME)")]
    NoCacheDir,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("converting {input}: {source}{hint}")]
    Convert {
        input: PathBuf,
        hint: String,
        // Boxed: the converter's error is large and every other variant is small.
        #[source]
        source: Box<mipha_convert::ConvertError>,
    },
}

impl HubError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        HubError::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = HubError> = std::result::Result<T, E>;
