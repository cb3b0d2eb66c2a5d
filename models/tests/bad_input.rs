//! Bad checkpoints get a one-paragraph error naming the file and what was expected.

use models::backend::Cpu;
use models::checkpoint::{load_model, load_tokenizer};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/models")
        .join(name)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn load_err(dir: &Path) -> String {
    match load_model::<Cpu>(dir, &Default::default()) {
        Ok(_) => panic!("{} should not load", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn missing_directory_and_config() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(load_err(&tmp.path().join("nope")).contains("does not exist"));
    let err = load_err(tmp.path());
    assert!(
        err.contains("config.json") && err.contains("is missing"),
        "{err}"
    );
}

#[test]
fn config_missing_field_names_file_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture("tiny-qwen2"), tmp.path());
    let path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(&path, cfg.to_string()).unwrap();
    let err = load_err(tmp.path());
    assert!(
        err.contains("hidden_size") && err.contains("config.json"),
        "{err}"
    );
}

#[test]
fn wrong_shape_names_tensor_and_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture("tiny-qwen2"), tmp.path());
    let path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["intermediate_size"] = 100.into();
    std::fs::write(&path, cfg.to_string()).unwrap();
    let err = load_err(tmp.path());
    assert!(
        err.contains("gate_proj.weight") && err.contains("[176, 64]") && err.contains("[100, 64]"),
        "{err}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture("tiny-qwen2"), tmp.path());
    let path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["tie_word_embeddings"] = false.into();
    std::fs::write(&path, cfg.to_string()).unwrap();
    let err = load_err(tmp.path());
    assert!(
        err.contains("lm_head.weight") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn truncated_safetensors_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture("tiny-qwen2"), tmp.path());
    let path = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(tmp.path());
    assert!(
        err.contains("model.safetensors") && err.contains("truncated"),
        "{err}"
    );
    std::fs::write(&path, b"not a safetensors file").unwrap();
    let err = load_err(tmp.path());
    assert!(
        err.contains("model.safetensors") && err.contains("not a valid safetensors"),
        "{err}"
    );
}

#[test]
fn tokenizer_larger_than_vocab_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture("tiny-qwen2"), tmp.path());
    let tok_dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/tokenizers/phi3_vision");
    std::fs::copy(
        tok_dir.join("tokenizer.json"),
        tmp.path().join("tokenizer.json"),
    )
    .unwrap();
    let cfg = models::checkpoint::load_config(tmp.path()).unwrap();
    let err = format!("{:#}", load_tokenizer(tmp.path(), &cfg).err().unwrap());
    assert!(
        err.contains("vocab_size 256") && err.contains("tokenizer.json"),
        "{err}"
    );
}

#[test]
fn unsupported_architecture_lists_supported() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture("tiny-qwen2"), tmp.path());
    let path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["model_type"] = "gpt_neox".into();
    std::fs::write(&path, cfg.to_string()).unwrap();
    let err = load_err(tmp.path());
    assert!(
        err.contains("gpt_neox")
            && err.contains("llama")
            && err.contains("mistral")
            && err.contains("qwen2"),
        "{err}"
    );
}
