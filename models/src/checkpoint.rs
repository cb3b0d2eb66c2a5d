//! A model directory in Hugging Face layout: `config.json`, safetensors weights and the
//! tokenizer files, read and written.

use anyhow::{bail, Context, Result};
use burn::prelude::*;
use std::path::{Path, PathBuf};

use crate::config::ModelConfig;
use crate::llama::CausalLm;
use crate::nf4::Quantization;
use crate::tokenizer::TextTokenizer;
use crate::weights::{save_hf_weights, write_atomic, DiskDtype, SafetensorsReader, TensorToWrite};

/// Tokenizer files copied along with a model.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

pub fn config_path(dir: &Path) -> PathBuf {
    dir.join("config.json")
}

pub fn load_config(dir: &Path) -> Result<ModelConfig> {
    if !dir.is_dir() {
        bail!("model directory {} does not exist", dir.display());
    }
    let path = config_path(dir);
    if !path.exists() {
        bail!("{} is missing: a model directory needs config.json, model.safetensors (or shards) and tokenizer.json", path.display());
    }
    ModelConfig::from_file(&path)
}

/// Load the weights of `dir` onto `device`, converting whatever is on disk to f32.
pub fn load_model<B: Backend>(
    dir: &Path,
    device: &B::Device,
) -> Result<(ModelConfig, CausalLm<B>)> {
    load_model_quantized(dir, device, None)
}

/// [`load_model`], quantising linear layers to NF4 one tensor at a time when asked.
pub fn load_model_quantized<B: Backend>(
    dir: &Path,
    device: &B::Device,
    quantization: Option<&Quantization>,
) -> Result<(ModelConfig, CausalLm<B>)> {
    load_model_stored(dir, device, quantization, None)
}

/// [`load_model_quantized`], the frozen base stored in `half` precision when given
/// (`models::half`), converted one tensor at a time.
pub fn load_model_stored<B: Backend>(
    dir: &Path,
    device: &B::Device,
    quantization: Option<&Quantization>,
    half: Option<burn::tensor::FloatDType>,
) -> Result<(ModelConfig, CausalLm<B>)> {
    let cfg = load_config(dir)?;
    let mut reader = SafetensorsReader::open_dir(dir)?;
    let model = CausalLm::from_source_stored(&cfg, &mut reader, device, quantization, half)?;
    warn_unused(dir, &cfg, &reader.unused());
    Ok((cfg, model))
}

fn warn_unused(dir: &Path, cfg: &ModelConfig, unused: &[String]) {
    if unused.is_empty() {
        return;
    }
    let shown: Vec<&str> = unused.iter().take(5).map(String::as_str).collect();
    eprintln!(
        "warning: {} tensor(s) in {} are not used by {}: {}{}",
        unused.len(),
        dir.display(),
        cfg.model_type,
        shown.join(", "),
        if unused.len() > 5 { ", ..." } else { "" }
    );
}

/// Reads the safetensors headers of a model directory (no tensor data) and checks them
/// against its config.json: what `--dry-run` does instead of loading. Returns the number of
/// tensors checked.
pub fn check_weights(dir: &Path, cfg: &ModelConfig) -> Result<usize> {
    let reader = SafetensorsReader::open_dir(dir)?;
    let expected = crate::llama::hf_tensor_shapes(cfg);
    warn_unused(dir, cfg, &reader.check(&expected)?);
    Ok(expected.len())
}

/// Load the tokenizer of a model directory and check it fits the model's vocabulary.
pub fn load_tokenizer(dir: &Path, cfg: &ModelConfig) -> Result<TextTokenizer> {
    let tok = TextTokenizer::from_dir(dir)?;
    tok.check_fits(cfg.vocab_size, &config_path(dir))?;
    Ok(tok)
}

pub struct SaveOptions {
    pub dtype: DiskDtype,
    pub max_shard_bytes: Option<u64>,
}

impl Default for SaveOptions {
    fn default() -> Self {
        Self {
            dtype: DiskDtype::F32,
            max_shard_bytes: Some(5_000_000_000),
        }
    }
}

/// Write `model` with `cfg` into `out` in HF layout (what `save_pretrained` writes), and copy
/// the tokenizer files from `tokenizer_dir` when given.
pub fn save_model<B: Backend>(
    model: &CausalLm<B>,
    cfg: &ModelConfig,
    out: &Path,
    tokenizer_dir: Option<&Path>,
    opts: &SaveOptions,
) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut cfg = cfg.clone();
    cfg.raw
        .insert("torch_dtype".into(), opts.dtype.hf_name().into());
    cfg.raw.remove("dtype");
    let tensors = model.hf_tensors();
    let writes: Vec<TensorToWrite<'_>> = tensors
        .iter()
        .map(|(name, shape, t)| TensorToWrite {
            name: name.clone(),
            shape: shape.clone(),
            values: Box::new(move || t.to_f32()),
        })
        .collect();
    save_hf_weights(out, writes, opts.dtype, opts.max_shard_bytes)?;
    write_atomic(&config_path(out), cfg.to_json_string().as_bytes())?;
    if let Some(src) = tokenizer_dir {
        copy_tokenizer_files(src, out)?;
    }
    Ok(())
}

pub fn copy_tokenizer_files(src: &Path, out: &Path) -> Result<()> {
    if src == out {
        return Ok(());
    }
    for f in TOKENIZER_FILES
        .iter()
        .chain(["generation_config.json"].iter())
    {
        let from = src.join(f);
        if from.exists() {
            let data =
                std::fs::read(&from).with_context(|| format!("cannot read {}", from.display()))?;
            write_atomic(&out.join(f), &data)?;
        }
    }
    Ok(())
}
