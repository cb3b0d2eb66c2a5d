//! Writing canonical records in the supervised fine-tuning formats. Alpaca, ShareGPT, OpenAI
//! and Bedrock conversation hold any conversation exactly (reading the row back gives the
//! same record); Bedrock prompt/completion holds one exchange and says what it dropped.
//! Conversations with tool use are written by the three formats that hold it (OpenAI,
//! Bedrock conversation, ShareGPT), each in its own shape; ShareGPT has no call ids, so they
//! are dropped there (reading back numbers the calls `call_0`, `call_1`, ...).

use crate::formats::bedrock::CONVERSATION_SCHEMA;
use crate::records::{Conversation, Message, Record, ToolCall, ASSISTANT, TOOL, USER};
use anyhow::{bail, Result};
use models::py_json::Dumps;
use serde_json::{json, Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// `{"prompt", "completion"}`
    Bedrock,
    /// `{"schemaVersion": "bedrock-conversation-2024", "system"?, "messages"}`
    BedrockConversation,
    /// `{"instruction", "input", "output", "system"?, "history"?}`
    Alpaca,
    /// `{"conversations": [{"from", "value"}]}`
    ShareGpt,
    /// `{"messages": [{"role", "content"}]}`
    OpenAi,
}

const TARGETS: [Target; 5] = [
    Target::Bedrock,
    Target::BedrockConversation,
    Target::Alpaca,
    Target::ShareGpt,
    Target::OpenAi,
];

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Bedrock => "bedrock",
            Target::BedrockConversation => "bedrock-conversation",
            Target::Alpaca => "alpaca",
            Target::ShareGpt => "sharegpt",
            Target::OpenAi => "openai",
        }
    }

    /// Parses a target name (case-insensitive; `_` may stand for `-`).
    pub fn parse(s: &str) -> Result<Target> {
        let wanted = s.trim().to_ascii_lowercase().replace('_', "-");
        TARGETS
            .iter()
            .copied()
            .find(|t| t.name() == wanted)
            .ok_or_else(|| {
                let names: Vec<_> = TARGETS.iter().map(|t| t.name()).collect();
                anyhow::anyhow!("unknown target format `{s}`; targets: {}", names.join(", "))
            })
    }

    pub fn all() -> &'static [Target] {
        &TARGETS
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Target {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Target> {
        Target::parse(s)
    }
}

/// Converts one record to a row of `target`. The warnings say what the row could not hold.
/// Fails for records that have no single assistant response to train on (preference pairs,
/// prompt tasks) and for conversations that are not user/assistant turns ending with the
/// assistant.
pub fn convert_record(record: &Record, target: Target) -> Result<(Value, Vec<String>)> {
    let answered;
    let conversation = match record {
        Record::Conversation(c) => c,
        Record::PromptTask(t) if t.answer.is_some() => {
            answered = t.as_conversation().expect("has an answer");
            &answered
        }
        Record::Preference(_) => bail!(
            "a preference pair cannot be written as {target}: the format holds one response \
             per row, not a chosen and a rejected one"
        ),
        Record::PromptTask(_) => bail!(
            "a prompt without an answer cannot be written as {target}: it has no assistant \
             response, and {target} rows need one"
        ),
        Record::Unpaired(_) => bail!(
            "an unpaired (KTO) row cannot be written as {target}: its completion may be an \
             undesirable one, and {target} rows hold answers to train on"
        ),
    };
    if uses_tools(conversation) {
        return with_tools(conversation, target);
    }
    check_turns(conversation)?;
    Ok(match target {
        Target::Bedrock => prompt_completion(conversation),
        Target::BedrockConversation => (bedrock_conversation(conversation), Vec::new()),
        Target::Alpaca => (alpaca(conversation), Vec::new()),
        Target::ShareGpt => (sharegpt(conversation), Vec::new()),
        Target::OpenAi => (openai(conversation), Vec::new()),
    })
}

fn uses_tools(conversation: &Conversation) -> bool {
    !conversation.tools.is_empty()
        || conversation
            .messages
            .iter()
            .any(|m| m.role == TOOL || !m.tool_calls.is_empty())
}

/// A conversation with tool definitions, calls or results, in a format that holds them. The
/// readers have checked the turns (calls name defined tools, results answer calls).
fn with_tools(conversation: &Conversation, target: Target) -> Result<(Value, Vec<String>)> {
    if conversation.messages.last().map(|m| m.role.as_str()) != Some(ASSISTANT) {
        bail!(
            "the conversation does not end with an assistant turn; there is no response to write"
        );
    }
    match target {
        Target::OpenAi => Ok((openai(conversation), Vec::new())),
        Target::BedrockConversation => Ok(bedrock_with_tools(conversation)),
        Target::ShareGpt => Ok(sharegpt_with_tools(conversation)),
        Target::Bedrock | Target::Alpaca => bail!(
            "a conversation with tool use cannot be written as {target}: the format has no \
             place for tool definitions, calls or results (write openai, \
             bedrock-conversation or sharegpt)"
        ),
    }
}

/// The writers below rely on user/assistant pairs, as every reader produces them.
fn check_turns(conversation: &Conversation) -> Result<()> {
    let messages = &conversation.messages;
    if messages.is_empty() {
        bail!("the conversation has no messages");
    }
    for (i, message) in messages.iter().enumerate() {
        let expected = if i % 2 == 0 { USER } else { ASSISTANT };
        if message.role != expected {
            bail!(
                "messages[{i}] has role `{}` where `{expected}` is expected: conversations \
                 must alternate user/assistant",
                message.role
            );
        }
    }
    if !messages.len().is_multiple_of(2) {
        bail!("the conversation ends with a user turn; there is no response to write");
    }
    Ok(())
}

/// The last exchange as prompt/completion. The format has no system field and no history,
/// so the system prompt is put in front of the prompt and earlier turns are dropped.
fn prompt_completion(conversation: &Conversation) -> (Value, Vec<String>) {
    let n = conversation.messages.len();
    let (prompt, completion) = (
        &conversation.messages[n - 2].content,
        &conversation.messages[n - 1].content,
    );
    let mut warnings = Vec::new();
    if n > 2 {
        warnings.push(format!(
            "kept only the last user/assistant exchange: dropped {} earlier turns \
             (prompt/completion holds one exchange)",
            n - 2
        ));
    }
    let prompt = match &conversation.system {
        Some(system) => {
            warnings.push(
                "put the system prompt in front of the prompt, separated by a blank line \
                 (prompt/completion has no system field)"
                    .to_string(),
            );
            format!("{system}\n\n{prompt}")
        }
        None => prompt.clone(),
    };
    (
        json!({"prompt": prompt, "completion": completion}),
        warnings,
    )
}

fn bedrock_conversation(conversation: &Conversation) -> Value {
    let messages: Vec<Value> = conversation
        .messages
        .iter()
        .map(|m| json!({"role": m.role, "content": [{"text": m.content}]}))
        .collect();
    bedrock_row(conversation, messages)
}

fn bedrock_row(conversation: &Conversation, messages: Vec<Value>) -> Value {
    let mut row = json!({"schemaVersion": CONVERSATION_SCHEMA});
    if let Some(system) = &conversation.system {
        row["system"] = json!([{ "text": system }]);
    }
    row["messages"] = Value::Array(messages);
    row
}

/// Converse blocks: the assistant's text and `toolUse` blocks in one message; tool results
/// as `toolResult` blocks of the user message that follows them (with the user's own text,
/// if the user speaks next), since Converse alternates user and assistant; the tools in
/// `toolConfig`.
fn bedrock_with_tools(conversation: &Conversation) -> (Value, Vec<String>) {
    let mut warnings = Vec::new();
    let mut messages: Vec<Value> = Vec::new();
    let mut results: Vec<Value> = Vec::new();
    for m in &conversation.messages {
        let mut blocks: Vec<Value> = Vec::new();
        if m.role == TOOL {
            results.push(json!({"toolResult": {
                "toolUseId": m.tool_call_id,
                "content": [{"text": m.content}],
            }}));
            continue;
        }
        if m.role == USER {
            blocks.append(&mut results);
        } else if !results.is_empty() {
            messages.push(json!({"role": USER, "content": std::mem::take(&mut results)}));
        }
        if !m.content.is_empty() {
            blocks.push(json!({ "text": m.content }));
        }
        blocks.extend(m.tool_calls.iter().map(|c| {
            json!({"toolUse": {
                "toolUseId": c.id,
                "name": c.function.name,
                "input": c.function.arguments,
            }})
        }));
        messages.push(json!({"role": m.role, "content": blocks}));
    }
    let mut row = bedrock_row(conversation, messages);
    if !conversation.tools.is_empty() {
        let specs: Vec<Value> = conversation
            .tools
            .iter()
            .map(|tool| {
                let f = &tool["function"];
                let mut spec = Map::new();
                spec.insert("name".into(), f["name"].clone());
                if let Some(d) = f.get("description") {
                    spec.insert("description".into(), d.clone());
                }
                let schema = match f.get("parameters") {
                    Some(p) => p.clone(),
                    None => {
                        warnings.push(format!(
                            "tool `{}` declares no parameters; wrote an empty object schema \
                             (Bedrock requires inputSchema)",
                            f["name"].as_str().unwrap_or_default()
                        ));
                        json!({"type": "object", "properties": {}})
                    }
                };
                spec.insert("inputSchema".into(), json!({ "json": schema }));
                json!({ "toolSpec": spec })
            })
            .collect();
        row["toolConfig"] = json!({ "tools": specs });
    }
    (row, warnings)
}

/// The last exchange is instruction/output (with an empty `input`), earlier exchanges go to
/// `history`, which is how LLaMA-Factory writes multi-turn Alpaca.
fn alpaca(conversation: &Conversation) -> Value {
    let pairs: Vec<&[Message]> = conversation.messages.chunks(2).collect();
    let (last, earlier) = match pairs.split_last() {
        Some((last, earlier)) => (*last, earlier),
        None => (&[][..], &[][..]),
    };
    let mut row = json!({
        "instruction": text(last, 0),
        "input": "",
        "output": text(last, 1),
    });
    if let Some(system) = &conversation.system {
        row["system"] = json!(system);
    }
    if !earlier.is_empty() {
        let history: Vec<Value> = earlier
            .iter()
            .map(|pair| json!([text(pair, 0), text(pair, 1)]))
            .collect();
        row["history"] = Value::Array(history);
    }
    row
}

fn text(pair: &[Message], i: usize) -> &str {
    pair.get(i).map_or("", |m| m.content.as_str())
}

/// LLaMA-Factory's tool layout: `function_call` turns holding `{"name", "arguments"}` JSON
/// (a list for parallel calls) after the assistant's text (as a `gpt` turn), `observation`
/// turns for results, and `tools` as a JSON string of the bare function definitions.
fn sharegpt_with_tools(conversation: &Conversation) -> (Value, Vec<String>) {
    let dumps = Dumps::default();
    let mut turns: Vec<Value> = conversation
        .system
        .iter()
        .map(|s| json!({"from": "system", "value": s}))
        .collect();
    for m in &conversation.messages {
        match m.role.as_str() {
            TOOL => turns.push(json!({"from": "observation", "value": m.content})),
            USER => turns.push(json!({"from": "human", "value": m.content})),
            _ => {
                if !m.content.is_empty() {
                    turns.push(json!({"from": "gpt", "value": m.content}));
                }
                if !m.tool_calls.is_empty() {
                    let call = |c: &ToolCall| json!({"name": c.function.name, "arguments": c.function.arguments});
                    let value = match m.tool_calls.as_slice() {
                        [one] => call(one),
                        many => Value::Array(many.iter().map(call).collect()),
                    };
                    turns.push(json!({"from": "function_call", "value": dumps.dumps(&value)}));
                }
            }
        }
    }
    let mut row = json!({ "conversations": turns });
    if !conversation.tools.is_empty() {
        let bare: Vec<Value> = conversation
            .tools
            .iter()
            .map(|t| t["function"].clone())
            .collect();
        row["tools"] = Value::String(dumps.dumps(&Value::Array(bare)));
    }
    let ids_read_back = (0..).map(|n| format!("call_{n}"));
    let calls = conversation.messages.iter().flat_map(|m| &m.tool_calls);
    let warnings = if calls
        .zip(ids_read_back)
        .any(|(c, id)| c.id.as_deref() != Some(id.as_str()))
    {
        vec![
            "dropped the tool call ids (ShareGPT has none; results follow their calls in order)"
                .into(),
        ]
    } else {
        Vec::new()
    };
    (row, warnings)
}

fn sharegpt(conversation: &Conversation) -> Value {
    let system = conversation
        .system
        .iter()
        .map(|s| json!({"from": "system", "value": s}));
    let turns = conversation.messages.iter().map(|m| {
        let from = if m.role == USER { "human" } else { "gpt" };
        json!({"from": from, "value": m.content})
    });
    json!({"conversations": system.chain(turns).collect::<Vec<_>>()})
}

/// OpenAI's fine-tuning shape: `arguments` as a JSON string, `content` null for an
/// assistant turn that only calls tools, `tools` beside `messages`.
fn openai(conversation: &Conversation) -> Value {
    let messages: Vec<Value> = conversation
        .to_messages()
        .into_iter()
        .map(|m| {
            let mut out = json!({"role": m.role, "content": m.content});
            if !m.tool_calls.is_empty() {
                if m.content.is_empty() {
                    out["content"] = Value::Null;
                }
                let calls: Vec<Value> = m
                    .tool_calls
                    .iter()
                    .map(|c| {
                        json!({"id": c.id, "type": "function", "function": {
                            "name": c.function.name,
                            "arguments": Value::Object(c.function.arguments.clone()).to_string(),
                        }})
                    })
                    .collect();
                out["tool_calls"] = Value::Array(calls);
            }
            if let Some(id) = &m.tool_call_id {
                out["tool_call_id"] = json!(id);
            }
            out
        })
        .collect();
    let mut row = json!({ "messages": messages });
    if !conversation.tools.is_empty() {
        row["tools"] = json!(conversation.tools);
    }
    row
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(system: Option<&str>, turns: &[&str]) -> Record {
        let messages = turns
            .iter()
            .enumerate()
            .map(|(i, t)| Message::new(if i % 2 == 0 { USER } else { ASSISTANT }, t))
            .collect();
        Record::Conversation(Conversation {
            system: system.map(str::to_string),
            messages,
            tools: Vec::new(),
        })
    }

    #[test]
    fn prompt_completion_is_exact_for_one_exchange_and_says_what_it_drops() {
        let (row, warnings) = convert_record(&chat(None, &["q", "a"]), Target::Bedrock).unwrap();
        assert_eq!(row, json!({"prompt": "q", "completion": "a"}));
        assert!(warnings.is_empty());
        let (row, warnings) =
            convert_record(&chat(Some("s"), &["q1", "a1", "q2", "a2"]), Target::Bedrock).unwrap();
        assert_eq!(row, json!({"prompt": "s\n\nq2", "completion": "a2"}));
        assert_eq!(warnings.len(), 2);
        assert!(
            warnings[0].contains("dropped 2 earlier turns"),
            "{warnings:?}"
        );
        assert!(warnings[1].contains("system prompt"), "{warnings:?}");
    }

    #[test]
    fn alpaca_keeps_earlier_turns_in_history() {
        let (row, _) =
            convert_record(&chat(Some("s"), &["q1", "a1", "q2", "a2"]), Target::Alpaca).unwrap();
        assert_eq!(
            row,
            json!({"instruction": "q2", "input": "", "output": "a2", "system": "s",
                   "history": [["q1", "a1"]]})
        );
    }

    #[test]
    fn records_without_one_response_are_refused() {
        let bad = chat(None, &["q"]);
        let e = convert_record(&bad, Target::OpenAi)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ends with a user turn"), "{e}");
        assert!(Target::parse("csv")
            .unwrap_err()
            .to_string()
            .contains("bedrock, bedrock-conversation, alpaca, sharegpt, openai"));
        for &t in Target::all() {
            assert_eq!(Target::parse(t.name()).unwrap(), t);
        }
    }
}
