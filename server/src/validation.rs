//! Checking a chat completion request before anything is queued: every field
//! typed and in range (unknown ones refused, except those the API documents
//! as ignorable), the messages in a shape the template renders, pictures
//! decoded from their data URLs and counted against the context before any is
//! encoded. The CPU-heavy part (tokenizing, decoding pictures, encoding them)
//! runs on the blocking pool, never on the async threads.

use std::sync::Arc;

use base64::Engine as _;
use mipha_models::image::{decode_bytes, preprocess, DecodeOptions};
use mipha_models::{
    CancelToken, Engine, ImageEmbeds, Message, Part, PromptId, PromptItem, Role, SamplingParams,
};
use serde_json::{Map, Value};

use crate::error::ApiError;

/// Fields the API documents as optional hints a server may ignore.
const IGNORED: &[&str] = &[
    "user",
    "store",
    "metadata",
    "service_tier",
    "parallel_tool_calls",
    "modalities",
];

/// Most stop strings, as OpenAI allows.
const MAX_STOP: usize = 4;

/// A request, checked.
#[derive(Debug)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    /// the pictures' bytes, in order of appearance
    pub images: Vec<Vec<u8>>,
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub ignore_eos: bool,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

/// Parses and checks a request body; `model` is the one this server runs.
pub fn parse(body: &[u8], model: &str) -> Result<ChatRequest, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("the body is not valid JSON: {e}")))?;
    let Value::Object(obj) = v else {
        return Err(ApiError::invalid("the body must be a JSON object"));
    };
    let mut r = ChatRequest {
        messages: Vec::new(),
        images: Vec::new(),
        max_tokens: None,
        // OpenAI's defaults: temperature 1, no top-p cut.
        sampling: SamplingParams {
            temperature: 1.0,
            seed: random_seed(),
            ..Default::default()
        },
        ignore_eos: false,
        stop: Vec::new(),
        stream: false,
        include_usage: false,
    };
    let mut saw_messages = false;
    for (key, value) in &obj {
        let k = key.as_str();
        match k {
            "model" => {
                let m = string(k, value)?;
                if m != model {
                    return Err(ApiError::model_not_found(m, model));
                }
            }
            "messages" => {
                saw_messages = true;
                messages(value, &mut r)?;
            }
            "max_tokens" | "max_completion_tokens" => {
                if !value.is_null() {
                    let n = integer(k, value, 1, u32::MAX as i64)?;
                    r.max_tokens = Some(n as usize);
                }
            }
            "temperature" => r.sampling.temperature = number(k, value, 0.0, 2.0, 1.0)?,
            "top_p" => {
                let p = number(k, value, 0.0, 1.0, 1.0)?;
                if p == 0.0 {
                    return Err(ApiError::param(k, "`top_p` must be above 0"));
                }
                r.sampling.top_p = p;
            }
            "top_k" => {
                if !value.is_null() {
                    r.sampling.top_k = integer(k, value, 0, u32::MAX as i64)? as usize;
                }
            }
            "min_p" => r.sampling.min_p = number(k, value, 0.0, 1.0, 0.0)?,
            "repeat_penalty" => {
                let p = number(k, value, 0.0, 100.0, 1.0)?;
                if p == 0.0 {
                    return Err(ApiError::param(k, "`repeat_penalty` must be above 0"));
                }
                r.sampling.repeat_penalty = p;
            }
            "presence_penalty" => r.sampling.presence_penalty = number(k, value, -2.0, 2.0, 0.0)?,
            "frequency_penalty" => r.sampling.frequency_penalty = number(k, value, -2.0, 2.0, 0.0)?,
            "seed" => {
                if !value.is_null() {
                    let s = value
                        .as_i64()
                        .map(|s| s as u64)
                        .or_else(|| value.as_u64())
                        .ok_or_else(|| ApiError::param(k, "`seed` must be an integer"))?;
                    r.sampling.seed = s;
                }
            }
            "stop" => r.stop = stop(value)?,
            "stream" => r.stream = boolean(k, value)?,
            "stream_options" => {
                if !value.is_null() {
                    let o = object(k, value)?;
                    for (ok, ov) in o {
                        match ok.as_str() {
                            "include_usage" => {
                                r.include_usage = boolean("stream_options.include_usage", ov)?
                            }
                            other => {
                                return Err(ApiError::param(
                                    "stream_options",
                                    format!("unknown stream option `{other}`"),
                                ))
                            }
                        }
                    }
                }
            }
            "n" => {
                if !value.is_null() && integer(k, value, 1, i64::MAX)? != 1 {
                    return Err(ApiError::param(
                        k,
                        "this server makes one choice per request: `n` must be 1",
                    ));
                }
            }
            "ignore_eos" => r.ignore_eos = boolean(k, value)?,
            "logprobs" => {
                if !value.is_null() && boolean(k, value)? {
                    return Err(ApiError::param(k, "log probabilities are not supported"));
                }
            }
            "top_logprobs" => {
                if !value.is_null() && integer(k, value, 0, 20)? != 0 {
                    return Err(ApiError::param(k, "log probabilities are not supported"));
                }
            }
            "response_format" => {
                if !value.is_null() {
                    let o = object(k, value)?;
                    if o.get("type").and_then(Value::as_str) != Some("text") {
                        return Err(ApiError::param(
                            k,
                            "only `{\"type\": \"text\"}` responses are supported",
                        ));
                    }
                }
            }
            "logit_bias" => {
                if !value.is_null() && !object(k, value)?.is_empty() {
                    return Err(ApiError::param(k, "`logit_bias` is not supported"));
                }
            }
            "tools" | "tool_choice" | "functions" | "function_call" => {
                if !value.is_null() {
                    return Err(ApiError::param(
                        k,
                        "tools and function calls are not supported",
                    ));
                }
            }
            _ if IGNORED.contains(&k) => {}
            other => {
                return Err(ApiError::param(
                    other,
                    format!("unknown parameter `{other}`"),
                ))
            }
        }
    }
    if !saw_messages {
        return Err(ApiError::param("messages", "`messages` is required"));
    }
    Ok(r)
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // A fresh random state per call: OpenAI's sampling without a seed differs
    // from request to request.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x5eed);
    h.finish()
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn string<'a>(k: &str, v: &'a Value) -> Result<&'a str, ApiError> {
    v.as_str()
        .ok_or_else(|| ApiError::param(k, format!("`{k}` must be a string, not {}", type_name(v))))
}

fn boolean(k: &str, v: &Value) -> Result<bool, ApiError> {
    match v {
        Value::Null => Ok(false),
        Value::Bool(b) => Ok(*b),
        _ => Err(ApiError::param(
            k,
            format!("`{k}` must be a boolean, not {}", type_name(v)),
        )),
    }
}

fn object<'a>(k: &str, v: &'a Value) -> Result<&'a Map<String, Value>, ApiError> {
    v.as_object()
        .ok_or_else(|| ApiError::param(k, format!("`{k}` must be an object, not {}", type_name(v))))
}

/// A number in `lo..=hi`; `null` gives `default`.
fn number(k: &str, v: &Value, lo: f32, hi: f32, default: f32) -> Result<f32, ApiError> {
    if v.is_null() {
        return Ok(default);
    }
    let x = v.as_f64().ok_or_else(|| {
        ApiError::param(k, format!("`{k}` must be a number, not {}", type_name(v)))
    })?;
    if !(x >= lo as f64 && x <= hi as f64) {
        return Err(ApiError::param(
            k,
            format!("`{k}` must be between {lo} and {hi}, got {x}"),
        ));
    }
    Ok(x as f32)
}

fn integer(k: &str, v: &Value, lo: i64, hi: i64) -> Result<i64, ApiError> {
    let x = v.as_i64().ok_or_else(|| {
        ApiError::param(k, format!("`{k}` must be an integer, not {}", type_name(v)))
    })?;
    if x < lo || x > hi {
        return Err(ApiError::param(
            k,
            format!("`{k}` must be between {lo} and {hi}, got {x}"),
        ));
    }
    Ok(x)
}

fn stop(v: &Value) -> Result<Vec<String>, ApiError> {
    let list: Vec<String> = match v {
        Value::Null => Vec::new(),
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .map(|s| string("stop", s).map(str::to_string))
            .collect::<Result<_, _>>()?,
        other => {
            return Err(ApiError::param(
                "stop",
                format!(
                    "`stop` must be a string or an array of strings, not {}",
                    type_name(other)
                ),
            ))
        }
    };
    if list.len() > MAX_STOP {
        return Err(ApiError::param(
            "stop",
            format!("at most {MAX_STOP} stop strings, got {}", list.len()),
        ));
    }
    if list.iter().any(String::is_empty) {
        return Err(ApiError::param("stop", "a stop string must not be empty"));
    }
    Ok(list)
}

fn messages(v: &Value, r: &mut ChatRequest) -> Result<(), ApiError> {
    let list = v.as_array().ok_or_else(|| {
        ApiError::param(
            "messages",
            format!("`messages` must be an array, not {}", type_name(v)),
        )
    })?;
    if list.is_empty() {
        return Err(ApiError::param("messages", "`messages` must not be empty"));
    }
    for (i, m) in list.iter().enumerate() {
        let at = format!("messages[{i}]");
        let m = object(&at, m)?;
        let role = match m.get("role").and_then(Value::as_str) {
            Some("system") | Some("developer") => Role::System,
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            Some(other) => {
                return Err(ApiError::param(
                    &format!("{at}.role"),
                    format!("unknown role `{other}` (expected system, user or assistant)"),
                ))
            }
            None => {
                return Err(ApiError::param(
                    &format!("{at}.role"),
                    format!("{at} has no `role` string"),
                ))
            }
        };
        let mut content = Vec::new();
        for (key, value) in m {
            match key.as_str() {
                "role" | "name" => {}
                "content" => content = parts(&at, value, r)?,
                "tool_calls" | "function_call" | "tool_call_id" => {
                    if !value.is_null() {
                        return Err(ApiError::param(
                            &format!("{at}.{key}"),
                            "tools and function calls are not supported",
                        ));
                    }
                }
                other => {
                    return Err(ApiError::param(
                        &format!("{at}.{other}"),
                        format!("unknown message field `{other}`"),
                    ))
                }
            }
        }
        r.messages.push(Message { role, content });
    }
    Ok(())
}

fn parts(at: &str, v: &Value, r: &mut ChatRequest) -> Result<Vec<Part>, ApiError> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::String(s) => Ok(vec![Part::Text(s.clone())]),
        Value::Array(list) => {
            let mut out = Vec::with_capacity(list.len());
            for (j, p) in list.iter().enumerate() {
                let pat = format!("{at}.content[{j}]");
                let p = object(&pat, p)?;
                match p.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        let t = p
                            .get("text")
                            .ok_or_else(|| ApiError::param(&pat, format!("{pat} has no `text`")))?;
                        out.push(Part::Text(string(&format!("{pat}.text"), t)?.to_string()));
                    }
                    Some("image_url") => {
                        let u = p.get("image_url").ok_or_else(|| {
                            ApiError::param(&pat, format!("{pat} has no `image_url`"))
                        })?;
                        // Either {"url": ...} (OpenAI) or the URL string itself.
                        let url = match u {
                            Value::String(s) => s.as_str(),
                            Value::Object(o) => {
                                o.get("url").and_then(Value::as_str).ok_or_else(|| {
                                    ApiError::param(
                                        &pat,
                                        format!("{pat}.image_url has no `url` string"),
                                    )
                                })?
                            }
                            other => {
                                return Err(ApiError::param(
                                    &pat,
                                    format!(
                                        "{pat}.image_url must be an object, not {}",
                                        type_name(other)
                                    ),
                                ))
                            }
                        };
                        r.images.push(data_url(&pat, url)?);
                        out.push(Part::Image);
                    }
                    Some(other) => {
                        return Err(ApiError::param(
                            &pat,
                            format!(
                            "unsupported content part type `{other}` (expected text or image_url)"
                        ),
                        ))
                    }
                    None => return Err(ApiError::param(&pat, format!("{pat} has no `type`"))),
                }
            }
            Ok(out)
        }
        other => Err(ApiError::param(
            &format!("{at}.content"),
            format!(
                "content must be a string or an array of parts, not {}",
                type_name(other)
            ),
        )),
    }
}

/// The bytes of a `data:image/...;base64,...` URL.
fn data_url(at: &str, url: &str) -> Result<Vec<u8>, ApiError> {
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https:/") {
        return Err(ApiError::param(
            at,
            "remote image URLs are not fetched (this server makes no outbound requests): send \
             the picture inline as a data URL, `data:image/png;base64,...`",
        ));
    }
    let Some(rest) = url.strip_prefix("data:") else {
        return Err(ApiError::param(
            at,
            "an image URL must be a data URL, `data:image/<format>;base64,<data>`",
        ));
    };
    let Some((meta, data)) = rest.split_once(',') else {
        return Err(ApiError::param(
            at,
            "a data URL needs a comma before its data",
        ));
    };
    if !meta.starts_with("image/") || !meta.ends_with(";base64") {
        return Err(ApiError::param(
            at,
            format!("the data URL says `{meta}`: expected `image/<format>;base64`"),
        ));
    }
    base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| ApiError::param(at, format!("the data URL's base64 is invalid: {e}")))
}

/// A request ready for the engine: its prompt with pictures encoded.
pub struct Prepared {
    pub prompt: Vec<PromptItem>,
    pub prompt_positions: usize,
}

/// Renders, tokenizes and checks the length, then decodes and encodes the
/// pictures (cancelled through `cancel` between the encoder's slices). Blocks:
/// run it on the blocking pool.
pub fn prepare(
    r: &ChatRequest,
    engine: &Arc<Engine>,
    cancel: &CancelToken,
) -> Result<Prepared, ApiError> {
    // Bounds first: neither a huge text is tokenized nor a picture decoded
    // when the request cannot be served anyway.
    let text_bytes: usize = r
        .messages
        .iter()
        .flat_map(|m| &m.content)
        .map(|p| match p {
            Part::Text(t) => t.len(),
            Part::Image => 0,
        })
        .sum();
    engine
        .check_text_len(text_bytes)
        .and_then(|()| engine.check_image_count(r.images.len()))
        .map_err(|e| match e {
            mipha_runtime::Error::TextTooLong { .. } => ApiError::from_engine(e),
            _ => ApiError::param("messages", e.to_string()),
        })?;
    let segments = engine
        .template()
        .render_messages(&r.messages)
        .map_err(|e| ApiError::param("messages", e))?;
    let ids = engine
        .tokenizer()
        .encode_segments(&segments)
        .map_err(|e| ApiError::param("messages", e.to_string()))?;
    let patches = engine.vision_config().map_or(0, |v| v.num_patches());
    if !r.images.is_empty() && engine.image_config().is_none() {
        return Err(ApiError::param(
            "messages",
            "this model has no vision tower: it takes no pictures",
        ));
    }
    let positions: usize = ids
        .iter()
        .map(|id| match id {
            PromptId::Token(_) => 1,
            PromptId::Image(_) => patches,
        })
        .sum();
    let context = engine.context_length();
    // Before any picture is encoded (each costs seconds on a CPU).
    if positions >= context {
        let mut e = ApiError::param(
            "messages",
            format!(
                "the prompt takes {positions} positions ({} pictures of {patches}), the context \
                 holds {context} and the answer needs at least one more",
                r.images.len()
            ),
        );
        e.code = Some("context_length_exceeded");
        return Err(e);
    }
    let cfg = engine.image_config();
    let mut embeds: Vec<ImageEmbeds> = Vec::with_capacity(r.images.len());
    for (i, bytes) in r.images.iter().enumerate() {
        let cfg = cfg.expect("checked above");
        let label = format!("picture {i}");
        let opts = DecodeOptions {
            limits: engine.options().image_limits.decode_limits(),
            ..DecodeOptions::default()
        };
        let decoded = decode_bytes(bytes, &label, &opts)
            .map_err(|e| ApiError::param("messages", e.to_string()))?;
        let img = preprocess(&decoded.image, cfg);
        let (e, _) = engine
            .encode_image_cached(&img.pixels, Some(cancel))
            .map_err(ApiError::from_engine)?;
        embeds.push(e);
    }
    let prompt = ids
        .iter()
        .map(|id| match id {
            PromptId::Token(t) => PromptItem::Token(*t),
            PromptId::Image(i) => PromptItem::Image(embeds[*i].clone()),
        })
        .collect();
    Ok(Prepared {
        prompt,
        prompt_positions: positions,
    })
}
