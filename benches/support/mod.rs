//! What the training benchmarks share: synthetic data, one loop configuration, memory
//! readings, and running each mode in its own process so its peak RSS is its own.

#![allow(dead_code)] // each bench uses its own subset

use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;

use burn::tensor::backend::AutodiffBackend;
use datasets::pack::PackedRow;
use datasets::tokenize::TokenizedPair;
use models::lora::LoraSettings;
use models::CausalLm;
use trainers::method::BatchShape;
use trainers::optim::AdamWSettings;
use trainers::recipe::Schedule;
use trainers::schedule::LrSchedule;
use trainers::sft::Sft;
use trainers::train_loop::{run_loop, LoopConfig};
use trainers::weights::WeightsFormat;

/// A deterministic LCG stream of token ids below `vocab`.
pub fn random_ids(x: &mut u64, n: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|_| {
            *x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((*x >> 33) % vocab as u64) as u32
        })
        .collect()
}

/// `n` preference pairs, each side `seq / 2` prompt + `seq / 2` completion tokens.
pub fn pairs(n: usize, seq: usize, vocab: usize) -> Vec<TokenizedPair> {
    let mut x = 11u64;
    (0..n)
        .map(|_| TokenizedPair {
            prompt: random_ids(&mut x, seq / 2, vocab),
            chosen: random_ids(&mut x, seq / 2, vocab),
            rejected: random_ids(&mut x, seq / 2, vocab),
            margin: None,
        })
        .collect()
}

/// `n` SFT rows of `seq` tokens, every token trained.
pub fn rows(n: usize, seq: usize, vocab: usize) -> Vec<PackedRow> {
    let mut x = 7u64;
    (0..n)
        .map(|_| PackedRow {
            ids: random_ids(&mut x, seq, vocab),
            trained: vec![true; seq],
            positions: (0..seq as u32).collect(),
            segments: vec![0; seq],
        })
        .collect()
}

fn status_mb(key: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Peak resident memory of this process so far (VmHWM), in MB.
pub fn peak_rss_mb() -> f64 {
    status_mb("VmHWM:")
}

/// Resident memory now (VmRSS), in MB.
pub fn rss_mb() -> f64 {
    status_mb("VmRSS:")
}

/// `total` constant-LR steps of one micro-batch each, a metrics line per step, no eval and
/// no checkpoints, in `dir/run`.
pub fn loop_config(dir: &Path, total: usize) -> LoopConfig {
    LoopConfig {
        total_steps: total,
        micro_batches: 1,
        schedule: LrSchedule {
            peak: 1e-4,
            warmup: 0,
            total,
            kind: Schedule::Constant,
        },
        adam: AdamWSettings {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
        max_grad_norm: 1.0,
        eval_steps: 0,
        eval_on_start: false,
        save_steps: 0,
        save_total_limit: 1,
        logging_steps: 1,
        seed: 0,
        run_dir: dir.join("run"),
        recipe_fingerprint: String::new(),
        show_progress: false,
        stop_after_steps: Some(total as u64),
        report_to: vec![],
    }
}

/// Mean tokens/s over the steps after the first (which warms allocators and caches).
pub fn mean_tokens_per_s(run_dir: &Path) -> (f64, usize) {
    let metrics = trainers::metrics::read_metrics(&run_dir.join("metrics.jsonl")).unwrap();
    let rates: Vec<f64> = metrics
        .iter()
        .skip(1)
        .filter_map(|m| m["tokens_per_s"].as_f64())
        .collect();
    (
        rates.iter().sum::<f64>() / rates.len().max(1) as f64,
        rates.len(),
    )
}

/// Run this bench binary again with `BURNISH_BENCH_MODE=mode` (and `env`) on 2 threads,
/// and parse the JSON line the child prints.
pub fn run_child(mode: &str, env: &[(&str, String)]) -> serde_json::Value {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.env("BURNISH_BENCH_MODE", mode)
        .env("RAYON_NUM_THREADS", "2");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run benchmark child");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("{mode} failed: {}", String::from_utf8_lossy(&out.stderr)));
    serde_json::from_str(line).unwrap()
}

/// The adapters every LoRA benchmark trains: r = 16, alpha = 32 on every linear layer.
pub fn bench_lora() -> LoraSettings {
    LoraSettings {
        r: 16,
        alpha: 32.0,
        dropout: 0.0,
        target_modules: vec!["all-linear".into()],
        use_rslora: false,
        use_dora: false,
    }
}

/// `cfg.total_steps` SFT steps of `batch` random rows of `seq` tokens through the loop.
pub fn run_sft<B: AutodiffBackend>(
    model: CausalLm<B>,
    weights: &WeightsFormat,
    cfg: &LoopConfig,
    batch: usize,
    seq: usize,
) {
    let vocab = model.vocab_size();
    let mut method = Sft::new(
        rows(batch * cfg.total_steps, seq, vocab),
        vec![],
        BatchShape::exact(batch, batch, 0, 0),
    )
    .unwrap();
    std::fs::create_dir_all(&cfg.run_dir).unwrap();
    run_loop(
        model,
        &mut method,
        cfg,
        weights,
        None,
        &AtomicBool::new(false),
    )
    .unwrap();
}
