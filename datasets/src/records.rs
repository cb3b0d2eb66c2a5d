//! Canonical records: whatever the input format, every row becomes one of these.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

pub use models::{Message, ToolCall};

/// Roles after normalisation (ShareGPT's human/gpt, Bedrock's user/assistant, ...).
pub const SYSTEM: &str = "system";
pub const USER: &str = "user";
pub const ASSISTANT: &str = "assistant";
/// A tool's result, answering an assistant's tool call.
pub const TOOL: &str = "tool";

/// A chat: optional system prompt, then user/assistant turns (with tool calls and `tool`
/// results between them when the row uses tools). SFT and distillation data.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    pub system: Option<String>,
    pub messages: Vec<Message>,
    /// Tool definitions as transformers' `tools=` takes them (`{"type": "function",
    /// "function": {name, description, parameters}}`); empty when the row uses none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<serde_json::Value>,
}

impl Conversation {
    /// Messages with the system prompt, if any, as a leading `system` message: the shape
    /// chat templates expect.
    pub fn to_messages(&self) -> Vec<Message> {
        let mut out = Vec::with_capacity(self.messages.len() + 1);
        if let Some(s) = &self.system {
            out.push(Message::new(SYSTEM, s));
        }
        out.extend(self.messages.iter().cloned());
        out
    }
}

/// A preference pair: a shared prompt and two alternative assistant continuations.
/// DPO and reward-model data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preference {
    pub prompt: Conversation,
    pub chosen: Vec<Message>,
    pub rejected: Vec<Message>,
    /// Optional margin column for reward models.
    pub margin: Option<f64>,
}

/// One completion of a prompt, labelled desirable or not, with no paired alternative:
/// KTO data (TRL's unpaired preference shape).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unpaired {
    pub prompt: Conversation,
    pub completion: Vec<Message>,
    pub label: bool,
}

/// A prompt to roll out, with an optional reference answer. GRPO/PPO data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptTask {
    pub prompt: Conversation,
    /// The verifiable answer (GSM8K's `#### N` number, Bedrock RFT's `ground_truth`).
    pub answer: Option<String>,
    /// Other fields kept for reward functions and lineage (e.g. the full reference solution).
    pub meta: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    Conversation(Conversation),
    Preference(Preference),
    PromptTask(PromptTask),
    Unpaired(Unpaired),
}

impl Record {
    pub fn kind(&self) -> &'static str {
        match self {
            Record::Conversation(_) => "conversation",
            Record::Preference(_) => "preference",
            Record::PromptTask(_) => "prompt_task",
            Record::Unpaired(_) => "unpaired",
        }
    }
}

/// Where a row came from: file and 1-based line (for JSON arrays, the element index + 1;
/// for Parquet, the row index + 1).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Origin {
    pub file: PathBuf,
    pub line: usize,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

impl PromptTask {
    /// The task as a supervised conversation, its reference answer the assistant's turn
    /// (SFT on GSM8K-style rows, as before GRPO); None without an answer.
    pub fn as_conversation(&self) -> Option<Conversation> {
        let answer = self.answer.as_ref()?;
        let mut conversation = self.prompt.clone();
        conversation.messages.push(Message::new(ASSISTANT, answer));
        Some(conversation)
    }
}

/// A canonical record with its origin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub origin: Origin,
    pub record: Record,
}

/// A row that could not be used, with everything needed to find and fix it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reject {
    pub origin: Origin,
    /// The offending field as a JSON path (`messages[2].content`), when one is to blame.
    pub field: Option<String>,
    pub reason: String,
    /// The raw line (truncated), so a rejects file can be fixed and fed back.
    pub raw: Option<String>,
}

impl std::fmt::Display for Reject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{}: field `{field}`: {}", self.origin, self.reason),
            None => write!(f, "{}: {}", self.origin, self.reason),
        }
    }
}
