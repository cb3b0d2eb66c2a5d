//! Format detection from the keys of the first rows.

use super::Format;
use serde_json::{Map, Value};
use std::collections::BTreeSet;

/// How many rows detection looks at.
pub const DETECT_ROWS: usize = 20;

fn has(obj: &Map<String, Value>, key: &str) -> bool {
    obj.get(key).is_some_and(|v| !v.is_null())
}

/// Bedrock content is a list of `{"text": ..}` parts without OpenAI's `type` tag.
fn has_bedrock_parts(messages: Option<&Value>) -> bool {
    let first_content = messages
        .and_then(Value::as_array)
        .and_then(|m| m.first())
        .and_then(|m| m.get("content"))
        .and_then(Value::as_array)
        .and_then(|parts| parts.first());
    first_content.is_some_and(|part| part.get("text").is_some() && part.get("type").is_none())
}

/// The format one row looks like, from its keys (and, where keys are shared, the shape of
/// their values), or `None` when it looks like none.
///
/// Rows with `messages` are Bedrock RFT when they carry `reference_answer`/`ground_truth`,
/// Bedrock conversation when they carry `schemaVersion`, `toolConfig` or a top-level `system` or use
/// `{"text"}` parts, and OpenAI otherwise. Rows with `chosen`/`rejected` are hh-rlhf when
/// there is no `prompt` and `chosen` is a string. A lone `prompt` or `question` is a
/// prompt-only task; `prompt` with `completion` is Bedrock prompt/completion, or an unpaired
/// (KTO) row when it has a `label`.
pub fn classify_row(value: &Value) -> Option<Format> {
    let obj = value.as_object()?;
    let format = if has(obj, "conversations") {
        Format::ShareGpt
    } else if has(obj, "messages") {
        if has(obj, "reference_answer") || has(obj, "ground_truth") {
            Format::BedrockRft
        } else if has(obj, "schemaVersion")
            || has(obj, "system")
            || has(obj, "toolConfig")
            || has_bedrock_parts(obj.get("messages"))
        {
            Format::BedrockConversation
        } else {
            Format::OpenAiMessages
        }
    } else if has(obj, "chosen") || has(obj, "rejected") {
        let chosen_is_text = obj
            .get("chosen")
            .or_else(|| obj.get("rejected"))
            .is_some_and(Value::is_string);
        if !has(obj, "prompt") && chosen_is_text {
            Format::HhRlhf
        } else {
            Format::Preference
        }
    } else if has(obj, "instruction") {
        Format::Alpaca
    } else if has(obj, "completion") && has(obj, "label") {
        Format::Unpaired
    } else if has(obj, "completion") {
        Format::BedrockPromptCompletion
    } else if has(obj, "prompt") || has(obj, "question") {
        Format::PromptAnswer
    } else {
        return None;
    };
    Some(format)
}

fn known_formats() -> String {
    Format::all()
        .iter()
        .map(|f| format!("{} {}", f.name(), f.shape()))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Decides the format from the first rows (up to [`DETECT_ROWS`]): the format most rows look
/// like. Fails, listing the keys seen and the known formats, when no row looks like any
/// format or two formats tie.
pub fn detect(first_rows: &[Value]) -> anyhow::Result<Format> {
    let sample = &first_rows[..first_rows.len().min(DETECT_ROWS)];
    let keys: Vec<&str> = sample
        .iter()
        .filter_map(Value::as_object)
        .flat_map(|obj| obj.keys().map(String::as_str))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut votes: Vec<(Format, usize)> = Format::all().iter().map(|&f| (f, 0)).collect();
    for format in sample.iter().filter_map(classify_row) {
        if let Some(vote) = votes.iter_mut().find(|(f, _)| *f == format) {
            vote.1 += 1;
        }
    }
    votes.retain(|(_, n)| *n > 0);
    // Stable: equal counts keep the order of `Format::all`, and a tie is refused below.
    votes.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
    match votes.as_slice() {
        [] => anyhow::bail!(
            "keys seen: {keys:?}{}; known formats: {}",
            if keys.is_empty() && !sample.is_empty() {
                " (no row is a JSON object)"
            } else {
                ""
            },
            known_formats()
        ),
        [(a, n), (b, m), ..] if n == m => anyhow::bail!(
            "the first rows look like two formats equally ({a}: {n} rows, {b}: {m} rows); \
             name the format explicitly. keys seen: {keys:?}; known formats: {}",
            known_formats()
        ),
        [(best, _), ..] => Ok(*best),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn messages_rows_are_told_apart() {
        let rft = json!({"messages": [{"role": "user", "content": "q"}], "ground_truth": "1"});
        assert_eq!(classify_row(&rft), Some(Format::BedrockRft));
        let nova = json!({"messages": [{"role": "user", "content": [{"text": "q"}]}]});
        assert_eq!(classify_row(&nova), Some(Format::BedrockConversation));
        let claude = json!({"system": "s", "messages": [{"role": "user", "content": "q"}]});
        assert_eq!(classify_row(&claude), Some(Format::BedrockConversation));
        let openai =
            json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]}]});
        assert_eq!(classify_row(&openai), Some(Format::OpenAiMessages));
    }

    #[test]
    fn preference_rows_are_told_apart() {
        let hh = json!({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "x"});
        assert_eq!(classify_row(&hh), Some(Format::HhRlhf));
        let explicit = json!({"prompt": "p", "chosen": "a", "rejected": "b"});
        assert_eq!(classify_row(&explicit), Some(Format::Preference));
        let implicit = json!({"chosen": [], "rejected": []});
        assert_eq!(classify_row(&implicit), Some(Format::Preference));
        assert_eq!(
            classify_row(&json!({"prompt": "p"})),
            Some(Format::PromptAnswer)
        );
        assert_eq!(
            classify_row(&json!({"prompt": "p", "completion": "c"})),
            Some(Format::BedrockPromptCompletion)
        );
    }

    #[test]
    fn majority_wins_and_ties_are_refused() {
        let alpaca = json!({"instruction": "i", "output": "o"});
        let sharegpt = json!({"conversations": []});
        let rows = [alpaca.clone(), alpaca.clone(), sharegpt.clone()];
        assert_eq!(detect(&rows).unwrap(), Format::Alpaca);
        let e = detect(&[alpaca, sharegpt]).unwrap_err().to_string();
        assert!(e.contains("two formats equally"), "{e}");
        let e = detect(&[json!({"b": 1, "a": 2})]).unwrap_err().to_string();
        assert!(
            e.starts_with(r#"keys seen: ["a", "b"]; known formats: bedrock {prompt, completion}"#),
            "{e}"
        );
    }
}
