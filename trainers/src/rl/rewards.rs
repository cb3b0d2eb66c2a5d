//! Reward sources for online RL, chosen in the recipe as `[[rewards]]` tables and combined
//! with weights: verifiable answer match, regex format, length penalty, a trained reward
//! model, and an external command.

use anyhow::{bail, Context, Result};
use burn::prelude::*;
use regex::Regex;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use checkpoints::export::load_reward_model;
use datasets::batch::{collate_sft, Padding};
use datasets::pack::PackedRow;
use models::{CausalLm, ForwardInput, ModelConfig};

use super::command::run_reward_command;
pub use super::command::Scored;

/// What a `[[rewards]]` table may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardKind {
    /// 1 when the completion's final number equals the reference answer's (GSM8K `#### N`
    /// references, commas and `$` stripped), else 0; no reference: no verdict.
    Accuracy,
    /// 1 when `pattern` matches the completion, else 0.
    Format,
    /// DAPO's soft overlong punishment: 0 up to `max_length - cache` tokens, then falling
    /// linearly to -1 at `max_length`, -1 beyond.
    Length,
    /// The score of a reward model trained with `method = "reward"`.
    Model,
    /// A program reading JSONL `{prompt, completion, answer}` on stdin and writing one
    /// float (or `null`) per line.
    Command,
}

/// One `[[rewards]]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardSpec {
    #[serde(rename = "type")]
    pub kind: RewardKind,
    #[serde(default = "one")]
    pub weight: f64,
    /// Metric name (`rewards/<name>/mean`); defaults to the type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `format`: a regex searched in the completion (anchor it with `^...$`; `(?s)` lets `.`
    /// cross lines).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// `length`: the longest completion without penalty plus `cache` (defaults to the
    /// method's `max_completion_length`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
    /// `length`: the soft-penalty zone in tokens before `max_length`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<usize>,
    /// `model`: a reward model directory (full model, or a reward LoRA adapter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// `model`: a `method = "reward"` recipe that trains the reward model into `path`
    /// (its output_dir/final) first, when `path` holds none yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipe: Option<PathBuf>,
    /// `command`: program and arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// `command`: seconds the program may take for one batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<f64>,
}

fn one() -> f64 {
    1.0
}

/// The format the GRPO/R1 recipes ask for.
pub const DEFAULT_FORMAT: &str = r"(?s)^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$";
const DEFAULT_TIMEOUT_S: f64 = 60.0;

impl RewardSpec {
    pub fn name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            serde_json::to_value(self.kind)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default()
        })
    }

    pub fn validate(&self, at: usize) -> Result<()> {
        let ctx = || format!("[[rewards]] #{} (type = {:?})", at + 1, self.name());
        let only = |set: bool, field: &str, kind: &str| -> Result<()> {
            if set {
                bail!("{}: `{field}` is only for type = \"{kind}\"", ctx());
            }
            Ok(())
        };
        let k = self.kind;
        only(
            self.pattern.is_some() && k != RewardKind::Format,
            "pattern",
            "format",
        )?;
        only(
            (self.max_length.is_some() || self.cache.is_some()) && k != RewardKind::Length,
            "max_length/cache",
            "length",
        )?;
        only(
            self.path.is_some() && k != RewardKind::Model,
            "path",
            "model",
        )?;
        only(
            (!self.command.is_empty() || self.timeout_s.is_some()) && k != RewardKind::Command,
            "command/timeout_s",
            "command",
        )?;
        if !self.weight.is_finite() {
            bail!("{}: weight must be a finite number", ctx());
        }
        match k {
            RewardKind::Format => {
                Regex::new(self.pattern.as_deref().unwrap_or(DEFAULT_FORMAT))
                    .with_context(|| format!("{}: `pattern` is not a valid regex", ctx()))?;
            }
            RewardKind::Model if self.path.is_none() => {
                bail!("{}: set `path` to a reward model directory", ctx())
            }
            RewardKind::Command if self.command.is_empty() => {
                bail!("{}: set `command = [\"program\", \"arg\", ...]`", ctx())
            }
            RewardKind::Command if self.timeout_s.is_some_and(|t| t.is_nan() || t <= 0.0) => {
                bail!("{}: timeout_s must be positive", ctx())
            }
            _ => {}
        }
        Ok(())
    }
}

enum Source<B: Backend> {
    Accuracy,
    Format(Regex),
    Length { max: usize, cache: usize },
    Model(Box<CausalLm<B>>, Padding),
    Command { argv: Vec<String>, timeout_s: f64 },
}

pub struct RewardFn<B: Backend> {
    pub name: String,
    pub weight: f64,
    source: Source<B>,
}

/// Checks a reward model (its tokenizer directory and config) reads the policy's token ids
/// as they are.
pub type VocabCheck<'a> = dyn Fn(&Path, &ModelConfig) -> Result<()> + 'a;

impl<B: Backend> RewardFn<B> {
    pub fn load(
        spec: &RewardSpec,
        max_completion_length: usize,
        same_vocab: &VocabCheck<'_>,
        pad: Padding,
        device: &B::Device,
    ) -> Result<Self> {
        let source = match spec.kind {
            RewardKind::Accuracy => Source::Accuracy,
            RewardKind::Format => Source::Format(Regex::new(
                spec.pattern.as_deref().unwrap_or(DEFAULT_FORMAT),
            )?),
            RewardKind::Length => {
                let max = spec.max_length.unwrap_or(max_completion_length);
                let cache = spec.cache.unwrap_or(max / 4).min(max);
                Source::Length { max, cache }
            }
            RewardKind::Model => {
                let path = spec.path.as_ref().expect("validated");
                let (cfg, model, tok_dir) =
                    load_reward_model::<B>(path, device).with_context(|| {
                        format!("[[rewards]] type = \"model\": loading {}", path.display())
                    })?;
                same_vocab(&tok_dir, &cfg)?;
                Source::Model(Box::new(model), pad)
            }
            RewardKind::Command => Source::Command {
                argv: spec.command.clone(),
                timeout_s: spec.timeout_s.unwrap_or(DEFAULT_TIMEOUT_S),
            },
        };
        Ok(Self {
            name: spec.name(),
            weight: spec.weight,
            source,
        })
    }

    /// One reward per completion; `NaN` where the function has no verdict.
    pub fn score(&self, items: &[Scored<'_>]) -> Result<Vec<f64>> {
        Ok(match &self.source {
            Source::Accuracy => items
                .iter()
                .map(|s| accuracy(s.completion, s.answer))
                .collect(),
            Source::Format(re) => items
                .iter()
                .map(|s| f64::from(u8::from(re.is_match(s.completion))))
                .collect(),
            Source::Length { max, cache } => items
                .iter()
                .map(|s| soft_overlong_punishment(s.completion_ids.len(), *max, *cache))
                .collect(),
            Source::Model(model, pad) => model_rewards(model, items, *pad)?,
            Source::Command { argv, timeout_s } => run_reward_command(argv, *timeout_s, items)?,
        })
    }
}

/// DAPO's soft overlong punishment (TRL `get_soft_overlong_punishment`).
pub fn soft_overlong_punishment(len: usize, max: usize, cache: usize) -> f64 {
    if len + cache <= max {
        0.0
    } else if len <= max {
        (max as f64 - cache as f64 - len as f64) / cache as f64
    } else {
        -1.0
    }
}

fn number_regex() -> &'static Regex {
    static RE: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    RE.get_or_init(|| Regex::new(r"-?\$?\d[\d,]*(?:\.\d+)?").expect("valid regex"))
}

/// A number as people write it: `1,234`, `$5`, `-3.5`, `7.`.
pub fn parse_number(s: &str) -> Option<f64> {
    let m = number_regex().find(s)?;
    m.as_str().replace([',', '$'], "").parse().ok()
}

/// The answer a completion commits to: the number after its last `####`, else inside its
/// last `<answer>...</answer>`, else its last number.
pub fn final_answer(text: &str) -> Option<f64> {
    if let Some(at) = text.rfind("####") {
        return parse_number(&text[at + 4..]);
    }
    if let Some(start) = text.rfind("<answer>") {
        let inner = &text[start + 8..];
        let inner = inner.split("</answer>").next().unwrap_or(inner);
        return parse_number(inner);
    }
    number_regex()
        .find_iter(text)
        .last()
        .and_then(|m| parse_number(m.as_str()))
}

/// 1 / 0 / NaN (no reference). Non-numeric references are compared as trimmed text.
pub fn accuracy(completion: &str, answer: Option<&str>) -> f64 {
    let Some(answer) = answer else {
        return f64::NAN;
    };
    let reference = match answer.rfind("####") {
        Some(at) => &answer[at + 4..],
        None => answer,
    };
    let hit = match (final_answer(reference), final_answer(completion)) {
        (Some(want), Some(got)) => (want - got).abs() <= 1e-6 * want.abs().max(1.0),
        (Some(_), None) => false,
        (None, _) => completion.trim() == reference.trim(),
    };
    f64::from(u8::from(hit))
}

/// Reward-model scores of prompt+completion token ids (the reward model shares the
/// policy's vocabulary), at each sequence's last token.
fn model_rewards<B: Backend>(
    model: &CausalLm<B>,
    items: &[Scored<'_>],
    pad: Padding,
) -> Result<Vec<f64>> {
    const ROWS: usize = 16;
    let device = model.device();
    let mut out = Vec::with_capacity(items.len());
    for chunk in items.chunks(ROWS) {
        let rows: Vec<PackedRow> = chunk
            .iter()
            .map(|s| PackedRow::completion([s.prompt_ids, s.completion_ids].concat(), usize::MAX))
            .collect();
        let batch = collate_sft(&rows, pad, ROWS);
        let input = ForwardInput::from_host(&batch.ids, &batch.positions, &batch.layout, &device);
        let mut last: Vec<usize> = rows.iter().map(|r| r.len().max(1) - 1).collect();
        last.resize(batch.ids.len(), 0);
        let r = model.rewards(input, &last).into_data().convert::<f64>();
        out.extend(&r.to_vec::<f64>().expect("f64")[..chunk.len()]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_as_gsm8k_writes_them() {
        assert_eq!(accuracy("so 3 + 4 = 7\n#### 7", Some("7")), 1.0);
        assert_eq!(accuracy("The total is $1,200.", Some("1200")), 1.0);
        assert_eq!(
            accuracy("<answer> 42 </answer> then 9", Some("#### 42")),
            1.0
        );
        assert_eq!(accuracy("#### 8", Some("7")), 0.0);
        assert_eq!(accuracy("no number", Some("7")), 0.0);
        assert!(accuracy("7", None).is_nan());
        assert_eq!(accuracy(" yes ", Some("yes")), 1.0);
        assert_eq!(parse_number("-3.50"), Some(-3.5));
    }

    #[test]
    fn soft_overlong_matches_dapo() {
        assert_eq!(soft_overlong_punishment(10, 20, 5), 0.0);
        assert_eq!(soft_overlong_punishment(15, 20, 5), 0.0);
        assert_eq!(soft_overlong_punishment(18, 20, 5), -0.6);
        assert_eq!(soft_overlong_punishment(20, 20, 5), -1.0);
        assert_eq!(soft_overlong_punishment(21, 20, 5), -1.0);
    }

    #[test]
    fn specs_reject_fields_of_other_types() {
        let spec: RewardSpec = toml::from_str("type = \"accuracy\"\npattern = \"x\"").unwrap();
        let e = spec.validate(0).unwrap_err().to_string();
        assert!(e.contains("`pattern` is only for type = \"format\""), "{e}");
        let spec: RewardSpec = toml::from_str("type = \"format\"\npattern = \"(\"").unwrap();
        assert!(spec.validate(0).is_err());
        let spec: RewardSpec = toml::from_str("type = \"command\"").unwrap();
        assert!(spec
            .validate(0)
            .unwrap_err()
            .to_string()
            .contains("command = ["));
    }
}
