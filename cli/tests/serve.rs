//! `mipha-cli serve` end to end on the tiny-a model, over real HTTP on
//! 127.0.0.1 with an ephemeral port: chat completions plain and streamed, with
//! and without a picture, equal to `mipha-cli run`; eight concurrent streams;
//! a client that disconnects; every error status; authentication; readiness;
//! graceful shutdown; prefix reuse of a conversation re-sent in full.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

mod tiny_common;
use tiny_common::{fixture, tiny_a, BIN};

struct Server {
    child: Child,
    base: String,
    agent: ureq::Agent,
    _dir: Option<tempfile::TempDir>,
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

impl Server {
    /// Starts the server on a fresh copy of tiny-a; waits for `/ready`
    /// unless `wait` is false.
    fn start(extra: &[&str], wait: bool) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny_a(dir.path());
        let mut args = vec![
            "serve".to_string(),
            "--model".into(),
            model.display().to_string(),
            "--port".into(),
            "0".into(),
            "--threads".into(),
            "2".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut child = Command::new(BIN)
            .args(&args)
            .env_remove("MIPHA_API_KEY")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("mipha-cli serve starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let base = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        let s = Server {
            child,
            base,
            agent: agent(),
            _dir: Some(dir),
        };
        if wait {
            s.wait_ready();
        }
        s
    }

    fn wait_ready(&self) {
        let until = Instant::now() + Duration::from_secs(60);
        while self.get("/ready").0 != 200 {
            assert!(Instant::now() < until, "the server never became ready");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn get(&self, path: &str) -> (u16, String) {
        let mut r = self.agent.get(&self.url(path)).call().unwrap();
        let status = r.status().as_u16();
        (status, r.body_mut().read_to_string().unwrap_or_default())
    }

    /// POSTs raw bytes; the status, the `Retry-After` header and the body.
    fn post_raw(
        &self,
        path: &str,
        body: &[u8],
        key: Option<&str>,
    ) -> (u16, Option<String>, String) {
        let mut req = self
            .agent
            .post(&self.url(path))
            .header("Content-Type", "application/json");
        if let Some(k) = key {
            req = req.header("Authorization", &format!("Bearer {k}"));
        }
        let mut r = match req.send(body) {
            Ok(r) => r,
            // A server may answer (413) and close before the whole body is
            // sent; the client's write then fails (EPIPE) though the answer is
            // on the wire: read it as curl does.
            Err(ureq::Error::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                return self.post_raw_tcp(path, body, key);
            }
            Err(e) => panic!("POST {path} ({} bytes): {e}", body.len()),
        };
        let status = r.status().as_u16();
        let retry = r
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string());
        (
            status,
            retry,
            r.body_mut().read_to_string().unwrap_or_default(),
        )
    }

    /// [`Server::post_raw`] over a plain socket: the body is written on a
    /// thread that ignores write errors while this one reads the answer.
    fn post_raw_tcp(
        &self,
        path: &str,
        body: &[u8],
        key: Option<&str>,
    ) -> (u16, Option<String>, String) {
        use std::io::{Read, Write};
        let host = self.base.trim_start_matches("http://");
        let mut stream = std::net::TcpStream::connect(host).expect("connect");
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n"));
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
             {}Content-Length: {}\r\nConnection: close\r\n\r\n",
            auth.unwrap_or_default(),
            body.len()
        );
        let mut writer = stream.try_clone().unwrap();
        let body = body.to_vec();
        let sent = std::thread::spawn(move || {
            let _ = writer
                .write_all(head.as_bytes())
                .and_then(|_| writer.write_all(&body));
        });
        let mut raw = Vec::new();
        let mut buf = [0u8; 8192];
        // A reset after the answer ends the read like a close.
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
        }
        sent.join().unwrap();
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("POST {path}: no HTTP answer: {text:?}"));
        let header = |name: &str| {
            head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
        };
        let chunked =
            header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        let mut body = String::new();
        if chunked {
            let mut rest = rest;
            while let Some((size, after)) = rest.split_once("\r\n") {
                let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
                if n == 0 || after.len() < n {
                    break;
                }
                body.push_str(&after[..n]);
                rest = after[n..].trim_start_matches("\r\n");
            }
        } else {
            body.push_str(rest);
        }
        (status, header("retry-after"), body)
    }

    fn chat(&self, body: &Value) -> (u16, Value) {
        let (status, _, text) =
            self.post_raw("/v1/chat/completions", body.to_string().as_bytes(), None);
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// `POST /v1/chat/completions` with `body`, the answer not read yet.
    fn post_chat(&self, body: &Value) -> ureq::http::Response<ureq::Body> {
        self.agent
            .post(&self.url("/v1/chat/completions"))
            .header("Content-Type", "application/json")
            .send(body.to_string().as_bytes())
            .unwrap()
    }

    /// A streamed answer, read to its end: the content and every chunk.
    fn stream(&self, body: &Value) -> (String, Vec<Value>) {
        let mut r = self.post_chat(body);
        assert_eq!(r.status().as_u16(), 200);
        let ct = r
            .headers()
            .get("content-type")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        assert!(ct.starts_with("text/event-stream"), "{ct}");
        let reader = BufReader::new(r.body_mut().as_reader());
        let mut chunks = Vec::new();
        let mut text = String::new();
        let mut done = false;
        for line in reader.lines() {
            let line = line.unwrap();
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                done = true;
                break;
            }
            let v: Value = serde_json::from_str(data).unwrap();
            if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
                text.push_str(c);
            }
            chunks.push(v);
        }
        assert!(done, "the stream ends with [DONE]");
        (text, chunks)
    }

    /// Reads a metric's value from `/metrics`.
    fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no metric {name}"))
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

fn greedy(messages: Value, n: usize) -> Value {
    json!({"messages": messages, "max_tokens": n, "temperature": 0, "ignore_eos": true})
}

fn picture_url() -> String {
    let png = std::fs::read(fixture("chelsea.png")).unwrap();
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    )
}

/// `mipha-cli run --json` on the same model: the reference answer.
fn cli_run(
    model: &std::path::Path,
    prompt: &str,
    image: Option<&std::path::Path>,
    n: usize,
) -> String {
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "--model"]).arg(model).args([
        "-p",
        prompt,
        "-n",
        &n.to_string(),
        "--ignore-eos",
        "--json",
        "--threads",
        "2",
    ]);
    if let Some(i) = image {
        cmd.arg("--image").arg(i);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["text"].as_str().unwrap().to_string()
}

#[test]
fn chat_plain_and_streamed_with_and_without_a_picture_equals_the_cli() {
    let s = Server::start(&[], true);
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_a(dir.path());

    let want = cli_run(&model, "Hello there", None, 8);
    let (status, v) = s.chat(&greedy(user("Hello there"), 8));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], want.as_str());
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 8);
    let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(v["usage"]["total_tokens"].as_u64().unwrap(), prompt + 8);
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));

    let mut body = greedy(user("Hello there"), 8);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let (text, chunks) = s.stream(&body);
    assert_eq!(text, want);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let finish: Vec<&Value> = chunks
        .iter()
        .filter(|c| !c["choices"][0]["finish_reason"].is_null())
        .collect();
    assert_eq!(finish.len(), 1);
    assert_eq!(finish[0]["choices"][0]["finish_reason"], "length");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], 8);

    // A picture, then the question (as `run --image` renders it).
    let want = cli_run(&model, "What is this?", Some(&fixture("chelsea.png")), 6);
    let msg = json!([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": picture_url()}},
        {"type": "text", "text": "What is this?"},
    ]}]);
    let (status, v) = s.chat(&greedy(msg.clone(), 6));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], want.as_str());
    let patches = 9; // tiny-a's 42 px picture in 14 px patches
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > patches);
    let mut body = greedy(msg, 6);
    body["stream"] = json!(true);
    assert_eq!(s.stream(&body).0, want);
}

#[test]
fn eight_concurrent_streams_complete_with_their_own_answers() {
    let s = std::sync::Arc::new(Server::start(&[], true));
    let prompts: Vec<String> = (0..8)
        .map(|i| {
            format!(
                "Story number {i} about {}",
                ["a cat", "the sea", "a robot", "bread"][i % 4]
            )
        })
        .collect();
    // Each alone first, then all eight at once.
    let alone: Vec<String> = prompts
        .iter()
        .map(|p| {
            s.chat(&greedy(user(p), 12)).1["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let threads: Vec<_> = prompts
        .iter()
        .map(|p| {
            let s = s.clone();
            let mut body = greedy(user(p), 12);
            body["stream"] = json!(true);
            std::thread::spawn(move || s.stream(&body).0)
        })
        .collect();
    let together: Vec<String> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(together, alone);
    let distinct: std::collections::HashSet<&String> = together.iter().collect();
    assert_eq!(distinct.len(), 8, "{together:?}");
}

#[test]
fn a_client_that_disconnects_mid_stream_frees_its_kv() {
    let s = Server::start(&[], true);
    let mut body = greedy(user("Talk for a long time."), 1500);
    body["stream"] = json!(true);
    {
        let mut r = s.post_chat(&body);
        let mut reader = BufReader::new(r.body_mut().as_reader());
        let mut line = String::new();
        for _ in 0..6 {
            line.clear();
            reader.read_line(&mut line).unwrap();
        }
        assert!(s.metric("mipha_kv_cache_blocks_used") > 0.0);
        // the connection closes here
    }
    let until = Instant::now() + Duration::from_secs(30);
    while s.metric("mipha_kv_cache_blocks_used") > 0.0
        || s.metric("mipha_num_requests_running") > 0.0
    {
        assert!(
            Instant::now() < until,
            "the generation went on after the client left"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        s.metric("mipha_generation_tokens_total") < 1500.0,
        "it stopped early"
    );
    // and the server goes on
    assert_eq!(s.chat(&greedy(user("Hi"), 2)).0, 200);
}

/// A PNG header declaring a picture far over the decoder's limits.
fn huge_png() -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(100_000u32.to_be_bytes());
    ihdr.extend(100_000u32.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    png.extend(13u32.to_be_bytes());
    png.extend(&ihdr);
    png.extend(crc32(&ihdr).to_be_bytes());
    png
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn picture(data: &[u8]) -> Value {
    let url = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(data)
    );
    json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]}])
}

#[test]
fn every_error_has_its_status_and_type_and_the_server_goes_on() {
    let s = Server::start(&["--max-body-mb", "1", "--max-images", "1"], true);
    let long = "word ".repeat(3000);
    // more bytes than the context could hold whatever they tokenize to
    let huge = "a".repeat(900 << 10);
    let bad = json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}});
    let two_pictures =
        json!([{"role": "user", "content": [bad.clone(), bad, {"type": "text", "text": "?"}]}]);
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("malformed JSON", b"{\"messages\": [".to_vec(), 400, "invalid_request_error"),
        ("not an object", b"[1, 2]".to_vec(), 400, "invalid_request_error"),
        ("wrong type", json!({"messages": user("hi"), "max_tokens": "ten"}).to_string().into_bytes(), 400, "invalid_request_error"),
        ("unknown role", json!({"messages": [{"role": "robot", "content": "hi"}]}).to_string().into_bytes(), 400, "invalid_request_error"),
        ("empty messages", json!({"messages": []}).to_string().into_bytes(), 400, "invalid_request_error"),
        ("no messages", json!({"model": "tiny-a"}).to_string().into_bytes(), 400, "invalid_request_error"),
        ("bad data URL", json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]}).to_string().into_bytes(), 400, "invalid_request_error"),
        ("remote URL", json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}).to_string().into_bytes(), 400, "invalid_request_error"),
        ("undecodable picture", json!({"messages": picture(b"not a picture at all")}).to_string().into_bytes(), 400, "invalid_request_error"),
        ("over-large picture", json!({"messages": picture(&huge_png())}).to_string().into_bytes(), 400, "invalid_request_error"),
        ("past the context", json!({"messages": user(&long)}).to_string().into_bytes(), 400, "invalid_request_error"),
        ("text no context holds", json!({"messages": user(&huge)}).to_string().into_bytes(), 400, "invalid_request_error"),
        ("more pictures than allowed", json!({"messages": two_pictures.clone()}).to_string().into_bytes(), 400, "invalid_request_error"),
        ("n > 1", json!({"messages": user("hi"), "n": 2}).to_string().into_bytes(), 400, "invalid_request_error"),
        ("unknown parameter", json!({"messages": user("hi"), "best_of": 2}).to_string().into_bytes(), 400, "invalid_request_error"),
        ("temperature out of range", json!({"messages": user("hi"), "temperature": 3}).to_string().into_bytes(), 400, "invalid_request_error"),
        ("five stop strings", json!({"messages": user("hi"), "stop": ["a", "b", "c", "d", "e"]}).to_string().into_bytes(), 400, "invalid_request_error"),
        ("unknown model", json!({"model": "gpt-9", "messages": user("hi")}).to_string().into_bytes(), 404, "not_found_error"),
        ("body over the limit", vec![b' '; 2 << 20], 413, "invalid_request_error"),
    ];
    for (what, body, status, kind) in cases {
        let (got, _, text) = s.post_raw("/v1/chat/completions", &body, None);
        let v: Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{what}: not JSON: {text}"));
        assert_eq!(got, status, "{what}: {text}");
        assert_eq!(v["error"]["type"], kind, "{what}: {text}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}"
        );
        assert!(
            v["error"].get("param").is_some() && v["error"].get("code").is_some(),
            "{what}"
        );
        assert_eq!(
            s.chat(&greedy(user("still there?"), 2)).0,
            200,
            "after {what}"
        );
    }
    let (_, _, text) = s.post_raw(
        "/v1/chat/completions",
        json!({"messages": user(&huge)}).to_string().as_bytes(),
        None,
    );
    assert!(
        text.contains("context_length_exceeded") && text.contains("bytes"),
        "{text}"
    );
    let (_, _, text) = s.post_raw(
        "/v1/chat/completions",
        json!({"messages": two_pictures}).to_string().as_bytes(),
        None,
    );
    assert!(text.contains("at most 1"), "{text}");
    let (status, text) = s.get("/v1/nowhere");
    assert_eq!(status, 404, "{text}");
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["error"]["type"],
        "not_found_error"
    );
}

#[test]
fn a_full_queue_is_503_with_retry_after_and_a_late_request_times_out() {
    let s = Server::start(
        &[
            "--max-queue",
            "1",
            "--max-sequences",
            "1",
            "--request-timeout",
            "2",
        ],
        true,
    );
    // The one running sequence: a long answer nobody reads (it pauses at the
    // stream window, holding its slot).
    let mut body = greedy(user("Talk."), 1500);
    body["stream"] = json!(true);
    let mut held = s.post_chat(&body);
    let mut first = String::new();
    BufReader::new(held.body_mut().as_reader())
        .read_line(&mut first)
        .unwrap();
    // The one queue place: a request that waits past its timeout.
    let waiting = {
        let base = s.url("/v1/chat/completions");
        // Long enough that it cannot end between the running answer's
        // deadline and its own.
        let body = greedy(user("Me next."), 1500).to_string();
        std::thread::spawn(move || {
            let mut r = agent().post(&base).send(body.as_bytes()).unwrap();
            (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
        })
    };
    let until = Instant::now() + Duration::from_secs(10);
    while s.metric("mipha_num_requests_waiting") < 1.0 {
        assert!(Instant::now() < until);
        std::thread::sleep(Duration::from_millis(10));
    }
    let (status, retry, text) = s.post_raw(
        "/v1/chat/completions",
        greedy(user("And me."), 2).to_string().as_bytes(),
        None,
    );
    assert_eq!(status, 503, "{text}");
    assert!(retry.is_some(), "a Retry-After header");
    let (status, text) = waiting.join().unwrap();
    assert_eq!(status, 504, "{text}");
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["error"]["type"],
        "timeout"
    );
    drop(held);
}

#[test]
fn an_api_key_is_required_when_set() {
    let s = Server::start(&["--api-key", "sekrit"], true);
    let body = greedy(user("Hi"), 2).to_string();
    let (status, _, text) = s.post_raw("/v1/chat/completions", body.as_bytes(), None);
    assert_eq!(status, 401, "{text}");
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["error"]["type"],
        "authentication_error"
    );
    assert_eq!(
        s.post_raw("/v1/chat/completions", body.as_bytes(), Some("wrong"))
            .0,
        401
    );
    assert_eq!(
        s.post_raw("/v1/chat/completions", body.as_bytes(), Some("sekrit"))
            .0,
        200
    );
    // probes and metrics stay open
    assert_eq!(s.get("/health").0, 200);
    assert_eq!(s.get("/metrics").0, 200);
    // and without a key, no key is asked for
    let open = Server::start(&[], true);
    assert_eq!(
        open.post_raw("/v1/chat/completions", body.as_bytes(), None)
            .0,
        200
    );
}

#[test]
fn ready_only_once_loaded_and_shutdown_lets_a_request_finish() {
    let mut s = Server::start(
        &["--load-delay-ms", "1500", "--shutdown-grace", "20"],
        false,
    );
    assert_eq!(s.get("/health").0, 200, "live while loading");
    let (status, text) = s.get("/ready");
    assert_eq!(status, 503, "not ready while loading: {text}");
    assert_eq!(s.chat(&greedy(user("Hi"), 2)).0, 503);
    s.wait_ready();
    let (_, models) = s.get("/v1/models");
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["id"], "tiny-a");

    // A long answer read slowly is in flight when SIGTERM comes: it still ends
    // with [DONE], then the process exits.
    let mut body = greedy(user("A long one."), 400);
    body["stream"] = json!(true);
    let mut r = s.post_chat(&body);
    let mut reader = BufReader::new(r.body_mut().as_reader());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let rc = Command::new("kill")
        .args(["-TERM", &s.pid().to_string()])
        .status()
        .unwrap();
    assert!(rc.success());
    std::thread::sleep(Duration::from_millis(300));
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    assert!(
        rest.trim_end().ends_with("data: [DONE]"),
        "the request in flight finished"
    );
    assert!(rest.contains("\"finish_reason\":\"length\""));
    let status = s.child.wait().unwrap();
    assert!(status.success(), "exits cleanly: {status}");
}

#[test]
fn a_conversation_resent_in_full_reuses_its_prefix() {
    let s = Server::start(&[], true);
    let first = json!([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]);
    let (status, v) = s.chat(&greedy(first.clone(), 6));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let answer = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let mut second = first.as_array().unwrap().clone();
    second.push(json!({"role": "assistant", "content": answer}));
    second.push(json!({"role": "user", "content": "Another one."}));
    let (status, v) = s.chat(&greedy(Value::Array(second), 6));
    assert_eq!(status, 200, "{v}");
    let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        cached >= 16 && cached < prompt,
        "{cached} of {prompt} reused"
    );
    assert!(s.metric("mipha_prefix_cache_hit_positions_total") >= cached as f64);
}

#[test]
fn stop_strings_end_the_answer_without_the_stop() {
    let s = Server::start(&[], true);
    let (_, v) = s.chat(&greedy(user("Hello there"), 8));
    let full = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    // Stop at the third character of the greedy answer.
    let cut: String = full.chars().take(2).collect();
    let stop: String = full.chars().skip(2).take(2).collect();
    let mut body = greedy(user("Hello there"), 8);
    body["stop"] = json!([stop]);
    let (_, v) = s.chat(&body);
    assert_eq!(v["choices"][0]["message"]["content"], cut.as_str());
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}
