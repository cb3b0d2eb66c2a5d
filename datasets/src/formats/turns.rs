//! Chat turns shared by the message-list formats: role names, text content (plain strings or
//! lists of text parts) and the turn-order rules.

use super::fields::{
    array_at, index_path, key_path, non_empty, object_at, required, str_at, wrong_type, Fail,
    Parsed,
};
use crate::records::{Conversation, Message, ASSISTANT, SYSTEM, USER};
use serde_json::Value;

/// Separator between the text parts of one message (`[{"text": a}, {"text": b}]` -> "a\nb").
/// APIs differ (some concatenate, some render one block per line); a newline keeps the parts
/// apart without inventing structure.
pub const PART_SEPARATOR: &str = "\n";

/// One turn after role normalisation, remembering where it came from for error messages.
#[derive(Debug, Clone)]
pub(crate) struct Turn {
    /// [`USER`], [`ASSISTANT`] or [`SYSTEM`].
    pub role: &'static str,
    /// The role as written (`gpt`, `human`, ...), quoted back in errors.
    pub raw_role: String,
    pub content: String,
    /// JSON path of the role field (`messages[2].role`), the field blamed for order errors.
    pub role_field: String,
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
            (Roles::ShareGpt, "system") => Some(SYSTEM),
            (Roles::ShareGpt, "human") => Some(USER),
            (Roles::ShareGpt, "gpt" | "chatgpt" | "bing" | "bard" | "model") => Some(ASSISTANT),
            _ => None,
        };
        role.ok_or_else(|| match (self, raw) {
            (Roles::Bedrock, "system") => "`system` is not a message role here; put the system \
                prompt in the top-level `system` field"
                .to_string(),
            _ => format!(
                "unsupported role `{raw}` (expected one of: {}); tool and function turns are \
                 not supported",
                self.accepted()
            ),
        })
    }

    fn accepted(self) -> &'static str {
        match self {
            Roles::Bedrock => "user, assistant",
            Roles::OpenAi => "system, developer, user, assistant",
            Roles::ShareGpt => "system, human, user, gpt, assistant, chatgpt, bing, bard, model",
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
/// `{"type": "text", "text": ..}` as in OpenAI) joined with [`PART_SEPARATOR`]. Images, tool
/// calls and other non-text parts are refused: this toolkit trains on text only. The result is
/// never empty.
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

/// Reads a list of turn objects, normalising roles and extracting text.
pub(crate) fn parse_turns(list: &Value, list_path: &str, roles: Roles) -> Parsed<Vec<Turn>> {
    let items = array_at(list, list_path)?;
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let path = index_path(list_path, i);
            let obj = object_at(item, &path)?;
            let (role_key, content_key) = roles.keys(obj);
            let role_field = key_path(&path, role_key);
            let raw_role = str_at(required(obj, role_key, &path)?, &role_field)?;
            let role = roles
                .normalise(raw_role)
                .map_err(|reason| Fail::at(&role_field, reason))?;
            let content = text_content(
                required(obj, content_key, &path)?,
                &key_path(&path, content_key),
            )?;
            Ok(Turn {
                role,
                raw_role: raw_role.to_string(),
                content,
                role_field,
            })
        })
        .collect()
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

/// Turns must start with `first`, alternate user/assistant, and end with `last`.
/// `list_path` is blamed when there are no turns at all.
pub(crate) fn check_order(
    turns: &[Turn],
    list_path: &str,
    first: &'static str,
    last: &'static str,
) -> Parsed<()> {
    let Some(final_turn) = turns.last() else {
        return Err(Fail::at(
            list_path,
            format!("no turns: at least one `{first}` turn is needed"),
        ));
    };
    let mut expected = first;
    for turn in turns {
        if turn.role != expected {
            return Err(Fail::at(
                &turn.role_field,
                format!(
                    "expected role `{expected}`, found `{}` (turns must start with `{first}` \
                     and alternate user/assistant)",
                    turn.raw_role
                ),
            ));
        }
        expected = other_role(expected);
    }
    if final_turn.role != last {
        return Err(Fail::at(
            &final_turn.role_field,
            format!(
                "the last turn must be `{last}`, found `{}`",
                final_turn.raw_role
            ),
        ));
    }
    Ok(())
}

pub(crate) fn into_messages(turns: Vec<Turn>) -> Vec<Message> {
    turns
        .into_iter()
        .map(|t| Message::new(t.role, &t.content))
        .collect()
}

/// A message list (with an optional leading system turn) as a conversation that starts with
/// `user` and ends with `last`: `assistant` for training chats, `user` for prompts.
pub(crate) fn conversation_from_list(
    list: &Value,
    list_path: &str,
    roles: Roles,
    last: &'static str,
) -> Parsed<Conversation> {
    let (system, turns) = take_system(parse_turns(list, list_path, roles)?)?;
    check_order(&turns, list_path, USER, last)?;
    Ok(Conversation {
        system,
        messages: into_messages(turns),
    })
}

/// Required field holding a conversation message list.
pub(crate) fn conversation_field(
    obj: &serde_json::Map<String, Value>,
    key: &str,
    roles: Roles,
    last: &'static str,
) -> Parsed<Conversation> {
    conversation_from_list(required(obj, key, "")?, key, roles, last)
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
            })
        }
        Value::Array(_) => conversation_from_list(value, path, Roles::OpenAi, USER),
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
        let e = check_order(&turns, "messages", USER, ASSISTANT).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("messages[1].role"));
        assert!(e
            .reason
            .starts_with("expected role `assistant`, found `user`"));

        let e = check_order(&turns[..1], "messages", USER, ASSISTANT).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("messages[0].role"));
        assert_eq!(e.reason, "the last turn must be `assistant`, found `user`");
        assert!(check_order(&[], "messages", USER, ASSISTANT).is_err());
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
