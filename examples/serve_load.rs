//! Load generator for `burnish serve` (its own client; see scripts/bench/serve_load.sh):
//! `--clients` threads each send chat requests back to back for `--seconds`, then it prints
//! requests/s, new tokens/s, p50/p99 latency, failures, and the server's CPU use and memory
//! over the run (sampled from /proc every 250 ms when `--pid` is given).
//!
//!   cargo run --release --example serve_load -- --url http://127.0.0.1:8000/v1 --model NAME
//!       [--clients 64] [--seconds 60] [--max-tokens 32] [--pid PID] [--out result.json]

use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Opts {
    url: String,
    model: String,
    clients: usize,
    seconds: f64,
    max_tokens: usize,
    pid: Option<u32>,
    out: Option<String>,
}

fn opts() -> Opts {
    let mut o = Opts {
        url: "http://127.0.0.1:8000/v1".into(),
        model: String::new(),
        clients: 64,
        seconds: 60.0,
        max_tokens: 32,
        pid: None,
        out: None,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let v = pair.get(1).cloned().unwrap_or_default();
        match pair[0].as_str() {
            "--url" => o.url = v,
            "--model" => o.model = v,
            "--clients" => o.clients = v.parse().expect("--clients N"),
            "--seconds" => o.seconds = v.parse().expect("--seconds S"),
            "--max-tokens" => o.max_tokens = v.parse().expect("--max-tokens N"),
            "--pid" => o.pid = Some(v.parse().expect("--pid PID")),
            "--out" => o.out = Some(v),
            other => panic!("unknown option {other}"),
        }
    }
    assert!(!o.model.is_empty(), "--model NAME is required");
    o
}

const PROMPTS: &[&str] = &[
    "Write a short poem about the sea.",
    "Explain why the sky is blue.",
    "List three uses of a paperclip.",
    "What is the capital of France? Answer in one sentence.",
    "Summarise the plot of a heist film you invent.",
    "Give me a recipe for pancakes.",
    "Translate 'good morning' into Spanish and German.",
    "Describe a cat to someone who has never seen one.",
];

#[derive(Default)]
struct Tally {
    latencies: Vec<f64>,
    tokens: u64,
    failures: u64,
    errors: Vec<String>,
}

/// (user+system CPU seconds, RSS in MB) of a process.
fn proc_sample(pid: u32) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    let ticks = 100.0; // sysconf(_SC_CLK_TCK) on Linux
    let cpu = (fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?) / ticks;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((cpu, rss_kb / 1024.0))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let o = opts();
    let url = format!("{}/chat/completions", o.url.trim_end_matches('/'));
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let start = Instant::now();
    let before = o.pid.and_then(proc_sample);
    let rss = Arc::new(Mutex::new(Vec::<(f64, f64)>::new()));
    let sampler = o.pid.map(|pid| {
        let (stop, rss) = (stop.clone(), rss.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                if let Some((_, mb)) = proc_sample(pid) {
                    rss.lock()
                        .unwrap()
                        .push((start.elapsed().as_secs_f64(), mb));
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        })
    });
    let clients: Vec<_> = (0..o.clients)
        .map(|c| {
            let (url, model, stop, tally) =
                (url.clone(), o.model.clone(), stop.clone(), tally.clone());
            let max_tokens = o.max_tokens;
            std::thread::spawn(move || {
                let agent = ureq::AgentBuilder::new()
                    .timeout(Duration::from_secs(600))
                    .build();
                let mut i = c;
                while !stop.load(Ordering::SeqCst) {
                    let body = json!({
                        "model": model,
                        "messages": [{"role": "user", "content": PROMPTS[i % PROMPTS.len()]}],
                        "max_tokens": max_tokens,
                        "temperature": 1.0,
                        "seed": i,
                        "ignore_eos": true,
                    });
                    // Each client walks the prompts (and seeds) from its own offset.
                    i += 7;
                    let t = Instant::now();
                    let res = agent.post(&url).send_string(&body.to_string());
                    let secs = t.elapsed().as_secs_f64();
                    let mut tl = tally.lock().unwrap();
                    match res.map(|r| r.into_string()) {
                        Ok(Ok(text)) => {
                            let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                            tl.latencies.push(secs);
                            tl.tokens += v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
                        }
                        Ok(Err(e)) => {
                            tl.failures += 1;
                            tl.errors.push(e.to_string());
                        }
                        Err(e) => {
                            tl.failures += 1;
                            tl.errors.push(e.to_string());
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(o.seconds));
    stop.store(true, Ordering::SeqCst);
    let measured = start.elapsed().as_secs_f64();
    let after = o.pid.and_then(proc_sample);
    for c in clients {
        let _ = c.join();
    }
    if let Some(s) = sampler {
        let _ = s.join();
    }
    let wall = start.elapsed().as_secs_f64();
    let t = tally.lock().unwrap();
    let mut lat = t.latencies.clone();
    lat.sort_by(f64::total_cmp);
    let rss = rss.lock().unwrap();
    let third = |k: usize| -> f64 {
        let n = rss.len();
        let part: Vec<f64> = rss[k * n / 3..(k + 1) * n / 3]
            .iter()
            .map(|x| x.1)
            .collect();
        part.iter().copied().fold(f64::NAN, f64::max)
    };
    let cpu_pct = match (before, after) {
        (Some(b), Some(a)) => 100.0 * (a.0 - b.0) / measured,
        _ => f64::NAN,
    };
    let result = json!({
        "clients": o.clients,
        "seconds": wall,
        "requests": lat.len(),
        "failed": t.failures,
        "requests_per_s": lat.len() as f64 / wall,
        "new_tokens_per_s": t.tokens as f64 / wall,
        "latency_p50_s": percentile(&lat, 0.5),
        "latency_p99_s": percentile(&lat, 0.99),
        "server_cpu_percent": cpu_pct,
        "server_rss_max_mb_by_third": [third(0), third(1), third(2)],
        "first_errors": t.errors.iter().take(3).collect::<Vec<_>>(),
    });
    println!("{}", serde_json::to_string_pretty(&result).unwrap());
    if let Some(path) = o.out {
        std::fs::write(&path, result.to_string()).expect("write --out");
    }
}
