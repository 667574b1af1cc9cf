//! The HTTP side: routes, authentication, the chat completion handler (plain
//! JSON or Server-Sent Events), request counting and logging. Everything
//! here is async and light: checking pictures and tokenizing run on the
//! blocking pool, generation on the engine's step loop.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use mipha_models::{
    CancelToken, Engine, Finished, GenerateRequest, Generating, StopReason, StreamEvent,
};
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::infer::{finish_reason, options, StopFilter};
use crate::metrics::Metrics;
use crate::validation::{self, ChatRequest};

const LOADING: u8 = 0;
const READY: u8 = 1;
const FAILED: u8 = 2;
const STOPPING: u8 = 3;

/// What every handler shares.
pub struct App {
    engine: OnceLock<Arc<Engine>>,
    state: AtomicU8,
    failure: OnceLock<String>,
    pub model_id: String,
    pub api_key: Option<String>,
    pub request_timeout: Option<Duration>,
    pub body_limit: usize,
    pub metrics: Metrics,
    next_id: AtomicU64,
}

impl App {
    pub fn new(
        model_id: String,
        api_key: Option<String>,
        request_timeout: Option<Duration>,
        body_limit: usize,
    ) -> Self {
        App {
            engine: OnceLock::new(),
            state: AtomicU8::new(LOADING),
            failure: OnceLock::new(),
            model_id,
            api_key,
            request_timeout,
            body_limit,
            metrics: Metrics::new(),
            next_id: AtomicU64::new(1),
        }
    }

    /// The model is loaded: requests are served from now on.
    pub fn set_engine(&self, engine: Arc<Engine>) {
        let _ = self.engine.set(engine);
        let _ = self
            .state
            .compare_exchange(LOADING, READY, Ordering::SeqCst, Ordering::SeqCst);
    }

    pub fn set_failed(&self, why: String) {
        let _ = self.failure.set(why);
        self.state.store(FAILED, Ordering::SeqCst);
    }

    /// Shutdown began: not ready any more, new requests are refused.
    pub fn set_stopping(&self) {
        self.state.store(STOPPING, Ordering::SeqCst);
    }

    pub fn engine_if_loaded(&self) -> Option<&Arc<Engine>> {
        self.engine.get()
    }

    fn engine(&self) -> Result<Arc<Engine>, ApiError> {
        match self.state.load(Ordering::SeqCst) {
            READY => Ok(self.engine.get().expect("set before READY").clone()),
            LOADING => Err(ApiError::unavailable("the model is still loading", 5)),
            STOPPING => Err(ApiError::unavailable("the server is shutting down", 5)),
            _ => Err(ApiError::internal(format!(
                "the model failed to load: {}",
                self.failure.get().map_or("unknown", |s| s.as_str())
            ))),
        }
    }
}

pub fn router(app: Arc<App>) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route_layer(middleware::from_fn_with_state(app.clone(), auth));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(app.clone(), count))
        .layer(DefaultBodyLimit::max(app.body_limit))
        .with_state(app)
}

/// Counts every response by route and status.
async fn count(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched".to_string(), |p| p.as_str().to_string());
    let r = next.run(req).await;
    app.metrics
        .requests
        .with_label_values(&[endpoint.as_str(), r.status().as_str()])
        .inc();
    r
}

/// Checks `Authorization: Bearer <key>` when the server has a key.
async fn auth(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if let Some(key) = &app.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            None => {
                return ApiError::unauthorized(
                    "this server needs an API key: `Authorization: Bearer <key>`",
                )
                .into_response()
            }
            Some(g) if !same(g.trim().as_bytes(), key.as_bytes()) => {
                return ApiError::unauthorized("the API key is not valid").into_response()
            }
            Some(_) => {}
        }
    }
    next.run(req).await
}

/// Compares without returning early at the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn ready(State(app): State<Arc<App>>) -> Response {
    match app.engine() {
        Ok(_) => Json(json!({"status": "ready"})).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let stats = app.engine_if_loaded().map(|e| e.stats());
    let body = app.metrics.render(stats.as_ref());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(format!(
        "no route for {} {}",
        req.method(),
        req.uri().path()
    ))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn model_object(app: &App) -> Value {
    json!({
        "id": app.model_id,
        "object": "model",
        "created": unix_now(),
        "owned_by": "mipha",
    })
}

async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [model_object(&app)]}))
}

async fn model(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    if id == app.model_id {
        Json(model_object(&app)).into_response()
    } else {
        ApiError::model_not_found(&id, &app.model_id).into_response()
    }
}

/// Cancels the request's work if the handler is dropped (the client went
/// away) before it ends.
struct CancelOnDrop(CancelToken);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// What a request amounted to, for its log line and the metrics.
struct Record {
    id: String,
    arrived: Instant,
    prompt: usize,
    cached: usize,
    tokens: usize,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Record {
    fn token(&mut self, m: &Metrics) {
        let now = Instant::now();
        match self.last {
            None => {
                m.ttft.observe((now - self.arrived).as_secs_f64());
                self.first = Some(now);
            }
            Some(t) => m.itl.observe((now - t).as_secs_f64()),
        }
        self.last = Some(now);
        self.tokens += 1;
    }

    fn end(&self, m: &Metrics, status: u16, finish: &str) {
        let elapsed = self.arrived.elapsed();
        m.e2e.observe(elapsed.as_secs_f64());
        m.prompt_tokens.inc_by(self.prompt as u64);
        m.cached_prompt_tokens.inc_by(self.cached as u64);
        m.generation_tokens.inc_by(self.tokens as u64);
        let ttft = self
            .first
            .map_or(-1.0, |t| (t - self.arrived).as_secs_f64() * 1e3);
        tracing::info!(
            id = %self.id,
            status,
            finish,
            prompt_tokens = self.prompt,
            cached_tokens = self.cached,
            completion_tokens = self.tokens,
            ttft_ms = format_args!("{ttft:.1}"),
            duration_ms = format_args!("{:.1}", elapsed.as_secs_f64() * 1e3),
            "chat completion"
        );
    }

    fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.tokens,
            "total_tokens": self.prompt + self.tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached},
        })
    }
}

/// The engine's next event, owned (an async task cannot hold the borrowed one
/// across its own awaits).
enum Got {
    Token(String),
    Done(Box<Finished>),
    Failed(mipha_runtime::Error),
}

async fn next(g: &mut Generating) -> Got {
    match g.next_event_async().await {
        Ok(StreamEvent::Token { piece, .. }) => Got::Token(piece.to_string()),
        Ok(StreamEvent::Done(f)) => Got::Done(Box::new(f.clone())),
        Err(e) => Got::Failed(e),
    }
}

async fn chat(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    let arrived = Instant::now();
    let id = format!(
        "chatcmpl-{:016x}",
        app.next_id.fetch_add(1, Ordering::Relaxed)
    );
    match chat_inner(&app, body, arrived, &id).await {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(
                id = %id,
                status = e.status.as_u16(),
                error = %e.message,
                "chat completion refused"
            );
            e.into_response()
        }
    }
}

async fn chat_inner(
    app: &Arc<App>,
    body: Result<Bytes, BytesRejection>,
    arrived: Instant,
    id: &str,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::too_large(app.body_limit),
        _ => ApiError::invalid(format!("cannot read the body: {e}")),
    })?;
    let engine = app.engine()?;
    let req = validation::parse(&body, &app.model_id)?;
    drop(body);
    let deadline = app.request_timeout.map(|t| arrived + t);
    let cancel = CancelToken::new();
    let guard = CancelOnDrop(cancel.clone());
    let req = Arc::new(req);
    let prepared = {
        let (req, engine, token) = (req.clone(), engine.clone(), cancel.clone());
        let work = tokio::task::spawn_blocking(move || validation::prepare(&req, &engine, &token));
        let joined = match deadline {
            Some(d) => match tokio::time::timeout_at(d.into(), work).await {
                Ok(j) => j,
                Err(_) => {
                    cancel.cancel();
                    return Err(timeout_error(app));
                }
            },
            None => work.await,
        };
        joined.map_err(|e| ApiError::internal(format!("preparing the request failed: {e}")))??
    };
    let g = engine
        .submit(GenerateRequest {
            prompt: prepared.prompt,
            options: options(&req, deadline),
            cancel: Some(cancel.clone()),
            ..Default::default()
        })
        .map_err(ApiError::from_engine)?;
    let record = Record {
        id: id.to_string(),
        arrived,
        prompt: prepared.prompt_positions,
        cached: 0,
        tokens: 0,
        first: None,
        last: None,
    };
    if req.stream {
        stream(app.clone(), g, record, &req, guard).await
    } else {
        complete(app, g, record, &req).await
    }
}

fn timeout_error(app: &App) -> ApiError {
    ApiError::timeout(format!(
        "the request took longer than the server's timeout of {} s",
        app.request_timeout.map_or(0, |t| t.as_secs())
    ))
}

/// A plain (non-streaming) answer.
async fn complete(
    app: &Arc<App>,
    mut g: Generating,
    mut rec: Record,
    req: &ChatRequest,
) -> Result<Response, ApiError> {
    let mut filter = StopFilter::new(req.stop.clone());
    let mut text = String::new();
    let finished = loop {
        match next(&mut g).await {
            Got::Token(piece) => {
                rec.token(&app.metrics);
                text.push_str(&filter.push(&piece));
                if filter.stopped() {
                    g.cancel();
                }
            }
            Got::Done(f) => break f,
            Got::Failed(e) => {
                rec.end(&app.metrics, 500, "error");
                return Err(ApiError::from_engine(e));
            }
        }
    };
    text.push_str(&filter.finish());
    rec.cached = finished.stats.reused_positions;
    let Some(reason) = finish_reason(finished.stop, filter.stopped()) else {
        rec.end(&app.metrics, 504, finished.stop.as_str());
        return Err(timeout_error(app));
    };
    rec.end(&app.metrics, 200, reason);
    Ok(Json(json!({
        "id": rec.id,
        "object": "chat.completion",
        "created": unix_now(),
        "model": app.model_id,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": reason,
            "logprobs": null,
        }],
        "usage": rec.usage(),
        "system_fingerprint": null,
    }))
    .into_response())
}

/// The chunks of a streamed answer still to send, and what makes them.
struct Streaming {
    app: Arc<App>,
    g: Generating,
    rec: Record,
    filter: StopFilter,
    include_usage: bool,
    created: u64,
    /// events made and not yet sent
    queue: std::collections::VecDeque<Event>,
    done: bool,
    _cancel: CancelOnDrop,
}

impl Streaming {
    fn chunk(&self, delta: Value, finish: Option<&str>) -> Event {
        let mut c = json!({
            "id": self.rec.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.app.model_id,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}],
        });
        if self.include_usage {
            c["usage"] = Value::Null;
        }
        Event::default().data(c.to_string())
    }

    fn content(&mut self, text: &str) {
        if !text.is_empty() {
            let e = self.chunk(json!({"content": text}), None);
            self.queue.push_back(e);
        }
    }

    /// The last chunks: the finish reason (or an error), usage if asked, `[DONE]`.
    fn end(&mut self, finished: Option<&Finished>, error: Option<ApiError>) {
        let tail = self.filter.finish();
        self.content(&tail);
        if let Some(f) = finished {
            self.rec.cached = f.stats.reused_positions;
        }
        let reason = finished.and_then(|f| finish_reason(f.stop, self.filter.stopped()));
        let error = match (reason, error, finished) {
            (Some(_), _, _) => None,
            (None, Some(e), _) => Some(e),
            (None, None, Some(f)) if f.stop == StopReason::Deadline => {
                Some(timeout_error(&self.app))
            }
            (None, None, _) => Some(ApiError::invalid("the request was cancelled")),
        };
        match (&error, reason) {
            (Some(e), _) => {
                self.queue
                    .push_back(Event::default().data(e.body().to_string()));
                self.rec.end(&self.app.metrics, e.status.as_u16(), "error");
            }
            (None, Some(r)) => {
                let e = self.chunk(json!({}), Some(r));
                self.queue.push_back(e);
                self.rec.end(&self.app.metrics, 200, r);
            }
            (None, None) => unreachable!("an error is made above"),
        }
        if self.include_usage && error.is_none() {
            let u = json!({
                "id": self.rec.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.app.model_id,
                "choices": [],
                "usage": self.rec.usage(),
            });
            self.queue.push_back(Event::default().data(u.to_string()));
        }
        self.queue.push_back(Event::default().data("[DONE]"));
        self.done = true;
    }

    /// Takes the engine's next event into chunks.
    async fn advance(&mut self) {
        match next(&mut self.g).await {
            Got::Token(piece) => {
                self.rec.token(&self.app.metrics);
                let safe = self.filter.push(&piece);
                self.content(&safe);
                if self.filter.stopped() {
                    self.g.cancel();
                }
            }
            Got::Done(f) => self.end(Some(&f), None),
            Got::Failed(e) => self.end(None, Some(ApiError::from_engine(e))),
        }
    }
}

impl Drop for Streaming {
    /// A stream dropped before its end: the client went away (the engine
    /// stops the generation and frees its KV as `g` drops).
    fn drop(&mut self) {
        if !self.done {
            self.rec.end(&self.app.metrics, 499, "disconnected");
        }
    }
}

/// A streamed answer. The first event is awaited before the response starts,
/// so a request that fails or times out before its first token still gets
/// its own status code.
async fn stream(
    app: Arc<App>,
    g: Generating,
    rec: Record,
    req: &ChatRequest,
    cancel: CancelOnDrop,
) -> Result<Response, ApiError> {
    let mut s = Streaming {
        created: unix_now(),
        app,
        g,
        rec,
        filter: StopFilter::new(req.stop.clone()),
        include_usage: req.include_usage,
        queue: Default::default(),
        done: false,
        _cancel: cancel,
    };
    let first = next(&mut s.g).await;
    match first {
        Got::Failed(e) => {
            let e = ApiError::from_engine(e);
            s.rec.end(&s.app.metrics, e.status.as_u16(), "error");
            return Err(e);
        }
        Got::Done(f) if f.tokens.is_empty() && finish_reason(f.stop, false).is_none() => {
            let e = match f.stop {
                StopReason::Deadline => timeout_error(&s.app),
                _ => ApiError::invalid("the request was cancelled"),
            };
            s.rec.end(&s.app.metrics, e.status.as_u16(), "error");
            return Err(e);
        }
        _ => {}
    }
    let role = s.chunk(json!({"role": "assistant", "content": ""}), None);
    s.queue.push_back(role);
    match first {
        Got::Token(piece) => {
            s.rec.token(&s.app.metrics);
            let safe = s.filter.push(&piece);
            s.content(&safe);
            if s.filter.stopped() {
                s.g.cancel();
            }
        }
        Got::Done(f) => s.end(Some(&f), None),
        Got::Failed(_) => unreachable!("handled above"),
    }
    let events = futures_util::stream::unfold(s, |mut s| async move {
        loop {
            if let Some(e) = s.queue.pop_front() {
                return Some((Ok::<_, Infallible>(e), s));
            }
            if s.done {
                return None;
            }
            s.advance().await;
        }
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}
