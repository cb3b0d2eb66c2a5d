//! QLoRA memory benchmark: a `small` (56M) and a `base` (125M) model written by the
//! `new-model` code path, loaded in f32 and in NF4 with double quantisation, and one LoRA
//! versus one QLoRA training step on each (r = 16 on every linear layer, micro-batch
//! 2 x 256 tokens, 2 threads). Prints resident memory, bytes per quantised weight against
//! the theoretical 4.127 bits, and the step's peak memory and tokens/s.
//!
//! Each measurement runs in its own process so its peak RSS is its own.
//! Run: `cargo bench --bench qlora` (BURNISH_BENCH_STEPS=N measured steps, default 2).

mod support;

use std::path::{Path, PathBuf};

use models::backend::{Cpu, CpuTrain};
use models::checkpoint::load_model_quantized;
use models::nf4::Quantization;
use models::presets::{write_new_model, NewModelSpec};
use models::weights::DiskDtype;
use trainers::estimate::quantized_params;
use trainers::weights::WeightsFormat;

use support::{
    bench_lora, loop_config, mean_tokens_per_s, peak_rss_mb, rss_mb, run_child, run_sft,
};

#[global_allocator]
static GLOBAL: trainers::allocator::MiMalloc = trainers::allocator::MiMalloc;

const BATCH: usize = 2;
const SEQ: usize = 256;

fn quantization(quant: &str) -> Option<Quantization> {
    (quant == "nf4").then(Quantization::default)
}

/// Load the model and report what it holds.
fn load(dir: &Path, quant: &str) {
    let before = rss_mb();
    let q = quantization(quant);
    let (cfg, model) = load_model_quantized::<Cpu>(dir, &Default::default(), q.as_ref()).unwrap();
    let quantized = q.map_or(0, |q| quantized_params(&cfg, &q));
    let layers = model.linear_layers();
    let nf4: Vec<_> = layers
        .iter()
        .filter_map(|(_, _, p)| p.nf4.as_ref())
        .collect();
    let nf4_bytes: usize = nf4.iter().map(|w| w.storage_bytes()).sum();
    let (rss, peak) = (rss_mb(), peak_rss_mb());
    // What each forward (and each backward) pays to dequantise every layer once.
    let t0 = std::time::Instant::now();
    for _ in 0..3 {
        for w in &nf4 {
            let _ = w.dequantize().into_data();
        }
    }
    let dequant_ms = t0.elapsed().as_secs_f64() * 1000.0 / 3.0;
    println!(
        "{{\"params\":{},\"quantized\":{quantized},\"nf4_bytes\":{nf4_bytes},\"weight_bytes\":{},\"rss_before_mb\":{before:.1},\"rss_mb\":{rss:.1},\"peak_rss_mb\":{peak:.1},\"dequant_ms\":{dequant_ms:.1}}}",
        cfg.num_parameters(),
        model.weight_bytes(),
    );
}

/// One LoRA (or QLoRA) SFT run of `steps + 1` steps.
fn step(dir: &Path, quant: &str, steps: usize) {
    let q = quantization(quant);
    let device = Default::default();
    let (_, model) = load_model_quantized::<CpuTrain>(dir, &device, q.as_ref()).unwrap();
    let lora = bench_lora();
    let model = model.with_lora(&lora, 0).unwrap();
    let weights = WeightsFormat::Adapter {
        settings: lora,
        base_model: dir.to_path_buf(),
    };
    let work = tempfile::tempdir().unwrap();
    let total = steps + 1;
    let loop_cfg = loop_config(work.path(), total);
    run_sft(model, &weights, &loop_cfg, BATCH, SEQ);
    let (tps, measured) = mean_tokens_per_s(&loop_cfg.run_dir);
    println!(
        "{{\"tokens_per_s\":{tps:.1},\"steps\":{measured},\"peak_rss_mb\":{:.1}}}",
        peak_rss_mb()
    );
}

fn write_model(preset: &str, out: &Path) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    write_new_model(&NewModelSpec {
        preset,
        arch: "llama",
        tokenizer_dir: &root.join("assets/tokenizers/phi3_vision"),
        out,
        seed: 0,
        chat_template: "chatml",
        dtype: DiskDtype::F32,
    })
    .unwrap();
}

fn main() {
    trainers::allocator::tune_for_training();
    let steps: usize = std::env::var("BURNISH_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    if let Ok(mode) = std::env::var("BURNISH_BENCH_MODE") {
        let dir = PathBuf::from(std::env::var("BURNISH_BENCH_MODEL").unwrap());
        let quant = std::env::var("BURNISH_BENCH_QUANT").unwrap();
        match mode.as_str() {
            "load" => load(&dir, &quant),
            _ => step(&dir, &quant, steps),
        }
        return;
    }
    let theory = Quantization::default().nf4.bits_per_param();
    println!(
        "NF4 (block 64, double quant: theoretical {theory:.3} bits/weight); LoRA r=16 all-linear; \
         micro-batch {BATCH} x {SEQ} tokens, 2 threads, {steps} measured steps (+1 warm-up)"
    );
    let tmp = tempfile::tempdir().unwrap();
    for preset in ["small", "base"] {
        let dir = tmp.path().join(preset);
        write_model(preset, &dir);
        let env = |quant: &str| {
            vec![
                ("BURNISH_BENCH_MODEL", dir.display().to_string()),
                ("BURNISH_BENCH_QUANT", quant.to_string()),
            ]
        };
        let f32_load = run_child("load", &env("none"));
        let nf4_load = run_child("load", &env("nf4"));
        let params = f32_load["params"].as_f64().unwrap();
        let quantized = nf4_load["quantized"].as_f64().unwrap();
        let bits = nf4_load["nf4_bytes"].as_f64().unwrap() * 8.0 / quantized;
        let mb = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap();
        let held = |v: &serde_json::Value| mb(v, "rss_mb") - mb(v, "rss_before_mb");
        println!(
            "\n{preset}: {:.1}M parameters, {:.1}M in linear layers quantised to NF4",
            params / 1e6,
            quantized / 1e6
        );
        println!(
            "  weights           f32 {:>7.1} MB   nf4 {:>7.1} MB   (x{:.2})",
            mb(&f32_load, "weight_bytes") / 1e6,
            mb(&nf4_load, "weight_bytes") / 1e6,
            mb(&nf4_load, "weight_bytes") / mb(&f32_load, "weight_bytes")
        );
        println!(
            "  quantised layers  {bits:.3} bits/weight ({:+.1}% vs {theory:.3}), {:.4} bytes per base weight; \
             dequantising all of them once: {:.0} ms",
            100.0 * (bits / theory - 1.0),
            bits / 8.0,
            mb(&nf4_load, "dequant_ms")
        );
        println!(
            "  resident after load  f32 {:>7.1} MB   nf4 {:>7.1} MB   (x{:.2}); peak during load f32 {:.0} MB, nf4 {:.0} MB",
            held(&f32_load),
            held(&nf4_load),
            held(&nf4_load) / held(&f32_load),
            mb(&f32_load, "peak_rss_mb"),
            mb(&nf4_load, "peak_rss_mb"),
        );
        let lora = run_child("step", &env("none"));
        let qlora = run_child("step", &env("nf4"));
        println!(
            "  training step peak   LoRA {:>7.1} MB   QLoRA {:>7.1} MB   (x{:.2})",
            mb(&lora, "peak_rss_mb"),
            mb(&qlora, "peak_rss_mb"),
            mb(&qlora, "peak_rss_mb") / mb(&lora, "peak_rss_mb")
        );
        println!(
            "  training speed       LoRA {:>7.1} tok/s QLoRA {:>7.1} tok/s (x{:.2})",
            mb(&lora, "tokens_per_s"),
            mb(&qlora, "tokens_per_s"),
            mb(&qlora, "tokens_per_s") / mb(&lora, "tokens_per_s")
        );
    }
}
