//! A Llama-2-7B-shaped QLoRA job on the CPU (issue 18): the model is drawn at random and each
//! linear weight quantised to NF4 as it is generated (no 27 GB file), the embedding and LM head
//! stored in bf16 (`[model] dtype = "bfloat16"`), LoRA r16 on every linear layer, per-layer
//! gradient checkpointing, batch 1 x SEQ tokens, AdamW on the adapters; prints the build time,
//! each step's loss and time, and the peak RSS.
//!
//!     cargo run --release --example qlora_7b -- [steps 2] [seq 512]

use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::FloatDType;
use datasets::batch::{collate_sft, Padding};
use datasets::pack::PackedRow;
use models::lora::LoraSettings;
use models::nf4::{Nf4Settings, Quantization};
use models::presets::RandomInit;
use models::{CausalLm, ModelConfig};

#[global_allocator]
static GLOBAL: trainers::allocator::MiMalloc = trainers::allocator::MiMalloc;

type B = Autodiff<Flex, models::backend::Checkpointing>;

fn peak_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap()
        / 1024.0
}

fn main() {
    trainers::allocator::tune_for_training();
    let mut args = std::env::args().skip(1);
    let steps: usize = args.next().map_or(2, |s| s.parse().expect("steps"));
    let seq: usize = args.next().map_or(512, |s| s.parse().expect("seq"));
    let cfg = ModelConfig::from_json_str(
        r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
            "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float32"}"#,
    )
    .expect("Llama-2-7B config");
    let quantization = Quantization {
        nf4: Nf4Settings::default(),
        lm_head: false,
    };
    let dev = Default::default();
    let t = std::time::Instant::now();
    let model = CausalLm::<B>::from_source_stored(
        &cfg,
        &mut RandomInit::new(0, 0.02),
        &dev,
        Some(&quantization),
        Some(FloatDType::BF16),
    )
    .expect("build");
    let lora = LoraSettings {
        r: 16,
        alpha: 32.0,
        dropout: 0.0,
        target_modules: vec!["all-linear".into()],
        use_rslora: false,
        use_dora: false,
    };
    let mut model = model.with_lora(&lora, 0).expect("lora");
    println!(
        "built {:.2}B parameters (NF4 linear layers, bf16 embedding and head) in {:.0} s; peak RSS {:.0} MB",
        cfg.num_parameters() as f64 / 1e9,
        t.elapsed().as_secs_f64(),
        peak_mb()
    );
    let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();
    for step in 0..steps {
        let row = PackedRow::completion(
            (0..seq)
                .map(|i| ((i * 7919 + step * 31) % 31990) as u32 + 3)
                .collect(),
            0,
        );
        let batch = collate_sft(&[row], Padding::exact(0), 1);
        let t = std::time::Instant::now();
        let loss = trainers::sft::sft_loss_sum(&model, &batch).div_scalar(seq as f64);
        let value: f32 = loss.clone().into_scalar().elem();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-4, model, grads);
        println!(
            "step {} loss {value:.4}  {:.0} s  ({:.1} tokens/s)  peak RSS {:.0} MB",
            step + 1,
            t.elapsed().as_secs_f64(),
            seq as f64 / t.elapsed().as_secs_f64(),
            peak_mb()
        );
    }
    let _ = model.valid();
}
