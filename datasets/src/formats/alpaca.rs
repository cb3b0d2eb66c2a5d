//! Alpaca rows: `{"instruction", "input"?, "output", "system"?, "history"?}`.

use super::fields::{
    array_at, index_path, non_empty, optional, optional_text, required, required_text, str_at,
    Fail, Parsed,
};
use crate::records::{Conversation, Message, Record, ASSISTANT, USER};
use serde_json::{Map, Value};

/// Between `instruction` and a non-empty `input` in the user turn. Stanford Alpaca's prompt
/// puts them in separate paragraphs; LLaMA-Factory joins with a single "\n". We keep the
/// paragraph break so the two parts stay distinguishable.
pub const INPUT_SEPARATOR: &str = "\n\n";

/// The user turn is `instruction`, then `input` after [`INPUT_SEPARATOR`] when `input` is not
/// empty (either may be empty, not both). `history` is a list of `[user, assistant]` pairs that
/// come before; `system` becomes the system prompt.
pub(crate) fn alpaca(obj: &Map<String, Value>) -> Parsed<Record> {
    let instruction = str_at(required(obj, "instruction", "")?, "instruction")?;
    let input = optional(obj, "input")
        .map(|v| str_at(v, "input"))
        .transpose()?
        .unwrap_or("");
    let user = [instruction, input]
        .into_iter()
        .filter(|part| !part.trim().is_empty())
        .collect::<Vec<_>>()
        .join(INPUT_SEPARATOR);
    if user.is_empty() {
        return Err(Fail::at(
            "instruction",
            "empty content (and `input` is empty too)",
        ));
    }
    let output = required_text(obj, "output", "")?;
    let system = optional_text(obj, "system")?.map(str::to_string);

    let mut messages = history(obj)?;
    messages.push(Message::new(USER, &user));
    messages.push(Message::new(ASSISTANT, &output));
    Ok(Record::Conversation(Conversation {
        system,
        messages,
        tools: Vec::new(),
    }))
}

fn history(obj: &Map<String, Value>) -> Parsed<Vec<Message>> {
    let Some(list) = optional(obj, "history") else {
        return Ok(Vec::new());
    };
    let mut messages = Vec::new();
    for (i, pair) in array_at(list, "history")?.iter().enumerate() {
        let path = index_path("history", i);
        let pair = array_at(pair, &path)?;
        if pair.len() != 2 {
            return Err(Fail::at(
                &path,
                format!(
                    "expected a [user, assistant] pair, found {} items",
                    pair.len()
                ),
            ));
        }
        for (j, role) in [USER, ASSISTANT].into_iter().enumerate() {
            let turn_path = index_path(&path, j);
            let text = str_at(&pair[j], &turn_path)?;
            non_empty(text, &turn_path)?;
            messages.push(Message::new(role, text));
        }
    }
    Ok(messages)
}
