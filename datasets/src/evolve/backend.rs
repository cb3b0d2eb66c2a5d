//! The chat backends Evol-Instruct talks to: anything that turns a list of messages into
//! one assistant reply.

use models::Message;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A non-success HTTP status (after retries for 429/5xx).
    #[error("HTTP {status}: {body}")]
    Http { status: u16, body: String },
    #[error("timed out after {0:.1}s")]
    Timeout(f64),
    /// The reply was not the expected JSON.
    #[error("malformed reply: {0}")]
    Malformed(String),
    #[error("transport error: {0}")]
    Transport(String),
    #[error("{0}")]
    Other(String),
}

impl BackendError {
    /// A short key for counting failures by kind.
    pub fn kind(&self) -> String {
        match self {
            BackendError::Http { status, .. } => format!("http_{status}"),
            BackendError::Timeout(_) => "timeout".into(),
            BackendError::Malformed(_) => "malformed".into(),
            BackendError::Transport(_) => "transport".into(),
            BackendError::Other(_) => "other".into(),
        }
    }
}

/// One chat completion request.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    /// Overrides the backend's default when set.
    pub temperature: Option<f32>,
    pub max_tokens: Option<usize>,
}

impl ChatRequest {
    pub fn user(text: impl Into<String>) -> Self {
        Self {
            messages: vec![Message::new("user", &text.into())],
            temperature: None,
            max_tokens: None,
        }
    }
}

pub trait ChatBackend: Sync {
    /// For reports; never includes secrets.
    fn describe(&self) -> String;
    /// How many requests may run at once.
    fn concurrency(&self) -> usize {
        1
    }
    fn complete(&self, req: &ChatRequest) -> Result<String, BackendError>;
}
