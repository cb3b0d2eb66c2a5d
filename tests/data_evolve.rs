//! Evol-Instruct: the OpenAI-compatible client against a real HTTP server on loopback
//! (429 then success, 500, a malformed body, a slow reply hitting the timeout), the
//! `burnish data evolve` command with resume and lineage, the local backend on a tiny
//! model, and `[data.evolve]` in `data prepare`.

mod common;

use common::{burnish, new_tiny_model, ok, root};
use datasets::evolve::{BackendError, ChatBackend, ChatRequest, OpenAiClient, OpenAiConfig};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A minimal HTTP/1.1 chat-completions server: one thread per connection, deterministic
/// replies chosen by markers in the last message.
struct Server {
    url: String,
    requests: Arc<AtomicUsize>,
    auth: Arc<Mutex<Vec<String>>>,
}

fn reply(stream: &mut TcpStream, status: &str, extra: &str, body: &str) {
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}",
        body.len()
    );
    let _ = stream.flush();
}

fn completion(text: &str) -> String {
    serde_json::json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})
        .to_string()
}

fn handle(
    mut stream: TcpStream,
    seen: Arc<Mutex<HashMap<String, usize>>>,
    auth: Arc<Mutex<Vec<String>>>,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut len = 0;
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
        if lower.starts_with("authorization:") {
            auth.lock()
                .unwrap()
                .push(h["authorization:".len()..].trim().to_string());
        }
    }
    let mut body = vec![0; len];
    reader.read_exact(&mut body).unwrap();
    if !line.starts_with("POST /v1/chat/completions") {
        return reply(&mut stream, "404 Not Found", "", "{}");
    }
    let req: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let msgs = req["messages"].as_array().unwrap();
    let content = msgs.last().unwrap()["content"]
        .as_str()
        .unwrap()
        .to_string();
    let n = {
        let mut s = seen.lock().unwrap();
        let c = s.entry(content.clone()).or_default();
        *c += 1;
        *c
    };
    if content.contains("TRIGGER429") && n == 1 {
        return reply(
            &mut stream,
            "429 Too Many Requests",
            "Retry-After: 0\r\n",
            "{\"error\":\"slow down\"}",
        );
    }
    if content.contains("TRIGGER500") {
        return reply(
            &mut stream,
            "500 Internal Server Error",
            "",
            "{\"error\":\"boom\"}",
        );
    }
    if content.contains("TRIGGERMALFORMED") {
        return reply(&mut stream, "200 OK", "", "this is not json");
    }
    if content.contains("DELAY") {
        std::thread::sleep(Duration::from_millis(120));
    }
    if content.contains("TRIGGERSLOW") {
        std::thread::sleep(Duration::from_millis(1500));
        return reply(&mut stream, "200 OK", "", &completion("late"));
    }
    let text = if content.contains("#Evolved Instruction#") {
        // Evolve: the original instruction plus a constraint.
        let orig = content
            .split("#Original Instruction#")
            .nth(1)
            .and_then(|s| s.split("#Evolved Instruction#").next())
            .unwrap()
            .trim()
            .to_string();
        if orig.contains("LEAK") {
            format!("Rewritten prompt: {orig}")
        } else {
            format!("{orig} Answer in exactly three sentences.")
        }
    } else if content.contains("Reply with exactly \"Equal\" or \"Not Equal\"") {
        if content.contains("SAME") {
            "Equal".into()
        } else {
            "Not Equal".into()
        }
    } else if content.contains("REFUSE") {
        "I'm sorry, but I cannot help with that.".into()
    } else {
        format!(
            "Here is a detailed answer. {}",
            content.chars().rev().collect::<String>()
        )
    };
    reply(&mut stream, "200 OK", "", &completion(&text))
}

fn start_server() -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let auth = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let (r, a) = (requests.clone(), auth.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            r.fetch_add(1, Ordering::SeqCst);
            let (s, a) = (seen.clone(), a.clone());
            std::thread::spawn(move || handle(stream, s, a));
        }
    });
    Server {
        url,
        requests,
        auth,
    }
}

fn client(server: &Server, timeout_s: f64, retries: u32) -> OpenAiClient {
    OpenAiClient::new(OpenAiConfig {
        base_url: server.url.clone(),
        model: "test-model".into(),
        api_key_env: "BURNISH_TEST_EVOLVE_KEY".into(),
        timeout_s,
        max_retries: retries,
        backoff_s: 0.01,
        backoff_max_s: 0.05,
        ..Default::default()
    })
    .unwrap()
}

#[test]
fn http_client_retries_429_and_reports_500_malformed_and_timeout() {
    let server = start_server();
    let c = client(&server, 1.0, 2);

    // 429 (Retry-After: 0), then success: one retry.
    let before = server.requests.load(Ordering::SeqCst);
    let out = c.complete(&ChatRequest::user("hello TRIGGER429")).unwrap();
    assert!(out.starts_with("Here is a detailed answer."), "{out}");
    assert_eq!(server.requests.load(Ordering::SeqCst) - before, 2);

    // 500 every time: 1 try + 2 retries, then the status.
    let before = server.requests.load(Ordering::SeqCst);
    match c.complete(&ChatRequest::user("TRIGGER500")) {
        Err(BackendError::Http { status: 500, body }) => assert!(body.contains("boom")),
        other => panic!("{other:?}"),
    }
    assert_eq!(server.requests.load(Ordering::SeqCst) - before, 3);

    // A malformed body is not retried.
    let before = server.requests.load(Ordering::SeqCst);
    assert!(matches!(
        c.complete(&ChatRequest::user("TRIGGERMALFORMED")),
        Err(BackendError::Malformed(_))
    ));
    assert_eq!(server.requests.load(Ordering::SeqCst) - before, 1);

    // A slow reply hits the timeout (no retries here).
    let fast = client(&server, 0.3, 0);
    let t0 = Instant::now();
    assert!(matches!(
        fast.complete(&ChatRequest::user("TRIGGERSLOW")),
        Err(BackendError::Timeout(_))
    ));
    assert!(
        t0.elapsed() < Duration::from_millis(1400),
        "{:?}",
        t0.elapsed()
    );
}

fn seeds_file(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("seeds.jsonl");
    let rows = [
        serde_json::json!({"instruction": "Explain why the sky is blue.", "output": "Rayleigh scattering."}),
        serde_json::json!({"instruction": "Write a haiku about autumn leaves.", "output": "..."}),
        serde_json::json!({"instruction": "LEAK: describe a volcano.", "output": "..."}),
        serde_json::json!({"instruction": "REFUSE to list three prime numbers.", "output": "2, 3, 5"}),
        serde_json::json!({"instruction": "Sum the numbers TRIGGER500 from one to ten.", "output": "55"}),
    ];
    let body: String = rows.iter().map(|r| r.to_string() + "\n").collect();
    std::fs::write(&p, body).unwrap();
    p
}

/// Complete lines so far (a line being written may be cut).
fn read_lines_lenient(p: &std::path::Path) -> usize {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
        .count()
}

fn read_lines(p: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn cli_evolve_eliminates_keeps_lineage_resumes_and_never_logs_the_key() {
    let server = start_server();
    let tmp = tempfile::tempdir().unwrap();
    let seeds = seeds_file(tmp.path());
    let out = tmp.path().join("evolved.jsonl");
    let report = tmp.path().join("report.json");
    let args = [
        "data",
        "evolve",
        seeds.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--rounds",
        "2",
        "--backend",
        "openai",
        "--model",
        "test-model",
        "--base-url",
        &server.url,
        "--api-key-env",
        "BURNISH_TEST_EVOLVE_KEY",
        "--max-retries",
        "1",
        "--backoff",
        "0.01",
        "--timeout",
        "5",
        "--concurrency",
        "3",
        "--report",
        report.to_str().unwrap(),
    ];
    let run = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_burnish"))
            .args(args)
            .current_dir(root())
            .env("BURNISH_TEST_EVOLVE_KEY", "sk-test-secret-123")
            .output()
            .unwrap()
    };
    let first = run();
    let (so, se) = (
        String::from_utf8_lossy(&first.stdout).to_string(),
        String::from_utf8_lossy(&first.stderr).to_string(),
    );
    // The TRIGGER500 row fails (retried next run): the command says so and exits non-zero.
    assert!(!first.status.success(), "{so}{se}");
    assert!(se.contains("failed") && se.contains("http_500"), "{se}");
    assert!(!so.contains("sk-test-secret") && !se.contains("sk-test-secret"));
    assert!(server
        .auth
        .lock()
        .unwrap()
        .iter()
        .all(|a| a == "Bearer sk-test-secret-123"));

    let rows = read_lines(&out);
    let gone = read_lines(&tmp.path().join("evolved.eliminated.jsonl"));
    let rep: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    // Sky and haiku evolve twice each; the leak is eliminated in both rounds; the refusal's
    // answers are eliminated in both rounds.
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert_eq!(rep["evolved"], 4);
    assert_eq!(rep["eliminated"]["copied_prompt"], 2, "{rep}");
    assert_eq!(rep["eliminated"]["refusal"], 2, "{rep}");
    assert_eq!(gone.len(), 4);
    for r in &rows {
        let root_id = r["root_id"].as_str().unwrap();
        assert!(root_id.ends_with("seeds.jsonl:1") || root_id.ends_with("seeds.jsonl:2"));
        let round = r["round"].as_u64().unwrap();
        let expect_parent = if round == 1 {
            root_id.to_string()
        } else {
            format!("{root_id}#r1")
        };
        assert_eq!(r["parent_id"], expect_parent.as_str());
        assert_eq!(r["messages"][0]["role"], "user");
        assert_eq!(r["messages"][1]["role"], "assistant");
        let instr = r["messages"][0]["content"].as_str().unwrap();
        assert_eq!(
            instr.matches("three sentences").count() as u64,
            round,
            "{instr}"
        );
        assert!(r["operation"].is_string());
    }
    // The output reads back as training data.
    let inspect = ok(&["data", "inspect", out.to_str().unwrap()]);
    assert!(
        inspect.contains("format:   openai") && inspect.contains("4 kept"),
        "{inspect}"
    );

    // A rerun only retries the failed row; then everything is done and nothing is asked.
    let before = server.requests.load(Ordering::SeqCst);
    let second = run();
    assert!(!second.status.success());
    let asked = server.requests.load(Ordering::SeqCst) - before;
    assert_eq!(asked, 2, "only the TRIGGER500 row's first call (+1 retry)");
    assert_eq!(read_lines(&out).len(), 4);
}

#[test]
fn ctrl_c_stops_evolve_without_losing_rows_and_a_rerun_finishes() {
    let server = start_server();
    let tmp = tempfile::tempdir().unwrap();
    let seeds = tmp.path().join("seeds.jsonl");
    let body: String = (0..8)
        .map(|i| format!("{{\"instruction\": \"DELAY task number {i}: describe a river.\", \"output\": \"ok\"}}\n"))
        .collect();
    std::fs::write(&seeds, body).unwrap();
    let out = tmp.path().join("e.jsonl");
    let args = [
        "data",
        "evolve",
        seeds.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--backend",
        "openai",
        "--model",
        "m",
        "--base-url",
        &server.url,
        "--concurrency",
        "1",
        "--backoff",
        "0.01",
    ];
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_burnish"))
        .args(args)
        .current_dir(root())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt once the first row is on disk (each row takes 3 slow requests).
    let t0 = Instant::now();
    while read_lines_lenient(&out) == 0 && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let killed = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let first = child.wait_with_output().unwrap();
    assert_eq!(
        first.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(String::from_utf8_lossy(&first.stdout).contains("(interrupted)"));
    let done = read_lines(&out).len();
    assert!((1..8).contains(&done), "{done} rows before Ctrl-C");
    // Every line written is whole; the rerun adds exactly the missing rows.
    ok(&args);
    let rows = read_lines(&out);
    assert_eq!(rows.len(), 8);
    let roots: std::collections::HashSet<&str> = rows
        .iter()
        .map(|r| r["root_id"].as_str().unwrap())
        .collect();
    assert_eq!(roots.len(), 8);
}

#[test]
fn cli_evolve_with_the_local_backend_on_a_tiny_model() {
    let tmp = tempfile::tempdir().unwrap();
    let model = new_tiny_model(&tmp.path().join("tiny"), 5);
    let backend = ["--backend", "local", "--model", model.to_str().unwrap()];
    let (stdout, rep, out) = common::evolve_two_seeds(tmp.path(), &backend);
    assert!(stdout.contains("via local:"), "{stdout}");
    let evolved = rep["evolved"].as_u64().unwrap();
    assert_eq!(read_lines(&out).len() as u64, evolved);
    let seeds = tmp.path().join("s.jsonl");

    // The same model as `data prepare` stages: local evolve and semantic dedup by its
    // mean-pooled hidden states, in one recipe.
    let recipe = tmp.path().join("r.toml");
    std::fs::write(
        &recipe,
        format!(
            r#"[model]
path = "{model}"

[data]
files = ["{seeds}"]
eval_fraction = 0.0
cache_dir = "{cache}"

[data.dedup]
methods = ["exact", "semantic"]

[data.dedup.semantic]
model = "{model}"
threshold = 0.9999

[data.evolve]
backend = "local"
out = "{out}"

[data.evolve.local]
model = "{model}"
max_new_tokens = 8

[data.evolve.eliminate]
info_gain = "none"
min_answer_words = 0
"#,
            model = model.display(),
            seeds = seeds.display(),
            cache = tmp.path().join("cache").display(),
            out = tmp.path().join("prep-evolved.jsonl").display(),
        ),
    )
    .unwrap();
    let stdout = ok(&["data", "prepare", "--recipe", recipe.to_str().unwrap()]);
    assert!(stdout.contains("dedup    semantic"), "{stdout}");
    assert!(stdout.contains("mean-pooled hidden states"), "{stdout}");
    assert!(
        stdout.contains("evolve   2 seeds x 1 rounds via local:"),
        "{stdout}"
    );
}

#[test]
fn prepare_runs_the_evolve_stage_and_reuses_its_output() {
    let server = start_server();
    let tmp = tempfile::tempdir().unwrap();
    let seeds = tmp.path().join("seeds.jsonl");
    std::fs::write(
        &seeds,
        "{\"instruction\": \"Explain why the sky is blue.\", \"output\": \"Rayleigh scattering makes it so.\"}\n{\"instruction\": \"Give two uses of copper.\", \"output\": \"Wires and pipes.\"}\n",
    )
    .unwrap();
    let evolved = tmp.path().join("evolved.jsonl");
    let recipe = tmp.path().join("r.toml");
    std::fs::write(
        &recipe,
        format!(
            r#"[model]
path = "assets/tokenizers/phi3_vision"

[data]
files = ["{}"]
eval_fraction = 0.0
cache_dir = "{}"

[data.evolve]
rounds = 1
out = "{}"

[data.evolve.openai]
base_url = "{}"
model = "m"
backoff_s = 0.01

[data.evolve.eliminate]
info_gain = "similarity"
"#,
            seeds.display(),
            tmp.path().join("cache").display(),
            evolved.display(),
            server.url
        ),
    )
    .unwrap();
    let stdout = ok(&["data", "prepare", "--recipe", recipe.to_str().unwrap()]);
    assert!(stdout.contains("evolve   2 seeds x 1 rounds"), "{stdout}");
    assert!(stdout.contains("split    4 train"), "{stdout}");
    assert_eq!(read_lines(&evolved).len(), 2);
    // Same recipe again: the cache entry is reused, the server is not asked.
    let before = server.requests.load(Ordering::SeqCst);
    let again = burnish(&["data", "prepare", "--recipe", recipe.to_str().unwrap()]);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("reused"));
    assert_eq!(server.requests.load(Ordering::SeqCst), before);
}
