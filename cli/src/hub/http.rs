//! Requests to the hub: redirects followed by hand (so the token never leaves the
//! hub's host), bounded retries with backoff, and errors sorted into "could not
//! reach", "transient" and "the hub said no".

use std::io::Read;
use std::time::Duration;

use ureq::http::{Response, StatusCode};
use ureq::Body;

use super::error::{HubError, Result};
use super::HubOptions;

/// Redirect hops per request; the hub uses one (to its CDN), renamed repos one more.
const MAX_HOPS: usize = 8;
/// API answers are small; a limit keeps a broken server from filling memory.
const MAX_API_BODY: u64 = 16 << 20;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    Head,
    Get,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Follow {
    /// Every redirect (downloads: the hub sends large files to its CDN).
    All,
    /// Only redirects within the hub's own origin (metadata: the first cross-origin
    /// redirect carries the `X-Linked-*` headers, which is what we want).
    SameOrigin,
}

/// Why one attempt failed, which decides whether to try again.
pub(crate) enum Failure {
    /// No HTTP answer: worth retrying, then reported as "could not reach".
    Connect { origin: String, detail: String },
    /// The transfer broke or the server asked us to come back later.
    Transient(String),
    /// A definite answer (404, bad data, ...): retrying would not change it.
    Fatal(HubError),
}

pub(crate) struct Client {
    agent: ureq::Agent,
    pub endpoint: String,
    token: Option<String>,
    pub tries: u32,
    retry_delay: Duration,
}

impl Client {
    pub fn new(opts: &HubOptions) -> Self {
        let config = ureq::Agent::config_builder()
            .timeout_connect(Some(opts.connect_timeout))
            .timeout_resolve(Some(opts.connect_timeout))
            // Per read, not per body: a multi-GB shard may take an hour, a stall may not.
            .timeout_per_read(Some(opts.read_timeout))
            .timeout_recv_response(Some(opts.read_timeout))
            .max_redirects(0)
            .http_status_as_error(false)
            .user_agent(concat!("mipha-cli/", env!("CARGO_PKG_VERSION")))
            .build();
        Client {
            agent: config.into(),
            endpoint: opts.endpoint.trim_end_matches('/').to_string(),
            token: opts.token.clone(),
            tries: opts.tries.max(1),
            retry_delay: opts.retry_delay,
        }
    }

    /// One request, following redirects per `follow`. The token goes only to the
    /// endpoint's own origin: the CDN gets a signed URL and must not see it.
    pub fn send(
        &self,
        method: Method,
        url: &str,
        range_from: Option<u64>,
        follow: Follow,
    ) -> std::result::Result<(String, Response<Body>), Failure> {
        let mut url = url.to_string();
        for _ in 0..MAX_HOPS {
            let same_origin = origin(&url).eq_ignore_ascii_case(&origin(&self.endpoint));
            let resp = match method {
                Method::Head => {
                    let mut r = self.agent.head(&url).header("Accept-Encoding", "identity");
                    if let (true, Some(t)) = (same_origin, &self.token) {
                        r = r.header("Authorization", format!("Bearer {t}"));
                    }
                    r.call()
                }
                Method::Get => {
                    let mut r = self.agent.get(&url).header("Accept-Encoding", "identity");
                    if let (true, Some(t)) = (same_origin, &self.token) {
                        r = r.header("Authorization", format!("Bearer {t}"));
                    }
                    if let Some(n) = range_from.filter(|&n| n > 0) {
                        r = r.header("Range", format!("bytes={n}-"));
                    }
                    r.call()
                }
            };
            let resp = resp.map_err(|e| classify_call_error(&url, e))?;
            if !resp.status().is_redirection() || resp.status() == StatusCode::NOT_MODIFIED {
                return Ok((url, resp));
            }
            let Some(loc) = header(&resp, "location") else {
                return Err(Failure::Fatal(HubError::BadResponse {
                    url,
                    detail: format!("HTTP {} without a Location header", resp.status().as_u16()),
                }));
            };
            let next = join_url(&url, &loc);
            if follow == Follow::SameOrigin && !origin(&next).eq_ignore_ascii_case(&origin(&url)) {
                return Ok((url, resp));
            }
            url = next;
        }
        Err(Failure::Fatal(HubError::BadResponse {
            url,
            detail: format!("more than {MAX_HOPS} redirects"),
        }))
    }

    /// Runs `attempt` until it succeeds, fails for good, or has failed `tries` times
    /// in a row without making progress (`attempt` says whether it did).
    pub fn retry<T>(
        &self,
        url: &str,
        mut attempt: impl FnMut() -> std::result::Result<T, (Failure, bool)>,
    ) -> Result<T> {
        let mut in_a_row = 0u32;
        // A server that sends a few bytes and hangs up each time would otherwise loop
        // for as long as it keeps doing so.
        let mut total = 0u32;
        loop {
            let (failure, progressed) = match attempt() {
                Ok(v) => return Ok(v),
                Err(f) => f,
            };
            total += 1;
            in_a_row = if progressed { 1 } else { in_a_row + 1 };
            let give_up = in_a_row >= self.tries || total >= self.tries * 20;
            match failure {
                Failure::Fatal(e) => return Err(e),
                Failure::Connect { origin, detail } if give_up => {
                    return Err(HubError::Unreachable { origin, detail })
                }
                Failure::Transient(detail) if give_up => {
                    return Err(HubError::Network {
                        url: url.to_string(),
                        tries: total,
                        detail,
                    })
                }
                _ => {}
            }
            std::thread::sleep(self.retry_delay * (1 << (in_a_row - 1).min(5)));
        }
    }

    /// GET of a small JSON document under the endpoint, with retries.
    pub fn get_json(&self, url: &str) -> Result<(Response<()>, String)> {
        self.retry(url, || {
            let (final_url, resp) = self
                .send(Method::Get, url, None, Follow::All)
                .map_err(|f| (f, false))?;
            let status = resp.status().as_u16();
            if status == 429 || status >= 500 {
                return Err((Failure::Transient(format!("HTTP {status}")), false));
            }
            let (parts, body) = resp.into_parts();
            let mut text = String::new();
            body.into_with_config()
                .limit(MAX_API_BODY)
                .reader()
                .read_to_string(&mut text)
                .map_err(|e| {
                    (
                        Failure::Transient(format!("{final_url}: reading the answer: {e}")),
                        false,
                    )
                })?;
            Ok((Response::from_parts(parts, ()), text))
        })
    }
}

fn classify_call_error(url: &str, e: ureq::Error) -> Failure {
    use ureq::Error as E;
    let origin = origin(url);
    match e {
        // No HTTP exchange happened: the host is out of reach from here.
        E::HostNotFound | E::ConnectionFailed | E::Io(_) | E::Timeout(_) => Failure::Connect {
            origin,
            detail: describe(&e),
        },
        E::Tls(_) | E::Rustls(_) | E::Pem(_) | E::TlsRequired => {
            Failure::Fatal(HubError::Unreachable {
                origin,
                detail: format!("TLS: {e}"),
            })
        }
        E::Protocol(_) | E::BodyStalled => Failure::Transient(format!("{url}: {e}")),
        other => Failure::Fatal(HubError::BadResponse {
            url: url.to_string(),
            detail: other.to_string(),
        }),
    }
}

fn describe(e: &ureq::Error) -> String {
    match e {
        ureq::Error::HostNotFound => "host not found (DNS lookup failed)".into(),
        ureq::Error::ConnectionFailed => "connection failed".into(),
        ureq::Error::Io(io) => match io.kind() {
            std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
            _ => io.to_string(),
        },
        other => other.to_string(),
    }
}

pub(crate) fn header<T>(resp: &Response<T>, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_string())
}

/// `scheme://host[:port]`, lower-cased, default ports dropped, so that
/// `https://HF.co:443/x` and `https://hf.co/y` compare equal.
pub(crate) fn origin(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return String::new();
    };
    let scheme = scheme.to_ascii_lowercase();
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    // Credentials in the URL are not part of the origin.
    let host_port = authority
        .rsplit('@')
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    let default = match scheme.as_str() {
        "http" => ":80",
        "https" => ":443",
        _ => "",
    };
    let host_port = if !default.is_empty() && host_port.ends_with(default) {
        &host_port[..host_port.len() - default.len()]
    } else {
        &host_port
    };
    format!("{scheme}://{host_port}")
}

/// Resolves a `Location` header against the URL that sent it.
pub(crate) fn join_url(base: &str, loc: &str) -> String {
    if loc.contains("://") {
        return loc.to_string();
    }
    if let Some(rest) = loc.strip_prefix("//") {
        let scheme = base.split("://").next().unwrap_or("https");
        return format!("{scheme}://{rest}");
    }
    let origin = origin(base);
    if loc.starts_with('/') {
        return format!("{origin}{loc}");
    }
    let path = base
        .split_once("://")
        .and_then(|(_, r)| r.find('/').map(|i| &r[i..]))
        .unwrap_or("/");
    let path = path.split(['?', '#']).next().unwrap_or("/");
    let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
    format!("{origin}{dir}{loc}")
}

/// Percent-encodes one path segment (a revision like `refs/pr/1` must stay one segment).
pub(crate) fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A status that is neither success nor redirect, as the right `HubError`.
/// `X-Error-Code` is the hub's own reason and is more precise than the status.
pub(crate) fn status_error<T>(
    resp: &Response<T>,
    url: &str,
    repo: &str,
    what: &str,
    endpoint: &str,
) -> HubError {
    let status = resp.status().as_u16();
    let code = header(resp, "x-error-code").unwrap_or_default();
    let message = header(resp, "x-error-message")
        .map(|m| format!(": {m}"))
        .unwrap_or_default();
    match (code.as_str(), status) {
        ("GatedRepo", _) | (_, 403) => HubError::Denied {
            repo: repo.to_string(),
            status,
            detail: message,
        },
        ("RepoNotFound" | "RevisionNotFound" | "EntryNotFound", _) | (_, 401 | 404) => {
            HubError::NotFound {
                what: what.to_string(),
                endpoint: endpoint.to_string(),
                status,
            }
        }
        _ => HubError::Http {
            url: url.to_string(),
            status,
            detail: message,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        assert_eq!(origin("https://HF.co:443/a/b"), "https://hf.co");
        assert_eq!(origin("https://hf.co"), "https://hf.co");
        assert_eq!(origin("http://127.0.0.1:8080/x?y"), "http://127.0.0.1:8080");
        assert_ne!(origin("https://hf.co/x"), origin("https://cdn-lfs.hf.co/x"));
        assert_ne!(origin("http://hf.co/x"), origin("https://hf.co/x"));
        assert_eq!(origin("https://user:pw@hf.co/x"), "https://hf.co");
    }

    #[test]
    fn joins() {
        let base = "https://hf.co/org/m/resolve/main/f.json?x=1";
        assert_eq!(join_url(base, "/api/x"), "https://hf.co/api/x");
        assert_eq!(
            join_url(base, "https://cdn.hf.co/b?sig=1"),
            "https://cdn.hf.co/b?sig=1"
        );
        assert_eq!(join_url(base, "//cdn.hf.co/b"), "https://cdn.hf.co/b");
        assert_eq!(
            join_url(base, "g.json"),
            "https://hf.co/org/m/resolve/main/g.json"
        );
    }

    #[test]
    fn segments() {
        assert_eq!(encode_segment("main"), "main");
        assert_eq!(encode_segment("refs/pr/1"), "refs%2Fpr%2F1");
        assert_eq!(encode_segment("a b"), "a%20b");
    }
}
