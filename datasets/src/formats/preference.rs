//! Preference pairs: `{"prompt", "chosen", "rejected", "margin"?}` (strings or message lists,
//! TRL style), TRL's implicit-prompt shape (`chosen`/`rejected` are whole conversations that
//! share everything but the last assistant turn), and Anthropic hh-rlhf transcripts.

use super::fields::{optional, required, str_at, wrong_type, Fail, Parsed};
use super::turns::{
    check_order, into_messages, parse_turns, prompt_from_value, take_system, text_content, Roles,
    Turn,
};
use crate::records::{Conversation, Message, Preference, Record, Unpaired, ASSISTANT, USER};
use regex::Regex;
use serde_json::{Map, Value};
use std::sync::LazyLock;

pub(crate) fn preference(obj: &Map<String, Value>) -> Parsed<Record> {
    let margin = match optional(obj, "margin") {
        None => None,
        Some(v) => Some(
            v.as_f64()
                .ok_or_else(|| wrong_type("margin", "a number", v))?,
        ),
    };
    let chosen = required(obj, "chosen", "")?;
    let rejected = required(obj, "rejected", "")?;
    let pair = match optional(obj, "prompt") {
        Some(prompt) => Preference {
            prompt: prompt_from_value(prompt, "prompt")?,
            chosen: response(chosen, "chosen")?,
            rejected: response(rejected, "rejected")?,
            margin,
        },
        None => implicit_prompt(chosen, rejected, margin)?,
    };
    Ok(Record::Preference(pair))
}

/// `{"prompt", "completion", "label"}`: one completion, desirable (`true`) or not (TRL's
/// unpaired preference rows, KTO data).
pub(crate) fn unpaired(obj: &Map<String, Value>) -> Parsed<Record> {
    let label = required(obj, "label", "")?;
    let label = label
        .as_bool()
        .ok_or_else(|| wrong_type("label", "true or false", label))?;
    Ok(Record::Unpaired(Unpaired {
        prompt: prompt_from_value(required(obj, "prompt", "")?, "prompt")?,
        completion: response(required(obj, "completion", "")?, "completion")?,
        label,
    }))
}

/// A response: a string (one assistant message) or a message list that starts and ends with
/// the assistant (more than one message means the pair continues the dialogue).
fn response(value: &Value, path: &str) -> Parsed<Vec<Message>> {
    match value {
        Value::String(_) => Ok(vec![Message::new(ASSISTANT, &text_content(value, path)?)]),
        Value::Array(_) => {
            let mut turns = parse_turns(value, path, Roles::OpenAi)?;
            check_order(&mut turns, path, ASSISTANT, ASSISTANT, &[])?;
            Ok(into_messages(turns))
        }
        other => Err(wrong_type(path, "a string or a list of messages", other)),
    }
}

/// Index of the first turn where the dialogues before the final turns differ, if any.
fn first_prefix_difference<T: PartialEq>(chosen: &[T], rejected: &[T]) -> Option<usize> {
    let (a, b) = (
        &chosen[..chosen.len().saturating_sub(1)],
        &rejected[..rejected.len().saturating_sub(1)],
    );
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => Some(i),
        None if a.len() != b.len() => Some(a.len().min(b.len())),
        None => None,
    }
}

/// No `prompt` field: `chosen` and `rejected` are full conversations (message lists) whose
/// turns before the final assistant turn are the prompt.
fn implicit_prompt(chosen: &Value, rejected: &Value, margin: Option<f64>) -> Parsed<Preference> {
    let side = |value: &Value, path: &str| -> Parsed<(Option<String>, Vec<Turn>)> {
        if !value.is_array() {
            return Err(Fail::at(
                "prompt",
                format!(
                    "missing required field (`{path}` is {}, so the prompt cannot be \
                     taken from it)",
                    super::fields::type_name(value)
                ),
            ));
        }
        let (system, mut turns) = take_system(parse_turns(value, path, Roles::OpenAi)?)?;
        check_order(&mut turns, path, USER, ASSISTANT, &[])?;
        Ok((system, turns))
    };
    let (chosen_system, chosen) = side(chosen, "chosen")?;
    let (rejected_system, rejected) = side(rejected, "rejected")?;
    if chosen_system != rejected_system {
        return Err(Fail::at(
            "rejected",
            "the system prompt differs from the one in `chosen`",
        ));
    }
    let key = |t: &Turn| (t.role, t.content.clone());
    let chosen_keys: Vec<_> = chosen.iter().map(key).collect();
    let rejected_keys: Vec<_> = rejected.iter().map(key).collect();
    if let Some(i) = first_prefix_difference(&chosen_keys, &rejected_keys) {
        return Err(Fail::at(
            "rejected",
            format!(
                "the turns before the final assistant turn differ from `chosen` (first \
                 difference at rejected[{i}])"
            ),
        ));
    }
    let mut prompt = into_messages(chosen);
    let chosen_last = prompt.pop();
    let rejected_last = into_messages(rejected).pop();
    Ok(Preference {
        prompt: Conversation {
            system: chosen_system,
            messages: prompt,
            tools: Vec::new(),
        },
        chosen: chosen_last.into_iter().collect(),
        rejected: rejected_last.into_iter().collect(),
        margin,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Speaker {
    Human,
    Assistant,
}

impl Speaker {
    fn name(self) -> &'static str {
        match self {
            Speaker::Human => "Human",
            Speaker::Assistant => "Assistant",
        }
    }
}

/// hh-rlhf turn markers: `\n\nHuman: ` and `\n\nAssistant: `. The marker may also open the
/// text without the blank line, and a final `Assistant:` may have nothing after it (which
/// then counts as an empty final turn rather than as text of the previous turn).
static TURN_MARKER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?:^|\n\n)(Human|Assistant):(?: |$)").expect("constant regex is valid")
});

/// Splits a transcript into turns, checking that it starts with Human, alternates, and ends
/// with Assistant. The turn text is kept exactly as written.
fn transcript<'a>(value: &'a Value, field: &str) -> Parsed<Vec<(Speaker, &'a str)>> {
    let text = str_at(value, field)?;
    let mut turns: Vec<(Speaker, &str)> = Vec::new();
    let mut open: Option<(Speaker, usize)> = None;
    for marker in TURN_MARKER.captures_iter(text) {
        let (Some(whole), Some(name)) = (marker.get(0), marker.get(1)) else {
            continue;
        };
        match open {
            Some((speaker, start)) => turns.push((speaker, &text[start..whole.start()])),
            None if !text[..whole.start()].trim().is_empty() => {
                return Err(Fail::at(
                    field,
                    "text before the first `\\n\\nHuman: ` marker; a transcript must start \
                     with a Human turn",
                ))
            }
            None => {}
        }
        let speaker = if name.as_str() == "Human" {
            Speaker::Human
        } else {
            Speaker::Assistant
        };
        open = Some((speaker, whole.end()));
    }
    let Some((speaker, start)) = open else {
        return Err(Fail::at(
            field,
            "no `\\n\\nHuman: ` / `\\n\\nAssistant: ` turn markers found",
        ));
    };
    turns.push((speaker, &text[start..]));

    let mut expected = Speaker::Human;
    for (k, (speaker, content)) in turns.iter().enumerate() {
        if *speaker != expected {
            return Err(Fail::at(
                field,
                if k == 0 {
                    "turn 1 is `Assistant`; a transcript must start with a Human turn".into()
                } else {
                    format!(
                        "turn {} is a second `{}` turn in a row; turns must alternate \
                         Human/Assistant",
                        k + 1,
                        speaker.name()
                    )
                },
            ));
        }
        if k + 1 < turns.len() && content.trim().is_empty() {
            return Err(Fail::at(
                field,
                format!("turn {} (`{}`) has empty content", k + 1, speaker.name()),
            ));
        }
        expected = match speaker {
            Speaker::Human => Speaker::Assistant,
            Speaker::Assistant => Speaker::Human,
        };
    }
    if let Some((Speaker::Human, _)) = turns.last() {
        return Err(Fail::at(
            field,
            "the transcript does not end with an Assistant turn (the last turn is Human)",
        ));
    }
    if let Some((_, last)) = turns.last() {
        if last.trim().is_empty() {
            return Err(Fail::at(
                field,
                format!("empty {field}: the final Assistant turn has no text"),
            ));
        }
    }
    Ok(turns)
}

/// hh-rlhf: `{"chosen": "\n\nHuman: ..\n\nAssistant: ..", "rejected": ..}`. The turns before
/// the final Assistant turn are the prompt and must be the same on both sides; the final
/// Assistant turns are the chosen and rejected responses.
pub(crate) fn hh_rlhf(obj: &Map<String, Value>) -> Parsed<Record> {
    let chosen = transcript(required(obj, "chosen", "")?, "chosen")?;
    let rejected = transcript(required(obj, "rejected", "")?, "rejected")?;
    if let Some(k) = first_prefix_difference(&chosen, &rejected) {
        return Err(Fail::at(
            "rejected",
            format!(
                "the dialogue before the final Assistant turn differs from `chosen` (first \
                 difference at turn {})",
                k + 1
            ),
        ));
    }
    let to_message = |(speaker, text): &(Speaker, &str)| {
        let role = match speaker {
            Speaker::Human => USER,
            Speaker::Assistant => ASSISTANT,
        };
        Message::new(role, text)
    };
    let last = |turns: &[(Speaker, &str)]| turns.last().map(to_message).into_iter().collect();
    Ok(Record::Preference(Preference {
        prompt: Conversation {
            system: None,
            messages: chosen[..chosen.len() - 1].iter().map(to_message).collect(),
            tools: Vec::new(),
        },
        chosen: last(&chosen),
        rejected: last(&rejected),
        margin: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(row: Value) -> Parsed<Record> {
        hh_rlhf(row.as_object().expect("test rows are objects"))
    }

    #[test]
    fn hh_transcripts_split_into_prompt_and_final_turns() {
        let record = parse(json!({
            "chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: yes",
            "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: no",
        }))
        .unwrap();
        let Record::Preference(p) = record else {
            panic!("expected a preference")
        };
        assert_eq!(
            p.prompt.messages,
            vec![
                Message::new(USER, "hi"),
                Message::new(ASSISTANT, "hello"),
                Message::new(USER, "joke?")
            ]
        );
        assert_eq!(p.chosen, vec![Message::new(ASSISTANT, "yes")]);
        assert_eq!(p.rejected, vec![Message::new(ASSISTANT, "no")]);
    }

    #[test]
    fn hh_edge_cases_are_rejected_with_the_side_to_blame() {
        let e = parse(json!({"chosen": "\n\nHuman: a\n\nAssistant: ", "rejected": "\n\nHuman: a\n\nAssistant: b"}))
            .unwrap_err();
        assert_eq!(
            e,
            Fail::at(
                "chosen",
                "empty chosen: the final Assistant turn has no text"
            )
        );
        let e = parse(json!({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}))
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("rejected"));
        assert!(
            e.reason.contains("first difference at turn 1"),
            "{}",
            e.reason
        );
        let e = parse(json!({"chosen": "\n\nHuman: a\n\nAssistant: x\n\nHuman: more", "rejected": "\n\nHuman: a\n\nAssistant: y"}))
            .unwrap_err();
        assert!(
            e.reason.contains("does not end with an Assistant turn"),
            "{}",
            e.reason
        );
        let e = parse(json!({"chosen": "\n\nHuman: a\n\nAssistant: x\n\nAssistant: z", "rejected": "\n\nHuman: a\n\nAssistant: y"}))
            .unwrap_err();
        assert!(
            e.reason.contains("turn 3 is a second `Assistant` turn"),
            "{}",
            e.reason
        );
        let e = parse(json!({"chosen": "preamble\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: a\n\nAssistant: y"}))
            .unwrap_err();
        assert!(e.reason.contains("text before the first"), "{}", e.reason);
    }

    #[test]
    fn implicit_prompt_takes_the_shared_turns() {
        let row = json!({
            "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
            "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}],
        });
        let Record::Preference(p) = preference(row.as_object().unwrap()).unwrap() else {
            panic!("expected a preference")
        };
        assert_eq!(p.prompt.messages, vec![Message::new(USER, "q")]);
        assert_eq!(p.chosen, vec![Message::new(ASSISTANT, "good")]);
        assert_eq!(p.rejected, vec![Message::new(ASSISTANT, "bad")]);
    }
}
