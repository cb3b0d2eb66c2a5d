//! Memory estimate printed by `--dry-run`: weights, gradients, optimizer state and
//! activations for one micro-batch, from the config alone (no weights loaded).

use models::lora::{LoraSettings, LINEAR_MODULES};
use models::nf4::Quantization;
use models::ModelConfig;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryEstimate {
    pub params: u64,
    pub trainable: u64,
    pub weights: u64,
    pub gradients: u64,
    pub optimizer: u64,
    pub activations: u64,
}

impl MemoryEstimate {
    pub fn total(&self) -> u64 {
        self.weights + self.gradients + self.optimizer + self.activations
    }
}

/// `(d_in, d_out)` of a decoder block's linear layer.
fn linear_dims(cfg: &ModelConfig, module: &str) -> (usize, usize) {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let q = cfg.num_attention_heads * cfg.head_dim;
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    match module {
        "q_proj" => (h, q),
        "k_proj" | "v_proj" => (h, kv),
        "o_proj" => (q, h),
        "gate_proj" | "up_proj" => (h, i),
        _ => (i, h),
    }
}

/// Parameters LoRA adds: `r * (d_in + d_out)` per targeted layer.
pub fn lora_params(cfg: &ModelConfig, lora: &LoraSettings) -> u64 {
    let per_layer: usize = lora
        .targets()
        .unwrap_or_default()
        .iter()
        .map(|m| {
            let (a, b) = linear_dims(cfg, m);
            lora.r * (a + b)
        })
        .sum();
    (per_layer * cfg.num_hidden_layers) as u64
}

/// Weights NF4 quantisation covers: every decoder linear layer, and the LM head when asked.
pub fn quantized_params(cfg: &ModelConfig, q: &Quantization) -> u64 {
    let per_layer: usize = LINEAR_MODULES
        .iter()
        .map(|m| {
            let (a, b) = linear_dims(cfg, m);
            a * b
        })
        .sum();
    let head = if q.lm_head && !cfg.tie_word_embeddings && !cfg.reward_head {
        cfg.hidden_size * cfg.vocab_size
    } else {
        0
    };
    (per_layer * cfg.num_hidden_layers + head) as u64
}

/// f32 training: 4 bytes per weight (NF4 ones: their bits per weight), 4 per gradient and 8 of Adam moments per trainable
/// weight; activations kept for backward ~ per token and layer the block's intermediate
/// tensors plus attention probabilities, and the logits with their log-softmax and gradient.
pub fn estimate(
    cfg: &ModelConfig,
    lora: Option<&LoraSettings>,
    quantization: Option<&Quantization>,
    micro_batch: usize,
    seq: usize,
) -> MemoryEstimate {
    let params = cfg.num_parameters() as u64;
    let (quantized, quantized_bytes) = quantization.map_or((0, 0), |q| {
        let n = quantized_params(cfg, q);
        (n, (n as f64 * q.nf4.bits_per_param() / 8.0).ceil() as u64)
    });
    let added = lora.map_or(0, |l| lora_params(cfg, l));
    let trainable = if lora.is_some() { added } else { params };
    let (h, i) = (cfg.hidden_size as u64, cfg.intermediate_size as u64);
    let kv = (cfg.num_key_value_heads * cfg.head_dim) as u64;
    let heads = cfg.num_attention_heads as u64;
    let tokens = (micro_batch * seq) as u64;
    let per_token_layer = 10 * h + 4 * kv + 4 * i + 2 * heads * seq as u64;
    let activations =
        4 * tokens * (per_token_layer * cfg.num_hidden_layers as u64 + 3 * cfg.vocab_size as u64);
    MemoryEstimate {
        params: params + added,
        trainable,
        weights: 4 * (params - quantized + added) + quantized_bytes,
        gradients: 4 * trainable,
        optimizer: 8 * trainable,
        activations,
    }
}

pub fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.0} kB", b / 1e3)
    }
}
