//! Format reading, validation and conversion against the real public datasets in
//! `shared/data` and the small fixtures in `tests/fixtures`.

use arrow::array::{ArrayRef, ListArray, RecordBatch, StringArray, StructArray};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Fields, Schema};
use datasets::convert::{convert_record, Target};
use datasets::formats::{detect, parse_row, Format};
use datasets::read::{read_file, ReadOutput};
use datasets::records::{Message, ASSISTANT, USER};
use datasets::{Conversation, Origin, Preference, PromptTask, Record, Reject, Unpaired};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The shared data directory. CI always has it; a missing directory must fail the tests
/// rather than let them pass without having read anything.
fn shared_data() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data");
    assert!(
        dir.is_dir(),
        "shared test data not found at {}: these tests read the real datasets there",
        dir.display()
    );
    dir
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn read(path: &Path, format: Option<Format>) -> ReadOutput {
    read_file(path, format).unwrap_or_else(|e| panic!("reading {}: {e:#}", path.display()))
}

fn records(out: &ReadOutput) -> Vec<Record> {
    out.rows.iter().map(|r| r.record.clone()).collect()
}

fn lines(out: &ReadOutput) -> Vec<usize> {
    out.rows.iter().map(|r| r.origin.line).collect()
}

fn conversation(system: Option<&str>, turns: &[&str]) -> Record {
    Record::Conversation(Conversation {
        system: system.map(str::to_string),
        messages: turns
            .iter()
            .enumerate()
            .map(|(i, t)| Message::new(if i % 2 == 0 { USER } else { ASSISTANT }, t))
            .collect(),
        tools: Vec::new(),
    })
}

fn reject_summary(rejects: &[Reject]) -> Vec<(usize, Option<&str>, &str)> {
    rejects
        .iter()
        .map(|r| (r.origin.line, r.field.as_deref(), r.reason.as_str()))
        .collect()
}

fn write_jsonl(path: &Path, rows: &[Value]) {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).expect("write temp file");
}

fn gzip(bytes: &[u8], path: &Path) {
    let file = std::fs::File::create(path).expect("create gzip file");
    let mut encoder = flate2::write::GzEncoder::new(file, flate2::Compression::default());
    encoder.write_all(bytes).expect("gzip");
    encoder.finish().expect("finish gzip");
}

fn write_parquet(path: &Path, batch: &RecordBatch) {
    let file = std::fs::File::create(path).expect("create parquet file");
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).expect("parquet writer");
    writer.write(batch).expect("write batch");
    writer.close().expect("close parquet");
}

// ---------------------------------------------------------------------------------------
// Real data
// ---------------------------------------------------------------------------------------

#[test]
fn every_real_dataset_is_detected_with_its_row_count() {
    let data = shared_data();
    let cases = [
        ("gsm8k/test.jsonl", Format::PromptAnswer, 1319, 0),
        (
            "hh_rlhf/harmless_base_test_first1000.jsonl",
            Format::HhRlhf,
            995,
            5,
        ),
        (
            "sharegpt/fastchat_dummy_conversation.json",
            Format::ShareGpt,
            500,
            0,
        ),
        (
            "alpaca/llamafactory_alpaca_en_demo.json",
            Format::Alpaca,
            999,
            0,
        ),
        (
            "alpaca/stanford_alpaca_seed_tasks_alpaca_format.jsonl",
            Format::Alpaca,
            175,
            0,
        ),
        (
            "bedrock/uber10k_prompt_completion.jsonl",
            Format::BedrockPromptCompletion,
            200,
            0,
        ),
        (
            "bedrock/nova_tooluse_conversation_test.jsonl",
            Format::BedrockConversation,
            120,
            0,
        ),
        ("bedrock/rft_gsm8k_train.jsonl", Format::BedrockRft, 300, 0),
        (
            "bedrock/rft_gsm8k_test_validation.jsonl",
            Format::BedrockRft,
            100,
            0,
        ),
    ];
    for (file, format, rows, rejects) in cases {
        let out = read(&data.join(file), None);
        assert_eq!(out.format, format, "{file}");
        assert_eq!(out.rows.len(), rows, "{file}: rejects {:?}", out.rejects);
        assert_eq!(out.rejects.len(), rejects, "{file}: {:?}", out.rejects);
        assert_eq!(out.rows_read, rows + rejects, "{file}");
        if format != Format::BedrockConversation {
            assert!(out.warnings.is_empty(), "{file}: {:?}", out.warnings);
        }
    }
}

#[test]
fn gsm8k_answers_are_the_final_numbers_without_commas() {
    let out = read(&shared_data().join("gsm8k/test.jsonl"), None);
    let Record::PromptTask(first) = &out.rows[0].record else {
        panic!("expected a prompt task")
    };
    assert_eq!(first.answer.as_deref(), Some("18"));
    assert_eq!(first.prompt.system, None);
    assert_eq!(first.prompt.messages.len(), 1);
    assert!(first.prompt.messages[0]
        .content
        .starts_with("Janet\u{2019}s ducks"));
    let reference = first.meta["reference_answer"].as_str().unwrap_or_default();
    assert!(reference.ends_with("#### 18"), "{reference}");

    let Record::PromptTask(with_comma) = &out.rows[146].record else {
        panic!("expected a prompt task")
    };
    assert_eq!(out.rows[146].origin.line, 147);
    assert_eq!(with_comma.answer.as_deref(), Some("2125"));
}

#[test]
fn hh_rlhf_rejects_are_the_empty_and_non_alternating_transcripts() {
    let path = shared_data().join("hh_rlhf/harmless_base_test_first1000.jsonl");
    let out = read(&path, None);
    assert_eq!(
        reject_summary(&out.rejects),
        vec![
            (
                87,
                Some("chosen"),
                "empty chosen: the final Assistant turn has no text"
            ),
            (
                517,
                Some("chosen"),
                "empty chosen: the final Assistant turn has no text"
            ),
            (
                668,
                Some("chosen"),
                "turn 5 is a second `Assistant` turn in a row; turns must alternate \
                 Human/Assistant"
            ),
            (
                764,
                Some("chosen"),
                "turn 3 is a second `Assistant` turn in a row; turns must alternate \
                 Human/Assistant"
            ),
            (
                926,
                Some("chosen"),
                "empty chosen: the final Assistant turn has no text"
            ),
        ]
    );
    for reject in &out.rejects {
        let raw = reject.raw.as_deref().unwrap_or_default();
        assert!(raw.starts_with(r#"{"chosen": ""#), "{raw}");
        assert!(raw.chars().count() <= 501, "raw is truncated");
    }
    let Record::Preference(first) = &out.rows[0].record else {
        panic!("expected a preference")
    };
    assert_eq!(first.prompt.messages.len(), 5);
    assert_eq!(
        first.prompt.messages[0],
        Message::new(USER, "what are some pranks with a pen i can do?")
    );
    assert_eq!(first.prompt.messages[2], Message::new(USER, "yep"));
    assert_eq!(
        first.prompt.messages[4],
        Message::new(
            USER,
            "okay some of these do not have anything to do with pens"
        )
    );
    assert_eq!(first.chosen.len(), 1);
    assert_eq!(first.chosen[0].role, ASSISTANT);
    assert!(first.chosen[0]
        .content
        .starts_with("No, sorry!  All of these involve a pen"));
    assert_ne!(first.chosen, first.rejected);
}

#[test]
fn sharegpt_and_alpaca_real_rows_map_to_conversations() {
    let data = shared_data();
    let sharegpt = read(
        &data.join("sharegpt/fastchat_dummy_conversation.json"),
        None,
    );
    assert_eq!(
        sharegpt.rows[0].origin.line, 1,
        "JSON arrays count elements from 1"
    );
    assert_eq!(sharegpt.rows[499].origin.line, 500);
    assert_eq!(
        sharegpt.rows[0].record,
        conversation(
            None,
            &[
                "Who are you?",
                "I am Vicuna, a language model trained by researchers from Large Model \
                 Systems Organization (LMSYS).",
                "Have a nice day!",
                "You too!",
            ]
        )
    );

    let alpaca = read(&data.join("alpaca/llamafactory_alpaca_en_demo.json"), None);
    let Record::Conversation(with_input) = &alpaca.rows[5].record else {
        panic!("expected a conversation")
    };
    assert_eq!(
        with_input.messages[0].content,
        "Given the parameters of a triangle, find out its perimeter.\n\nSide 1 = 4\nSide 2 = \
         6\nSide 3 = 8"
    );
}

#[test]
fn bedrock_real_files_map_as_documented() {
    let data = shared_data();
    let uber = read(&data.join("bedrock/uber10k_prompt_completion.jsonl"), None);
    let Record::Conversation(first) = &uber.rows[0].record else {
        panic!("expected a conversation")
    };
    assert_eq!(first.system, None);
    assert_eq!(first.messages.len(), 2);
    assert!(first.messages[0]
        .content
        .starts_with("You are a financial analyst"));

    let nova_path = data.join("bedrock/nova_tooluse_conversation_test.jsonl");
    let nova = read(&nova_path, None);
    assert_eq!(
        nova.warnings,
        vec![format!(
            "{}: 120 of 120 rows: schemaVersion `tooluse-dataset-2024` is not \
             `bedrock-conversation-2024`; these rows were read with the bedrock-conversation \
             rules",
            nova_path.display()
        )]
    );
    let Record::Conversation(tool) = &nova.rows[0].record else {
        panic!("expected a conversation")
    };
    assert_eq!(
        tool.system.as_deref(),
        Some("You are a bot that can handle different requests with tools.")
    );
    assert_eq!(tool.messages.len(), 2);

    // No newline at the end of the file: the last row still counts.
    let rft = read(&data.join("bedrock/rft_gsm8k_train.jsonl"), None);
    assert_eq!(rft.rows.last().map(|r| r.origin.line), Some(300));
    let Record::PromptTask(task) = &rft.rows[0].record else {
        panic!("expected a prompt task")
    };
    assert_eq!(task.answer.as_deref(), Some("72"));
    assert!(task.prompt.messages[0]
        .content
        .starts_with("Natalia sold clips"));
    let reference = task.meta["reference_answer"].as_str().unwrap_or_default();
    assert!(reference.ends_with("#### 72"), "{reference}");
}

#[test]
fn evol_instruct_files_are_not_a_training_format_and_say_why() {
    let data = shared_data();
    for (file, keys) in [
        (
            "evol_instruct/wizardlm_evol_instruct_prompts.json",
            r#"keys seen: ["in_breadth", "in_depth", "notes", "source"]"#,
        ),
        (
            "evol_instruct/wizardlm_evol_instruct_testset.jsonl",
            r#"keys seen: ["Difficulty", "Instruction", "Skill", "idx"]"#,
        ),
        (
            "evol_instruct/h2o_wizardlm_evolved_samples.jsonl",
            r#"keys seen: ["input", "output", "source_file"]"#,
        ),
    ] {
        let path = data.join(file);
        let e = format!("{:#}", read_file(&path, None).expect_err(file));
        let expected_start = format!(
            "cannot detect the format of {}: {keys}; known formats: ",
            path.display()
        );
        assert!(e.starts_with(&expected_start), "{e}");
        for format in Format::all() {
            assert!(e.contains(format.name()), "{e} lacks {format}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Containers: gzip and Parquet read like the JSONL / JSON they were made from
// ---------------------------------------------------------------------------------------

#[test]
fn gzipped_files_read_like_the_originals() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (source, name) in [
        (fixture("sharegpt_mixed.jsonl"), "sharegpt.jsonl.gz"),
        (
            shared_data().join("alpaca/llamafactory_alpaca_en_demo.json"),
            "alpaca.json.gz",
        ),
    ] {
        let plain = read(&source, None);
        let gz = dir.path().join(name);
        gzip(&std::fs::read(&source).expect("read source"), &gz);
        let zipped = read(&gz, None);
        assert_eq!(zipped.format, plain.format);
        assert_eq!(records(&zipped), records(&plain));
        assert_eq!(lines(&zipped), lines(&plain));
        assert_eq!(zipped.rows[0].origin.file, gz);
    }
}

#[test]
fn parquet_flat_columns_read_like_jsonl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = std::fs::read_to_string(shared_data().join("gsm8k/test.jsonl")).expect("gsm8k");
    let jsonl_path = dir.path().join("gsm8k50.jsonl");
    let head: Vec<&str> = text.lines().take(50).collect();
    std::fs::write(&jsonl_path, head.join("\n")).expect("write");
    let values: Vec<Value> = head
        .iter()
        .map(|l| serde_json::from_str(l).expect("gsm8k is valid JSON"))
        .collect();
    let column = |key: &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(
            values
                .iter()
                .map(|v| v[key].as_str().unwrap_or_default().to_string()),
        ))
    };
    // An all-null column is read as absent, so it changes nothing.
    let nulls: ArrayRef = Arc::new(StringArray::from(vec![None::<&str>; values.len()]));
    let batch = RecordBatch::try_from_iter([
        ("question", column("question")),
        ("answer", column("answer")),
        ("note", nulls),
    ])
    .expect("batch");
    let parquet_path = dir.path().join("gsm8k50.parquet");
    write_parquet(&parquet_path, &batch);

    let jsonl = read(&jsonl_path, None);
    let parquet = read(&parquet_path, None);
    assert_eq!(parquet.format, Format::PromptAnswer);
    assert_eq!(parquet.rows.len(), 50);
    assert_eq!(records(&parquet), records(&jsonl));
    assert_eq!(lines(&parquet), lines(&jsonl));
}

#[test]
fn parquet_nested_conversations_read_like_jsonl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = fixture("sharegpt_mixed.jsonl");
    let rows: Vec<Value> = std::fs::read_to_string(&source)
        .expect("fixture")
        .lines()
        .map(|l| serde_json::from_str(l).expect("fixture is valid JSON"))
        .collect();
    let turns: Vec<&Value> = rows
        .iter()
        .flat_map(|r| r["conversations"].as_array().into_iter().flatten())
        .collect();
    let strings = |key: &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(
            turns
                .iter()
                .map(|t| t[key].as_str().unwrap_or_default().to_string()),
        ))
    };
    let turn_fields = Fields::from(vec![
        Field::new("from", DataType::Utf8, false),
        Field::new("value", DataType::Utf8, false),
    ]);
    let structs = StructArray::new(
        turn_fields.clone(),
        vec![strings("from"), strings("value")],
        None,
    );
    let lengths = rows
        .iter()
        .map(|r| r["conversations"].as_array().map_or(0, Vec::len));
    let item = Arc::new(Field::new("item", DataType::Struct(turn_fields), false));
    let conversations = ListArray::new(
        item.clone(),
        OffsetBuffer::from_lengths(lengths),
        Arc::new(structs),
        None,
    );
    let ids = StringArray::from_iter_values(rows.iter().map(|r| r["id"].to_string()));
    let schema = Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("conversations", DataType::List(item), false),
    ]);
    let batch = RecordBatch::try_new(
        Arc::new(schema),
        vec![Arc::new(ids), Arc::new(conversations)],
    )
    .expect("batch");
    let path = dir.path().join("sharegpt.parquet");
    write_parquet(&path, &batch);

    let parquet = read(&path, None);
    let jsonl = read(&source, None);
    assert_eq!(parquet.format, Format::ShareGpt);
    assert!(parquet.rejects.is_empty(), "{:?}", parquet.rejects);
    assert_eq!(records(&parquet), records(&jsonl));
    assert_eq!(lines(&parquet), vec![1, 2, 3, 4]);
}

// ---------------------------------------------------------------------------------------
// Bad input: every rejected row names file, line, field and reason
// ---------------------------------------------------------------------------------------

#[test]
fn malformed_lines_are_rejected_with_precise_reasons() {
    let ok: &[u8] =
        br#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#;
    let truncated: &[u8] = br#"{"messages": [{"role": "user", "content": "hi"}"#;
    let latin1: &[u8] =
        b"{\"messages\": [{\"role\": \"user\", \"content\": \"caf\xE9\"}, {\"role\": \"assistant\", \"content\": \"x\"}]}";
    let lines: Vec<&[u8]> = vec![
        ok,
        truncated,
        latin1,
        b"   ",
        br#"{"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "x"}]}"#,
        br#"{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}"#,
        br#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " \t "}]}"#,
        br#"{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}"#,
        br#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "more"}]}"#,
        br#"["not", "an", "object"]"#,
        ok,
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.jsonl");
    std::fs::write(&path, lines.join(&b'\n')).expect("write");

    let out = read(&path, None);
    assert_eq!(out.format, Format::OpenAiMessages);
    assert_eq!(lines_of(&out), vec![1, 11]);
    assert_eq!(out.rows_read, 10, "the blank line is not a row");
    assert_eq!(
        out.warnings,
        vec![format!(
            "{}: detected openai, but 1 of the first 8 rows do not look like it \
             ({{messages: [{{role, content}}]}})",
            path.display()
        )]
    );
    let e9 = latin1.iter().position(|&b| b == 0xE9).unwrap_or_default() + 1;
    let truncated_reason = format!(
        "invalid JSON at column {}: EOF while parsing a list",
        truncated.len()
    );
    let utf8_reason = format!("invalid UTF-8 at byte {e9} of the line");
    assert_eq!(
        reject_summary(&out.rejects),
        vec![
            (2, None, truncated_reason.as_str()),
            (3, None, utf8_reason.as_str()),
            (
                5,
                Some("messages[0].content"),
                "expected a string or a list of text parts, found a number"
            ),
            (6, Some("messages[0].content"), "missing required field"),
            (
                7,
                Some("messages[1].content"),
                "empty content (whitespace only)"
            ),
            (
                8,
                Some("messages[0].role"),
                "expected role `user`, found `assistant` (turns must start with `user` and \
                 alternate user/assistant)"
            ),
            (
                9,
                Some("messages[2].role"),
                "the last turn must be `assistant`, found `user`"
            ),
            (10, None, "expected a JSON object per row, found an array"),
        ]
    );
    // Raw lines are kept so a rejects file can be fixed and fed back.
    assert_eq!(
        out.rejects[0].raw.as_deref(),
        std::str::from_utf8(truncated).ok()
    );
    assert!(out.rejects[1]
        .raw
        .as_deref()
        .is_some_and(|r| r.contains("caf\u{FFFD}")));
    assert_eq!(
        out.rejects[2].to_string(),
        format!(
            "{}:5: field `messages[0].content`: expected a string or a list of text parts, \
             found a number",
            path.display()
        )
    );
}

fn lines_of(out: &ReadOutput) -> Vec<usize> {
    lines(out)
}

#[test]
fn bom_and_crlf_files_parse_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("windows.jsonl");
    let text = "\u{FEFF}{\"instruction\": \"Say hi.\", \"input\": \"\", \"output\": \"Hi!\"}\r\n\
                \r\n\
                {\"instruction\": \"Count\", \"input\": \"1, 2\", \"output\": \"3\"}\r\n";
    std::fs::write(&path, text).expect("write");
    let out = read(&path, None);
    assert_eq!(out.format, Format::Alpaca);
    assert!(out.rejects.is_empty(), "{:?}", out.rejects);
    assert_eq!(lines(&out), vec![1, 3]);
    assert_eq!(
        records(&out),
        vec![
            conversation(None, &["Say hi.", "Hi!"]),
            conversation(None, &["Count\n\n1, 2", "3"]),
        ]
    );
}

#[test]
fn json_array_elements_are_numbered_from_one() {
    let out = read(&fixture("alpaca_history.json"), None);
    assert_eq!(out.format, Format::Alpaca);
    assert_eq!(
        records(&out),
        vec![
            conversation(
                None,
                &["Translate to German.\n\nGood morning", "Guten Morgen"]
            ),
            conversation(
                Some("You are a translator."),
                &[
                    "Translate to French: Good morning",
                    "Bonjour",
                    "And now to Italian?",
                    "Buongiorno"
                ]
            ),
            conversation(None, &["Only an input here.", "Fine."]),
        ]
    );
    assert_eq!(
        reject_summary(&out.rejects),
        vec![
            (4, Some("output"), "missing required field"),
            (
                5,
                Some("history[0]"),
                "expected a [user, assistant] pair, found 1 items"
            ),
        ]
    );
    // Without a line of text, the raw field holds the element as compact JSON.
    assert_eq!(
        out.rejects[0].raw.as_deref(),
        Some(r#"{"instruction":"No output.","input":""}"#)
    );
}

#[test]
fn a_pretty_printed_single_object_is_one_row() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("one.json");
    let row = json!({"instruction": "Say hi.", "output": "Hi!"});
    let pretty = serde_json::to_string_pretty(&row).expect("serialize");
    std::fs::write(&path, pretty).expect("write");
    let out = read(&path, None);
    assert_eq!(out.format, Format::Alpaca);
    assert_eq!(lines(&out), vec![1]);
    assert_eq!(records(&out), vec![conversation(None, &["Say hi.", "Hi!"])]);
}

#[test]
fn file_level_problems_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nope.jsonl");
    let e = format!("{:#}", read_file(&missing, None).expect_err("missing file"));
    assert!(e.contains(&missing.display().to_string()), "{e}");

    let bad_gz = dir.path().join("bad.jsonl.gz");
    std::fs::write(&bad_gz, b"\x1F\x8B\x08\x00garbage that is not deflate").expect("write");
    let e = format!("{:#}", read_file(&bad_gz, None).expect_err("corrupt gzip"));
    assert_eq!(
        e,
        format!("cannot read {}: corrupt deflate stream", bad_gz.display())
    );

    let bad_parquet = dir.path().join("bad.parquet");
    std::fs::write(&bad_parquet, b"this is not parquet").expect("write");
    let e = format!(
        "{:#}",
        read_file(&bad_parquet, None).expect_err("corrupt parquet")
    );
    assert!(
        e.starts_with(&format!("cannot read {} as Parquet", bad_parquet.display())),
        "{e}"
    );

    let bad_array = dir.path().join("cut.json");
    std::fs::write(
        &bad_array,
        b"[{\"instruction\": \"a\", \"output\": \"b\"}, {\"instr",
    )
    .expect("write");
    let e = format!(
        "{:#}",
        read_file(&bad_array, None).expect_err("truncated array")
    );
    assert!(e.contains("is not a valid JSON array"), "{e}");
    assert!(e.contains("line 1 column"), "{e}");

    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, b"\n\n").expect("write");
    for format in [None, Some(Format::Alpaca)] {
        let e = format!("{:#}", read_file(&empty, format).expect_err("empty"));
        assert_eq!(e, format!("{} is empty: it holds no rows", empty.display()));
    }

    let scalars = dir.path().join("scalars.jsonl");
    std::fs::write(&scalars, b"1\n\"two\"\n").expect("write");
    let e = format!("{:#}", read_file(&scalars, None).expect_err("no objects"));
    assert!(
        e.contains("keys seen: [] (no row is a JSON object); known formats:"),
        "{e}"
    );

    let garbage = dir.path().join("garbage.jsonl");
    std::fs::write(&garbage, b"not json\n").expect("write");
    let e = format!("{:#}", read_file(&garbage, None).expect_err("no JSON"));
    assert!(
        e.contains("no row could be read (line 1: invalid JSON at column 2"),
        "{e}"
    );
}

#[test]
fn detection_errors_list_keys_and_known_formats() {
    let e = detect(&[
        json!({"text": "a", "label": 1}),
        json!({"text": "b", "score": 2}),
    ])
    .expect_err("undetectable")
    .to_string();
    assert!(
        e.starts_with(r#"keys seen: ["label", "score", "text"]; known formats: bedrock {prompt, completion}; bedrock-conversation"#),
        "{e}"
    );
    assert!(e.contains("hh-rlhf {chosen, rejected}"), "{e}");
}

// ---------------------------------------------------------------------------------------
// Fixtures for the shapes the real data does not cover
// ---------------------------------------------------------------------------------------

#[test]
fn preference_strings_message_lists_and_implicit_prompts() {
    let out = read(&fixture("preference_trl.jsonl"), None);
    assert_eq!(out.format, Format::Preference);
    let assistant = |t: &str| vec![Message::new(ASSISTANT, t)];
    let prompt = |system: Option<&str>, user: &str| Conversation {
        system: system.map(str::to_string),
        messages: vec![Message::new(USER, user)],
        tools: Vec::new(),
    };
    assert_eq!(
        records(&out),
        vec![
            Record::Preference(Preference {
                prompt: prompt(None, "Is the sky blue?"),
                chosen: assistant("Yes, on a clear day."),
                rejected: assistant("No."),
                margin: Some(1.5),
            }),
            Record::Preference(Preference {
                prompt: prompt(Some("Be brief."), "Capital of France?"),
                chosen: assistant("Paris."),
                rejected: assistant("Lyon."),
                margin: None,
            }),
            Record::Preference(Preference {
                prompt: prompt(None, "2+2?"),
                chosen: assistant("4"),
                rejected: assistant("5"),
                margin: None,
            }),
        ]
    );
    assert_eq!(
        reject_summary(&out.rejects),
        vec![(4, Some("margin"), "expected a number, found a string")]
    );
}

#[test]
fn bedrock_conversation_variants_and_non_text_parts() {
    let path = fixture("bedrock_conversation.jsonl");
    let out = read(&path, None);
    assert_eq!(out.format, Format::BedrockConversation);
    assert!(out.warnings.is_empty(), "{:?}", out.warnings);
    assert_eq!(
        records(&out),
        vec![
            conversation(Some("You are terse."), &["Part one.\nPart two.", "Noted."]),
            conversation(Some("Claude-on-Bedrock style."), &["Hi", "Hello"]),
        ]
    );
    assert_eq!(
        reject_summary(&out.rejects),
        vec![
            (
                3,
                Some("messages[0].content[1]"),
                "non-text content part `image` is not supported (text only)"
            ),
            (
                4,
                Some("messages[2].role"),
                "the last turn must be `assistant`, found `user`"
            ),
        ]
    );
}

#[test]
fn openai_parts_developer_role_and_unsupported_turns() {
    let out = read(&fixture("openai_parts.jsonl"), None);
    assert_eq!(out.format, Format::OpenAiMessages);
    assert_eq!(
        records(&out),
        vec![
            conversation(Some("Be kind."), &["Look:\ntwo parts", "Seen."]),
            conversation(Some("Rules."), &["q", "a"]),
        ]
    );
    assert_eq!(
        reject_summary(&out.rejects),
        vec![
            (
                3,
                Some("messages[0].content[0]"),
                "non-text content part of type `image_url` is not supported (text only)"
            ),
            (
                4,
                Some("messages[1].tool_calls[0].function"),
                "missing required field"
            ),
            (
                5,
                Some("messages[1].role"),
                "expected role `assistant`, found `tool` (turns must start with `user` and \
                 alternate user/assistant)"
            ),
        ]
    );
}

#[test]
fn prompt_only_rows_with_and_without_answers() {
    let out = read(&fixture("prompt_only.jsonl"), None);
    assert_eq!(out.format, Format::PromptAnswer);
    assert!(out.rejects.is_empty(), "{:?}", out.rejects);
    let tasks: Vec<&PromptTask> = out
        .rows
        .iter()
        .filter_map(|r| match &r.record {
            Record::PromptTask(t) => Some(t),
            _ => None,
        })
        .collect();
    assert_eq!(tasks.len(), 4);
    assert_eq!(tasks[0].answer, None);
    assert!(tasks[0].meta.is_empty());
    assert_eq!(tasks[1].prompt.system.as_deref(), Some("Show your work."));
    assert_eq!(tasks[1].answer.as_deref(), Some("42"));
    assert_eq!(
        tasks[1].meta,
        json!({"reference_answer": 42, "id": "q-7"})
            .as_object()
            .cloned()
            .unwrap_or_default()
    );
    assert_eq!(tasks[2].answer.as_deref(), Some("24"));
    assert_eq!(tasks[3].answer.as_deref(), Some("1000"));
}

#[test]
fn explicit_format_reads_rows_the_detector_would_not_pick() {
    // Plain Claude-on-Bedrock rows without a system prompt look like OpenAI rows; naming the
    // format reads them with the Bedrock rules (which refuse a `system` role in messages).
    let origin = Origin {
        file: PathBuf::from("x.jsonl"),
        line: 7,
    };
    let row = json!({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]});
    assert!(parse_row(Format::OpenAiMessages, &row, &origin).is_ok());
    let reject = parse_row(Format::BedrockConversation, &row, &origin).expect_err("bedrock");
    assert_eq!(reject.origin, origin);
    assert_eq!(reject.field.as_deref(), Some("messages[0].role"));
    assert!(
        reject.reason.contains("top-level `system` field"),
        "{}",
        reject.reason
    );
}

// ---------------------------------------------------------------------------------------
// Conversion round trips
// ---------------------------------------------------------------------------------------

fn target_format(target: Target) -> Format {
    match target {
        Target::Bedrock => Format::BedrockPromptCompletion,
        Target::BedrockConversation => Format::BedrockConversation,
        Target::Alpaca => Format::Alpaca,
        Target::ShareGpt => Format::ShareGpt,
        Target::OpenAi => Format::OpenAiMessages,
    }
}

/// Converts every row, writes the result, and reads it back with auto-detection.
fn round_trip(source: &ReadOutput, target: Target, dir: &Path) -> (ReadOutput, Vec<Vec<String>>) {
    let mut converted = Vec::new();
    let mut warnings = Vec::new();
    for row in &source.rows {
        let (value, w) = convert_record(&row.record, target)
            .unwrap_or_else(|e| panic!("{} to {target}: {e:#}", row.origin));
        converted.push(value);
        warnings.push(w);
    }
    let path = dir.join(format!("{}.jsonl", target.name()));
    write_jsonl(&path, &converted);
    let back = read(&path, None);
    assert_eq!(back.format, target_format(target));
    assert!(back.rejects.is_empty(), "{target}: {:?}", back.rejects);
    (back, warnings)
}

#[test]
fn lossless_targets_round_trip_to_identical_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sources = [
        fixture("sharegpt_mixed.jsonl"),
        fixture("alpaca_history.json"),
        fixture("bedrock_conversation.jsonl"),
        fixture("openai_parts.jsonl"),
        shared_data().join("alpaca/llamafactory_alpaca_en_demo.json"),
        shared_data().join("bedrock/nova_tooluse_conversation_test.jsonl"),
    ];
    for source_path in sources {
        let source = read(&source_path, None);
        assert!(!source.rows.is_empty());
        for target in [
            Target::OpenAi,
            Target::ShareGpt,
            Target::Alpaca,
            Target::BedrockConversation,
        ] {
            let (back, warnings) = round_trip(&source, target, dir.path());
            assert!(warnings.iter().all(Vec::is_empty), "{target}: {warnings:?}");
            assert_eq!(
                records(&back),
                records(&source),
                "{} -> {target} -> back",
                source_path.display()
            );
        }
    }
}

#[test]
fn prompt_completion_keeps_one_exchange_and_warns_about_the_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = read(&fixture("sharegpt_mixed.jsonl"), None);
    let (back, warnings) = round_trip(&source, Target::Bedrock, dir.path());
    let back = records(&back);
    // One plain exchange survives as it was.
    assert_eq!(back[0], source.rows[0].record);
    assert!(warnings[0].is_empty());
    // Six turns: only the last exchange is kept, and the warning says so.
    assert_eq!(
        back[1],
        conversation(None, &["And an even one?", "2, the only one."])
    );
    assert_eq!(
        warnings[1],
        vec![
            "kept only the last user/assistant exchange: dropped 4 earlier turns \
              (prompt/completion holds one exchange)"
                .to_string()
        ]
    );
    // The system prompt moves into the prompt.
    assert_eq!(
        back[2],
        conversation(None, &["You answer in French.\n\nHello!", "Bonjour !"])
    );
    assert_eq!(warnings[2].len(), 1);
    assert!(
        warnings[2][0].contains("system prompt"),
        "{:?}",
        warnings[2]
    );
    assert_ne!(back[3], source.rows[3].record);
    assert!(!warnings[3].is_empty());
}

#[test]
fn real_sharegpt_single_exchanges_survive_prompt_completion() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = read(
        &shared_data().join("sharegpt/fastchat_dummy_conversation.json"),
        None,
    );
    let (back, warnings) = round_trip(&source, Target::Bedrock, dir.path());
    for ((original, back), warnings) in source.rows.iter().zip(&back.rows).zip(&warnings) {
        if warnings.is_empty() {
            assert_eq!(back.record, original.record);
        } else {
            assert_ne!(back.record, original.record);
        }
    }
    assert!(warnings.iter().any(Vec::is_empty) && warnings.iter().any(|w| !w.is_empty()));
}

#[test]
fn records_without_a_single_response_cannot_be_converted() {
    let preference = read(&fixture("preference_trl.jsonl"), None);
    let tasks = read(&fixture("prompt_only.jsonl"), None);
    for target in Target::all() {
        let e = convert_record(&preference.rows[0].record, *target)
            .expect_err("preference")
            .to_string();
        assert!(
            e.starts_with(&format!("a preference pair cannot be written as {target}")),
            "{e}"
        );
        let e = convert_record(&tasks.rows[0].record, *target)
            .expect_err("prompt task")
            .to_string();
        assert!(e.contains("has no assistant response"), "{e}");
    }
}

#[test]
fn unpaired_rows_are_read_with_their_labels() {
    let out = read(&fixture("unpaired_kto.jsonl"), None);
    assert_eq!(out.format, Format::Unpaired);
    assert_eq!(
        records(&out),
        vec![
            Record::Unpaired(Unpaired {
                prompt: Conversation {
                    system: None,
                    messages: vec![Message::new(USER, "Is the sky blue?")],
                    tools: Vec::new(),
                },
                completion: vec![Message::new(ASSISTANT, "Yes, on a clear day.")],
                label: true,
            }),
            Record::Unpaired(Unpaired {
                prompt: Conversation {
                    system: Some("Be brief.".into()),
                    messages: vec![Message::new(USER, "Capital of France?")],
                    tools: Vec::new(),
                },
                completion: vec![Message::new(ASSISTANT, "Lyon.")],
                label: false,
            }),
            Record::Unpaired(Unpaired {
                prompt: Conversation {
                    system: None,
                    messages: vec![Message::new(USER, "2+2?")],
                    tools: Vec::new(),
                },
                completion: vec![Message::new(ASSISTANT, "5")],
                label: false,
            }),
        ]
    );
    assert_eq!(
        reject_summary(&out.rejects),
        vec![(3, Some("label"), "expected true or false, found a string")]
    );
    let e = convert_record(&records(&out)[0], Target::OpenAi).expect_err("not an answer");
    assert!(e.to_string().contains("unpaired (KTO) row"), "{e}");
}
