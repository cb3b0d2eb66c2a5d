//! How a DPO run sets itself up from a recipe: its reference (none, adapters off, a frozen
//! copy, or log-probs precomputed and cached), and its dry-run terms.

use anyhow::{bail, Context, Result};
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;

use datasets::tokenize::TokenizedPair;
use models::checkpoint::load_model;
use models::weights::write_atomic;
use models::CausalLm;

use super::{reference_table, Dpo, DpoSettings, Reference};
use crate::method_spec::{DataKind, Drive, MethodSpec, OtherModel, Setup};
use crate::prerequisites::model_fingerprint;
use crate::recipe::Recipe;

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
/// log-probs precomputed once and cached beside the tokenized data.
fn dpo_reference<B: AutodiffBackend>(
    setup: &Setup<'_, B>,
    settings: &DpoSettings,
    policy: &CausalLm<B>,
    train: &[TokenizedPair],
    eval: &[TokenizedPair],
) -> Result<Reference<B>> {
    let (recipe, pad, device) = (setup.recipe, setup.pad, setup.device);
    if !settings.needs_reference() {
        return Ok(Reference::None);
    }
    let adapters = recipe.adapter.is_some();
    let ref_dir = settings
        .reference_model
        .clone()
        .unwrap_or_else(|| recipe.model.path.clone());
    if adapters && settings.reference_model.is_some() {
        bail!("[dpo] reference_model is for full fine-tuning; with [adapter] the reference is the base with adapters off");
    }
    let load_frozen = || -> Result<CausalLm<B::InnerBackend>> {
        Ok(load_model::<B::InnerBackend>(&ref_dir, device)?.1)
    };
    if !settings.precompute_ref_log_probs {
        return Ok(if adapters {
            Reference::BaseOfAdapters
        } else {
            Reference::Frozen(Box::new(load_frozen()?))
        });
    }
    let path = setup
        .cache_dir
        .join(format!("ref_logps-{}.json", model_fingerprint(&ref_dir)?));
    if let Ok(text) = std::fs::read_to_string(&path) {
        let v: serde_json::Value = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not valid JSON; delete it to recompute",
                path.display()
            )
        })?;
        let table =
            |k: &str| -> Option<Vec<(f64, f64)>> { serde_json::from_value(v[k].clone()).ok() };
        if let (Some(tr), Some(ev)) = (table("train"), table("eval")) {
            if tr.len() == train.len() && ev.len() == eval.len() {
                return Ok(Reference::Precomputed {
                    train: tr,
                    eval: ev,
                });
            }
        }
    }
    let batch = recipe.train.per_device_eval_batch_size;
    let started = std::time::Instant::now();
    let (tr, ev) = if adapters {
        let mut base = policy.valid();
        base.set_adapters_enabled(false);
        (
            reference_table(&base, train, batch, pad),
            reference_table(&base, eval, batch, pad),
        )
    } else {
        let m = load_frozen()?;
        (
            reference_table(&m, train, batch, pad),
            reference_table(&m, eval, batch, pad),
        )
    };
    let json = serde_json::json!({"reference_model": ref_dir, "train": tr, "eval": ev});
    write_atomic(&path, serde_json::to_string(&json)?.as_bytes())?;
    eprintln!(
        "reference log-probs of {} pairs computed in {:.1}s, cached in {}",
        train.len() + eval.len(),
        started.elapsed().as_secs_f64(),
        path.display()
    );
    Ok(Reference::Precomputed {
        train: tr,
        eval: ev,
    })
}
