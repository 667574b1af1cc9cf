//! An OpenAI-compatible HTTP server for Mipha (`mipha-cli serve`), laid out
//! like text-generation-inference's router, one concern per file:
//!
//! * [`validation`]: every request field checked, the messages rendered with
//!   the model's template, pictures decoded and counted against the context
//!   before any is encoded (on the blocking pool);
//! * [`infer`]: generation options, stop strings, finish reasons;
//! * [`http`]: routes, authentication, plain and streamed (SSE) answers;
//! * [`metrics`]: the Prometheus exposition;
//! * [`error`]: errors in OpenAI's shape with their status codes.
//!
//! The queue and the batching scheduler are the engine's own
//! (`mipha_models::Engine`, `docs/scheduler.md`): this crate never blocks an
//! async thread on compute, and a request whose client disconnects is
//! cancelled and its KV freed.

pub mod error;
pub mod http;
pub mod infer;
pub mod metrics;
pub mod validation;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mipha_models::{Engine, EngineOptions};

pub use http::App;

/// How `mipha-cli serve` runs.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    pub host: String,
    pub port: u16,
    /// the model's name in `/v1/models` and in requests' `model`
    pub model_id: String,
    /// required as `Authorization: Bearer <key>` on `/v1/*` when set
    pub api_key: Option<String>,
    /// a request (queue, pictures, generation) is ended after this long
    pub request_timeout: Option<Duration>,
    /// largest request body accepted (pictures are inline)
    pub body_limit: usize,
    /// after SIGTERM or Ctrl-C, in-flight requests get this long to finish
    pub shutdown_grace: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            host: "127.0.0.1".into(),
            port: 8080,
            model_id: "mipha".into(),
            api_key: None,
            request_timeout: Some(Duration::from_secs(600)),
            body_limit: 32 << 20,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// Binds, prints the address, loads the model (`load` runs on a thread of
/// its own: the server answers `/health` meanwhile, and `/ready` once it is
/// done), then serves until SIGTERM or Ctrl-C, letting requests in flight
/// finish within the grace period.
pub fn run(
    options: ServerOptions,
    load: impl FnOnce() -> Result<Engine, String> + Send + 'static,
) -> Result<(), String> {
    init_logs();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("mipha-http")
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    rt.block_on(async move {
        let addr = format!("{}:{}", options.host, options.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let local = listener
            .local_addr()
            .map_err(|e| format!("cannot read the bound address: {e}"))?;
        announce(local);
        let app = Arc::new(App::new(
            options.model_id.clone(),
            options.api_key.clone(),
            options.request_timeout,
            options.body_limit,
        ));
        let loading = app.clone();
        std::thread::Builder::new()
            .name("mipha-load".into())
            .spawn(move || match load() {
                Ok(engine) => {
                    tracing::info!(device = engine.device(), "model loaded, ready");
                    loading.set_engine(Arc::new(engine));
                }
                Err(e) => {
                    tracing::error!(error = %e, "the model failed to load");
                    loading.set_failed(e);
                }
            })
            .map_err(|e| format!("cannot start the loading thread: {e}"))?;
        serve(listener, app, options.shutdown_grace, shutdown_signal()).await
    })
}

/// Serves `app` on `listener` until `stop` completes, then lets requests in
/// flight finish for up to `grace`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Arc<App>,
    grace: Duration,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let (tx, mut rx) = tokio::sync::watch::channel(false);
    let router = http::router(app.clone());
    let server = axum::serve(listener, router).with_graceful_shutdown(async move {
        let _ = rx.changed().await;
    });
    let stopping = async move {
        stop.await;
        tracing::info!(
            grace_s = grace.as_secs_f64(),
            "shutting down: no new connections, requests in flight may finish"
        );
        app.set_stopping();
        let _ = tx.send(true);
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        r = server => r.map_err(|e| format!("the server stopped: {e}")),
        _ = stopping => {
            tracing::warn!("the grace period ended with requests still in flight");
            Ok(())
        }
    }
}

fn announce(addr: SocketAddr) {
    use std::io::Write;
    // On stdout, first, so a parent process (or a test) can read it.
    println!("listening on http://{addr}");
    let _ = std::io::stdout().flush();
}

/// SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default: this crate at info).
fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("mipha_server=info"));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// Engine options for a server: the queue and KV budget from the flags.
pub fn engine_options(
    mut base: EngineOptions,
    max_queue: usize,
    kv_cache_mb: usize,
) -> EngineOptions {
    base.max_queue = max_queue;
    base.kv_cache = mipha_models::KvCacheSize::Mib(kv_cache_mb);
    base
}
