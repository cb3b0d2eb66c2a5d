//! Evaluation tasks users know from lm-evaluation-harness and TRL, on any model burnish
//! loads: generative exact match (GSM8K), multiple choice by log-likelihood, held-out loss
//! and perplexity, reward-model scores of generated answers, and a pairwise win rate judged
//! by an LLM over an OpenAI-compatible endpoint. `burnish eval` runs them on a saved model;
//! a recipe's `[eval]` runs them at every evaluation of a training run.

mod choice;
mod generative;
mod judge;
mod loss;

use anyhow::{bail, Result};
use burn::tensor::backend::Backend;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

use datasets::rejects::RejectLog;
use models::{CausalLm, ChatTemplate, ModelConfig, TextTokenizer};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Gsm8k,
    Choice,
    Loss,
    Reward,
    Judge,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Gsm8k => "gsm8k",
            Kind::Choice => "choice",
            Kind::Loss => "loss",
            Kind::Reward => "reward",
            Kind::Judge => "judge",
        }
    }
}

/// A task spec, `KIND:FILE`.
pub fn parse_task(spec: &str) -> Result<(Kind, PathBuf)> {
    let Some((kind, file)) = spec.split_once(':') else {
        bail!("task `{spec}`: expected KIND:FILE, e.g. gsm8k:test.jsonl");
    };
    let kind = match kind {
        "gsm8k" => Kind::Gsm8k,
        "choice" | "mc" => Kind::Choice,
        "loss" | "perplexity" => Kind::Loss,
        "reward" => Kind::Reward,
        "judge" => Kind::Judge,
        other => bail!(
            "task `{spec}`: unknown kind `{other}`; expected gsm8k, choice, loss, reward or judge"
        ),
    };
    if file.is_empty() {
        bail!("task `{spec}`: no file after the colon");
    }
    Ok((kind, PathBuf::from(file)))
}

fn default_batch() -> usize {
    8
}
fn default_new_tokens() -> usize {
    256
}
fn default_top_p() -> f32 {
    1.0
}
fn default_template() -> String {
    "auto".into()
}
fn default_mask() -> String {
    "assistant".into()
}
fn default_key_env() -> String {
    "OPENAI_API_KEY".into()
}
fn default_concurrency() -> usize {
    4
}

/// How tasks run: `burnish eval`'s options, and a recipe's `[eval]` section (with `tasks`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSettings {
    /// `KIND:FILE` specs (the recipe's; `burnish eval` takes `--task`).
    #[serde(default)]
    pub tasks: Vec<String>,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// The first N rows of each task's file.
    #[serde(default)]
    pub limit: Option<usize>,
    #[serde(default = "default_new_tokens")]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[serde(default)]
    pub temperature: f32,
    #[serde(default = "default_top_p")]
    pub top_p: f32,
    #[serde(default)]
    pub seed: u64,
    /// Solved examples put before each gsm8k question as earlier turns.
    #[serde(default)]
    pub fewshot: Option<PathBuf>,
    #[serde(default)]
    pub num_fewshot: Option<usize>,
    #[serde(default = "default_template")]
    pub template: String,
    /// Mask policy of the loss task.
    #[serde(default = "default_mask")]
    pub mask: String,
    #[serde(default)]
    pub reward_model: Option<PathBuf>,
    #[serde(default)]
    pub against: Option<PathBuf>,
    #[serde(default)]
    pub judge_url: Option<String>,
    #[serde(default)]
    pub judge_model: Option<String>,
    #[serde(default = "default_key_env")]
    pub judge_api_key_env: String,
    #[serde(default = "default_concurrency")]
    pub judge_concurrency: usize,
    /// No progress bars (inside a training run, whose own bar is showing).
    #[serde(skip)]
    pub quiet: bool,
}

impl Default for EvalSettings {
    fn default() -> Self {
        toml::from_str("").expect("every field has a default")
    }
}

impl EvalSettings {
    /// The tasks, each checked (its file exists, its kind has what it needs).
    pub fn parsed_tasks(&self, specs: &[String]) -> Result<Vec<(Kind, PathBuf)>> {
        let tasks = specs
            .iter()
            .map(|t| parse_task(t))
            .collect::<Result<Vec<_>>>()?;
        for (kind, file) in &tasks {
            if !file.exists() {
                bail!("task {}: {} does not exist", kind.name(), file.display());
            }
            match kind {
                Kind::Reward if self.reward_model.is_none() => {
                    bail!("the reward task needs a reward model (--reward-model / reward_model)")
                }
                Kind::Judge
                    if self.against.is_none()
                        || self.judge_url.is_none()
                        || self.judge_model.is_none() =>
                {
                    bail!("the judge task needs the other model, the judge's URL and its model name (--against, --judge-url, --judge-model)")
                }
                _ => {}
            }
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("eval top_p must be in (0, 1], got {}", self.top_p);
        }
        datasets::tokenize::MaskPolicy::parse(&self.mask)?;
        Ok(tasks)
    }
}

/// The evaluated model and what every task needs to run it.
pub struct Ctx<'a, B: Backend> {
    pub model: &'a CausalLm<B>,
    pub cfg: &'a ModelConfig,
    pub tok: &'a TextTokenizer,
    pub template: &'a ChatTemplate,
    pub settings: &'a EvalSettings,
    pub device: B::Device,
    pub pad: u32,
    pub shape_multiple: usize,
    pub stop_ids: Vec<u32>,
}

impl<'a, B: Backend> Ctx<'a, B> {
    pub fn new(
        model: &'a CausalLm<B>,
        cfg: &'a ModelConfig,
        tok: &'a TextTokenizer,
        template: &'a ChatTemplate,
        settings: &'a EvalSettings,
        shape_multiple: usize,
    ) -> Self {
        let mut stop_ids = tok.stop_ids.clone();
        stop_ids.extend(cfg.eos_token_ids.iter().copied());
        Self {
            model,
            cfg,
            tok,
            template,
            settings,
            device: model.device(),
            pad: tok.pad_id.or(cfg.pad_token_id).unwrap_or(0),
            shape_multiple,
            stop_ids,
        }
    }
}

/// What one task found: its metrics, one JSON per row, and the rows it could not use.
pub struct Outcome {
    pub metrics: Map<String, Value>,
    pub rows: Vec<Value>,
    pub rejects: RejectLog,
    /// Rows in the task's file.
    pub read: usize,
}

pub fn run_task<B: Backend>(ctx: &Ctx<'_, B>, kind: Kind, file: &Path) -> Result<Outcome> {
    match kind {
        Kind::Gsm8k => generative::exact_match(ctx, file),
        Kind::Reward => generative::reward(ctx, file),
        Kind::Choice => choice::run(ctx, file),
        Kind::Loss => loss::run(ctx, file),
        Kind::Judge => judge::run(ctx, file),
    }
}

/// Run every task and flatten their numeric metrics into `eval_{task}_{metric}` (a metrics
/// record of a training run).
pub fn metrics_record<B: Backend>(
    ctx: &Ctx<'_, B>,
    tasks: &[(Kind, PathBuf)],
) -> Result<Map<String, Value>> {
    let mut out = Map::new();
    for (kind, file) in tasks {
        let outcome = run_task(ctx, *kind, file)?;
        for (k, v) in outcome.metrics {
            if v.is_number() {
                out.insert(format!("eval_{}_{k}", kind.name()), v);
            }
        }
    }
    Ok(out)
}

pub fn summary(metrics: &Map<String, Value>) -> String {
    metrics
        .iter()
        .filter(|(_, v)| v.is_number())
        .map(|(k, v)| format!("{k} {:.4}", v.as_f64().unwrap_or(f64::NAN)))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn bar(len: usize, what: &str, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
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

/// The first `limit` items.
pub(crate) fn limited<T>(mut v: Vec<T>, limit: Option<usize>) -> Vec<T> {
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
        assert_eq!(EvalSettings::default().batch_size, 8);
    }
}
