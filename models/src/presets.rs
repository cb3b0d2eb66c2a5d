//! Seeded random-init models (`burnish new-model`): HF-style configs for the benchmark
//! presets and initialisation as transformers does it (normal(0, initializer_range) for
//! linear and embedding weights, ones for norms, zeros for biases).

use anyhow::{bail, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

use crate::config::ModelConfig;
use crate::llama::WeightSource;

pub const PRESETS: &[&str] = &["micro", "tiny", "small", "base"];
pub const ARCHS: &[&str] = &[
    "llama",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma2",
    "gemma3",
    "mixtral",
    "qwen3_moe",
];

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
        // A student for distillation tests, smaller than `tiny`.
        "micro" => (32, 1, 2, 1, 88, 512),
        "tiny" => (64, 2, 4, 2, 176, 512),
        "small" => (512, 8, 8, 4, 1408, 1024),
        // ~100M+ parameters with a 32k vocabulary, for memory benchmarks.
        "base" => (768, 12, 12, 4, 2048, 2048),
        other => bail!("unknown preset `{other}`; presets: {}", PRESETS.join(", ")),
    };
    let (model_type, arch_name) = match arch {
        "llama" => ("llama", "LlamaForCausalLM"),
        "qwen2" => ("qwen2", "Qwen2ForCausalLM"),
        "qwen3" => ("qwen3", "Qwen3ForCausalLM"),
        "phi3" => ("phi3", "Phi3ForCausalLM"),
        "gemma2" => ("gemma2", "Gemma2ForCausalLM"),
        "gemma3" => ("gemma3_text", "Gemma3ForCausalLM"),
        "mixtral" => ("mixtral", "MixtralForCausalLM"),
        "qwen3_moe" => ("qwen3_moe", "Qwen3MoeForCausalLM"),
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
    if !model_type.starts_with("gemma") {
        raw.insert("hidden_act".into(), json!("silu"));
    }
    raw.insert("initializer_range".into(), json!(0.02));
    raw.insert(
        "tie_word_embeddings".into(),
        json!(preset == "tiny" || preset == "micro" || arch != "llama"),
    );
    raw.insert("attention_dropout".into(), json!(0.0));
    match model_type {
        "llama" => {
            raw.insert("attention_bias".into(), json!(false));
            raw.insert("mlp_bias".into(), json!(false));
        }
        "phi3" => {
            raw.insert("sliding_window".into(), Value::Null);
        }
        // Eight experts, two per token, each a quarter of the dense MLP's width (so a token's
        // feed-forward costs half the dense one's).
        "mixtral" => {
            raw.insert("sliding_window".into(), Value::Null);
            raw.insert("num_local_experts".into(), json!(8));
            raw.insert("num_experts_per_tok".into(), json!(2));
            raw.insert("intermediate_size".into(), json!(i / 4));
            raw.insert("router_aux_loss_coef".into(), json!(0.02));
            raw.insert("output_router_logits".into(), json!(false));
            raw.insert("router_jitter_noise".into(), json!(0.0));
        }
        "qwen3_moe" => {
            raw.insert("use_sliding_window".into(), json!(false));
            raw.insert("attention_bias".into(), json!(false));
            raw.insert("num_experts".into(), json!(8));
            raw.insert("num_experts_per_tok".into(), json!(2));
            raw.insert("moe_intermediate_size".into(), json!(i / 4));
            raw.insert("norm_topk_prob".into(), json!(true));
            raw.insert("decoder_sparse_step".into(), json!(1));
            raw.insert("mlp_only_layers".into(), json!([]));
            raw.insert("router_aux_loss_coef".into(), json!(0.001));
            raw.insert("output_router_logits".into(), json!(false));
        }
        "gemma2" | "gemma3_text" => {
            // Gemma's own defaults: Gemma 2 soft-caps and alternates windows, Gemma 3 has
            // five sliding layers to one global and a rotary base per layer type.
            let gemma3 = model_type == "gemma3_text";
            raw.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
            raw.insert("query_pre_attn_scalar".into(), json!(h / nh));
            if !gemma3 {
                raw.insert("attn_logit_softcapping".into(), json!(50.0));
                raw.insert("final_logit_softcapping".into(), json!(30.0));
            }
            // Without `layer_types`, transformers and burnish place the windows alike.
            raw.insert("sliding_window".into(), json!(4096));
            if gemma3 {
                raw.insert("rope_local_base_freq".into(), json!(10000.0));
            }
        }
        _ => {
            raw.insert("use_sliding_window".into(), json!(false));
        }
    }
    if model_type == "qwen3" {
        raw.insert("attention_bias".into(), json!(false));
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

/// What `burnish new-model` (and a recipe's `[model] init_preset`) builds.
pub struct NewModelSpec<'a> {
    pub preset: &'a str,
    pub arch: &'a str,
    pub tokenizer_dir: &'a std::path::Path,
    pub out: &'a std::path::Path,
    pub seed: u64,
    /// Template stored when the tokenizer carries none.
    pub chat_template: &'a str,
    pub dtype: crate::weights::DiskDtype,
}

/// End-of-turn markers of common chat formats; any present in the vocabulary also stops generation.
const END_OF_TURN: &[&str] = &[
    "<|end|>",
    "<|im_end|>",
    "<|eot_id|>",
    "</s>",
    "<|endoftext|>",
];

/// The config of a new model of `preset` for the tokenizer in `tokenizer_dir` (its special
/// tokens and end-of-turn markers become the config's ids), and that tokenizer.
pub fn new_model_config(
    preset: &str,
    arch: &str,
    tokenizer_dir: &std::path::Path,
) -> Result<(ModelConfig, crate::TextTokenizer)> {
    let tok = crate::TextTokenizer::from_dir(tokenizer_dir)?;
    let mut eos: Vec<u32> = tok.eos_id.into_iter().collect();
    eos.extend(END_OF_TURN.iter().filter_map(|t| tok.token_to_id(t)));
    eos.sort_unstable();
    eos.dedup();
    let tokens = PresetTokens {
        bos: tok.bos_id,
        eos,
        pad: tok.pad_id.or(tok.eos_id),
    };
    let cfg = preset_config(preset, arch, padded_vocab(tok.vocab_size()), &tokens)?;
    Ok((cfg, tok))
}

/// Write a seeded random-init model in full HF layout: config, weights, tokenizer files,
/// chat template and generation config.
pub fn write_new_model(spec: &NewModelSpec<'_>) -> Result<ModelConfig> {
    use crate::checkpoint::{copy_tokenizer_files, save_model, SaveOptions};
    use crate::weights::write_atomic;

    let (cfg, tok) = new_model_config(spec.preset, spec.arch, spec.tokenizer_dir)?;
    let model = crate::CausalLm::<crate::backend::Cpu>::from_source(
        &cfg,
        &mut RandomInit::new(spec.seed, 0.02),
        &Default::default(),
    )?;
    let opts = SaveOptions {
        dtype: spec.dtype,
        ..Default::default()
    };
    save_model(&model, &cfg, spec.out, None, &opts)?;
    copy_tokenizer_files(spec.tokenizer_dir, spec.out)?;
    ensure_chat_template(spec.out, &tok, spec.chat_template)?;
    let gen = json!({"bos_token_id": tok.bos_id, "eos_token_id": cfg.eos_token_ids, "pad_token_id": cfg.pad_token_id});
    write_atomic(
        &spec.out.join("generation_config.json"),
        serde_json::to_string_pretty(&gen)?.as_bytes(),
    )?;
    Ok(cfg)
}

/// Store the named template in tokenizer_config.json when the tokenizer has none.
fn ensure_chat_template(
    out: &std::path::Path,
    tok: &crate::TextTokenizer,
    name: &str,
) -> Result<()> {
    use anyhow::Context;
    if tok.chat_template.is_some() {
        return Ok(());
    }
    let template = crate::ChatTemplate::named(name)?;
    let path = out.join("tokenizer_config.json");
    let mut cfg: Value = if path.exists() {
        serde_json::from_str(&std::fs::read_to_string(&path)?)
            .with_context(|| format!("{} is not valid JSON", path.display()))?
    } else {
        json!({})
    };
    cfg["chat_template"] = Value::String(template.source);
    crate::weights::write_atomic(&path, serde_json::to_string_pretty(&cfg)?.as_bytes())
}
