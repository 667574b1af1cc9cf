//! Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`,
//! each with its HTTP status.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use mipha_runtime::Error as EngineError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, ...
    pub kind: &'static str,
    pub message: String,
    /// the request field at fault
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// seconds for a `Retry-After` header
    pub retry_after: Option<u32>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 400 for a request that is wrong.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 naming the field at fault.
    pub fn param(param: &str, message: impl Into<String>) -> Self {
        let mut e = Self::invalid(message);
        e.param = Some(param.to_string());
        e
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::UNAUTHORIZED, "authentication_error", message);
        e.code = Some("invalid_api_key");
        e
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found_error", message)
    }

    pub fn model_not_found(model: &str, served: &str) -> Self {
        let mut e = Self::not_found(format!(
            "the model `{model}` does not exist here (this server runs `{served}`)"
        ));
        e.param = Some("model".into());
        e.code = Some("model_not_found");
        e
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body is over the limit of {limit} bytes"),
        )
    }

    /// 503 with `Retry-After`: the queue is full, or the model is still loading.
    pub fn unavailable(message: impl Into<String>, retry_after: u32) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_busy", message);
        e.retry_after = Some(retry_after);
        e
    }

    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(StatusCode::GATEWAY_TIMEOUT, "timeout", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// Maps an engine error to what the client did wrong, or to a server fault.
    pub fn from_engine(e: EngineError) -> Self {
        match e {
            EngineError::Busy { .. } => Self::unavailable(e.to_string(), 1),
            EngineError::ContextOverflow { .. } | EngineError::TextTooLong { .. } => {
                let mut err = Self::param("messages", e.to_string());
                err.code = Some("context_length_exceeded");
                err
            }
            EngineError::Cancelled(_) => Self::invalid(e.to_string()),
            EngineError::Config(_) | EngineError::Other(_) | EngineError::KvCacheFull { .. } => {
                // Request-shaped problems reach here already checked; what is
                // left is ours.
                Self::internal(e.to_string())
            }
            other => Self::internal(other.to_string()),
        }
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}
