//! `burnish eval`: the tasks of `trainers::eval` on a saved model (or base + adapter). One
//! JSON of results (task, settings, model hash) and the per-row outputs in a JSONL beside it.

use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use clap::Parser;
use serde_json::json;
use std::path::{Path, PathBuf};

use checkpoints::export::load_causal_lm;
use datasets::rejects::RejectLog;
use models::checkpoint::load_tokenizer;
use trainers::eval::{run_task, summary, Ctx, EvalSettings, Kind};

use crate::device::{dispatch, OnDevice};

#[derive(Parser, Clone)]
pub struct Args {
    /// Model folder or run (its final/ export or newest checkpoint); an adapter folder is
    /// evaluated over the base its adapter_config.json names.
    #[arg(long)]
    pub model: PathBuf,
    /// LoRA adapter (folder or run) folded into --model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// KIND:FILE, repeatable. gsm8k: generative exact match on prompt/answer rows (GSM8K's
    /// `#### N`); choice: multiple choice by log-likelihood on {"question", "choices",
    /// "answer"}; loss: held-out loss and perplexity on any file the pipeline reads (same
    /// masks as training); reward: mean --reward-model score of generated answers; judge:
    /// win rate against --against, judged by --judge-model at --judge-url.
    #[arg(long = "task", required = true)]
    pub tasks: Vec<String>,
    /// Results JSON; the rows go to OUT_STEM.rows.jsonl beside it.
    #[arg(long, default_value = "eval_results.json")]
    pub out: PathBuf,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Evaluate the first N rows of each task's file.
    #[arg(long)]
    pub limit: Option<usize>,
    /// New tokens per generated answer.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Solved examples (prompt/answer rows) put before each gsm8k question as earlier turns.
    #[arg(long)]
    pub fewshot: Option<PathBuf>,
    /// How many of --fewshot to use (default: all of them).
    #[arg(long)]
    pub num_fewshot: Option<usize>,
    /// Chat template: `auto` (the model's own) or a built-in name.
    #[arg(long, default_value = "auto")]
    pub template: String,
    /// Mask policy of the loss task: assistant, last_assistant or all.
    #[arg(long, default_value = "assistant")]
    pub mask: String,
    /// Reward model (folder, run or SEQ_CLS adapter) for the reward task.
    #[arg(long)]
    pub reward_model: Option<PathBuf>,
    /// The other model of the judge task (folder, run or adapter).
    #[arg(long)]
    pub against: Option<PathBuf>,
    /// OpenAI-compatible endpoint of the judge, up to /v1.
    #[arg(long)]
    pub judge_url: Option<String>,
    #[arg(long)]
    pub judge_model: Option<String>,
    /// Environment variable holding the judge's API key (never logged).
    #[arg(long, default_value = "OPENAI_API_KEY")]
    pub judge_api_key_env: String,
    /// Judge requests in flight.
    #[arg(long, default_value_t = 4)]
    pub judge_concurrency: usize,
    #[command(flatten)]
    pub rejects: crate::rejects_args::RejectArgs,
}

impl Args {
    fn settings(&self) -> EvalSettings {
        EvalSettings {
            tasks: self.tasks.clone(),
            batch_size: self.batch_size,
            limit: self.limit,
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
            fewshot: self.fewshot.clone(),
            num_fewshot: self.num_fewshot,
            template: self.template.clone(),
            mask: self.mask.clone(),
            reward_model: self.reward_model.clone(),
            against: self.against.clone(),
            judge_url: self.judge_url.clone(),
            judge_model: self.judge_model.clone(),
            judge_api_key_env: self.judge_api_key_env.clone(),
            judge_concurrency: self.judge_concurrency,
            quiet: false,
        }
    }
}

pub fn run(a: Args) -> Result<()> {
    let settings = a.settings();
    let tasks = settings.parsed_tasks(&a.tasks)?;
    a.rejects.on_error()?;
    let device = a.device.clone();
    dispatch(
        &device,
        Run {
            args: a,
            settings,
            tasks,
        },
    )
}

struct Run {
    args: Args,
    settings: EvalSettings,
    tasks: Vec<(Kind, PathBuf)>,
}

impl OnDevice for Run {
    type Output = ();

    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let a = &self.args;
        let (cfg, model, base_dir) = load_causal_lm::<B>(&a.model, a.adapter.as_deref(), &device)?;
        let tok = load_tokenizer(&base_dir, &cfg)?;
        let template = tok.template(Some(&a.template))?;
        let multiple = models::backend::default_pad_multiple::<B>(&device);
        let ctx = Ctx::new(&model, &cfg, &tok, &template, &self.settings, multiple);
        let mut results = Vec::new();
        let mut all_rows = Vec::new();
        let mut all_rejects = RejectLog::default();
        let mut read_total = 0;
        for (kind, file) in &self.tasks {
            let outcome = run_task(&ctx, *kind, file)?;
            a.rejects
                .check(&outcome.rejects, outcome.rows.len(), outcome.read)
                .with_context(|| format!("task {}:{}", kind.name(), file.display()))?;
            eprintln!(
                "{:<7} {}: {}",
                kind.name(),
                file.display(),
                summary(&outcome.metrics)
            );
            results.push(json!({
                "task": kind.name(),
                "file": file,
                "n": outcome.rows.len(),
                "rejected": outcome.rejects.len(),
                "metrics": outcome.metrics,
            }));
            for mut r in outcome.rows {
                r["task"] = json!(kind.name());
                all_rows.push(r);
            }
            read_total += outcome.read;
            all_rejects.absorb(outcome.rejects);
        }
        let rows_path = rows_path(&a.out);
        let mut settings = serde_json::to_value(&self.settings)?;
        settings["template"] = json!(template.name);
        settings["device"] = json!(a.device);
        let doc = json!({
            "model": {
                "path": a.model,
                "adapter": a.adapter,
                "base": base_dir,
                "hash": model_hash(&a.model, a.adapter.as_deref())?,
                "model_type": cfg.model_type,
            },
            "settings": settings,
            "tasks": results,
            "rows": rows_path,
        });
        let mut text = String::new();
        for r in &all_rows {
            text.push_str(&r.to_string());
            text.push('\n');
        }
        models::atomic::write(&rows_path, text.as_bytes())?;
        models::atomic::write(&a.out, serde_json::to_string_pretty(&doc)?.as_bytes())?;
        eprintln!(
            "results {}\nrows    {}",
            a.out.display(),
            rows_path.display()
        );
        a.rejects.finish(&all_rejects, Some(&a.out), read_total)
    }
}

/// `OUT_STEM.rows.jsonl` beside the results file.
pub fn rows_path(out: &Path) -> PathBuf {
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "eval".into());
    out.with_file_name(format!("{stem}.rows.jsonl"))
}

/// The fingerprint of the model's weights (and the adapter's), so a result names exactly
/// what was evaluated.
fn model_hash(model: &Path, adapter: Option<&Path>) -> Result<String> {
    let mut parts = vec![];
    for path in [Some(model), adapter].into_iter().flatten() {
        let dir = checkpoints::export::resolve_weights_dir(path)?;
        parts.push(trainers::prerequisites::model_fingerprint(&dir)?);
    }
    Ok(parts.join("+"))
}
