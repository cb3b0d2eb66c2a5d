//! Seeded random-init models (`burnish new-model`): HF-style configs for the benchmark
//! presets and initialisation as transformers does it (normal(0, initializer_range) for
//! linear and embedding weights, ones for norms, zeros for biases).

use anyhow::{bail, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

use crate::config::ModelConfig;
use crate::llama::WeightSource;

pub const PRESETS: &[&str] = &["tiny", "small", "base"];
pub const ARCHS: &[&str] = &["llama", "qwen2"];

/// Special token ids the config records.
#[derive(Debug, Clone, Default)]
pub struct PresetTokens {
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
    pub pad: Option<u32>,
}

/// `vocab_size` rounded up to a multiple of 64, as many HF models pad it.
pub fn padded_vocab(n: usize) -> usize {
    n.div_ceil(64) * 64
}

pub fn preset_config(
    preset: &str,
    arch: &str,
    vocab_size: usize,
    tokens: &PresetTokens,
) -> Result<ModelConfig> {
    // (hidden, layers, heads, kv heads, intermediate, max positions)
    let (h, l, nh, kv, i, maxp) = match preset {
        "tiny" => (64, 2, 4, 2, 176, 512),
        "small" => (512, 8, 8, 4, 1408, 1024),
        // ~100M+ parameters with a 32k vocabulary, for memory benchmarks.
        "base" => (768, 12, 12, 4, 2048, 2048),
        other => bail!("unknown preset `{other}`; presets: {}", PRESETS.join(", ")),
    };
    let (model_type, arch_name) = match arch {
        "llama" => ("llama", "LlamaForCausalLM"),
        "qwen2" => ("qwen2", "Qwen2ForCausalLM"),
        other => bail!(
            "unknown arch `{other}`; architectures: {}",
            ARCHS.join(", ")
        ),
    };
    let mut raw: Map<String, Value> = Map::new();
    raw.insert("architectures".into(), json!([arch_name]));
    raw.insert("model_type".into(), json!(model_type));
    raw.insert("vocab_size".into(), json!(vocab_size));
    raw.insert("hidden_size".into(), json!(h));
    raw.insert("intermediate_size".into(), json!(i));
    raw.insert("num_hidden_layers".into(), json!(l));
    raw.insert("num_attention_heads".into(), json!(nh));
    raw.insert("num_key_value_heads".into(), json!(kv));
    raw.insert("head_dim".into(), json!(h / nh));
    raw.insert("max_position_embeddings".into(), json!(maxp));
    raw.insert("rms_norm_eps".into(), json!(1e-5));
    raw.insert("rope_theta".into(), json!(10000.0));
    raw.insert("hidden_act".into(), json!("silu"));
    raw.insert("initializer_range".into(), json!(0.02));
    raw.insert(
        "tie_word_embeddings".into(),
        json!(preset == "tiny" || arch == "qwen2"),
    );
    raw.insert("attention_dropout".into(), json!(0.0));
    if model_type == "llama" {
        raw.insert("attention_bias".into(), json!(false));
        raw.insert("mlp_bias".into(), json!(false));
    } else {
        raw.insert("use_sliding_window".into(), json!(false));
    }
    raw.insert("bos_token_id".into(), json!(tokens.bos));
    raw.insert(
        "eos_token_id".into(),
        match tokens.eos.as_slice() {
            [one] => json!(one),
            many => json!(many),
        },
    );
    raw.insert("pad_token_id".into(), json!(tokens.pad));
    raw.insert("torch_dtype".into(), json!("float32"));
    raw.insert("use_cache".into(), json!(true));
    ModelConfig::from_json_str(&Value::Object(raw).to_string())
}

/// Random weights, deterministic for a seed, drawn in HF tensor order.
pub struct RandomInit {
    rng: StdRng,
    std: f32,
}

impl RandomInit {
    pub fn new(seed: u64, std: f32) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            std,
        }
    }

    fn normal(&mut self) -> f32 {
        // Box-Muller: keeps the stream independent of any distribution crate's version.
        let u1: f64 = self.rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = self.rng.random::<f64>();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

impl WeightSource for RandomInit {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let n: usize = shape.iter().product();
        Ok(if name.ends_with("norm.weight") {
            vec![1.0; n]
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            (0..n).map(|_| self.normal() * self.std).collect()
        })
    }
}
