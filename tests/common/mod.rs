//! Helpers shared by the CLI end-to-end tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn burnish(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_burnish"))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap()
}

pub fn ok(args: &[&str]) -> String {
    let out = burnish(args);
    assert!(
        out.status.success(),
        "burnish {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn err(args: &[&str]) -> String {
    let out = burnish(args);
    assert!(!out.status.success(), "burnish {args:?} should fail");
    let e = String::from_utf8(out.stderr).unwrap();
    assert!(!e.contains("panicked"), "{e}");
    e
}

/// `burnish new-model --preset tiny` with the bundled tokenizer, written to `out`.
pub fn new_tiny_model(out: &Path, seed: u64) -> PathBuf {
    ok(&[
        "new-model",
        "--preset",
        "tiny",
        "--tokenizer",
        "assets/tokenizers/phi3_vision",
        "--out",
        out.to_str().unwrap(),
        "--seed",
        &seed.to_string(),
    ]);
    out.to_path_buf()
}
