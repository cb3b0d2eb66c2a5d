//! Training benchmark on the `small` preset, 2 CPU threads, through the shared loop:
//! full SFT vs LoRA (micro-batch 8 x 256 tokens, every token trained), and DPO with LoRA
//! (micro-batch 4 pairs, prompt 128 + completion 128 tokens per side) with the reference
//! run every step vs precomputed once.
//!
//! Each mode runs in its own process so peak RSS (VmHWM) is that mode's alone.
//! Run: `cargo bench --bench train` (BURNISH_BENCH_STEPS=N measured steps, default 3).

use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;

use datasets::pack::PackedRow;
use datasets::tokenize::TokenizedPair;
use models::backend::CpuTrain;
use models::lora::LoraSettings;
use models::presets::{preset_config, PresetTokens, RandomInit};
use models::CausalLm;
use trainers::dpo::{reference_table, Dpo, DpoSettings, Reference};
use trainers::method::BatchShape;
use trainers::metrics::read_metrics;
use trainers::optim::{trainable_params, AdamWSettings};
use trainers::recipe::Schedule;
use trainers::schedule::LrSchedule;
use trainers::sft::Sft;
use trainers::train_loop::{run_loop, LoopConfig};
use trainers::weights::WeightsFormat;

// The same allocator as the burnish binary, so the figures are the binary's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: usize = 8;
const SEQ: usize = 256;

fn random_ids(x: &mut u64, n: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|_| {
            *x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((*x >> 33) % vocab as u64) as u32
        })
        .collect()
}

fn pairs(n: usize, vocab: usize) -> Vec<TokenizedPair> {
    let mut x = 11u64;
    (0..n)
        .map(|_| TokenizedPair {
            prompt: random_ids(&mut x, SEQ / 2, vocab),
            chosen: random_ids(&mut x, SEQ / 2, vocab),
            rejected: random_ids(&mut x, SEQ / 2, vocab),
            margin: None,
        })
        .collect()
}

fn rows(n: usize, vocab: usize) -> Vec<PackedRow> {
    let mut x = 7u64;
    (0..n)
        .map(|_| PackedRow {
            ids: random_ids(&mut x, SEQ, vocab),
            trained: vec![true; SEQ],
            positions: (0..SEQ as u32).collect(),
            segments: vec![0; SEQ],
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
    let mut precompute_s = 0.0;
    if mode.starts_with("dpo") {
        let pairs_per_step = BATCH / 2;
        let data = pairs(pairs_per_step * total, cfg.vocab_size);
        let reference = if mode == "dpo-precomputed" {
            let t0 = std::time::Instant::now();
            let mut base = burn::module::AutodiffModule::valid(&model);
            base.set_adapters_enabled(false);
            let train = reference_table(&base, &data, pairs_per_step, 0);
            precompute_s = t0.elapsed().as_secs_f64();
            Reference::Precomputed {
                train,
                eval: vec![],
            }
        } else {
            Reference::BaseOfAdapters
        };
        let shape = BatchShape {
            micro_batch: pairs_per_step,
            eval_batch: pairs_per_step,
            pad_id: 0,
            seed: 0,
        };
        let mut method = Dpo::new(data, vec![], shape, DpoSettings::default(), reference).unwrap();
        run_loop(model, &mut method, &loop_cfg, &weights, None, &stop).unwrap();
    } else {
        let mut method = Sft::new(
            rows(BATCH * total, cfg.vocab_size),
            vec![],
            BATCH,
            BATCH,
            0,
            0,
        )
        .unwrap();
        run_loop(model, &mut method, &loop_cfg, &weights, None, &stop).unwrap();
    }
    let metrics = read_metrics(&loop_cfg.run_dir.join("metrics.jsonl")).unwrap();
    // Step 1 warms allocators and caches; report the mean of the rest.
    let rates: Vec<f64> = metrics
        .iter()
        .skip(1)
        .filter_map(|m| m["tokens_per_s"].as_f64())
        .collect();
    let mean = rates.iter().sum::<f64>() / rates.len().max(1) as f64;
    println!(
        "{{\"mode\":\"{mode}\",\"trainable\":{trainable},\"tokens_per_s\":{mean:.1},\"peak_rss_mb\":{:.0},\"steps\":{},\"precompute_s\":{precompute_s:.2}}}",
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
    for mode in ["full", "lora", "dpo", "dpo-precomputed"] {
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
        let tps = v["tokens_per_s"].as_f64().unwrap();
        let pairs = if mode.starts_with("dpo") {
            format!("   {:.3} pairs/s", tps / (2 * SEQ) as f64)
        } else {
            String::new()
        };
        let pre = v["precompute_s"].as_f64().unwrap_or(0.0);
        println!(
            "{mode:>15}: {tps:>8.1} tokens/s{pairs}   peak RSS {:>6.0} MB   trainable {:.2}M{}",
            v["peak_rss_mb"].as_f64().unwrap(),
            v["trainable"].as_f64().unwrap() / 1e6,
            if pre > 0.0 {
                format!("   (reference pass {pre:.1}s before training)")
            } else {
                String::new()
            }
        );
        results.push(v);
    }
    let ratio = |a: &serde_json::Value, b: &serde_json::Value| {
        (
            a["tokens_per_s"].as_f64().unwrap() / b["tokens_per_s"].as_f64().unwrap(),
            a["peak_rss_mb"].as_f64().unwrap() / b["peak_rss_mb"].as_f64().unwrap(),
        )
    };
    let (s, m) = ratio(&results[1], &results[0]);
    println!("LoRA / full: speed x{s:.2}, peak memory x{m:.2}");
    let (s, m) = ratio(&results[3], &results[2]);
    println!("DPO precomputed / live reference: speed x{s:.2}, peak memory x{m:.2}");
}
