//! Recipes: TOML parsed into typed sections, with `--set section.key=value` overrides and
//! errors that name an unknown key and the closest valid one.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use crate::distill::DistillSettings;
use crate::dpo::DpoSettings;
use crate::kto::KtoSettings;
use crate::orpo::OrpoSettings;
use crate::reward::RewardSettings;
use crate::rl::grpo::GrpoSettings;
use crate::rl::ppo::PpoSettings;
use crate::rl::rewards::RewardSpec;
use datasets::config::DataConfig;
use models::lora::LoraSettings;
use models::nf4::{Nf4Settings, Quantization};

/// Training methods the loop runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MethodName {
    Sft,
    Dpo,
    Reward,
    Distill,
    Grpo,
    Ppo,
    Orpo,
    Kto,
}

impl MethodName {
    /// Online RL methods train on prompts they complete themselves.
    pub fn is_online(self) -> bool {
        matches!(self, MethodName::Grpo | MethodName::Ppo)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub method: MethodName,
    #[serde(default = "default_seed")]
    pub seed: u64,
    pub model: ModelSection,
    /// Present: train LoRA adapters on a frozen base. Absent: full fine-tuning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<AdapterSection>,
    pub data: DataConfig,
    pub train: TrainSection,
    /// `method = "dpo"` settings (TRL `DPOConfig` names); defaults when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dpo: Option<DpoSettings>,
    /// `method = "kto"` settings (TRL `KTOConfig` names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kto: Option<KtoSettings>,
    /// `method = "orpo"` settings (TRL `ORPOConfig` names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orpo: Option<OrpoSettings>,
    /// `method = "reward"` settings (TRL `RewardConfig` names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward: Option<RewardSettings>,
    /// `method = "distill"`: the teacher and the loss (GKD names); required for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<DistillSettings>,
    /// `method = "grpo"` settings (TRL `GRPOConfig` names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpo: Option<GrpoSettings>,
    /// `method = "ppo"` settings (TRL `PPOConfig` names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ppo: Option<PpoSettings>,
    /// GRPO/PPO reward sources (`[[rewards]]` tables), summed with their weights.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rewards: Vec<RewardSpec>,
    /// Evaluation tasks run at every evaluation of the run (`burnish eval`'s tasks and
    /// settings; metrics logged as `eval_{task}_{metric}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<crate::eval::EvalSettings>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Hugging Face model directory (config.json + safetensors + tokenizer.json).
    pub path: PathBuf,
    /// Storage of the frozen base: float32, or bfloat16 / float16 with an adapter (computed
    /// in f32; `models::half`). Trainable weights, gradients and optimizer state are float32.
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// When `path` does not exist, build a seeded random-init model of this preset there
    /// (tiny, small or base) with the tokenizer in `init_tokenizer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_preset: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_tokenizer: Option<PathBuf>,
    #[serde(default)]
    pub init_seed: u64,
    /// When `path` does not exist, train this full-fine-tuning sft recipe first (its
    /// `output_dir/final` must be `path`): a demo's policy starts from an SFT model, as
    /// RLHF pipelines do. `""` means none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_recipe: Option<PathBuf>,
    /// `"nf4"`: load the frozen base's linear layers as 4-bit NormalFloat (QLoRA); needs
    /// an [adapter] section. `"none"` (or absent): float32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantize: Option<String>,
    /// Quantise the NF4 absmax constants too (QLoRA's double quantisation).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub double_quant: bool,
    #[serde(
        default = "default_quant_block",
        skip_serializing_if = "is_default_quant_block"
    )]
    pub quant_block_size: usize,
    /// Quantise the LM head too (it stays float32 by default, as in QLoRA).
    #[serde(default, skip_serializing_if = "is_false")]
    pub quantize_lm_head: bool,
}

impl ModelSection {
    /// The half-precision storage of the frozen base `dtype` asks for (None: float32).
    pub fn half(&self) -> Result<Option<burn::tensor::FloatDType>> {
        models::half::storage_dtype(&self.dtype)
    }

    /// The quantisation the base loads with, if any.
    pub fn quantization(&self) -> Result<Option<Quantization>> {
        match self.quantize.as_deref() {
            None | Some("none") => Ok(None),
            Some("nf4") => {
                let q = Quantization {
                    nf4: Nf4Settings {
                        block_size: self.quant_block_size,
                        double_quant: self.double_quant,
                    },
                    lm_head: self.quantize_lm_head,
                };
                q.nf4.validate().context("[model] quant_block_size")?;
                Ok(Some(q))
            }
            Some(other) => {
                bail!("[model] quantize = `{other}` is not supported; expected `nf4` or `none`")
            }
        }
    }
}

fn is_true(v: &bool) -> bool {
    *v
}

fn is_false(v: &bool) -> bool {
    !*v
}

fn default_quant_block() -> usize {
    Nf4Settings::default().block_size
}

fn is_default_quant_block(v: &usize) -> bool {
    *v == default_quant_block()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterSection {
    /// Only `lora` for now (QLoRA adds a quantised base).
    #[serde(rename = "type", default = "default_adapter_type")]
    pub kind: String,
    #[serde(default = "default_r")]
    pub r: usize,
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    /// Module names (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`,
    /// `down_proj`; Phi-3's fused `qkv_proj`, `gate_up_proj`) or `["all-linear"]`.
    #[serde(default = "default_targets", deserialize_with = "one_or_many")]
    pub target_modules: Vec<String>,
    /// rsLoRA: scale by `alpha / sqrt(r)` instead of `alpha / r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA (PEFT's `use_dora`): a trained magnitude per output feature of every adapted
    /// layer, beside the low-rank update of its direction.
    #[serde(default, skip_serializing_if = "is_false")]
    pub use_dora: bool,
}

impl AdapterSection {
    pub fn lora(&self) -> LoraSettings {
        LoraSettings {
            r: self.r,
            alpha: self.alpha,
            dropout: self.dropout,
            target_modules: self.target_modules.clone(),
            use_rslora: self.use_rslora,
            use_dora: self.use_dora,
        }
    }
}

/// `target_modules = "all-linear"` or a list, as PEFT accepts both.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    pub output_dir: PathBuf,
    /// Start over in an output_dir that holds an earlier run (its checkpoints, metrics and
    /// export are removed). Without it, such a run needs `--resume auto`.
    #[serde(default)]
    pub overwrite_output_dir: bool,
    #[serde(default = "default_batch")]
    pub per_device_train_batch_size: usize,
    #[serde(default = "default_batch")]
    pub per_device_eval_batch_size: usize,
    #[serde(default = "one")]
    pub gradient_accumulation_steps: usize,
    /// Batch widths (and counts of trained positions) rounded up to a multiple of this, and
    /// a fixed row count per batch when above 1 (static shapes). Unset: 64 on CUDA, whose
    /// kernels compile per shape, 1 on the CPU, where padding only adds work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_to_multiple_of: Option<usize>,
    /// CUDA: cubecl's autotune effort per new kernel shape (minimal, balanced, extensive,
    /// full); `BURNISH_AUTOTUNE_LEVEL` overrides it. Unset: cubecl's default (balanced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autotune_level: Option<models::kernel_cache::AutotuneLevel>,
    /// Recompute memory-bound activations (elementwise ops, norms) in the backward pass
    /// instead of keeping them (burn-autodiff's balanced checkpointing): TRL's name. Matmul
    /// outputs are still kept, so this is not per-layer recomputation.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gradient_checkpointing: bool,
    /// Mixtures of experts: the weight of the router's load-balancing loss in the training
    /// loss (TRL's name and default: unset takes the model config's `router_aux_loss_coef`;
    /// 0 turns the loss off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_aux_loss_coef: Option<f64>,
    #[serde(default = "default_lr")]
    pub learning_rate: f64,
    #[serde(default = "default_schedule")]
    pub lr_scheduler_type: Schedule,
    /// Warmup in steps; when 0, `warmup_ratio` of the total steps.
    #[serde(default)]
    pub warmup_steps: usize,
    #[serde(default)]
    pub warmup_ratio: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "default_beta1")]
    pub adam_beta1: f64,
    #[serde(default = "default_beta2")]
    pub adam_beta2: f64,
    #[serde(default = "default_eps")]
    pub adam_epsilon: f64,
    /// Global-norm gradient clipping; 0 turns it off.
    #[serde(default = "default_clip")]
    pub max_grad_norm: f64,
    /// Optimizer steps to run; 0 means `num_train_epochs` decides.
    #[serde(default)]
    pub max_steps: usize,
    #[serde(default = "default_epochs")]
    pub num_train_epochs: f64,
    /// Evaluate every N steps (and at the end); 0 = only at the end.
    #[serde(default)]
    pub eval_steps: usize,
    /// Evaluate before the first step, so the curve shows where training started.
    #[serde(default = "yes")]
    pub eval_on_start: bool,
    /// Checkpoint every N steps (and at the end); 0 = only at the end.
    #[serde(default)]
    pub save_steps: usize,
    /// Keep the newest N checkpoints; 0 keeps all.
    #[serde(default = "default_keep")]
    pub save_total_limit: usize,
    #[serde(default = "one")]
    pub logging_steps: usize,
    /// Also log to these (TRL's name): "tensorboard" (event files in OUTPUT/tensorboard),
    /// "csv" (OUTPUT/metrics.csv), "all" or "none". metrics.jsonl is always written.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub report_to: Vec<String>,
    /// dtype of the final export: float32, bfloat16 or float16.
    #[serde(default = "default_export_dtype")]
    pub export_dtype: String,
    /// Chat prompts generated from before and after training (greedy), printed and logged.
    #[serde(default)]
    pub sample_prompts: Vec<String>,
    #[serde(default = "default_sample_tokens")]
    pub sample_max_new_tokens: usize,
}

impl TrainSection {
    /// The load-balancing loss's weight a mixture of experts trains with (None: without
    /// it), as TRL resolves it: this setting over the model config's; a non-zero setting on a
    /// dense model is an error.
    pub fn router_aux_loss_coef(&self, cfg: &models::ModelConfig) -> Result<Option<f64>> {
        let Some(moe) = &cfg.moe else {
            if self.router_aux_loss_coef.is_some_and(|c| c != 0.0) {
                bail!(
                    "[train] router_aux_loss_coef applies to mixtures of experts; this `{}` \
                     model has no router",
                    cfg.model_type
                );
            }
            return Ok(None);
        };
        let coef = self.router_aux_loss_coef.unwrap_or(moe.aux_loss_coef);
        if !coef.is_finite() || coef < 0.0 {
            bail!("[train] router_aux_loss_coef must be a non-negative number, found {coef}");
        }
        Ok((coef > 0.0).then_some(coef))
    }

    /// `pad_to_multiple_of`, or the backend's default.
    pub fn pad_multiple<B: burn::tensor::backend::Backend>(&self, device: &B::Device) -> usize {
        self.pad_to_multiple_of
            .unwrap_or_else(|| models::backend::default_pad_multiple::<B>(device))
    }
}

fn default_seed() -> u64 {
    42
}
fn default_dtype() -> String {
    "float32".into()
}
fn default_adapter_type() -> String {
    "lora".into()
}
fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    16.0
}
fn default_targets() -> Vec<String> {
    vec!["q_proj".into(), "v_proj".into()]
}
fn default_batch() -> usize {
    8
}
fn one() -> usize {
    1
}
fn yes() -> bool {
    true
}
fn default_lr() -> f64 {
    2e-5
}
fn default_schedule() -> Schedule {
    Schedule::Linear
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_eps() -> f64 {
    1e-8
}
fn default_clip() -> f64 {
    1.0
}
fn default_epochs() -> f64 {
    3.0
}
fn default_keep() -> usize {
    2
}
fn default_export_dtype() -> String {
    "float32".into()
}
fn default_sample_tokens() -> usize {
    48
}

impl Recipe {
    /// Read a recipe file and apply `section.key=value` overrides.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read recipe {}", path.display()))?;
        match Self::parse(&text, overrides) {
            Ok(recipe) => Ok(recipe),
            // The file is fine on its own: the overrides broke it.
            Err(e) if !overrides.is_empty() && Self::parse(&text, &[]).is_ok() => {
                Err(e.context(format!(
                    "with --set {} (recipe {} is valid without them)",
                    overrides.join(" --set "),
                    path.display()
                )))
            }
            Err(e) => Err(e.context(format!("in recipe {}", path.display()))),
        }
    }

    pub fn parse(text: &str, overrides: &[String]) -> Result<Self> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        let mut recipe: Recipe = Recipe::deserialize(toml::Value::Table(table))
            .map_err(|e| anyhow::anyhow!("{}", with_suggestion(&e.to_string())))?;
        // `--set model.init_recipe=""` switches a recipe's init recipe off.
        if recipe
            .model
            .init_recipe
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            recipe.model.init_recipe = None;
        }
        recipe.validate()?;
        Ok(recipe)
    }

    pub fn validate(&self) -> Result<()> {
        self.data.validate()?;
        let t = &self.train;
        if t.per_device_train_batch_size == 0 || t.per_device_eval_batch_size == 0 {
            bail!("[train] batch sizes must be at least 1");
        }
        if t.gradient_accumulation_steps == 0 {
            bail!("[train] gradient_accumulation_steps must be at least 1");
        }
        crate::report::check_report_to(&t.report_to)?;
        if let Some(e) = &self.eval {
            e.parsed_tasks(&e.tasks).context("[eval]")?;
        }
        if t.pad_to_multiple_of == Some(0) {
            bail!("[train] pad_to_multiple_of must be at least 1 (1 pads to the longest row only)");
        }
        if !(t.learning_rate.is_finite() && t.learning_rate > 0.0) {
            bail!(
                "[train] learning_rate must be positive, got {}",
                t.learning_rate
            );
        }
        if !(0.0..1.0).contains(&t.warmup_ratio) {
            bail!(
                "[train] warmup_ratio must be in [0, 1), got {}",
                t.warmup_ratio
            );
        }
        if t.max_steps == 0 && t.num_train_epochs <= 0.0 {
            bail!("[train] set max_steps or a positive num_train_epochs");
        }
        if !(0.0..1.0).contains(&t.adam_beta1) || !(0.0..1.0).contains(&t.adam_beta2) {
            bail!("[train] adam_beta1 and adam_beta2 must be in [0, 1)");
        }
        models::weights::DiskDtype::parse(&t.export_dtype).context("[train] export_dtype")?;
        if self.model.half()?.is_some() && self.adapter.is_none() {
            bail!(
                "[model] dtype `{}` stores the frozen base in half precision and trains through adapters: \
                 add an [adapter] section, or use float32 for full fine-tuning (its master weights, \
                 gradients and Adam state are float32; [train] export_dtype = \"bfloat16\" gives a \
                 half-precision export)",
                self.model.dtype
            );
        }
        if self.model.quantization()?.is_some() && self.adapter.is_none() {
            bail!(
                "[model] quantize = \"nf4\" freezes the base in 4 bits: it trains through adapters, so add an [adapter] section (QLoRA)"
            );
        }
        if let Some(a) = &self.adapter {
            if a.kind != "lora" {
                bail!(
                    "[adapter] type `{}` is not supported; expected `lora`",
                    a.kind
                );
            }
            a.lora().targets()?;
        }
        // A method's own section belongs to that method only.
        let sections = [
            ("dpo", self.dpo.is_some(), MethodName::Dpo),
            ("orpo", self.orpo.is_some(), MethodName::Orpo),
            ("kto", self.kto.is_some(), MethodName::Kto),
            ("reward", self.reward.is_some(), MethodName::Reward),
            ("distill", self.distill.is_some(), MethodName::Distill),
            ("grpo", self.grpo.is_some(), MethodName::Grpo),
            ("ppo", self.ppo.is_some(), MethodName::Ppo),
        ];
        for (name, set, method) in sections {
            if set && self.method != method {
                bail!(
                    "[{name}] is set but method is {:?}; remove the section or set method = \"{name}\"",
                    self.method
                );
            }
        }
        if let Some(d) = &self.dpo {
            d.validate()?;
        }
        if let Some(o) = &self.orpo {
            o.validate()?;
        }
        if let Some(k) = &self.kto {
            k.validate()?;
        }
        match &self.distill {
            Some(d) => d.validate()?,
            None if self.method == MethodName::Distill => {
                bail!("method = \"distill\" needs a [distill] section with at least `teacher = \"DIR\"`")
            }
            None => {}
        }
        self.validate_online()?;
        if self.model.init_recipe.is_some() && self.model.init_preset.is_some() {
            bail!("[model] init_recipe and init_preset are two ways to build the model: set one");
        }
        if self.model.init_preset.is_some() != self.model.init_tokenizer.is_some() {
            bail!("[model] init_preset and init_tokenizer go together: set both or neither");
        }
        Ok(())
    }

    fn validate_online(&self) -> Result<()> {
        if let Some(g) = &self.grpo {
            g.validate()?;
        }
        if let Some(p) = &self.ppo {
            p.validate()?;
        }
        if !self.method.is_online() {
            if !self.rewards.is_empty() {
                bail!(
                    "[[rewards]] are for online methods (grpo, ppo), but method is {:?}",
                    self.method
                );
            }
            return Ok(());
        }
        if self.rewards.is_empty() {
            bail!(
                "method = \"{}\" needs at least one [[rewards]] table, e.g.\n[[rewards]]\ntype = \"accuracy\"",
                format!("{:?}", self.method).to_lowercase()
            );
        }
        for (i, r) in self.rewards.iter().enumerate() {
            r.validate(i)?;
        }
        Ok(())
    }

    /// The resolved recipe (every default filled in), as written to the run directory.
    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }

    /// Hash of the fields that shape the loss curve: resuming with a different one would
    /// silently continue another experiment.
    pub fn fingerprint(&self) -> String {
        let mut r = self.clone();
        r.train.output_dir = PathBuf::new();
        r.train.overwrite_output_dir = false;
        r.train.save_steps = 0;
        r.train.save_total_limit = 0;
        r.train.sample_prompts.clear();
        r.train.max_steps = 0;
        r.train.num_train_epochs = 0.0;
        // Shapes and kernel choices, not the math: a run may resume with other ones.
        r.train.pad_to_multiple_of = None;
        r.train.autotune_level = None;
        r.train.gradient_checkpointing = false;
        r.train.report_to.clear();
        r.eval = None;
        let text = toml::to_string(&r).unwrap_or_default();
        blake3_hex(text.as_bytes())
    }
}

fn blake3_hex(bytes: &[u8]) -> String {
    let mut fp = datasets::cache::Fingerprint::new();
    fp.field("recipe", bytes);
    fp.hex()
}

/// `section.key=value` (or `key=value` at the top level). The value is read as TOML
/// (`3`, `1e-4`, `true`, `["a","b"]`) and as a plain string when it is not valid TOML.
pub fn apply_override(table: &mut toml::Table, spec: &str) -> Result<()> {
    let (path, raw) = spec
        .split_once('=')
        .with_context(|| format!("--set `{spec}`: expected section.key=value"))?;
    let keys: Vec<&str> = path.trim().split('.').collect();
    if keys.iter().any(|k| k.is_empty()) {
        bail!("--set `{spec}`: empty key in `{path}`");
    }
    let value: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").expect("parsed key"),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let mut cur = table;
    for k in &keys[..keys.len() - 1] {
        let entry = cur
            .entry(k.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()));
        cur = entry
            .as_table_mut()
            .with_context(|| format!("--set `{spec}`: `{k}` is not a section"))?;
    }
    cur.insert(keys[keys.len() - 1].to_string(), value);
    Ok(())
}

/// serde names an unknown field and lists the expected ones; add the closest of them.
fn with_suggestion(msg: &str) -> String {
    let Some(rest) = msg.split("unknown field `").nth(1) else {
        return msg.to_string();
    };
    let parts: Vec<&str> = rest.split('`').collect();
    let unknown = parts[0];
    let expected: Vec<&str> = parts.iter().skip(2).step_by(2).copied().collect();
    let best = expected
        .iter()
        .map(|e| (strsim::jaro_winkler(unknown, e), *e))
        .max_by(|a, b| a.0.total_cmp(&b.0));
    match best {
        Some((score, name)) if score > 0.7 => format!("{msg}\ndid you mean `{name}`?"),
        _ => msg.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
method = "sft"
[model]
path = "m"
[data]
files = ["d.jsonl"]
[train]
output_dir = "out"
"#;

    #[test]
    fn defaults_overrides_and_round_trip() {
        let r = Recipe::parse(
            MINIMAL,
            &[
                "train.learning_rate=1e-4".into(),
                "seed=7".into(),
                "adapter.r=4".into(),
                "adapter.target_modules=\"all-linear\"".into(),
                "train.output_dir=runs/x".into(),
            ],
        )
        .unwrap();
        assert_eq!(r.train.learning_rate, 1e-4);
        assert_eq!(r.seed, 7);
        assert_eq!(r.train.output_dir, PathBuf::from("runs/x"));
        let a = r.adapter.as_ref().unwrap();
        assert_eq!(a.r, 4);
        assert_eq!(a.lora().targets().unwrap().len(), 9);
        assert_eq!(r.train.gradient_accumulation_steps, 1);
        let again = Recipe::parse(&r.to_toml().unwrap(), &[]).unwrap();
        assert_eq!(again, r);
    }

    #[test]
    fn router_aux_loss_coef_resolves_as_trl_does() {
        let cfg = |extra: &str| {
            models::ModelConfig::from_json_str(&format!(
                r#"{{"hidden_size":8,"num_attention_heads":2,"num_hidden_layers":1,"vocab_size":10,"intermediate_size":4,{extra}}}"#
            ))
            .unwrap()
        };
        let mixtral = cfg(r#""model_type":"mixtral","router_aux_loss_coef":0.02"#);
        let dense = cfg(r#""model_type":"llama""#);
        let with = |set: &[String]| Recipe::parse(MINIMAL, set).unwrap().train;
        // Unset: the config's weight, whatever its `output_router_logits`.
        assert_eq!(
            with(&[]).router_aux_loss_coef(&mixtral).unwrap(),
            Some(0.02)
        );
        let set = |v: &str| vec![format!("train.router_aux_loss_coef={v}")];
        assert_eq!(
            with(&set("0.1")).router_aux_loss_coef(&mixtral).unwrap(),
            Some(0.1)
        );
        assert_eq!(
            with(&set("0.0")).router_aux_loss_coef(&mixtral).unwrap(),
            None
        );
        assert_eq!(with(&[]).router_aux_loss_coef(&dense).unwrap(), None);
        assert_eq!(
            with(&set("0.0")).router_aux_loss_coef(&dense).unwrap(),
            None
        );
        let e = format!(
            "{:#}",
            with(&set("0.1")).router_aux_loss_coef(&dense).unwrap_err()
        );
        assert!(
            e.contains("mixtures of experts") && e.contains("llama"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            with(&set("-1.0"))
                .router_aux_loss_coef(&mixtral)
                .unwrap_err()
        );
        assert!(e.contains("non-negative"), "{e}");
    }

    #[test]
    fn unknown_keys_name_the_closest_valid_one() {
        let bad = MINIMAL.replace("output_dir", "lerning_rate = 1.0\noutput_dir");
        let e = format!("{:#}", Recipe::parse(&bad, &[]).unwrap_err());
        assert!(
            e.contains("lerning_rate") && e.contains("did you mean `learning_rate`"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            Recipe::parse(MINIMAL, &["train.gradient_acumulation_steps=2".into()]).unwrap_err()
        );
        assert!(
            e.contains("did you mean `gradient_accumulation_steps`"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            Recipe::parse(MINIMAL, &["model.pth=x".into()]).unwrap_err()
        );
        assert!(e.contains("did you mean `path`"), "{e}");
    }

    #[test]
    fn invalid_values_are_explained() {
        let e = format!(
            "{:#}",
            Recipe::parse(MINIMAL, &["train.gradient_accumulation_steps=0".into()]).unwrap_err()
        );
        assert!(e.contains("gradient_accumulation_steps"), "{e}");
        let e = format!(
            "{:#}",
            Recipe::parse(MINIMAL, &["method=\"ppo2\"".into()]).unwrap_err()
        );
        assert!(e.contains("ppo2"), "{e}");
        let e = format!(
            "{:#}",
            Recipe::parse(MINIMAL, &["adapter.target_modules=[\"qproj\"]".into()]).unwrap_err()
        );
        assert!(e.contains("qproj"), "{e}");
    }
}
