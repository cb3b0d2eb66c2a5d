//! PPO with a reward model (TRL 0.20's `PPOTrainer` formulas): per-token KL penalty in the
//! reward, GAE, whitened advantages, clipped policy and value losses, `num_ppo_epochs`
//! passes over mini-batches of each rollout batch. The value head sits on the policy's
//! backbone (with LoRA: on the frozen base, so it costs one `[hidden, 1]` matrix).

use anyhow::{bail, Result};
use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::path::Path;

use datasets::tokenize::TokenizedPrompt;
use models::CausalLm;

use super::critic::{Critic, ValueRows};
use super::math::{
    clip_fraction, clipped_policy_loss, clipped_value_loss, combine_rewards, gae,
    ppo_token_rewards, whiten, KlEstimator,
};
use super::rollout::{
    completion_batch, flat_tensor, host_f32, host_outputs, metric_name, padded, rollout_tokens,
    token_outputs, Completion, RolloutEngine, SamplingSettings,
};
use super::stats::{held_out, rollout_stats, HeldOut, RolloutCursor};
use crate::data_order::DataCursor;
use crate::method::{LossOutput, Method};

/// The `[ppo]` section of a recipe (TRL `PPOConfig` names; `recipes/ppo.toml` sets every
/// one, since the anchors disagree on defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PpoSettings {
    #[serde(default = "default_completion_length")]
    pub max_completion_length: usize,
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    #[serde(default = "one")]
    pub top_p: f64,
    #[serde(default)]
    pub top_k: usize,
    /// Weight of the per-token KL penalty in the reward.
    #[serde(default = "default_kl_coef")]
    pub kl_coef: f64,
    #[serde(default = "default_kl_estimator")]
    pub kl_estimator: KlEstimator,
    #[serde(default = "one")]
    pub gamma: f64,
    #[serde(default = "default_lam")]
    pub lam: f64,
    #[serde(default = "default_clip")]
    pub cliprange: f64,
    #[serde(default = "default_clip")]
    pub cliprange_value: f64,
    #[serde(default = "default_vf_coef")]
    pub vf_coef: f64,
    /// Passes over each rollout batch.
    #[serde(default = "default_epochs")]
    pub num_ppo_epochs: usize,
    /// Optimizer steps per pass: a rollout batch holds `num_mini_batches` x
    /// `per_device_train_batch_size` x `gradient_accumulation_steps` completions.
    #[serde(default = "one_u")]
    pub num_mini_batches: usize,
    #[serde(default)]
    pub whiten_rewards: bool,
    /// Subtracted from the score of completions that never emitted EOS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing_eos_penalty: Option<f64>,
    /// `shared`: a value head on the policy's backbone; `separate`: a critic model of its
    /// own, initialised from the reward model (or `critic_model`), with its own optimizer.
    #[serde(default, skip_serializing_if = "CriticKind::is_shared")]
    pub critic: CriticKind,
    /// `separate`: the reward model the critic starts from (default: the first
    /// `[[rewards]]` model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub critic_model: Option<std::path::PathBuf>,
    /// `separate`: the critic's learning rate (default: `[train] learning_rate`; constant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vf_learning_rate: Option<f64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CriticKind {
    #[default]
    Shared,
    Separate,
}

impl CriticKind {
    fn is_shared(&self) -> bool {
        *self == CriticKind::Shared
    }
}

fn default_completion_length() -> usize {
    53
}
fn default_temperature() -> f64 {
    0.7
}
fn one() -> f64 {
    1.0
}
fn one_u() -> usize {
    1
}
fn default_kl_coef() -> f64 {
    0.05
}
fn default_kl_estimator() -> KlEstimator {
    KlEstimator::K1
}
fn default_lam() -> f64 {
    0.95
}
fn default_clip() -> f64 {
    0.2
}
fn default_vf_coef() -> f64 {
    0.1
}
fn default_epochs() -> usize {
    4
}

impl Default for PpoSettings {
    fn default() -> Self {
        toml::from_str("").expect("every field has a default")
    }
}

impl PpoSettings {
    pub fn validate(&self) -> Result<()> {
        if self.num_ppo_epochs == 0 || self.num_mini_batches == 0 {
            bail!("[ppo] num_ppo_epochs and num_mini_batches must be at least 1");
        }
        self.sampling().validate("[ppo]")?;
        if !(self.cliprange > 0.0
            && self.cliprange_value > 0.0
            && self.kl_coef >= 0.0
            && self.vf_coef >= 0.0)
        {
            bail!("[ppo] cliprange and cliprange_value must be positive, kl_coef and vf_coef >= 0");
        }
        if !((0.0..=1.0).contains(&self.gamma) && (0.0..=1.0).contains(&self.lam)) {
            bail!("[ppo] gamma and lam must be in [0, 1]");
        }
        if self.critic == CriticKind::Shared
            && (self.critic_model.is_some() || self.vf_learning_rate.is_some())
        {
            bail!("[ppo] critic_model and vf_learning_rate are for critic = \"separate\"");
        }
        if self
            .vf_learning_rate
            .is_some_and(|lr| !(lr.is_finite() && lr > 0.0))
        {
            bail!("[ppo] vf_learning_rate must be positive");
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
}

/// One micro-batch of a PPO mini-batch. Per-token vectors are flat, row by row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PpoRows {
    /// `old_logps` here are the policy's forward log-probs at rollout time.
    pub completions: Vec<Completion>,
    pub old_values: Vec<f32>,
    pub returns: Vec<f32>,
    pub advantages: Vec<f32>,
    pub stats: Vec<(String, f64)>,
    /// A separate critic's update on this step (`loss/value`, `val/clipfrac`, ...), logged
    /// with the policy's metrics.
    #[serde(default)]
    pub critic_stats: Vec<(String, f64)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PpoBatch {
    Train(PpoRows),
    HeldOut(HeldOut),
}

pub struct Ppo<B: AutodiffBackend> {
    engine: RolloutEngine<B>,
    settings: PpoSettings,
    train: Vec<TokenizedPrompt>,
    eval: Vec<TokenizedPrompt>,
    micro_batch: usize,
    eval_batch: usize,
    cursor: RolloutCursor<Vec<PpoBatch>>,
    critic: Option<Critic<B>>,
}

/// A rollout batch turned into PPO's training targets.
pub struct PpoTargets {
    pub advantages: Vec<Vec<f64>>,
    pub returns: Vec<Vec<f64>>,
    pub stats: Vec<(String, f64)>,
}

/// Per-token KL estimates (policy vs reference at rollout) and sequence scores -> per-token
/// rewards (KL penalty, score on the last token) -> GAE advantages and returns, the
/// advantages whitened over the whole rollout batch.
pub fn ppo_targets(
    s: &PpoSettings,
    kl: &[Vec<f64>],
    scores: &[f64],
    values: &[Vec<f64>],
) -> PpoTargets {
    let mut token_rewards: Vec<Vec<f64>> = kl
        .iter()
        .zip(scores)
        .map(|(k, &score)| ppo_token_rewards(k, score, s.kl_coef))
        .collect();
    if s.whiten_rewards {
        token_rewards = whiten(&token_rewards, false);
    }
    let (mut advantages, mut returns) = (vec![], vec![]);
    for (r, v) in token_rewards.iter().zip(values) {
        let (a, ret) = gae(r, v, s.gamma, s.lam);
        advantages.push(a);
        returns.push(ret);
    }
    let advantages = whiten(&advantages, true);
    let n = scores.len().max(1) as f64;
    let kl_sum: f64 = kl.iter().flatten().sum();
    let mean_score = scores.iter().sum::<f64>() / n;
    let non_score = -s.kl_coef * kl_sum / n;
    PpoTargets {
        advantages,
        returns,
        stats: vec![
            ("objective/scores".to_string(), mean_score),
            ("objective/kl".to_string(), kl_sum / n),
            ("objective/non_score_reward".to_string(), non_score),
            ("objective/rlhf_reward".to_string(), mean_score + non_score),
        ],
    }
}

/// PPO's loss pieces for one micro-batch of flat completion tokens: the clipped policy
/// loss (token mean), the clipped value loss (`0.5 *` token mean), the ratios and which
/// tokens' value loss took the clipped branch.
pub struct PpoLoss<B: Backend> {
    pub policy: Tensor<B, 1>,
    pub value: Tensor<B, 1>,
    pub ratio: Tensor<B, 1>,
    pub value_clipped: Tensor<B, 1, Bool>,
}

#[allow(clippy::too_many_arguments)]
pub fn ppo_loss<B: Backend>(
    logps: Tensor<B, 1>,
    old_logps: Tensor<B, 1>,
    advantages: Tensor<B, 1>,
    values: Tensor<B, 1>,
    old_values: Tensor<B, 1>,
    returns: Tensor<B, 1>,
    real_tokens: usize,
    s: &PpoSettings,
) -> PpoLoss<B> {
    // Bucket padding entries are all 0 and add nothing to either sum.
    let n = real_tokens.max(1) as f64;
    let (pg, ratio) = clipped_policy_loss(logps - old_logps, advantages, s.cliprange, s.cliprange);
    let (vf, value_clipped) = clipped_value_loss(values, old_values, returns, s.cliprange_value);
    PpoLoss {
        policy: pg.sum().div_scalar(n),
        value: vf.sum().div_scalar(n).mul_scalar(0.5),
        ratio,
        value_clipped,
    }
}

impl<B: AutodiffBackend> Ppo<B> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        engine: RolloutEngine<B>,
        settings: PpoSettings,
        train: Vec<TokenizedPrompt>,
        eval: Vec<TokenizedPrompt>,
        micro_batch: usize,
        eval_batch: usize,
        seed: u64,
        critic: Option<Critic<B>>,
    ) -> Result<Self> {
        settings.validate()?;
        if (settings.critic == CriticKind::Separate) != critic.is_some() {
            bail!("[ppo] critic = \"separate\" needs a critic model, and only it");
        }
        if train.is_empty() {
            bail!("the training split has no prompts: nothing to roll out");
        }
        Ok(Self {
            cursor: RolloutCursor::new(train.len(), seed),
            engine,
            settings,
            train,
            eval,
            micro_batch,
            eval_batch,
            critic,
        })
    }

    /// Roll out one batch and queue its `num_ppo_epochs x num_mini_batches` steps.
    fn rollout_steps(&mut self, policy: &CausalLm<B>, micro_batches: usize) -> Result<()> {
        let started = std::time::Instant::now();
        let s = self.settings.clone();
        let mini = self.micro_batch * micro_batches;
        let (idx, seed) = self.cursor.next_prompts(mini * s.num_mini_batches);
        let prompts: Vec<&TokenizedPrompt> = idx.iter().map(|&i| &self.train[i]).collect();
        let mut rollout = self.engine.roll_out(policy, &prompts, 1, seed, false)?;
        // Old log-probs and values from one forward pass of the policy as it trains (TRL
        // recomputes them too rather than trusting the sampler's numbers).
        let (logps, values) = host_outputs(
            &policy.valid(),
            &rollout.completions,
            s.sampling().logit_scale(),
            self.engine.pad,
            self.critic.is_none(),
        );
        let values = match &self.critic {
            Some(c) => c.host_values(&rollout.completions, self.engine.pad),
            None => values,
        };
        for (c, lp) in rollout.completions.iter_mut().zip(logps) {
            c.old_logps = lp;
        }
        let rewards = combine_rewards(&rollout.rewards_per_func, &self.engine.reward_weights());
        let scores: Vec<f64> = rewards
            .iter()
            .zip(&rollout.completions)
            .map(|(&r, c)| {
                let r = if r.is_nan() { 0.0 } else { r };
                match s.missing_eos_penalty {
                    Some(p) if !c.eos => r - p,
                    _ => r,
                }
            })
            .collect();
        let kl: Vec<Vec<f64>> = rollout
            .completions
            .iter()
            .map(|c| match &c.ref_logps {
                Some(r) => c
                    .old_logps
                    .iter()
                    .zip(r)
                    .map(|(&lp, &rl)| s.kl_estimator.host(lp as f64, rl as f64))
                    .collect(),
                None => vec![0.0; c.tokens.len()],
            })
            .collect();
        let values64: Vec<Vec<f64>> = values
            .iter()
            .map(|v| v.iter().map(|&x| x as f64).collect())
            .collect();
        let t = ppo_targets(&s, &kl, &scores, &values64);
        let mut stats = rollout_stats(&rollout, &rewards, &self.engine.reward_names());
        stats.extend(t.stats.iter().cloned());
        // Sampling, reference and reward passes, old log-probs and values: the rollout's
        // cost, paid by the first step that trains on it.
        stats.push(("rollout_s".into(), started.elapsed().as_secs_f64()));
        let mut rng = StdRng::seed_from_u64(seed);
        for _ in 0..s.num_ppo_epochs {
            let mut order: Vec<usize> = (0..rollout.completions.len()).collect();
            order.shuffle(&mut rng);
            for mb in order.chunks(mini) {
                let step: Vec<PpoBatch> = mb
                    .chunks(self.micro_batch)
                    .map(|rows| {
                        let f32s = |v: &[Vec<f64>]| -> Vec<f32> {
                            rows.iter()
                                .flat_map(|&i| v[i].iter().map(|&x| x as f32))
                                .collect()
                        };
                        PpoBatch::Train(PpoRows {
                            completions: rows
                                .iter()
                                .map(|&i| rollout.completions[i].clone())
                                .collect(),
                            old_values: rows
                                .iter()
                                .flat_map(|&i| values[i].iter().copied())
                                .collect(),
                            returns: f32s(&t.returns),
                            advantages: f32s(&t.advantages),
                            stats: stats.clone(),
                            critic_stats: vec![],
                        })
                    })
                    .collect();
                self.cursor.pending.push_back(step);
            }
        }
        Ok(())
    }
}

/// The separate critic's update on one step's micro-batches; its metrics ride on them.
fn train_critic<B: AutodiffBackend>(
    critic: &mut Critic<B>,
    batches: &mut [PpoBatch],
    s: &PpoSettings,
    pad: datasets::batch::Padding,
    micro_batch: usize,
) -> Result<()> {
    let rows: Vec<ValueRows<'_>> = batches
        .iter()
        .filter_map(|b| match b {
            PpoBatch::Train(r) => Some(ValueRows {
                completions: &r.completions,
                old_values: &r.old_values,
                returns: &r.returns,
            }),
            PpoBatch::HeldOut(_) => None,
        })
        .collect();
    let stats = critic.update(&rows, pad, micro_batch, s.cliprange_value, s.vf_coef)?;
    // Each micro-batch carries the step's means; the loop averages them back.
    let per_batch = vec![
        ("loss/value".to_string(), stats.value_loss),
        ("val/clipfrac".to_string(), stats.clipfrac),
        ("critic/grad_norm".to_string(), stats.grad_norm),
    ];
    for b in batches.iter_mut() {
        if let PpoBatch::Train(r) = b {
            r.critic_stats = per_batch.clone();
        }
    }
    Ok(())
}

impl<B: AutodiffBackend> Method<B> for Ppo<B> {
    type Batch = PpoBatch;

    fn next_step(
        &mut self,
        policy: &CausalLm<B>,
        micro_batches: usize,
    ) -> Result<Option<Vec<PpoBatch>>> {
        if self.cursor.pending.is_empty() {
            self.rollout_steps(policy, micro_batches)?;
        }
        let mut step = self.cursor.pending.pop_front();
        if let (Some(critic), Some(batches)) = (self.critic.as_mut(), step.as_mut()) {
            train_critic(
                critic,
                batches,
                &self.settings,
                self.engine.pad,
                self.micro_batch,
            )?;
        }
        Ok(step)
    }

    /// TRL averages each micro-batch's masked means, then over the accumulated micro-batches.
    fn weight(&self, batch: &PpoBatch) -> f64 {
        match batch {
            PpoBatch::Train(_) => 1.0,
            PpoBatch::HeldOut(h) => h.weight(),
        }
    }

    fn tokens(&self, batch: &PpoBatch) -> usize {
        match batch {
            PpoBatch::Train(b) => rollout_tokens(&b.completions),
            PpoBatch::HeldOut(_) => 0,
        }
    }

    fn loss<Bk: Backend>(&self, model: &CausalLm<Bk>, batch: &PpoBatch) -> LossOutput<Bk> {
        let b = match batch {
            PpoBatch::Train(b) => b,
            PpoBatch::HeldOut(h) => return h.loss_output(&model.device()),
        };
        let s = &self.settings;
        let device = model.device();
        let rows: Vec<&Completion> = b.completions.iter().collect();
        let sft = completion_batch(&rows, self.engine.pad, self.micro_batch);
        let out = token_outputs(
            model,
            &sft,
            s.sampling().logit_scale(),
            self.critic.is_none(),
            true,
        )
        .expect("completions have at least one token");
        let slots = out.logps.dims()[0];
        let pad = |v: &Vec<f32>| flat_tensor(padded(v.clone(), slots), &device);
        let n = b.advantages.len() as f64;
        let old: Vec<f32> = b
            .completions
            .iter()
            .flat_map(|c| c.old_logps.iter().copied())
            .collect();
        // With a separate critic the policy has no value head: the value loss is the
        // critic's, already taken when the step was drawn.
        let values = out.values.unwrap_or_else(|| pad(&b.old_values));
        let l = ppo_loss(
            out.logps.clone(),
            pad(&old),
            pad(&b.advantages),
            values,
            pad(&b.old_values),
            pad(&b.returns),
            out.real,
            s,
        );
        let (pg_loss, vf_loss, ratio, value_clipped) =
            (l.policy, l.value, l.ratio, l.value_clipped);
        let scalar = |t: &Tensor<Bk, 1>| t.clone().detach().into_scalar().elem::<f64>();
        let (pg_v, vf_v) = (scalar(&pg_loss), scalar(&vf_loss));
        let ratio = host_f32(ratio.detach());
        let new = host_f32(out.logps.detach());
        let approx_kl = new
            .iter()
            .zip(&old)
            .map(|(a, b)| 0.5 * ((a - b) as f64).powi(2))
            .sum::<f64>()
            / n;
        let vf_clipfrac = host_f32(value_clipped.float()).iter().sum::<f32>() as f64 / n;
        let mut metric_sums = vec![
            ("loss/policy", pg_v),
            (
                "policy/clipfrac",
                clip_fraction(&ratio, &b.advantages, s.cliprange, s.cliprange) / n,
            ),
            ("policy/approxkl", approx_kl),
            ("policy/entropy", out.entropy_sum / n),
        ];
        let separate = self.critic.is_some();
        if !separate {
            metric_sums.push(("loss/value", vf_v));
            metric_sums.push(("val/clipfrac", vf_clipfrac));
        }
        for (k, v) in b.stats.iter().chain(&b.critic_stats) {
            metric_sums.push((metric_name(k.clone()), *v));
        }
        LossOutput {
            loss_sum: match separate {
                true => pg_loss,
                false => pg_loss + vf_loss.mul_scalar(s.vf_coef),
            },
            metric_sums,
        }
    }

    fn eval_batches(&mut self, policy: &CausalLm<B>) -> Result<Vec<PpoBatch>> {
        let held = held_out(&self.engine, policy, &self.eval, self.eval_batch)?;
        Ok(held.into_iter().map(PpoBatch::HeldOut).collect())
    }

    fn steps_per_epoch(&self, micro_batches: usize) -> Option<usize> {
        let per_rollout = self.micro_batch * micro_batches * self.settings.num_mini_batches;
        Some(
            self.cursor.epoch.steps_per_epoch(per_rollout)
                * self.settings.num_ppo_epochs
                * self.settings.num_mini_batches,
        )
    }

    fn data_cursor(&self) -> &dyn DataCursor {
        &self.cursor
    }

    fn save_state(&self, dir: &Path, checkpoint: bool) -> Result<()> {
        match &self.critic {
            Some(c) => c.save(dir, checkpoint),
            None => Ok(()),
        }
    }

    fn restore_state(&mut self, dir: &Path) -> Result<()> {
        match self.critic.as_mut() {
            Some(c) => c.restore(dir),
            None => Ok(()),
        }
    }

    fn data_cursor_mut(&mut self) -> &mut dyn DataCursor {
        &mut self.cursor
    }
}
