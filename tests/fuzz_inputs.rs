//! Randomised inputs (proptest) for every format reader, the chat templater and the recipe
//! parser: whatever the input, they return rows, rejects or an error, and never panic.
//!
//! The suite runs a few hundred cases per property; for a longer run:
//!
//!     BURNISH_FUZZ_CASES=100000 cargo test --release --test fuzz_inputs
//!
//! Inputs are of two kinds: raw bytes (as a file of each container: JSONL, gzip, JSON array,
//! Parquet) and JSON values built from the keys and shapes the formats use, so the parsers'
//! deeper paths (message lists, roles, content blocks) are reached, not only JSON errors.

use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;

use datasets::formats::{parse_row, Format};
use datasets::read::{read_file, read_raw};
use datasets::records::Origin;
use datasets::tokenize::{MaskPolicy, Templater, Truncation};
use models::TextTokenizer;
use proptest::prelude::*;
use serde_json::{json, Map, Value};

fn cases() -> u32 {
    std::env::var("BURNISH_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn tokenizer() -> &'static TextTokenizer {
    static TOK: OnceLock<TextTokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        TextTokenizer::from_dir(&root.join("assets/tokenizers/phi3_vision")).unwrap()
    })
}

const KEYS: &[&str] = &[
    "instruction",
    "input",
    "output",
    "system",
    "history",
    "messages",
    "role",
    "content",
    "conversations",
    "from",
    "value",
    "prompt",
    "completion",
    "chosen",
    "rejected",
    "margin",
    "question",
    "answer",
    "schemaVersion",
    "text",
    "type",
    "label",
    "id",
];
const WORDS: &[&str] = &[
    "user",
    "assistant",
    "system",
    "human",
    "gpt",
    "tool",
    "bedrock-conversation-2024",
    "",
    "Hi",
    "\n\nHuman: hi\n\nAssistant: yo",
    "#### 5",
    "<|im_start|>",
    "{{ x }}",
    "\u{0}",
];

/// JSON values shaped like dataset rows: objects keyed by the formats' field names, holding
/// strings, numbers, lists and nested objects.
fn row_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|x| json!(x)),
        prop::sample::select(WORDS).prop_map(|w| json!(w)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..6).prop_map(|kv| {
                Value::Object(
                    kv.into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect::<Map<String, Value>>(),
                )
            }),
        ]
    })
}

fn write_temp(name: &str, bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// Every reader entry point on one file: auto-detection, each named format, raw rows.
fn read_every_way(name: &str, bytes: &[u8]) {
    let (_dir, path) = write_temp(name, bytes);
    let _ = read_file(&path, None);
    for &f in Format::all() {
        let _ = read_file(&path, Some(f));
    }
    let _ = read_raw(&path);
}

fn templater(mask: MaskPolicy, max_seq_len: usize) -> Templater<'static> {
    let tok = tokenizer();
    Templater {
        tokenizer: tok,
        template: tok.template(None).unwrap(),
        tokens: tok.template_tokens(),
        mask,
        max_seq_len,
        truncation: Truncation::Left,
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn readers_take_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        for name in ["r.jsonl", "r.json", "r.parquet", "r.txt"] {
            read_every_way(name, &bytes);
        }
        read_every_way("r.jsonl.gz", &gzip(&bytes));
    }

    #[test]
    fn readers_take_any_rows(rows in prop::collection::vec(row_value(), 0..6)) {
        let lines: String = rows.iter().map(|r| format!("{r}\n")).collect();
        read_every_way("rows.jsonl", lines.as_bytes());
        read_every_way("rows.json", Value::Array(rows).to_string().as_bytes());
    }

    #[test]
    fn every_format_and_the_templater_take_any_row(row in row_value(), max_seq_len in 1usize..64) {
        let origin = Origin { file: "fuzz.jsonl".into(), line: 1 };
        for &f in Format::all() {
            if let Ok(record) = parse_row(f, &row, &origin) {
                for mask in [MaskPolicy::Assistant, MaskPolicy::LastAssistant, MaskPolicy::All] {
                    let _ = templater(mask, max_seq_len).tokenize(&record);
                }
            }
        }
    }

    #[test]
    fn the_recipe_parser_takes_any_text(text in "(\\PC|\n|\\[|\\]|=|\"){0,200}") {
        let _ = trainers::Recipe::parse(&text, &[]);
    }

    #[test]
    fn the_recipe_parser_takes_any_values_in_a_recipe(
        key in prop::sample::select(&[
            "train.learning_rate", "train.per_device_train_batch_size", "train.max_steps",
            "train.warmup_ratio", "train.pad_to_multiple_of", "data.max_seq_len",
            "data.eval_fraction", "data.files", "model.quantize", "adapter.r", "method",
            "grpo.num_generations", "dpo.beta", "train.lr_scheduler_type", "seed",
        ][..]),
        value in prop_oneof![
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|x| format!("{x:?}")),
            "\\PC{0,12}",
            Just("[]".to_string()),
            Just("{}".to_string()),
            Just("nan".to_string()),
            Just("-inf".to_string()),
        ],
    ) {
        let recipe = "method = \"sft\"\n[model]\npath = \"m\"\n[data]\nfiles = [\"d.jsonl\"]\n[train]\noutput_dir = \"o\"\nmax_steps = 1\n";
        let _ = trainers::Recipe::parse(recipe, &[format!("{key}={value}")]);
    }
}
