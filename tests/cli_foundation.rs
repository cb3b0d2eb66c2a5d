//! End-to-end: `burnish new-model`, `generate` and `score` as the README runs them.

mod common;

use common::{err, ok};
use std::path::Path;

fn new_tiny(dir: &Path, seed: &str) {
    let out = dir.to_str().unwrap();
    ok(&[
        "new-model",
        "--preset",
        "tiny",
        "--tokenizer",
        "assets/tokenizers/phi3_vision",
        "--out",
        out,
        "--seed",
        seed,
    ]);
}

#[test]
fn new_model_then_generate_and_score() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    new_tiny(&dir, "7");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(dir.join(f).exists(), "{f} missing");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["hidden_size"], 64);
    assert_eq!(cfg["num_key_value_heads"], 2);
    assert_eq!(cfg["vocab_size"], 32064);

    // Same seed, same bytes; greedy generation is deterministic.
    let again = tmp.path().join("again");
    new_tiny(&again, "7");
    assert_eq!(
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        std::fs::read(again.join("model.safetensors")).unwrap()
    );

    let m = dir.to_str().unwrap();
    let a = ok(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        "8",
    ]);
    let b = ok(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        "8",
    ]);
    assert_eq!(a, b);
    ok(&[
        "generate",
        "--model",
        m,
        "--chat",
        "Hello!",
        "--system",
        "Be brief.",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--top-k",
        "20",
        "--seed",
        "3",
    ]);

    let data = tmp.path().join("rows.jsonl");
    std::fs::write(&data, "{\"prompt\": \"The capital of France is\", \"completion\": \" Paris.\"}\n\n{\"prompt\": \"2+2=\", \"completion\": \"4\"}\n").unwrap();
    let scores = ok(&["score", "--model", m, "--data", data.to_str().unwrap()]);
    let rows: Vec<serde_json::Value> = scores
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    for r in &rows {
        assert!(r["logprob"].as_f64().unwrap() < 0.0);
        assert!(r["num_tokens"].as_u64().unwrap() >= 1);
    }
}

#[test]
fn clear_errors_without_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let e = err(&[
        "generate",
        "--model",
        tmp.path().join("missing").to_str().unwrap(),
        "--prompt",
        "x",
    ]);
    assert!(e.contains("does not exist"), "{e}");
    let e = err(&[
        "new-model",
        "--preset",
        "huge",
        "--tokenizer",
        "assets/tokenizers/phi3_vision",
        "--out",
        tmp.path().join("m").to_str().unwrap(),
    ]);
    assert!(
        e.contains("unknown preset `huge`") && e.contains("tiny"),
        "{e}"
    );
    let dir = tmp.path().join("tiny");
    new_tiny(&dir, "1");
    let m = dir.to_str().unwrap();
    let e = err(&["generate", "--model", m, "--prompt", "x", "--device", "tpu"]);
    assert!(e.contains("unknown device `tpu`"), "{e}");
    if !cfg!(feature = "cuda") {
        let e = err(&[
            "generate", "--model", m, "--prompt", "x", "--device", "cuda:0",
        ]);
        assert!(e.contains("without CUDA support"), "{e}");
    }
    let data = tmp.path().join("bad.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"a\"}\n",
    )
    .unwrap();
    let e = err(&[
        "score",
        "--model",
        m,
        "--data",
        data.to_str().unwrap(),
        "--on-error",
        "fail",
    ]);
    assert!(e.contains("bad.jsonl:2") && e.contains("completion"), "{e}");
    std::fs::write(&data, "{\"prompt\": \"a\", \"completion\": \"b\"\n").unwrap();
    let e = err(&["score", "--model", m, "--data", data.to_str().unwrap()]);
    assert!(
        e.contains("bad.jsonl:1") && e.contains("invalid JSON"),
        "{e}"
    );
}
