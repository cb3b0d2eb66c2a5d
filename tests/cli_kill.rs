//! Kills at random instants (SIGKILL: no destructor, no handler runs) leave no partial file:
//! `data convert`, `data dedup`, `data prepare`, checkpoint saving and `export` each leave the
//! old output or the complete new one, and a training run killed mid-way continues with
//! `--resume auto` to the uninterrupted run's final loss.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{ok, root};
use rand::{Rng, SeedableRng};

const KILLS: usize = 20;

fn spawn(args: &[&str], cwd: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_burnish"))
        .args(args)
        .current_dir(cwd)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Seconds an uninterrupted run of `args` takes.
fn duration(args: &[&str], cwd: &Path) -> f64 {
    let t = Instant::now();
    assert!(spawn(args, cwd).wait().unwrap().success(), "{args:?}");
    t.elapsed().as_secs_f64()
}

/// Runs `args` and kills it after `after` (or lets it finish first).
fn kill_after(args: &[&str], cwd: &Path, after: f64) {
    let mut child = spawn(args, cwd);
    let deadline = Instant::now() + Duration::from_secs_f64(after);
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// `KILLS` instants spread at random over a run of `secs` (and a little past it).
fn instants(secs: f64, seed: u64) -> Vec<f64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..KILLS)
        .map(|_| rng.random_range(0.0..secs * 1.1))
        .collect()
}

fn visible_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let p = e.path();
        if p.is_dir() {
            out.extend(visible_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn alpaca_rows(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "{{\"instruction\": \"Question number {i} about {}\", \"output\": \"Answer {}\"}}\n",
                i % 97,
                i * 7 % 1000
            )
        })
        .collect()
}

/// A command that rewrites `out`: after every kill `out` holds the old bytes or the
/// complete new ones, and the next run leaves no temporary file behind.
fn check_file_output(name: &str, args: &[&str], dir: &Path, out: &Path, seed: u64) {
    std::fs::write(out, "old\n").unwrap();
    let secs = duration(args, dir);
    let complete = std::fs::read(out).unwrap();
    assert_ne!(complete, b"old\n");
    let mut seen_old = 0;
    for at in instants(secs, seed) {
        std::fs::write(out, "old\n").unwrap();
        kill_after(args, dir, at);
        let now = std::fs::read(out).unwrap();
        assert!(
            now == b"old\n" || now == complete,
            "{name} killed after {at:.3}s left a partial {} ({} bytes)",
            out.display(),
            now.len()
        );
        seen_old += usize::from(now == b"old\n");
    }
    assert!(
        seen_old > 0,
        "{name}: no kill landed before the output was replaced"
    );
    assert!(spawn(args, dir).wait().unwrap().success());
    let litter: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(
        litter.is_empty(),
        "{name}: temporaries left after a clean run: {litter:?}"
    );
}

#[test]
fn killed_convert_and_dedup_leave_the_old_output_or_the_new_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("in.jsonl"), alpaca_rows(40_000)).unwrap();
    let out = dir.join("out.jsonl");
    check_file_output(
        "convert",
        &[
            "data",
            "convert",
            "in.jsonl",
            "--to",
            "sharegpt",
            "--out",
            "out.jsonl",
        ],
        dir,
        &out,
        1,
    );
    check_file_output(
        "dedup",
        &[
            "data",
            "dedup",
            "in.jsonl",
            "--out",
            "out.jsonl",
            "--method",
            "exact",
        ],
        dir,
        &out,
        2,
    );
}

fn recipe(dir: &Path, model: &Path) -> PathBuf {
    let path = dir.join("recipe.toml");
    std::fs::write(
        &path,
        format!(
            r#"method = "sft"
seed = 3
[model]
path = "{model}"
[data]
files = ["{data}"]
format = "sharegpt"
max_seq_len = 128
eval_fraction = 0.05
cache_dir = "{cache}"
[train]
output_dir = "{run}"
per_device_train_batch_size = 8
learning_rate = 1e-3
max_steps = 12
save_steps = 1
save_total_limit = 0
eval_steps = 0
eval_on_start = false
"#,
            model = model.display(),
            data = root()
                .join("assets/data/quickstart/fastchat_dummy_conversation.json")
                .display(),
            cache = dir.join("cache").display(),
            run = dir.join("run").display(),
        ),
    )
    .unwrap();
    path
}

fn final_loss(run: &Path) -> f64 {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let last = text
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v.get("loss").is_some())
        .unwrap();
    last["loss"].as_f64().unwrap()
}

/// Every checkpoint and export present is whole: its files parse.
fn assert_whole(dir: &Path, what: &str) {
    for f in visible_files(dir) {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(&f).unwrap();
        if name.ends_with(".json") {
            assert!(
                serde_json::from_slice::<serde_json::Value>(&bytes).is_ok(),
                "{what}: {} is not whole JSON",
                f.display()
            );
        }
        if name.ends_with(".safetensors") {
            assert!(bytes.len() >= 8, "{what}: {} is cut", f.display());
            let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
            let end = header
                .as_object()
                .unwrap()
                .values()
                .filter_map(|t| t["data_offsets"][1].as_u64())
                .max()
                .unwrap_or(0) as usize;
            assert_eq!(bytes.len(), 8 + n + end, "{what}: {} is cut", f.display());
        }
    }
}

#[test]
fn killed_prepare_training_and_export_leave_whole_outputs_and_resume_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let model = common::new_tiny_model(&dir.join("model"), 5);
    let r = recipe(dir, &model);
    let r = r.to_str().unwrap();

    // data prepare: the cache entry appears whole or not at all.
    let prepare = ["data", "prepare", "--recipe", r];
    let secs = duration(&prepare, dir);
    for at in instants(secs, 3) {
        let _ = std::fs::remove_dir_all(dir.join("cache"));
        kill_after(&prepare, dir, at);
        for f in visible_files(&dir.join("cache")) {
            let entry = f.parent().unwrap();
            assert!(
                entry.join("report.json").exists(),
                "prepare killed after {at:.3}s left {} without its report",
                f.display()
            );
        }
    }
    ok(&["data", "prepare", "--recipe", r]);

    // Training with a checkpoint every step: killed anywhere, every checkpoint and export
    // present is whole, and --resume auto reaches the uninterrupted final loss.
    let train = ["train", "--recipe", r];
    let secs = duration(&train, dir);
    let want = final_loss(&dir.join("run"));
    for (i, at) in instants(secs, 4).into_iter().enumerate() {
        let _ = std::fs::remove_dir_all(dir.join("run"));
        kill_after(&train, dir, at);
        if dir.join("run").exists() {
            assert_whole(&dir.join("run"), &format!("training killed after {at:.3}s"));
        }
        if i % 7 == 0 {
            ok(&["train", "--recipe", r, "--resume", "auto"]);
            let got = final_loss(&dir.join("run"));
            assert!(
                (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                "killed after {at:.3}s and resumed: final loss {got} vs {want}"
            );
        }
    }

    // export over an earlier export: the old one or the new one, whole.
    let out = dir.join("export");
    let export = ["export", "run", "--out", "export"];
    let _ = std::fs::remove_dir_all(dir.join("run"));
    ok(&["train", "--recipe", r]);
    let secs = duration(&export, dir);
    for at in instants(secs, 5) {
        kill_after(&export, dir, at);
        assert!(
            out.join("config.json").exists(),
            "export killed after {at:.3}s: no export"
        );
        assert_whole(&out, &format!("export killed after {at:.3}s"));
    }
}
