//! End-to-end: `burnish launch` runs a two-process data-parallel job on loopback (through
//! burn-collective's global level) that matches two replicas in one process; a killed rank,
//! a stalled rank and Ctrl-C all end the job promptly, with the watchdog's message.

mod common;

use common::root;
use std::io::Read;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A base port with the next few free too (orchestrator, coordinator, data ports).
fn free_ports() -> u16 {
    for _ in 0..100 {
        let base = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if base < 60000 && (0..5).all(|i| TcpListener::bind(("0.0.0.0", base + i)).is_ok()) {
            return base;
        }
    }
    panic!("no free ports");
}

/// `train` on the quickstart recipe, its model (built by rank 0), cache and run under `dir`.
fn train_args(dir: &Path, out: &str, extra: &[&str]) -> Vec<String> {
    let p = |s: &str| dir.join(s).display().to_string();
    let mut args: Vec<String> = ["train", "--recipe", "recipes/quickstart.toml"]
        .map(String::from)
        .to_vec();
    let sets = [
        format!("model.path=\"{}\"", p("model")),
        format!("data.cache_dir=\"{}\"", p("cache")),
        format!("train.output_dir=\"{}\"", p(out)),
        "train.per_device_train_batch_size=8".into(),
        "train.max_steps=5".into(),
        "train.eval_steps=5".into(),
        "train.sample_prompts=[]".into(),
    ];
    for s in sets {
        args.extend(["--set".to_string(), s]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn launch(dir: &Path, out: &str, env: &[(&str, &str)], train_extra: &[&str]) -> (Output, Duration) {
    let port = free_ports().to_string();
    let mut args: Vec<String> = [
        "launch",
        "--nproc-per-node",
        "2",
        "--master-port",
        &port,
        "--",
    ]
    .map(String::from)
    .to_vec();
    args.extend(train_args(dir, out, train_extra));
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_burnish"))
        .args(&args)
        .envs(env.iter().copied())
        .current_dir(root())
        .output()
        .unwrap();
    (out, started.elapsed())
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["loss"].as_f64())
        .collect()
}

#[test]
fn two_processes_on_loopback_train_exactly_as_two_replicas_in_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, _) = launch(tmp.path(), "launched", &[], &[]);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    // Only rank 0 talks and writes.
    assert!(
        all.contains("[rank0] /") && !all.contains("[rank1] /"),
        "{all}"
    );
    let run = tmp.path().join("launched");
    assert!(run.join("final/model.safetensors").exists());
    let state = std::fs::read_to_string(run.join("step-000005/trainer_state.json")).unwrap();
    assert!(state.contains("\"world_size\": 2"), "{state}");

    let args = train_args(tmp.path(), "threads", &["--devices", "cpu,cpu"]);
    let o = Command::new(env!("CARGO_BIN_EXE_burnish"))
        .args(&args)
        .current_dir(root())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let (a, b) = (losses(&run), losses(&tmp.path().join("threads")));
    assert_eq!(a.len(), 5);
    assert_eq!(a, b, "processes vs threads");
}

#[test]
fn a_killed_rank_ends_the_job_with_its_exit_code_and_the_watchdogs_message() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, took) = launch(
        tmp.path(),
        "run",
        &[("BURNISH_FAULT_INJECT", "kill:1:2")],
        &[],
    );
    let all = text(&out);
    assert_eq!(out.status.code(), Some(137), "{all}");
    assert!(took < Duration::from_secs(90), "took {took:?}");
    for needle in [
        "rank 1 (pid",
        "killed by signal 9 (SIGKILL) first",
        "[rank0] error: watchdog: rank 1 died",
        "last seen at step 1, all_reduce(gradients)",
        "rank 0 was in all_reduce(gradients) at step 2",
    ] {
        assert!(all.contains(needle), "`{needle}` not in:\n{all}");
    }
}

#[test]
fn a_stalled_rank_trips_the_watchdog_on_every_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, took) = launch(
        tmp.path(),
        "run",
        &[("BURNISH_FAULT_INJECT", "stall:1:2")],
        &["--collective-timeout", "3"],
    );
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(took < Duration::from_secs(90), "took {took:?}");
    let msg = "watchdog: all_reduce(gradients) at step 2 timed out after 3s on rank 0: rank 1 did not arrive (last seen at step 1, all_reduce(gradients))";
    assert!(all.contains(&format!("[rank0] error: {msg}")), "{all}");
    // The stalled rank is told too, and stops.
    assert!(all.contains(&format!("[rank1] error: {msg}")), "{all}");
}

#[test]
fn ctrl_c_stops_every_rank_at_the_same_step_with_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_ports().to_string();
    let mut args: Vec<String> = [
        "launch",
        "--nproc-per-node",
        "2",
        "--master-port",
        &port,
        "--",
    ]
    .map(String::from)
    .to_vec();
    args.extend(train_args(
        tmp.path(),
        "run",
        &["--set", "train.max_steps=100000"],
    ));
    let mut child = Command::new(env!("CARGO_BIN_EXE_burnish"))
        .args(&args)
        .current_dir(root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let metrics = tmp.path().join("run/metrics.jsonl");
    let started = Instant::now();
    while losses_if_any(&metrics) < 2 {
        assert!(started.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(100));
    }
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    let err = reader.join().unwrap();
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(err.contains("[rank0] interrupted after step"), "{err}");
    let ckpts: Vec<_> = std::fs::read_dir(tmp.path().join("run"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("step-"))
        .collect();
    assert_eq!(ckpts.len(), 1, "{err}");
}

fn losses_if_any(metrics: &Path) -> usize {
    std::fs::read_to_string(metrics)
        .map(|t| t.lines().filter(|l| l.contains("\"loss\"")).count())
        .unwrap_or(0)
}

#[test]
fn a_rank_that_cannot_start_ends_the_job_with_one_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, took) = launch(
        tmp.path(),
        "run",
        &[("RUST_BACKTRACE", "0")],
        &["--set", "data.files=[\"/no/such/data.jsonl\"]"],
    );
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(took < Duration::from_secs(90), "took {took:?}");
    assert!(all.contains("/no/such/data.jsonl"), "{all}");
    // Rank 0 names the cause; rank 1 ends with one error line of its own, which names rank
    // 0's error or the lost coordinator depending on which it learns first.
    assert!(
        all.contains("[rank0] error: cannot read /no/such/data.jsonl"),
        "{all}"
    );
    // (When rank 1 exits first, the launcher's summary quotes its last lines, indented.)
    let own_lines = all.lines().filter(|l| l.starts_with("[rank1] error:"));
    assert_eq!(own_lines.count(), 1, "{all}");
    for needle in ["panicked", "stack backtrace", "internal error", "ERROR"] {
        assert!(!all.contains(needle), "`{needle}` in:\n{all}");
    }
}
