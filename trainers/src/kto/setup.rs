//! How a KTO run sets itself up: unpaired rows (or preference pairs split into a desirable
//! and an undesirable row), their mismatched completions, and the reference (the base under
//! the adapters, a frozen copy, or log-probs precomputed and cached).

use anyhow::{bail, Result};
use burn::tensor::backend::AutodiffBackend;

use datasets::batch::Padding;
use datasets::cache::Dataset;
use models::CausalLm;

use super::{collate_kto, rows_of_pairs, rows_of_unpaired, Kto, KtoRow};
use crate::logprobs::completion_logps;
use crate::method_spec::{DataKind, Drive, MethodSpec, OtherModel, Setup, StepPlan};
use crate::recipe::Recipe;
use crate::reference::setup::{reference_for, ReferenceSettings};

/// `method = "kto"`.
pub struct KtoSpec;

/// The KTO rows of a split, mismatched completions taken within chunks of `chunk` rows.
fn kto_rows(data: Dataset, chunk: usize, split: &str) -> Result<Vec<KtoRow>> {
    match data {
        Dataset::Unpaired(rows) => Ok(rows_of_unpaired(rows, chunk)),
        Dataset::Pairs(pairs) => Ok(rows_of_pairs(pairs, chunk)),
        other if other.is_empty() => Ok(vec![]),
        other => bail!(
            "KTO trains on completions labelled desirable or not ({{prompt, completion, label}}) or on preference \
             pairs, but the {split} data are {} rows",
            other.kind()
        ),
    }
}

/// Reference log-probs `(row, mismatched row)` of every row, in batches of `batch`.
fn reference_table<B: burn::prelude::Backend>(
    model: &CausalLm<B>,
    rows: &[KtoRow],
    batch: usize,
    pad: Padding,
) -> Vec<(f64, f64)> {
    let host = |t: burn::prelude::Tensor<B, 1>| -> Vec<f64> {
        t.into_data().convert::<f64>().to_vec().expect("f64")
    };
    let mut out = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(batch.max(1)) {
        let refs: Vec<&KtoRow> = chunk.iter().collect();
        let (collated, kl) = collate_kto(&refs, pad, batch);
        let (r, k) = (
            host(completion_logps(model, &collated)),
            host(completion_logps(model, &kl)),
        );
        out.extend((0..chunk.len()).map(|i| (r[i], k[i])));
    }
    out
}

impl MethodSpec for KtoSpec {
    fn data_kind(&self) -> DataKind {
        DataKind::Unpaired
    }

    fn accepts(&self, kind: &str) -> bool {
        kind == DataKind::Unpaired.name() || kind == DataKind::Pairs.name()
    }

    fn key_metrics(&self) -> &'static [&'static str] {
        &["eval_rewards/margins", "eval_rewards/accuracies", "eval_kl"]
    }

    /// A micro-batch puts its rows and their mismatched rows through the model; a pair
    /// is two rows.
    fn step_plan(&self, recipe: &Recipe, train_rows: usize) -> StepPlan {
        let t = &recipe.train;
        let per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps;
        StepPlan {
            steps_per_epoch: train_rows.div_ceil(per_step),
            seq: recipe.data.max_seq_len,
            rows: 2 * t.per_device_train_batch_size,
        }
    }

    fn other_model(&self, recipe: &Recipe, policy_weights: u64) -> Result<Option<OtherModel>> {
        let kto = recipe.kto.clone().unwrap_or_default();
        let frozen_copy = recipe.adapter.is_none() && !kto.precompute_ref_log_probs;
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
        let settings = setup.recipe.kto.clone().unwrap_or_default();
        let t = &setup.recipe.train;
        let (mb, eb, pad) = (
            t.per_device_train_batch_size,
            t.per_device_eval_batch_size,
            setup.pad,
        );
        let (train, eval) = setup.take_data();
        let train = kto_rows(train, mb, "train")?;
        let eval = kto_rows(eval, eb, "eval")?;
        let reference = reference_for(
            &setup,
            ReferenceSettings {
                section: "[kto]",
                needed: true,
                reference_model: settings.reference_model.clone(),
                precompute: settings.precompute_ref_log_probs,
                // The mismatched rows depend on the batch sizes.
                cache_name: format!("kto_ref_logps-b{mb}-e{eb}"),
            },
            &policy,
            (train.len(), eval.len()),
            |m| {
                (
                    reference_table(m, &train, eb, pad),
                    reference_table(m, &eval, eb, pad),
                )
            },
        )?;
        let method = Kto::new(
            train,
            eval,
            setup.batch_shape(setup.pad),
            settings,
            reference,
        )?;
        drive.drive(policy, method)
    }
}
