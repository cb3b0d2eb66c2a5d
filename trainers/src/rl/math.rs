//! The arithmetic of GRPO and PPO, as TRL writes it (GRPO: trl/trainer/grpo_trainer.py,
//! TRL 1.16; PPO: trl/trainer/ppo_trainer.py and `masked_whiten` of trl/core.py, TRL 0.20).
//! Rollout-level quantities (advantages, returns) are host `f64`; the per-token losses are
//! tensors so they carry gradients. `scripts/parity/rl_reference.py` is the reference.

use burn::prelude::*;
use serde::{Deserialize, Serialize};

/// How GRPO scales group-centred rewards (TRL `scale_rewards`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    /// Divide by the group's standard deviation (the GRPO paper).
    #[default]
    Group,
    /// Divide by the whole batch's standard deviation (Dr. GRPO's and PPO-style robustness).
    Batch,
    /// Only centre (Dr. GRPO).
    None,
}

/// Weighted sum of each row's per-function rewards, `NaN` entries (a function that had no
/// verdict) skipped; a row where every function had none stays `NaN` (unscorable).
pub fn combine_rewards(per_func: &[Vec<f64>], weights: &[f64]) -> Vec<f64> {
    per_func
        .iter()
        .map(|row| {
            if row.iter().all(|r| r.is_nan()) {
                return f64::NAN;
            }
            row.iter()
                .zip(weights)
                .filter(|(r, _)| !r.is_nan())
                .map(|(r, w)| r * w)
                .sum()
        })
        .collect()
}

fn nanmean(v: &[f64]) -> f64 {
    let (s, n) = v
        .iter()
        .filter(|x| !x.is_nan())
        .fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        s / n as f64
    }
}

/// TRL's `nanstd`: the unbiased standard deviation of the non-NaN values.
pub fn nanstd(v: &[f64]) -> f64 {
    let m = nanmean(v);
    let kept: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    let n = kept.len() as f64;
    let var = kept.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n;
    (var * n / (n - 1.0)).sqrt()
}

/// GRPO advantages: each reward minus its group's mean (groups are consecutive runs of
/// `group` rows), optionally divided by `std + 1e-4`; unscorable rows get 0.
pub fn group_advantages(rewards: &[f64], group: usize, scale: ScaleRewards) -> Vec<f64> {
    let batch_std = nanstd(rewards);
    let mut out = Vec::with_capacity(rewards.len());
    for g in rewards.chunks(group) {
        let mean = nanmean(g);
        let std = match scale {
            ScaleRewards::Batch => batch_std,
            _ if group > 1 => nanstd(g),
            _ => 0.0,
        };
        for r in g {
            let a = match scale {
                ScaleRewards::None => r - mean,
                _ => (r - mean) / (std + 1e-4),
            };
            out.push(if a.is_nan() { 0.0 } else { a });
        }
    }
    out
}

/// `masked_whiten` over ragged rows (every value is valid): zero mean, unit (unbiased)
/// variance across all of them; `shift_mean = false` adds the mean back.
pub fn whiten(rows: &[Vec<f64>], shift_mean: bool) -> Vec<Vec<f64>> {
    let all: Vec<f64> = rows.iter().flatten().copied().collect();
    let n = all.len() as f64;
    let mean = all.iter().sum::<f64>() / n;
    let var = all.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n * n / (n - 1.0);
    let scale = 1.0 / (var + 1e-8).sqrt();
    rows.iter()
        .map(|r| {
            r.iter()
                .map(|x| (x - mean) * scale + if shift_mean { 0.0 } else { mean })
                .collect()
        })
        .collect()
}

/// Generalised advantage estimation over one completion: `rewards[t]` and `values[t]` per
/// token, the value after the last token taken as 0 (the episode ends). Returns
/// (advantages, returns = advantages + values).
pub fn gae(rewards: &[f64], values: &[f64], gamma: f64, lam: f64) -> (Vec<f64>, Vec<f64>) {
    let n = rewards.len();
    let mut adv = vec![0.0; n];
    let mut last = 0.0;
    for t in (0..n).rev() {
        let next = if t + 1 < n { values[t + 1] } else { 0.0 };
        let delta = rewards[t] + gamma * next - values[t];
        last = delta + gamma * lam * last;
        adv[t] = last;
    }
    let ret = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, ret)
}

/// PPO's per-token rewards: `-kl_coef * KL_t` everywhere, plus the sequence score on the
/// last token. `kl` is the per-token estimate (k1: `logp - ref_logp`).
pub fn ppo_token_rewards(kl: &[f64], score: f64, kl_coef: f64) -> Vec<f64> {
    let mut r: Vec<f64> = kl.iter().map(|k| -kl_coef * k).collect();
    if let Some(last) = r.last_mut() {
        *last += score;
    }
    r
}

/// Per-token KL estimators of `KL(policy || reference)` from `log_ratio = ref - logp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    /// `-log_ratio`: unbiased, can be negative.
    K1,
    /// `exp(log_ratio) - log_ratio - 1`: unbiased, non-negative, lower variance.
    K3,
}

impl KlEstimator {
    pub fn host(self, logp: f64, ref_logp: f64) -> f64 {
        let lr = ref_logp - logp;
        match self {
            KlEstimator::K1 => -lr,
            KlEstimator::K3 => lr.exp() - lr - 1.0,
        }
    }
}

/// k3 on tensors (GRPO's KL penalty, with gradient through `logps`).
pub fn k3<B: Backend>(logps: Tensor<B, 1>, ref_logps: Tensor<B, 1>) -> Tensor<B, 1> {
    let lr = ref_logps - logps;
    lr.clone().exp() - lr - 1.0
}

/// The clipped-ratio objective per token, as a loss: `-min(r A, clip(r, 1-lo, 1+hi) A)`
/// with `r = exp(log_ratio)` (`logps - old_logps`, or GSPO's sequence mean of it). Also
/// returns `r` (detached use: clip statistics).
pub fn clipped_policy_loss<B: Backend>(
    log_ratio: Tensor<B, 1>,
    advantages: Tensor<B, 1>,
    eps_low: f64,
    eps_high: f64,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let ratio = log_ratio.exp();
    let clipped = ratio.clone().clamp(1.0 - eps_low, 1.0 + eps_high);
    let a = ratio.clone() * advantages.clone();
    let b = clipped * advantages;
    (a.min_pair(b).neg(), ratio)
}

/// PPO's clipped value loss per token, before the `0.5 *` mean: `max((v - R)^2,
/// (clip(v, v_old - c, v_old + c) - R)^2)`. Also returns whether the clipped term won.
pub fn clipped_value_loss<B: Backend>(
    values: Tensor<B, 1>,
    old_values: Tensor<B, 1>,
    returns: Tensor<B, 1>,
    clip: f64,
) -> (Tensor<B, 1>, Tensor<B, 1, Bool>) {
    let lo = old_values.clone().sub_scalar(clip);
    let hi = old_values.add_scalar(clip);
    let clipped = values.clone().max_pair(lo).min_pair(hi);
    let l1 = (values - returns.clone()).powf_scalar(2.0);
    let l2 = (clipped - returns).powf_scalar(2.0);
    let won = l2.clone().greater(l1.clone());
    (l1.max_pair(l2), won)
}

/// Fraction of tokens whose ratio left the trust region on the side the advantage pushes
/// (TRL's `clip_ratio/region_mean`).
pub fn clip_fraction(ratio: &[f32], advantages: &[f32], eps_low: f64, eps_high: f64) -> f64 {
    let clipped = ratio
        .iter()
        .zip(advantages)
        .filter(|(&r, &a)| {
            let r = r as f64;
            (r < 1.0 - eps_low && a < 0.0) || (r > 1.0 + eps_high && a > 0.0)
        })
        .count();
    clipped as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_std_groups_get_zero_advantage_and_none_only_centres() {
        let r = [1.0, 1.0, 0.0, 2.0];
        assert_eq!(
            group_advantages(&r, 2, ScaleRewards::Group)[..2],
            [0.0, 0.0]
        );
        assert_eq!(
            group_advantages(&r, 2, ScaleRewards::None),
            [0.0, 0.0, -1.0, 1.0]
        );
    }

    #[test]
    fn gae_with_lambda_one_and_gamma_one_is_reward_to_go_minus_value() {
        let (adv, ret) = gae(&[0.0, 0.0, 1.0], &[0.2, 0.5, 0.1], 1.0, 1.0);
        assert_eq!(ret, vec![1.0, 1.0, 1.0]);
        assert!((adv[0] - 0.8).abs() < 1e-12);
    }
}
