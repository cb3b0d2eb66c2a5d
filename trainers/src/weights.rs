//! What a checkpoint or export holds: the full model in HF layout, or PEFT adapters.

use anyhow::Result;
use burn::prelude::*;
use std::path::{Path, PathBuf};

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

    pub fn save<B: Backend>(
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
