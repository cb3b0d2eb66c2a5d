//! Chat turns shared by the message-list formats: role names, text content (plain strings or
//! lists of text parts), tool calls and results, and the turn-order rules.

use super::fields::{
    array_at, index_path, key_path, non_empty, object_at, optional, required, str_at, wrong_type,
    Fail, Parsed,
};
use super::tools;
use crate::records::{Conversation, Message, ToolCall, ASSISTANT, SYSTEM, TOOL, USER};
use serde_json::{Map, Value};

/// Separator between the text parts of one message (`[{"text": a}, {"text": b}]` -> "a\nb").
/// APIs differ (some concatenate, some render one block per line); a newline keeps the parts
/// apart without inventing structure.
pub const PART_SEPARATOR: &str = "\n";

/// One turn after role normalisation, remembering where it came from for error messages.
#[derive(Debug, Clone, Default)]
pub(crate) struct Turn {
    /// [`USER`], [`ASSISTANT`], [`SYSTEM`] or [`TOOL`].
    pub role: &'static str,
    /// The role as written (`gpt`, `human`, ...), quoted back in errors.
    pub raw_role: String,
    /// Empty only for an assistant turn that calls tools.
    pub content: String,
    /// The assistant's tool calls, and the JSON path of each (blamed for a bad call).
    pub tool_calls: Vec<ToolCall>,
    pub call_fields: Vec<String>,
    /// A tool result: the id of the call it answers, when the format writes one.
    pub tool_call_id: Option<String>,
    /// A tool result: the name of the tool, filled in from its call.
    pub name: Option<String>,
    /// JSON path of the role field (`messages[2].role`), the field blamed for order errors.
    pub role_field: String,
    /// JSON path of the turn itself (`messages[2]`).
    pub path: String,
}

/// The role vocabularies of the input formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Roles {
    /// Bedrock conversation and Claude-on-Bedrock: `user`/`assistant` only; the system prompt
    /// is a top-level field.
    Bedrock,
    /// OpenAI chat: `system` (or `developer`), `user`, `assistant`.
    OpenAi,
    /// ShareGPT/FastChat: `human`/`gpt` plus the aliases seen in the wild.
    ShareGpt,
}

impl Roles {
    fn normalise(self, raw: &str) -> Result<&'static str, String> {
        let role = match (self, raw) {
            (_, "user") => Some(USER),
            (_, "assistant") => Some(ASSISTANT),
            (Roles::OpenAi, "system" | "developer") => Some(SYSTEM),
            (Roles::OpenAi, "tool") => Some(TOOL),
            (Roles::ShareGpt, "system") => Some(SYSTEM),
            (Roles::ShareGpt, "function_call") => Some(ASSISTANT),
            (Roles::ShareGpt, "observation" | "tool") => Some(TOOL),
            (Roles::ShareGpt, "human") => Some(USER),
            (Roles::ShareGpt, "gpt" | "chatgpt" | "bing" | "bard" | "model") => Some(ASSISTANT),
            _ => None,
        };
        role.ok_or_else(|| match (self, raw) {
            (Roles::Bedrock, "system") => "`system` is not a message role here; put the system \
                prompt in the top-level `system` field"
                .to_string(),
            (Roles::OpenAi, "function") => "the legacy `function` role is not supported: write \
                tool results as `tool` messages answering the assistant's `tool_calls`"
                .to_string(),
            _ => format!(
                "unsupported role `{raw}` (expected one of: {})",
                self.accepted()
            ),
        })
    }

    fn accepted(self) -> &'static str {
        match self {
            Roles::Bedrock => "user, assistant",
            Roles::OpenAi => "system, developer, user, assistant, tool",
            Roles::ShareGpt => {
                "system, human, user, gpt, assistant, chatgpt, bing, bard, model, \
                 function_call, observation, tool"
            }
        }
    }

    /// Field names of one turn object: ShareGPT uses `from`/`value`, but some ShareGPT-style
    /// exports use `role`/`content` inside `conversations`, so those are accepted as well.
    fn keys(self, turn: &serde_json::Map<String, Value>) -> (&'static str, &'static str) {
        match self {
            Roles::ShareGpt if !turn.contains_key("from") && turn.contains_key("role") => {
                ("role", "content")
            }
            Roles::ShareGpt => ("from", "value"),
            Roles::Bedrock | Roles::OpenAi => ("role", "content"),
        }
    }
}

/// Text of a message: a string, or a list of text parts (`{"text": ..}` as in Bedrock, or
/// `{"type": "text", "text": ..}` as in OpenAI) joined with [`PART_SEPARATOR`]. Images and
/// other non-text parts are refused: this toolkit trains on text only (Bedrock's tool blocks
/// are read by [`bedrock_blocks`]). The result is never empty.
pub(crate) fn text_content(value: &Value, path: &str) -> Parsed<String> {
    let text = match value {
        Value::String(s) => s.clone(),
        Value::Array(parts) => {
            if parts.is_empty() {
                return Err(Fail::at(path, "empty content (no parts)"));
            }
            let texts = parts
                .iter()
                .enumerate()
                .map(|(j, part)| text_part(part, &index_path(path, j)))
                .collect::<Parsed<Vec<&str>>>()?;
            texts.join(PART_SEPARATOR)
        }
        other => return Err(wrong_type(path, "a string or a list of text parts", other)),
    };
    non_empty(&text, path)?;
    Ok(text)
}

fn text_part<'a>(part: &'a Value, path: &str) -> Parsed<&'a str> {
    let obj = object_at(part, path)?;
    if let Some(kind) = obj.get("type") {
        let kind = str_at(kind, &key_path(path, "type"))?;
        if kind != "text" {
            return Err(Fail::at(
                path,
                format!("non-text content part of type `{kind}` is not supported (text only)"),
            ));
        }
    }
    match obj.get("text") {
        Some(text) => str_at(text, &key_path(path, "text")),
        None => {
            let kind = obj.keys().next().map(String::as_str).unwrap_or("{}");
            Err(Fail::at(
                path,
                format!("non-text content part `{kind}` is not supported (text only)"),
            ))
        }
    }
}

/// Reads a list of turn objects, normalising roles and extracting text and tool use. One
/// Bedrock message may become several turns (its tool results, then its text).
pub(crate) fn parse_turns(list: &Value, list_path: &str, roles: Roles) -> Parsed<Vec<Turn>> {
    let items = array_at(list, list_path)?;
    let mut turns: Vec<Turn> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let path = index_path(list_path, i);
        let obj = object_at(item, &path)?;
        let (role_key, content_key) = roles.keys(obj);
        let role_field = key_path(&path, role_key);
        let raw_role = str_at(required(obj, role_key, &path)?, &role_field)?;
        let role = roles
            .normalise(raw_role)
            .map_err(|reason| Fail::at(&role_field, reason))?;
        let turn = Turn {
            role,
            raw_role: raw_role.to_string(),
            role_field,
            path: path.clone(),
            ..Turn::default()
        };
        let content_path = key_path(&path, content_key);
        match roles {
            Roles::Bedrock => turns.extend(bedrock_blocks(
                turn,
                required(obj, content_key, &path)?,
                &content_path,
            )?),
            Roles::OpenAi => turns.push(openai_turn(turn, obj, content_key, &content_path)?),
            Roles::ShareGpt if raw_role == "function_call" => {
                let value = str_at(required(obj, content_key, &path)?, &content_path)?;
                let calls = tools::sharegpt_calls(value, &content_path)?;
                let call_fields = vec![content_path.clone(); calls.len()];
                // `gpt` text then `function_call` is one assistant turn that talks and calls.
                match turns.last_mut() {
                    Some(prev) if prev.role == ASSISTANT && prev.tool_calls.is_empty() => {
                        prev.tool_calls = calls;
                        prev.call_fields = call_fields;
                    }
                    _ => turns.push(Turn {
                        tool_calls: calls,
                        call_fields,
                        ..turn
                    }),
                }
            }
            Roles::ShareGpt => {
                let content = text_content(required(obj, content_key, &path)?, &content_path)?;
                turns.push(Turn { content, ..turn });
            }
        }
    }
    Ok(turns)
}

/// An OpenAI message: text content, or for the assistant `tool_calls` with optional text
/// (`content` null or absent), or for a tool result its `tool_call_id`.
fn openai_turn(
    mut turn: Turn,
    obj: &Map<String, Value>,
    content_key: &str,
    content_path: &str,
) -> Parsed<Turn> {
    let calls_path = key_path(&turn.path, "tool_calls");
    let calls = match optional(obj, "tool_calls") {
        Some(calls) if turn.role == ASSISTANT => tools::openai_calls(calls, &calls_path)?,
        Some(_) => {
            return Err(Fail::at(
                key_path(&turn.path, "tool_calls"),
                format!(
                    "only assistant turns call tools, this is a `{}` turn",
                    turn.raw_role
                ),
            ))
        }
        None => Vec::new(),
    };
    turn.content = match optional(obj, content_key) {
        None if !calls.is_empty() => String::new(),
        Some(Value::String(s)) if !calls.is_empty() && s.trim().is_empty() => String::new(),
        Some(Value::Array(parts)) if !calls.is_empty() && parts.is_empty() => String::new(),
        _ => text_content(required(obj, content_key, &turn.path)?, content_path)?,
    };
    turn.call_fields = (0..calls.len())
        .map(|i| index_path(&calls_path, i))
        .collect();
    turn.tool_calls = calls;
    if turn.role == TOOL {
        turn.tool_call_id = optional(obj, "tool_call_id")
            .map(|id| str_at(id, &key_path(&turn.path, "tool_call_id")).map(str::to_string))
            .transpose()?;
    }
    Ok(turn)
}

/// A Bedrock Converse message: `text` blocks, the assistant's `toolUse` blocks, and the
/// user's `toolResult` blocks, which become `tool` turns ahead of the user's own text (if
/// any). A plain string is text.
fn bedrock_blocks(turn: Turn, content: &Value, path: &str) -> Parsed<Vec<Turn>> {
    let Value::Array(blocks) = content else {
        let content = text_content(content, path)?;
        return Ok(vec![Turn { content, ..turn }]);
    };
    if blocks.is_empty() {
        return Err(Fail::at(path, "empty content (no parts)"));
    }
    let mut texts = Vec::new();
    let mut calls = Vec::new();
    let mut call_fields = Vec::new();
    let mut results = Vec::new();
    for (j, block) in blocks.iter().enumerate() {
        let block_path = index_path(path, j);
        let obj = object_at(block, &block_path)?;
        match (obj.get("toolUse"), obj.get("toolResult")) {
            (Some(use_), _) if turn.role == ASSISTANT => {
                let use_path = key_path(&block_path, "toolUse");
                calls.push(tools::bedrock_call(use_, &use_path)?);
                call_fields.push(use_path);
            }
            (_, Some(result)) if turn.role == USER => {
                let result_path = key_path(&block_path, "toolResult");
                let (id, content) = tools::bedrock_result(result, &result_path)?;
                results.push(Turn {
                    role: TOOL,
                    raw_role: "toolResult".into(),
                    content,
                    tool_call_id: Some(id),
                    role_field: result_path.clone(),
                    path: result_path,
                    ..Turn::default()
                });
            }
            (Some(_), _) | (_, Some(_)) => {
                let kind = if obj.contains_key("toolUse") {
                    "toolUse (only assistant turns call tools)"
                } else {
                    "toolResult (only user turns carry tool results)"
                };
                return Err(Fail::at(
                    &block_path,
                    format!("a `{}` turn cannot hold {kind}", turn.raw_role),
                ));
            }
            _ => texts.push(text_part(block, &block_path)?.to_string()),
        }
    }
    let content = texts.join(PART_SEPARATOR);
    if !texts.is_empty() || calls.is_empty() && results.is_empty() {
        non_empty(&content, path)?;
    }
    let own = (!content.is_empty() || !calls.is_empty()).then(|| Turn {
        content,
        tool_calls: calls,
        call_fields,
        ..turn
    });
    results.extend(own);
    Ok(results)
}

/// Splits off a leading system turn; a system turn anywhere else is an error because chat
/// templates only place the system prompt first.
pub(crate) fn take_system(mut turns: Vec<Turn>) -> Parsed<(Option<String>, Vec<Turn>)> {
    let system = match turns.first() {
        Some(first) if first.role == SYSTEM => Some(turns.remove(0).content),
        _ => None,
    };
    if let Some(late) = turns.iter().find(|t| t.role == SYSTEM) {
        return Err(Fail::at(
            &late.role_field,
            format!(
                "`{}` turn after the start: a system prompt is only allowed as the first turn",
                late.raw_role
            ),
        ));
    }
    Ok((system, turns))
}

fn other_role(role: &str) -> &'static str {
    if role == USER {
        ASSISTANT
    } else {
        USER
    }
}

/// Turns must start with `first`, alternate user/assistant, and end with `last`. Tool results
/// may follow an assistant turn that calls tools (they answer its calls, see
/// [`tools::link`]); after them the assistant or the user speaks. A prompt (`last` = user) may
/// also end with tool results. `list_path` is blamed when there are no turns at all.
pub(crate) fn check_order(
    turns: &mut [Turn],
    list_path: &str,
    first: &'static str,
    last: &'static str,
    tool_defs: &[Value],
) -> Parsed<()> {
    let Some(final_turn) = turns.last() else {
        return Err(Fail::at(
            list_path,
            format!("no turns: at least one `{first}` turn is needed"),
        ));
    };
    let ends_well = final_turn.role == last || (last == USER && final_turn.role == TOOL);
    let final_problem = (!ends_well).then(|| {
        Fail::at(
            &final_turn.role_field,
            format!(
                "the last turn must be `{last}`, found `{}`",
                final_turn.raw_role
            ),
        )
    });
    let mut previous: Option<&'static str> = None;
    for turn in turns.iter() {
        let allowed = match (previous, turn.role) {
            (None, role) => role == first,
            (Some(TOOL), TOOL | USER | ASSISTANT) => true,
            (Some(ASSISTANT), TOOL) => true,
            (Some(prev), role) => role != TOOL && role == other_role(prev),
        };
        if !allowed {
            let expected = match previous {
                None => first,
                Some(prev) => other_role(prev),
            };
            return Err(Fail::at(
                &turn.role_field,
                format!(
                    "expected role `{expected}`, found `{}` (turns must start with `{first}` \
                     and alternate user/assistant)",
                    turn.raw_role
                ),
            ));
        }
        previous = Some(turn.role);
    }
    tools::link(turns, tool_defs)?;
    final_problem.map_or(Ok(()), Err)
}

pub(crate) fn into_messages(turns: Vec<Turn>) -> Vec<Message> {
    turns
        .into_iter()
        .map(|t| Message {
            role: t.role.to_string(),
            content: t.content,
            tool_calls: t.tool_calls,
            tool_call_id: t.tool_call_id,
            name: t.name,
        })
        .collect()
}

/// A message list (with an optional leading system turn) as a conversation that starts with
/// `user` and ends with `last`: `assistant` for training chats, `user` for prompts. `tools`
/// are the row's tool definitions, which the calls must name.
pub(crate) fn conversation_from_list(
    list: &Value,
    list_path: &str,
    roles: Roles,
    last: &'static str,
    tools: Vec<Value>,
) -> Parsed<Conversation> {
    let (system, mut turns) = take_system(parse_turns(list, list_path, roles)?)?;
    check_order(&mut turns, list_path, USER, last, &tools)?;
    Ok(Conversation {
        system,
        messages: into_messages(turns),
        tools,
    })
}

/// Required field holding a conversation message list, with the row's tool definitions in
/// the format's own field (`tools`, Bedrock's `toolConfig`).
pub(crate) fn conversation_field(
    obj: &Map<String, Value>,
    key: &str,
    roles: Roles,
    last: &'static str,
) -> Parsed<Conversation> {
    let tools = tools::definitions(obj, roles)?;
    conversation_from_list(required(obj, key, "")?, key, roles, last, tools)
}

/// A prompt given as a plain string (one user message) or as a message list (optional leading
/// system turn, then user/assistant turns ending with the user), as in TRL's conversational
/// style.
pub(crate) fn prompt_from_value(value: &Value, path: &str) -> Parsed<Conversation> {
    match value {
        Value::String(text) => {
            non_empty(text, path)?;
            Ok(Conversation {
                system: None,
                messages: vec![Message::new(USER, text)],
                tools: Vec::new(),
            })
        }
        Value::Array(_) => conversation_from_list(value, path, Roles::OpenAi, USER, Vec::new()),
        other => Err(wrong_type(path, "a string or a list of messages", other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn text_parts_are_joined_and_non_text_parts_refused() {
        let bedrock = json!([{"text": "a"}, {"text": "b"}]);
        assert_eq!(text_content(&bedrock, "c").unwrap(), "a\nb");
        let openai = json!([{"type": "text", "text": "x"}]);
        assert_eq!(text_content(&openai, "c").unwrap(), "x");
        let image = json!([{"text": "a"}, {"image": {"format": "png"}}]);
        let e = text_content(&image, "messages[0].content").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("messages[0].content[1]"));
        assert!(e.reason.contains("`image`"), "{}", e.reason);
        let url = json!([{"type": "image_url", "image_url": {"url": "u"}}]);
        let e = text_content(&url, "c").unwrap_err();
        assert!(e.reason.contains("`image_url`"), "{}", e.reason);
        let e = text_content(&json!(7), "c").unwrap_err();
        assert_eq!(
            e.reason,
            "expected a string or a list of text parts, found a number"
        );
        assert!(text_content(&json!([]), "c").is_err());
    }

    #[test]
    fn order_errors_name_the_role_field() {
        let turns = parse_turns(
            &json!([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),
            "messages",
            Roles::OpenAi,
        )
        .unwrap();
        let mut turns = turns;
        let e = check_order(&mut turns, "messages", USER, ASSISTANT, &[]).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("messages[1].role"));
        assert!(e
            .reason
            .starts_with("expected role `assistant`, found `user`"));

        let e = check_order(&mut turns[..1], "messages", USER, ASSISTANT, &[]).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("messages[0].role"));
        assert_eq!(e.reason, "the last turn must be `assistant`, found `user`");
        assert!(check_order(&mut [], "messages", USER, ASSISTANT, &[]).is_err());
    }

    #[test]
    fn a_late_system_turn_is_refused() {
        let turns = parse_turns(
            &json!([{"from": "human", "value": "a"}, {"from": "system", "value": "s"}]),
            "conversations",
            Roles::ShareGpt,
        )
        .unwrap();
        let e = take_system(turns).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("conversations[1].from"));
    }

    #[test]
    fn bedrock_explains_where_the_system_prompt_goes() {
        let e = parse_turns(
            &json!([{"role": "system", "content": "s"}]),
            "messages",
            Roles::Bedrock,
        )
        .unwrap_err();
        assert!(e.reason.contains("top-level `system`"), "{}", e.reason);
    }
}
