//! An OpenAI-compatible chat-completions client (`POST {base_url}/chat/completions`): works
//! with OpenAI, vLLM, Ollama, TGI, LM Studio and gateways. Blocking HTTP (ureq) with a
//! per-request timeout, retry with exponential backoff on 429 and 5xx (honouring
//! `Retry-After`), and the API key read from an environment variable and never logged.

use serde::{Deserialize, Serialize};
use std::time::Duration;

use super::backend::{BackendError, ChatBackend, ChatRequest};

fn default_base_url() -> String {
    "http://localhost:8000/v1".into()
}
fn default_api_key_env() -> String {
    "OPENAI_API_KEY".into()
}
fn default_timeout() -> f64 {
    120.0
}
fn default_retries() -> u32 {
    5
}
fn default_backoff() -> f64 {
    1.0
}
fn default_backoff_max() -> f64 {
    30.0
}
fn default_concurrency() -> usize {
    8
}
fn default_temperature() -> f32 {
    0.7
}
fn default_max_tokens() -> usize {
    1024
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiConfig {
    /// Up to and including `/v1`.
    #[serde(default = "default_base_url")]
    pub base_url: String,
    #[serde(default)]
    pub model: String,
    /// Environment variable holding the API key (unset or empty = no Authorization header).
    #[serde(default = "default_api_key_env")]
    pub api_key_env: String,
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    /// Retries after the first attempt, for 429, 5xx, timeouts and connection errors.
    #[serde(default = "default_retries")]
    pub max_retries: u32,
    /// First backoff; doubles each retry up to `backoff_max_s`.
    #[serde(default = "default_backoff")]
    pub backoff_s: f64,
    #[serde(default = "default_backoff_max")]
    pub backoff_max_s: f64,
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    #[serde(default = "default_temperature")]
    pub temperature: f32,
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        Self {
            base_url: default_base_url(),
            model: String::new(),
            api_key_env: default_api_key_env(),
            timeout_s: default_timeout(),
            max_retries: default_retries(),
            backoff_s: default_backoff(),
            backoff_max_s: default_backoff_max(),
            concurrency: default_concurrency(),
            temperature: default_temperature(),
            max_tokens: default_max_tokens(),
        }
    }
}

pub struct OpenAiClient {
    cfg: OpenAiConfig,
    url: String,
    key: Option<String>,
    agent: ureq::Agent,
}

impl std::fmt::Debug for OpenAiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiClient")
            .field("url", &self.url)
            .field("model", &self.cfg.model)
            .field("api_key", &self.key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl OpenAiClient {
    pub fn new(cfg: OpenAiConfig) -> anyhow::Result<Self> {
        if cfg.model.trim().is_empty() {
            anyhow::bail!("the openai backend needs a model name (openai.model or --model)");
        }
        if !(cfg.base_url.starts_with("http://") || cfg.base_url.starts_with("https://")) {
            anyhow::bail!(
                "openai base_url must start with http:// or https://, got `{}`",
                cfg.base_url
            );
        }
        if cfg.timeout_s.is_nan() || cfg.timeout_s <= 0.0 {
            anyhow::bail!("openai timeout_s must be positive, got {}", cfg.timeout_s);
        }
        let key = std::env::var(&cfg.api_key_env)
            .ok()
            .filter(|k| !k.trim().is_empty());
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs_f64(cfg.timeout_s))
            .build();
        let url = format!("{}/chat/completions", cfg.base_url.trim_end_matches('/'));
        Ok(Self {
            cfg,
            url,
            key,
            agent,
        })
    }

    pub fn has_key(&self) -> bool {
        self.key.is_some()
    }

    fn attempt(&self, req: &ChatRequest) -> Result<String, Attempt> {
        let messages: Vec<serde_json::Value> = req
            .messages
            .iter()
            .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
            .collect();
        let body = serde_json::json!({
            "model": self.cfg.model,
            "messages": messages,
            "temperature": req.temperature.unwrap_or(self.cfg.temperature),
            "max_tokens": req.max_tokens.unwrap_or(self.cfg.max_tokens),
            "stream": false,
        });
        let mut r = self
            .agent
            .post(&self.url)
            .set("Content-Type", "application/json");
        if let Some(k) = &self.key {
            r = r.set("Authorization", &format!("Bearer {k}"));
        }
        match r.send_json(body) {
            Ok(resp) => {
                let text = resp.into_string().map_err(|e| {
                    if is_timeout(&e) {
                        Attempt::Retry(BackendError::Timeout(self.cfg.timeout_s), None)
                    } else {
                        Attempt::Retry(BackendError::Transport(e.to_string()), None)
                    }
                })?;
                parse_reply(&text).map_err(Attempt::Fatal)
            }
            Err(ureq::Error::Status(status, resp)) => {
                let retry_after = resp
                    .header("Retry-After")
                    .and_then(|v| v.trim().parse::<f64>().ok());
                let body: String = resp
                    .into_string()
                    .unwrap_or_default()
                    .chars()
                    .take(300)
                    .collect();
                let err = BackendError::Http { status, body };
                if status == 429 || status >= 500 {
                    Err(Attempt::Retry(err, retry_after))
                } else {
                    Err(Attempt::Fatal(err))
                }
            }
            Err(ureq::Error::Transport(t)) => {
                if is_timeout(&t) {
                    Err(Attempt::Retry(
                        BackendError::Timeout(self.cfg.timeout_s),
                        None,
                    ))
                } else {
                    Err(Attempt::Retry(BackendError::Transport(t.to_string()), None))
                }
            }
        }
    }
}

enum Attempt {
    Retry(BackendError, Option<f64>),
    Fatal(BackendError),
}

fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
            ) {
                return true;
            }
        }
        if err.to_string().contains("timed out") {
            return true;
        }
        cur = err.source();
    }
    false
}

/// `choices[0].message.content` of a chat-completions reply.
pub fn parse_reply(text: &str) -> Result<String, BackendError> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        BackendError::Malformed(format!(
            "not JSON ({e}): {}",
            text.chars().take(120).collect::<String>()
        ))
    })?;
    v.pointer("/choices/0/message/content")
        .and_then(|c| c.as_str())
        .map(String::from)
        .ok_or_else(|| {
            BackendError::Malformed(format!(
                "no choices[0].message.content in {}",
                text.chars().take(120).collect::<String>()
            ))
        })
}

impl ChatBackend for OpenAiClient {
    fn describe(&self) -> String {
        format!("openai:{} model={}", self.url, self.cfg.model)
    }

    fn concurrency(&self) -> usize {
        self.cfg.concurrency.max(1)
    }

    fn complete(&self, req: &ChatRequest) -> Result<String, BackendError> {
        let mut wait = self.cfg.backoff_s.max(0.0);
        let mut tries = 0;
        loop {
            match self.attempt(req) {
                Ok(s) => return Ok(s),
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Retry(e, retry_after)) => {
                    if tries >= self.cfg.max_retries {
                        return Err(e);
                    }
                    tries += 1;
                    let pause = retry_after
                        .unwrap_or(wait)
                        .clamp(0.0, self.cfg.backoff_max_s.max(0.0));
                    std::thread::sleep(Duration::from_secs_f64(pause));
                    wait = (wait * 2.0).min(self.cfg.backoff_max_s);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse_or_say_why_not() {
        let ok = r#"{"choices":[{"message":{"role":"assistant","content":"hi"}}]}"#;
        assert_eq!(parse_reply(ok).unwrap(), "hi");
        assert!(matches!(
            parse_reply("<html>"),
            Err(BackendError::Malformed(_))
        ));
        assert!(matches!(
            parse_reply("{\"choices\":[]}"),
            Err(BackendError::Malformed(_))
        ));
    }

    #[test]
    fn the_key_is_never_printed() {
        std::env::set_var("BURNISH_TEST_SECRET_KEY", "sk-very-secret");
        let c = OpenAiClient::new(OpenAiConfig {
            model: "m".into(),
            api_key_env: "BURNISH_TEST_SECRET_KEY".into(),
            ..Default::default()
        })
        .unwrap();
        assert!(c.has_key());
        assert!(!format!("{c:?}").contains("sk-very"));
        assert!(!c.describe().contains("sk-very"));
        assert!(OpenAiClient::new(OpenAiConfig::default()).is_err());
    }
}
