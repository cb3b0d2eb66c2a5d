//! Amazon Bedrock customization formats: prompt/completion, the conversation schema (and the
//! plain Claude-on-Bedrock shape), and reinforcement fine-tuning (RFT) prompt rows.

use super::fields::{extra_fields, optional, required_text, str_at, Parsed};
use super::prompt_answer::{answer_text, scalar_answer};
use super::turns::{conversation_field, text_content, Roles};
use crate::records::{Conversation, Message, PromptTask, Record, ASSISTANT, USER};
use serde_json::{Map, Value};

/// The `schemaVersion` Bedrock documents for conversation fine-tuning data.
pub const CONVERSATION_SCHEMA: &str = "bedrock-conversation-2024";

/// `{"prompt", "completion"}` -> a one-exchange conversation without system prompt.
pub(crate) fn prompt_completion(obj: &Map<String, Value>) -> Parsed<Record> {
    let prompt = required_text(obj, "prompt", "")?;
    let completion = required_text(obj, "completion", "")?;
    Ok(Record::Conversation(Conversation {
        system: None,
        messages: vec![
            Message::new(USER, &prompt),
            Message::new(ASSISTANT, &completion),
        ],
        tools: Vec::new(),
    }))
}

/// `{"schemaVersion"?, "system"?: [{"text"}] | "..", "messages": [{"role", "content"}]}`.
/// Content is a list of `{"text"}` parts or, in the Claude-on-Bedrock shape, a string.
pub(crate) fn conversation(obj: &Map<String, Value>) -> Parsed<Record> {
    if let Some(version) = optional(obj, "schemaVersion") {
        str_at(version, "schemaVersion")?;
    }
    let system = system_prompt(obj)?;
    let mut conversation = conversation_field(obj, "messages", Roles::Bedrock, ASSISTANT)?;
    conversation.system = system;
    Ok(Record::Conversation(conversation))
}

/// An absent, empty or whitespace-only system prompt means "no system prompt": Bedrock
/// exports often carry `"system": []` or `""`.
fn system_prompt(obj: &Map<String, Value>) -> Parsed<Option<String>> {
    match optional(obj, "system") {
        None => Ok(None),
        Some(Value::Array(parts)) if parts.is_empty() => Ok(None),
        Some(Value::String(text)) if text.trim().is_empty() => Ok(None),
        Some(value) => text_content(value, "system").map(Some),
    }
}

/// A note for rows whose `schemaVersion` is not the documented one (such as
/// `tooluse-dataset-2024`): they are read with the same rules, but the user should know.
pub(crate) fn schema_note(value: &Value) -> Option<String> {
    let version = value.get("schemaVersion")?.as_str()?;
    (version != CONVERSATION_SCHEMA).then(|| {
        format!(
            "schemaVersion `{version}` is not `{CONVERSATION_SCHEMA}`; these rows were read \
             with the bedrock-conversation rules"
        )
    })
}

/// `{"messages": [{"role": "user", "content"}], "reference_answer"?, "ground_truth"?}` -> a
/// prompt task. The answer is `ground_truth` when given, else the `#### N` number (or the
/// whole text) of `reference_answer`. `reference_answer` and any other fields go to `meta`.
pub(crate) fn rft(obj: &Map<String, Value>) -> Parsed<Record> {
    let prompt = conversation_field(obj, "messages", Roles::OpenAi, USER)?;
    let reference = optional(obj, "reference_answer")
        .map(|v| str_at(v, "reference_answer"))
        .transpose()?;
    let answer = match optional(obj, "ground_truth") {
        Some(truth) => Some(scalar_answer(truth, "ground_truth")?),
        None => reference
            .map(|r| answer_text(r, "reference_answer"))
            .transpose()?,
    };
    let mut meta = Map::new();
    if let Some(reference) = reference {
        meta.insert("reference_answer".into(), Value::String(reference.into()));
    }
    meta.extend(extra_fields(
        obj,
        &["messages", "reference_answer", "ground_truth"],
    ));
    Ok(Record::PromptTask(PromptTask {
        prompt,
        answer,
        meta,
    }))
}
