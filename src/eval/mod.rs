//! `burnish eval`: how good a model is, on tasks users know from lm-evaluation-harness and
//! TRL: generative exact match (GSM8K), multiple choice by log-likelihood, held-out loss and
//! perplexity, reward-model scores of generated answers, and a pairwise win rate judged by an
//! LLM over an OpenAI-compatible endpoint. One JSON of results (task, settings, model hash)
//! and the per-row outputs in a JSONL beside it.

mod choice;
mod generative;
mod judge;
mod loss;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Map, Value};
use std::io::Read;
use std::path::{Path, PathBuf};

use checkpoints::export::load_causal_lm;
use datasets::rejects::RejectLog;
use models::checkpoint::load_tokenizer;
use models::{CausalLm, ChatTemplate, ModelConfig, TextTokenizer};

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
    /// How many of --fewshot to use (default: all of them when --fewshot is given).
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

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Gsm8k,
    Choice,
    Loss,
    Reward,
    Judge,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Gsm8k => "gsm8k",
            Kind::Choice => "choice",
            Kind::Loss => "loss",
            Kind::Reward => "reward",
            Kind::Judge => "judge",
        }
    }
}

/// A `--task KIND:FILE`.
pub fn parse_task(spec: &str) -> Result<(Kind, PathBuf)> {
    let Some((kind, file)) = spec.split_once(':') else {
        bail!("--task {spec}: expected KIND:FILE, e.g. gsm8k:test.jsonl");
    };
    let kind = match kind {
        "gsm8k" => Kind::Gsm8k,
        "choice" | "mc" => Kind::Choice,
        "loss" | "perplexity" => Kind::Loss,
        "reward" => Kind::Reward,
        "judge" => Kind::Judge,
        other => bail!(
            "--task {spec}: unknown kind `{other}`; expected gsm8k, choice, loss, reward or judge"
        ),
    };
    if file.is_empty() {
        bail!("--task {spec}: no file after the colon");
    }
    Ok((kind, PathBuf::from(file)))
}

pub fn run(a: Args) -> Result<()> {
    let tasks = a
        .tasks
        .iter()
        .map(|t| parse_task(t))
        .collect::<Result<Vec<_>>>()?;
    for (kind, file) in &tasks {
        if !file.exists() {
            bail!("--task {}: {} does not exist", kind.name(), file.display());
        }
        match kind {
            Kind::Reward if a.reward_model.is_none() => {
                bail!("the reward task needs --reward-model")
            }
            Kind::Judge
                if a.against.is_none() || a.judge_url.is_none() || a.judge_model.is_none() =>
            {
                bail!(
                    "the judge task needs --against MODEL, --judge-url URL and --judge-model NAME"
                )
            }
            _ => {}
        }
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1], got {}", a.top_p);
    }
    a.rejects.on_error()?;
    let device = a.device.clone();
    dispatch(&device, Run { args: a, tasks })
}

struct Run {
    args: Args,
    tasks: Vec<(Kind, PathBuf)>,
}

/// The evaluated model and what every task needs to run it.
pub struct Ctx<'a, B: Backend> {
    pub model: &'a CausalLm<B>,
    pub cfg: &'a ModelConfig,
    pub tok: &'a TextTokenizer,
    pub template: &'a ChatTemplate,
    pub args: &'a Args,
    pub device: B::Device,
    pub pad: u32,
    pub shape_multiple: usize,
    pub stop_ids: Vec<u32>,
}

/// What one task found: its metrics, one JSON per row, and the rows it could not use.
pub struct Outcome {
    pub metrics: Map<String, Value>,
    pub rows: Vec<Value>,
    pub rejects: RejectLog,
    pub read: usize,
}

impl OnDevice for Run {
    type Output = ();

    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let a = &self.args;
        let (cfg, model, base_dir) = load_causal_lm::<B>(&a.model, a.adapter.as_deref(), &device)?;
        let tok = load_tokenizer(&base_dir, &cfg)?;
        let template = tok.template(Some(&a.template))?;
        let mut stop_ids = tok.stop_ids.clone();
        stop_ids.extend(cfg.eos_token_ids.iter().copied());
        let ctx = Ctx {
            model: &model,
            cfg: &cfg,
            pad: tok.pad_id.or(cfg.pad_token_id).unwrap_or(0),
            tok: &tok,
            template: &template,
            args: a,
            shape_multiple: models::backend::default_pad_multiple::<B>(&device),
            device: device.clone(),
            stop_ids,
        };
        let mut results = Vec::new();
        let mut all_rows = Vec::new();
        let mut all_rejects = RejectLog::default();
        let mut read_total = 0;
        for (kind, file) in &self.tasks {
            let outcome = match kind {
                Kind::Gsm8k => generative::exact_match(&ctx, file)?,
                Kind::Reward => generative::reward(&ctx, file)?,
                Kind::Choice => choice::run(&ctx, file)?,
                Kind::Loss => loss::run(&ctx, file)?,
                Kind::Judge => judge::run(&ctx, file)?,
            };
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
        let doc = json!({
            "model": {
                "path": a.model,
                "adapter": a.adapter,
                "base": base_dir,
                "hash": model_hash(&a.model, a.adapter.as_deref())?,
                "model_type": cfg.model_type,
            },
            "settings": {
                "max_new_tokens": a.max_new_tokens,
                "temperature": a.temperature,
                "top_p": a.top_p,
                "seed": a.seed,
                "batch_size": a.batch_size,
                "limit": a.limit,
                "fewshot": a.fewshot,
                "num_fewshot": a.num_fewshot,
                "template": template.name,
                "mask": a.mask,
                "reward_model": a.reward_model,
                "against": a.against,
                "judge_model": a.judge_model,
                "device": a.device,
            },
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

fn summary(metrics: &Map<String, Value>) -> String {
    metrics
        .iter()
        .filter(|(_, v)| v.is_number())
        .map(|(k, v)| format!("{k} {:.4}", v.as_f64().unwrap_or(f64::NAN)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `OUT_STEM.rows.jsonl` beside the results file.
pub fn rows_path(out: &Path) -> PathBuf {
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "eval".into());
    out.with_file_name(format!("{stem}.rows.jsonl"))
}

/// blake3 of the config and weight files of the model (and adapter), so a result names
/// exactly what was evaluated.
fn model_hash(model: &Path, adapter: Option<&Path>) -> Result<String> {
    let mut h = blake3::Hasher::new();
    for path in [Some(model), adapter].into_iter().flatten() {
        let dir = checkpoints::export::resolve_weights_dir(path)?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .with_context(|| format!("cannot list {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                name.ends_with(".safetensors")
                    || name == "config.json"
                    || name == "adapter_config.json"
            })
            .collect();
        files.sort();
        for f in files {
            let mut file =
                std::fs::File::open(&f).with_context(|| format!("cannot read {}", f.display()))?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = file.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
        }
    }
    Ok(h.finalize().to_hex().to_string())
}

pub fn bar(len: usize, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg:>8} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// The 95% Wilson score interval of a proportion (sound at small n and near 0 or 1, where
/// the normal approximation is not).
pub fn wilson(successes: f64, n: usize) -> [f64; 2] {
    if n == 0 {
        return [f64::NAN, f64::NAN];
    }
    let n = n as f64;
    let z = 1.959_963_984_540_054f64;
    let p = successes / n;
    let denom = 1.0 + z * z / n;
    let centre = (p + z * z / (2.0 * n)) / denom;
    let half = z * ((p * (1.0 - p) + z * z / (4.0 * n)) / n).sqrt() / denom;
    [(centre - half).max(0.0), (centre + half).min(1.0)]
}

/// Mean and the 95% normal interval of the mean.
pub fn mean_ci(xs: &[f64]) -> (f64, [f64; 2]) {
    let n = xs.len() as f64;
    if xs.is_empty() {
        return (f64::NAN, [f64::NAN, f64::NAN]);
    }
    let mean = xs.iter().sum::<f64>() / n;
    let var = match xs.len() {
        1 => 0.0,
        _ => xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0),
    };
    let half = 1.959_963_984_540_054 * (var / n).sqrt();
    (mean, [mean - half, mean + half])
}

/// The first `--limit` items.
pub fn limited<T>(mut v: Vec<T>, limit: Option<usize>) -> Vec<T> {
    if let Some(n) = limit {
        v.truncate(n);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_matches_the_textbook_values() {
        // 8 of 10: (0.4902, 0.9433).
        let [lo, hi] = wilson(8.0, 10);
        assert!(
            (lo - 0.4902).abs() < 1e-3 && (hi - 0.9433).abs() < 1e-3,
            "{lo} {hi}"
        );
        assert_eq!(wilson(0.0, 5)[0], 0.0);
    }

    #[test]
    fn task_specs_are_kind_and_file() {
        assert_eq!(parse_task("gsm8k:a.jsonl").unwrap().0, Kind::Gsm8k);
        assert_eq!(parse_task("mc:a").unwrap().0, Kind::Choice);
        assert!(parse_task("gsm8k").is_err());
        assert!(parse_task("bleu:x").is_err());
    }
}
