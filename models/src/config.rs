//! Hugging Face `config.json` for the Llama family (Llama 2/3, Mistral, Qwen2, Qwen3, Phi-3,
//! Gemma 2/3) and its mixture-of-experts variants (Mixtral, Qwen3-MoE).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::Path;

/// Architectures this crate implements, as `(model_type, architectures[0])`.
pub const SUPPORTED: &[(&str, &str)] = &[
    ("llama", "LlamaForCausalLM"),
    ("mistral", "MistralForCausalLM"),
    ("qwen2", "Qwen2ForCausalLM"),
    ("qwen3", "Qwen3ForCausalLM"),
    ("phi3", "Phi3ForCausalLM"),
    ("gemma2", "Gemma2ForCausalLM"),
    ("gemma3_text", "Gemma3ForCausalLM"),
    ("mixtral", "MixtralForCausalLM"),
    ("qwen3_moe", "Qwen3MoeForCausalLM"),
];

/// Llama-3 style frequency-dependent RoPE scaling (`rope_type = "llama3"`).
#[derive(Debug, Clone, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// LongRoPE (`rope_type = "longrope"`, Phi-3.5 / Phi-3 128k / Phi-4-mini): per-frequency
/// divisors, `short_factor` while a forward pass stays within `original_max_position_embeddings`
/// positions and `long_factor` past it, and cos/sin scaled by `attention_factor`.
#[derive(Debug, Clone, PartialEq)]
pub struct LongRopeScaling {
    pub short_factor: Vec<f64>,
    pub long_factor: Vec<f64>,
    pub original_max_position_embeddings: usize,
    pub attention_factor: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    Llama3(Llama3RopeScaling),
    /// Plain position interpolation (`rope_type = "linear"`): positions divided by `factor`.
    Linear(f64),
    LongRope(LongRopeScaling),
}

/// The parsed architecture. `raw` keeps every key of the original file so that saving
/// writes back what transformers wrote (dtype, token ids, fields we do not interpret).
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    /// Dimensions of each head the rotary embedding turns: `head_dim`, or the first
    /// `head_dim * partial_rotary_factor` (Phi-4-mini).
    pub rotary_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// Gemma 3: the sliding-window layers' own rotary base and scaling
    /// (`rope_parameters.sliding_attention`, or `rope_local_base_freq`); the others use
    /// `rope_theta` and `rope_scaling`.
    pub local_rope: Option<(f64, RopeScaling)>,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (Qwen2 always; Llama when `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama `attention_bias` also covers o_proj).
    pub o_bias: bool,
    /// Qwen3: RMSNorm over each head's queries and keys (`q_norm`, `k_norm`, `[head_dim]`)
    /// before the rotary embedding.
    pub qk_norm: bool,
    /// Phi-3: one `qkv_proj` (`[q | k | v]` outputs) and one `gate_up_proj` (`[gate | up]`)
    /// instead of separate projections.
    pub fused_projections: bool,
    pub mlp_bias: bool,
    /// The MLP's gate activation: SiLU, or Gemma's tanh-approximated GELU.
    pub activation: Activation,
    /// Gemma 2: its architecture's differences from Llama (None for the Llama family).
    pub gemma: Option<GemmaOptions>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// `*ForSequenceClassification` with one label: a reward model (scalar `score` head
    /// on the last non-padding token, no LM head).
    pub reward_head: bool,
    /// Sliding-window attention: a query sees the last `size` keys (itself included) in the
    /// layers marked true (Mistral: all; Qwen2 with `use_sliding_window`: from
    /// `max_window_layers` on; or as `layer_types` lists them).
    pub sliding_window: Option<SlidingWindow>,
    /// Mixtral / Qwen3-MoE: routed experts in place of the MLP (in the layers it marks).
    pub moe: Option<MoeOptions>,
    pub raw: Map<String, Value>,
}

/// A sparse mixture of experts: each token goes through the `top_k` of `experts` MLPs its
/// router scores highest, their outputs weighted by the router's probabilities.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeOptions {
    pub experts: usize,
    pub top_k: usize,
    /// Each expert's MLP width (Mixtral's `intermediate_size`, Qwen3-MoE's
    /// `moe_intermediate_size`).
    pub intermediate_size: usize,
    /// Renormalise the top-k probabilities to sum to one (Mixtral always; Qwen3-MoE's
    /// `norm_topk_prob`).
    pub normalize_top_k: bool,
    /// The load-balancing loss's weight in training (`router_aux_loss_coef`).
    pub aux_loss_coef: f64,
    /// Per layer: routed experts (true) or the dense MLP (Qwen3-MoE's `mlp_only_layers` and
    /// `decoder_sparse_step`).
    pub sparse: Vec<bool>,
    pub naming: ExpertNaming,
}

/// How a checkpoint names the router and the experts' projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertNaming {
    /// `block_sparse_moe.gate`, `block_sparse_moe.experts.N.{w1, w3, w2}` (gate, up, down).
    Mixtral,
    /// `mlp.gate`, `mlp.experts.N.{gate_proj, up_proj, down_proj}`.
    Qwen,
}

impl ExpertNaming {
    /// The module holding the router and the experts, under a layer's prefix.
    pub fn block(self) -> &'static str {
        match self {
            ExpertNaming::Mixtral => "block_sparse_moe",
            ExpertNaming::Qwen => "mlp",
        }
    }

    /// The file names of an expert's gate, up and down projections.
    pub fn projections(self) -> [&'static str; 3] {
        match self {
            ExpertNaming::Mixtral => ["w1", "w3", "w2"],
            ExpertNaming::Qwen => ["gate_proj", "up_proj", "down_proj"],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// `gelu_pytorch_tanh`: `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
    GeluTanh,
}

/// What Gemma 2 computes differently from Llama: RMSNorm scaled by `1 + weight`, embeddings
/// scaled by sqrt(hidden), norms after attention and around the MLP (`pre_feedforward_` /
/// `post_feedforward_layernorm`), attention scaled by `query_pre_attn_scalar^-0.5`, and
/// attention scores and final logits soft-capped (`cap * tanh(x / cap)`).
#[derive(Debug, Clone, PartialEq)]
pub struct GemmaOptions {
    pub query_pre_attn_scalar: f64,
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlidingWindow {
    pub size: usize,
    pub layers: Vec<bool>,
}

#[derive(Deserialize, Serialize)]
struct RawFields {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    /// transformers >= 5 writes `rope_parameters` (theta and scaling together).
    rope_parameters: Option<Value>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    hidden_activation: Option<String>,
    query_pre_attn_scalar: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    pad_token_id: Option<Value>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    layer_types: Option<Vec<String>>,
    partial_rotary_factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
    rope_local_base_freq: Option<f64>,
    num_local_experts: Option<usize>,
    num_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    moe_intermediate_size: Option<usize>,
    norm_topk_prob: Option<bool>,
    router_aux_loss_coef: Option<f64>,
    router_jitter_noise: Option<f64>,
    decoder_sparse_step: Option<usize>,
    mlp_only_layers: Option<Vec<usize>>,
}

/// The experts of a Mixtral or Qwen3-MoE config, as transformers reads them.
fn moe_options(f: &RawFields, model_type: &str, layers: usize) -> Result<Option<MoeOptions>> {
    let positive = |name: &str, v: Option<usize>, default: Option<usize>| -> Result<usize> {
        match v.or(default) {
            Some(0) => bail!("field `{name}` must be positive, found 0"),
            Some(x) => Ok(x),
            None => bail!("missing field `{name}` (a positive integer)"),
        }
    };
    let (experts, intermediate_size, naming, sparse) = match model_type {
        "mixtral" => {
            if let Some(noise) = f.router_jitter_noise.filter(|&n| n != 0.0) {
                bail!(
                    "field `router_jitter_noise` is {noise}: burnish routes without jitter \
                     noise; set it to 0.0"
                );
            }
            (
                positive(
                    "num_local_experts",
                    f.num_local_experts.or(f.num_experts),
                    Some(8),
                )?,
                positive("intermediate_size", f.intermediate_size, None)?,
                ExpertNaming::Mixtral,
                vec![true; layers],
            )
        }
        "qwen3_moe" => {
            let step = positive("decoder_sparse_step", f.decoder_sparse_step, Some(1))?;
            let dense = f.mlp_only_layers.clone().unwrap_or_default();
            if let Some(l) = dense.iter().find(|&&l| l >= layers) {
                bail!("field `mlp_only_layers` names layer {l}; the model has {layers}");
            }
            // transformers 5 writes its attribute-mapped name `num_local_experts`.
            let experts = positive(
                "num_experts",
                f.num_experts.or(f.num_local_experts),
                Some(128),
            )?;
            (
                experts,
                positive("moe_intermediate_size", f.moe_intermediate_size, Some(768))?,
                ExpertNaming::Qwen,
                (0..layers)
                    .map(|l| !dense.contains(&l) && (l + 1).is_multiple_of(step))
                    .collect(),
            )
        }
        _ => return Ok(None),
    };
    let top_k = positive("num_experts_per_tok", f.num_experts_per_tok, Some(2))?;
    if top_k > experts {
        bail!("num_experts_per_tok ({top_k}) is more than the {experts} experts");
    }
    Ok(Some(MoeOptions {
        experts,
        top_k,
        intermediate_size,
        normalize_top_k: model_type == "mixtral" || f.norm_topk_prob.unwrap_or(false),
        // transformers' default for both.
        aux_loss_coef: f.router_aux_loss_coef.unwrap_or(0.001),
        sparse,
        naming,
    }))
}

/// Which layers attend through a window, as transformers reads the config: `layer_types`
/// when given; else Mistral windows every layer when `sliding_window` is set, Qwen2 the
/// layers from `max_window_layers` (default 28) on when `use_sliding_window`; Llama none.
fn sliding_window(f: &RawFields, model_type: &str, layers: usize) -> Result<Option<SlidingWindow>> {
    let Some(size) = f.sliding_window else {
        return Ok(None);
    };
    if size == 0 {
        bail!("field `sliding_window` must be positive, found 0");
    }
    let windowed: Vec<bool> = match &f.layer_types {
        Some(types) => {
            if types.len() != layers {
                bail!(
                    "field `layer_types` lists {} layers, num_hidden_layers is {layers}",
                    types.len()
                );
            }
            types.iter().map(|t| t == "sliding_attention").collect()
        }
        // Phi-3 masks every layer with the window when one is set, as Mistral does.
        None if ["mistral", "mixtral", "phi3"].contains(&model_type) => vec![true; layers],
        // Gemma 2 alternates, starting with a sliding layer; Gemma 3 has five sliding layers
        // to one global (`sliding_window_pattern`).
        None if model_type == "gemma2" => (0..layers).map(|i| i.is_multiple_of(2)).collect(),
        None if model_type == "gemma3_text" => {
            (0..layers).map(|i| !(i + 1).is_multiple_of(6)).collect()
        }
        None if ["qwen2", "qwen3", "qwen3_moe"].contains(&model_type)
            && f.use_sliding_window == Some(true) =>
        {
            let from = f.max_window_layers.unwrap_or(28);
            (0..layers).map(|i| i >= from).collect()
        }
        None => vec![false; layers],
    };
    Ok(windowed.iter().any(|&w| w).then_some(SlidingWindow {
        size,
        layers: windowed,
    }))
}

fn supported_list() -> String {
    SUPPORTED
        .iter()
        .map(|(t, a)| format!("{t} ({a})"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn token_ids(v: &Option<Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => vec![],
    }
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read model config {}", path.display()))?;
        Self::from_json_str(&text)
            .with_context(|| format!("invalid model config {}", path.display()))
    }

    pub fn from_json_str(text: &str) -> Result<Self> {
        /// serde names the type but not the field: the field is the one whose removal
        /// changes the error.
        fn wrong_field(raw: &Map<String, Value>, e: &serde_json::Error) -> String {
            let culprit = raw.keys().find(|k| {
                let mut without = raw.clone();
                without.remove(*k);
                serde_json::from_value::<RawFields>(Value::Object(without))
                    .map_err(|e2| e2.to_string())
                    .err()
                    != Some(e.to_string())
            });
            match culprit {
                Some(k) => format!("field `{k}` has the wrong type ({e})"),
                None => format!("a field has the wrong type ({e})"),
            }
        }
        let raw: Map<String, Value> =
            serde_json::from_str(text).context("config.json is not a JSON object")?;
        let f: RawFields = match serde_json::from_value(Value::Object(raw.clone())) {
            Ok(f) => f,
            Err(e) => bail!("config.json: {}", wrong_field(&raw, &e)),
        };
        let model_type = f.model_type.clone().ok_or_else(|| {
            anyhow::anyhow!(
                "missing field `model_type`; supported: {}",
                supported_list()
            )
        })?;
        if !SUPPORTED.iter().any(|(t, _)| *t == model_type) {
            bail!(
                "unsupported model_type `{model_type}`; supported: {}",
                supported_list()
            );
        }
        let mut reward_head = false;
        if let Some(archs) = &f.architectures {
            for a in archs {
                let causal = a.replace("ForSequenceClassification", "ForCausalLM");
                if !SUPPORTED.iter().any(|(_, s)| *s == causal) {
                    bail!(
                        "unsupported architecture `{a}`; supported: {} (and their ForSequenceClassification reward models)",
                        supported_list()
                    );
                }
                reward_head |= a.ends_with("ForSequenceClassification");
            }
        }
        if reward_head {
            let labels = raw
                .get("num_labels")
                .and_then(Value::as_u64)
                .or_else(|| {
                    raw.get("id2label")
                        .and_then(Value::as_object)
                        .map(|m| m.len() as u64)
                })
                .unwrap_or(2);
            if labels != 1 {
                bail!("sequence classification with {labels} labels is not supported: reward models have num_labels = 1");
            }
        }
        let is_gemma = model_type == "gemma2" || model_type == "gemma3_text";
        let is_gemma3 = model_type == "gemma3_text";
        // Gemma names its activation `hidden_activation` (and may carry an unused
        // `hidden_act`).
        let act = match is_gemma {
            true => f.hidden_activation.as_ref().or(f.hidden_act.as_ref()),
            false => f.hidden_act.as_ref(),
        };
        let activation = match act.map(String::as_str) {
            None if is_gemma => Activation::GeluTanh,
            None | Some("silu") => Activation::Silu,
            Some("gelu_pytorch_tanh") if is_gemma => Activation::GeluTanh,
            Some(other) => bail!(
                "unsupported activation `{other}`: the Llama family uses `silu`, Gemma \
                 `gelu_pytorch_tanh`"
            ),
        };
        let need = |name: &str, v: Option<usize>| -> Result<usize> {
            match v {
                Some(0) => bail!("field `{name}` must be positive, found 0"),
                Some(x) => Ok(x),
                None => bail!("missing field `{name}` (a positive integer)"),
            }
        };
        let hidden_size = need("hidden_size", f.hidden_size)?;
        let num_attention_heads = need("num_attention_heads", f.num_attention_heads)?;
        let num_key_value_heads = f.num_key_value_heads.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            bail!(
                "num_attention_heads ({num_attention_heads}) must be a multiple of num_key_value_heads ({num_key_value_heads})"
            );
        }
        let head_dim = match f.head_dim {
            Some(h) => h,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    bail!("hidden_size ({hidden_size}) is not divisible by num_attention_heads ({num_attention_heads}) and no head_dim is given");
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim % 2 != 0 {
            bail!("head_dim ({head_dim}) must be even for rotary embeddings");
        }
        let partial_rotary = f
            .rope_parameters
            .as_ref()
            .and_then(|p| p.get("partial_rotary_factor"))
            .and_then(Value::as_f64)
            .or(f.partial_rotary_factor)
            .unwrap_or(1.0);
        // transformers: `int(head_dim * partial_rotary_factor)`.
        let rotary_dim = (head_dim as f64 * partial_rotary) as usize;
        if !(0.0..=1.0).contains(&partial_rotary)
            || rotary_dim == 0
            || !rotary_dim.is_multiple_of(2)
        {
            bail!(
                "partial_rotary_factor {partial_rotary} gives {rotary_dim} rotary dimensions \
                 of head_dim {head_dim}; a positive even number is needed"
            );
        }
        let max_position_embeddings = f.max_position_embeddings.unwrap_or(2048);
        let rope = RopeContext {
            rotary_dim,
            max_position_embeddings,
            original_max_position_embeddings: f.original_max_position_embeddings,
        };
        // Gemma 3 keys `rope_parameters` by layer type.
        let by_type = |t: &str| f.rope_parameters.as_ref().and_then(|p| p.get(t));
        let global = match is_gemma3 {
            true => by_type("full_attention"),
            false => f.rope_parameters.as_ref(),
        };
        let theta_of =
            |p: Option<&Value>| p.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64);
        let rope_scaling = match global {
            Some(p) => parse_rope_scaling(Some(p), &rope).context("in `rope_parameters`")?,
            None => {
                parse_rope_scaling(f.rope_scaling.as_ref(), &rope).context("in `rope_scaling`")?
            }
        };
        let default_theta = if is_gemma3 { 1_000_000.0 } else { 10000.0 };
        let rope_theta = theta_of(global).or(f.rope_theta).unwrap_or(default_theta);
        let local_rope = match is_gemma3 {
            true => {
                let local = by_type("sliding_attention");
                let scaling = parse_rope_scaling(local, &rope)
                    .context("in `rope_parameters.sliding_attention`")?;
                let theta = theta_of(local)
                    .or(f.rope_local_base_freq)
                    .unwrap_or(10000.0);
                Some((theta, scaling))
            }
            false => None,
        };
        let is_qwen2 = model_type == "qwen2";
        let attention_bias = f.attention_bias.unwrap_or(false);
        let num_hidden_layers = need("num_hidden_layers", f.num_hidden_layers)?;
        let sliding_window = sliding_window(&f, &model_type, num_hidden_layers)?;
        let moe = moe_options(&f, &model_type, num_hidden_layers)?;
        // Qwen3-MoE's dense layers may be the only users of `intermediate_size`.
        let intermediate_size = match &moe {
            Some(m) if m.sparse.iter().all(|&s| s) => f.intermediate_size.unwrap_or(0),
            _ => need("intermediate_size", f.intermediate_size)?,
        };
        Ok(Self {
            vocab_size: need("vocab_size", f.vocab_size)?,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rotary_dim,
            max_position_embeddings,
            rms_norm_eps: f.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: f.tie_word_embeddings.unwrap_or(is_gemma),
            qkv_bias: is_qwen2 || attention_bias,
            o_bias: !is_qwen2 && attention_bias,
            qk_norm: model_type == "qwen3" || model_type == "qwen3_moe" || is_gemma3,
            local_rope,
            fused_projections: model_type == "phi3",
            activation,
            gemma: is_gemma.then(|| GemmaOptions {
                // transformers' defaults: Gemma 2 uses the head size, Gemma 3 256.
                query_pre_attn_scalar: f.query_pre_attn_scalar.unwrap_or(match is_gemma3 {
                    true => 256.0,
                    false => head_dim as f64,
                }),
                attn_logit_softcapping: f.attn_logit_softcapping,
                final_logit_softcapping: f.final_logit_softcapping,
            }),
            mlp_bias: f.mlp_bias.unwrap_or(false),
            bos_token_id: token_ids(&f.bos_token_id).first().copied(),
            eos_token_ids: token_ids(&f.eos_token_id),
            pad_token_id: token_ids(&f.pad_token_id).first().copied(),
            reward_head,
            sliding_window,
            moe,
            model_type,
            raw,
        })
    }

    /// This config as a reward model's (`LlamaForSequenceClassification`, one label), as
    /// transformers writes it; `pad_id` marks padding for the last-token pick.
    pub fn as_reward_model(&self, pad_id: u32) -> ModelConfig {
        let mut c = self.clone();
        let arch = SUPPORTED
            .iter()
            .find(|(t, _)| *t == c.model_type)
            .map(|(_, a)| a.replace("ForCausalLM", "ForSequenceClassification"))
            .unwrap_or_default();
        c.raw.insert(
            "architectures".into(),
            Value::Array(vec![Value::String(arch)]),
        );
        c.raw.insert("num_labels".into(), Value::from(1));
        c.raw
            .insert("id2label".into(), serde_json::json!({"0": "LABEL_0"}));
        c.raw
            .insert("label2id".into(), serde_json::json!({"LABEL_0": 0}));
        if c.pad_token_id.is_none() {
            c.raw.insert("pad_token_id".into(), Value::from(pad_id));
            c.pad_token_id = Some(pad_id);
        }
        c.reward_head = true;
        c
    }

    pub fn to_json_string(&self) -> String {
        serde_json::to_string_pretty(&Value::Object(self.raw.clone())).expect("config serialises")
    }

    /// Number of parameters, counting the LM head only when untied.
    pub fn num_parameters(&self) -> usize {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let mut attn = h * q + 2 * h * kv + q * h;
        if self.qkv_bias {
            attn += q + 2 * kv;
        }
        if self.o_bias {
            attn += h;
        }
        if self.qk_norm {
            attn += 2 * self.head_dim;
        }
        let mut mlp = 3 * h * i;
        if self.mlp_bias {
            mlp += 2 * i + h;
        }
        let norms = if self.gemma.is_some() { 4 } else { 2 };
        let layers: usize = (0..self.num_hidden_layers)
            .map(|l| match self.moe.as_ref().filter(|m| m.sparse[l]) {
                Some(m) => attn + m.experts * (3 * h * m.intermediate_size + h) + norms * h,
                None => attn + mlp + norms * h,
            })
            .sum();
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + layers + h + head
    }

    /// Whether layer `l` routes its tokens to experts.
    pub fn is_sparse(&self, l: usize) -> bool {
        self.moe.as_ref().is_some_and(|m| m.sparse[l])
    }
}

/// What LongRoPE's parameters are checked and completed against.
struct RopeContext {
    rotary_dim: usize,
    max_position_embeddings: usize,
    /// The top-level field (older Phi-3 configs keep it outside `rope_scaling`).
    original_max_position_embeddings: Option<usize>,
}

fn parse_rope_scaling(v: Option<&Value>, ctx: &RopeContext) -> Result<RopeScaling> {
    let Some(v) = v else {
        return Ok(RopeScaling::None);
    };
    if v.is_null() {
        return Ok(RopeScaling::None);
    }
    let obj = v.as_object().context("must be an object or null")?;
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let num = |k: &str| -> Result<f64> {
        obj.get(k)
            .and_then(|x| x.as_f64())
            .with_context(|| format!("`{k}` is required for rope_type `{kind}`"))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear(num("factor")?)),
        "llama3" => Ok(RopeScaling::Llama3(Llama3RopeScaling {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        })),
        "longrope" | "su" => {
            let factors = |k: &str| -> Result<Vec<f64>> {
                let list: Vec<f64> = obj
                    .get(k)
                    .and_then(Value::as_array)
                    .with_context(|| format!("`{k}` (a list of numbers) is required for longrope"))?
                    .iter()
                    .map(|x| {
                        x.as_f64()
                            .with_context(|| format!("`{k}` must hold numbers"))
                    })
                    .collect::<Result<_>>()?;
                if list.len() != ctx.rotary_dim / 2 {
                    bail!(
                        "`{k}` has {} entries; longrope needs one per rotary frequency ({})",
                        list.len(),
                        ctx.rotary_dim / 2
                    );
                }
                Ok(list)
            };
            let original = obj
                .get("original_max_position_embeddings")
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .or(ctx.original_max_position_embeddings)
                .context("`original_max_position_embeddings` is required for longrope")?;
            // transformers: the ratio of the context lengths when `factor` is not given, and
            // sqrt(1 + ln(factor) / ln(original)) when `attention_factor` is not.
            let factor = obj
                .get("factor")
                .and_then(Value::as_f64)
                .unwrap_or(ctx.max_position_embeddings as f64 / original as f64);
            let attention_factor = match obj.get("attention_factor").and_then(Value::as_f64) {
                Some(a) => a,
                None if factor <= 1.0 => 1.0,
                None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
            };
            Ok(RopeScaling::LongRope(LongRopeScaling {
                short_factor: factors("short_factor")?,
                long_factor: factors("long_factor")?,
                original_max_position_embeddings: original,
                attention_factor,
            }))
        }
        other => bail!(
            "unsupported rope_scaling type `{other}`; supported: default, linear, llama3, longrope"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_unknown_model_type_listing_supported() {
        let err = ModelConfig::from_json_str(r#"{"model_type":"gpt2"}"#).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("gpt2") && msg.contains("qwen2") && msg.contains("LlamaForCausalLM"),
            "{msg}"
        );
    }

    #[test]
    fn mixtures_of_experts_are_read_as_transformers_reads_them() {
        let base =
            r#""hidden_size":64,"num_attention_heads":4,"num_hidden_layers":4,"vocab_size":10"#;
        let parse = |extra: &str| ModelConfig::from_json_str(&format!("{{{base},{extra}}}"));
        let cfg =
            parse(r#""model_type":"mixtral","intermediate_size":8,"num_local_experts":4"#).unwrap();
        let moe = cfg.moe.as_ref().unwrap();
        assert_eq!((moe.experts, moe.top_k, moe.intermediate_size), (4, 2, 8));
        assert!(moe.normalize_top_k && moe.aux_loss_coef == 0.001);
        assert!(moe.sparse.iter().all(|&s| s));
        assert_eq!(moe.naming, ExpertNaming::Mixtral);
        // 4 layers x (attention 4 x 64 x 64 + 4 experts x (3 x 64 x 8 + router 64) + norms).
        let attn = 4 * 64 * 64;
        let layer = attn + 4 * (3 * 64 * 8 + 64) + 2 * 64;
        assert_eq!(cfg.num_parameters(), 10 * 64 + 4 * layer + 64 + 10 * 64);

        // Qwen3-MoE: dense layers from mlp_only_layers and decoder_sparse_step; the
        // attribute-mapped `num_local_experts` transformers 5 writes is read too.
        let cfg = parse(
            r#""model_type":"qwen3_moe","intermediate_size":16,"moe_intermediate_size":8,"num_local_experts":6,"num_experts_per_tok":3,"norm_topk_prob":false,"decoder_sparse_step":2,"mlp_only_layers":[3],"router_aux_loss_coef":0.01"#,
        )
        .unwrap();
        let moe = cfg.moe.as_ref().unwrap();
        assert_eq!(moe.sparse, vec![false, true, false, false]);
        assert_eq!((moe.experts, moe.top_k), (6, 3));
        assert!(!moe.normalize_top_k && moe.aux_loss_coef == 0.01);
        assert!(cfg.qk_norm && cfg.is_sparse(1) && !cfg.is_sparse(0));

        for (extra, says) in [
            (
                r#""model_type":"mixtral","intermediate_size":8,"router_jitter_noise":0.1"#,
                "router_jitter_noise",
            ),
            (
                r#""model_type":"mixtral","intermediate_size":8,"num_local_experts":2,"num_experts_per_tok":3"#,
                "num_experts_per_tok (3) is more than the 2 experts",
            ),
            (
                r#""model_type":"qwen3_moe","mlp_only_layers":[4]"#,
                "`mlp_only_layers` names layer 4",
            ),
            (
                r#""model_type":"qwen3_moe","num_experts":0"#,
                "`num_experts` must be positive",
            ),
        ] {
            let e = format!("{:#}", parse(extra).unwrap_err());
            assert!(e.contains(says), "{extra}: {e}");
        }
    }

    #[test]
    fn phi3_is_fused_and_windowed_and_reads_long_rope() {
        let base = r#""model_type":"phi3","hidden_size":64,"num_attention_heads":4,"num_hidden_layers":2,"vocab_size":10,"intermediate_size":8"#;
        let cfg = ModelConfig::from_json_str(&format!(r#"{{{base},"sliding_window":5}}"#)).unwrap();
        assert!(cfg.fused_projections);
        assert_eq!(cfg.sliding_window.unwrap().layers, vec![true, true]);
        // head_dim 16, rotary 12: six frequencies; factor 4096/1024 = 4.
        let long = r#""partial_rotary_factor":0.75,"max_position_embeddings":4096,"original_max_position_embeddings":1024,"rope_scaling":{"type":"longrope","short_factor":[1,1,1,1,1,2],"long_factor":[2,2,2,2,2,4]}"#;
        let cfg = ModelConfig::from_json_str(&format!("{{{base},{long}}}")).unwrap();
        assert_eq!(cfg.rotary_dim, 12);
        let RopeScaling::LongRope(l) = &cfg.rope_scaling else {
            panic!("{:?}", cfg.rope_scaling)
        };
        assert_eq!(l.original_max_position_embeddings, 1024);
        assert!((l.attention_factor - (1.0 + 4f64.ln() / 1024f64.ln()).sqrt()).abs() < 1e-12);
        let short = long.replace("[2,2,2,2,2,4]", "[2]");
        let err = ModelConfig::from_json_str(&format!("{{{base},{short}}}")).unwrap_err();
        assert!(
            format!("{err:#}").contains("`long_factor` has 1 entries"),
            "{err:#}"
        );
    }

    #[test]
    fn missing_field_is_named() {
        let err = ModelConfig::from_json_str(
            r#"{"model_type":"llama","hidden_size":64,"num_attention_heads":4,"num_hidden_layers":2,"vocab_size":10}"#,
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("intermediate_size"));
    }

    #[test]
    fn qwen2_has_qkv_bias_and_llama3_scaling_parses() {
        let c = ModelConfig::from_json_str(
            r#"{"model_type":"qwen2","hidden_size":64,"intermediate_size":128,"num_attention_heads":4,
                "num_key_value_heads":2,"num_hidden_layers":2,"vocab_size":10,"eos_token_id":[1,2],
                "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#,
        )
        .unwrap();
        assert!(c.qkv_bias && !c.o_bias);
        assert_eq!(c.eos_token_ids, vec![1, 2]);
        assert_eq!(c.head_dim, 16);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3(_)));
    }

    #[test]
    fn sliding_windows_are_read_as_transformers_reads_them() {
        let cfg = |model_type: &str, extra: &str| {
            ModelConfig::from_json_str(&format!(
                r#"{{"model_type":"{model_type}","hidden_size":8,"intermediate_size":16,"num_attention_heads":2,
                    "num_hidden_layers":4,"vocab_size":10{extra}}}"#
            ))
            .unwrap()
            .sliding_window
        };
        let window = |size, layers: [bool; 4]| {
            Some(SlidingWindow {
                size,
                layers: layers.to_vec(),
            })
        };
        assert_eq!(
            cfg("mistral", r#","sliding_window":5"#),
            window(5, [true; 4])
        );
        assert_eq!(cfg("mistral", r#","sliding_window":null"#), None);
        assert_eq!(
            cfg("qwen2", r#","sliding_window":5"#),
            None,
            "use_sliding_window is off"
        );
        assert_eq!(
            cfg(
                "qwen2",
                r#","sliding_window":5,"use_sliding_window":true,"max_window_layers":2"#
            ),
            window(5, [false, false, true, true])
        );
        let types = r#","sliding_window":3,"layer_types":["sliding_attention","full_attention","sliding_attention","full_attention"]"#;
        assert_eq!(cfg("llama", types), window(3, [true, false, true, false]));
        assert_eq!(cfg("llama", ""), None);
    }
}
