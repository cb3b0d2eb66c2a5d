//! Memory estimate printed by `--dry-run`: weights, gradients, optimizer state and
//! activations for one micro-batch, from the config alone (no weights loaded).

use models::lora::{linear_module_names, LoraSettings, MLP_MODULES};
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
    /// Frozen models held beside the trained one (a DPO reference, a distillation teacher).
    pub other_models: u64,
}

impl MemoryEstimate {
    pub fn total(&self) -> u64 {
        self.weights + self.gradients + self.optimizer + self.activations + self.other_models
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
        "qkv_proj" => (h, q + 2 * kv),
        "o_proj" => (q, h),
        "gate_proj" | "up_proj" => (h, i),
        "gate_up_proj" => (h, 2 * i),
        _ => (i, h),
    }
}

/// Parameters LoRA adds: `r * (d_in + d_out)` per targeted layer, and `d_out` more with
/// DoRA's magnitude. (Every layer has the targets: a mixture of experts' are its attention.)
pub fn lora_params(cfg: &ModelConfig, lora: &LoraSettings) -> u64 {
    let per_layer: usize = lora
        .targets_in(&linear_module_names(cfg))
        .unwrap_or_default()
        .iter()
        .map(|m| {
            let (a, b) = linear_dims(cfg, m);
            lora.r * (a + b) + if lora.use_dora { b } else { 0 }
        })
        .sum();
    (per_layer * cfg.num_hidden_layers) as u64
}

/// Weights NF4 quantisation covers: every decoder linear layer (a sparse layer's experts,
/// not its router; a dense layer's MLP), and the LM head when asked.
pub fn quantized_params(cfg: &ModelConfig, q: &Quantization) -> u64 {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let attention: usize = linear_module_names(cfg)
        .iter()
        .filter(|m| !MLP_MODULES.contains(m))
        .map(|m| {
            let (a, b) = linear_dims(cfg, m);
            a * b
        })
        .sum();
    let layers: usize = (0..cfg.num_hidden_layers)
        .map(|l| match cfg.moe.as_ref().filter(|_| cfg.is_sparse(l)) {
            Some(m) => attention + m.experts * 3 * h * m.intermediate_size,
            None => attention + 3 * h * i,
        })
        .sum();
    let head = if q.lm_head && !cfg.tie_word_embeddings && !cfg.reward_head {
        cfg.hidden_size * cfg.vocab_size
    } else {
        0
    };
    (layers + head) as u64
}

/// Feed-forward activations per token of layer `l`, in f32 elements: the dense MLP's gate,
/// up, activation and product (4i); a sparse layer's router probabilities (experts), and per
/// routed copy of the token its gathered input and weighted output (2h) and the expert
/// MLP's four (4 * expert width).
fn feed_forward_elements(cfg: &ModelConfig, l: usize) -> u64 {
    match cfg.moe.as_ref().filter(|_| cfg.is_sparse(l)) {
        Some(m) => (m.experts + m.top_k * (2 * cfg.hidden_size + 4 * m.intermediate_size)) as u64,
        None => 4 * cfg.intermediate_size as u64,
    }
}

/// f32 elements of one recomputed attention block, and the most attention probabilities
/// a call keeps (the vendored burn-autodiff's `BLOCK_SCORE_ELEMENTS`/`KEEP_PROBS_ELEMENTS`).
const ATTENTION_BLOCK_ELEMENTS: u64 = 1 << 22;

/// Activation bytes kept for the backward of one micro-batch, and the largest transient
/// buffers of the loss and attention on top of them.
fn activation_bytes(cfg: &ModelConfig, lora: Option<&LoraSettings>, step: &StepShape) -> u64 {
    let StepShape {
        micro_batch,
        seq,
        checkpointing,
        half,
        on_cpu,
    } = *step;
    let fused = on_cpu && seq >= models::causal_attention::FUSED_FROM_TOKENS;
    let h = cfg.hidden_size as u64;
    let q = (cfg.num_attention_heads * cfg.head_dim) as u64;
    let kv = (cfg.num_key_value_heads * cfg.head_dim) as u64;
    let tokens = (micro_batch * seq) as u64;
    // One layer's graph, per token, in f32 elements: what its backward reads. The two norms'
    // inputs and outputs (4h, plus 2h of their statistics and scaled copies), the attention
    // op's q, k, v and output and o_proj's input (3q + 2kv; the fused CPU attention keeps k
    // and v repeated for every query head: 5q), the feed-forward's (`feed_forward_elements`),
    // and each adapter's `x A` (r). Matmul outputs that nothing reads back (o_proj,
    // down_proj, the adapters' `x A B`) are not kept.
    let adapter: u64 = lora.map_or(0, |l| {
        let targets = l.targets_in(&linear_module_names(cfg)).unwrap_or_default();
        (l.r * targets.len()) as u64
    });
    let attention = if fused { 5 * q } else { 3 * q + 2 * kv };
    let layer_of =
        |l: usize| 4 * tokens * (6 * h + attention + feed_forward_elements(cfg, l) + adapter);
    let per_layer: Vec<u64> = (0..cfg.num_hidden_layers).map(layer_of).collect();
    let layer = per_layer.iter().copied().max().unwrap_or(0);
    let all_layers: u64 = per_layer.iter().sum();
    let layers = cfg.num_hidden_layers as u64;
    // Attention: the bool mask (one for all layers; grouped per query head unless fused),
    // and per layer the probabilities when small, else a few blocks of recomputed scores
    // (the fused kernels hold neither: tile-sized scratch only).
    let scores = (micro_batch * cfg.num_attention_heads * seq * seq) as u64;
    let (mask, probs, blocks) = if fused {
        ((micro_batch * seq * seq) as u64, 0, 0)
    } else if scores <= ATTENTION_BLOCK_ELEMENTS {
        (scores, 4 * scores, 0)
    } else {
        (scores, 0, 4 * 4 * ATTENTION_BLOCK_ELEMENTS)
    };
    // With checkpointing each layer keeps its input, and one layer's graph exists at a time
    // (the one being recomputed); without, every layer keeps its graph. Either way the
    // backward through a layer holds gradients about as large as what the layer kept.
    let kept = if checkpointing {
        4 * tokens * h * layers + 2 * layer + probs
    } else {
        all_layers + probs * layers + layer
    };
    // The LM head: each position's gradient with respect to its hidden state, a chunk's
    // logits, exponentials and gradient while it is computed, and a half head's f32 copy.
    let vocab = cfg.vocab_size as u64;
    let chunk = (models::chunked_head::chunk_positions(cfg.vocab_size) as u64).min(tokens);
    let head = 4 * tokens * h + 3 * 4 * chunk * vocab + if half { 4 * vocab * h } else { 0 };
    kept + mask + blocks + head
}

/// What a training step's activations depend on besides the model.
#[derive(Debug, Clone, Copy)]
pub struct StepShape {
    pub micro_batch: usize,
    pub seq: usize,
    pub checkpointing: bool,
    /// The frozen base is stored in half precision.
    pub half: bool,
    /// Trained on the CPU backend (its fused causal attention from 1024 tokens).
    pub on_cpu: bool,
}

/// f32 training: 4 bytes per weight (NF4 ones: their bits per weight; a `half` frozen
/// base: 2), 4 per gradient and 8 of Adam moments per trainable weight; activations as
/// `activation_bytes` counts them.
pub fn estimate(
    cfg: &ModelConfig,
    lora: Option<&LoraSettings>,
    quantization: Option<&Quantization>,
    step: &StepShape,
) -> MemoryEstimate {
    let half = step.half;
    let params = cfg.num_parameters() as u64;
    let (quantized, quantized_bytes) = quantization.map_or((0, 0), |q| nf4_weights(cfg, q));
    let added = lora.map_or(0, |l| lora_params(cfg, l));
    let trainable = if lora.is_some() { added } else { params };
    MemoryEstimate {
        params: params + added,
        trainable,
        weights: if half { 2 } else { 4 } * (params - quantized) + 4 * added + quantized_bytes,
        gradients: 4 * trainable,
        optimizer: 8 * trainable,
        activations: activation_bytes(cfg, lora, step),
        other_models: 0,
    }
}

/// The weights of a frozen model kept for inference: f32, its NF4 layers at their bits.
pub fn frozen_model_bytes(cfg: &ModelConfig, quantization: Option<&Quantization>) -> u64 {
    let params = cfg.num_parameters() as u64;
    let (n, bytes) = quantization.map_or((0, 0), |q| nf4_weights(cfg, q));
    4 * (params - n) + bytes
}

/// How many weights NF4 quantises, and their bytes.
fn nf4_weights(cfg: &ModelConfig, q: &Quantization) -> (u64, u64) {
    let n = quantized_params(cfg, q);
    (n, (n as f64 * q.nf4.bits_per_param() / 8.0).ceil() as u64)
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

#[cfg(test)]
mod tests {
    use super::*;
    use models::nf4::Nf4Settings;

    /// NF4 covers every parameter but the embedding, the norms and the routers (tied head):
    /// a Qwen3-MoE with a dense layer counts that layer's MLP and the other layers' experts.
    #[test]
    fn nf4_covers_the_experts_and_a_dense_layers_mlp() {
        let cfg = ModelConfig::from_json_str(
            r#"{"model_type":"qwen3_moe","hidden_size":16,"num_attention_heads":2,"num_hidden_layers":3,
                "vocab_size":40,"intermediate_size":24,"moe_intermediate_size":8,"num_experts":4,
                "mlp_only_layers":[1],"tie_word_embeddings":true,"head_dim":8}"#,
        )
        .unwrap();
        let q = Quantization {
            nf4: Nf4Settings {
                block_size: 64,
                double_quant: true,
            },
            lm_head: false,
        };
        let (h, layers) = (16, 3);
        let norms = layers * (2 * h + 2 * 8) + h;
        let routers = 2 * 4 * h;
        let embedding = 40 * h;
        assert_eq!(
            quantized_params(&cfg, &q) as usize,
            cfg.num_parameters() - norms - routers - embedding
        );
    }
}
