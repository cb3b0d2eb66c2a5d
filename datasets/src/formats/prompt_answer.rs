//! Prompt-only rows with an optional verifiable answer (GSM8K `{"question", "answer"}` where
//! the answer ends in `#### N`, or `{"prompt", "answer"?}`), for GRPO/PPO.

use super::fields::{extra_fields, non_empty, optional, wrong_type, Fail, Parsed};
use super::turns::prompt_from_value;
use crate::records::{Conversation, Message, PromptTask, Record, USER};
use serde_json::{Map, Value};

/// GSM8K's final-answer marker: the solution text ends with `#### 42`.
pub const ANSWER_MARKER: &str = "####";

/// The verifiable answer in a reference solution: the text after the last `####` with commas
/// removed (`#### 1,000` -> `1000`, as GSM8K graders compare), or the whole text trimmed when
/// there is no marker.
pub(crate) fn answer_text(text: &str, path: &str) -> Parsed<String> {
    non_empty(text, path)?;
    match text.rfind(ANSWER_MARKER) {
        Some(at) => {
            let number = text[at + ANSWER_MARKER.len()..].trim().replace(',', "");
            if number.is_empty() {
                Err(Fail::at(path, "nothing after the `####` answer marker"))
            } else {
                Ok(number)
            }
        }
        None => Ok(text.trim().to_string()),
    }
}

/// An answer given directly (Bedrock RFT `ground_truth`): strings are taken as they are,
/// numbers and booleans as written, and structured values as compact JSON so that a custom
/// reward function can still parse them.
pub(crate) fn scalar_answer(value: &Value, path: &str) -> Parsed<String> {
    match value {
        Value::String(text) => {
            non_empty(text, path)?;
            Ok(text.trim().to_string())
        }
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        other => Ok(other.to_string()),
    }
}

/// `{"question" | "prompt", "answer"?}`. `question` wins when both are present. The full
/// `answer` is kept in `meta.reference_answer`; other fields are kept in `meta` as well.
pub(crate) fn prompt_answer(obj: &Map<String, Value>) -> Parsed<Record> {
    let prompt = if let Some(question) = optional(obj, "question") {
        let text = question
            .as_str()
            .ok_or_else(|| wrong_type("question", "a string", question))?;
        non_empty(text, "question")?;
        Conversation {
            system: None,
            messages: vec![Message::new(USER, text)],
            tools: Vec::new(),
        }
    } else if let Some(prompt) = optional(obj, "prompt") {
        prompt_from_value(prompt, "prompt")?
    } else {
        return Err(Fail::at(
            "question",
            "missing required field (a prompt row needs `question` or `prompt`)",
        ));
    };
    let reference = optional(obj, "answer");
    let answer = match reference {
        None => None,
        Some(Value::String(text)) => Some(answer_text(text, "answer")?),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(other) => return Err(wrong_type("answer", "a string or a number", other)),
    };
    let mut meta = Map::new();
    if let Some(reference) = reference {
        meta.insert("reference_answer".into(), reference.clone());
    }
    meta.extend(extra_fields(obj, &["question", "prompt", "answer"]));
    Ok(Record::PromptTask(PromptTask {
        prompt,
        answer,
        meta,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_answer_is_the_number_after_the_last_marker_without_commas() {
        assert_eq!(answer_text("a\n#### 1,000", "answer").unwrap(), "1000");
        assert_eq!(answer_text("#### -3.5 ", "answer").unwrap(), "-3.5");
        assert_eq!(answer_text(" 42 ", "answer").unwrap(), "42");
        let e = answer_text("so ####  ", "answer").unwrap_err();
        assert_eq!(e.reason, "nothing after the `####` answer marker");
    }

    #[test]
    fn structured_ground_truth_is_kept_as_json() {
        let v = json!({"x": 1});
        assert_eq!(scalar_answer(&v, "g").unwrap(), r#"{"x":1}"#);
        assert_eq!(scalar_answer(&json!(12), "g").unwrap(), "12");
    }
}
