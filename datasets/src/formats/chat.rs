//! Message-list chat formats: ShareGPT (`conversations` of `{from, value}`) and OpenAI
//! (`messages` of `{role, content}`).

use super::fields::{optional_text, required, Fail, Parsed};
use super::tools;
use super::turns::{
    check_order, conversation_field, into_messages, parse_turns, take_system, Roles,
};
use crate::records::{Conversation, Record, ASSISTANT, USER};
use serde_json::{Map, Value};

/// `{"conversations": [{"from", "value"}], "system"?, "tools"?}`, with LLaMA-Factory's
/// `function_call` / `observation` turns for tool use. A leading `system` turn, or the
/// top-level `system` field that LLaMA-Factory's ShareGPT variant uses, is the system prompt;
/// both at once is ambiguous and refused.
pub(crate) fn sharegpt(obj: &Map<String, Value>) -> Parsed<Record> {
    let turns = parse_turns(
        required(obj, "conversations", "")?,
        "conversations",
        Roles::ShareGpt,
    )?;
    let (turn_system, mut turns) = take_system(turns)?;
    let field_system = optional_text(obj, "system")?;
    let system = match (turn_system, field_system) {
        (Some(_), Some(_)) => {
            return Err(Fail::at(
                "system",
                "a system prompt is given both as this field and as the first turn",
            ))
        }
        (turn, field) => turn.or(field.map(str::to_string)),
    };
    let tools = tools::definitions(obj, Roles::ShareGpt)?;
    check_order(&mut turns, "conversations", USER, ASSISTANT, &tools)?;
    Ok(Record::Conversation(Conversation {
        system,
        messages: into_messages(turns),
        tools,
    }))
}

/// `{"messages": [{"role", "content"}], "tools"?}` with an optional leading system message;
/// content is a string or a list of `{"type": "text", "text"}` parts; assistant messages may
/// carry `tool_calls`, answered by `tool` messages.
pub(crate) fn openai(obj: &Map<String, Value>) -> Parsed<Record> {
    conversation_field(obj, "messages", Roles::OpenAi, ASSISTANT).map(Record::Conversation)
}
