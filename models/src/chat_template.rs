//! Jinja chat templates rendered with transformers' semantics (`trim_blocks`,
//! `lstrip_blocks`, loop controls, `raise_exception`, Python string methods), and the
//! built-in templates for models that carry none.

use anyhow::{bail, Result};
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::{Deserialize, Serialize};

/// One chat message in the shape transformers' chat templates read: `role` and `content`,
/// plus, for tool use, the assistant's `tool_calls` and a `tool` message's `tool_call_id` and
/// `name` (absent keys when unused, so templates testing `message.tool_calls` see nothing).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    /// Empty for an assistant turn that only calls tools.
    pub content: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
            ..Self::default()
        }
    }
}

/// An assistant's call of a tool, as OpenAI and transformers write it:
/// `{"id"?, "type": "function", "function": {"name", "arguments": {..}}}`. The arguments are
/// a JSON object (not OpenAI's JSON string): templates print them with `tojson`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: serde_json::Map<String, serde_json::Value>,
}

impl ToolCall {
    pub fn function(
        id: Option<String>,
        name: &str,
        arguments: serde_json::Map<String, serde_json::Value>,
    ) -> Self {
        Self {
            id,
            kind: "function".into(),
            function: FunctionCall {
                name: name.into(),
                arguments,
            },
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct SpecialTokens {
    pub bos_token: String,
    pub eos_token: String,
    pub pad_token: Option<String>,
}

const BUILTIN: &[(&str, &str)] = &[
    ("chatml", include_str!("../templates/chatml.jinja")),
    ("llama3", include_str!("../templates/llama3.jinja")),
    ("alpaca", include_str!("../templates/alpaca.jinja")),
    ("mistral", include_str!("../templates/mistral.jinja")),
    ("phi3", include_str!("../templates/phi3.jinja")),
    // Plain concatenation for prompt/completion data on base models: BOS, the texts, EOS
    // after each completion.
    ("raw", include_str!("../templates/raw.jinja")),
];

pub struct ChatTemplate {
    pub name: String,
    pub source: String,
    env: Environment<'static>,
}

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// `strftime_now(fmt)` as transformers provides it (used by Llama 3.1 templates); supports
/// the date directives those templates use.
fn strftime_now(fmt: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let days = secs.div_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let name = MONTHS[(month - 1) as usize];
    fmt.replace("%d", &format!("{day:02}"))
        .replace("%m", &format!("{month:02}"))
        .replace("%Y", &year.to_string())
        .replace("%B", name)
        .replace("%b", &name[..3])
}

impl ChatTemplate {
    pub fn new(name: &str, source: String) -> Self {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", crate::py_json::tojson);
        // A syntax error surfaces on the first render, with the template's name.
        let _ = env.add_template_owned("chat", source.clone());
        Self {
            name: name.to_string(),
            source,
            env,
        }
    }

    pub fn builtin_names() -> Vec<&'static str> {
        BUILTIN.iter().map(|(n, _)| *n).collect()
    }

    pub fn named(name: &str) -> Result<Self> {
        match BUILTIN.iter().find(|(n, _)| *n == name) {
            Some((n, src)) => Ok(Self::new(n, src.to_string())),
            None => bail!(
                "unknown chat template `{name}`; built-in templates: {} (or `auto` for the model's own)",
                Self::builtin_names().join(", ")
            ),
        }
    }

    /// Render messages exactly as `tokenizer.apply_chat_template(messages, tokenize=False)`.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        tokens: &SpecialTokens,
    ) -> Result<String> {
        self.render_with_tools(messages, &[], add_generation_prompt, tokens)
    }

    /// Render as `apply_chat_template(messages, tools=tools, tokenize=False)`: `tools` are
    /// JSON-schema tool definitions (`{"type": "function", "function": {..}}`); none passes
    /// `tools=None`, as transformers does.
    pub fn render_with_tools(
        &self,
        messages: &[Message],
        tools: &[serde_json::Value],
        add_generation_prompt: bool,
        tokens: &SpecialTokens,
    ) -> Result<String> {
        let tools = (!tools.is_empty()).then(|| Value::from_serialize(tools));
        let ctx = minijinja::context! {
            messages => Value::from_serialize(messages),
            tools => tools,
            add_generation_prompt => add_generation_prompt,
            bos_token => tokens.bos_token.clone(),
            eos_token => tokens.eos_token.clone(),
            pad_token => tokens.pad_token.clone(),
        };
        let rendered = match self.env.get_template("chat") {
            Ok(t) => t.render(ctx),
            // Not compiled: render the source to report its syntax error.
            Err(_) => self.env.render_str(&self.source, ctx),
        };
        rendered
            .map_err(|e| anyhow::anyhow!("chat template `{}` failed: {}", self.name, describe(&e)))
    }
}

fn describe(e: &Error) -> String {
    match e.detail() {
        Some(d) if e.kind() == ErrorKind::InvalidOperation => d.to_string(),
        _ => format!("{e:#}"),
    }
}
