//! How a distillation run sets itself up: its teacher (trained first when its recipe says
//! so, checked to share the student's vocabulary), and its dry-run terms.

use anyhow::{Context, Result};
use burn::tensor::backend::AutodiffBackend;

use models::CausalLm;

use super::teacher::{prepare_teacher, teacher_bytes};
use super::Distill;
use crate::method_spec::{DataKind, Drive, MethodSpec, OtherModel, Setup};
use crate::recipe::Recipe;

/// `method = "distill"`.
pub struct DistillSpec;

impl MethodSpec for DistillSpec {
    fn data_kind(&self) -> DataKind {
        DataKind::Sft
    }

    fn answers_as_responses(&self) -> bool {
        true
    }

    fn key_metrics(&self) -> &'static [&'static str] {
        &["eval_divergence"]
    }

    fn other_model(&self, recipe: &Recipe, _policy_weights: u64) -> Result<Option<OtherModel>> {
        let Some(d) = &recipe.distill else {
            return Ok(None);
        };
        let bytes = match teacher_bytes(d)? {
            Some(0) => Err("none while training (its top-k log-probs are cached first)".into()),
            Some(b) => Ok(b),
            None => Err(format!(
                "not built yet ({} is trained first)",
                d.teacher.display()
            )),
        };
        Ok(Some(OtherModel {
            label: "teacher",
            bytes,
        }))
    }

    fn launch<B: AutodiffBackend, D: Drive<B>>(
        &self,
        mut setup: Setup<'_, B>,
        policy: CausalLm<B>,
        drive: D,
    ) -> Result<D::Out> {
        let settings = setup
            .recipe
            .distill
            .clone()
            .context("method distill needs a [distill] section")?;
        let (train, eval) = setup.sft_data()?;
        let teacher = prepare_teacher(&setup, &settings, &train, &eval)?;
        let mut stop_ids = setup.tok.stop_ids.clone();
        stop_ids.extend(setup.base_cfg.eos_token_ids.iter().copied());
        let shape = setup.batch_shape(setup.pad);
        let method = Distill::<B>::new(train, eval, shape, stop_ids, teacher, settings)?;
        drive.drive(policy, method)
    }
}
