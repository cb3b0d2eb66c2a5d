//! Foundation benchmark: forward-pass and generation throughput of the `small` preset on
//! CPU, and a training step (forward + backward) on burn-flex versus burn-ndarray.
//!
//! Run: `cargo bench --bench foundation` (BURNISH_BENCH_QUICK=1 for a short run).

use burn::backend::{Autodiff, Flex, NdArray};
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::AutodiffBackend;
use models::generate::{generate, SamplingParams};
use models::presets::{preset_config, PresetTokens, RandomInit};
use models::{CausalLm, ForwardInput, ModelConfig};
use std::time::Instant;

fn small_config() -> ModelConfig {
    let tokens = PresetTokens {
        bos: Some(1),
        eos: vec![2],
        pad: Some(0),
    };
    preset_config("small", "llama", 32064, &tokens).unwrap()
}

fn batch(b: usize, t: usize, vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut x = seed;
    (0..b)
        .map(|_| {
            (0..t)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((x >> 33) % vocab as u64) as u32
                })
                .collect()
        })
        .collect()
}

fn forward_tokens_per_s<B: Backend>(model: &CausalLm<B>, b: usize, t: usize, reps: usize) -> f64 {
    let device = model.device();
    let ids = batch(b, t, model.vocab_size(), 1);
    let _ = model
        .forward(ForwardInput::causal(&ids, &device))
        .into_data();
    let start = Instant::now();
    for _ in 0..reps {
        let _ = model
            .forward(ForwardInput::causal(&ids, &device))
            .into_data();
    }
    (b * t * reps) as f64 / start.elapsed().as_secs_f64()
}

fn generation_tokens_per_s<B: Backend>(
    model: &CausalLm<B>,
    b: usize,
    prompt: usize,
    new: usize,
) -> f64 {
    let prompts = batch(b, prompt, model.vocab_size(), 2);
    let params = SamplingParams {
        max_new_tokens: new,
        temperature: 1.0,
        top_p: 0.95,
        seed: 3,
        ..Default::default()
    };
    let _ = generate(
        model,
        &prompts[..1],
        &SamplingParams {
            max_new_tokens: 2,
            ..params.clone()
        },
        None,
    )
    .unwrap();
    let start = Instant::now();
    let out = generate(model, &prompts, &params, None).unwrap();
    let n: usize = out.iter().map(|g| g.tokens.len()).sum();
    n as f64 / start.elapsed().as_secs_f64()
}

fn train_step_tokens_per_s<B: AutodiffBackend>(
    cfg: &ModelConfig,
    b: usize,
    t: usize,
    reps: usize,
) -> f64 {
    let device: B::Device = Default::default();
    let model = CausalLm::<B>::from_source(cfg, &mut RandomInit::new(0, 0.02), &device).unwrap();
    let ids = batch(b, t + 1, cfg.vocab_size, 4);
    let inputs: Vec<Vec<u32>> = ids.iter().map(|r| r[..t].to_vec()).collect();
    let targets: Vec<i64> = ids
        .iter()
        .flat_map(|r| r[1..].iter().map(|&x| x as i64))
        .collect();
    let step = || {
        let logits = model.forward(ForwardInput::causal(&inputs, &device));
        let tgt =
            Tensor::<B, 3, Int>::from_data(TensorData::new(targets.clone(), [b, t, 1]), &device);
        let loss = log_softmax(logits, 2).gather(2, tgt).mean().neg();
        let grads = loss.backward();
        drop(grads);
    };
    step();
    let start = Instant::now();
    for _ in 0..reps {
        step();
    }
    (b * t * reps) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let quick = std::env::var("BURNISH_BENCH_QUICK").is_ok();
    let cfg = small_config();
    println!(
        "small preset: {:.1}M parameters, hidden {}, {} layers, vocab {}; threads: {}",
        cfg.num_parameters() as f64 / 1e6,
        cfg.hidden_size,
        cfg.num_hidden_layers,
        cfg.vocab_size,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    let device = Default::default();
    let model =
        CausalLm::<Flex>::from_source(&cfg, &mut RandomInit::new(0, 0.02), &device).unwrap();
    let reps = if quick { 1 } else { 3 };
    let fwd = forward_tokens_per_s(&model, 4, 256, reps);
    println!("forward (flex, batch 4 x 256): {fwd:.0} tokens/s");
    let (gb, gn) = if quick { (4, 16) } else { (8, 64) };
    let gen = generation_tokens_per_s(&model, gb, 32, gn);
    println!("generation (flex, KV cache, batch {gb}, prompt 32, {gn} new): {gen:.1} tokens/s");
    let gen1 = generation_tokens_per_s(&model, 1, 32, gn);
    println!("generation (flex, KV cache, batch 1, prompt 32, {gn} new): {gen1:.1} tokens/s");
    drop(model);

    let (tb, tt) = if quick { (2, 64) } else { (4, 128) };
    let flex = train_step_tokens_per_s::<Autodiff<Flex>>(&cfg, tb, tt, reps);
    let nd = train_step_tokens_per_s::<Autodiff<NdArray>>(&cfg, tb, tt, reps);
    println!("train step fwd+bwd (batch {tb} x {tt}): flex {flex:.0} tokens/s, ndarray {nd:.0} tokens/s, flex/ndarray = {:.2}x", flex / nd);
}
