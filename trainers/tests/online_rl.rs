//! GRPO and PPO learn on a tiny model: GRPO raises a verifiable format reward, PPO raises
//! the score of a reward model trained here on a learnable preference; resume is exact
//! in the middle of a rollout's updates.
//!
//! The model has a 64-token word-level vocabulary (digits, letters, a few symbols), so a
//! random policy hits the rewarded behaviour often enough for group advantages to see it.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::OnceLock;

use models::backend::CpuTrain;
use models::presets::{write_new_model, NewModelSpec};
use models::weights::DiskDtype;
use serde_json::{json, Value};
use trainers::metrics::read_metrics;
use trainers::{train, Recipe, TrainOptions, TrainReport};

const SPECIALS: [&str; 4] = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"];

fn words() -> Vec<String> {
    let mut w: Vec<String> = ["user", "assistant", "system"].map(String::from).to_vec();
    w.extend((0..10).map(|d| d.to_string()));
    w.extend(('a'..='z').map(String::from));
    w.extend(
        "+ = ? . , ! ( ) - * / : ; ' < > # $ % & @"
            .split(' ')
            .map(String::from),
    );
    w
}

/// A Hugging Face WordLevel tokenizer over whitespace-separated words, exactly 64 ids.
fn write_tokenizer(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut vocab = serde_json::Map::new();
    let all: Vec<String> = SPECIALS
        .iter()
        .map(|s| s.to_string())
        .chain(words())
        .collect();
    assert_eq!(all.len(), 64);
    for (i, w) in all.iter().enumerate() {
        vocab.insert(w.clone(), json!(i));
    }
    let added: Vec<Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    let tok = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    let cfg = json!({"eos_token": "<|im_end|>", "pad_token": "<pad>", "unk_token": "<unk>"});
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
}

struct Fixture {
    _tmp: tempfile::TempDir,
    model: PathBuf,
    prompts: PathBuf,
    pairs: PathBuf,
}

/// The tiny model, sums to answer (`{"prompt": "3 + 4", "answer": "7"}`), and preference
/// pairs whose chosen answer starts with a digit and rejected one with a letter.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let tok = tmp.path().join("tok");
        write_tokenizer(&tok);
        let model = tmp.path().join("model");
        write_new_model(&NewModelSpec {
            preset: "tiny",
            arch: "llama",
            tokenizer_dir: &tok,
            out: &model,
            seed: 3,
            chat_template: "chatml",
            dtype: DiskDtype::F32,
        })
        .unwrap();
        let (mut prompts, mut pairs) = (String::new(), String::new());
        let letters: Vec<char> = ('a'..='z').collect();
        for a in 0..10 {
            for b in 0..10 - a {
                let p = format!("{a} + {b}");
                prompts.push_str(&format!(
                    "{}\n",
                    json!({"prompt": p, "answer": (a + b).to_string()})
                ));
                let chosen = format!("{} {}", (a * 3 + b) % 10, letters[(a + b) % 26]);
                let rejected = format!("{} {}", letters[(a * 7 + b) % 26], (a + b) % 10);
                pairs.push_str(&format!(
                    "{}\n",
                    json!({"prompt": p, "chosen": chosen, "rejected": rejected})
                ));
            }
        }
        let (p, q) = (
            tmp.path().join("prompts.jsonl"),
            tmp.path().join("pairs.jsonl"),
        );
        std::fs::write(&p, prompts).unwrap();
        std::fs::write(&q, pairs).unwrap();
        Fixture {
            model,
            prompts: p,
            pairs: q,
            _tmp: tmp,
        }
    })
}

fn recipe(dir: &Path, method: &str, data: &Path, extra: &str, overrides: &[&str]) -> Recipe {
    let text = format!(
        r#"
method = "{method}"
seed = 5
[model]
path = "{model}"
[data]
files = ["{data}"]
max_seq_len = 32
eval_fraction = 0.2
cache_dir = "{cache}"
[train]
output_dir = "{out}"
per_device_train_batch_size = 16
per_device_eval_batch_size = 16
learning_rate = 5e-3
lr_scheduler_type = "constant"
max_steps = 30
eval_steps = 0
save_total_limit = 0
{extra}
"#,
        model = fixture().model.display(),
        data = data.display(),
        cache = dir.join("cache").display(),
        out = dir.join("run").display(),
    );
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    Recipe::parse(&text, &overrides).unwrap()
}

fn run(recipe: &Recipe, resume: Option<&str>, stop_after: Option<u64>) -> TrainReport {
    let stop = AtomicBool::new(false);
    let opts = TrainOptions {
        resume: resume.map(String::from),
        show_progress: false,
        stop: &stop,
        verbose: false,
        stop_after_steps: stop_after,
    };
    train::<CpuTrain>(recipe, &opts, &Default::default()).unwrap()
}

fn metric(run_dir: &Path, key: &str) -> Vec<f64> {
    read_metrics(&run_dir.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .filter_map(|r| r.get(key)?.as_f64())
        .collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

const FORMAT: &str = r#"
[grpo]
num_generations = 8
max_completion_length = 4
[[rewards]]
type = "format"
name = "starts_with_digit"
pattern = '^\s*\d'
"#;

#[test]
fn grpo_raises_a_verifiable_format_reward() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let r = recipe(dir, "grpo", &fixture().prompts, FORMAT, &[]);
    let report = run(&r, None, None);
    let reward = metric(&dir.join("run"), "reward");
    assert_eq!(reward.len(), 30);
    let (first, last) = (mean(&reward[..5]), mean(&reward[25..]));
    assert!(
        first < 0.5,
        "a random policy rarely starts with a digit: {reward:?}"
    );
    assert!(
        last > first + 0.3 && last > 0.7,
        "mean reward {first:.2} -> {last:.2}: {reward:?}"
    );
    let eval = metric(&dir.join("run"), "eval_reward");
    assert!(
        *eval.last().unwrap() > 0.7,
        "held-out greedy reward {eval:?}"
    );
    for key in [
        "rewards/starts_with_digit/mean",
        "clip_ratio",
        "entropy",
        "completions/mean_length",
        "frac_reward_zero_std",
        "generation_tokens_per_s",
    ] {
        assert!(!metric(&dir.join("run"), key).is_empty(), "{key} missing");
    }
    assert!(report.final_dir.unwrap().join("model.safetensors").exists());
}

/// Distinct attention, projection and LM-head shapes of a GRPO run of `steps` steps.
fn grpo_shapes(dir: &Path, steps: usize, pad_to: usize) -> [usize; 3] {
    use models::shape_audit::{count, Recording};
    let steps = format!("train.max_steps={steps}");
    let pad_to = format!("train.pad_to_multiple_of={pad_to}");
    let overrides = [
        steps.as_str(),
        pad_to.as_str(),
        "grpo.beta=0.04",
        "train.overwrite_output_dir=true",
    ];
    let r = recipe(dir, "grpo", &fixture().prompts, FORMAT, &overrides);
    let recording = Recording::start();
    run(&r, None, None);
    let out = ["attention", "projection", "lm_head"].map(count);
    drop(recording);
    out
}

#[test]
fn grpo_steps_see_a_bounded_set_of_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let two = grpo_shapes(tmp.path(), 2, 64);
    let five = grpo_shapes(tmp.path(), 5, 64);
    assert_eq!(two, five, "steps 3 to 5 add no shape");
    // Sampling (a prefill and a decoding step, a held-out greedy pass), the policy's
    // training pass and the reference's scoring pass: a handful each, whatever the lengths.
    assert!(five[0] <= 6, "attention shapes {five:?}");
    assert!(five[2] <= 6, "LM head shapes {five:?}");
}

#[test]
fn grpo_with_qlora_takes_the_kl_to_the_base_and_resumes_exactly_mid_iterations() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = r#"
[grpo]
num_generations = 8
max_completion_length = 4
beta = 0.04
num_iterations = 2
loss_type = "grpo"
epsilon_high = 0.28
[adapter]
r = 4
alpha = 8
target_modules = "all-linear"
[[rewards]]
type = "format"
pattern = '^\s*\d'
"#;
    let straight = tmp.path().join("straight");
    let r = recipe(
        &straight,
        "grpo",
        &fixture().prompts,
        extra,
        &["train.max_steps=5", "model.quantize=\"nf4\""],
    );
    run(&r, None, None);
    let kl = metric(&straight.join("run"), "kl");
    assert!(kl.iter().all(|k| k.is_finite() && *k >= 0.0), "{kl:?}");
    assert!(
        kl.last().unwrap() > &0.0,
        "adapters moved the policy off the base: {kl:?}"
    );

    // Stop after step 3: the second update on rollout 2 is still pending in the cursor.
    let resumed = tmp.path().join("resumed");
    let r = recipe(
        &resumed,
        "grpo",
        &fixture().prompts,
        extra,
        &["train.max_steps=5", "model.quantize=\"nf4\""],
    );
    run(&r, None, Some(3));
    run(&r, Some("auto"), None);
    let (a, b) = (
        metric(&straight.join("run"), "loss"),
        metric(&resumed.join("run"), "loss"),
    );
    assert_eq!(a.len(), 5);
    assert_eq!(
        a, b,
        "resume replays the pending update and the same rollouts"
    );
}

#[test]
fn ppo_raises_a_trained_reward_models_score() {
    let tmp = tempfile::tempdir().unwrap();
    let rm_dir = tmp.path().join("rm");
    let rm = recipe(
        &rm_dir,
        "reward",
        &fixture().pairs,
        "",
        &["train.max_steps=80", "train.learning_rate=3e-3"],
    );
    let report = run(&rm, None, None);
    let acc = metric(&rm_dir.join("run"), "eval_accuracy");
    assert!(
        *acc.last().unwrap() >= 0.9,
        "the reward model learns the preference: {acc:?}"
    );
    let rm_path = report.final_dir.unwrap();

    let dir = tmp.path().join("ppo");
    let extra = format!(
        r#"
[ppo]
max_completion_length = 3
temperature = 1.0
kl_coef = 0.02
kl_estimator = "k1"
gamma = 1.0
lam = 0.95
cliprange = 0.2
cliprange_value = 0.2
vf_coef = 0.1
num_ppo_epochs = 2
num_mini_batches = 1
whiten_rewards = false
[[rewards]]
type = "model"
path = "{}"
"#,
        rm_path.display()
    );
    let report = ppo_raises_the_score(&dir, &extra, "shared critic");
    let eval = metric(&dir.join("run"), "eval_reward");
    assert!(eval.last().unwrap() > &eval[0], "held-out score {eval:?}");
    for key in [
        "loss/value",
        "val/clipfrac",
        "policy/clipfrac",
        "objective/kl",
    ] {
        assert!(!metric(&dir.join("run"), key).is_empty(), "{key} missing");
    }
    let fin = report.final_dir.unwrap();
    assert!(fin.join("value_head.safetensors").exists());

    // A separate critic, initialised from the same reward model, with its own optimizer
    // and learning rate: the score rises too, and the critic is exported beside the policy.
    let separate = extra.replacen(
        "whiten_rewards = false\n",
        "whiten_rewards = false\ncritic = \"separate\"\nvf_learning_rate = 1e-3\n",
        1,
    );
    assert!(separate.contains("separate"));
    let dir = tmp.path().join("ppo-critic");
    let report = ppo_raises_the_score(&dir, &separate, "separate critic");
    let value_loss = metric(&dir.join("run"), "loss/value");
    assert_eq!(value_loss.len(), 30, "the critic trains every step");
    let fin = report.final_dir.unwrap();
    assert!(
        !fin.join("value_head.safetensors").exists(),
        "the policy has no value head"
    );
    let (cfg, _) = models::checkpoint::load_model::<models::backend::Cpu>(
        &fin.join("critic"),
        &Default::default(),
    )
    .unwrap();
    assert!(cfg.reward_head, "the critic is saved as a reward model");

    // Resume restores the critic and its optimizer: the same losses as one straight run.
    let straight = tmp.path().join("critic-straight");
    let resumed = tmp.path().join("critic-resumed");
    for (dir, stops) in [(&straight, vec![None]), (&resumed, vec![Some(3), None])] {
        let r = recipe(
            dir,
            "ppo",
            &fixture().prompts,
            &separate,
            &["train.max_steps=6", "train.save_steps=3"],
        );
        for (i, stop) in stops.into_iter().enumerate() {
            run(&r, (i > 0).then_some("auto"), stop);
        }
    }
    for key in ["loss", "loss/value"] {
        assert_eq!(
            metric(&straight.join("run"), key),
            metric(&resumed.join("run"), key),
            "{key}"
        );
    }
}

/// GSPO (`importance_sampling_level = "sequence"`: one clipped ratio per completion) learns
/// the same verifiable reward.
#[test]
fn gspo_raises_a_verifiable_format_reward() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Into FORMAT's [grpo] table, before its [[rewards]].
    let extra = FORMAT.replacen(
        "max_completion_length = 4\n",
        "max_completion_length = 4\nimportance_sampling_level = \"sequence\"\n",
        1,
    );
    assert!(extra.contains("sequence"));
    let r = recipe(dir, "grpo", &fixture().prompts, &extra, &[]);
    assert_eq!(
        r.grpo.as_ref().unwrap().importance_sampling_level,
        trainers::rl::grpo::ImportanceLevel::Sequence
    );
    run(&r, None, None);
    let reward = metric(&dir.join("run"), "reward");
    let (first, last) = (mean(&reward[..5]), mean(&reward[25..]));
    assert!(
        last > first + 0.3 && last > 0.7,
        "mean reward {first:.2} -> {last:.2}: {reward:?}"
    );
}

/// A 30-step PPO run of the `[ppo]` section `extra` in `dir`: the reward-model score of its
/// last steps beats its first by more than 0.5.
fn ppo_raises_the_score(dir: &Path, extra: &str, what: &str) -> TrainReport {
    let r = recipe(
        dir,
        "ppo",
        &fixture().prompts,
        extra,
        &["train.max_steps=30"],
    );
    let report = run(&r, None, None);
    let scores = metric(&dir.join("run"), "objective/scores");
    let (first, last) = (mean(&scores[..4]), mean(&scores[26..]));
    assert!(
        last > first + 0.5,
        "{what}: reward-model score {first:.2} -> {last:.2}: {scores:?}"
    );
    report
}
