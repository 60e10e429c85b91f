//! The HTTP edge: OpenAI chat-completion requests to the core's [`GenerateParams`], the
//! core's events to OpenAI response and chunk objects, and service errors to OpenAI
//! error bodies with their status codes.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use gemmad_engine::FinishReason;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::core::types::{
    AudioFormat, Finished, GenerateParams, Message, Part, Priority, Sampling, SliceInfo,
};
use crate::core::ServiceError;

/// An error as OpenAI clients expect it: a status, and
/// `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
    /// For 429 and 503: sent as `Retry-After` (whole seconds) and `retry-after-ms`.
    pub retry_after: Option<Duration>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 400 invalid_request_error naming the offending parameter.
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param),
            ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn model_not_found(model: &str, offered: &[String]) -> Self {
        ApiError {
            param: Some("model"),
            code: Some("model_not_found"),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!(
                    "The model {:?} does not exist; GET /v1/models lists them: {}",
                    shorten(model),
                    offered.join(", ")
                ),
            )
        }
    }

    /// The inner error object (also what a failed stream sends as its last event).
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        let kind = e.kind();
        match e {
            ServiceError::InvalidArgument(m) => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", m)
            }
            // Media the model cannot run (no tower or encoder yet): the request is fine
            // for another model, not for this one; OpenAI answers 400 for that too.
            ServiceError::ModalityUnavailable(m) | ServiceError::FailedPrecondition(m) => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", m).code(kind)
            }
            ServiceError::ResourceExhausted {
                message,
                retry_after,
            } => ApiError {
                retry_after: Some(retry_after),
                ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
                    .code(kind)
            },
            ServiceError::Unavailable(m) => ApiError {
                retry_after: Some(Duration::from_secs(5)),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", m).code(kind)
            },
            ServiceError::PermissionDenied(m) => {
                ApiError::new(StatusCode::FORBIDDEN, "permission_error", m).code(kind)
            }
            ServiceError::Internal(m) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", m).code(kind)
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = json_response(self.status, &self.body());
        let h = r.headers_mut();
        if let Some(d) = self.retry_after {
            let secs = d.as_millis().div_ceil(1000).max(1);
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                h.insert(header::RETRY_AFTER, v);
            }
            if let Ok(v) = HeaderValue::from_str(&d.as_millis().to_string()) {
                h.insert("retry-after-ms", v);
            }
        }
        // Clients retry 5xx (and 429) by default; a request that cannot succeed as sent
        // should not be sent three times.
        let retry = matches!(
            self.status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        );
        h.insert(
            "x-should-retry",
            HeaderValue::from_static(if retry { "true" } else { "false" }),
        );
        if self.status == StatusCode::UNAUTHORIZED {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

/// `value` as a JSON response with `status`.
pub fn json_response(status: StatusCode, value: &Value) -> Response {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = (status, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// At most 64 characters of a client's string, for an error message.
fn shorten(s: &str) -> String {
    match s.char_indices().nth(64) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// `stop`: one string or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// `POST /v1/chat/completions`. Fields not listed here are ignored (`user`,
/// `presence_penalty`, `metadata`, `store`, ...); see docs/http.md.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Option<Vec<Value>>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<i64>,
    pub response_format: Option<Value>,
    pub tools: Option<Vec<Value>>,
    pub logprobs: Option<bool>,
    // Extras other local servers (llama.cpp) accept.
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub ignore_eos: Option<bool>,
}

/// What a chat request asks for besides the core's parameters.
#[derive(Debug)]
pub struct ChatCall {
    pub params: GenerateParams,
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
}

/// Which model ids a request may name: the slices, and the model's own name (the
/// active slice).
pub struct Models<'a> {
    pub name: &'a str,
    pub slices: &'a [SliceInfo],
}

impl Models<'_> {
    /// Every id, the model's name first.
    pub fn ids(&self) -> Vec<String> {
        let mut ids = vec![self.name.to_string()];
        for s in self.slices {
            if s.name != self.name {
                ids.push(s.name.clone());
            }
        }
        ids
    }

    /// The `size` a model id asks the core for: a slice by name, or "auto" (the active
    /// slice) for the model's name; `None` for an unknown id.
    pub fn size_of(&self, id: &str) -> Option<String> {
        if self.slices.iter().any(|s| s.name == id) {
            Some(id.to_string())
        } else if id == self.name {
            Some(String::new())
        } else {
            None
        }
    }
}

/// Parses a chat-completion body into the core's parameters.
pub fn chat_request(body: &[u8], models: &Models<'_>) -> Result<ChatCall, ApiError> {
    let r: ChatRequest = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("the body is not a valid chat completion request: {e}"),
        )
    })?;
    let model = match r.model {
        Some(m) if !m.is_empty() => m,
        _ => return Err(ApiError::invalid("model", "model is required")),
    };
    let size = models
        .size_of(&model)
        .ok_or_else(|| ApiError::model_not_found(&model, &models.ids()))?;
    if let Some(n) = r.n {
        if n != 1 {
            return Err(ApiError::invalid(
                "n",
                format!("n = {n}: only one choice per request (n = 1) is supported"),
            ));
        }
    }
    if let Some(f) = &r.response_format {
        let t = f.get("type").and_then(Value::as_str).unwrap_or("");
        if t != "text" {
            return Err(ApiError::invalid(
                "response_format",
                format!("response_format type {t:?} is not supported; only \"text\""),
            ));
        }
    }
    if r.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::invalid("tools", "tools are not supported"));
    }
    if r.logprobs == Some(true) {
        return Err(ApiError::invalid("logprobs", "logprobs are not supported"));
    }
    let messages = r
        .messages
        .ok_or_else(|| ApiError::invalid("messages", "messages is required"))?;
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "messages is empty: send at least one message",
        ));
    }
    let messages = messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| message(m, i))
        .collect::<Result<Vec<_>, _>>()?;
    let max_tokens = match r.max_completion_tokens.or(r.max_tokens) {
        None => 0,
        Some(n) if n < 1 => {
            return Err(ApiError::invalid(
                "max_tokens",
                format!("max_tokens = {n}: must be at least 1"),
            ))
        }
        Some(n) => u32::try_from(n).unwrap_or(u32::MAX),
    };
    if let Some(t) = r.temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(ApiError::invalid(
                "temperature",
                format!("temperature = {t}: must be between 0 and 2"),
            ));
        }
    }
    if let Some(p) = r.top_p {
        if !(0.0..=1.0).contains(&p) {
            return Err(ApiError::invalid(
                "top_p",
                format!("top_p = {p}: must be between 0 and 1"),
            ));
        }
    }
    let top_k =
        match r.top_k {
            None => None,
            Some(k) => Some(u32::try_from(k).map_err(|_| {
                ApiError::invalid("top_k", format!("top_k = {k}: must be 0 or more"))
            })?),
        };
    let stop = match r.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    let include_usage = r
        .stream_options
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    Ok(ChatCall {
        params: GenerateParams {
            messages,
            sampling: Sampling {
                temperature: r.temperature.map(|t| t as f32),
                top_k,
                top_p: r.top_p.map(|p| p as f32),
                min_p: r.min_p.map(|p| p as f32),
                repetition_penalty: r.repetition_penalty.map(|p| p as f32),
                // Any 64-bit value is a seed; negative ones keep their bits.
                seed: r.seed.map(|s| s as u64),
            },
            max_tokens,
            stop,
            size,
            priority: Priority::Interactive,
            ignore_eos: r.ignore_eos.unwrap_or(false),
            raw: false,
            no_prompt_cache: false,
        },
        model,
        stream: r.stream.unwrap_or(false),
        include_usage,
    })
}

/// One message: its role (`developer` is `system`) and its content, a string or parts.
fn message(m: Value, i: usize) -> Result<Message, ApiError> {
    let bad = |msg: String| ApiError::invalid("messages", format!("messages[{i}]: {msg}"));
    let Value::Object(mut m) = m else {
        return Err(bad("not an object".into()));
    };
    let role = match m.get("role").and_then(Value::as_str) {
        Some("developer") | Some("system") => "system",
        Some("user") => "user",
        Some("assistant") => "assistant",
        Some(r @ ("tool" | "function")) => {
            return Err(bad(format!("role {r:?}: tools are not supported")))
        }
        Some(other) => {
            return Err(bad(format!(
                "role {:?} is not one of system, developer, user, assistant",
                shorten(other)
            )))
        }
        None => return Err(bad("role is required".into())),
    };
    let parts = match m.remove("content") {
        None | Some(Value::Null) if role == "assistant" => vec![Part::Text(String::new())],
        None | Some(Value::Null) => return Err(bad("content is required".into())),
        Some(Value::String(s)) => vec![Part::Text(s)],
        Some(Value::Array(parts)) => parts
            .into_iter()
            .enumerate()
            .map(|(j, p)| part(p, i, j))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad("content must be a string or an array of parts".into())),
    };
    Ok(Message {
        role: role.to_string(),
        parts,
    })
}

/// One content part: `text`, `image_url` (a `data:` URI) or `input_audio` (base64 WAV).
fn part(p: Value, i: usize, j: usize) -> Result<Part, ApiError> {
    let bad =
        |msg: String| ApiError::invalid("messages", format!("messages[{i}].content[{j}]: {msg}"));
    let b64 = |s: &str, what: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .map_err(|e| bad(format!("{what} is not valid base64: {e}")))
    };
    let kind = p.get("type").and_then(Value::as_str).unwrap_or("");
    match kind {
        "text" => match p.get("text").and_then(Value::as_str) {
            Some(t) => Ok(Part::Text(t.to_string())),
            None => Err(bad("a text part needs \"text\"".into())),
        },
        "refusal" => Ok(Part::Text(
            p.get("refusal")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        )),
        "image_url" => {
            let url = match p.get("image_url") {
                Some(Value::String(u)) => u.as_str(),
                Some(o) => o.get("url").and_then(Value::as_str).unwrap_or(""),
                None => "",
            };
            let Some(rest) = url.strip_prefix("data:") else {
                return Err(bad(if url.is_empty() {
                    "an image_url part needs \"image_url\": {\"url\": \"data:image/png;base64,...\"}"
                        .into()
                } else {
                    "image URLs are not supported (gemmad fetches nothing from the network); \
                     send the image as a data: URI (data:image/png;base64,...)"
                        .into()
                }));
            };
            let Some((mime, data)) = rest.split_once(";base64,") else {
                return Err(bad(
                    "the image data: URI must be base64 (data:image/png;base64,...)".into(),
                ));
            };
            let mime_type = match mime {
                "image/jpg" => "image/jpeg".to_string(),
                m => m.to_string(),
            };
            Ok(Part::Image {
                data: b64(data, "the image data")?,
                mime_type,
            })
        }
        "input_audio" => {
            let a = p.get("input_audio").cloned().unwrap_or(Value::Null);
            let format = a.get("format").and_then(Value::as_str).unwrap_or("wav");
            if format != "wav" {
                return Err(bad(format!(
                    "input_audio format {:?} is not supported; send \"wav\"",
                    shorten(format)
                )));
            }
            let data = a.get("data").and_then(Value::as_str).unwrap_or("");
            Ok(Part::Audio {
                data: b64(data, "input_audio.data")?,
                format: AudioFormat::Wav,
                sample_rate_hz: 0,
                channels: 0,
            })
        }
        "" => Err(bad("a part needs a \"type\"".into())),
        other => Err(bad(format!(
            "part type {:?} is not supported (text, image_url, input_audio)",
            shorten(other)
        ))),
    }
}

/// The OpenAI finish reason of the core's.
pub fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Length | FinishReason::ContextFull => "length",
        FinishReason::Eos | FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}

pub fn usage(f: &Finished) -> Value {
    json!({
        "prompt_tokens": f.prompt_tokens,
        "completion_tokens": f.completion_tokens,
        "total_tokens": f.prompt_tokens + f.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": f.cached_tokens},
    })
}

/// What every object of one completion shares.
#[derive(Clone, Debug)]
pub struct Meta {
    pub id: String,
    pub created: u64,
    pub model: String,
}

pub fn fingerprint() -> String {
    format!("gemmad-{}", env!("CARGO_PKG_VERSION"))
}

/// The non-streaming response.
pub fn completion(m: &Meta, text: String, f: &Finished) -> Value {
    json!({
        "id": m.id,
        "object": "chat.completion",
        "created": m.created,
        "model": m.model,
        "system_fingerprint": fingerprint(),
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": null,
            "finish_reason": finish_reason(f.reason),
        }],
        "usage": usage(f),
    })
}

/// A streamed chunk with one choice: `delta` and `finish_reason`.
pub fn chunk(m: &Meta, delta: Value, finish: Option<&str>) -> Value {
    json!({
        "id": m.id,
        "object": "chat.completion.chunk",
        "created": m.created,
        "model": m.model,
        "system_fingerprint": fingerprint(),
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        "usage": null,
    })
}

/// The last chunk of `stream_options.include_usage`: no choices, the usage.
pub fn usage_chunk(m: &Meta, f: &Finished) -> Value {
    json!({
        "id": m.id,
        "object": "chat.completion.chunk",
        "created": m.created,
        "model": m.model,
        "system_fingerprint": fingerprint(),
        "choices": [],
        "usage": usage(f),
    })
}

/// A model object of `/v1/models`.
pub fn model(id: &str, created: u64) -> Value {
    json!({"id": id, "object": "model", "created": created, "owned_by": "gemmad"})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slices() -> Vec<SliceInfo> {
        vec![SliceInfo {
            name: "full".into(),
            active: true,
            layers: 2,
            ffn_widths: vec![8, 8],
            params: 10,
            stated_params_b: None,
        }]
    }

    fn parse(body: Value) -> Result<ChatCall, ApiError> {
        let s = slices();
        let m = Models {
            name: "gemma",
            slices: &s,
        };
        chat_request(&serde_json::to_vec(&body).unwrap(), &m)
    }

    #[test]
    fn a_full_request_converts() {
        let c = parse(json!({
            "model": "full",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                {"role": "assistant", "content": null},
            ],
            "max_completion_tokens": 7, "max_tokens": 9,
            "temperature": 0, "top_p": 0.5, "seed": -1, "stop": "x",
            "stream": true, "stream_options": {"include_usage": true},
            "n": 1, "user": "ignored", "frequency_penalty": 0.1,
        }))
        .unwrap();
        assert_eq!(c.params.max_tokens, 7);
        assert_eq!(c.params.size, "full");
        assert_eq!(c.params.stop, vec!["x".to_string()]);
        assert_eq!(c.params.sampling.seed, Some(u64::MAX));
        assert_eq!(c.params.messages[0].role, "system");
        assert_eq!(c.params.messages[2].parts, vec![Part::Text(String::new())]);
        assert!(c.stream && c.include_usage);
        let c = parse(
            json!({"model": "gemma", "messages": [{"role": "user", "content": "a"}],
            "stop": ["a", "b"]}),
        )
        .unwrap();
        assert_eq!(c.params.size, "");
        assert_eq!(c.params.stop.len(), 2);
    }

    #[test]
    fn media_parts_decode() {
        let c = parse(
            json!({"model": "gemma", "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
            ]}]}),
        )
        .unwrap();
        match &c.params.messages[0].parts[0] {
            Part::Image { data, mime_type } => {
                assert_eq!(mime_type, "image/png");
                assert!(data.starts_with(b"\x89PNG"));
            }
            p => panic!("{p:?}"),
        }
        assert!(matches!(
            c.params.messages[0].parts[1],
            Part::Audio {
                format: AudioFormat::Wav,
                ..
            }
        ));
    }

    #[test]
    fn bad_requests_name_their_parameter() {
        let user = json!([{"role": "user", "content": "a"}]);
        for (body, status, param) in [
            (
                json!({"model": "nope", "messages": user}),
                404,
                Some("model"),
            ),
            (
                json!({"model": "gemma", "messages": []}),
                400,
                Some("messages"),
            ),
            (
                json!({"model": "gemma", "messages": user, "n": 2}),
                400,
                Some("n"),
            ),
            (
                json!({"model": "gemma", "messages": user, "temperature": 3}),
                400,
                Some("temperature"),
            ),
            (
                json!({"model": "gemma", "messages": user, "max_tokens": 0}),
                400,
                Some("max_tokens"),
            ),
            (
                json!({"model": "gemma", "messages": user, "response_format": {"type": "json_object"}}),
                400,
                Some("response_format"),
            ),
            (
                json!({"model": "gemma", "messages": [{"role": "tool", "content": "x"}]}),
                400,
                Some("messages"),
            ),
            (
                json!({"model": "gemma", "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]}),
                400,
                Some("messages"),
            ),
            (json!({"model": "gemma", "messages": "hi"}), 400, None),
            (json!({"messages": user}), 400, Some("model")),
        ] {
            let e = parse(body.clone()).unwrap_err();
            assert_eq!(
                (e.status.as_u16(), e.param),
                (status, param),
                "{body}: {e:?}"
            );
        }
        assert!(chat_request(
            b"{not json",
            &Models {
                name: "g",
                slices: &[]
            }
        )
        .is_err());
    }

    #[test]
    fn service_errors_map_to_statuses() {
        let e: ApiError = ServiceError::ResourceExhausted {
            message: "full".into(),
            retry_after: Duration::from_millis(1500),
        }
        .into();
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        let r = e.into_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        assert_eq!(r.headers()["retry-after-ms"], "1500");
        let e: ApiError = ServiceError::ModalityUnavailable("no vision".into()).into();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.code, Some("modality_unavailable"));
        let e: ApiError = ServiceError::shutting_down().into();
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        let e: ApiError = ServiceError::PermissionDenied("no".into()).into();
        assert_eq!(e.status, StatusCode::FORBIDDEN);
    }
}
