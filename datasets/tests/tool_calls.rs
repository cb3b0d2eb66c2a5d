//! Structured tool calls in the three shapes (OpenAI, Bedrock Converse, ShareGPT): read into
//! one canonical conversation, rendered through the tools-aware ChatML template exactly as
//! transformers renders them, masked on the assistant's turns only, converted between the
//! shapes without loss, and malformed rows rejected with field and reason. The expected
//! renderings, ids and masks come from scripts/parity/tool_chat_templates.py.

use datasets::convert::{convert_record, Target};
use datasets::formats::{parse_row, Format};
use datasets::read::read_file;
use datasets::records::{Conversation, Origin, Record, ASSISTANT, TOOL};
use datasets::tokenize::{MaskPolicy, Templater, Truncation};
use models::{ChatTemplate, TextTokenizer};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fixture(name: &str) -> PathBuf {
    root().join("datasets/tests/fixtures/tool_calls").join(name)
}

const SHAPES: [(&str, Format); 3] = [
    ("openai", Format::OpenAiMessages),
    ("bedrock", Format::BedrockConversation),
    ("sharegpt", Format::ShareGpt),
];

fn conversations(shape: &str, format: Format) -> Vec<Conversation> {
    let out = read_file(&fixture(&format!("{shape}.jsonl")), None).unwrap();
    assert_eq!(out.format, format, "{shape}");
    assert!(out.rejects.is_empty(), "{shape}: {:?}", out.rejects);
    out.rows
        .into_iter()
        .map(|row| match row.record {
            Record::Conversation(c) => c,
            other => panic!("{shape}: read as {}", other.kind()),
        })
        .collect()
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).unwrap()).unwrap()
}

fn tokenizer() -> TextTokenizer {
    TextTokenizer::from_dir(&root().join("assets/tokenizers/phi3_vision")).unwrap()
}

#[test]
fn every_shape_renders_and_masks_as_transformers_does() {
    let tok = tokenizer();
    let templater = Templater {
        tokenizer: &tok,
        template: ChatTemplate::named("chatml").unwrap(),
        tokens: tok.template_tokens(),
        mask: MaskPolicy::Assistant,
        max_seq_len: 4096,
        truncation: Truncation::Drop,
    };
    let want = expected();
    for (shape, format) in SHAPES {
        let convs = conversations(shape, format);
        let rows = want["rows"][shape].as_array().unwrap();
        assert_eq!(convs.len(), 5, "{shape}");
        assert_eq!(rows.len(), convs.len(), "{shape}");
        for (i, (conv, row)) in convs.iter().zip(rows).enumerate() {
            let messages = conv.to_messages();
            let text = templater
                .template
                .render_with_tools(&messages, &conv.tools, false, &templater.tokens)
                .unwrap();
            assert_eq!(text, row["text"].as_str().unwrap(), "{shape} row {i}");
            let last = messages.iter().rposition(|m| m.role == ASSISTANT).unwrap();
            let prompt = templater
                .template
                .render_with_tools(&messages[..last], &conv.tools, true, &templater.tokens)
                .unwrap();
            assert_eq!(
                prompt,
                row["prompt_text"].as_str().unwrap(),
                "{shape} row {i}"
            );

            let (seq, cut) = templater.conversation(conv).unwrap();
            assert!(!cut);
            let ids: Vec<u32> = serde_json::from_value(row["ids"].clone()).unwrap();
            let trained: Vec<bool> = row["trained"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_u64() == Some(1))
                .collect();
            assert_eq!(seq.ids, ids, "{shape} row {i}");
            assert_eq!(seq.trained, trained, "{shape} row {i}: mask");
            // The tool results are context, never trained on.
            let decoded = tok
                .decode(&trained_ids(&seq.ids, &seq.trained), false)
                .unwrap();
            assert!(!decoded.contains("<tool_response>"), "{shape} row {i}");
        }
    }
}

fn trained_ids(ids: &[u32], trained: &[bool]) -> Vec<u32> {
    ids.iter()
        .zip(trained)
        .filter(|(_, &t)| t)
        .map(|(&id, _)| id)
        .collect()
}

#[test]
fn the_shapes_read_into_the_same_conversations() {
    let openai = conversations("openai", Format::OpenAiMessages);
    let bedrock = conversations("bedrock", Format::BedrockConversation);
    let sharegpt = conversations("sharegpt", Format::ShareGpt);
    assert_eq!(openai, bedrock);
    // ShareGPT has no call ids: calls are numbered in order, results follow their calls.
    assert_eq!(without_ids(&openai), without_ids(&sharegpt));
    assert_eq!(
        sharegpt[1].messages[1].tool_calls[1].id.as_deref(),
        Some("call_1")
    );
    let results: Vec<_> = sharegpt[1]
        .messages
        .iter()
        .filter(|m| m.role == TOOL)
        .map(|m| (m.tool_call_id.as_deref(), m.name.as_deref()))
        .collect();
    assert_eq!(
        results,
        [
            (Some("call_0"), Some("convert_currency")),
            (Some("call_1"), Some("get_weather"))
        ]
    );
    let call = &openai[3].messages[1].tool_calls[0];
    assert_eq!(call.function.name, "search_flights");
    assert_eq!(
        call.function.arguments["options"]["tolerance"],
        json!(2.5e-6)
    );
    // Bedrock's json tool result is read as compact JSON text.
    assert_eq!(
        bedrock[4].messages[2].content,
        r#"{"result":0.61,"rate_date":"2026-12-01"}"#
    );
}

fn without_ids(convs: &[Conversation]) -> Vec<Conversation> {
    let mut convs = convs.to_vec();
    for m in convs.iter_mut().flat_map(|c| c.messages.iter_mut()) {
        m.tool_call_id = None;
        m.tool_calls.iter_mut().for_each(|c| c.id = None);
    }
    convs
}

#[test]
fn conversion_between_the_shapes_loses_nothing() {
    let origin = Origin {
        file: "converted.jsonl".into(),
        line: 1,
    };
    let targets = [
        (Target::OpenAi, Format::OpenAiMessages),
        (Target::BedrockConversation, Format::BedrockConversation),
        (Target::ShareGpt, Format::ShareGpt),
    ];
    for (shape, format) in SHAPES {
        for conv in conversations(shape, format) {
            let record = Record::Conversation(conv.clone());
            for (target, target_format) in targets {
                let (row, warnings) = convert_record(&record, target).unwrap();
                let back = match parse_row(target_format, &row, &origin) {
                    Ok(Record::Conversation(c)) => c,
                    other => panic!("{shape} -> {target}: {other:?}\n{row}"),
                };
                if target == Target::ShareGpt {
                    assert_eq!(
                        without_ids(&[back]),
                        without_ids(std::slice::from_ref(&conv))
                    );
                    let had_ids = shape != "sharegpt";
                    assert_eq!(!warnings.is_empty(), had_ids, "{shape}: {warnings:?}");
                } else {
                    assert_eq!(back, conv, "{shape} -> {target}\n{row}");
                    assert!(warnings.is_empty(), "{warnings:?}");
                }
            }
            for target in [Target::Alpaca, Target::Bedrock] {
                let e = convert_record(&record, target).unwrap_err().to_string();
                assert!(e.contains("no place for tool definitions"), "{e}");
            }
        }
    }
}

fn reject(format: Format, row: Value) -> (Option<String>, String) {
    let origin = Origin {
        file: Path::new("bad.jsonl").into(),
        line: 7,
    };
    let r = parse_row(format, &row, &origin).expect_err("the row must be rejected");
    assert_eq!(r.origin, origin);
    (r.field, r.reason)
}

fn weather_tool() -> Value {
    json!([{"type": "function", "function": {"name": "get_weather", "parameters": {}}}])
}

#[test]
fn malformed_tool_calls_are_rejected_with_field_and_reason() {
    let user = json!({"role": "user", "content": "Weather in Oslo?"});
    let call = |args: Value, name: &str| {
        json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": name, "arguments": args}}]})
    };
    let answer = json!({"role": "assistant", "content": "Cold."});
    let cases = [
        (
            json!({"messages": [user, call(json!("{\"city\": Oslo}"), "get_weather")],
                   "tools": weather_tool()}),
            "messages[1].tool_calls[0].function.arguments",
            "the arguments are not valid JSON",
        ),
        (
            json!({"messages": [user, call(json!("[1, 2]"), "get_weather")],
                   "tools": weather_tool()}),
            "messages[1].tool_calls[0].function.arguments",
            "must be a JSON object of named arguments, found an array",
        ),
        (
            json!({"messages": [user, call(json!({"city": "Oslo"}), "get_time")],
                   "tools": weather_tool()}),
            "messages[1].tool_calls[0]",
            "calls tool `get_time`, which is not in the row's tools (defined: get_weather)",
        ),
        (
            json!({"messages": [user, call(json!({"city": "Oslo"}), "get_weather")]}),
            "messages[1].tool_calls[0]",
            "the row defines no tools",
        ),
        (
            json!({"messages": [user, call(json!({"city": "Oslo"}), "get_weather"),
                                {"role": "tool", "tool_call_id": "zz", "content": "-2"},
                                answer],
                   "tools": weather_tool()}),
            "messages[2].role",
            "a tool result without a call: no open call has id `zz`",
        ),
        (
            json!({"messages": [user, call(json!({"city": "Oslo"}), "get_weather"),
                                {"role": "tool", "tool_call_id": "c1", "content": "-2"},
                                {"role": "tool", "content": "-3"}, answer],
                   "tools": weather_tool()}),
            "messages[3].role",
            "a tool result without a call",
        ),
        (
            json!({"messages": [user, call(json!({"city": "Oslo"}), "get_weather"),
                                {"role": "user", "content": "hurry"}, answer],
                   "tools": weather_tool()}),
            "messages[1].tool_calls[0]",
            "the call of tool `get_weather` (id `c1`) gets no result before the next `user` turn",
        ),
    ];
    for (row, field, reason) in cases {
        let (got_field, got_reason) = reject(Format::OpenAiMessages, row.clone());
        assert_eq!(got_field.as_deref(), Some(field), "{row}");
        assert!(got_reason.contains(reason), "{got_reason} / {row}");
    }

    // ShareGPT: an observation with no call before it; a function_call that is not JSON.
    let (field, reason) = reject(
        Format::ShareGpt,
        json!({"conversations": [{"from": "human", "value": "hi"},
                                 {"from": "observation", "value": "42"},
                                 {"from": "gpt", "value": "ok"}],
               "tools": "[]"}),
    );
    assert_eq!(field.as_deref(), Some("conversations[1].from"));
    assert!(
        reason.contains("expected role `assistant`, found `observation`"),
        "{reason}"
    );
    let (field, reason) = reject(
        Format::ShareGpt,
        json!({"conversations": [{"from": "human", "value": "hi"},
                                 {"from": "function_call", "value": "get_weather(Oslo)"}],
               "tools": "[{\"name\": \"get_weather\"}]"}),
    );
    assert_eq!(field.as_deref(), Some("conversations[1].value"));
    assert!(
        reason.starts_with("a function_call must be JSON"),
        "{reason}"
    );
    let (field, reason) = reject(
        Format::ShareGpt,
        json!({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a"}],
               "tools": "not json"}),
    );
    assert_eq!(field.as_deref(), Some("tools"));
    assert!(reason.contains("not a JSON list of tools"), "{reason}");

    // Bedrock: a result for a toolUseId nobody used; toolUse in a user turn.
    let spec = json!({"tools": [{"toolSpec": {"name": "get_weather",
                                              "inputSchema": {"json": {"type": "object"}}}}]});
    let (field, reason) = reject(
        Format::BedrockConversation,
        json!({"toolConfig": spec, "messages": [
            {"role": "user", "content": [{"text": "Oslo?"}]},
            {"role": "assistant", "content": [{"toolUse": {"toolUseId": "t1", "name": "get_weather", "input": {"city": "Oslo"}}}]},
            {"role": "user", "content": [{"toolResult": {"toolUseId": "t2", "content": [{"text": "-2"}]}}]},
            {"role": "assistant", "content": [{"text": "Cold."}]}]}),
    );
    assert_eq!(field.as_deref(), Some("messages[2].content[0].toolResult"));
    assert!(reason.contains("no open call has id `t2`"), "{reason}");
    let (field, reason) = reject(
        Format::BedrockConversation,
        json!({"toolConfig": spec, "messages": [
            {"role": "user", "content": [{"toolUse": {"toolUseId": "t1", "name": "get_weather", "input": {}}}]},
            {"role": "assistant", "content": [{"text": "Cold."}]}]}),
    );
    assert_eq!(field.as_deref(), Some("messages[0].content[0]"));
    assert!(reason.contains("cannot hold toolUse"), "{reason}");
}

#[test]
fn a_template_that_ignores_tools_is_refused_rather_than_trained_on() {
    let tok = tokenizer();
    // The bundled tokenizer's own (Phi-3) template prints only `content`.
    let templater = Templater {
        tokenizer: &tok,
        template: tok.template(None).unwrap(),
        tokens: tok.template_tokens(),
        mask: MaskPolicy::Assistant,
        max_seq_len: 4096,
        truncation: Truncation::Drop,
    };
    let conv = &conversations("openai", Format::OpenAiMessages)[0];
    let e = templater.conversation(conv).unwrap_err().to_string();
    assert!(
        e.contains("does not render tool use (`get_weather` is missing"),
        "{e}"
    );
    assert!(e.contains("template = \"chatml\""), "{e}");
}
