//! `burnish serve` on loopback: answers equal `burnish generate` token for token (streamed
//! or not, chat or text), requests joining a running batch get the answers they get alone,
//! adapters are chosen by model name, bad requests get OpenAI-shaped 4xx errors while the
//! server keeps serving, Evol-Instruct and distillation run against it, the queue and the
//! timeout answer 429 and 408, and SIGTERM lets the request in flight finish.

mod common;

use common::{new_tiny_model, ok};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(model: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_burnish"))
            .args(["serve", "--model", model.to_str().unwrap(), "--port", "0"])
            .args(extra)
            .current_dir(common::root())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| {
                let mut err = String::new();
                std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
                panic!("serve did not start: {line}{err}")
            })
            .to_string();
        Self { child, url }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// (status, JSON body) of one request; every answer must be JSON.
fn call(method: &str, url: &str, body: Option<&str>, key: Option<&str>) -> (u16, Value) {
    let mut req = ureq::request(method, url).timeout(Duration::from_secs(120));
    if let Some(k) = key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    let res = match body {
        Some(b) => req.send_string(b),
        None => req.call(),
    };
    let resp = match res {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {url}: {e}"),
    };
    let status = resp.status();
    let text = resp.into_string().unwrap();
    let v = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{status} {text:?} is not JSON: {e}"));
    (status, v)
}

fn post(server: &Server, path: &str, body: &Value) -> (u16, Value) {
    call(
        "POST",
        &format!("{}{path}", server.url),
        Some(&body.to_string()),
        None,
    )
}

/// The concatenated deltas, finish reasons and usage of a streamed request.
fn stream(server: &Server, path: &str, body: &Value) -> (Vec<String>, Vec<String>, Option<Value>) {
    let resp = ureq::post(&format!("{}{path}", server.url))
        .send_string(&body.to_string())
        .unwrap();
    assert_eq!(resp.header("content-type"), Some("text/event-stream"));
    let mut texts = vec![String::new(); body["n"].as_u64().unwrap_or(1) as usize];
    let mut finishes = vec![String::new(); texts.len()];
    let mut usage = None;
    let mut done = false;
    for line in BufReader::new(resp.into_reader()).lines() {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            break;
        }
        let chunk: Value = serde_json::from_str(data).unwrap();
        assert!(chunk.get("error").is_none(), "{chunk}");
        if let Some(u) = chunk.get("usage") {
            usage = Some(u.clone());
        }
        for c in chunk["choices"].as_array().unwrap() {
            let i = c["index"].as_u64().unwrap() as usize;
            let piece = c["delta"]["content"].as_str().or(c["text"].as_str());
            texts[i].push_str(piece.unwrap_or(""));
            if let Some(f) = c["finish_reason"].as_str() {
                finishes[i] = f.to_string();
            }
        }
    }
    assert!(done, "the stream ends with [DONE]");
    (texts, finishes, usage)
}

fn generate(model: &Path, how: &[&str], max: usize, temperature: f32, seed: u64) -> String {
    let mut args = vec!["generate", "--model", model.to_str().unwrap()];
    args.extend_from_slice(how);
    let (max, t, s) = (max.to_string(), temperature.to_string(), seed.to_string());
    args.extend_from_slice(&["--max-new-tokens", &max, "--temperature", &t, "--seed", &s]);
    let out = ok(&args);
    out.strip_suffix('\n').unwrap_or(&out).to_string()
}

fn chat_body(model: &str, text: &str, max: usize, temperature: f32, seed: u64) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": text}],
           "max_tokens": max, "temperature": temperature, "seed": seed})
}

fn content(v: &Value, i: usize) -> String {
    v["choices"][i]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

fn tiny(tmp: &Path, seed: u64) -> PathBuf {
    new_tiny_model(&tmp.join("tiny"), seed)
}

#[test]
fn answers_equal_generate_streamed_or_not_alone_or_in_a_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny(tmp.path(), 3);
    let server = Server::start(&model, &["--max-batch", "4"]);
    let (status, models) = call("GET", &format!("{}/models", server.url), None, None);
    assert_eq!(status, 200);
    assert_eq!(models["data"][0]["id"], "tiny");

    let prompts = [
        "Hello there",
        "Name a colour.",
        "Count to three, slowly please.",
        "Why?",
    ];
    for (i, p) in prompts.iter().enumerate() {
        for (temperature, seed) in [(0.0, 0), (1.0, 5 + i as u64)] {
            let want = generate(&model, &["--chat", p], 16, temperature, seed);
            let body = chat_body("tiny", p, 16, temperature, seed);
            let (status, got) = post(&server, "/chat/completions", &body);
            assert_eq!(status, 200, "{got}");
            assert_eq!(content(&got, 0), want, "chat {p:?} t={temperature}");
            assert_eq!(got["object"], "chat.completion");
            assert!(got["usage"]["completion_tokens"].as_u64().unwrap() <= 16);
            let mut streamed = body.clone();
            streamed["stream"] = json!(true);
            streamed["stream_options"] = json!({"include_usage": true});
            let (texts, finishes, usage) = stream(&server, "/chat/completions", &streamed);
            assert_eq!(texts[0], want, "streamed chat {p:?}");
            assert_eq!(
                finishes[0],
                got["choices"][0]["finish_reason"].as_str().unwrap()
            );
            assert_eq!(usage.unwrap(), got["usage"]);

            let want = generate(&model, &["--prompt", p], 12, temperature, seed);
            let body = json!({"model": "tiny", "prompt": p, "max_tokens": 12,
                              "temperature": temperature, "seed": seed});
            let (_, got) = post(&server, "/completions", &body);
            assert_eq!(got["choices"][0]["text"], want, "text {p:?}");
            let mut streamed = body.clone();
            streamed["stream"] = json!(true);
            assert_eq!(stream(&server, "/completions", &streamed).0[0], want);
        }
    }

    // A stop string cuts the answer before it, as `generate --stop` does.
    let free = content(
        &post(
            &server,
            "/chat/completions",
            &chat_body("tiny", "Hi", 24, 1.0, 9),
        )
        .1,
        0,
    );
    let stop: String = free.chars().skip(6).take(3).collect();
    if !stop.trim().is_empty() {
        let mut body = chat_body("tiny", "Hi", 24, 1.0, 9);
        body["stop"] = json!([stop]);
        let (_, got) = post(&server, "/chat/completions", &body);
        let want = generate(&model, &["--chat", "Hi", "--stop", &stop], 24, 1.0, 9);
        assert_eq!(content(&got, 0), want);
        assert_eq!(got["choices"][0]["finish_reason"], "stop");
    }

    // Twelve requests at once over four slots: each joins the running batch when a slot
    // frees up, and gets what it got alone.
    let bodies: Vec<Value> = (0..12)
        .map(|i| chat_body("tiny", prompts[i % 4], 10 + 3 * i, 1.0, 100 + i as u64))
        .collect();
    let alone: Vec<String> = bodies
        .iter()
        .map(|b| content(&post(&server, "/chat/completions", b).1, 0))
        .collect();
    let together: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = bodies
            .iter()
            .map(|b| s.spawn(|| content(&post(&server, "/chat/completions", b).1, 0)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(together, alone);
    assert!(alone.iter().any(|t| !t.is_empty()), "{alone:?}");

    // n samples of one prompt share its prefill and one random stream.
    let mut body = chat_body("tiny", "Hello there", 8, 1.0, 7);
    body["n"] = json!(3);
    let (status, got) = post(&server, "/chat/completions", &body);
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["choices"].as_array().unwrap().len(), 3);
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (texts, _, _) = stream(&server, "/chat/completions", &streamed);
    assert_eq!(texts, (0..3).map(|i| content(&got, i)).collect::<Vec<_>>());
}

#[test]
fn adapters_are_chosen_by_model_name_in_one_batch() {
    use burn::prelude::*;
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny(tmp.path(), 4);
    // A LoRA adapter with a random B (a fresh one is the identity), saved as PEFT does.
    let dev = Default::default();
    let (_, base) = models::checkpoint::load_model::<models::backend::Cpu>(&model, &dev).unwrap();
    let settings = models::lora::LoraSettings {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: vec!["all-linear".into()],
        use_rslora: false,
        use_dora: false,
    };
    let mut tuned = base.with_lora(&settings, 1).unwrap();
    for (_, _, p) in tuned.linear_layers_mut() {
        let l = p.lora.as_mut().unwrap();
        let b = Tensor::random(
            l.b.dims(),
            burn::tensor::Distribution::Uniform(-0.3, 0.3),
            &dev,
        );
        *l = models::lora::LoraAdapter::from_tensors(l.a.val(), b, &settings);
    }
    let adapter = tmp.path().join("style");
    checkpoints::peft::save_adapter(
        &tuned,
        &settings,
        model.to_str().unwrap(),
        &adapter,
        models::weights::DiskDtype::F32,
    )
    .unwrap();
    let merged = tmp.path().join("merged");
    ok(&[
        "export",
        adapter.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
        "--merge",
    ]);

    let server = Server::start(
        &model,
        &["--adapter", &format!("style={}", adapter.display())],
    );
    let (_, models) = call("GET", &format!("{}/models", server.url), None, None);
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["tiny", "style"]);
    let want_base = generate(&model, &["--chat", "Hello there"], 16, 1.0, 3);
    let want_style = generate(&merged, &["--chat", "Hello there"], 16, 1.0, 3);
    assert_ne!(want_base, want_style, "the adapter changes the answer");
    let got: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = ["tiny", "style", "tiny", "style"]
            .iter()
            .map(|name| {
                let server = &server;
                s.spawn(move || {
                    content(
                        &post(
                            server,
                            "/chat/completions",
                            &chat_body(name, "Hello there", 16, 1.0, 3),
                        )
                        .1,
                        0,
                    )
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        got,
        [&want_base, &want_style, &want_base, &want_style].map(String::clone)
    );
}

#[test]
fn fifty_bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny(tmp.path(), 5);
    std::env::set_var("BURNISH_TEST_SERVE_KEY", "sekrit");
    let server = Server::start(
        &model,
        &[
            "--max-batch",
            "2",
            "--max-model-len",
            "256",
            "--max-body-bytes",
            "4096",
            "--api-key-env",
            "BURNISH_TEST_SERVE_KEY",
        ],
    );
    let key = Some("sekrit");
    let msg = |s: &str| json!([{"role": "user", "content": s}]);
    let good = json!({"model": "tiny", "messages": msg("hi"), "max_tokens": 4});
    let with = |k: &str, v: Value| {
        let mut b = good.clone();
        b[k] = v;
        b.to_string()
    };
    let without = |k: &str| {
        let mut b = good.clone();
        b.as_object_mut().unwrap().remove(k);
        b.to_string()
    };
    let chat = "/chat/completions";
    let mut bad: Vec<(&str, &str, String, Option<&str>, u16)> = vec![
        ("POST", chat, "{".into(), key, 400),
        ("POST", chat, "{\"model\": \"tiny\",}".into(), key, 400),
        ("POST", chat, "not json at all".into(), key, 400),
        ("POST", chat, "".into(), key, 400),
        ("POST", chat, "[1, 2]".into(), key, 400),
        ("POST", chat, "null".into(), key, 400),
        ("POST", chat, "\"text\"".into(), key, 400),
        ("POST", chat, "{\"messages\": [}".into(), key, 400),
        ("POST", chat, "\u{0}\u{1}".into(), key, 400),
        ("POST", chat, with("model", json!(7)), key, 400),
        ("POST", chat, without("model"), key, 400),
        ("POST", chat, with("model", json!("nope")), key, 404),
        ("POST", chat, with("messages", json!([])), key, 400),
        ("POST", chat, without("messages"), key, 400),
        ("POST", chat, with("messages", json!("hi")), key, 400),
        (
            "POST",
            chat,
            with("messages", json!([{"role": "user"}])),
            key,
            400,
        ),
        (
            "POST",
            chat,
            with("messages", json!([{"content": "x"}])),
            key,
            400,
        ),
        (
            "POST",
            chat,
            with("messages", json!([{"role": "robot", "content": "x"}])),
            key,
            400,
        ),
        (
            "POST",
            chat,
            with("messages", json!([{"role": "tool", "content": "x"}])),
            key,
            400,
        ),
        (
            "POST",
            chat,
            with("messages", json!([{"role": "user", "content": 5}])),
            key,
            400,
        ),
        (
            "POST",
            chat,
            with(
                "messages",
                json!([{"role": "user", "content": [{"type": "image_url"}]}]),
            ),
            key,
            400,
        ),
        ("POST", chat, with("max_tokens", json!(1_000_000)), key, 400),
        ("POST", chat, with("max_tokens", json!(0)), key, 400),
        ("POST", chat, with("max_tokens", json!(-3)), key, 400),
        ("POST", chat, with("max_tokens", json!("ten")), key, 400),
        ("POST", chat, with("max_tokens", json!(1.5)), key, 400),
        ("POST", chat, with("temperature", json!("hot")), key, 400),
        ("POST", chat, with("temperature", json!(-1)), key, 400),
        ("POST", chat, with("temperature", json!(9)), key, 400),
        ("POST", chat, with("top_p", json!(0)), key, 400),
        ("POST", chat, with("top_p", json!(2)), key, 400),
        ("POST", chat, with("top_k", json!(-5)), key, 400),
        ("POST", chat, with("n", json!(0)), key, 400),
        ("POST", chat, with("n", json!(3)), key, 400),
        ("POST", chat, with("n", json!("two")), key, 400),
        ("POST", chat, with("stop", json!(5)), key, 400),
        (
            "POST",
            chat,
            with("stop", json!(["a", "b", "c", "d", "e"])),
            key,
            400,
        ),
        ("POST", chat, with("stream", json!("yes")), key, 400),
        ("POST", chat, with("seed", json!("x")), key, 400),
        (
            "POST",
            chat,
            with("tools", json!([{"type": "function"}])),
            key,
            400,
        ),
        ("POST", chat, with("logprobs", json!(true)), key, 400),
        (
            "POST",
            chat,
            with("messages", msg(&"long ".repeat(300))),
            key,
            400,
        ),
        (
            "POST",
            chat,
            with("messages", msg(&"x".repeat(5000))),
            key,
            413,
        ),
        ("POST", chat, good.to_string(), None, 401),
        ("POST", chat, good.to_string(), Some("wrong"), 401),
        ("GET", chat, String::new(), key, 405),
        ("POST", "/v1/nowhere", good.to_string(), key, 404),
        (
            "POST",
            "/completions",
            json!({"model": "tiny", "max_tokens": 4}).to_string(),
            key,
            400,
        ),
        (
            "POST",
            "/completions",
            json!({"model": "tiny", "prompt": ["a", "b"]}).to_string(),
            key,
            400,
        ),
        (
            "POST",
            "/completions",
            json!({"model": "tiny", "prompt": [999999999]}).to_string(),
            key,
            400,
        ),
    ];
    assert_eq!(bad.len(), 50);
    for (i, (method, path, body, k, want)) in bad.drain(..).enumerate() {
        let url = match path.strip_prefix("/v1") {
            Some(_) => format!("{}{}", server.url.trim_end_matches("/v1"), path),
            None => format!("{}{path}", server.url),
        };
        let body = (method == "POST").then_some(body.as_str());
        let (status, v) = call(method, &url, body, k);
        assert_eq!(status, want, "bad request {i}: {v}");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(!message.is_empty(), "bad request {i}: {v}");
        assert!(v["error"]["type"].is_string(), "{v}");
        let (status, v) = call(
            "POST",
            &format!("{}{chat}", server.url),
            Some(&good.to_string()),
            key,
        );
        assert_eq!(status, 200, "after bad request {i}: {v}");
    }
    let (status, h) = call(
        "GET",
        &format!("{}/health", server.url.trim_end_matches("/v1")),
        None,
        None,
    );
    assert_eq!((status, h["status"].as_str()), (200, Some("ok")));
}

#[test]
fn evolve_and_distill_run_against_the_server() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny(tmp.path(), 6);
    let server = Server::start(&model, &[]);
    let backend = [
        "--backend",
        "openai",
        "--base-url",
        &server.url,
        "--model",
        "tiny",
    ];
    let (stdout, _, _) = common::evolve_two_seeds(tmp.path(), &backend);
    assert!(stdout.contains("via openai"), "{stdout}");
    let seeds = tmp.path().join("s.jsonl");

    let sft = tmp.path().join("sft.jsonl");
    ok(&[
        "data",
        "distill",
        "--teacher",
        &format!("openai:{}", server.url),
        "--model-name",
        "tiny",
        "--input",
        seeds.to_str().unwrap(),
        "--out",
        sft.to_str().unwrap(),
        "--max-new-tokens",
        "12",
        "--temperature",
        "1",
    ]);
    let rows = std::fs::read_to_string(&sft).unwrap();
    let rows: Vec<Value> = rows
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    for row in &rows {
        assert!(
            row["lineage"]["teacher"]
                .as_str()
                .unwrap()
                .starts_with("openai:"),
            "{row}"
        );
    }
}

#[test]
fn a_full_queue_answers_429_a_slow_request_408_and_sigterm_finishes_in_flight_work() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny(tmp.path(), 7);
    let long = |n: usize| {
        let mut b = chat_body("tiny", "Tell me a story", n, 1.0, 1);
        b["ignore_eos"] = json!(true);
        b
    };

    let server = Server::start(&model, &["--max-batch", "1", "--queue", "1"]);
    let statuses: Vec<(u16, Value)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|_| s.spawn(|| post(&server, "/chat/completions", &long(400))))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let limited: Vec<&Value> = statuses
        .iter()
        .filter(|(s, _)| *s == 429)
        .map(|(_, v)| v)
        .collect();
    assert!(
        !limited.is_empty(),
        "8 requests at once over 1 slot and a queue of 1"
    );
    assert!(limited
        .iter()
        .all(|v| v["error"]["code"] == "rate_limit_exceeded"));
    assert!(statuses.iter().all(|(s, _)| *s == 200 || *s == 429));
    drop(server);

    let server = Server::start(&model, &["--request-timeout", "0.001"]);
    let (status, v) = post(&server, "/chat/completions", &long(400));
    assert_eq!(status, 408, "{v}");
    drop(server);

    let mut server = Server::start(&model, &["--max-model-len", "2048"]);
    let url = server.url.clone();
    let mut streamed = long(1900);
    streamed["stream"] = json!(true);
    let resp = ureq::post(&format!("{url}/chat/completions"))
        .send_string(&streamed.to_string())
        .unwrap();
    let mut lines = BufReader::new(resp.into_reader()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.starts_with("data: "), "{first}");
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    let asked = Instant::now();
    // New work is refused while the request in flight runs to its end.
    std::thread::sleep(Duration::from_millis(200));
    let refused = ureq::post(&format!("{url}/chat/completions")).send_string(&long(4).to_string());
    assert!(refused.is_err(), "a request after SIGTERM is refused");
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    assert_eq!(
        rest.iter()
            .rev()
            .find(|l| !l.is_empty())
            .map(String::as_str),
        Some("data: [DONE]")
    );
    assert!(rest
        .iter()
        .any(|l| l.contains("\"finish_reason\":\"length\"")
            || l.contains("\"finish_reason\":\"stop\"")));
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(asked.elapsed() < Duration::from_secs(60));
}
