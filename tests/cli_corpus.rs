//! The malformed-input corpus (`tests/corpus/`, written by `make_corpus.py` there): every case
//! of `cases.json` runs the burnish binary and must give the expected exit code, a message
//! that names what is wrong (file, line, field), no panic, and the expected state of the
//! output files afterwards.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::root;
use serde_json::Value;

fn corpus() -> PathBuf {
    root().join("tests/corpus")
}

/// Copies every file of `from` into `to` with its placeholders replaced by `subst`.
fn copy_substituted(from: &Path, to: &Path, subst: &dyn Fn(&str) -> String) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let text = std::fs::read_to_string(entry.path()).unwrap();
        std::fs::write(to.join(entry.file_name()), subst(&text)).unwrap();
    }
}

#[test]
fn every_corpus_case_fails_or_passes_as_recorded() {
    let table: Value =
        serde_json::from_str(&std::fs::read_to_string(corpus().join("cases.json")).unwrap())
            .unwrap();
    let cases = table["cases"].as_array().unwrap();
    assert!(cases.len() >= 100, "{} cases", cases.len());
    let mut failures = Vec::new();
    for case in cases {
        let tmp = tempfile::tempdir().unwrap();
        let subst = |s: &str| {
            s.replace("{corpus}", corpus().to_str().unwrap())
                .replace("{recipes}", tmp.path().join("recipes").to_str().unwrap())
                .replace("{tmp}", tmp.path().to_str().unwrap())
        };
        copy_substituted(
            &corpus().join("recipes"),
            &tmp.path().join("recipes"),
            &subst,
        );
        for (to, from) in table["setup"].as_object().unwrap() {
            std::fs::copy(subst(from.as_str().unwrap()), subst(to)).unwrap();
        }
        let files: BTreeMap<String, String> = case["files"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (subst(k), v.as_str().unwrap().to_string()))
            .collect();
        let before: BTreeMap<&String, Vec<u8>> = files
            .iter()
            .filter(|(_, state)| *state == "unchanged")
            .map(|(path, _)| (path, std::fs::read(path).unwrap()))
            .collect();
        let args: Vec<String> = case["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| subst(a.as_str().unwrap()))
            .collect();
        let out = Command::new(env!("CARGO_BIN_EXE_burnish"))
            .args(&args)
            .current_dir(tmp.path())
            .env_remove("RUST_BACKTRACE")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let name = case["name"].as_str().unwrap();
        let mut problems = Vec::new();
        let want = case["exit"].as_i64().unwrap();
        let got = out.status.code().unwrap_or(-1) as i64;
        if got != want {
            problems.push(format!("exit {got}, expected {want}"));
        }
        let pattern = regex::Regex::new(case["stderr"].as_str().unwrap()).unwrap();
        if !pattern.is_match(&text) {
            problems.push(format!("output does not match /{pattern}/"));
        }
        if text.contains("panicked") || text.contains("internal error") {
            problems.push("panicked".into());
        }
        for (path, state) in &files {
            let exists = Path::new(path).exists();
            let ok = match state.as_str() {
                "absent" => !exists,
                "present" => exists,
                "unchanged" => std::fs::read(path).ok().as_ref() == before.get(path),
                other => panic!("{name}: unknown file state {other}"),
            };
            if !ok {
                problems.push(format!("{path} is not {state}"));
            }
        }
        // Whatever a case leaves behind, it is never a temporary file of an atomic write.
        for entry in walk(tmp.path()) {
            if entry.ends_with(".tmp") {
                problems.push(format!("left a partial file {entry}"));
            }
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{name} ({}): {}\n--- output ---\n{}",
                args.join(" "),
                problems.join("; "),
                text.chars().take(1500).collect::<String>()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p.to_string_lossy().into_owned());
        }
    }
    out
}
