//! Rollouts shared by GRPO and PPO: sample completions from the current policy with the KV
//! cache (log-probs recorded as they are sampled), score them with the reward functions,
//! and take the reference model's log-probs when a KL term needs them.

use anyhow::Result;
use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};
use std::time::Instant;

use datasets::batch::{collate_sft, Padding, SftBatch};
use datasets::pack::PackedRow;
use datasets::tokenize::TokenizedPrompt;
use models::generate::{generate_groups, FinishReason, SamplingParams};
use models::{CausalLm, TextTokenizer};

use super::command::Scored;
use super::rewards::RewardFn;
use crate::logprobs::{keep_real, trained_hidden};

/// How completions are sampled (TRL's generation settings of GRPO/PPO).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingSettings {
    pub max_completion_length: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
}

impl SamplingSettings {
    /// `section` names the recipe section in errors.
    pub fn validate(&self, section: &str) -> Result<()> {
        if self.max_completion_length == 0 {
            anyhow::bail!("{section} max_completion_length must be at least 1");
        }
        if !(self.temperature >= 0.0 && self.top_p > 0.0 && self.top_p <= 1.0) {
            anyhow::bail!("{section} temperature must be >= 0 and top_p in (0, 1]");
        }
        Ok(())
    }

    /// What log-probs are divided by in training, as TRL does with the sampling
    /// temperature (greedy decoding counts as 1).
    pub fn logit_scale(&self) -> f64 {
        if self.temperature > 0.0 {
            self.temperature
        } else {
            1.0
        }
    }
}

/// One sampled completion and what the models said about it at sampling time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    pub prompt: Vec<u32>,
    pub tokens: Vec<u32>,
    /// Log-probs of `tokens` under the sampling policy (temperature-scaled).
    pub old_logps: Vec<f32>,
    /// Log-probs under the reference model, when a KL term needs them.
    pub ref_logps: Option<Vec<f32>>,
    /// Ended with a stop token (not cut at `max_completion_length`).
    pub eos: bool,
}

/// The model a KL term is taken against.
pub enum RefPolicy<B: AutodiffBackend> {
    /// No KL term.
    None,
    /// The policy with its adapters switched off: no second copy of the weights.
    BaseOfAdapters,
    /// A frozen copy of the starting weights (full fine-tuning).
    Frozen(Box<CausalLm<B::InnerBackend>>),
}

/// A scored batch of completions, grouped `copies` per prompt, in prompt order.
pub struct Rollout {
    pub completions: Vec<Completion>,
    /// `[completion][function]`; NaN where a function had no verdict.
    pub rewards_per_func: Vec<Vec<f64>>,
    pub generated_tokens: usize,
    pub generation_s: f64,
}

/// Everything rollouts need besides the policy.
pub struct RolloutEngine<B: AutodiffBackend> {
    pub sampling: SamplingSettings,
    pub tokenizer: TextTokenizer,
    pub stop_ids: Vec<u32>,
    pub pad: Padding,
    pub rewards: Vec<RewardFn<B::InnerBackend>>,
    pub reference: RefPolicy<B>,
}

impl<B: AutodiffBackend> RolloutEngine<B> {
    pub fn reward_names(&self) -> Vec<String> {
        self.rewards.iter().map(|r| r.name.clone()).collect()
    }

    pub fn reward_weights(&self) -> Vec<f64> {
        self.rewards.iter().map(|r| r.weight).collect()
    }

    /// Sample `copies` completions of every prompt (greedy when `greedy`), then score them.
    pub fn roll_out(
        &self,
        policy: &CausalLm<B>,
        prompts: &[&TokenizedPrompt],
        copies: usize,
        seed: u64,
        greedy: bool,
    ) -> Result<Rollout> {
        let inner = policy.valid();
        let unique: Vec<Vec<u32>> = prompts.iter().map(|p| p.prompt.clone()).collect();
        let s = &self.sampling;
        let params = SamplingParams {
            max_new_tokens: s.max_completion_length,
            temperature: if greedy { 0.0 } else { s.temperature as f32 },
            top_k: s.top_k,
            top_p: s.top_p as f32,
            seed,
            stop_ids: self.stop_ids.clone(),
            pad_id: self.pad.id,
            shape_multiple: self.pad.multiple_of,
        };
        let started = Instant::now();
        let generations = generate_groups(&inner.for_sampling(), &unique, copies, &params, None)?;
        let ids = unique
            .into_iter()
            .flat_map(|p| std::iter::repeat_n(p, copies));
        let generation_s = started.elapsed().as_secs_f64();
        let mut completions: Vec<Completion> = ids
            .zip(generations)
            .map(|(prompt, g)| Completion {
                prompt,
                eos: g.finish == FinishReason::Eos,
                tokens: g.tokens,
                old_logps: g.logprobs,
                ref_logps: None,
            })
            .collect();
        let generated_tokens = completions.iter().map(|c| c.tokens.len()).sum();
        let reference = match &self.reference {
            RefPolicy::None => None,
            RefPolicy::BaseOfAdapters => {
                let mut base = inner.clone();
                base.set_adapters_enabled(false);
                Some(host_logps(&base, &completions, s.logit_scale(), self.pad))
            }
            RefPolicy::Frozen(m) => Some(host_logps(m, &completions, s.logit_scale(), self.pad)),
        };
        if let Some(r) = reference {
            for (c, lp) in completions.iter_mut().zip(r) {
                c.ref_logps = Some(lp);
            }
        }
        let rewards_per_func = self.score(&completions, prompts, copies)?;
        Ok(Rollout {
            completions,
            rewards_per_func,
            generated_tokens,
            generation_s,
        })
    }

    fn score(
        &self,
        completions: &[Completion],
        prompts: &[&TokenizedPrompt],
        copies: usize,
    ) -> Result<Vec<Vec<f64>>> {
        let mut texts = Vec::with_capacity(completions.len());
        for c in completions {
            texts.push((
                self.tokenizer.decode(&c.prompt, false)?,
                self.tokenizer.decode(&c.tokens, true)?,
            ));
        }
        let items: Vec<Scored<'_>> = completions
            .iter()
            .zip(&texts)
            .enumerate()
            .map(|(i, (c, (p, t)))| Scored {
                prompt_ids: &c.prompt,
                completion_ids: &c.tokens,
                prompt: p,
                completion: t,
                answer: prompts[i / copies].answer.as_deref(),
            })
            .collect();
        let per_fn: Vec<Vec<f64>> = self
            .rewards
            .iter()
            .map(|f| f.score(&items))
            .collect::<Result<_>>()?;
        Ok((0..completions.len())
            .map(|i| per_fn.iter().map(|f| f[i]).collect())
            .collect())
    }
}

/// Tokens through the model when training on `completions` (prompts included).
pub fn rollout_tokens(completions: &[Completion]) -> usize {
    completions
        .iter()
        .map(|c| c.prompt.len() + c.tokens.len())
        .sum()
}

/// `[prompt | completion]` rows whose completion tokens are the trained targets, in a batch
/// of `capacity` rows when shapes are static.
pub fn completion_batch(rows: &[&Completion], pad: Padding, capacity: usize) -> SftBatch {
    let packed: Vec<PackedRow> = rows
        .iter()
        .map(|c| PackedRow::completion([c.prompt.as_slice(), &c.tokens].concat(), c.prompt.len()))
        .collect();
    collate_sft(&packed, pad, capacity)
}

/// `values` (one per real completion token) followed by zeros up to the `n` entries of a
/// bucketed batch's outputs.
pub fn padded(mut values: Vec<f32>, n: usize) -> Vec<f32> {
    values.resize(n.max(values.len()), 0.0);
    values
}

/// The policy's view of every completion token of a batch, flattened row by row. With a
/// bucketed batch, `n` is the token count rounded up and the extra entries are 0.
pub struct TokenOutputs<B: Backend> {
    /// `[n]` log-probs of the completion tokens (logits divided by the sampling temperature).
    pub logps: Tensor<B, 1>,
    /// `[n]` value-head outputs at the same positions (PPO).
    pub values: Option<Tensor<B, 1>>,
    /// Real completion tokens: the first `real` entries.
    pub real: usize,
    /// Summed entropy of the token distributions (a metric; no gradient).
    pub entropy_sum: f64,
}

/// Log-probs (and values) at the completion tokens of `batch`, or None if it has none.
pub fn token_outputs<B: Backend>(
    model: &CausalLm<B>,
    batch: &SftBatch,
    logit_scale: f64,
    with_values: bool,
    with_entropy: bool,
) -> Option<TokenOutputs<B>> {
    let h = trained_hidden(model, batch)?;
    let values = with_values.then(|| keep_real(model.values(h.hidden.clone()), &h.mask));
    let out = model.head_logps(h.hidden, h.targets, logit_scale, with_entropy);
    let entropy_sum = out.entropy.map_or(0.0, |e| {
        keep_real(e, &h.mask).sum().into_scalar().elem::<f64>()
    });
    let logps = out.logps;
    Some(TokenOutputs {
        logps: keep_real(logps, &h.mask),
        values,
        real: h.rows.len(),
        entropy_sum,
    })
}

/// Per-token log-probs of each completion under `model` (no gradient), in batches.
pub fn host_logps<B: Backend>(
    model: &CausalLm<B>,
    completions: &[Completion],
    logit_scale: f64,
    pad: Padding,
) -> Vec<Vec<f32>> {
    host_outputs(model, completions, logit_scale, pad, false).0
}

/// Per-token log-probs and (with `with_values`) value-head outputs of each completion
/// under `model`, without gradients, in batches.
pub fn host_outputs<B: Backend>(
    model: &CausalLm<B>,
    completions: &[Completion],
    logit_scale: f64,
    pad: Padding,
    with_values: bool,
) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    const ROWS: usize = 16;
    let mut logps = Vec::with_capacity(completions.len());
    let mut values = Vec::new();
    for chunk in completions.chunks(ROWS) {
        let rows: Vec<&Completion> = chunk.iter().collect();
        let batch = completion_batch(&rows, pad, ROWS);
        let (lp, v) = match token_outputs(model, &batch, logit_scale, with_values, false) {
            Some(t) => (host_f32(t.logps), t.values.map(host_f32)),
            None => (vec![], None),
        };
        let mut at = 0;
        for c in chunk {
            let span = at..at + c.tokens.len();
            logps.push(lp[span.clone()].to_vec());
            if let Some(v) = &v {
                values.push(v[span].to_vec());
            }
            at += c.tokens.len();
        }
    }
    (logps, values)
}

/// Host values of a tensor as `f32`.
pub fn host_f32<B: Backend>(t: Tensor<B, 1>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().expect("f32")
}

/// A row-major flat vector of per-token values, as a tensor.
pub fn flat_tensor<B: Backend>(values: Vec<f32>, device: &B::Device) -> Tensor<B, 1> {
    let n = values.len();
    Tensor::from_data(TensorData::new(values, [n]), device)
}

/// Stable names for metrics built at run time (reward function names).
pub fn metric_name(name: String) -> &'static str {
    use std::sync::Mutex;
    static NAMES: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(n) = names.iter().find(|n| **n == name) {
        return n;
    }
    let leaked: &'static str = Box::leak(name.into_boxed_str());
    names.push(leaked);
    leaked
}
