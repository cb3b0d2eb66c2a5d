//! How a DPO run sets itself up from a recipe: its reference (none, adapters off, a frozen
//! copy, or log-probs precomputed and cached), and its dry-run terms.

use anyhow::Result;
use burn::tensor::backend::AutodiffBackend;

use datasets::tokenize::TokenizedPair;
use models::CausalLm;

use super::{reference_table, Dpo, DpoSettings};
use crate::method_spec::{DataKind, Drive, MethodSpec, OtherModel, Setup};
use crate::recipe::Recipe;
use crate::reference::setup::{reference_for, ReferenceSettings};
use crate::reference::Reference;

/// `method = "dpo"` (and its variants, `[dpo] loss_type`).
pub struct DpoSpec;

impl MethodSpec for DpoSpec {
    fn data_kind(&self) -> DataKind {
        DataKind::Pairs
    }

    fn key_metrics(&self) -> &'static [&'static str] {
        &["eval_rewards/accuracies", "eval_rewards/margins"]
    }

    /// Full fine-tuning holds a frozen reference copy unless its log-probs are precomputed.
    fn other_model(&self, recipe: &Recipe, policy_weights: u64) -> Result<Option<OtherModel>> {
        let dpo = recipe.dpo.clone().unwrap_or_default();
        let frozen_copy =
            recipe.adapter.is_none() && dpo.needs_reference() && !dpo.precompute_ref_log_probs;
        Ok(frozen_copy.then_some(OtherModel {
            label: "reference",
            bytes: Ok(policy_weights),
        }))
    }

    fn launch<B: AutodiffBackend, D: Drive<B>>(
        &self,
        mut setup: Setup<'_, B>,
        policy: CausalLm<B>,
        drive: D,
    ) -> Result<D::Out> {
        let settings = setup.recipe.dpo.clone().unwrap_or_default();
        let (train, eval) = setup.pair_data()?;
        let reference = dpo_reference(&setup, &settings, &policy, &train, &eval)?;
        let shape = setup.batch_shape(setup.pad);
        let method = Dpo::new(train, eval, shape, settings, reference)?;
        drive.drive(policy, method)
    }
}

/// The DPO reference: none (SimPO), the base under the adapters, a frozen copy, or
/// log-probs `(chosen, rejected)` per pair precomputed once and cached beside the data.
fn dpo_reference<B: AutodiffBackend>(
    setup: &Setup<'_, B>,
    settings: &DpoSettings,
    policy: &CausalLm<B>,
    train: &[TokenizedPair],
    eval: &[TokenizedPair],
) -> Result<Reference<B>> {
    let (batch, pad) = (setup.recipe.train.per_device_eval_batch_size, setup.pad);
    reference_for(
        setup,
        ReferenceSettings {
            section: "[dpo]",
            needed: settings.needs_reference(),
            reference_model: settings.reference_model.clone(),
            precompute: settings.precompute_ref_log_probs,
            cache_name: "ref_logps".into(),
        },
        policy,
        (train.len(), eval.len()),
        |m| {
            (
                reference_table(m, train, batch, pad),
                reference_table(m, eval, batch, pad),
            )
        },
    )
}
