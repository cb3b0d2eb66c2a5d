//! `burnish new-model`: a seeded random-init model with the tokenizer and a chat template.

use anyhow::Result;
use clap::Parser;
use std::path::PathBuf;

use models::presets::{write_new_model, NewModelSpec};
use models::weights::DiskDtype;

#[derive(Parser)]
pub struct Args {
    /// Size preset: tiny (~2M params with a 32k vocab), small (~60M) or base (~140M).
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Directory holding tokenizer.json (and tokenizer_config.json).
    #[arg(long)]
    pub tokenizer: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// Architecture: llama, qwen2 or qwen3.
    #[arg(long, default_value = "llama")]
    pub arch: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Chat template to store when the tokenizer carries none.
    #[arg(long, default_value = "chatml")]
    pub chat_template: String,
    /// On-disk dtype: float32, bfloat16 or float16.
    #[arg(long, default_value = "float32")]
    pub dtype: String,
}

pub fn run(a: Args) -> Result<()> {
    let dtype = DiskDtype::parse(&a.dtype)?;
    let cfg = write_new_model(&NewModelSpec {
        preset: &a.preset,
        arch: &a.arch,
        tokenizer_dir: &a.tokenizer,
        out: &a.out,
        seed: a.seed,
        chat_template: &a.chat_template,
        dtype,
    })?;
    println!(
        "wrote {} ({} preset, {}, {:.2}M parameters, vocab {}) to {}",
        cfg.model_type,
        a.preset,
        dtype.hf_name(),
        cfg.num_parameters() as f64 / 1e6,
        cfg.vocab_size,
        a.out.display()
    );
    Ok(())
}
