//! One file from the hub into the blob store: metadata first (size, ETag), then a
//! resumable GET into `{blob}.incomplete`, checked before it is renamed into place.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use sha2::{Digest, Sha256};

use super::cache::{hex, is_plain_name, is_sha256, sha256_hex};
use super::error::{HubError, Result};
use super::http::{header, status_error, Client, Failure, Follow, Method};

const CHUNK: usize = 1 << 20;

/// What the hub says about a file before we download it.
#[derive(Clone, Debug)]
pub(crate) struct FileMeta {
    /// Name of the blob in the store: the hub's ETag when it is a plain name.
    pub blob_name: String,
    pub size: Option<u64>,
    /// LFS files: the hub sends their SHA-256 as the ETag.
    pub sha256: Option<String>,
}

/// The request context shared by every file of one repository.
pub(crate) struct Target<'a> {
    pub client: &'a Client,
    pub repo: &'a str,
    pub commit: &'a str,
}

impl Target<'_> {
    pub fn url(&self, file: &str) -> String {
        format!(
            "{}/{}/resolve/{}/{}",
            self.client.endpoint,
            self.repo,
            self.commit,
            super::http::encode_segment(file)
        )
    }

    /// A HEAD that stops at the first cross-origin redirect: for LFS files that is
    /// the hub's own 302, which carries `X-Linked-Etag`/`X-Linked-Size`.
    pub fn meta(&self, file: &str) -> Result<FileMeta> {
        let url = self.url(file);
        let resp = self.client.retry(&url, || {
            let (_, resp) = self
                .client
                .send(Method::Head, &url, None, Follow::SameOrigin)
                .map_err(|f| (f, false))?;
            let status = resp.status().as_u16();
            if status == 429 || status >= 500 {
                return Err((Failure::Transient(format!("HTTP {status}")), false));
            }
            Ok(resp)
        })?;
        let status = resp.status();
        if !status.is_success() && !status.is_redirection() {
            return Err(status_error(
                &resp,
                &url,
                self.repo,
                &format!("{file} in {}@{}", self.repo, self.commit),
                &self.client.endpoint,
            ));
        }
        let etag = header(&resp, "x-linked-etag")
            .or_else(|| header(&resp, "etag"))
            .map(|t| clean_etag(&t));
        let size = header(&resp, "x-linked-size")
            .or_else(|| header(&resp, "content-length"))
            .and_then(|s| s.parse::<u64>().ok());
        let sha256 = etag
            .as_deref()
            .filter(|t| is_sha256(t))
            .map(str::to_ascii_lowercase);
        let blob_name = match etag {
            Some(t) if is_plain_name(&t) => t,
            // Still a stable name for this commit's file, so a resume finds its partial.
            _ => sha256_hex(format!("{}/{file}", self.commit).as_bytes()),
        };
        Ok(FileMeta {
            blob_name,
            size,
            sha256,
        })
    }

    /// Downloads `file` into `blob`, resuming `{blob}.incomplete` if present.
    pub fn download(
        &self,
        file: &str,
        meta: &FileMeta,
        blob: &Path,
        bar: &ProgressBar,
        total: &ProgressBar,
    ) -> Result<()> {
        let url = self.url(file);
        let partial = partial_path(blob);
        let mut state = Partial {
            path: partial.clone(),
            hasher: meta.sha256.as_ref().map(|_| (Sha256::new(), 0)),
            expected: meta.size,
            counted: 0,
        };
        self.client.retry(&url, || {
            let before = state.len();
            let r = self.attempt(&url, file, &mut state, bar, total);
            let progressed = state.len() > before;
            r.map_err(|f| (f, progressed))
        })?;
        let actual = state.len();
        if let Some(expected) = meta.size.filter(|&n| n != actual) {
            let _ = fs::remove_file(&partial);
            return Err(HubError::SizeMismatch {
                file: file.to_string(),
                expected,
                actual,
            });
        }
        if let Some(expected) = &meta.sha256 {
            let got = state.digest()?;
            if &got != expected {
                let _ = fs::remove_file(&partial);
                return Err(HubError::HashMismatch {
                    file: file.to_string(),
                    expected: expected.clone(),
                    actual: got,
                });
            }
        }
        fs::rename(&partial, blob).map_err(|e| HubError::io(blob, e))
    }

    fn attempt(
        &self,
        url: &str,
        file: &str,
        state: &mut Partial,
        bar: &ProgressBar,
        total: &ProgressBar,
    ) -> std::result::Result<(), Failure> {
        let mut have = state.len();
        if state.expected.is_some_and(|n| have > n) {
            state.reset().map_err(Failure::Fatal)?;
            have = 0;
        }
        if have > 0 && state.expected == Some(have) {
            state.recount(total, have);
            return Ok(());
        }
        let (final_url, resp) = self
            .client
            .send(Method::Get, url, Some(have), Follow::All)?;
        let status = resp.status().as_u16();
        match status {
            206 => {
                let start = header(&resp, "content-range").and_then(|r| content_range_start(&r));
                if start != Some(have) {
                    // Not the bytes we asked for: start over rather than splice.
                    state.reset().map_err(Failure::Fatal)?;
                    return Err(Failure::Transient(format!(
                        "{final_url}: the server answered a resume from byte {have} with another range"
                    )));
                }
            }
            200 => {
                // The server ignored the Range header: the body is the whole file.
                if have > 0 {
                    state.reset().map_err(Failure::Fatal)?;
                    have = 0;
                }
                if state.expected.is_none() {
                    state.expected =
                        header(&resp, "content-length").and_then(|s| s.parse::<u64>().ok());
                }
            }
            416 => {
                state.reset().map_err(Failure::Fatal)?;
                return Err(Failure::Transient(format!(
                    "{final_url}: range from byte {have} not satisfiable; restarting"
                )));
            }
            429 | 500.. => return Err(Failure::Transient(format!("{final_url}: HTTP {status}"))),
            _ => {
                let what = format!("{file} in {}@{}", self.repo, self.commit);
                return Err(Failure::Fatal(status_error(
                    &resp,
                    &final_url,
                    self.repo,
                    &what,
                    &self.client.endpoint,
                )));
            }
        }
        bar.set_position(have);
        state.recount(total, have);
        let mut out = state.open_append().map_err(Failure::Fatal)?;
        let mut body = resp.into_body().into_reader();
        let mut buf = vec![0u8; CHUNK];
        let mut written = have;
        loop {
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    out.flush()
                        .map_err(|e| Failure::Fatal(HubError::io(&state.path, e)))?;
                    return Err(Failure::Transient(format!(
                        "{final_url}: connection lost after {written} bytes: {e}"
                    )));
                }
            };
            out.write_all(&buf[..n])
                .map_err(|e| Failure::Fatal(HubError::io(&state.path, e)))?;
            if let Some((h, len)) = &mut state.hasher {
                h.update(&buf[..n]);
                *len += n as u64;
            }
            written += n as u64;
            state.counted = written;
            bar.inc(n as u64);
            total.inc(n as u64);
            // A server that keeps sending past the announced size is wrong, not slow.
            if state.expected.is_some_and(|e| written > e) {
                break;
            }
        }
        out.flush()
            .map_err(|e| Failure::Fatal(HubError::io(&state.path, e)))?;
        if state.expected.is_some_and(|e| written < e) {
            // Closed early without an error (no Content-Length): resume from here.
            return Err(Failure::Transient(format!(
                "{final_url}: connection closed after {written} bytes"
            )));
        }
        Ok(())
    }
}

pub(crate) fn partial_path(blob: &Path) -> PathBuf {
    let mut s = blob.as_os_str().to_owned();
    s.push(".incomplete");
    PathBuf::from(s)
}

/// The partial file and a running hash of its bytes, so that a resumed download
/// does not have to read the part it already has again.
struct Partial {
    path: PathBuf,
    /// The hash of the first `.1` bytes of the file; `None` when not checked.
    hasher: Option<(Sha256, u64)>,
    expected: Option<u64>,
    /// Bytes of this file already counted on the overall progress bar.
    counted: u64,
}

impl Partial {
    fn len(&self) -> u64 {
        fs::metadata(&self.path).map_or(0, |m| m.len())
    }

    /// The overall bar counts what is on disk: bytes kept from an earlier run
    /// count, bytes thrown away by a restart no longer do.
    fn recount(&mut self, total: &ProgressBar, have: u64) {
        total.set_position((total.position() + have).saturating_sub(self.counted));
        self.counted = have;
    }

    fn reset(&mut self) -> Result<()> {
        if let Some(h) = &mut self.hasher {
            *h = (Sha256::new(), 0);
        }
        match fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(HubError::io(&self.path, e)),
            _ => Ok(()),
        }
    }

    /// Opens for appending, first catching the running hash up with the file (the
    /// file was left by an earlier run, or a failed write left the two apart).
    fn open_append(&mut self) -> Result<BufWriter<File>> {
        let len = self.len();
        if let Some((h, hashed)) = &mut self.hasher {
            if *hashed != len {
                *h = Sha256::new();
                *hashed = 0;
                let mut f = File::open(&self.path).map_err(|e| HubError::io(&self.path, e))?;
                let mut buf = vec![0u8; CHUNK];
                loop {
                    let n = f.read(&mut buf).map_err(|e| HubError::io(&self.path, e))?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                    *hashed += n as u64;
                }
            }
        }
        if let Some(dir) = self.path.parent() {
            fs::create_dir_all(dir).map_err(|e| HubError::io(dir, e))?;
        }
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| HubError::io(&self.path, e))?;
        Ok(BufWriter::with_capacity(CHUNK, f))
    }

    fn digest(&mut self) -> Result<String> {
        let len = self.len();
        match &self.hasher {
            Some((h, hashed)) if *hashed == len => Ok(hex(&h.clone().finalize())),
            _ => file_sha256(&self.path),
        }
    }
}

pub(crate) fn file_sha256(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(|e| HubError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = f.read(&mut buf).map_err(|e| HubError::io(path, e))?;
        if n == 0 {
            return Ok(hex(&h.finalize()));
        }
        h.update(&buf[..n]);
    }
}

/// `W/"abc"` -> `abc`.
fn clean_etag(t: &str) -> String {
    t.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string()
}

/// `bytes 100-199/1000` -> 100.
fn content_range_start(r: &str) -> Option<u64> {
    let rest = r.trim().strip_prefix("bytes")?.trim_start();
    rest.split('-').next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_and_ranges() {
        assert_eq!(clean_etag("W/\"abc\""), "abc");
        assert_eq!(clean_etag("\"abc\""), "abc");
        assert_eq!(content_range_start("bytes 100-199/1000"), Some(100));
        assert_eq!(content_range_start("bytes */1000"), None);
    }
}
