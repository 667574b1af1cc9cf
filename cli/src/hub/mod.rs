//! Models from the Hugging Face hub: `mipha-cli pull org/name` and `--model org/name`.
//!
//! A pull lists the repository at a revision (`GET {endpoint}/api/models/{repo}/revision/{rev}`),
//! downloads the files the converter reads into the Hugging Face cache layout (see
//! [`cache`]), resuming interrupted downloads and checking sizes and LFS SHA-256s,
//! then converts the snapshot to a cached `.mqf`. Once that file exists, resolving the
//! same repository and revision needs no network at all.
//!
//! Environment (read by [`HubOptions::from_env`], as `huggingface_hub` reads it):
//! `HF_ENDPOINT` (default `https://huggingface.co`), `HF_HOME` (default
//! `$XDG_CACHE_HOME/huggingface` or `~/.cache/huggingface`), `HF_HUB_CACHE` (default
//! `$HF_HOME/hub`), `HF_TOKEN` (else the file `$HF_TOKEN_PATH` or `$HF_HOME/token`),
//! `HF_HUB_OFFLINE=1`, and ours, `MIPHA_CACHE` (default `$XDG_CACHE_HOME/mipha` or
//! `~/.cache/mipha`).
//!
//! Two pulls of one repository at the same time are not coordinated: they would
//! write the same partial files. Run one at a time.

mod cache;
mod download;
mod error;
mod http;

use std::collections::HashSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use mipha_convert::{convert_checkpoint, ConvertOptions, QuantType};
use serde::Deserialize;

use cache::{is_commit, is_plain_name, RepoCache};
use download::{file_sha256, Target};
pub use error::{HubError, Result};
use http::{status_error, Client};

pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Everything a pull or a model lookup depends on. [`HubOptions::from_env`] gives the
/// defaults; tests and callers may set any field directly.
#[derive(Clone, Debug)]
pub struct HubOptions {
    /// The hub's base URL, e.g. `https://huggingface.co` or a mirror.
    pub endpoint: String,
    /// The Hugging Face download cache (`.../huggingface/hub`).
    pub hub_cache: PathBuf,
    /// Where converted `.mqf` files are kept.
    pub mipha_cache: PathBuf,
    /// Sent as `Authorization: Bearer` to the endpoint's host only.
    pub token: Option<String>,
    /// Use the caches only; never touch the network.
    pub offline: bool,
    /// Branch, tag or commit; `org/name@rev` overrides it.
    pub revision: String,
    /// Language model, embeddings and lm_head.
    pub quant: QuantType,
    /// Vision tower and projector.
    pub vision_quant: QuantType,
    /// Ask the hub again, re-check every cached file against its size and SHA-256
    /// (re-downloading what fails), and convert again.
    pub force: bool,
    /// Progress bars on stderr (drawn only when it is a terminal).
    pub progress: bool,
    /// Attempts per request before giving up (failures in a row without progress).
    pub tries: u32,
    /// The first backoff; doubled after each further failure.
    pub retry_delay: Duration,
    pub connect_timeout: Duration,
    /// Longest wait for any single read from the network.
    pub read_timeout: Duration,
}

impl HubOptions {
    /// The defaults, with the locations and credentials from the environment.
    pub fn from_env() -> Result<Self> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let home = var("HOME")
            .or_else(|| var("USERPROFILE"))
            .map(PathBuf::from);
        let xdg_cache = var("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".cache")));
        let hf_home = var("HF_HOME")
            .map(PathBuf::from)
            .or_else(|| xdg_cache.as_ref().map(|c| c.join("huggingface")))
            .ok_or(HubError::NoCacheDir)?;
        let hub_cache = var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let mipha_cache = var("MIPHA_CACHE")
            .map(PathBuf::from)
            .or_else(|| xdg_cache.as_ref().map(|c| c.join("mipha")))
            .ok_or(HubError::NoCacheDir)?;
        let token_file = var("HF_TOKEN_PATH")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("token"));
        let token = var("HF_TOKEN").or_else(|| {
            std::fs::read_to_string(token_file)
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        });
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        });
        Ok(HubOptions {
            endpoint: var("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string()),
            hub_cache,
            mipha_cache,
            token: token.map(|t| t.trim().to_string()),
            offline,
            revision: "main".to_string(),
            quant: QuantType::Q4_0,
            vision_quant: QuantType::Q8_0,
            force: false,
            progress: true,
            tries: 3,
            retry_delay: Duration::from_millis(500),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
        })
    }
}

/// `org/name` as the hub spells it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoId {
    pub org: String,
    pub name: String,
}

impl RepoId {
    /// Accepts `org/name` (the hub's rules: letters, digits, `-`, `_`, `.`; no `--`
    /// or `..`, which the cache layout and URLs could not tell apart).
    pub fn parse(s: &str) -> Option<RepoId> {
        let (org, name) = s.split_once('/')?;
        let ok = |p: &str| {
            !p.is_empty()
                && p.len() <= 96
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
                && !p.starts_with(['-', '.'])
                && !p.ends_with(['-', '.'])
                && !p.contains("--")
                && !p.contains("..")
        };
        (ok(org) && ok(name)).then(|| RepoId {
            org: org.to_string(),
            name: name.to_string(),
        })
    }
}

impl std::fmt::Display for RepoId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.org, self.name)
    }
}

/// Splits `org/name[@revision]`.
fn parse_repo_spec(spec: &str) -> Option<(RepoId, Option<String>)> {
    let (repo, rev) = match spec.split_once('@') {
        Some((r, v)) => (r, Some(v.to_string())),
        None => (spec, None),
    };
    Some((RepoId::parse(repo)?, rev))
}

/// A revision is used in URLs (encoded) and as a path under `refs/`.
fn check_revision(rev: &str) -> Result<()> {
    let ok = !rev.is_empty()
        && rev.len() <= 256
        && rev
            .split('/')
            .all(|p| !p.is_empty() && p != "." && p != "..")
        && !rev.bytes().any(|b| b.is_ascii_control() || b == b'\\');
    if ok {
        Ok(())
    } else {
        Err(HubError::BadSpec {
            spec: rev.to_string(),
            detail: "is not a valid revision (a branch, tag or commit id)".into(),
        })
    }
}

/// Turns `--model` into a `.mqf` path:
/// * an existing file: itself (the engine checks it when loading);
/// * an existing directory: a Hugging Face checkpoint, converted once into
///   `$MIPHA_CACHE/local/{dir name}-{key}-{quant}-{vision_quant}.mqf`, where `key`
///   hashes the names, sizes and modification times of its files, so editing or
///   replacing a file converts again;
/// * `org/name` or `org/name@revision`: the cached conversion of that repository,
///   pulled on first use ([`pull`]).
pub fn resolve_model(spec: &str, opts: &HubOptions) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if path.is_dir() {
        return convert_local_dir(path, opts);
    }
    let looks_like_path = spec.starts_with(['.', '/', '~', '\\'])
        || [".mqf", ".safetensors", ".gguf", ".bin"]
            .iter()
            .any(|ext| spec.ends_with(ext));
    if !looks_like_path && parse_repo_spec(spec).is_some() {
        return pull(spec, opts);
    }
    Err(HubError::BadSpec {
        spec: spec.to_string(),
        detail: "is neither an existing .mqf file, nor a checkpoint directory, nor a Hugging Face \
repository id (org/name, e.g. zhumj34/Mipha-3B)"
            .into(),
    })
}

fn quant_suffix(opts: &HubOptions) -> String {
    format!("{}-{}", opts.quant.name(), opts.vision_quant.name())
}

fn convert_local_dir(dir: &Path, opts: &HubOptions) -> Result<PathBuf> {
    let key = cache::local_dir_key(dir)?;
    let stem: String = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "checkpoint".into())
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let out = opts
        .mipha_cache
        .join("local")
        .join(format!("{stem}-{key}-{}.mqf", quant_suffix(opts)));
    if out.is_file() && !opts.force {
        return Ok(out);
    }
    convert(dir, &out, opts, "")?;
    Ok(out)
}

fn convert(input: &Path, out: &Path, opts: &HubOptions, hint: &str) -> Result<()> {
    if let Some(d) = out.parent() {
        std::fs::create_dir_all(d).map_err(|e| HubError::io(d, e))?;
    }
    eprintln!(
        "converting {} to {} ({} language model, {} vision)",
        input.display(),
        out.display(),
        opts.quant,
        opts.vision_quant
    );
    let mut c = ConvertOptions::new(input, out, opts.quant);
    c.vision_quant = opts.vision_quant;
    c.progress = opts.progress;
    let report = convert_checkpoint(&c).map_err(|source| HubError::Convert {
        input: input.to_path_buf(),
        hint: hint.to_string(),
        source: Box::new(source),
    })?;
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    Ok(())
}

#[derive(Deserialize)]
struct ModelInfo {
    sha: Option<String>,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
struct Sibling {
    rfilename: String,
}

/// The files the converter reads: configs and tokenizer files (all `.json` but the
/// training log), `merges.txt`, and the safetensors weights. Training state,
/// pickles and subfolders are never fetched.
fn wanted(file: &str) -> bool {
    is_plain_name(file)
        && file != "trainer_state.json"
        && (file.ends_with(".json") || file.ends_with(".safetensors") || file == "merges.txt")
}

/// Downloads and converts `org/name[@revision]` unless cached; returns the `.mqf`.
pub fn pull(spec: &str, opts: &HubOptions) -> Result<PathBuf> {
    let Some((repo, rev)) = parse_repo_spec(spec) else {
        return Err(HubError::BadSpec {
            spec: spec.to_string(),
            detail: "is not a Hugging Face repository id (org/name, e.g. zhumj34/Mipha-3B)".into(),
        });
    };
    let revision = rev.unwrap_or_else(|| opts.revision.clone());
    check_revision(&revision)?;
    let repo_cache = RepoCache::new(&opts.hub_cache, &repo);
    let mqf_for = |commit: &str| {
        opts.mipha_cache
            .join(format!("{}--{}", repo.org, repo.name))
            .join(format!("{commit}-{}.mqf", quant_suffix(opts)))
    };

    let cached = repo_cache.read_ref(&revision);
    // Converts the snapshot the ref points at, when there is one to convert.
    let from_snapshot = || -> Option<Result<PathBuf>> {
        let commit = cached.as_deref()?;
        let snap = repo_cache.snapshot(commit);
        if !snap.join("config.json").is_file() {
            return None;
        }
        let out = mqf_for(commit);
        let hint = format!(" (the cached snapshot may be incomplete: pull {repo} again online)");
        Some(convert(&snap, &out, opts, &hint).map(|()| out))
    };
    if let Some(commit) = &cached {
        let out = mqf_for(commit);
        if out.is_file() && !opts.force {
            return Ok(out);
        }
    }
    if opts.offline {
        return from_snapshot().unwrap_or_else(|| {
            Err(HubError::Offline {
                what: format!("{repo}@{revision}"),
                detail: format!("nothing under {}", repo_cache.root.display()),
            })
        });
    }

    let client = Client::new(opts);
    let api = format!(
        "{}/api/models/{repo}/revision/{}",
        client.endpoint,
        http::encode_segment(&revision)
    );
    let (resp, body) = match client.get_json(&api) {
        Ok(r) => r,
        // Like huggingface_hub: without the hub, what the cache holds will do.
        Err(HubError::Unreachable { origin, detail }) => match from_snapshot() {
            Some(r) => {
                eprintln!(
                    "warning: could not reach {origin} ({detail}); using the cached snapshot of {repo}@{revision}"
                );
                return r;
            }
            None => return Err(HubError::Unreachable { origin, detail }),
        },
        Err(e) => return Err(e),
    };
    if !resp.status().is_success() {
        return Err(status_error(
            &resp,
            &api,
            &repo.to_string(),
            &format!("{repo}@{revision}"),
            &client.endpoint,
        ));
    }
    let info: ModelInfo = serde_json::from_str(&body).map_err(|e| HubError::BadResponse {
        url: api.clone(),
        detail: format!("invalid model info JSON: {e}"),
    })?;
    let commit = match info.sha {
        Some(s) if is_commit(&s) => s.to_ascii_lowercase(),
        other => {
            return Err(HubError::BadResponse {
                url: api,
                detail: format!("no commit id (`sha`) in the model info: {other:?}"),
            })
        }
    };
    repo_cache.write_ref(&revision, &commit)?;
    let out = mqf_for(&commit);
    if out.is_file() && !opts.force {
        return Ok(out);
    }

    let mut seen = HashSet::new();
    let files: Vec<String> = info
        .siblings
        .into_iter()
        .map(|s| s.rfilename)
        .filter(|f| wanted(f) && seen.insert(f.clone()))
        .collect();
    let not_a_model = |detail: &str| HubError::NotAModel {
        repo: repo.to_string(),
        commit: commit.clone(),
        detail: detail.to_string(),
    };
    if !files.iter().any(|f| f == "config.json") {
        return Err(not_a_model("it has no config.json"));
    }
    if !files.iter().any(|f| f.ends_with(".safetensors")) {
        return Err(not_a_model(
            "it has no .safetensors weights (PyTorch .bin checkpoints are not read)",
        ));
    }

    fetch(&client, &repo, &commit, &files, &repo_cache, opts)?;
    convert(&repo_cache.snapshot(&commit), &out, opts, "")?;
    Ok(out)
}

/// Brings every file of `files` into `snapshots/{commit}/`.
fn fetch(
    client: &Client,
    repo: &RepoId,
    commit: &str,
    files: &[String],
    repo_cache: &RepoCache,
    opts: &HubOptions,
) -> Result<()> {
    let repo_str = repo.to_string();
    let target = Target {
        client,
        repo: &repo_str,
        commit,
    };
    let snap = repo_cache.snapshot(commit);
    // Metadata first, so a missing file or refused access shows before gigabytes
    // move, and the overall bar knows its total.
    let mut todo = Vec::new();
    for f in files {
        // A commit's files never change, so a file already in its snapshot is done.
        if !opts.force && snap.join(f).is_file() {
            continue;
        }
        let meta = target.meta(f)?;
        let blob = repo_cache.blob(&meta.blob_name);
        if blob.is_file() && blob_ok(&blob, &meta, opts.force)? {
            repo_cache.link(commit, f, &meta.blob_name)?;
            continue;
        }
        todo.push((f, meta, blob));
    }
    if todo.is_empty() {
        return Ok(());
    }
    let bytes: u64 = todo.iter().filter_map(|(_, m, _)| m.size).sum();
    eprintln!(
        "downloading {} file(s), {:.1} MiB, from {repo}@{} into {}",
        todo.len(),
        bytes as f64 / (1024.0 * 1024.0),
        &commit[..12],
        repo_cache.root.display()
    );
    let bars = MultiProgress::with_draw_target(ProgressDrawTarget::hidden());
    if opts.progress && std::io::stderr().is_terminal() {
        bars.set_draw_target(ProgressDrawTarget::stderr());
    }
    let total = bars.add(bar(bytes, "total"));
    for (f, meta, blob) in &todo {
        let pb = bars.add(bar(meta.size.unwrap_or(0), ""));
        pb.set_message(f.to_string());
        target.download(f, meta, blob, &pb, &total)?;
        pb.finish_and_clear();
        bars.remove(&pb);
        repo_cache.link(commit, f, &meta.blob_name)?;
    }
    total.finish_and_clear();
    Ok(())
}

/// A blob already in the store: normally trusted (it was checked when it landed);
/// under `--force` checked again, and deleted if it fails.
fn blob_ok(blob: &Path, meta: &download::FileMeta, force: bool) -> Result<bool> {
    let len = std::fs::metadata(blob)
        .map_err(|e| HubError::io(blob, e))?
        .len();
    let mut ok = meta.size.is_none_or(|n| n == len);
    if ok && force {
        if let Some(expected) = &meta.sha256 {
            ok = &file_sha256(blob)? == expected;
        }
    }
    if !ok {
        eprintln!(
            "{}: does not match the hub's size or SHA-256; downloading it again",
            blob.display()
        );
        std::fs::remove_file(blob).map_err(|e| HubError::io(blob, e))?;
    }
    Ok(ok)
}

fn bar(total: u64, prefix: &'static str) -> ProgressBar {
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix:>5} [{bar:32}] {binary_bytes}/{binary_total_bytes} ({binary_bytes_per_sec}, {eta}) {msg}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    pb.set_prefix(prefix);
    pb
}

fn parse_quant(s: &str) -> std::result::Result<QuantType, String> {
    QuantType::from_name(s).ok_or_else(|| {
        let names: Vec<_> = QuantType::ALL.iter().map(|q| q.name()).collect();
        format!("unknown quant type `{s}` (one of: {})", names.join(", "))
    })
}

#[derive(clap::Args)]
pub struct PullArgs {
    /// Hugging Face repository id, e.g. zhumj34/Mipha-3B (`@REV` picks a revision);
    /// a local checkpoint directory is converted into the cache the same way.
    #[arg(value_name = "REPO_ID")]
    repo: String,
    /// Branch, tag or commit.
    #[arg(long, default_value = "main")]
    revision: String,
    /// Storage type of the language model (f32 f16 bf16 q8_0 q4_0).
    #[arg(long, default_value = "q4_0", value_parser = parse_quant)]
    quant: QuantType,
    /// Storage type of the vision tower and projector.
    #[arg(long, default_value = "q8_0", value_parser = parse_quant)]
    vision_quant: QuantType,
    /// Ask the hub again, re-check cached files (size and SHA-256) and convert again.
    #[arg(long)]
    force: bool,
}

/// `mipha-cli pull`: prints the path of the cached `.mqf` on stdout.
pub fn pull_command(a: PullArgs) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let mut opts = HubOptions::from_env()?;
    opts.revision = a.revision;
    opts.quant = a.quant;
    opts.vision_quant = a.vision_quant;
    opts.force = a.force;
    let path = resolve_model(&a.repo, &opts)?;
    println!("{}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        let r = RepoId::parse("zhumj34/Mipha-3B").unwrap();
        assert_eq!((r.org.as_str(), r.name.as_str()), ("zhumj34", "Mipha-3B"));
        for bad in [
            "a", "a/b/c", "/b", "a/", "a--b/c", "a/b..c", "a b/c", ".a/b", "a/-b",
        ] {
            assert!(RepoId::parse(bad).is_none(), "{bad}");
        }
        let (r, rev) = parse_repo_spec("org/name@refs/pr/1").unwrap();
        assert_eq!(r.to_string(), "org/name");
        assert_eq!(rev.as_deref(), Some("refs/pr/1"));
    }

    #[test]
    fn revisions() {
        assert!(check_revision("main").is_ok());
        assert!(check_revision("refs/pr/1").is_ok());
        for bad in ["", "../x", "a/../b", "/x", "a\\b"] {
            assert!(check_revision(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn wanted_files() {
        for f in [
            "config.json",
            "model-00001-of-00002.safetensors",
            "model.safetensors.index.json",
            "merges.txt",
            "vocab.json",
            "tokenizer.json",
            "added_tokens.json",
        ] {
            assert!(wanted(f), "{f}");
        }
        for f in [
            "trainer_state.json",
            "training_args.bin",
            "pytorch_model.bin",
            "README.md",
            ".gitattributes",
            "onnx/model.safetensors",
            "../config.json",
        ] {
            assert!(!wanted(f), "{f}");
        }
    }

    #[test]
    fn specs_that_are_not_repos() {
        let opts = HubOptions {
            offline: true,
            hub_cache: PathBuf::from("/nonexistent/hub"),
            mipha_cache: PathBuf::from("/nonexistent/mipha"),
            ..HubOptions::from_env().unwrap()
        };
        for spec in ["models/missing.mqf", "./a/b", "justaname"] {
            match resolve_model(spec, &opts) {
                Err(HubError::BadSpec { .. }) => {}
                other => panic!("{spec}: {other:?}"),
            }
        }
    }
}
