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

/// A stand-in for an OpenAI-compatible endpoint on loopback: every chat-completions request
/// is answered with `reply(request body)`; the bodies are sent to the receiver. Returns the
/// base URL (up to `/v1`).
pub fn openai_stub(
    reply: fn(&serde_json::Value) -> String,
) -> (String, std::sync::mpsc::Receiver<String>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line == "\r\n" || line.is_empty() {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0u8; len];
            reader.read_exact(&mut body).unwrap();
            let body = String::from_utf8(body).unwrap();
            let request: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let _ = tx.send(body);
            let answer = serde_json::json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": reply(&request)}, "finish_reason": "stop"}]}).to_string();
            write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                answer.len()
            )
            .unwrap();
        }
    });
    (url, rx)
}
