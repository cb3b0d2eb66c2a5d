//! The shared loop on a tiny model: SFT and LoRA learn, accumulation is invariant, runs are
//! deterministic, resume is exact, bad runs stop cleanly.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::OnceLock;

use common::{grad_diff, root, tiny_model};
use datasets::cache::Dataset;
use datasets::prepare::prepare;
use models::backend::{Cpu, CpuTrain};
use models::checkpoint::{load_model, load_model_quantized};
use models::presets::{write_new_model, NewModelSpec};
use models::weights::{DiskDtype, SafetensorsReader};
use models::ForwardInput;
use serde_json::Value;
use trainers::accumulate::accumulate_gradients;
use trainers::method::{BatchShape, Method};
use trainers::metrics::read_metrics;
use trainers::sft::Sft;
use trainers::train_loop::Outcome;
use trainers::{train, Recipe, TrainOptions, TrainReport};

fn recipe(dir: &Path, extra: &str, overrides: &[&str]) -> Recipe {
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
per_device_train_batch_size = 8
per_device_eval_batch_size = 32
learning_rate = 3e-3
lr_scheduler_type = "constant"
max_steps = 6
eval_on_start = false
save_total_limit = 0
{extra}
"#,
        model = tiny_model().display(),
        data = root()
            .join("assets/data/quickstart/fastchat_dummy_conversation.json")
            .display(),
        cache = dir.join("cache").display(),
        out = dir.join("run").display(),
    );
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    Recipe::parse(&text, &overrides).unwrap()
}

fn run(recipe: &Recipe, resume: Option<&str>) -> anyhow::Result<TrainReport> {
    let stop = AtomicBool::new(false);
    let opts = TrainOptions {
        resume: resume.map(String::from),
        show_progress: false,
        stop: &stop,
        verbose: false,
        stop_after_steps: None,
    };
    train::<CpuTrain>(recipe, &opts, &Default::default())
}

fn losses(run_dir: &Path) -> Vec<(u64, f64)> {
    read_metrics(&run_dir.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .filter_map(|r| Some((r["step"].as_u64()?, r.get("loss")?.as_f64()?)))
        .collect()
}

fn tensors(dir: &Path, file: &str) -> Vec<(String, Vec<f32>)> {
    let mut r = SafetensorsReader::open_files(&[dir.join(file)]).unwrap();
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

#[test]
fn full_sft_learns_held_out() {
    let tmp = tempfile::tempdir().unwrap();
    let r = recipe(
        tmp.path(),
        "",
        &["train.max_steps=40", "train.eval_on_start=true"],
    );
    let report = run(&r, None).unwrap();
    assert_eq!(report.outcome, Outcome::Completed);
    let (first, last) = (
        report.first_eval_loss.unwrap(),
        report.last_eval_loss.unwrap(),
    );
    assert!(last < 0.6 * first, "held-out loss {first} -> {last}");
    let fin = report.final_dir.unwrap();
    assert!(
        fin.join("config.json").exists()
            && fin.join("model.safetensors").exists()
            && fin.join("tokenizer.json").exists()
    );
    let metrics = read_metrics(&tmp.path().join("run/metrics.jsonl")).unwrap();
    let last_rec = metrics.last().unwrap();
    for key in [
        "step",
        "epoch",
        "loss",
        "eval_loss",
        "eval_ppl",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "elapsed_s",
        "time/step_s",
        "time/forward_s",
        "time/backward_s",
        "time/optimizer_s",
    ] {
        assert!(
            last_rec.get(key).is_some(),
            "metrics lack {key}: {last_rec}"
        );
    }
    assert!(tmp.path().join("run/recipe.toml").exists());
}

#[test]
fn dora_learns_on_a_dense_and_an_nf4_base_and_saves_peft_magnitudes() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, extra) in [("dense", ""), ("nf4", "model.quantize=\"nf4\"")] {
        let dir = tmp.path().join(name);
        let mut overrides = vec![
            "train.max_steps=40",
            "train.learning_rate=2e-2",
            "train.eval_on_start=true",
        ];
        if !extra.is_empty() {
            overrides.push(extra);
        }
        let r = recipe(
            &dir,
            "[adapter]\nr = 8\nalpha = 16\ntarget_modules = \"all-linear\"\nuse_dora = true",
            &overrides,
        );
        let report = run(&r, None).unwrap();
        let (first, last) = (
            report.first_eval_loss.unwrap(),
            report.last_eval_loss.unwrap(),
        );
        assert!(
            last < first - 0.5,
            "{name}: held-out loss {first} -> {last}"
        );
        let fin = report.final_dir.unwrap();
        let cfg: Value = serde_json::from_str(
            &std::fs::read_to_string(fin.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["use_dora"], true);
        // A, B and PEFT's magnitude vector per adapted layer; the magnitudes trained.
        let t = tensors(&fin, "adapter_model.safetensors");
        assert_eq!(t.len(), 3 * 7 * 2, "{name}");
        let (_, base) = models::checkpoint::load_model::<models::backend::Cpu>(
            tiny_model(),
            &Default::default(),
        )
        .unwrap();
        let init = base
            .with_lora(&r.adapter.as_ref().unwrap().lora(), 0)
            .unwrap();
        let init_m: std::collections::HashMap<String, Vec<f32>> = init
            .linear_layers()
            .iter()
            .map(|(path, _, p)| {
                let m = p.lora.as_ref().unwrap().magnitude.as_ref().unwrap().val();
                (
                    format!("base_model.model.{path}.lora_magnitude_vector"),
                    m.into_data().to_vec().unwrap(),
                )
            })
            .collect();
        let saved_m: Vec<(&String, &Vec<f32>)> = t
            .iter()
            .filter(|(n, _)| n.ends_with("lora_magnitude_vector"))
            .map(|(n, v)| (n, v))
            .collect();
        assert_eq!(saved_m.len(), 14);
        if name == "dense" {
            let moved = saved_m
                .iter()
                .any(|(n, v)| v.iter().zip(&init_m[*n]).any(|(a, b)| (a - b).abs() > 1e-4));
            assert!(moved, "the magnitudes train");
        }
    }
}

#[test]
fn lora_learns_and_leaves_the_base_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let r = recipe(
        tmp.path(),
        "[adapter]\nr = 8\nalpha = 16\ntarget_modules = \"all-linear\"",
        &[
            "train.max_steps=40",
            "train.learning_rate=2e-2",
            "train.eval_on_start=true",
        ],
    );
    let report = run(&r, None).unwrap();
    let (first, last) = (
        report.first_eval_loss.unwrap(),
        report.last_eval_loss.unwrap(),
    );
    // The frozen random base (and its frozen LM head) bounds what adapters can reach.
    assert!(last < first - 0.5, "held-out loss {first} -> {last}");
    let fin = report.final_dir.unwrap();
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(fin.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["r"], 8);
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["target_modules"].as_array().unwrap().len(), 7);
    // Only adapter tensors are saved, with PEFT names and shapes; B moved off zero.
    let t = tensors(&fin, "adapter_model.safetensors");
    assert_eq!(t.len(), 2 * 7 * 2);
    assert!(t
        .iter()
        .all(|(n, _)| n.starts_with("base_model.model.model.layers.")
            && (n.ends_with("lora_A.weight") || n.ends_with("lora_B.weight"))));
    assert!(t
        .iter()
        .any(|(n, v)| n.ends_with("lora_B.weight") && v.iter().any(|x| *x != 0.0)));
    // Optimizer state exists for the adapters only: the frozen base has none.
    let ckpt = checkpoints::latest_checkpoint(&tmp.path().join("run"))
        .unwrap()
        .unwrap()
        .1;
    let opt = tensors(&ckpt, "optimizer.safetensors");
    assert_eq!(
        opt.len(),
        2 * 7 * 2 * 2,
        "{:?}",
        opt.iter().map(|x| &x.0).collect::<Vec<_>>()
    );
    assert!(opt.iter().all(|(n, _)| n.contains(".lora.")));
}

/// `[model] dtype = "bfloat16"` with LoRA: the frozen base (embedding, tied head, every
/// linear weight) is held in bf16 and the 50-step loss curve stays within 2% of float32's.
#[test]
fn lora_on_a_bf16_base_tracks_the_f32_curve() {
    let curve = |dtype: &str| {
        let tmp = tempfile::tempdir().unwrap();
        let r = recipe(
            tmp.path(),
            "[adapter]\nr = 8\nalpha = 16\ntarget_modules = \"all-linear\"",
            &[
                "train.max_steps=50",
                "train.learning_rate=1e-2",
                &format!("model.dtype={dtype}"),
            ],
        );
        run(&r, None).unwrap();
        losses(&tmp.path().join("run"))
    };
    let (f32_curve, bf16_curve) = (curve("float32"), curve("bfloat16"));
    assert_eq!(f32_curve.len(), 50);
    assert_eq!(bf16_curve.len(), 50);
    let mut worst = 0f64;
    for ((step, a), (_, b)) in f32_curve.iter().zip(&bf16_curve) {
        let gap = (a - b).abs() / a.abs();
        worst = worst.max(gap);
        assert!(gap <= 0.02, "step {step}: f32 loss {a}, bf16 base {b}");
    }
    assert!(worst > 0.0, "the bf16 base must differ somewhat from f32");
    assert!(
        bf16_curve.last().unwrap().1 < bf16_curve[0].1 - 0.5,
        "{bf16_curve:?}"
    );
    eprintln!(
        "largest per-step loss gap bf16 base vs f32: {:.3}%",
        100.0 * worst
    );

    // The stored dtypes: half for the frozen base, f32 for norms.
    let (_, model) = models::checkpoint::load_model_stored::<Cpu>(
        tiny_model(),
        &Default::default(),
        None,
        Some(burn::tensor::FloatDType::BF16),
    )
    .unwrap();
    use burn::tensor::DType;
    assert_eq!(model.embed_tokens.val().dtype(), DType::BF16);
    let layer = &model.layers[0];
    for (_, p) in layer.projections() {
        assert_eq!(p.stored_weight().dtype(), DType::BF16);
        assert_eq!(p.dense_weight().dtype(), DType::F32);
    }
    assert_eq!(layer.input_layernorm.weight.val().dtype(), DType::F32);

    // Full fine-tuning has no frozen base to store in half precision.
    let tmp = tempfile::tempdir().unwrap();
    let text = recipe(tmp.path(), "", &[]).to_toml().unwrap();
    let err = Recipe::parse(&text, &["model.dtype=bfloat16".to_string()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("add an [adapter] section"), "{err}");
}

#[test]
fn qlora_learns_tracks_lora_and_merges_into_the_dequantised_base() {
    let tmp = tempfile::tempdir().unwrap();
    let lora = "[adapter]\nr = 8\nalpha = 16\ntarget_modules = \"all-linear\"";
    let sets = [
        "train.max_steps=40",
        "train.learning_rate=2e-2",
        "train.eval_on_start=true",
    ];
    let plain = run(&recipe(&tmp.path().join("lora"), lora, &sets), None).unwrap();
    let mut qsets = sets.to_vec();
    qsets.push("model.quantize=\"nf4\"");
    let q = run(&recipe(&tmp.path().join("qlora"), lora, &qsets), None).unwrap();
    let (first, last) = (q.first_eval_loss.unwrap(), q.last_eval_loss.unwrap());
    assert!(last < first - 0.5, "QLoRA held-out loss {first} -> {last}");
    // The 4-bit base moves the curve only a little away from the f32 base's.
    let lora_last = plain.last_eval_loss.unwrap();
    assert!(
        (last - lora_last).abs() < 0.05 * lora_last,
        "QLoRA {last} vs LoRA {lora_last}"
    );
    for ((s1, a), (s2, b)) in losses(&tmp.path().join("lora/run"))
        .iter()
        .zip(&losses(&tmp.path().join("qlora/run")))
    {
        assert_eq!(s1, s2);
        assert!((a - b).abs() < 0.05 * a, "step {s1}: LoRA {a} vs QLoRA {b}");
    }

    let fin = q.final_dir.unwrap();
    let qcfg: Value = serde_json::from_str(
        &std::fs::read_to_string(fin.join("quantization_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(qcfg["bnb_4bit_quant_type"], "nf4");
    assert_eq!(qcfg["bnb_4bit_use_double_quant"], true);
    assert!(!plain
        .final_dir
        .unwrap()
        .join("quantization_config.json")
        .exists());

    // The merged export computes what the QLoRA model computes: adapters over the
    // dequantised NF4 base.
    let merged = tmp.path().join("merged");
    checkpoints::export::export::<Cpu>(
        &checkpoints::export::ExportRequest {
            source: &fin,
            out: &merged,
            merge: true,
            base: None,
            dtype: DiskDtype::F32,
        },
        &Default::default(),
    )
    .unwrap();
    let device = Default::default();
    let quant = models::nf4::Quantization::default();
    let (_, base) = load_model_quantized::<Cpu>(tiny_model(), &device, Some(&quant)).unwrap();
    assert_eq!(base.quantization(), Some(quant));
    let (adapted, _) = checkpoints::peft::load_adapter(base, &fin).unwrap();
    let (_, merged) = load_model::<Cpu>(&merged, &device).unwrap();
    assert!(merged.quantization().is_none());
    let ids = vec![vec![1u32, 450, 3681, 338, 263, 1243, 29889, 2]];
    let a = adapted.forward(ForwardInput::causal(&ids, &device));
    let b = merged.forward(ForwardInput::causal(&ids, &device));
    let diff = (a - b).abs().max().into_scalar();
    assert!(diff < 1e-4, "merged logits differ by {diff}");
}

/// Largest |a - b| over the gradients of every parameter, and the largest |a|.

#[test]
fn accumulation_is_invariant_to_micro_batching() {
    let tmp = tempfile::tempdir().unwrap();
    let r = recipe(tmp.path(), "", &[]);
    let (cfg, model) = load_model::<CpuTrain>(tiny_model(), &Default::default()).unwrap();
    let tok = models::checkpoint::load_tokenizer(tiny_model(), &cfg).unwrap();
    let Dataset::Sft(rows) = prepare(&r.data, &tok).unwrap().train else {
        panic!("sft data")
    };
    let pad = tok.pad_id.unwrap_or(0);
    let step = |micro: usize, accumulation: usize| {
        let mut m = Sft::new(rows.clone(), vec![], BatchShape::exact(micro, 8, pad, 3)).unwrap();
        let batches = Method::<CpuTrain>::next_step(&mut m, &model, accumulation)
            .unwrap()
            .unwrap();
        assert_eq!(batches.len(), accumulation);
        accumulate_gradients(&model, &m, &batches).unwrap()
    };
    let split = step(2, 4);
    let whole = step(8, 1);
    assert!(
        (split.loss - whole.loss).abs() < 1e-5,
        "{} vs {}",
        split.loss,
        whole.loss
    );
    assert_eq!(split.total_weight, whole.total_weight);
    let (diff, max) = grad_diff(&model, &split.grads, &whole.grads);
    assert!(
        diff < 1e-5,
        "gradients differ by {diff} (largest gradient {max})"
    );

    // The classic bug this guards against: the mean of per-micro-batch means.
    let mut m = Sft::new(rows.clone(), vec![], BatchShape::exact(2, 8, pad, 3)).unwrap();
    let batches = Method::<CpuTrain>::next_step(&mut m, &model, 4)
        .unwrap()
        .unwrap();
    let naive: f64 = batches
        .iter()
        .map(|b| {
            let one = accumulate_gradients(&model, &m, std::slice::from_ref(b)).unwrap();
            one.loss / 4.0
        })
        .sum();
    let tokens: Vec<f64> = batches
        .iter()
        .map(|b| Method::<CpuTrain>::weight(&m, b))
        .collect();
    if tokens.iter().any(|t| *t != tokens[0]) {
        assert!(
            (naive - whole.loss).abs() > 1e-4,
            "{naive} vs {}",
            whole.loss
        );
    }
}

#[test]
fn same_recipe_twice_gives_the_same_curve() {
    let tmp = tempfile::tempdir().unwrap();
    let a = recipe(&tmp.path().join("a"), "[adapter]\ndropout = 0.1", &[]);
    let b = recipe(&tmp.path().join("b"), "[adapter]\ndropout = 0.1", &[]);
    run(&a, None).unwrap();
    run(&b, None).unwrap();
    let (la, lb) = (
        losses(&tmp.path().join("a/run")),
        losses(&tmp.path().join("b/run")),
    );
    assert_eq!(la.len(), 6);
    assert_eq!(la, lb);
}

#[test]
fn interrupted_and_resumed_runs_match_the_uninterrupted_one() {
    for adapter in [
        "",
        "[adapter]\ndropout = 0.1\ntarget_modules = [\"q_proj\", \"down_proj\"]",
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let whole = recipe(
            &tmp.path().join("whole"),
            adapter,
            &[
                "train.max_steps=8",
                "train.lr_scheduler_type=\"cosine\"",
                "train.weight_decay=0.1",
            ],
        );
        run(&whole, None).unwrap();
        let split = recipe(
            &tmp.path().join("split"),
            adapter,
            &[
                "train.max_steps=8",
                "train.lr_scheduler_type=\"cosine\"",
                "train.weight_decay=0.1",
            ],
        );
        let stop = AtomicBool::new(false);
        let opts = TrainOptions {
            resume: None,
            show_progress: false,
            stop: &stop,
            verbose: false,
            stop_after_steps: Some(3),
        };
        let first = train::<CpuTrain>(&split, &opts, &Default::default()).unwrap();
        assert_eq!(first.outcome, Outcome::Interrupted(3));
        assert!(first.final_dir.is_none());
        let err = run(&split, None).unwrap_err().to_string();
        assert!(err.contains("--resume auto"), "{err}");
        let second = run(&split, Some("auto")).unwrap();
        assert_eq!(second.outcome, Outcome::Completed);
        let (a, b) = (
            losses(&tmp.path().join("whole/run")),
            losses(&tmp.path().join("split/run")),
        );
        assert_eq!(a.len(), 8);
        assert_eq!(a, b, "adapter {adapter:?}");
    }
}

#[test]
fn a_diverging_run_stops_with_a_clear_error_and_keeps_its_state() {
    let tmp = tempfile::tempdir().unwrap();
    let r = recipe(
        tmp.path(),
        "",
        &[
            "train.learning_rate=1e12",
            "train.max_grad_norm=0",
            "train.max_steps=20",
        ],
    );
    let err = format!("{:#}", run(&r, None).unwrap_err());
    assert!(
        err.contains("loss is") || err.contains("gradient norm is"),
        "{err}"
    );
    assert!(err.contains("last good state"), "{err}");
    let (step, dir) = checkpoints::latest_checkpoint(&tmp.path().join("run"))
        .unwrap()
        .unwrap();
    assert!(step < 20);
    // The saved state is finite and loads.
    let (_, model) = load_model::<Cpu>(&dir, &Default::default()).unwrap();
    let w: Vec<f32> = model.embed_tokens.val().into_data().to_vec().unwrap();
    assert!(w.iter().all(|x| x.is_finite()));
}

/// Preference pairs with a learnable rule: the chosen answer agrees politely, the rejected
/// one refuses curtly.
fn write_preferences(path: &Path, n: usize) {
    let topics = [
        "the weather",
        "a recipe",
        "my homework",
        "a poem",
        "the news",
        "a joke",
        "travel",
        "music",
    ];
    let mut out = String::new();
    for i in 0..n {
        let topic = topics[i % topics.len()];
        let row = serde_json::json!({
            "prompt": format!("Request {i}: can you help me with {topic}?"),
            "chosen": format!("Yes, gladly! Here is some help with {topic}."),
            "rejected": "No.",
        });
        out.push_str(&row.to_string());
        out.push('\n');
    }
    std::fs::write(path, out).unwrap();
}

fn dpo_recipe(dir: &Path, extra: &str, overrides: &[&str]) -> Recipe {
    std::fs::create_dir_all(dir).unwrap();
    let data = dir.join("prefs.jsonl");
    write_preferences(&data, 160);
    let mut all = vec![
        "method=\"dpo\"".to_string(),
        format!("data.files=[\"{}\"]", data.display()),
        "data.format=\"preference\"".into(),
        "train.eval_on_start=true".into(),
        "train.max_steps=15".into(),
        "train.per_device_train_batch_size=4".into(),
        "train.per_device_eval_batch_size=16".into(),
        "train.learning_rate=5e-3".into(),
    ];
    all.extend(overrides.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    recipe(dir, extra, &refs)
}

fn eval_metric(run_dir: &Path, key: &str) -> Vec<f64> {
    read_metrics(&run_dir.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .filter_map(|r| r.get(key)?.as_f64())
        .collect()
}

#[test]
fn dpo_trains_with_no_eval_split() {
    // All pairs go to training: the empty eval split is still a pairs dataset.
    let tmp = tempfile::tempdir().unwrap();
    let r = dpo_recipe(
        tmp.path(),
        "",
        &[
            "data.eval_fraction=0.0",
            "train.max_steps=2",
            "train.eval_on_start=false",
        ],
    );
    run(&r, None).unwrap();
    let steps = eval_metric(&tmp.path().join("run"), "step");
    assert_eq!(steps.last(), Some(&2.0), "{steps:?}");
    assert!(eval_metric(&tmp.path().join("run"), "loss")
        .iter()
        .all(|l| l.is_finite()));
    assert!(eval_metric(&tmp.path().join("run"), "eval_loss").is_empty());
}

#[test]
fn dpo_with_lora_learns_the_preference_and_precompute_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let lora = "[adapter]\nr = 8\nalpha = 16\ntarget_modules = \"all-linear\"";
    let r = dpo_recipe(&tmp.path().join("live"), lora, &[]);
    run(&r, None).unwrap();
    let acc = eval_metric(&tmp.path().join("live/run"), "eval_rewards/accuracies");
    let margins = eval_metric(&tmp.path().join("live/run"), "eval_rewards/margins");
    assert_eq!(
        acc[0], 0.0,
        "at step 0 the policy is the reference: {acc:?}"
    );
    assert!(
        *acc.last().unwrap() >= 0.8,
        "held-out reward accuracy {acc:?}"
    );
    assert!(*margins.last().unwrap() > 0.0, "{margins:?}");
    for key in [
        "rewards/chosen",
        "rewards/rejected",
        "logps/chosen",
        "logps/rejected",
    ] {
        assert!(
            !eval_metric(&tmp.path().join("live/run"), key).is_empty(),
            "{key} missing"
        );
    }

    let r = dpo_recipe(
        &tmp.path().join("pre"),
        &format!("{lora}\n[dpo]\nprecompute_ref_log_probs = true"),
        &[],
    );
    run(&r, None).unwrap();
    let (a, b) = (
        losses(&tmp.path().join("live/run")),
        losses(&tmp.path().join("pre/run")),
    );
    assert_eq!(a.len(), b.len());
    for ((s1, l1), (s2, l2)) in a.iter().zip(&b) {
        assert_eq!(s1, s2);
        assert!((l1 - l2).abs() < 1e-5, "step {s1}: {l1} vs {l2}");
    }
    let cached = std::fs::read_dir(tmp.path().join("pre/cache"))
        .unwrap()
        .flat_map(|e| std::fs::read_dir(e.unwrap().path()).unwrap())
        .any(|f| {
            f.unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("ref_logps-")
        });
    assert!(
        cached,
        "precomputed reference log-probs are cached beside the data"
    );
}

#[test]
fn orpo_learns_the_preference_without_a_reference_model() {
    let tmp = tempfile::tempdir().unwrap();
    let lora = "[adapter]\nr = 8\nalpha = 16\ntarget_modules = \"all-linear\"";
    let r = dpo_recipe(
        tmp.path(),
        &format!("{lora}\n[orpo]\nbeta = 0.5"),
        &["method=\"orpo\""],
    );
    run(&r, None).unwrap();
    let run_dir = tmp.path().join("run");
    let acc = eval_metric(&run_dir, "eval_rewards/accuracies");
    let odds = eval_metric(&run_dir, "eval_log_odds_chosen");
    let nll = eval_metric(&run_dir, "eval_nll_loss");
    assert!(
        acc.len() >= 2 && odds.len() == acc.len(),
        "{acc:?} {odds:?}"
    );
    assert!(
        *acc.last().unwrap() >= 0.8,
        "held-out reward accuracy {acc:?}"
    );
    assert!(
        odds.last().unwrap() > &(odds[0] + 1.0),
        "held-out log odds of the chosen answers {odds:?}"
    );
    assert!(nll.last().unwrap() < &nll[0], "held-out NLL {nll:?}");
    for key in ["log_odds_ratio", "rewards/margins", "logps/rejected"] {
        assert!(!eval_metric(&run_dir, key).is_empty(), "{key} missing");
    }
}

#[test]
fn kto_learns_the_preference_from_pairs_split_into_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let lora = "[adapter]\nr = 8\nalpha = 16\ntarget_modules = \"all-linear\"";
    let r = dpo_recipe(
        tmp.path(),
        &format!("{lora}\n[kto]\nbeta = 0.1"),
        &["method=\"kto\"", "train.per_device_train_batch_size=8"],
    );
    run(&r, None).unwrap();
    let run_dir = tmp.path().join("run");
    let acc = eval_metric(&run_dir, "eval_rewards/accuracies");
    let margins = eval_metric(&run_dir, "eval_rewards/margins");
    assert_eq!(
        acc[0], 0.0,
        "at step 0 the policy is the reference: {acc:?}"
    );
    assert!(
        *acc.last().unwrap() >= 0.8,
        "held-out reward accuracy {acc:?}"
    );
    assert!(*margins.last().unwrap() > 0.0, "{margins:?}");
    for key in ["kl", "rewards/chosen", "rewards/rejected", "logps/chosen"] {
        assert!(!eval_metric(&run_dir, key).is_empty(), "{key} missing");
    }
    // Reference log-probs of the rows and their mismatched rows, precomputed: same run.
    let pre = tmp.path().join("pre");
    let r = dpo_recipe(
        &pre,
        &format!("{lora}\n[kto]\nbeta = 0.1\nprecompute_ref_log_probs = true"),
        &["method=\"kto\"", "train.per_device_train_batch_size=8"],
    );
    run(&r, None).unwrap();
    let (a, b) = (losses(&run_dir), losses(&pre.join("run")));
    assert_eq!(a.len(), b.len());
    for ((s1, l1), (s2, l2)) in a.iter().zip(&b) {
        assert_eq!(s1, s2);
        assert!((l1 - l2).abs() < 1e-5, "step {s1}: {l1} vs {l2}");
    }
}

#[test]
fn dpo_and_reward_models_train_on_an_nf4_base() {
    let tmp = tempfile::tempdir().unwrap();
    let lora = "[adapter]\nr = 8\nalpha = 16\ntarget_modules = \"all-linear\"";
    let dir = tmp.path().join("dpo");
    run(&dpo_recipe(&dir, lora, &["model.quantize=\"nf4\""]), None).unwrap();
    let acc = eval_metric(&dir.join("run"), "eval_rewards/accuracies");
    assert!(*acc.last().unwrap() >= 0.8, "QLoRA DPO: {acc:?}");

    let dir = tmp.path().join("reward");
    let r = dpo_recipe(
        &dir,
        lora,
        &[
            "model.quantize=\"nf4\"",
            "method=\"reward\"",
            "train.learning_rate=2e-3",
            "train.max_steps=20",
        ],
    );
    let report = run(&r, None).unwrap();
    let acc = eval_metric(&dir.join("run"), "eval_accuracy");
    assert!(*acc.last().unwrap() >= 0.9, "QLoRA reward model: {acc:?}");
    assert!(report
        .final_dir
        .unwrap()
        .join("quantization_config.json")
        .exists());
}

#[test]
fn full_dpo_ipo_and_simpo_learn() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, loss) in [
        ("ipo", "[dpo]\nloss_type = \"ipo\"\nbeta = 0.5"),
        ("simpo", "[dpo]\nloss_type = \"simpo\"\nbeta = 2.0"),
    ] {
        let dir = tmp.path().join(name);
        let r = dpo_recipe(&dir, loss, &["train.learning_rate=2e-3"]);
        run(&r, None).unwrap();
        let acc = eval_metric(&dir.join("run"), "eval_rewards/accuracies");
        assert!(
            *acc.last().unwrap() >= 0.8,
            "{name}: held-out reward accuracy {acc:?}"
        );
    }
}

#[test]
fn reward_models_learn_the_preference_full_and_lora() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, extra) in [
        ("full", ""),
        (
            "lora",
            "[adapter]\nr = 8\nalpha = 16\ntarget_modules = \"all-linear\"",
        ),
    ] {
        let dir = tmp.path().join(name);
        let r = dpo_recipe(
            &dir,
            extra,
            &[
                "method=\"reward\"",
                "train.learning_rate=2e-3",
                "train.max_steps=20",
            ],
        );
        let report = run(&r, None).unwrap();
        let acc = eval_metric(&dir.join("run"), "eval_accuracy");
        assert!(
            *acc.last().unwrap() >= 0.9,
            "{name}: held-out pairwise accuracy {acc:?}"
        );
        assert!(
            report.last_eval_loss.unwrap() < report.first_eval_loss.unwrap(),
            "{name}"
        );
        let fin = report.final_dir.unwrap();
        if name == "full" {
            let cfg = std::fs::read_to_string(fin.join("config.json")).unwrap();
            assert!(cfg.contains("LlamaForSequenceClassification"), "{cfg}");
            let names: Vec<String> = tensors(&fin, "model.safetensors")
                .into_iter()
                .map(|t| t.0)
                .collect();
            assert!(
                names.contains(&"score.weight".to_string())
                    && !names.iter().any(|n| n.starts_with("lm_head"))
            );
        } else {
            let cfg = std::fs::read_to_string(fin.join("adapter_config.json")).unwrap();
            assert!(cfg.contains("SEQ_CLS"), "{cfg}");
            let names: Vec<String> = tensors(&fin, "adapter_model.safetensors")
                .into_iter()
                .map(|t| t.0)
                .collect();
            assert!(names.contains(&"base_model.model.score.weight".to_string()));
        }
    }
}

/// The quickstart conversations learned by the tiny model (full SFT): the teacher of the
/// distillation tests.
fn trained_teacher() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let r = recipe(tmp.path(), "", &["train.max_steps=120"]);
        let fin = run(&r, None).unwrap().final_dir.unwrap();
        (tmp, fin)
    })
    .1
}

/// A `micro` student (half the width, one layer) with the teacher's tokenizer.
fn micro_student(dir: &Path) -> PathBuf {
    let out = dir.join("student");
    write_new_model(&NewModelSpec {
        preset: "micro",
        arch: "llama",
        tokenizer_dir: &root().join("assets/tokenizers/phi3_vision"),
        out: &out,
        seed: 3,
        chat_template: "chatml",
        dtype: DiskDtype::F32,
    })
    .unwrap();
    out
}

/// Share of held-out trained tokens whose most likely next token is the label.
fn held_out_accuracy(r: &Recipe, model_dir: &Path) -> f64 {
    let (cfg, model) = load_model::<Cpu>(model_dir, &Default::default()).unwrap();
    let tok = models::checkpoint::load_tokenizer(model_dir, &cfg).unwrap();
    let Dataset::Sft(rows) = prepare(&r.data, &tok).unwrap().eval else {
        panic!("sft rows")
    };
    let batch = datasets::batch::collate_sft(&rows, datasets::batch::Padding::exact(0), rows.len());
    let t = trainers::logprobs::trained_logits(&model, &batch).unwrap();
    let hits = t
        .logits
        .argmax(1)
        .reshape([t.targets.dims()[0]])
        .equal(t.targets);
    hits.clone().int().sum().into_scalar() as f64 / hits.dims()[0] as f64
}

fn distill_recipe(dir: &Path, distill: &str, overrides: &[&str]) -> Recipe {
    let student = micro_student(dir);
    let model = format!("model.path=\"{}\"", student.display());
    let mut sets = vec![
        "method=\"distill\"",
        model.as_str(),
        "train.max_steps=30",
        "train.eval_on_start=true",
        "train.eval_steps=10",
        "train.learning_rate=1e-2",
    ];
    sets.extend_from_slice(overrides);
    let extra = format!(
        "[distill]\nteacher = \"{}\"\n{distill}",
        trained_teacher().display()
    );
    recipe(dir, &extra, &sets)
}

#[test]
fn distillation_lowers_the_students_divergence_and_matches_plain_sft() {
    let tmp = tempfile::tempdir().unwrap();
    let kd = distill_recipe(
        &tmp.path().join("kd"),
        "alpha = 0.5\ntemperature = 1.0",
        &[],
    );
    let report = run(&kd, None).unwrap();
    let div = eval_metric(&tmp.path().join("kd/run"), "eval_divergence");
    assert!(
        *div.last().unwrap() < 0.5 * div[0],
        "held-out KL to the teacher {div:?}"
    );
    // The same student, data and steps, trained on the labels alone.
    let mut sft = distill_recipe(&tmp.path().join("sft"), "", &[]);
    sft.method = trainers::recipe::MethodName::Sft;
    sft.distill = None;
    let plain = run(&sft, None).unwrap();
    let kd_acc = held_out_accuracy(&kd, &report.final_dir.unwrap());
    let sft_acc = held_out_accuracy(&sft, &plain.final_dir.unwrap());
    eprintln!("held-out token accuracy: distilled {kd_acc:.3}, plain SFT {sft_acc:.3}");
    // Measured 0.788 vs 0.786: on these near-deterministic answers the one-layer student is
    // bound by its capacity, so the teacher's soft labels add no accuracy over the labels
    // (with a 60-step teacher and T = 2 they cost some: 0.751 vs 0.786). What is asserted:
    // distillation reaches the accuracy plain SFT reaches while matching the teacher.
    assert!(
        kd_acc > sft_acc - 0.03,
        "distilled {kd_acc} vs SFT {sft_acc}"
    );
}

#[test]
fn cached_top_k_and_on_policy_distillation_learn() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, distill) in [
        (
            "topk",
            "top_k = 20\ndivergence = \"jsd\"\nbeta = 0.5\nteacher_quantize = \"nf4\"",
        ),
        (
            "onpolicy",
            "lmbda = 0.5\nmax_new_tokens = 16\ndivergence = \"reverse_kl\"",
        ),
    ] {
        let dir = tmp.path().join(name);
        let r = distill_recipe(&dir, distill, &[]);
        run(&r, None).unwrap();
        let div = eval_metric(&dir.join("run"), "eval_divergence");
        assert!(*div.last().unwrap() < 0.7 * div[0], "{name}: {div:?}");
    }
    let cached = std::fs::read_dir(tmp.path().join("topk/cache"))
        .unwrap()
        .flat_map(|e| std::fs::read_dir(e.unwrap().path()).unwrap())
        .any(|f| {
            f.unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("teacher_topk20-")
        });
    assert!(
        cached,
        "the teacher's top-k log-probs are cached beside the data"
    );
}

/// A synthetic agent task: two tools, eight cities, four phrasings per tool. Each row ends
/// with the assistant's call (OpenAI shape). Two questions per city (one per tool) are held
/// out: their phrasing and city were each seen, never together.
fn write_tool_rows(path: &Path) -> (Vec<(String, String, String)>, Value) {
    // One token each after a space in the bundled tokenizer, so that the tiny model's task
    // is choosing the tool and carrying the city over, not spelling unseen pieces.
    let cities = [
        "Paris", "Lima", "Rome", "Tokyo", "London", "Berlin", "Madrid", "Boston",
    ];
    let asks = [
        ("get_weather", "What is the weather in {}?"),
        ("get_weather", "Is it raining in {}?"),
        ("get_weather", "How warm is {} today?"),
        ("get_weather", "Forecast for {}?"),
        ("get_time", "What time is it in {}?"),
        ("get_time", "Tell me the local time in {}."),
        ("get_time", "Current time in {}, please."),
        ("get_time", "Clock check: {}."),
    ];
    let tools = serde_json::json!([
        {"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
        {"type": "function", "function": {"name": "get_time",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
    ]);
    let mut train = String::new();
    let mut held_out = Vec::new();
    for (c, city) in cities.iter().enumerate() {
        for (a, (tool, ask)) in asks.iter().enumerate() {
            let question = ask.replace("{}", city);
            if a == c % 4 || a == 4 + (c + 2) % 4 {
                held_out.push((question, tool.to_string(), city.to_string()));
                continue;
            }
            let args = serde_json::json!({ "city": city }).to_string();
            let row = serde_json::json!({"tools": tools, "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c0", "type": "function",
                     "function": {"name": tool, "arguments": args}}]}]});
            train.push_str(&format!("{row}\n"));
        }
    }
    std::fs::write(path, train).unwrap();
    (held_out, tools)
}

/// The share of held-out questions whose greedy answer is exactly the right call.
fn right_calls(model_dir: &Path, held_out: &[(String, String, String)], tools: &Value) -> f64 {
    let (cfg, model) = load_model::<Cpu>(model_dir, &Default::default()).unwrap();
    let tok = models::checkpoint::load_tokenizer(model_dir, &cfg).unwrap();
    let template = models::ChatTemplate::named("chatml").unwrap();
    let tools = tools.as_array().unwrap();
    let prompts: Vec<Vec<u32>> = held_out
        .iter()
        .map(|(q, _, _)| {
            let messages = [models::Message::new("user", q)];
            let text = template
                .render_with_tools(&messages, tools, true, &tok.template_tokens())
                .unwrap();
            tok.encode(&text, false).unwrap()
        })
        .collect();
    let params = models::generate::SamplingParams {
        max_new_tokens: 40,
        stop_ids: tok.stop_ids.clone(),
        pad_id: 0,
        shape_multiple: 1,
        ..Default::default()
    };
    let got = models::generate::generate(&model, &prompts, &params, None).unwrap();
    let right = got
        .iter()
        .zip(held_out)
        .filter(|(g, (_, tool, city))| {
            let text = tok.decode(&g.tokens, true).unwrap();
            let want =
                format!("<tool_call>\n{{\"name\": \"{tool}\", \"arguments\": {{\"city\": \"{city}\"}}}}\n</tool_call>");
            text.trim_start().starts_with(&want)
        })
        .count();
    right as f64 / held_out.len() as f64
}

#[test]
fn sft_on_tool_calls_learns_to_make_the_right_call_on_held_out_questions() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("tool_calls.jsonl");
    let (held_out, tools) = write_tool_rows(&data);
    let data_set = format!("data.files=[\"{}\"]", data.display());
    let r = recipe(
        tmp.path(),
        "",
        &[
            &data_set,
            "data.format=\"openai\"",
            "data.template=\"chatml\"",
            "data.eval_fraction=0.0",
            "data.max_seq_len=512",
            "train.max_steps=240",
        ],
    );
    assert_eq!(right_calls(tiny_model(), &held_out, &tools), 0.0);
    let fin = run(&r, None).unwrap().final_dir.unwrap();
    let share = right_calls(&fin, &held_out, &tools);
    // 240 steps give 16/16 here (150 steps: 13/16).
    assert!(share >= 0.75, "right calls on held-out questions: {share}");
}
