//! `burnish data distill`: a local teacher and an OpenAI-compatible endpoint (a server on
//! loopback) answer prompts; the rows come out in Bedrock conversation format with lineage
//! and read back as SFT data.

mod common;

use common::{err, new_tiny_model, ok};
use std::path::Path;

use datasets::read::read_file;
use datasets::records::Record;

const PROMPTS: &str = "{\"instruction\": \"What is 2 + 2?\", \"output\": \"old answer\"}\n{\"instruction\": \"Name a colour.\", \"output\": \"Red.\"}\n";

fn read_rows(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn an_endpoint_teacher_answers_prompts_as_sft_rows_with_lineage() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("prompts.jsonl");
    std::fs::write(&input, PROMPTS).unwrap();
    let out = tmp.path().join("sft.jsonl");
    let (url, requests) = common::fixed_openai_endpoint(|_| "4".to_string());
    ok(&[
        "data",
        "distill",
        "--teacher",
        &format!("openai:{url}"),
        "--model-name",
        "teacher-70b",
        "--input",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let first: serde_json::Value = serde_json::from_str(&requests.recv().unwrap()).unwrap();
    assert_eq!(first["model"], "teacher-70b");
    let rows = read_rows(&out);
    assert_eq!(rows.len(), 2);
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(
            row["lineage"]["source"],
            format!("{}:{}", input.display(), i + 1)
        );
        assert!(row["lineage"]["teacher"]
            .as_str()
            .unwrap()
            .starts_with("openai:"));
    }
    // The dataset's old answer is replaced by the teacher's, and the file reads back as
    // conversations for SFT.
    let back = read_file(&out, None).unwrap();
    assert!(back.rejects.is_empty(), "{:?}", back.rejects);
    let Record::Conversation(c) = &back.rows[0].record else {
        panic!("a conversation")
    };
    assert_eq!(c.messages.last().unwrap().content, "4");
    assert!(!std::fs::read_to_string(&out)
        .unwrap()
        .contains("old answer"));
}

#[test]
fn a_local_teacher_answers_and_bad_teachers_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let model = new_tiny_model(&tmp.path().join("teacher"), 0);
    let input = tmp.path().join("prompts.jsonl");
    std::fs::write(&input, PROMPTS).unwrap();
    let out = tmp.path().join("sft.jsonl");
    let run = common::burnish(&[
        "data",
        "distill",
        "--teacher",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--max-new-tokens",
        "6",
    ]);
    let text = String::from_utf8_lossy(&run.stderr);
    // A random teacher may say nothing: such rows are rejects, never silently dropped; when
    // no row is left the run fails and writes nothing.
    let empty = text
        .lines()
        .filter(|l| l.starts_with("rejected ") && l.contains("answer is empty"))
        .count();
    if run.status.success() {
        assert_eq!(read_rows(&out).len() + empty, 2, "{text}");
    } else {
        assert!(
            text.contains("no row is left to write") && empty == 2,
            "{text}"
        );
        assert!(!out.exists());
    }

    let e = err(&[
        "data",
        "distill",
        "--teacher",
        tmp.path().join("missing").to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(e.contains("missing"), "{e}");
}
