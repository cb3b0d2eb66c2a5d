//! From a recipe to a GRPO or PPO method: prompts, reward functions, the reference model.

use anyhow::{bail, Result};
use burn::tensor::backend::AutodiffBackend;
use std::path::Path;

use datasets::cache::Dataset;
use datasets::tokenize::TokenizedPrompt;
use models::checkpoint::{load_model, load_tokenizer};
use models::{CausalLm, ModelConfig, TextTokenizer};

use super::grpo::Grpo;
use super::ppo::Ppo;
use super::rewards::{RewardFn, RewardSpec};
use super::rollout::{RefPolicy, RolloutEngine, SamplingSettings};
use crate::recipe::{MethodName, Recipe};
use crate::teacher::tokenizer_mismatch;
use crate::TrainOptions;

pub fn prompt_rows(ds: Dataset, split: &str) -> Result<Vec<TokenizedPrompt>> {
    match ds {
        Dataset::Prompts(rows) => Ok(rows),
        // An empty split (eval_fraction = 0) carries no row kind.
        other if other.is_empty() => Ok(vec![]),
        other => bail!(
            "online methods roll out prompts, but the {split} data are {} rows; use a prompt format \
             (GSM8K question/answer, Bedrock RFT `messages` + `ground_truth`, or `prompt` with an optional `answer`)",
            other.kind()
        ),
    }
}

/// Everything shared by GRPO and PPO runs.
pub struct OnlineSetup<'a> {
    pub recipe: &'a Recipe,
    pub opts: &'a TrainOptions<'a>,
    pub tok: &'a TextTokenizer,
    pub cfg: &'a ModelConfig,
    pub pad: datasets::batch::Padding,
}

impl OnlineSetup<'_> {
    fn engine<B: AutodiffBackend>(
        &self,
        sampling: SamplingSettings,
        needs_reference: bool,
        device: &B::Device,
    ) -> Result<RolloutEngine<B>> {
        let policy_dir = &self.recipe.model.path;
        let same_vocab = |dir: &Path, cfg: &ModelConfig| -> Result<()> {
            if let Some(m) = tokenizer_mismatch(policy_dir, self.cfg, dir, cfg)? {
                bail!(
                    "[[rewards]] the reward model in {} does not share the policy's vocabulary ({m}); it scores the \
                     policy's token ids as they are, so both need the same tokenizer",
                    dir.display()
                );
            }
            Ok(())
        };
        for spec in &self.recipe.rewards {
            self.ensure_reward_model::<B>(spec, device)?;
        }
        let rewards = self
            .recipe
            .rewards
            .iter()
            .map(|spec| {
                RewardFn::<B::InnerBackend>::load(
                    spec,
                    sampling.max_completion_length,
                    &same_vocab,
                    self.pad,
                    device,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let reference = match (needs_reference, self.recipe.adapter.is_some()) {
            (false, _) => RefPolicy::None,
            (true, true) => RefPolicy::BaseOfAdapters,
            (true, false) => RefPolicy::Frozen(Box::new(
                load_model::<B::InnerBackend>(policy_dir, device)?.1,
            )),
        };
        let mut stop_ids = self.tok.stop_ids.clone();
        stop_ids.extend(self.cfg.eos_token_ids.iter().copied());
        stop_ids.sort_unstable();
        stop_ids.dedup();
        if stop_ids.is_empty() {
            bail!(
                "the model's tokenizer and config name no EOS token: completions could never end; set eos_token in \
                 tokenizer_config.json"
            );
        }
        Ok(RolloutEngine {
            sampling,
            // The run keeps its own; the engine decodes completions with a second copy.
            tokenizer: load_tokenizer(policy_dir, self.cfg)?,
            stop_ids,
            pad: self.pad,
            rewards,
            reference,
        })
    }

    /// Train a `type = "model"` reward source from its `recipe` when its `path` is empty.
    fn ensure_reward_model<B: AutodiffBackend>(
        &self,
        spec: &RewardSpec,
        device: &B::Device,
    ) -> Result<()> {
        let (Some(path), Some(recipe_path)) = (&spec.path, &spec.recipe) else {
            return Ok(());
        };
        let reward = |r: &Recipe| r.method == MethodName::Reward;
        crate::teacher::train_first::<B>(
            recipe_path,
            path,
            "[[rewards]] recipe",
            ("a method = \"reward\"", &reward),
            self.opts,
            device,
        )
    }

    pub fn grpo<B: AutodiffBackend>(
        &self,
        train: Dataset,
        eval: Dataset,
        device: &B::Device,
    ) -> Result<Grpo<B>> {
        let settings = self.recipe.grpo.clone().unwrap_or_default();
        let engine = self.engine::<B>(settings.sampling(), settings.beta > 0.0, device)?;
        let t = &self.recipe.train;
        Grpo::new(
            engine,
            settings,
            prompt_rows(train, "train")?,
            prompt_rows(eval, "eval")?,
            t.per_device_train_batch_size,
            t.gradient_accumulation_steps,
            t.per_device_eval_batch_size,
            self.recipe.seed,
        )
    }

    pub fn ppo<B: AutodiffBackend>(
        &self,
        train: Dataset,
        eval: Dataset,
        device: &B::Device,
    ) -> Result<Ppo<B>> {
        let settings = self.recipe.ppo.clone().unwrap_or_default();
        let engine = self.engine::<B>(settings.sampling(), settings.kl_coef > 0.0, device)?;
        let t = &self.recipe.train;
        Ppo::new(
            engine,
            settings,
            prompt_rows(train, "train")?,
            prompt_rows(eval, "eval")?,
            t.per_device_train_batch_size,
            t.per_device_eval_batch_size,
            self.recipe.seed,
        )
    }
}

/// PPO's policy carries a value head: fresh, or the one a checkpoint saved.
pub fn with_value_head<B: AutodiffBackend>(
    model: CausalLm<B>,
    cfg: &ModelConfig,
    seed: u64,
    resume: Option<&Path>,
) -> Result<CausalLm<B>> {
    let std = cfg
        .raw
        .get("initializer_range")
        .and_then(|v| v.as_f64())
        .unwrap_or(0.02);
    let model = model.with_value_head(std, seed);
    match resume {
        Some(dir) => crate::weights::load_value_head(model, dir),
        None => Ok(model),
    }
}
