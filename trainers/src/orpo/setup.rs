//! How an ORPO run sets itself up: preference pairs, no reference model.

use anyhow::Result;
use burn::tensor::backend::AutodiffBackend;

use models::CausalLm;

use super::Orpo;
use crate::method_spec::{DataKind, Drive, MethodSpec, Setup};

/// `method = "orpo"`.
pub struct OrpoSpec;

impl MethodSpec for OrpoSpec {
    fn data_kind(&self) -> DataKind {
        DataKind::Pairs
    }

    fn key_metrics(&self) -> &'static [&'static str] {
        &["eval_rewards/accuracies", "eval_log_odds_ratio"]
    }

    fn launch<B: AutodiffBackend, D: Drive<B>>(
        &self,
        mut setup: Setup<'_, B>,
        policy: CausalLm<B>,
        drive: D,
    ) -> Result<D::Out> {
        let settings = setup.recipe.orpo.clone().unwrap_or_default();
        let (train, eval) = setup.pair_data()?;
        let method = Orpo::new(train, eval, setup.batch_shape(setup.pad), settings)?;
        drive.drive(policy, method)
    }
}
