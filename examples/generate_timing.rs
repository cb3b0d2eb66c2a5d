//! Wall time of batched sampling on an HF model directory (a profiling aid):
//! `cargo run --release --example generate_timing -- MODEL_DIR [prompt_len] [lora r]`:
//! 2 prompts x 4 samples x 32 tokens (GRPO's bench shape), prefill and decoding step apart.
//! With `DECODE_ONLY=1` it runs 400 decoding steps over one filled cache, for `perf`; with
//! `BASE_DTYPE=bfloat16` (or `float16`) the base is stored in half precision, as
//! `[model] dtype` stores it under an adapter.
use burn::backend::Flex;
use models::generate::{generate_groups, SamplingParams};
use models::lora::LoraSettings;
use std::path::PathBuf;
use std::time::Instant;

#[global_allocator]
static GLOBAL: trainers::allocator::MiMalloc = trainers::allocator::MiMalloc;

fn main() {
    trainers::allocator::tune_for_training();
    let args: Vec<String> = std::env::args().collect();
    let Some(dir) = args.get(1).map(PathBuf::from) else {
        eprintln!("usage: generate_timing MODEL_DIR [prompt_len] [lora_r]");
        std::process::exit(2);
    };
    let prompt_len: usize = args.get(2).map_or(120, |s| s.parse().unwrap());
    let r: usize = args.get(3).map_or(16, |s| s.parse().unwrap());
    let dev = Default::default();
    let half = models::half::storage_dtype(
        &std::env::var("BASE_DTYPE").unwrap_or_else(|_| "float32".into()),
    )
    .unwrap();
    let (_, mut model) =
        models::checkpoint::load_model_stored::<Flex>(&dir, &dev, None, half).unwrap();
    if r > 0 {
        let settings = LoraSettings {
            r,
            alpha: 32.0,
            dropout: 0.0,
            target_modules: vec!["all-linear".into()],
            use_rslora: false,
            use_dora: false,
        };
        model = model.with_lora(&settings, 0).unwrap();
    }
    let prompts: Vec<Vec<u32>> = (0..2)
        .map(|p| {
            (0..prompt_len - 7 * p)
                .map(|i| (i * 31 + p * 7) as u32 % 7000 + 3)
                .collect()
        })
        .collect();
    let params = SamplingParams {
        max_new_tokens: 32,
        temperature: 1.0,
        seed: 1,
        ..Default::default()
    };
    let prefill_only = SamplingParams {
        max_new_tokens: 1,
        ..params.clone()
    };
    if std::env::var_os("DECODE_ONLY").is_some() {
        println!("{:.2} ms/step", decode_forward_ms(&model, prompt_len));
        return;
    }
    for _ in 0..3 {
        println!(
            "decode forward alone (batch 8, {prompt_len} cached): {:.2} ms/step",
            decode_forward_ms(&model, prompt_len)
        );
    }
    for round in 0..4 {
        let s = Instant::now();
        generate_groups(&model, &prompts, 4, &prefill_only, None).unwrap();
        let prefill = s.elapsed().as_secs_f64();
        let s = Instant::now();
        let out = generate_groups(&model, &prompts, 4, &params, None).unwrap();
        let secs = s.elapsed().as_secs_f64();
        let n: usize = out.iter().map(|g| g.tokens.len()).sum();
        println!(
            "round {round}: {n} tokens in {secs:.3} s = {:.1} tok/s; prefill {:.1} ms, decode step {:.2} ms",
            n as f64 / secs,
            prefill * 1e3,
            (secs - prefill) * 1e3 / 31.0
        );
    }
}

/// Forward-only decoding steps of batch 8 over a filled cache (no sampling).
fn decode_forward_ms(model: &models::CausalLm<Flex>, past: usize) -> f64 {
    use models::mask::AttentionLayout;
    use models::ForwardInput;
    let dev = model.device();
    let steps = if std::env::var_os("DECODE_ONLY").is_some() {
        400
    } else {
        32
    };
    let cap = past + steps + 1;
    let mut cache = model.new_cache(cap);
    let ids: Vec<Vec<u32>> = (0..8)
        .map(|r| (0..past).map(|i| (i * 7 + r) as u32 % 5000 + 3).collect())
        .collect();
    let mut layout = AttentionLayout::from_attention_mask(&vec![vec![1u8; past]; 8]);
    for v in layout.key_valid.iter_mut() {
        v.resize(cap, false);
    }
    let pos: Vec<Vec<i64>> = (0..8).map(|_| (0..past as i64).collect()).collect();
    let h = model.hidden_states(
        ForwardInput::from_host(&ids, &pos, &layout, &dev),
        Some(&mut cache),
    );
    let _ = h.into_data();
    let s = Instant::now();
    let rewind = std::env::var_os("DECODE_ONLY").is_some();
    for step in 0..steps {
        if rewind {
            cache.len = past;
        }
        for v in layout.key_valid.iter_mut() {
            v[cache.len] = true;
        }
        layout.q_len = 1;
        layout.q_offset = cache.len;
        let ids: Vec<Vec<u32>> = (0..8)
            .map(|r| vec![(step * 13 + r) as u32 % 5000 + 3])
            .collect();
        let pos: Vec<Vec<i64>> = (0..8).map(|_| vec![cache.len as i64]).collect();
        let h = model.hidden_states(
            ForwardInput::from_host(&ids, &pos, &layout, &dev),
            Some(&mut cache),
        );
        let _ = model.logits(h).into_data();
    }
    s.elapsed().as_secs_f64() * 1e3 / steps as f64
}
