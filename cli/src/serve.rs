//! `mipha-cli serve`: the OpenAI-compatible HTTP server (`mipha-server`).

use std::time::Duration;

use clap::Args;
use mipha_models::KvDtype;

use crate::ModelArgs;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free one; the address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer <key>` on /v1/* (also from MIPHA_API_KEY).
    #[arg(long, env = "MIPHA_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Requests that may wait to start; more get 503 with Retry-After.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_queue: u64,
    /// Sequences decoded together (continuous batching), like llama-server's -np.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=512))]
    max_sequences: u64,
    /// Seconds a request may take, queue and pictures included (0: no limit).
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    request_timeout: u64,
    /// The model's name in /v1/models and in requests (default: the --model
    /// file's name without its extension, or the hub id).
    #[arg(long)]
    model_name: Option<String>,
    /// Largest request body in MiB (pictures come inline as base64).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=4096))]
    max_body_mb: u64,
    /// Seconds requests in flight get to finish after SIGTERM or Ctrl-C.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=3600))]
    shutdown_grace: u64,
    /// Waits this long before loading (tests of readiness probes).
    #[arg(long, default_value_t = 0, hide = true)]
    load_delay_ms: u64,
}

pub fn serve(a: ServeArgs) -> crate::CliResult {
    let model_id = a.model_name.clone().unwrap_or_else(|| {
        let m = a.model.model.trim_end_matches('/');
        let path = std::path::Path::new(m);
        if path.exists() {
            path.file_stem()
                .map_or(m.to_string(), |s| s.to_string_lossy().into_owned())
        } else {
            m.to_string()
        }
    });
    let options = mipha_server::ServerOptions {
        host: a.host.clone(),
        port: a.port,
        model_id,
        api_key: a.api_key.clone().filter(|k| !k.is_empty()),
        request_timeout: (a.request_timeout > 0).then(|| Duration::from_secs(a.request_timeout)),
        body_limit: (a.max_body_mb as usize) << 20,
        shutdown_grace: Duration::from_secs(a.shutdown_grace),
    };
    let max_queue = a.max_queue as usize;
    let max_sequences = a.max_sequences as usize;
    let model = a.model;
    let delay = Duration::from_millis(a.load_delay_ms);
    mipha_server::run(options, move || {
        std::thread::sleep(delay);
        crate::load_with(&model, 1, 512.max(max_sequences), KvDtype::F16, |o| {
            o.max_queue = max_queue;
            o.max_sequences = max_sequences;
        })
    })?;
    Ok(())
}
