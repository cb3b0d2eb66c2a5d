//! Dataset formats: naming, detection from the keys of the first rows, and the mapping of
//! one JSON row to a canonical [`Record`] (or a [`Reject`] naming the field and the reason).
//!
//! Joining rules, shared by all formats:
//! - several text parts in one message (`[{"text": a}, {"text": b}]`) are joined with "\n"
//!   ([`turns::PART_SEPARATOR`]); non-text parts (images, audio) reject the row;
//! - tool definitions, calls and results are read as [`tools`] describes; a call of an
//!   undefined tool, arguments that are not a JSON object, or a result without a call reject
//!   the row;
//! - Alpaca's `input` follows `instruction` after a blank line ("\n\n",
//!   [`alpaca::INPUT_SEPARATOR`]);
//! - text is otherwise kept exactly as written (no trimming), but empty or whitespace-only
//!   content rejects the row;
//! - a null field counts as absent.

pub mod alpaca;
pub mod bedrock;
mod chat;
mod detect;
pub(crate) mod fields;
pub mod parquet_rows;
mod preference;
pub mod prompt_answer;
pub mod tools;
pub mod turns;

pub use detect::{classify_row, detect, DETECT_ROWS};

use crate::records::{Origin, Record, Reject};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Input formats. Serialized (recipes, caches) with the same names as [`Format::name`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Format {
    /// `{"prompt", "completion"}`
    #[serde(rename = "bedrock")]
    BedrockPromptCompletion,
    /// `{"schemaVersion"?, "system"?, "messages": [{"role", "content": [{"text"}] | ".."}]}`
    #[serde(rename = "bedrock-conversation")]
    BedrockConversation,
    /// `{"messages": [{"role": "user", "content"}], "reference_answer"?, "ground_truth"?}`
    #[serde(rename = "bedrock-rft")]
    BedrockRft,
    /// `{"instruction", "input"?, "output", "system"?, "history"?}`
    #[serde(rename = "alpaca")]
    Alpaca,
    /// `{"conversations": [{"from", "value"}]}`
    #[serde(rename = "sharegpt")]
    ShareGpt,
    /// `{"messages": [{"role", "content"}]}`
    #[serde(rename = "openai")]
    OpenAiMessages,
    /// `{"prompt"?, "chosen", "rejected", "margin"?}`
    #[serde(rename = "preference")]
    Preference,
    /// `{"chosen": "\n\nHuman: ..\n\nAssistant: ..", "rejected": ..}`
    #[serde(rename = "hh-rlhf")]
    HhRlhf,
    /// `{"prompt", "completion", "label": bool}` (KTO)
    #[serde(rename = "unpaired")]
    Unpaired,
    /// `{"question" | "prompt", "answer"?}`
    #[serde(rename = "prompt-answer")]
    PromptAnswer,
}

const ALL: [Format; 10] = [
    Format::BedrockPromptCompletion,
    Format::BedrockConversation,
    Format::BedrockRft,
    Format::Alpaca,
    Format::ShareGpt,
    Format::OpenAiMessages,
    Format::Preference,
    Format::HhRlhf,
    Format::Unpaired,
    Format::PromptAnswer,
];

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::BedrockPromptCompletion => "bedrock",
            Format::BedrockConversation => "bedrock-conversation",
            Format::BedrockRft => "bedrock-rft",
            Format::Alpaca => "alpaca",
            Format::ShareGpt => "sharegpt",
            Format::OpenAiMessages => "openai",
            Format::Preference => "preference",
            Format::HhRlhf => "hh-rlhf",
            Format::Unpaired => "unpaired",
            Format::PromptAnswer => "prompt-answer",
        }
    }

    /// The row shape, for error messages and `--help` texts.
    pub fn shape(self) -> &'static str {
        match self {
            Format::BedrockPromptCompletion => "{prompt, completion}",
            Format::BedrockConversation => {
                "{schemaVersion?, system?, messages: [{role, content: [{text}]}]}"
            }
            Format::BedrockRft => "{messages, reference_answer?, ground_truth?}",
            Format::Alpaca => "{instruction, input?, output, system?, history?}",
            Format::ShareGpt => "{conversations: [{from, value}]}",
            Format::OpenAiMessages => "{messages: [{role, content}]}",
            Format::Preference => "{prompt?, chosen, rejected, margin?}",
            Format::HhRlhf => "{chosen, rejected} as Human/Assistant transcripts",
            Format::Unpaired => "{prompt, completion, label: true | false}",
            Format::PromptAnswer => "{question | prompt, answer?}",
        }
    }

    /// Parses a format name (case-insensitive; `_` may stand for `-`).
    pub fn parse(s: &str) -> anyhow::Result<Format> {
        let wanted = s.trim().to_ascii_lowercase().replace('_', "-");
        ALL.iter()
            .copied()
            .find(|f| f.name() == wanted)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "unknown format `{s}`; known formats: {}",
                    Format::names().join(", ")
                )
            })
    }

    pub fn all() -> &'static [Format] {
        &ALL
    }

    fn names() -> Vec<&'static str> {
        ALL.iter().map(|f| f.name()).collect()
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Format {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Format> {
        Format::parse(s)
    }
}

/// How much of a bad row is kept in [`Reject::raw`]: enough to find and recognise it.
pub const RAW_CHARS: usize = 500;

/// The first [`RAW_CHARS`] characters of `text`, with "…" when cut.
pub fn truncate_raw(text: &str) -> String {
    match text.char_indices().nth(RAW_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

/// Maps one JSON row to a canonical record, or a reject naming the field and the reason.
/// `raw` of the reject is the row as compact JSON (readers of line-based files replace it
/// with the original line).
pub fn parse_row(format: Format, value: &Value, origin: &Origin) -> Result<Record, Reject> {
    let parsed = fields::row_object(value).and_then(|obj| match format {
        Format::BedrockPromptCompletion => bedrock::prompt_completion(obj),
        Format::BedrockConversation => bedrock::conversation(obj),
        Format::BedrockRft => bedrock::rft(obj),
        Format::Alpaca => alpaca::alpaca(obj),
        Format::ShareGpt => chat::sharegpt(obj),
        Format::OpenAiMessages => chat::openai(obj),
        Format::Preference => preference::preference(obj),
        Format::HhRlhf => preference::hh_rlhf(obj),
        Format::Unpaired => preference::unpaired(obj),
        Format::PromptAnswer => prompt_answer::prompt_answer(obj),
    });
    let parsed = parsed.and_then(|record| match &record {
        Record::Preference(p) if p.chosen == p.rejected => Err(fields::Fail::at(
            "rejected",
            "is the same as `chosen`: the pair prefers nothing, so it teaches nothing",
        )),
        _ => Ok(record),
    });
    parsed.map_err(|fail| Reject {
        origin: origin.clone(),
        field: fail.field,
        reason: fail.reason,
        raw: Some(truncate_raw(&value.to_string())),
    })
}

/// Something about a row worth telling the user although the row is fine, such as a Bedrock
/// `schemaVersion` other than the documented one. Readers report each distinct note once per
/// file, with a count.
pub fn row_note(format: Format, value: &Value) -> Option<String> {
    match format {
        Format::BedrockConversation => bedrock::schema_note(value),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_parse_and_serde() {
        for &format in Format::all() {
            assert_eq!(Format::parse(format.name()).unwrap(), format);
            let json = serde_json::to_string(&format).unwrap();
            assert_eq!(json, format!("\"{}\"", format.name()));
            assert_eq!(serde_json::from_str::<Format>(&json).unwrap(), format);
        }
        assert_eq!(Format::parse("HH_RLHF").unwrap(), Format::HhRlhf);
        let e = Format::parse("csv").unwrap_err().to_string();
        assert!(e.contains("unknown format `csv`"), "{e}");
        assert!(
            e.contains("bedrock, bedrock-conversation, bedrock-rft, alpaca"),
            "{e}"
        );
    }

    #[test]
    fn raw_text_is_cut_on_a_char_boundary() {
        let long = "é".repeat(RAW_CHARS + 10);
        let cut = truncate_raw(&long);
        assert_eq!(cut.chars().count(), RAW_CHARS + 1);
        assert!(cut.ends_with('…'));
        assert_eq!(truncate_raw("short"), "short");
    }
}
