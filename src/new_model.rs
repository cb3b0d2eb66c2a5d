//! `burnish new-model`: a seeded random-init model with the tokenizer and a chat template.

use anyhow::{Context, Result};
use clap::Parser;
use std::path::{Path, PathBuf};

use models::backend::Cpu;
use models::checkpoint::{copy_tokenizer_files, save_model, SaveOptions};
use models::presets::{padded_vocab, preset_config, PresetTokens, RandomInit};
use models::weights::{write_atomic, DiskDtype};
use models::{CausalLm, ChatTemplate, TextTokenizer};

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
    /// Architecture: llama or qwen2.
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

/// End-of-turn markers of common chat formats; any present in the vocabulary also stops generation.
const END_OF_TURN: &[&str] = &[
    "<|end|>",
    "<|im_end|>",
    "<|eot_id|>",
    "</s>",
    "<|endoftext|>",
];

pub fn run(a: Args) -> Result<()> {
    let tok = TextTokenizer::from_dir(&a.tokenizer)?;
    let dtype = DiskDtype::parse(&a.dtype)?;
    let mut eos: Vec<u32> = tok.eos_id.into_iter().collect();
    eos.extend(END_OF_TURN.iter().filter_map(|t| tok.token_to_id(t)));
    eos.sort_unstable();
    eos.dedup();
    let tokens = PresetTokens {
        bos: tok.bos_id,
        eos: eos.clone(),
        pad: tok.pad_id.or(tok.eos_id),
    };
    let cfg = preset_config(&a.preset, &a.arch, padded_vocab(tok.vocab_size()), &tokens)?;
    let device = Default::default();
    let model = CausalLm::<Cpu>::from_source(&cfg, &mut RandomInit::new(a.seed, 0.02), &device)?;
    save_model(
        &model,
        &cfg,
        &a.out,
        None,
        &SaveOptions {
            dtype,
            ..Default::default()
        },
    )?;
    copy_tokenizer_files(&a.tokenizer, &a.out)?;
    ensure_chat_template(&a.out, &tok, &a.chat_template)?;
    let gen = serde_json::json!({"bos_token_id": tok.bos_id, "eos_token_id": eos, "pad_token_id": tokens.pad});
    write_atomic(
        &a.out.join("generation_config.json"),
        serde_json::to_string_pretty(&gen)?.as_bytes(),
    )?;
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

/// Store the named template in tokenizer_config.json when the tokenizer has none.
fn ensure_chat_template(out: &Path, tok: &TextTokenizer, name: &str) -> Result<()> {
    if tok.chat_template.is_some() {
        return Ok(());
    }
    let template = ChatTemplate::named(name)?;
    let path = out.join("tokenizer_config.json");
    let mut cfg: serde_json::Value = if path.exists() {
        serde_json::from_str(&std::fs::read_to_string(&path)?)
            .with_context(|| format!("{} is not valid JSON", path.display()))?
    } else {
        serde_json::json!({})
    };
    cfg["chat_template"] = serde_json::Value::String(template.source);
    write_atomic(&path, serde_json::to_string_pretty(&cfg)?.as_bytes())
}
