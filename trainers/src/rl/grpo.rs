//! GRPO (TRL 1.16 `GRPOTrainer`): `num_generations` completions per prompt, advantages
//! relative to the group, the clipped-ratio objective with an optional k3 KL to the
//! reference, `num_iterations` updates per generation batch, and TRL's four loss
//! normalisations.

use anyhow::{bail, Result};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use datasets::tokenize::TokenizedPrompt;
use models::CausalLm;

use super::math::{
    clip_fraction, clipped_policy_loss, combine_rewards, group_advantages, k3, nanstd, ScaleRewards,
};
use super::rollout::{
    completion_batch, flat_tensor, host_f32, padded, rollout_tokens, token_outputs, Completion,
    RolloutEngine, SamplingSettings,
};
use super::stats::{held_out, rollout_stats, HeldOut, RolloutCursor};
use crate::data_order::DataCursor;
use crate::method::{LossOutput, Method};

/// Where GRPO's importance ratio is taken (TRL `importance_sampling_level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImportanceLevel {
    #[default]
    Token,
    /// GSPO.
    Sequence,
}

impl ImportanceLevel {
    fn is_token(&self) -> bool {
        *self == ImportanceLevel::Token
    }
}

/// How the per-token losses of a batch are averaged (TRL `loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GrpoLoss {
    /// Mean over each completion's tokens, then over completions (the GRPO paper; favours
    /// short completions).
    Grpo,
    /// Mean over the tokens of each micro-batch.
    Bnpo,
    /// Sum over tokens divided by completions x `max_completion_length` (Dr. GRPO).
    DrGrpo,
    /// Mean over every token of the accumulated batch (DAPO; TRL's default).
    #[default]
    Dapo,
}

/// The `[grpo]` section of a recipe (TRL `GRPOConfig` names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpoSettings {
    /// Completions per prompt (the group). Must divide the completions of one step:
    /// `per_device_train_batch_size * gradient_accumulation_steps`.
    #[serde(default = "default_generations")]
    pub num_generations: usize,
    #[serde(default = "default_completion_length")]
    pub max_completion_length: usize,
    #[serde(default = "one_f")]
    pub temperature: f64,
    #[serde(default = "one_f")]
    pub top_p: f64,
    /// 0 = off.
    #[serde(default)]
    pub top_k: usize,
    /// KL coefficient (k3 estimator); 0 skips the reference model entirely.
    #[serde(default)]
    pub beta: f64,
    /// Lower (and, without `epsilon_high`, upper) clip of the ratio.
    #[serde(default = "default_epsilon")]
    pub epsilon: f64,
    /// Upper clip (DAPO's clip-higher, e.g. 0.28).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon_high: Option<f64>,
    /// Optimizer steps on each generation batch (GRPO's mu).
    #[serde(default = "one_u")]
    pub num_iterations: usize,
    #[serde(default)]
    pub scale_rewards: ScaleRewards,
    #[serde(default)]
    pub loss_type: GrpoLoss,
    /// `token` (GRPO) or `sequence` (GSPO: one importance ratio per completion, the
    /// exponential of its mean token log-ratio, clipped as a whole), TRL's name.
    #[serde(default, skip_serializing_if = "ImportanceLevel::is_token")]
    pub importance_sampling_level: ImportanceLevel,
    /// Exclude completions cut at `max_completion_length` from the loss (DAPO).
    #[serde(default)]
    pub mask_truncated_completions: bool,
}

fn default_generations() -> usize {
    8
}
fn default_completion_length() -> usize {
    256
}
fn default_epsilon() -> f64 {
    0.2
}
fn one_f() -> f64 {
    1.0
}
fn one_u() -> usize {
    1
}

impl Default for GrpoSettings {
    fn default() -> Self {
        toml::from_str("").expect("every field has a default")
    }
}

impl GrpoSettings {
    pub fn validate(&self) -> Result<()> {
        if self.num_generations < 2 {
            bail!("[grpo] num_generations must be at least 2: advantages compare completions of the same prompt");
        }
        if self.num_iterations == 0 {
            bail!("[grpo] num_iterations must be at least 1");
        }
        self.sampling().validate("[grpo]")?;
        if !(self.epsilon > 0.0 && self.epsilon_high.is_none_or(|e| e > 0.0) && self.beta >= 0.0) {
            bail!("[grpo] epsilon and epsilon_high must be positive, beta >= 0");
        }
        Ok(())
    }

    pub fn sampling(&self) -> SamplingSettings {
        SamplingSettings {
            max_completion_length: self.max_completion_length,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
        }
    }

    fn epsilon_high(&self) -> f64 {
        self.epsilon_high.unwrap_or(self.epsilon)
    }
}

/// One micro-batch of scored completions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrpoRows {
    pub completions: Vec<Completion>,
    pub advantages: Vec<f32>,
    /// Per completion token, row by row: its share of the loss (0 for masked tokens).
    pub token_weights: Vec<f32>,
    /// This micro-batch's loss weight for the loop (see `GrpoLoss`).
    pub weight: f64,
    /// Rollout-level metrics (means over the generation batch).
    pub stats: Vec<(String, f64)>,
}

/// A GRPO micro-batch: training rows, or held-out completions that are only scored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum GrpoBatch {
    Train(GrpoRows),
    HeldOut(HeldOut),
}

pub struct Grpo<B: AutodiffBackend> {
    engine: RolloutEngine<B>,
    settings: GrpoSettings,
    train: Vec<TokenizedPrompt>,
    eval: Vec<TokenizedPrompt>,
    micro_batch: usize,
    eval_batch: usize,
    cursor: RolloutCursor<Vec<GrpoBatch>>,
}

impl<B: AutodiffBackend> Grpo<B> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        engine: RolloutEngine<B>,
        settings: GrpoSettings,
        train: Vec<TokenizedPrompt>,
        eval: Vec<TokenizedPrompt>,
        micro_batch: usize,
        micro_batches: usize,
        eval_batch: usize,
        seed: u64,
    ) -> Result<Self> {
        settings.validate()?;
        if train.is_empty() {
            bail!("the training split has no prompts: nothing to roll out");
        }
        let per_step = micro_batch * micro_batches;
        if !per_step.is_multiple_of(settings.num_generations) {
            bail!(
                "[grpo] num_generations = {} must divide the completions of one step, per_device_train_batch_size x \
                 gradient_accumulation_steps = {micro_batch} x {micro_batches} = {per_step}",
                settings.num_generations
            );
        }
        Ok(Self {
            cursor: RolloutCursor::new(train.len(), seed),
            engine,
            settings,
            train,
            eval,
            micro_batch,
            eval_batch,
        })
    }

    /// Roll out one generation batch and cut it into the micro-batches of one step.
    fn generation_batch(
        &mut self,
        policy: &CausalLm<B>,
        micro_batches: usize,
    ) -> Result<Vec<GrpoBatch>> {
        let started = std::time::Instant::now();
        let g = self.settings.num_generations;
        let n_prompts = self.micro_batch * micro_batches / g;
        let (idx, seed) = self.cursor.next_prompts(n_prompts);
        let prompts: Vec<&TokenizedPrompt> = idx.iter().map(|&i| &self.train[i]).collect();
        let rollout = self.engine.roll_out(policy, &prompts, g, seed, false)?;
        let rewards = combine_rewards(&rollout.rewards_per_func, &self.engine.reward_weights());
        let advantages = group_advantages(&rewards, g, self.settings.scale_rewards);
        let mut stats = rollout_stats(&rollout, &rewards, &self.engine.reward_names());
        stats.push((
            "frac_reward_zero_std".into(),
            zero_std_fraction(&rewards, g),
        ));
        // Sampling, reference pass and rewards: what the step spent before training.
        stats.push(("rollout_s".into(), started.elapsed().as_secs_f64()));
        let s = &self.settings;
        let mut out = vec![];
        for (rows, adv) in rollout
            .completions
            .chunks(self.micro_batch)
            .zip(advantages.chunks(self.micro_batch))
        {
            let lens: Vec<usize> = rows.iter().map(|c| c.tokens.len()).collect();
            let masked: Vec<bool> = rows
                .iter()
                .map(|c| s.mask_truncated_completions && !c.eos)
                .collect();
            let (token_weights, weight) =
                token_weights(s.loss_type, &lens, &masked, s.max_completion_length);
            out.push(GrpoRows {
                completions: rows.to_vec(),
                advantages: adv.iter().map(|&a| a as f32).collect(),
                token_weights,
                weight,
                stats: stats.clone(),
            });
        }
        // TRL clamps the DAPO normaliser at 1: a step whose every token is masked trains on
        // nothing instead of dividing by zero.
        if out.iter().all(|b| b.weight == 0.0) {
            out[0].weight = 1.0;
        }
        Ok(out.into_iter().map(GrpoBatch::Train).collect())
    }
}

/// Each completion token's share of a micro-batch's loss sum, and the micro-batch's weight
/// in the loop (which divides by the step's total weight): together they give TRL's
/// normalisation for `loss_type`. `masked` rows (truncated, with
/// `mask_truncated_completions`) count for nothing.
pub fn token_weights(
    loss_type: GrpoLoss,
    lens: &[usize],
    masked: &[bool],
    max_completion_length: usize,
) -> (Vec<f32>, f64) {
    let tokens: usize = lens
        .iter()
        .zip(masked)
        .filter(|(_, &m)| !m)
        .map(|(l, _)| l)
        .sum();
    let mut weights = Vec::with_capacity(lens.iter().sum());
    for (&len, &m) in lens.iter().zip(masked) {
        let w = if m {
            0.0
        } else {
            match loss_type {
                GrpoLoss::Grpo => 1.0 / len.max(1) as f64,
                GrpoLoss::Bnpo => 1.0 / tokens.max(1) as f64,
                GrpoLoss::DrGrpo => 1.0 / max_completion_length as f64,
                GrpoLoss::Dapo => 1.0,
            }
        };
        weights.extend(std::iter::repeat_n(w as f32, len));
    }
    let weight = match loss_type {
        GrpoLoss::Grpo | GrpoLoss::DrGrpo => lens.len() as f64,
        GrpoLoss::Bnpo => 1.0,
        GrpoLoss::Dapo => tokens as f64,
    };
    (weights, weight)
}

/// Each token's log importance weight: its own log-ratio, or (GSPO) the mean log-ratio of
/// its completion. `lens` are the completions' token counts in flat order; slots after
/// them are bucket padding (weight 0).
fn log_importance<B: Backend>(
    log_ratio: Tensor<B, 1>,
    lens: &[usize],
    level: ImportanceLevel,
) -> Tensor<B, 1> {
    if level == ImportanceLevel::Token {
        return log_ratio;
    }
    let slots = log_ratio.dims()[0];
    let rows = lens.len();
    // mean: [rows, slots], 1/len on a row's tokens; member: [slots, rows], 1 on them.
    let mut mean = vec![0f32; rows * slots];
    let mut member = vec![0f32; slots * rows];
    let mut at = 0;
    for (r, &len) in lens.iter().enumerate() {
        for t in at..(at + len).min(slots) {
            mean[r * slots + t] = 1.0 / len as f32;
            member[t * rows + r] = 1.0;
        }
        at += len;
    }
    let device = log_ratio.device();
    let mean = Tensor::<B, 2>::from_data(TensorData::new(mean, [rows, slots]), &device);
    let member = Tensor::<B, 2>::from_data(TensorData::new(member, [slots, rows]), &device);
    let per_row = mean.matmul(log_ratio.reshape([slots, 1]));
    member.matmul(per_row).reshape([slots])
}

/// GRPO's summed loss over flat completion tokens (see [`token_weights`]), the mean k3 KL
/// (when `beta > 0`), and the ratios. `lens`: the completions' token counts, in order.
#[allow(clippy::too_many_arguments)]
pub fn grpo_loss_sum<B: Backend>(
    logps: Tensor<B, 1>,
    old_logps: Tensor<B, 1>,
    ref_logps: Option<Tensor<B, 1>>,
    advantages: Tensor<B, 1>,
    token_weights: Tensor<B, 1>,
    real_tokens: usize,
    lens: &[usize],
    s: &GrpoSettings,
) -> (Tensor<B, 1>, Option<f64>, Tensor<B, 1>) {
    let log_ratio = log_importance(logps.clone() - old_logps, lens, s.importance_sampling_level);
    let (mut loss, ratio) = clipped_policy_loss(log_ratio, advantages, s.epsilon, s.epsilon_high());
    let mut kl_mean = None;
    if s.beta > 0.0 {
        let reference = ref_logps.expect("reference log-probs are taken when beta > 0");
        let kl = k3(logps, reference);
        // Bucket padding has log-prob and reference 0: its KL term is 0.
        let kl_sum = kl.clone().detach().sum().into_scalar().elem::<f64>();
        kl_mean = Some(kl_sum / real_tokens.max(1) as f64);
        loss = loss + kl.mul_scalar(s.beta);
    }
    ((loss * token_weights).sum(), kl_mean, ratio)
}

fn zero_std_fraction(rewards: &[f64], g: usize) -> f64 {
    let groups: Vec<&[f64]> = rewards.chunks(g).collect();
    let zero = groups
        .iter()
        .filter(|grp| nanstd(grp).is_nan() || nanstd(grp).abs() < 1e-8)
        .count();
    zero as f64 / groups.len().max(1) as f64
}

impl<B: AutodiffBackend> Method<B> for Grpo<B> {
    type Batch = GrpoBatch;

    fn next_step(
        &mut self,
        policy: &CausalLm<B>,
        micro_batches: usize,
    ) -> Result<Option<Vec<GrpoBatch>>> {
        if let Some(step) = self.cursor.pending.pop_front() {
            return Ok(Some(step));
        }
        let step = self.generation_batch(policy, micro_batches)?;
        for _ in 1..self.settings.num_iterations {
            self.cursor.pending.push_back(step.clone());
        }
        Ok(Some(step))
    }

    fn weight(&self, batch: &GrpoBatch) -> f64 {
        match batch {
            GrpoBatch::Train(b) => b.weight,
            GrpoBatch::HeldOut(h) => h.weight(),
        }
    }

    fn tokens(&self, batch: &GrpoBatch) -> usize {
        match batch {
            GrpoBatch::Train(b) => rollout_tokens(&b.completions),
            GrpoBatch::HeldOut(_) => 0,
        }
    }

    fn loss<Bk: Backend>(&self, model: &CausalLm<Bk>, batch: &GrpoBatch) -> LossOutput<Bk> {
        let b = match batch {
            GrpoBatch::Train(b) => b,
            GrpoBatch::HeldOut(h) => return h.loss_output(&model.device()),
        };
        let device = model.device();
        let s = &self.settings;
        let rows: Vec<&Completion> = b.completions.iter().collect();
        let sft = completion_batch(&rows, self.engine.pad, self.micro_batch);
        let out = token_outputs(model, &sft, s.sampling().logit_scale(), false, true)
            .expect("completions have at least one token");
        let n = b.token_weights.len();
        let slots = out.logps.dims()[0];
        let adv: Vec<f32> = b
            .completions
            .iter()
            .zip(&b.advantages)
            .flat_map(|(c, &a)| std::iter::repeat_n(a, c.tokens.len()))
            .collect();
        let old: Vec<f32> = b
            .completions
            .iter()
            .flat_map(|c| c.old_logps.iter().copied())
            .collect();
        let reference = (s.beta > 0.0).then(|| {
            let r: Vec<f32> = b
                .completions
                .iter()
                .flat_map(|c| {
                    c.ref_logps
                        .clone()
                        .expect("reference log-probs are taken when beta > 0")
                })
                .collect();
            flat_tensor(padded(r, slots), &device)
        });
        let (loss_sum, kl_mean, ratio) = grpo_loss_sum(
            out.logps,
            flat_tensor(padded(old, slots), &device),
            reference,
            flat_tensor(padded(adv.clone(), slots), &device),
            flat_tensor(padded(b.token_weights.clone(), slots), &device),
            n,
            &b.completions
                .iter()
                .map(|c| c.tokens.len())
                .collect::<Vec<_>>(),
            s,
        );
        let ratio = host_f32(ratio.detach());
        let clipped = clip_fraction(&ratio, &adv, s.epsilon, s.epsilon_high()) / n as f64;
        // Token means of this micro-batch, and rollout means, both weighted so that the
        // loop's division by the step's total weight leaves a mean.
        let w = b.weight;
        let mut metric_sums = vec![
            ("clip_ratio", clipped * w),
            ("entropy", out.entropy_sum / n as f64 * w),
        ];
        if let Some(kl) = kl_mean {
            metric_sums.push(("kl", kl * w));
        }
        for (k, v) in &b.stats {
            metric_sums.push((super::rollout::metric_name(k.clone()), v * w));
        }
        LossOutput {
            loss_sum,
            metric_sums,
        }
    }

    fn eval_batches(&mut self, policy: &CausalLm<B>) -> Result<Vec<GrpoBatch>> {
        let held = held_out(&self.engine, policy, &self.eval, self.eval_batch)?;
        Ok(held.into_iter().map(GrpoBatch::HeldOut).collect())
    }

    fn steps_per_epoch(&self, micro_batches: usize) -> Option<usize> {
        let prompts = self.micro_batch * micro_batches / self.settings.num_generations;
        Some(self.cursor.epoch.steps_per_epoch(prompts) * self.settings.num_iterations)
    }

    fn data_cursor(&self) -> &dyn DataCursor {
        &self.cursor
    }

    fn data_cursor_mut(&mut self) -> &mut dyn DataCursor {
        &mut self.cursor
    }
}
