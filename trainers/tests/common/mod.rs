//! What the trainers' integration tests share: the repository root and one tiny model.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use models::presets::{write_new_model, NewModelSpec};
use models::weights::DiskDtype;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// One tiny random-init model (bundled tokenizer, seed 1) shared by every test of a binary.
pub fn tiny_model() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("tiny");
        write_new_model(&NewModelSpec {
            preset: "tiny",
            arch: "llama",
            tokenizer_dir: &root().join("assets/tokenizers/phi3_vision"),
            out: &out,
            seed: 1,
            chat_template: "chatml",
            dtype: DiskDtype::F32,
        })
        .unwrap();
        (tmp, out)
    })
    .1
}
