//! Online RL speed on the `small` preset (56.4M parameters, 32k vocabulary) with LoRA r16 on
//! every linear layer, on the CPU backend: a GRPO step (2 prompts x a group of 4,
//! 32 new tokens) and a PPO step (8 prompts, 32 new tokens, one PPO epoch), on bundled
//! GSM8K questions. Prints generation tokens/s (KV-cache sampling), training tokens/s
//! (prompt + completion tokens through the forward and backward pass), and the share of a
//! step spent rolling out.
//!
//!   cargo bench --bench rl

mod support;

use std::path::Path;
use std::sync::atomic::AtomicBool;

use models::backend::CpuTrain;
use trainers::metrics::read_metrics;
use trainers::{train, Recipe, TrainOptions};

const STEPS: usize = 4;

fn recipe(dir: &Path, method: &str, extra: &str) -> Recipe {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = format!(
        r#"
method = "{method}"
seed = 1
[model]
path = "{model}"
init_preset = "small"
init_tokenizer = "{root}/assets/tokenizers/phi3_vision"
[adapter]
r = 16
alpha = 32
target_modules = "all-linear"
[data]
files = ["{root}/assets/data/gsm8k/gsm8k_test_first200.jsonl"]
max_seq_len = 256
eval_fraction = 0.0
cache_dir = "{dir}/cache"
[train]
output_dir = "{dir}/{method}"
per_device_train_batch_size = 8
learning_rate = 1e-4
lr_scheduler_type = "constant"
max_steps = {STEPS}
eval_on_start = false
save_total_limit = 1
{extra}
"#,
        model = dir.join("model").display(),
        root = root.display(),
        dir = dir.display(),
    );
    Recipe::parse(&text, &[]).unwrap()
}

struct Figures {
    gen_tok_s: f64,
    train_tok_s: f64,
    step_s: f64,
    rollout_share: f64,
}

/// Means over the steps after the first (allocator and cache warm-up).
fn figures(run_dir: &Path) -> Figures {
    let m = read_metrics(&run_dir.join("metrics.jsonl")).unwrap();
    let rows: Vec<_> = m
        .iter()
        .filter(|r| r.get("loss").is_some())
        .skip(1)
        .collect();
    let n = rows.len() as f64;
    let mut f = Figures {
        gen_tok_s: 0.0,
        train_tok_s: 0.0,
        step_s: 0.0,
        rollout_share: 0.0,
    };
    let mut prev_tokens = m
        .iter()
        .find(|r| r.get("loss").is_some())
        .and_then(|r| r["tokens"].as_f64())
        .unwrap_or(0.0);
    for r in &rows {
        let tokens = r["tokens"].as_f64().unwrap() - prev_tokens;
        prev_tokens = r["tokens"].as_f64().unwrap();
        let step_s = tokens / r["tokens_per_s"].as_f64().unwrap();
        let rollout_s = r["rollout_s"].as_f64().unwrap();
        f.gen_tok_s += r["generation_tokens_per_s"].as_f64().unwrap() / n;
        f.train_tok_s += tokens / (step_s - rollout_s) / n;
        f.step_s += step_s / n;
        f.rollout_share += rollout_s / step_s / n;
    }
    f
}

fn main() {
    let tmp = tempfile::tempdir().unwrap();
    let stop = AtomicBool::new(false);
    let opts = TrainOptions {
        resume: None,
        show_progress: false,
        stop: &stop,
        verbose: false,
        stop_after_steps: None,
    };
    println!(
        "online RL, small preset + LoRA r16 all-linear, {} cores, {STEPS} steps (first excluded)",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    for (method, extra) in [
        (
            "grpo",
            "[grpo]\nnum_generations = 4\nmax_completion_length = 32\nbeta = 0.04\n[[rewards]]\ntype = \"accuracy\"",
        ),
        (
            "ppo",
            "[ppo]\nmax_completion_length = 32\nnum_ppo_epochs = 1\nnum_mini_batches = 1\n[[rewards]]\ntype = \"accuracy\"",
        ),
    ] {
        let r = recipe(tmp.path(), method, extra);
        if let Err(e) = train::<CpuTrain>(&r, &opts, &Default::default()) {
            panic!("{method}: {e:#}");
        }
        let f = figures(&tmp.path().join(method));
        println!(
            "{method:5} step {:6.2} s | generation {:7.1} tok/s | training {:7.1} tok/s | rollout {:4.1}% of the step | peak RSS {:.0} MB",
            f.step_s,
            f.gen_tok_s,
            f.train_tok_s,
            100.0 * f.rollout_share,
            support::peak_rss_mb()
        );
    }
}
