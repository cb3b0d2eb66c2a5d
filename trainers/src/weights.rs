//! What a checkpoint or export holds: the full model in HF layout, or PEFT adapters.

use anyhow::{Context, Result};
use burn::prelude::*;
use std::path::{Path, PathBuf};

use checkpoints::tensors::{load_tensors, save_tensors};
use models::weights::TensorToWrite;

use models::checkpoint::{copy_tokenizer_files, save_model, SaveOptions};
use models::lora::LoraSettings;
use models::weights::DiskDtype;
use models::{CausalLm, ModelConfig};

pub enum WeightsFormat {
    Full {
        cfg: Box<ModelConfig>,
        tokenizer_dir: PathBuf,
    },
    Adapter {
        settings: LoraSettings,
        /// Recorded as `base_model_name_or_path`.
        base_model: PathBuf,
    },
}

impl WeightsFormat {
    pub fn kind(&self) -> &'static str {
        match self {
            WeightsFormat::Full { .. } => "full",
            WeightsFormat::Adapter { .. } => "lora",
        }
    }

    /// Save the weights (and PPO's value head beside them, which HF loaders ignore).
    pub fn save<B: Backend>(
        &self,
        model: &CausalLm<B>,
        dir: &Path,
        dtype: DiskDtype,
    ) -> Result<()> {
        self.save_weights(model, dir, dtype)?;
        save_value_head(model, dir)
    }

    fn save_weights<B: Backend>(
        &self,
        model: &CausalLm<B>,
        dir: &Path,
        dtype: DiskDtype,
    ) -> Result<()> {
        match self {
            WeightsFormat::Full { cfg, tokenizer_dir } => save_model(
                model,
                cfg,
                dir,
                Some(tokenizer_dir),
                &SaveOptions {
                    dtype,
                    ..Default::default()
                },
            ),
            WeightsFormat::Adapter {
                settings,
                base_model,
            } => {
                checkpoints::peft::save_adapter(
                    model,
                    settings,
                    &base_model.to_string_lossy(),
                    dir,
                    dtype,
                )?;
                copy_tokenizer_files(base_model, dir)
            }
        }
    }
}

/// PPO's value head, in its own file: `[1, hidden]` as `value_head.weight`.
pub const VALUE_HEAD_FILE: &str = "value_head.safetensors";
const VALUE_HEAD: &str = "value_head.weight";

fn save_value_head<B: Backend>(model: &CausalLm<B>, dir: &Path) -> Result<()> {
    let Some(head) = &model.value_head else {
        return Ok(());
    };
    let [d, _] = head.dims();
    let w = head.dense_weight();
    save_tensors(
        &dir.join(VALUE_HEAD_FILE),
        &[TensorToWrite {
            name: VALUE_HEAD.into(),
            shape: vec![1, d],
            // `[d, 1]` and `[1, d]` share their row-major order.
            values: Box::new(move || {
                w.clone()
                    .into_data()
                    .convert::<f32>()
                    .to_vec()
                    .expect("f32")
            }),
        }],
        &Default::default(),
    )
}

/// Restore the value head a checkpoint saved into `model` (which has one).
pub fn load_value_head<B: Backend>(mut model: CausalLm<B>, dir: &Path) -> Result<CausalLm<B>> {
    let path = dir.join(VALUE_HEAD_FILE);
    let mut saved = load_tensors(&path)
        .with_context(|| format!("{} holds no value head; was it a PPO run?", dir.display()))?;
    let t = saved
        .remove(VALUE_HEAD)
        .with_context(|| format!("{} has no `{VALUE_HEAD}`", path.display()))?;
    let head = model
        .value_head
        .as_mut()
        .expect("the model was given a value head before loading it");
    let [d, _] = head.dims();
    if t.shape != [1, d] {
        anyhow::bail!(
            "{}: value head of shape {:?}, the model needs [1, {d}]",
            path.display(),
            t.shape
        );
    }
    let device = head.dense_weight().device();
    head.set_dense_weight(Tensor::from_data(
        TensorData::new(t.values, [d, 1]),
        &device,
    ));
    Ok(model)
}
