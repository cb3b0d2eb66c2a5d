//! Training benchmark: tokens/s and peak memory of full SFT and LoRA through the shared loop
//! on the `small` preset (micro-batch 8 x 256 tokens, every token trained), 2 CPU threads.
//!
//! Each mode runs in its own process so peak RSS (VmHWM) is that mode's alone.
//! Run: `cargo bench --bench train` (BURNISH_BENCH_STEPS=N measured steps, default 3).

use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;

use datasets::pack::PackedRow;
use models::backend::CpuTrain;
use models::lora::LoraSettings;
use models::presets::{preset_config, PresetTokens, RandomInit};
use models::CausalLm;
use trainers::metrics::read_metrics;
use trainers::optim::{trainable_params, AdamWSettings};
use trainers::recipe::Schedule;
use trainers::schedule::LrSchedule;
use trainers::sft::Sft;
use trainers::train_loop::{run_loop, LoopConfig};
use trainers::weights::WeightsFormat;

const BATCH: usize = 8;
const SEQ: usize = 256;

fn rows(n: usize, vocab: usize) -> Vec<PackedRow> {
    let mut x = 7u64;
    (0..n)
        .map(|_| {
            let ids: Vec<u32> = (0..SEQ)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((x >> 33) % vocab as u64) as u32
                })
                .collect();
            PackedRow {
                trained: vec![true; SEQ],
                positions: (0..SEQ as u32).collect(),
                segments: vec![0; SEQ],
                ids,
            }
        })
        .collect()
}

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn run_mode(mode: &str, steps: usize, dir: &Path) {
    let tokens = PresetTokens {
        bos: Some(1),
        eos: vec![2],
        pad: Some(0),
    };
    let cfg = preset_config("small", "llama", 32064, &tokens).unwrap();
    let device = Default::default();
    let model =
        CausalLm::<CpuTrain>::from_source(&cfg, &mut RandomInit::new(0, 0.02), &device).unwrap();
    let lora = LoraSettings {
        r: 16,
        alpha: 32.0,
        dropout: 0.0,
        target_modules: vec!["all-linear".into()],
        use_rslora: false,
    };
    let (model, weights) = match mode {
        "full" => (
            model,
            WeightsFormat::Full {
                cfg: Box::new(cfg.clone()),
                tokenizer_dir: dir.to_path_buf(),
            },
        ),
        _ => (
            model.with_lora(&lora, 0).unwrap(),
            WeightsFormat::Adapter {
                settings: lora.clone(),
                base_model: dir.to_path_buf(),
            },
        ),
    };
    let trainable: usize = trainable_params::<CpuTrain, _>(&model)
        .iter()
        .map(|(_, _, s)| s.iter().product::<usize>())
        .sum();
    let total = steps + 1;
    let mut method = Sft::new(
        rows(BATCH * total, cfg.vocab_size),
        vec![],
        BATCH,
        BATCH,
        0,
        0,
    )
    .unwrap();
    let loop_cfg = LoopConfig {
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
    };
    std::fs::create_dir_all(&loop_cfg.run_dir).unwrap();
    let stop = AtomicBool::new(false);
    run_loop(model, &mut method, &loop_cfg, &weights, None, &stop).unwrap();
    let metrics = read_metrics(&loop_cfg.run_dir.join("metrics.jsonl")).unwrap();
    // Step 1 warms allocators and caches; report the mean of the rest.
    let rates: Vec<f64> = metrics
        .iter()
        .skip(1)
        .filter_map(|m| m["tokens_per_s"].as_f64())
        .collect();
    let mean = rates.iter().sum::<f64>() / rates.len().max(1) as f64;
    println!(
        "{{\"mode\":\"{mode}\",\"trainable\":{trainable},\"tokens_per_s\":{mean:.1},\"peak_rss_mb\":{:.0},\"steps\":{}}}",
        peak_rss_mb(),
        rates.len()
    );
}

fn main() {
    let steps: usize = std::env::var("BURNISH_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    if let Ok(mode) = std::env::var("BURNISH_BENCH_MODE") {
        let dir = tempfile::tempdir().unwrap();
        run_mode(&mode, steps, dir.path());
        return;
    }
    let exe = std::env::current_exe().unwrap();
    println!("small preset (56M), micro-batch {BATCH} x {SEQ} tokens, 2 threads, {steps} measured steps (+1 warm-up)");
    let mut results = vec![];
    for mode in ["full", "lora"] {
        let out = Command::new(&exe)
            .env("BURNISH_BENCH_MODE", mode)
            .env("RAYON_NUM_THREADS", "2")
            .output()
            .expect("run benchmark child");
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.starts_with('{'))
            .unwrap_or_else(|| panic!("{mode} failed: {}", String::from_utf8_lossy(&out.stderr)));
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        println!(
            "{mode:>5}: {:>8.1} tokens/s   peak RSS {:>6.0} MB   trainable {:.2}M",
            v["tokens_per_s"].as_f64().unwrap(),
            v["peak_rss_mb"].as_f64().unwrap(),
            v["trainable"].as_f64().unwrap() / 1e6
        );
        results.push(v);
    }
    let (f, l) = (&results[0], &results[1]);
    println!(
        "LoRA / full: speed x{:.2}, peak memory x{:.2}",
        l["tokens_per_s"].as_f64().unwrap() / f["tokens_per_s"].as_f64().unwrap(),
        l["peak_rss_mb"].as_f64().unwrap() / f["peak_rss_mb"].as_f64().unwrap()
    );
}
