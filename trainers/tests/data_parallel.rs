//! Data parallelism on CPU replicas: two replicas train exactly as one device does on the
//! same global batch (SFT and DPO), resume is exact, and a stalled replica stops every rank
//! with the watchdog's message instead of hanging.

mod common;

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use common::{root, tiny_model};
use models::backend::CpuTrain;
use models::weights::SafetensorsReader;
use serde_json::Value;
use trainers::metrics::read_metrics;
use trainers::parallel::{train_data_parallel, Fault, ParallelOptions, Timeouts};
use trainers::train_loop::Outcome;
use trainers::{train, Recipe, TrainOptions, TrainReport};

static NO_STOP: AtomicBool = AtomicBool::new(false);

/// SFT on the bundled conversations; `extra` is appended, `overrides` are `--set`s.
fn recipe(dir: &Path, extra: &str, overrides: &[String]) -> Recipe {
    let text = format!(
        r#"
method = "sft"
seed = 7
[model]
path = "{model}"
[data]
files = ["{data}"]
format = "sharegpt"
max_seq_len = 128
eval_fraction = 0.1
cache_dir = "{cache}"
[train]
output_dir = "{out}"
per_device_train_batch_size = 4
per_device_eval_batch_size = 32
learning_rate = 3e-3
lr_scheduler_type = "constant"
max_steps = 4
eval_steps = 2
eval_on_start = false
save_total_limit = 0
max_grad_norm = 1.0
{extra}
"#,
        model = tiny_model().display(),
        data = root()
            .join("assets/data/quickstart/fastchat_dummy_conversation.json")
            .display(),
        cache = dir.join("cache").display(),
        out = dir.join("run").display(),
    );
    Recipe::parse(&text, overrides).unwrap()
}

fn dpo_recipe(dir: &Path, overrides: &[String]) -> Recipe {
    std::fs::create_dir_all(dir).unwrap();
    let data = dir.join("prefs.jsonl");
    let mut rows = String::new();
    for i in 0..64 {
        let topic = ["the weather", "a recipe", "a poem", "music"][i % 4];
        let row = serde_json::json!({
            "prompt": format!("Request {i}: can you help me with {topic}?"),
            "chosen": format!("Yes, gladly! Here is some help with {topic}."),
            "rejected": "No.",
        });
        rows.push_str(&format!("{row}\n"));
    }
    std::fs::write(&data, rows).unwrap();
    let mut all = vec![
        "method=\"dpo\"".to_string(),
        format!("data.files=[\"{}\"]", data.display()),
        "data.format=\"preference\"".into(),
        "train.learning_rate=5e-3".into(),
        "train.per_device_train_batch_size=2".into(),
    ];
    all.extend(overrides.iter().cloned());
    let lora = "[adapter]\nr = 4\nalpha = 8\ntarget_modules = \"all-linear\"";
    recipe(dir, lora, &all)
}

fn opts(resume: Option<&str>, stop_after_steps: Option<u64>) -> TrainOptions<'static> {
    TrainOptions {
        resume: resume.map(String::from),
        show_progress: false,
        stop: &NO_STOP,
        verbose: false,
        stop_after_steps,
    }
}

fn single(r: &Recipe) -> TrainReport {
    train::<CpuTrain>(r, &opts(None, None), &Default::default()).unwrap()
}

fn replicas(
    r: &Recipe,
    n: usize,
    o: &TrainOptions<'static>,
    p: &ParallelOptions,
) -> anyhow::Result<TrainReport> {
    train_data_parallel::<CpuTrain>(r, o, vec![Default::default(); n], None, p)
}

fn metrics(run: &Path) -> Vec<Value> {
    read_metrics(&run.join("metrics.jsonl")).unwrap()
}

fn tensors(file: &Path) -> Vec<(String, Vec<f32>)> {
    let mut r = SafetensorsReader::open_files(&[file.to_path_buf()]).unwrap();
    let mut names: Vec<String> = r.names().cloned().collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let v = r.read_f32(&n).unwrap().1;
            (n, v)
        })
        .collect()
}

/// Every logged number (loss, grad_norm, eval metrics, ...) agrees within `tol`;
/// wall-clock figures (`elapsed_s`, `tokens_per_s`, `time/*`) are not results.
fn assert_same_curves(a: &[Value], b: &[Value], tol: f64) {
    assert_eq!(a.len(), b.len(), "{a:?}\n{b:?}");
    for (x, y) in a.iter().zip(b) {
        for (k, v) in x.as_object().unwrap() {
            if ["elapsed_s", "tokens_per_s"].contains(&k.as_str()) || k.starts_with("time/") {
                continue;
            }
            let (Some(v1), Some(v2)) = (v.as_f64(), y[k].as_f64()) else {
                panic!("{k} missing in {y}");
            };
            assert!(
                (v1 - v2).abs() <= tol * v1.abs().max(1.0),
                "{k}: {v1} vs {v2} at step {}",
                x["step"]
            );
        }
    }
}

fn assert_same_weights(a: &Path, b: &Path, tol: f32) -> f32 {
    let (ta, tb) = (tensors(a), tensors(b));
    assert_eq!(ta.len(), tb.len());
    let mut worst = 0f32;
    for ((na, va), (nb, vb)) in ta.iter().zip(&tb) {
        assert_eq!(na, nb);
        for (x, y) in va.iter().zip(vb) {
            worst = worst.max((x - y).abs());
        }
    }
    assert!(worst <= tol, "weights differ by up to {worst}");
    worst
}

#[test]
fn sft_on_two_replicas_matches_one_device_on_the_same_global_batch() {
    let tmp = tempfile::tempdir().unwrap();
    // Global batch 16 rows: one device accumulating 4 micro-batches of 4, or two replicas
    // of 2 micro-batches each.
    let one = recipe(
        &tmp.path().join("one"),
        "",
        &["train.gradient_accumulation_steps=4".into()],
    );
    let two = recipe(
        &tmp.path().join("two"),
        "",
        &["train.gradient_accumulation_steps=2".into()],
    );
    single(&one);
    let report = replicas(&two, 2, &opts(None, None), &ParallelOptions::default()).unwrap();
    assert_eq!(report.outcome, Outcome::Completed);
    let (m1, m2) = (
        metrics(&tmp.path().join("one/run")),
        metrics(&tmp.path().join("two/run")),
    );
    assert!(m1.iter().any(|r| r.get("eval_loss").is_some()));
    assert_same_curves(&m1, &m2, 1e-5);
    let worst = assert_same_weights(
        &tmp.path().join("one/run/final/model.safetensors"),
        &tmp.path().join("two/run/final/model.safetensors"),
        1e-5,
    );
    eprintln!("SFT, 2 replicas vs 1 device: weights differ by at most {worst:e}");
    // Only rank 0 wrote: one metrics file, one set of checkpoints, one export.
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("two/run/step-000004/trainer_state.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(state["world_size"], 2);
}

#[test]
fn dpo_on_two_replicas_matches_one_device_on_the_same_global_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let one = dpo_recipe(
        &tmp.path().join("one"),
        &["train.gradient_accumulation_steps=2".into()],
    );
    let two = dpo_recipe(
        &tmp.path().join("two"),
        &["train.gradient_accumulation_steps=1".into()],
    );
    single(&one);
    replicas(&two, 2, &opts(None, None), &ParallelOptions::default()).unwrap();
    let (m1, m2) = (
        metrics(&tmp.path().join("one/run")),
        metrics(&tmp.path().join("two/run")),
    );
    assert!(m1.iter().any(|r| r.get("rewards/accuracies").is_some()));
    assert_same_curves(&m1, &m2, 1e-5);
    let worst = assert_same_weights(
        &tmp.path().join("one/run/final/adapter_model.safetensors"),
        &tmp.path().join("two/run/final/adapter_model.safetensors"),
        1e-5,
    );
    eprintln!("DPO (LoRA), 2 replicas vs 1 device: adapters differ by at most {worst:e}");
}

#[test]
fn an_interrupted_data_parallel_run_resumes_exactly_and_only_on_as_many_replicas() {
    let tmp = tempfile::tempdir().unwrap();
    let whole = recipe(&tmp.path().join("whole"), "", &[]);
    let parts = recipe(&tmp.path().join("parts"), "", &[]);
    let p = ParallelOptions::default();
    replicas(&whole, 2, &opts(None, None), &p).unwrap();
    let first = replicas(&parts, 2, &opts(None, Some(2)), &p).unwrap();
    assert_eq!(first.outcome, Outcome::Interrupted(2));
    let err = replicas(&parts, 3, &opts(Some("auto"), None), &p).unwrap_err();
    assert!(
        format!("{err:#}").contains("2 data-parallel replica(s), this run has 3"),
        "{err:#}"
    );
    replicas(&parts, 2, &opts(Some("auto"), None), &p).unwrap();
    assert_same_curves(
        &metrics(&tmp.path().join("whole/run")),
        &metrics(&tmp.path().join("parts/run")),
        0.0,
    );
}

#[test]
fn a_stalled_replica_stops_every_rank_with_the_watchdogs_message() {
    let tmp = tempfile::tempdir().unwrap();
    let r = recipe(&tmp.path().join("stall"), "", &[]);
    let p = ParallelOptions {
        timeouts: Timeouts {
            step: Duration::from_secs(2),
            setup: Duration::from_secs(60),
        },
        fault: Some("stall:1:2".parse::<Fault>().unwrap()),
    };
    let started = Instant::now();
    let err = replicas(&r, 2, &opts(None, None), &p).unwrap_err();
    let msg = format!("{err:#}");
    eprintln!("after {:.1}s: {msg}", started.elapsed().as_secs_f64());
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    for needle in [
        "watchdog",
        "all_reduce(gradients) at step 2",
        "rank 1 did not arrive",
        "step 1",
    ] {
        assert!(msg.contains(needle), "`{needle}` not in: {msg}");
    }
}
