//! Training benchmark on the `small` preset, 2 CPU threads, through the shared loop:
//! full SFT vs LoRA (micro-batch 8 x 256 tokens, every token trained), and DPO with LoRA
//! (micro-batch 4 pairs, prompt 128 + completion 128 tokens per side) with the reference
//! run every step vs precomputed once.
//!
//! Each mode runs in its own process so peak RSS (VmHWM) is that mode's alone.
//! Run: `cargo bench --bench train` (BURNISH_BENCH_STEPS=N measured steps, default 3).

mod support;

use std::path::Path;
use std::sync::atomic::AtomicBool;

use datasets::batch::Padding;
use models::backend::CpuTrain;
use models::presets::{preset_config, PresetTokens, RandomInit};
use models::CausalLm;
use trainers::dpo::{reference_table, Dpo, DpoSettings};
use trainers::method::BatchShape;
use trainers::optim::trainable_params;
use trainers::reference::Reference;
use trainers::train_loop::run_loop;
use trainers::weights::WeightsFormat;

use support::{bench_lora, loop_config, mean_tokens_per_s, pairs, peak_rss_mb, run_child, run_sft};

// The same allocator as the burnish binary, so the figures are the binary's.
#[global_allocator]
static GLOBAL: trainers::allocator::MiMalloc = trainers::allocator::MiMalloc;

const BATCH: usize = 8;
const SEQ: usize = 256;

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
    let lora = bench_lora();
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
    let loop_cfg = loop_config(dir, total);
    std::fs::create_dir_all(&loop_cfg.run_dir).unwrap();
    let stop = AtomicBool::new(false);
    let mut precompute_s = 0.0;
    if mode.starts_with("dpo") {
        let pairs_per_step = BATCH / 2;
        let data = pairs(pairs_per_step * total, SEQ, cfg.vocab_size);
        let reference = if mode == "dpo-precomputed" {
            let t0 = std::time::Instant::now();
            let mut base = burn::module::AutodiffModule::valid(&model);
            base.set_adapters_enabled(false);
            let train = reference_table(&base, &data, pairs_per_step, Padding::exact(0));
            precompute_s = t0.elapsed().as_secs_f64();
            Reference::Precomputed {
                train,
                eval: vec![],
            }
        } else {
            Reference::BaseOfAdapters
        };
        let shape = BatchShape::exact(pairs_per_step, pairs_per_step, 0, 0);
        let mut method = Dpo::new(data, vec![], shape, DpoSettings::default(), reference).unwrap();
        run_loop(model, &mut method, &loop_cfg, &weights, None, &stop).unwrap();
    } else {
        run_sft(model, &weights, &loop_cfg, BATCH, SEQ);
    }
    let (mean, measured) = mean_tokens_per_s(&loop_cfg.run_dir);
    println!(
        "{{\"mode\":\"{mode}\",\"trainable\":{trainable},\"tokens_per_s\":{mean:.1},\"peak_rss_mb\":{:.0},\"steps\":{},\"precompute_s\":{precompute_s:.2}}}",
        peak_rss_mb(),
        measured
    );
}

fn main() {
    trainers::allocator::tune_for_training();
    let steps: usize = std::env::var("BURNISH_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    if let Ok(mode) = std::env::var("BURNISH_BENCH_MODE") {
        let dir = tempfile::tempdir().unwrap();
        run_mode(&mode, steps, dir.path());
        return;
    }
    println!("small preset (56M), micro-batch {BATCH} x {SEQ} tokens, 2 threads, {steps} measured steps (+1 warm-up)");
    let mut results = vec![];
    for mode in ["full", "lora", "dpo", "dpo-precomputed"] {
        let v = run_child(mode, &[]);
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
