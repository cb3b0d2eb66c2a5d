//! Peak memory of one SFT forward+backward without checkpointing, with burnish's per-layer
//! recomputation (`[train] gradient_checkpointing`) and with burn-autodiff's
//! BalancedCheckpointing (a probe for issue 18):
//! `cargo run --release --example checkpointing_probe -- none|layers|balanced`.
use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, NoCheckpointing};
use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use datasets::batch::{collate_sft, Padding};
use datasets::pack::PackedRow;
use models::presets::{preset_config, PresetTokens, RandomInit};
use models::CausalLm;

#[global_allocator]
static GLOBAL: trainers::allocator::MiMalloc = trainers::allocator::MiMalloc;

fn rss(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap()
        / 1024.0
}

fn run<B: AutodiffBackend>() {
    let tokens = PresetTokens {
        bos: Some(1),
        eos: vec![2],
        pad: Some(0),
    };
    let cfg = preset_config("small", "llama", 32064, &tokens).unwrap();
    let dev = Default::default();
    let model = CausalLm::<B>::from_source(&cfg, &mut RandomInit::new(0, 0.02), &dev).unwrap();
    let rows: Vec<PackedRow> = (0..4)
        .map(|r| {
            PackedRow::completion(
                (0..1024)
                    .map(|i| ((i * 7 + r) % 32000) as u32 + 3)
                    .collect(),
                0,
            )
        })
        .collect();
    let batch = collate_sft(&rows, Padding::exact(0), 4);
    let before = rss("VmRSS:");
    let t = std::time::Instant::now();
    let loss = trainers::sft::sft_loss_sum(&model, &batch);
    let value: f32 = loss.clone().into_scalar().elem();
    let grads = loss.backward();
    let g = model
        .embed_tokens
        .grad(&grads)
        .unwrap()
        .abs()
        .sum()
        .into_scalar()
        .elem::<f32>();
    println!(
        "loss {value:.6} |grad embed| {g:.6}  peak {:.0} MB (weights etc. {before:.0} MB)  {:.1} s",
        rss("VmHWM:"),
        t.elapsed().as_secs_f64()
    );
}

fn main() {
    trainers::allocator::tune_for_training();
    match std::env::args().nth(1).as_deref() {
        Some("balanced") => run::<Autodiff<Flex, BalancedCheckpointing>>(),
        Some("layers") => run::<Autodiff<Flex, models::backend::Checkpointing>>(),
        _ => run::<Autodiff<Flex, NoCheckpointing>>(),
    }
}
