//! `burnish export`: a run, checkpoint or adapter directory to a Hugging Face model
//! directory, merging LoRA adapters into the base weights on request.

use anyhow::{bail, Context, Result};
use burn::prelude::*;
use std::path::{Path, PathBuf};

use models::checkpoint::{
    copy_tokenizer_files, load_model, load_model_quantized, save_model, SaveOptions,
};
use models::weights::DiskDtype;

use crate::peft::{is_adapter_dir, load_adapter, read_adapter_config, save_adapter};
use crate::run_dir::latest_checkpoint;

/// The directory holding weights: itself when it has `config.json` or an adapter, else a
/// run's `final/`, else its newest checkpoint.
pub fn resolve_weights_dir(path: &Path) -> Result<PathBuf> {
    if path.join("config.json").exists() || is_adapter_dir(path) {
        return Ok(path.to_path_buf());
    }
    let fin = path.join("final");
    if fin.join("config.json").exists() || is_adapter_dir(&fin) {
        return Ok(fin);
    }
    match latest_checkpoint(path)? {
        Some((_, dir)) => Ok(dir),
        None => bail!(
            "{} holds no model: expected config.json, adapter_config.json, a final/ export or step-NNNNNN/ checkpoints",
            path.display()
        ),
    }
}

pub struct ExportRequest<'a> {
    pub source: &'a Path,
    pub out: &'a Path,
    pub merge: bool,
    /// Base model for an adapter; default: the adapter's `base_model_name_or_path`.
    pub base: Option<&'a Path>,
    pub dtype: DiskDtype,
}

/// Export and return a one-line description of what was written. The output directory is
/// built beside its place and swapped in whole: a kill leaves the old export or the new one.
pub fn export<B: Backend>(req: &ExportRequest<'_>, device: &B::Device) -> Result<String> {
    let mut described = String::new();
    models::atomic::write_dir(req.out, |out| {
        described = export_into::<B>(req, out, device)?;
        Ok(())
    })?;
    Ok(described)
}

fn export_into<B: Backend>(
    req: &ExportRequest<'_>,
    out: &Path,
    device: &B::Device,
) -> Result<String> {
    let src = resolve_weights_dir(req.source)?;
    let opts = SaveOptions {
        dtype: req.dtype,
        ..Default::default()
    };
    if !is_adapter_dir(&src) {
        let (cfg, model) = load_model::<B>(&src, device)?;
        save_model(&model, &cfg, out, Some(&src), &opts)?;
        return Ok(format!(
            "full model from {} -> {}",
            src.display(),
            req.out.display()
        ));
    }
    let adapter = read_adapter_config(&src)?;
    let base: PathBuf = match req.base {
        Some(b) => b.to_path_buf(),
        None if !adapter.base_model.is_empty() => PathBuf::from(&adapter.base_model),
        None => bail!("{} names no base model; pass --base DIR", src.display()),
    };
    // A QLoRA adapter trained against the NF4 base: merging into that base (dequantised)
    // gives the model the adapter was trained with, as PEFT's merge on a 4-bit model does.
    let (cfg, model) = load_model_quantized::<B>(&base, device, adapter.quantization.as_ref())
        .with_context(|| {
            format!(
                "loading the base model of adapter {} (override with --base)",
                src.display()
            )
        })?;
    let (model, settings) = load_adapter(model, &src)?;
    if req.merge {
        let merged = model.merge_adapters();
        save_model(&merged, &cfg, out, Some(&base), &opts)?;
        Ok(format!(
            "merged adapter {} into {} -> {}",
            src.display(),
            base.display(),
            req.out.display()
        ))
    } else {
        save_adapter(&model, &settings, &adapter.base_model, out, req.dtype)?;
        copy_tokenizer_files(&base, out)?;
        Ok(format!(
            "adapter {} -> {}",
            src.display(),
            req.out.display()
        ))
    }
}

/// The base model folder and the PEFT adapter folders to put over it. `path` is a model
/// folder, a run, or an adapter (then first in the list, over the base its config names);
/// `adapters` are more adapters (folders or runs).
pub fn resolve_model_and_adapters(
    path: &Path,
    adapters: &[&Path],
) -> Result<(PathBuf, Vec<PathBuf>)> {
    let src = resolve_weights_dir(path)?;
    let mut dirs = Vec::new();
    let base = if is_adapter_dir(&src) {
        let cfg = read_adapter_config(&src)?;
        if cfg.base_model.is_empty() {
            bail!(
                "{} names no base model (base_model_name_or_path)",
                src.display()
            );
        }
        dirs.push(src.clone());
        PathBuf::from(cfg.base_model)
    } else {
        src
    };
    for a in adapters {
        let dir = resolve_weights_dir(a)?;
        if !is_adapter_dir(&dir) {
            bail!(
                "{} is not a PEFT adapter (no adapter_config.json)",
                dir.display()
            );
        }
        dirs.push(dir);
    }
    Ok((base, dirs))
}

/// A causal LM to run: a model folder or run, or an adapter folder (over the base its
/// config names), with `adapter` folded in when given. Returns the config, the model and
/// the folder of the base (config and tokenizer).
pub fn load_causal_lm<B: Backend>(
    path: &Path,
    adapter: Option<&Path>,
    device: &B::Device,
) -> Result<(models::ModelConfig, models::CausalLm<B>, PathBuf)> {
    let (base, adapters) = resolve_model_and_adapters(path, adapter.as_slice())?;
    let (cfg, mut model) = load_model::<B>(&base, device)?;
    for dir in &adapters {
        if read_adapter_config(dir)?.reward_model {
            bail!(
                "{} is a reward model's adapter, not a causal LM's",
                dir.display()
            );
        }
        model = load_adapter(model, dir)
            .with_context(|| format!("loading the adapter {}", dir.display()))?
            .0
            .merge_adapters();
    }
    Ok((cfg, model, base))
}

/// Load a reward model for scoring: a `*ForSequenceClassification` model directory, or a
/// PEFT `SEQ_CLS` adapter (merged into its base). Returns its config, the model and the
/// directory its tokenizer is in.
pub fn load_reward_model<B: Backend>(
    dir: &Path,
    device: &B::Device,
) -> Result<(models::ModelConfig, models::CausalLm<B>, PathBuf)> {
    let dir = resolve_weights_dir(dir)?;
    if !is_adapter_dir(&dir) {
        let (cfg, model) = load_model::<B>(&dir, device)?;
        if !cfg.reward_head {
            bail!(
                "{} is a causal LM, not a reward model (expected architectures *ForSequenceClassification with num_labels 1)",
                dir.display()
            );
        }
        return Ok((cfg, model, dir));
    }
    let adapter = read_adapter_config(&dir)?;
    if !adapter.reward_model {
        bail!(
            "{} is a causal-LM adapter, not a reward model's (task_type SEQ_CLS)",
            dir.display()
        );
    }
    let base = PathBuf::from(&adapter.base_model);
    let (cfg, model) = load_model::<B>(&base, device)
        .with_context(|| format!("loading the base model of {}", dir.display()))?;
    let pad = cfg
        .pad_token_id
        .or(cfg.eos_token_ids.first().copied())
        .unwrap_or(0);
    let (model, _) = load_adapter(model.with_reward_head(0.0, 0), &dir)?;
    Ok((cfg.as_reward_model(pad), model.merge_adapters(), base))
}
