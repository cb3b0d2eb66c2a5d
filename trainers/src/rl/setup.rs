//! From a recipe to a GRPO or PPO method: prompts, reward functions, the reference model,
//! PPO's value head, and the dry run's view of an online step.

use anyhow::{bail, Context, Result};
use burn::tensor::backend::AutodiffBackend;
use std::path::Path;

use models::checkpoint::{load_config, load_model, load_tokenizer};
use models::{CausalLm, ModelConfig};

use super::critic::Critic;
use super::grpo::Grpo;
use super::ppo::{CriticKind, Ppo, PpoSettings};
use super::rewards::{RewardFn, RewardKind, RewardSpec};
use super::rollout::{RefPolicy, RolloutEngine, SamplingSettings};
use crate::estimate::frozen_model_bytes;
use crate::method_spec::{DataKind, Drive, MethodSpec, OtherModel, Setup, StepPlan};
use crate::optim::AdamWSettings;
use crate::prerequisites::{tokenizer_mismatch, train_first};
use crate::recipe::{MethodName, Recipe};

/// What GRPO and PPO runs share: the rollout engine (rewards, reference, stop tokens).
impl<B: AutodiffBackend> Setup<'_, B> {
    fn engine(
        &self,
        sampling: SamplingSettings,
        needs_reference: bool,
    ) -> Result<RolloutEngine<B>> {
        let (policy_dir, device) = (&self.recipe.model.path, self.device);
        let same_vocab = |dir: &Path, cfg: &ModelConfig| -> Result<()> {
            if let Some(m) = tokenizer_mismatch(policy_dir, self.base_cfg, dir, cfg)? {
                bail!(
                    "[[rewards]] the reward model in {} does not share the policy's vocabulary ({m}); it scores the \
                     policy's token ids as they are, so both need the same tokenizer",
                    dir.display()
                );
            }
            Ok(())
        };
        for spec in &self.recipe.rewards {
            self.ensure_reward_model(spec)?;
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
        stop_ids.extend(self.base_cfg.eos_token_ids.iter().copied());
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
            tokenizer: load_tokenizer(policy_dir, self.base_cfg)?,
            stop_ids,
            pad: self.pad,
            rewards,
            reference,
        })
    }

    /// Train a `type = "model"` reward source from its `recipe` when its `path` is empty.
    fn ensure_reward_model(&self, spec: &RewardSpec) -> Result<()> {
        let (Some(path), Some(recipe_path)) = (&spec.path, &spec.recipe) else {
            return Ok(());
        };
        let reward = |r: &Recipe| r.method == MethodName::Reward;
        train_first(
            recipe_path,
            path,
            "[[rewards]] recipe",
            ("a method = \"reward\"", &reward),
            self.train_first,
        )
    }
}

/// Where a separate critic starts: `critic_model`, or the first `[[rewards]]` model.
fn critic_source(recipe: &Recipe, p: &PpoSettings) -> Result<std::path::PathBuf> {
    p.critic_model
        .clone()
        .or_else(|| {
            recipe
                .rewards
                .iter()
                .find(|r| r.kind == RewardKind::Model)
                .and_then(|r| r.path.clone())
        })
        .context("[ppo] critic = \"separate\" starts from a reward model: set critic_model, or add a [[rewards]] model")
}

impl<B: AutodiffBackend> Setup<'_, B> {
    /// PPO's separate critic, from its reward model (trained first, when a `[[rewards]]`
    /// recipe says so: `engine` has run).
    fn critic(&self, p: &PpoSettings) -> Result<Critic<B>> {
        let t = &self.recipe.train;
        let dir = critic_source(self.recipe, p)?;
        let critic = Critic::from_reward_model(
            &dir,
            &self.recipe.model.path,
            AdamWSettings {
                beta1: t.adam_beta1,
                beta2: t.adam_beta2,
                eps: t.adam_epsilon,
                weight_decay: t.weight_decay,
            },
            p.vf_learning_rate.unwrap_or(t.learning_rate),
            t.max_grad_norm,
            self.device,
        )?;
        if critic.vocab_size() != self.base_cfg.vocab_size {
            bail!(
                "[ppo] the critic's model {} has a vocabulary of {} tokens, the policy {}: it reads the policy's token ids, \
                 so both need the same tokenizer",
                dir.display(),
                critic.vocab_size(),
                self.base_cfg.vocab_size
            );
        }
        Ok(critic)
    }
}

/// PPO's policy carries a value head: fresh, or the one a checkpoint saved.
fn with_value_head<B: AutodiffBackend>(
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

/// Prompt plus completion: the longest sequence an online step puts through the model.
fn online_seq(recipe: &Recipe, max_completion_length: usize) -> usize {
    recipe.data.max_seq_len + max_completion_length
}

/// `method = "grpo"` (and GSPO, `[grpo] importance_sampling_level = "sequence"`).
pub struct GrpoSpec;

impl MethodSpec for GrpoSpec {
    fn data_kind(&self) -> DataKind {
        DataKind::Prompts
    }

    fn key_metrics(&self) -> &'static [&'static str] {
        &["reward"]
    }

    fn eval_loss_is_negative_reward(&self) -> bool {
        true
    }

    /// A step's rows are completions, `num_generations` per prompt; a rollout feeds
    /// `num_iterations` steps.
    fn step_plan(&self, recipe: &Recipe, train_rows: usize) -> StepPlan {
        let g = recipe.grpo.clone().unwrap_or_default();
        let t = &recipe.train;
        let per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps;
        StepPlan {
            steps_per_epoch: train_rows.div_ceil((per_step / g.num_generations).max(1))
                * g.num_iterations,
            seq: online_seq(recipe, g.max_completion_length),
            rows: t.per_device_train_batch_size,
        }
    }

    fn launch<B: AutodiffBackend, D: Drive<B>>(
        &self,
        mut setup: Setup<'_, B>,
        policy: CausalLm<B>,
        drive: D,
    ) -> Result<D::Out> {
        let settings = setup.recipe.grpo.clone().unwrap_or_default();
        let engine = setup.engine(settings.sampling(), settings.beta > 0.0)?;
        let (train, eval) = setup.prompt_data()?;
        let t = &setup.recipe.train;
        let method = Grpo::new(
            engine,
            settings,
            train,
            eval,
            t.per_device_train_batch_size,
            t.gradient_accumulation_steps,
            t.per_device_eval_batch_size,
            setup.recipe.seed,
        )?;
        drive.drive(policy, method)
    }
}

/// `method = "ppo"`.
pub struct PpoSpec;

impl MethodSpec for PpoSpec {
    fn data_kind(&self) -> DataKind {
        DataKind::Prompts
    }

    fn key_metrics(&self) -> &'static [&'static str] {
        &["objective/scores"]
    }

    fn eval_loss_is_negative_reward(&self) -> bool {
        true
    }

    /// A rollout of `num_mini_batches` steps' rows feeds `num_ppo_epochs` passes.
    fn step_plan(&self, recipe: &Recipe, train_rows: usize) -> StepPlan {
        let p = recipe.ppo.clone().unwrap_or_default();
        let t = &recipe.train;
        let per_rollout =
            t.per_device_train_batch_size * t.gradient_accumulation_steps * p.num_mini_batches;
        StepPlan {
            steps_per_epoch: train_rows.div_ceil(per_rollout)
                * p.num_ppo_epochs
                * p.num_mini_batches,
            seq: online_seq(recipe, p.max_completion_length),
            rows: t.per_device_train_batch_size,
        }
    }

    /// With the shared critic, the policy carries the value head.
    fn policy<B: AutodiffBackend>(
        &self,
        recipe: &Recipe,
        cfg: &ModelConfig,
        model: CausalLm<B>,
        resume: Option<&Path>,
    ) -> Result<CausalLm<B>> {
        match recipe.ppo.clone().unwrap_or_default().critic {
            CriticKind::Shared => with_value_head(model, cfg, recipe.seed, resume),
            CriticKind::Separate => Ok(model),
        }
    }

    /// A separate critic: its weights, gradients and two AdamW moments in f32.
    fn other_model(&self, recipe: &Recipe, _policy_weights: u64) -> Result<Option<OtherModel>> {
        let p = recipe.ppo.clone().unwrap_or_default();
        if p.critic == CriticKind::Shared {
            return Ok(None);
        }
        let dir = critic_source(recipe, &p)?;
        let bytes = match dir.join("config.json").exists() {
            true => Ok(4 * frozen_model_bytes(&load_config(&dir)?, None)),
            false => Err(format!(
                "not built yet ({} is trained first)",
                dir.display()
            )),
        };
        Ok(Some(OtherModel {
            label: "critic",
            bytes,
        }))
    }

    fn launch<B: AutodiffBackend, D: Drive<B>>(
        &self,
        mut setup: Setup<'_, B>,
        policy: CausalLm<B>,
        drive: D,
    ) -> Result<D::Out> {
        let settings = setup.recipe.ppo.clone().unwrap_or_default();
        let engine = setup.engine(settings.sampling(), settings.kl_coef > 0.0)?;
        let critic = match settings.critic {
            CriticKind::Shared => None,
            CriticKind::Separate => Some(setup.critic(&settings)?),
        };
        let (train, eval) = setup.prompt_data()?;
        let t = &setup.recipe.train;
        let method = Ppo::new(
            engine,
            settings,
            train,
            eval,
            t.per_device_train_batch_size,
            t.per_device_eval_batch_size,
            setup.recipe.seed,
            critic,
        )?;
        drive.drive(policy, method)
    }
}
