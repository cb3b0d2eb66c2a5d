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
pub fn fixed_openai_endpoint(
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

/// The scalars of every TensorBoard event file in `dir`, as (step, tag, value), read with
/// the TFRecord checksums verified; an independent decoder of what `report_to` writes.
pub fn read_tensorboard(dir: &Path) -> Vec<(i64, String, f32)> {
    use trainers::report::masked_crc32c;
    fn fields(mut b: &[u8]) -> Vec<(u64, Vec<u8>)> {
        fn varint(b: &mut &[u8]) -> u64 {
            let mut v = 0u64;
            for shift in (0..64).step_by(7) {
                let byte = b[0];
                *b = &b[1..];
                v |= u64::from(byte & 0x7f) << shift;
                if byte < 0x80 {
                    break;
                }
            }
            v
        }
        let mut out = vec![];
        while !b.is_empty() {
            let key = varint(&mut b);
            let (field, wire) = (key >> 3, key & 7);
            let value = match wire {
                0 => varint(&mut b).to_le_bytes().to_vec(),
                1 => {
                    let v = b[..8].to_vec();
                    b = &b[8..];
                    v
                }
                2 => {
                    let n = varint(&mut b) as usize;
                    let v = b[..n].to_vec();
                    b = &b[n..];
                    v
                }
                5 => {
                    let v = b[..4].to_vec();
                    b = &b[4..];
                    v
                }
                w => panic!("unexpected wire type {w}"),
            };
            out.push((field, value));
        }
        out
    }
    let mut out = vec![];
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("tfevents"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 1, "one event file: {files:?}");
    let data = std::fs::read(&files[0]).unwrap();
    let mut at = 0;
    while at < data.len() {
        let len_bytes = &data[at..at + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(data[at + 8..at + 12].try_into().unwrap());
        assert_eq!(crc, masked_crc32c(len_bytes), "length checksum");
        let body = &data[at + 12..at + 12 + len];
        let crc = u32::from_le_bytes(data[at + 12 + len..at + 16 + len].try_into().unwrap());
        assert_eq!(crc, masked_crc32c(body), "data checksum");
        at += 16 + len;
        let event = fields(body);
        let step = event.iter().find(|(f, _)| *f == 2).map_or(0, |(_, v)| {
            u64::from_le_bytes(v[..8].try_into().unwrap()) as i64
        });
        for (_, summary) in event.iter().filter(|(f, _)| *f == 5) {
            for (_, value) in fields(summary).iter().filter(|(f, _)| *f == 1) {
                let v = fields(value);
                let tag = v
                    .iter()
                    .find(|(f, _)| *f == 1)
                    .map(|(_, t)| String::from_utf8(t.clone()).unwrap());
                let x = v
                    .iter()
                    .find(|(f, _)| *f == 2)
                    .map(|(_, x)| f32::from_le_bytes(x[..4].try_into().unwrap()));
                out.push((step, tag.unwrap(), x.unwrap()));
            }
        }
    }
    out
}

/// `data evolve` of two seed instructions through `backend` (`--backend ... --model ...`),
/// with elimination relaxed so a tiny model's noise is judged on its merits; checks that the
/// report accounts for both seeds (evolved or eliminated with a reason) and returns
/// (stdout, report, evolved rows file).
pub fn evolve_two_seeds(dir: &Path, backend: &[&str]) -> (String, serde_json::Value, PathBuf) {
    let seeds = dir.join("s.jsonl");
    std::fs::write(
        &seeds,
        "{\"instruction\": \"Name a colour.\", \"output\": \"Red.\"}\n{\"instruction\": \"Count to three.\", \"output\": \"1 2 3\"}\n",
    )
    .unwrap();
    let out = dir.join("e.jsonl");
    let report = dir.join("r.json");
    let mut args = vec![
        "data",
        "evolve",
        seeds.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(backend);
    args.extend_from_slice(&[
        "--max-tokens",
        "12",
        "--info-gain",
        "similarity",
        "--min-answer-words",
        "0",
        "--report",
        report.to_str().unwrap(),
    ]);
    let stdout = ok(&args);
    let rep: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let evolved = rep["evolved"].as_u64().unwrap();
    let eliminated: u64 = rep["eliminated"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(evolved + eliminated, 2, "{rep}");
    assert!(rep["requests"].as_u64().unwrap() >= 2, "{rep}");
    (stdout, rep, out)
}
