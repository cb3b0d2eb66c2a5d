//! The OpenAI wire format of `burnish serve`: request bodies read and checked field by
//! field, errors in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`) with
//! its status codes, and the response and stream-chunk bodies.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};

use models::generate::FinishReason;
use models::Message;

/// A request the server refuses or could not finish, as the client sees it.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn status(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// Sampling fields shared by chat and text completions.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    pub max_tokens: Option<usize>,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    /// vLLM's extension: keep going past end-of-sequence tokens (load tests, benchmarks).
    pub ignore_eos: bool,
}

/// What a request asks for, before its prompt is tokenized.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Chat(Vec<Message>),
    Text(String),
    Tokens(Vec<u32>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    pub model: String,
    pub prompt: Prompt,
    pub sampling: Sampling,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

/// Fields both endpoints read; anything else a client sends is ignored (as vLLM does)
/// unless it asks for a feature burnish does not have (see `refuse_unsupported`).
#[derive(Deserialize)]
struct Common {
    model: Option<String>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    stop: Option<OneOrMany<String>>,
    seed: Option<i64>,
    n: Option<i64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    ignore_eos: Option<bool>,
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct ChatFields {
    messages: Vec<ChatMessage>,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Deserialize)]
struct CompletionFields {
    prompt: Value,
    echo: Option<bool>,
    suffix: Option<String>,
}

/// A body as JSON: malformed JSON, or JSON that is not an object, is a 400.
pub fn json_body(bytes: &[u8]) -> Result<Value, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid(
            "the request body is empty; expected a JSON object",
            None,
        ));
    }
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid(format!("the request body is not valid JSON: {e}"), None))?;
    if !v.is_object() {
        return Err(ApiError::invalid(
            "the request body must be a JSON object",
            None,
        ));
    }
    Ok(v)
}

/// Read one field group; a wrong type names the field.
fn fields<T: for<'de> Deserialize<'de>>(body: &Value) -> Result<T, ApiError> {
    serde_json::from_value(body.clone()).map_err(|e| {
        let msg = e.to_string();
        let param = msg
            .split('`')
            .nth(1)
            .filter(|_| msg.starts_with("missing field"))
            .map(str::to_string);
        ApiError {
            param,
            ..ApiError::invalid(format!("invalid request: {msg}"), None)
        }
    })
}

/// Each field's own check, so a wrong type points at the field by name.
fn typed<T: for<'de> Deserialize<'de>>(
    body: &Value,
    name: &str,
    what: &str,
) -> Result<Option<T>, ApiError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone()).map(Some).map_err(|_| {
            ApiError::invalid(format!("`{name}` must be {what}, got {v}"), Some(name))
        }),
    }
}

fn refuse_unsupported(body: &Value) -> Result<(), ApiError> {
    let set = |k: &str| body.get(k).is_some_and(|v| !v.is_null());
    for (field, why) in [
        (
            "tools",
            "tool calling is not supported by burnish serve yet",
        ),
        (
            "functions",
            "function calling is not supported by burnish serve",
        ),
        (
            "logit_bias",
            "`logit_bias` is not supported by burnish serve",
        ),
    ] {
        if set(field) {
            return Err(ApiError::invalid(why, Some(field)));
        }
    }
    for field in ["logprobs", "echo"] {
        if body
            .get(field)
            .is_some_and(|v| v.as_bool() == Some(true) || v.as_u64().is_some_and(|n| n > 0))
        {
            return Err(ApiError::invalid(
                format!("`{field}` is not supported by burnish serve"),
                Some(field),
            ));
        }
    }
    for field in ["presence_penalty", "frequency_penalty"] {
        if body
            .get(field)
            .and_then(Value::as_f64)
            .is_some_and(|x| x != 0.0)
        {
            return Err(ApiError::invalid(
                format!("`{field}` is not supported by burnish serve (only 0)"),
                Some(field),
            ));
        }
    }
    if let Some(fmt) = body.get("response_format").and_then(|v| v.get("type")) {
        if fmt != "text" {
            return Err(ApiError::invalid(
                "only response_format {\"type\": \"text\"} is supported",
                Some("response_format"),
            ));
        }
    }
    Ok(())
}

/// The sampling fields, each range-checked; `max_n` is the server's batch size.
fn sampling(body: &Value, max_n: usize) -> Result<(String, Sampling), ApiError> {
    refuse_unsupported(body)?;
    typed::<String>(body, "model", "a string")?;
    typed::<i64>(body, "max_tokens", "an integer")?;
    typed::<i64>(body, "max_completion_tokens", "an integer")?;
    typed::<f64>(body, "temperature", "a number")?;
    typed::<f64>(body, "top_p", "a number")?;
    typed::<i64>(body, "top_k", "an integer")?;
    typed::<i64>(body, "seed", "an integer")?;
    typed::<i64>(body, "n", "an integer")?;
    typed::<bool>(body, "stream", "true or false")?;
    typed::<bool>(body, "ignore_eos", "true or false")?;
    typed::<OneOrMany<String>>(body, "stop", "a string or a list of strings")?;
    let c: Common = fields(body)?;
    let model = c
        .model
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::invalid("`model` is required", Some("model")))?;
    let max_tokens = match c.max_completion_tokens.or(c.max_tokens) {
        None => None,
        Some(m) if m >= 1 => Some(m as usize),
        Some(m) => {
            return Err(ApiError::invalid(
                format!("`max_tokens` must be at least 1, got {m}"),
                Some("max_tokens"),
            ))
        }
    };
    let temperature = c.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            format!("`temperature` must be between 0 and 2, got {temperature}"),
            Some("temperature"),
        ));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            format!("`top_p` must be in (0, 1], got {top_p}"),
            Some("top_p"),
        ));
    }
    // vLLM's extension; -1 (or 0) means no top-k filter.
    let top_k = match c.top_k.unwrap_or(0) {
        k if k >= 0 => k as usize,
        -1 => 0,
        k => {
            return Err(ApiError::invalid(
                format!("`top_k` must be -1, 0 or positive, got {k}"),
                Some("top_k"),
            ))
        }
    };
    let stop = match c.stop {
        None => vec![],
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
    };
    if stop.len() > 4 || stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "`stop` takes up to 4 non-empty strings",
            Some("stop"),
        ));
    }
    let n = c.n.unwrap_or(1);
    if n < 1 || n as usize > max_n {
        return Err(ApiError::invalid(
            format!("`n` must be between 1 and {max_n} (the server's --max-batch), got {n}"),
            Some("n"),
        ));
    }
    let stream = c.stream.unwrap_or(false);
    Ok((
        model,
        Sampling {
            max_tokens,
            temperature: temperature as f32,
            top_p: top_p as f32,
            top_k,
            stop,
            seed: c.seed.map(|s| s as u64),
            n: n as usize,
            stream,
            include_usage: stream
                && c.stream_options
                    .and_then(|o| o.include_usage)
                    .unwrap_or(false),
            ignore_eos: c.ignore_eos.unwrap_or(false),
        },
    ))
}

/// `POST /v1/chat/completions`.
pub fn parse_chat(body: &Value, max_n: usize) -> Result<Parsed, ApiError> {
    let (model, sampling) = sampling(body, max_n)?;
    if !body.get("messages").is_some_and(Value::is_array) {
        return Err(ApiError::invalid(
            "`messages` is required: a list of {\"role\", \"content\"} objects",
            Some("messages"),
        ));
    }
    let f: ChatFields = fields(body)?;
    if f.messages.is_empty() {
        return Err(ApiError::invalid(
            "`messages` is empty; send at least one message",
            Some("messages"),
        ));
    }
    let mut messages = Vec::with_capacity(f.messages.len());
    for (i, m) in f.messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(ApiError::invalid(
                    format!("messages[{i}].role `{other}` is not supported; expected system, developer, user or assistant"),
                    Some("messages"),
                ))
            }
        };
        let content = match m.content {
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        (kind, _) => {
                            return Err(ApiError::invalid(
                                format!("messages[{i}]: content part of type `{kind}` is not supported; only text parts are"),
                                Some("messages"),
                            ))
                        }
                    }
                }
                text
            }
            None => {
                return Err(ApiError::invalid(
                    format!("messages[{i}] has no content"),
                    Some("messages"),
                ))
            }
        };
        messages.push(Message::new(role, &content));
    }
    Ok(Parsed {
        model,
        prompt: Prompt::Chat(messages),
        sampling,
    })
}

/// `POST /v1/completions`: `prompt` is a string, a list of one string, or token ids.
pub fn parse_completion(body: &Value, max_n: usize) -> Result<Parsed, ApiError> {
    let (model, sampling) = sampling(body, max_n)?;
    let Some(raw) = body.get("prompt") else {
        return Err(ApiError::invalid("`prompt` is required", Some("prompt")));
    };
    let f: CompletionFields = fields(body)?;
    if f.echo == Some(true) || f.suffix.is_some() {
        return Err(ApiError::invalid(
            "`echo` and `suffix` are not supported by burnish serve",
            None,
        ));
    }
    let bad = || {
        ApiError::invalid(
            format!(
                "`prompt` must be a string, a list of one string or a list of token ids, got {raw}"
            ),
            Some("prompt"),
        )
    };
    let prompt = match &f.prompt {
        Value::String(s) => Prompt::Text(s.clone()),
        Value::Array(items) if items.len() == 1 && items[0].is_string() => {
            Prompt::Text(items[0].as_str().unwrap_or_default().to_string())
        }
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_u64) => {
            let ids: Option<Vec<u32>> = items
                .iter()
                .map(|v| v.as_u64().and_then(|x| u32::try_from(x).ok()))
                .collect();
            Prompt::Tokens(ids.ok_or_else(bad)?)
        }
        Value::Array(items) if items.len() > 1 && items.iter().all(Value::is_string) => {
            return Err(ApiError::invalid(
                "batched prompts (a list of several strings) are not supported; send one request per prompt",
                Some("prompt"),
            ))
        }
        _ => return Err(bad()),
    };
    if matches!(&prompt, Prompt::Text(t) if t.is_empty()) {
        return Err(ApiError::invalid("`prompt` is empty", Some("prompt")));
    }
    Ok(Parsed {
        model,
        prompt,
        sampling,
    })
}

pub fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Eos | FinishReason::StopString => "stop",
        FinishReason::Length => "length",
    }
}

pub fn usage(prompt: usize, completion: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_fields_are_read_and_checked() {
        let body = json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_tokens": 5, "temperature": 0, "stop": "x", "n": 2, "stream": true,
            "stream_options": {"include_usage": true}, "user": "ignored"});
        let p = parse_chat(&body, 4).unwrap();
        assert_eq!(p.prompt, Prompt::Chat(vec![Message::new("user", "hi")]));
        assert_eq!(p.sampling.max_tokens, Some(5));
        assert_eq!(p.sampling.stop, vec!["x".to_string()]);
        assert!(p.sampling.include_usage && p.sampling.n == 2);
        for (bad, field) in [
            (json!({"model": "m", "messages": []}), "messages"),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}),
                "temperature",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 9}),
                "n",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}]}),
                "model",
            ),
            (
                json!({"model": "m", "messages": [{"role": "tool", "content": "x"}]}),
                "messages",
            ),
        ] {
            let e = parse_chat(&bad, 4).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert_eq!(e.param.as_deref(), Some(field), "{bad}: {}", e.message);
        }
    }

    #[test]
    fn completion_prompts_take_three_shapes() {
        let p = |v: Value| parse_completion(&json!({"model": "m", "prompt": v}), 1);
        assert_eq!(p(json!("a")).unwrap().prompt, Prompt::Text("a".into()));
        assert_eq!(p(json!(["a"])).unwrap().prompt, Prompt::Text("a".into()));
        assert_eq!(p(json!([1, 2])).unwrap().prompt, Prompt::Tokens(vec![1, 2]));
        for bad in [json!(["a", "b"]), json!(3), json!([-1]), json!("")] {
            assert!(p(bad).is_err());
        }
    }
}
