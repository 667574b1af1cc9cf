//! On-disk layout. Downloads follow the Hugging Face cache convention, so
//! `huggingface_hub` and this tool share files both ways:
//!
//! ```text
//! $HF_HUB_CACHE (= $HF_HOME/hub)/models--{org}--{name}/
//!     blobs/{etag}                  content, named by the hub's ETag (LFS: its SHA-256)
//!     blobs/{etag}.incomplete       a download in progress (resumed with a Range request)
//!     refs/{revision}               the commit a branch or tag resolved to
//!     snapshots/{commit}/{file}     symlink -> ../../blobs/{etag}
//! ```
//!
//! Converted models live apart, because they depend on our quant choice:
//! `$MIPHA_CACHE/{org}--{name}/{commit}-{quant}-{vision_quant}.mqf`, and local
//! checkpoint directories under `$MIPHA_CACHE/local/`.

use std::fs;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::error::{HubError, Result};
use super::RepoId;

pub(crate) struct RepoCache {
    pub root: PathBuf,
}

impl RepoCache {
    pub fn new(hub_cache: &Path, repo: &RepoId) -> Self {
        RepoCache {
            root: hub_cache.join(format!("models--{}--{}", repo.org, repo.name)),
        }
    }

    pub fn blob(&self, name: &str) -> PathBuf {
        self.root.join("blobs").join(name)
    }

    pub fn snapshot(&self, commit: &str) -> PathBuf {
        self.root.join("snapshots").join(commit)
    }

    fn ref_path(&self, revision: &str) -> PathBuf {
        self.root.join("refs").join(revision)
    }

    /// The commit `revision` last resolved to, or `revision` itself when it is a
    /// commit id already.
    pub fn read_ref(&self, revision: &str) -> Option<String> {
        if is_commit(revision) {
            return Some(revision.to_string());
        }
        let text = fs::read_to_string(self.ref_path(revision)).ok()?;
        let commit = text.trim();
        is_commit(commit).then(|| commit.to_string())
    }

    pub fn write_ref(&self, revision: &str, commit: &str) -> Result<()> {
        if revision == commit {
            return Ok(());
        }
        let path = self.ref_path(revision);
        write_atomic(&path, commit.as_bytes())
    }

    /// Points `snapshots/{commit}/{file}` at the blob: a relative symlink like
    /// `huggingface_hub` makes, or a hard link / copy where symlinks are refused.
    pub fn link(&self, commit: &str, file: &str, blob_name: &str) -> Result<()> {
        let dir = self.snapshot(commit);
        fs::create_dir_all(&dir).map_err(|e| HubError::io(&dir, e))?;
        let dst = dir.join(file);
        if dst.symlink_metadata().is_ok() {
            fs::remove_file(&dst).map_err(|e| HubError::io(&dst, e))?;
        }
        let blob = self.blob(blob_name);
        #[cfg(unix)]
        if std::os::unix::fs::symlink(Path::new("../../blobs").join(blob_name), &dst).is_ok() {
            return Ok(());
        }
        if fs::hard_link(&blob, &dst).is_ok() {
            return Ok(());
        }
        fs::copy(&blob, &dst)
            .map(|_| ())
            .map_err(|e| HubError::io(&dst, e))
    }
}

pub(crate) fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

pub(crate) fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A name that is safe as one path component on every platform.
pub(crate) fn is_plain_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes through a temporary sibling and renames, so readers never see half a file.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|e| HubError::io(dir, e))?;
    }
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|s| s.to_str()).unwrap_or("f"),
        std::process::id()
    ));
    fs::write(&tmp, bytes).map_err(|e| HubError::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        HubError::io(path, e)
    })
}

/// Identity of a local checkpoint directory for the conversion cache: names, sizes
/// and modification times of its top-level files (hashing gigabytes of weights on
/// every run would cost more than the conversion is worth caching).
pub(crate) fn local_dir_key(dir: &Path) -> Result<String> {
    let mut entries = Vec::new();
    for e in fs::read_dir(dir).map_err(|e| HubError::io(dir, e))? {
        let e = e.map_err(|e| HubError::io(dir, e))?;
        // Follows symlinks: an HF snapshot directory is made of them.
        let Ok(meta) = fs::metadata(e.path()) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        entries.push(format!(
            "{}\0{}\0{}",
            e.file_name().to_string_lossy(),
            meta.len(),
            mtime
        ));
    }
    entries.sort();
    Ok(sha256_hex(entries.join("\n").as_bytes())[..16].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(is_commit(&"a".repeat(40)));
        assert!(!is_commit("main"));
        assert!(is_plain_name("model-00001-of-00002.safetensors"));
        assert!(!is_plain_name("../x"));
        assert!(!is_plain_name(".gitattributes"));
        assert!(!is_plain_name("a/b"));
        assert!(!is_plain_name(""));
    }

    #[test]
    fn local_key_follows_changes() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("config.json"), b"{}").unwrap();
        let a = local_dir_key(dir.path()).unwrap();
        assert_eq!(a, local_dir_key(dir.path()).unwrap());
        fs::write(dir.path().join("config.json"), b"{ }").unwrap();
        assert_ne!(a, local_dir_key(dir.path()).unwrap());
    }
}
