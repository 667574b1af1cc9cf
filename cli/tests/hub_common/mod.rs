//! A loopback stand-in for the Hugging Face hub, serving the tiny-a checkpoint in the
//! hub's URL layout, and a runner for `mipha-cli` with an isolated cache.
//!
//! The server is a minimal HTTP/1.1 responder on 127.0.0.1: one request per
//! connection (`Connection: close`), a thread per connection, and it stops when
//! dropped or after two minutes, whichever is first.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub const REPO: &str = "test-org/tiny-mipha";
pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
pub const SHARD1: &str = "model-00001-of-00002.safetensors";
pub const SHARD2: &str = "model-00002-of-00002.safetensors";
/// Listed by the hub but never needed: must not be requested.
pub const UNWANTED: [&str; 4] = [
    "trainer_state.json",
    "training_args.bin",
    "README.md",
    ".gitattributes",
];

pub fn fixture_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/tiny-a/checkpoint"
    ))
}

pub fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

#[derive(Clone, Debug)]
pub struct Req {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl Req {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn is_get_of(&self, file: &str) -> bool {
        self.method == "GET" && self.path.ends_with(&format!("/{file}"))
    }
}

/// How the server misbehaves.
#[derive(Clone, Default)]
pub struct Behaviour {
    /// file -> how many more GETs of it are cut short: a plain GET gets half the
    /// body, a Range GET none, then the connection closes.
    pub cut: HashMap<String, usize>,
    /// GETs of this file return other bytes of the right length.
    pub corrupt: Option<String>,
    /// Send LFS files (`*.safetensors`) to this base URL with a 302, as the hub
    /// sends them to its CDN.
    pub cdn: Option<String>,
    /// Answer the API with this status (and the hub's `X-Error-Code`).
    pub api_status: Option<u16>,
    /// Refuse requests outside `/cdn/` without `Authorization: Bearer {token}`.
    pub require_token: Option<String>,
    /// Answer Range requests with the whole file (200), as some servers do.
    pub ignore_range: bool,
    /// Answer this many requests with 503 before behaving.
    pub unavailable: usize,
}

struct Shared {
    files: HashMap<String, Vec<u8>>,
    log: Mutex<Vec<Req>>,
    behaviour: Mutex<Behaviour>,
}

pub struct HubServer {
    pub endpoint: String,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HubServer {
    pub fn start(behaviour: Behaviour) -> HubServer {
        let mut files = HashMap::new();
        for e in std::fs::read_dir(fixture_dir()).unwrap() {
            let e = e.unwrap();
            files.insert(
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            );
        }
        for f in UNWANTED {
            files.insert(f.to_string(), b"not for inference".to_vec());
        }
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let shared = Arc::new(Shared {
            files,
            log: Mutex::new(Vec::new()),
            behaviour: Mutex::new(behaviour),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (shared.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut conns = Vec::new();
            while !st.load(Ordering::Relaxed) && Instant::now() < deadline && conns.len() < 500 {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let s = s.clone();
                        conns.push(std::thread::spawn(move || handle(stream, &s)));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            for c in conns {
                let _ = c.join();
            }
        });
        HubServer {
            endpoint,
            shared,
            stop,
            thread: Some(thread),
        }
    }

    pub fn requests(&self) -> Vec<Req> {
        self.shared.log.lock().unwrap().clone()
    }

    pub fn file(&self, name: &str) -> Vec<u8> {
        self.shared.files[name].clone()
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn handle(stream: TcpStream, s: &Shared) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.set_nonblocking(false);
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return;
    };
    let mut headers = Vec::new();
    for _ in 0..100 {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let req = Req {
        method: method.to_string(),
        path: target.split('?').next().unwrap_or("").to_string(),
        headers,
    };
    s.log.lock().unwrap().push(req.clone());
    let mut out = stream;
    respond(&req, s, &mut out);
    let _ = out.flush();
    let _ = out.shutdown(Shutdown::Both);
}

fn head(out: &mut TcpStream, status: u16, headers: &[(&str, String)]) {
    let reason = match status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        503 => "Service Unavailable",
        _ => "Other",
    };
    let mut h = format!("HTTP/1.1 {status} {reason}\r\nConnection: close\r\n");
    for (k, v) in headers {
        h.push_str(&format!("{k}: {v}\r\n"));
    }
    h.push_str("\r\n");
    let _ = out.write_all(h.as_bytes());
}

fn simple(out: &mut TcpStream, status: u16, extra: &[(&str, String)], body: &[u8], is_head: bool) {
    let mut headers = extra.to_vec();
    headers.push(("Content-Length", body.len().to_string()));
    head(out, status, &headers);
    if !is_head {
        let _ = out.write_all(body);
    }
}

fn respond(req: &Req, s: &Shared, out: &mut TcpStream) {
    let b = {
        let mut bh = s.behaviour.lock().unwrap();
        let b = bh.clone();
        bh.unavailable = bh.unavailable.saturating_sub(1);
        b
    };
    let is_head = req.method == "HEAD";
    if b.unavailable > 0 {
        return simple(out, 503, &[], b"busy", is_head);
    }
    let path = req.path.as_str();
    let is_cdn = path.starts_with("/cdn/");
    if let (Some(tok), false) = (&b.require_token, is_cdn) {
        if req.header("authorization") != Some(&format!("Bearer {tok}")) {
            let e = [("X-Error-Code", "RepoNotFound".to_string())];
            return simple(out, 401, &e, b"unauthorized", is_head);
        }
    }
    let api = format!("/api/models/{REPO}/revision/");
    let resolve = format!("/{REPO}/resolve/");
    if let Some(rev) = path.strip_prefix(&api) {
        if let Some(status) = b.api_status {
            let e = [("X-Error-Code", "RepoNotFound".to_string())];
            return simple(out, status, &e, b"{\"error\":\"nope\"}", is_head);
        }
        if rev != "main" && rev != COMMIT {
            let e = [("X-Error-Code", "RevisionNotFound".to_string())];
            return simple(out, 404, &e, b"{}", is_head);
        }
        let mut names: Vec<&String> = s.files.keys().collect();
        names.sort();
        let siblings: Vec<_> = names
            .iter()
            .map(|n| serde_json::json!({ "rfilename": n }))
            .collect();
        let body = serde_json::json!({ "id": REPO, "sha": COMMIT, "siblings": siblings });
        let ct = [("Content-Type", "application/json".to_string())];
        return simple(out, 200, &ct, body.to_string().as_bytes(), is_head);
    }
    let file = if let Some(rest) = path.strip_prefix(&resolve) {
        match rest.split_once('/') {
            Some((rev, f)) if rev == "main" || rev == COMMIT => f,
            _ => return simple(out, 404, &[], b"", is_head),
        }
    } else if let Some(f) = path.strip_prefix("/cdn/") {
        f
    } else {
        let e = [("X-Error-Code", "RepoNotFound".to_string())];
        return simple(out, 404, &e, b"not found", is_head);
    };
    let Some(content) = s.files.get(file) else {
        let e = [("X-Error-Code", "EntryNotFound".to_string())];
        return simple(out, 404, &e, b"", is_head);
    };
    let lfs = file.ends_with(".safetensors");
    let etag = if lfs {
        sha256_hex(content)
    } else {
        // Git blob ids are 40 hex digits: not a SHA-256, so only the size is checked.
        sha256_hex(content)[..40].to_string()
    };
    if let (Some(cdn), true, false) = (&b.cdn, lfs, is_cdn) {
        let h = [
            ("Location", format!("{cdn}/cdn/{file}")),
            ("X-Linked-Etag", format!("\"{etag}\"")),
            ("X-Linked-Size", content.len().to_string()),
            ("X-Repo-Commit", COMMIT.to_string()),
            ("ETag", "\"git-pointer-etag\"".to_string()),
        ];
        return simple(out, 302, &h, b"", is_head);
    }
    let mut data = content.clone();
    if !is_head && b.corrupt.as_deref() == Some(file) {
        let mid = data.len() / 2;
        data[mid] ^= 0xff;
    }
    let len = data.len();
    let mut status = 200;
    let mut start = 0;
    let mut headers = vec![
        ("ETag", format!("\"{etag}\"")),
        ("X-Repo-Commit", COMMIT.to_string()),
        ("Accept-Ranges", "bytes".to_string()),
    ];
    let range = req
        .header("range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|_| !b.ignore_range);
    if let Some(n) = range {
        if n >= len {
            return simple(out, 416, &[], b"", is_head);
        }
        status = 206;
        start = n;
        headers.push(("Content-Range", format!("bytes {n}-{}/{len}", len - 1)));
    }
    let body = &data[start..];
    headers.push(("Content-Length", body.len().to_string()));
    head(out, status, &headers);
    if is_head {
        return;
    }
    let cut = {
        let mut bh = s.behaviour.lock().unwrap();
        match bh.cut.get_mut(file) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    };
    let send = if !cut {
        body
    } else if range.is_none() {
        &body[..body.len() / 2]
    } else {
        &body[..0]
    };
    let _ = out.write_all(send);
}

/// A private cache (HF_HOME, MIPHA_CACHE, HOME) for one test.
pub struct TestEnv {
    pub dir: tempfile::TempDir,
}

impl TestEnv {
    pub fn new() -> TestEnv {
        TestEnv {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn hf_home(&self) -> PathBuf {
        self.dir.path().join("hf")
    }

    pub fn repo_cache(&self) -> PathBuf {
        self.hf_home()
            .join("hub")
            .join("models--test-org--tiny-mipha")
    }

    pub fn mipha_cache(&self) -> PathBuf {
        self.dir.path().join("mipha")
    }

    /// `mipha-cli` with only this test's environment: nothing inherited from the
    /// caller's HF_* or proxy settings.
    pub fn cli(&self, endpoint: &str, args: &[&str], extra_env: &[(&str, &str)]) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_mipha-cli"));
        for k in [
            "HF_TOKEN",
            "HF_TOKEN_PATH",
            "HF_HOME",
            "HF_HUB_CACHE",
            "HF_ENDPOINT",
            "HF_HUB_OFFLINE",
            "MIPHA_CACHE",
            "XDG_CACHE_HOME",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "http_proxy",
            "https_proxy",
            "all_proxy",
        ] {
            c.env_remove(k);
        }
        c.env("HOME", self.dir.path())
            .env("HF_HOME", self.hf_home())
            .env("MIPHA_CACHE", self.mipha_cache())
            .env("HF_ENDPOINT", endpoint)
            .args(args);
        for (k, v) in extra_env {
            c.env(k, v);
        }
        c.output().unwrap()
    }
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout_path(o: &Output) -> PathBuf {
    assert!(o.status.success(), "mipha-cli failed: {}", stderr(o));
    PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())
}

/// An endpoint where nothing listens: bind a port, then free it.
pub fn closed_endpoint() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

/// The `.mqf` opens and every tensor checksum holds.
pub fn check_mqf(path: &Path) {
    let f = mipha_runtime::MqfFile::open(path).unwrap();
    f.verify().unwrap();
}
