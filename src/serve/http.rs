//! The HTTP side of `burnish serve` (axum): routes, API key, body limit, prompt building,
//! the bounded queue, and turning engine events into OpenAI responses or server-sent events.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{to_bytes, Body};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use models::generate::bucket;
use models::generate::SamplingParams;
use models::{ChatTemplate, TextTokenizer};

use super::api::{self, finish_reason, usage, ApiError, Parsed, Prompt};
use super::engine::{Event, Job, Shared};

/// Everything a handler needs, shared by all of them.
pub struct App {
    pub tok: Arc<TextTokenizer>,
    pub template: ChatTemplate,
    /// Served names: the base first, then each adapter (its bank index is its position).
    pub names: Vec<String>,
    pub vocab: usize,
    pub capacity: usize,
    pub max_batch: usize,
    pub queue_limit: usize,
    pub max_body: usize,
    pub timeout: Duration,
    pub api_key: Option<String>,
    pub stop_ids: Vec<u32>,
    pub pad_id: u32,
    pub shape_multiple: usize,
    /// `std::sync::mpsc::Sender` is `Sync`; the lock keeps the type simple across versions.
    pub jobs: Mutex<Sender<Job>>,
    pub shared: Arc<Shared>,
    pub created: u64,
    pub ids: AtomicU64,
}

#[derive(Clone, Copy, PartialEq)]
enum Endpoint {
    Chat,
    Text,
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        .route("/health", get(health))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(app)
}

async fn not_found() -> ApiError {
    ApiError::status(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "unknown path; burnish serve answers /v1/chat/completions, /v1/completions, /v1/models and /health",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::status(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method not allowed on this path",
    )
}

async fn health(State(app): State<Arc<App>>) -> Response {
    let s = &app.shared;
    let status = match s.shutdown.load(Ordering::SeqCst) {
        true => StatusCode::SERVICE_UNAVAILABLE,
        false => StatusCode::OK,
    };
    let body = json!({
        "status": if status == StatusCode::OK { "ok" } else { "shutting_down" },
        "running": s.running.load(Ordering::SeqCst),
        "waiting": s.waiting.load(Ordering::SeqCst),
    });
    (status, Json(body)).into_response()
}

async fn list_models(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(e) = app.authorize(&headers) {
        return e.into_response();
    }
    let data: Vec<Value> = app
        .names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            json!({
                "id": name,
                "object": "model",
                "created": app.created,
                "owned_by": "burnish",
                "parent": if i == 0 { Value::Null } else { json!(app.names[0]) },
                "max_model_len": app.capacity,
            })
        })
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

async fn chat(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    app.handle(Endpoint::Chat, headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    app.handle(Endpoint::Text, headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

pub(super) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl App {
    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(key) = &self.api_key else {
            return Ok(());
        };
        let given = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(g) if g.trim() == key => Ok(()),
            _ => Err(ApiError {
                code: Some("invalid_api_key"),
                ..ApiError::status(
                    StatusCode::UNAUTHORIZED,
                    "invalid_request_error",
                    "missing or wrong API key (Authorization: Bearer ...)",
                )
            }),
        }
    }

    async fn handle(
        &self,
        ep: Endpoint,
        headers: HeaderMap,
        body: Body,
    ) -> Result<Response, ApiError> {
        self.authorize(&headers)?;
        let bytes = to_bytes(body, self.max_body).await.map_err(|_| {
            ApiError::status(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!(
                    "the request body is larger than {} bytes (--max-body-bytes)",
                    self.max_body
                ),
            )
        })?;
        let v = api::json_body(&bytes)?;
        let parsed = match ep {
            Endpoint::Chat => api::parse_chat(&v, self.max_batch)?,
            Endpoint::Text => api::parse_completion(&v, self.max_batch)?,
        };
        let (job, mut events, prompt_tokens) = self.job(&parsed)?;
        let n = job.n;
        self.submit(job)?;
        let id = format!(
            "{}-{:x}{:06x}",
            if ep == Endpoint::Chat {
                "chatcmpl"
            } else {
                "cmpl"
            },
            self.created,
            self.ids.fetch_add(1, Ordering::SeqCst)
        );
        let head = Head {
            id,
            created: now_secs(),
            model: parsed.model.clone(),
            ep,
        };
        if parsed.sampling.stream {
            let usage = parsed.sampling.include_usage.then_some(prompt_tokens);
            return Ok(Sse::new(sse_stream(head, events, n, usage))
                .keep_alive(KeepAlive::default())
                .into_response());
        }
        let mut texts: Vec<Option<(String, &'static str)>> = vec![None; n];
        let mut completion_tokens = 0;
        while texts.iter().any(Option::is_none) {
            match events.recv().await {
                Some(Event::Done {
                    choice,
                    text,
                    finish,
                    tokens,
                }) => {
                    completion_tokens += tokens;
                    texts[choice] = Some((text, finish_reason(finish)));
                }
                Some(Event::Text { .. }) => {}
                Some(Event::Failed(e)) => return Err(e),
                None => return Err(engine_gone()),
            }
        }
        let choices: Vec<Value> = texts
            .into_iter()
            .flatten()
            .enumerate()
            .map(|(i, (text, finish))| match ep {
                Endpoint::Chat => json!({
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": null,
                    "finish_reason": finish,
                }),
                Endpoint::Text => json!({
                    "index": i, "text": text, "logprobs": null, "finish_reason": finish,
                }),
            })
            .collect();
        Ok(Json(json!({
            "id": head.id,
            "object": if ep == Endpoint::Chat { "chat.completion" } else { "text_completion" },
            "created": head.created,
            "model": head.model,
            "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens),
        }))
        .into_response())
    }

    /// The engine's job for a parsed request: the model routed, the prompt tokenized and
    /// checked against the context.
    fn job(&self, p: &Parsed) -> Result<(Job, UnboundedReceiver<Event>, usize), ApiError> {
        let Some(adapter) = self.names.iter().position(|n| *n == p.model) else {
            return Err(ApiError {
                param: Some("model".into()),
                code: Some("model_not_found"),
                ..ApiError::status(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    format!(
                        "the model `{}` does not exist; this server has: {}",
                        p.model,
                        self.names.join(", ")
                    ),
                )
            });
        };
        let bad = |e: anyhow::Error| ApiError::invalid(format!("{e:#}"), None);
        let prompt = match &p.prompt {
            Prompt::Chat(messages) => {
                let text = self
                    .template
                    .render(messages, true, &self.tok.template_tokens())
                    .map_err(|e| {
                        ApiError::invalid(
                            format!("the chat template refused these messages: {e:#}"),
                            Some("messages"),
                        )
                    })?;
                self.tok.encode(&text, false).map_err(bad)?
            }
            Prompt::Text(t) => self.tok.encode(t, true).map_err(bad)?,
            Prompt::Tokens(ids) => {
                if let Some(t) = ids.iter().find(|&&t| t as usize >= self.vocab) {
                    return Err(ApiError::invalid(
                        format!(
                            "token id {t} is outside the vocabulary (size {})",
                            self.vocab
                        ),
                        Some("prompt"),
                    ));
                }
                ids.clone()
            }
        };
        if prompt.is_empty() {
            return Err(ApiError::invalid(
                "the prompt encodes to no tokens",
                Some("prompt"),
            ));
        }
        let width = bucket(prompt.len(), self.shape_multiple);
        let room = self.capacity.saturating_sub(width);
        let max_tokens = p.sampling.max_tokens.unwrap_or(room);
        if max_tokens == 0 || max_tokens > room {
            return Err(ApiError::invalid(
                format!(
                    "this model's maximum context length is {} tokens; the prompt takes {} ({} tokens, in a shape bucket of {width}) and {max_tokens} new tokens were asked for; lower max_tokens or shorten the prompt",
                    self.capacity,
                    width,
                    prompt.len(),
                ),
                Some(if p.sampling.max_tokens.is_some() { "max_tokens" } else { "messages" }),
            )
            .with_code("context_length_exceeded"));
        }
        let seed = p.sampling.seed.unwrap_or_else(|| {
            now_secs()
                ^ self
                    .ids
                    .fetch_add(1, Ordering::SeqCst)
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        });
        let (tx, rx) = unbounded_channel();
        let len = prompt.len();
        let job = Job {
            prompt,
            adapter,
            n: p.sampling.n,
            params: SamplingParams {
                max_new_tokens: max_tokens,
                temperature: p.sampling.temperature,
                top_k: p.sampling.top_k,
                top_p: p.sampling.top_p,
                seed,
                stop_ids: match p.sampling.ignore_eos {
                    true => vec![],
                    false => self.stop_ids.clone(),
                },
                pad_id: self.pad_id,
                shape_multiple: self.shape_multiple,
            },
            stops: p.sampling.stop.clone(),
            stream: p.sampling.stream,
            deadline: Instant::now() + self.timeout,
            events: tx,
        };
        Ok((job, rx, len))
    }

    /// Into the queue, or 429 when it is full, or 503 while shutting down.
    fn submit(&self, job: Job) -> Result<(), ApiError> {
        let s = &self.shared;
        if s.shutdown.load(Ordering::SeqCst) {
            return Err(ApiError::status(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the server is shutting down",
            ));
        }
        let waiting = s.waiting.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.queue_limit {
            s.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError {
                code: Some("rate_limit_exceeded"),
                ..ApiError::status(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    format!(
                        "the queue is full ({} requests waiting, --queue); retry later",
                        self.queue_limit
                    ),
                )
            });
        }
        let sent = self
            .jobs
            .lock()
            .map(|tx| tx.send(job).is_ok())
            .unwrap_or(false);
        if !sent {
            s.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(engine_gone());
        }
        Ok(())
    }
}

fn engine_gone() -> ApiError {
    ApiError::status(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "the generation engine stopped",
    )
}

struct Head {
    id: String,
    created: u64,
    model: String,
    ep: Endpoint,
}

impl Head {
    fn chunk(&self, choices: Value, usage: Option<Value>) -> SseEvent {
        let mut body = json!({
            "id": self.id,
            "object": if self.ep == Endpoint::Chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let Some(u) = usage {
            body["usage"] = u;
        }
        SseEvent::default().data(body.to_string())
    }

    fn choice(&self, index: usize, text: Option<&str>, first: bool, finish: Option<&str>) -> Value {
        match self.ep {
            Endpoint::Chat => {
                let mut delta = json!({});
                if first {
                    delta["role"] = json!("assistant");
                }
                if let Some(t) = text {
                    delta["content"] = json!(t);
                }
                json!([{"index": index, "delta": delta, "logprobs": null, "finish_reason": finish}])
            }
            Endpoint::Text => json!([{
                "index": index, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish,
            }]),
        }
    }
}

/// Engine events as OpenAI stream chunks, then `[DONE]`; an error mid-stream is sent as an
/// `{"error": ...}` chunk before `[DONE]`, as vLLM does.
fn sse_stream(
    head: Head,
    events: UnboundedReceiver<Event>,
    n: usize,
    usage_of: Option<usize>,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    struct St {
        head: Head,
        events: UnboundedReceiver<Event>,
        started: Vec<bool>,
        open: usize,
        tokens: usize,
        usage_of: Option<usize>,
        ended: bool,
    }
    let st = St {
        head,
        events,
        started: vec![false; n],
        open: n,
        tokens: 0,
        usage_of,
        ended: false,
    };
    stream::unfold(st, |mut st| async move {
        if st.ended {
            return None;
        }
        let mut out = Vec::new();
        if st.open == 0 {
            if let Some(p) = st.usage_of.take() {
                out.push(st.head.chunk(json!([]), Some(usage(p, st.tokens))));
            }
            out.push(SseEvent::default().data("[DONE]"));
            st.ended = true;
            return Some((out, st));
        }
        match st.events.recv().await {
            Some(Event::Text { choice, delta }) => {
                let first = !std::mem::replace(&mut st.started[choice], true);
                out.push(
                    st.head
                        .chunk(st.head.choice(choice, Some(&delta), first, None), None),
                );
            }
            Some(Event::Done {
                choice,
                finish,
                tokens,
                ..
            }) => {
                let first = !std::mem::replace(&mut st.started[choice], true);
                if first && st.head.ep == Endpoint::Chat {
                    out.push(
                        st.head
                            .chunk(st.head.choice(choice, Some(""), true, None), None),
                    );
                }
                st.tokens += tokens;
                st.open -= 1;
                let reason = finish_reason(finish);
                out.push(
                    st.head
                        .chunk(st.head.choice(choice, None, false, Some(reason)), None),
                );
            }
            Some(Event::Failed(e)) => {
                out.push(SseEvent::default().data(e.body().to_string()));
                out.push(SseEvent::default().data("[DONE]"));
                st.ended = true;
            }
            None => {
                out.push(SseEvent::default().data(engine_gone().body().to_string()));
                out.push(SseEvent::default().data("[DONE]"));
                st.ended = true;
            }
        }
        Some((out, st))
    })
    .flat_map(|events| stream::iter(events.into_iter().map(Ok)))
}
