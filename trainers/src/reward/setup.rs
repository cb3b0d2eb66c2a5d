//! How a reward-model run sets itself up: the LM head gives way to a fresh score head, and
//! rewards are read at the last token that is not the config's pad id.

use anyhow::Result;
use burn::tensor::backend::AutodiffBackend;

use datasets::batch::Padding;
use models::{CausalLm, ModelConfig};

use super::Reward;
use crate::method_spec::{DataKind, Drive, MethodSpec, Setup};
use crate::recipe::Recipe;

/// `method = "reward"`.
pub struct RewardSpec;

impl MethodSpec for RewardSpec {
    fn data_kind(&self) -> DataKind {
        DataKind::Pairs
    }

    fn key_metrics(&self) -> &'static [&'static str] {
        &["eval_accuracy"]
    }

    /// A reward model grows from a causal LM (or resumes as one already).
    fn base_model<B: AutodiffBackend>(
        &self,
        recipe: &Recipe,
        cfg: ModelConfig,
        model: CausalLm<B>,
    ) -> (ModelConfig, CausalLm<B>) {
        if cfg.reward_head {
            return (cfg, model);
        }
        let pad = cfg
            .pad_token_id
            .or(cfg.eos_token_ids.first().copied())
            .unwrap_or(0);
        let std = cfg
            .raw
            .get("initializer_range")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.02);
        (
            cfg.as_reward_model(pad),
            model.with_reward_head(std, recipe.seed),
        )
    }

    fn launch<B: AutodiffBackend, D: Drive<B>>(
        &self,
        mut setup: Setup<'_, B>,
        policy: CausalLm<B>,
        drive: D,
    ) -> Result<D::Out> {
        let pad = Padding {
            id: setup.policy_cfg.pad_token_id.unwrap_or(setup.pad.id),
            ..setup.pad
        };
        let (train, eval) = setup.pair_data()?;
        let method = Reward::new(
            train,
            eval,
            setup.batch_shape(pad),
            setup.recipe.reward.clone().unwrap_or_default(),
        )?;
        drive.drive(policy, method)
    }
}
