//! What GRPO and PPO share around their rollouts: the prompt cursor (with the rollouts not
//! yet trained on, so resume is exact), rollout metrics, and held-out scoring.

use anyhow::{Context, Result};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

use datasets::tokenize::TokenizedPrompt;
use models::CausalLm;

use super::math::nanstd;
use super::rollout::{metric_name, Rollout, RolloutEngine};
use crate::data_order::{DataCursor, EpochCursor};
use crate::method::LossOutput;

/// Where an online method stands: its position in the prompts, how many rollouts it has
/// made (each seeds its own sampling), and the optimizer steps already rolled out but not
/// yet taken (PPO epochs, GRPO iterations), which a checkpoint keeps.
pub struct RolloutCursor<P> {
    pub epoch: EpochCursor,
    pub rollouts: u64,
    seed: u64,
    pub pending: VecDeque<P>,
}

impl<P: Serialize + DeserializeOwned> RolloutCursor<P> {
    pub fn new(prompts: usize, seed: u64) -> Self {
        Self {
            epoch: EpochCursor::new(prompts, seed),
            rollouts: 0,
            seed,
            pending: VecDeque::new(),
        }
    }

    /// The next `n` prompts (wrapping into the next epoch) and the seed of their sampling.
    pub fn next_prompts(&mut self, n: usize) -> (Vec<usize>, u64) {
        let idx = self.epoch.take(n);
        self.rollouts += 1;
        let seed = self
            .seed
            .wrapping_mul(0x2545_F491_4F6C_DD1D)
            .wrapping_add(self.rollouts);
        (idx, seed)
    }
}

impl<P: Serialize + DeserializeOwned> DataCursor for RolloutCursor<P> {
    fn epoch(&self) -> f64 {
        self.epoch.epoch()
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "prompts": self.epoch.to_json(),
            "rollouts": self.rollouts,
            "pending": serde_json::to_value(&self.pending).unwrap_or_default(),
        })
    }

    fn restore(&mut self, cursor: &serde_json::Value) -> Result<()> {
        self.epoch.restore(&cursor["prompts"])?;
        self.rollouts = cursor["rollouts"]
            .as_u64()
            .context("the checkpoint's data cursor has no rollout count")?;
        self.pending = serde_json::from_value(cursor["pending"].clone())
            .context("the checkpoint's pending rollouts do not match this method")?;
        Ok(())
    }
}

/// Rollout metrics with TRL's names: reward mean and std, per-function means, completion
/// lengths and how many were cut at the length limit, generation speed.
pub fn rollout_stats(rollout: &Rollout, rewards: &[f64], names: &[String]) -> Vec<(String, f64)> {
    let n = rewards.len().max(1) as f64;
    let kept: Vec<f64> = rewards.iter().copied().filter(|r| !r.is_nan()).collect();
    let mean = kept.iter().sum::<f64>() / kept.len().max(1) as f64;
    let mut out = vec![
        ("reward".to_string(), mean),
        ("reward_std".to_string(), nan_to_zero(nanstd(rewards))),
    ];
    for (f, name) in names.iter().enumerate() {
        let col: Vec<f64> = rollout.rewards_per_func.iter().map(|r| r[f]).collect();
        let kept: Vec<f64> = col.iter().copied().filter(|r| !r.is_nan()).collect();
        let m = kept.iter().sum::<f64>() / kept.len().max(1) as f64;
        out.push((format!("rewards/{name}/mean"), m));
        out.push((format!("rewards/{name}/std"), nan_to_zero(nanstd(&col))));
    }
    let c = &rollout.completions;
    out.push((
        "completions/mean_length".into(),
        c.iter().map(|c| c.tokens.len()).sum::<usize>() as f64 / n,
    ));
    out.push((
        "completions/clipped_ratio".into(),
        c.iter().filter(|c| !c.eos).count() as f64 / n,
    ));
    out.push((
        "generation_tokens_per_s".into(),
        rollout.generated_tokens as f64 / rollout.generation_s.max(1e-9),
    ));
    out
}

fn nan_to_zero(x: f64) -> f64 {
    if x.is_nan() {
        0.0
    } else {
        x
    }
}

/// Held-out prompts, completed greedily and scored: the eval "loss" is minus the mean
/// reward, so lower is better as for every other method, and `eval_reward` is logged too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldOut {
    pub rows: usize,
    pub reward_sum: f64,
    /// Per function: (name, sum of verdicts, rows with a verdict).
    pub per_func: Vec<(String, f64, usize)>,
    pub length_sum: usize,
}

/// Held-out prompts completed greedily and scored, in batches of `batch_size`.
pub fn held_out<B: AutodiffBackend>(
    engine: &RolloutEngine<B>,
    policy: &CausalLm<B>,
    prompts: &[TokenizedPrompt],
    batch_size: usize,
) -> Result<Vec<HeldOut>> {
    let (weights, names) = (engine.reward_weights(), engine.reward_names());
    prompts
        .chunks(batch_size.max(1))
        .map(|chunk| {
            let prompts: Vec<&TokenizedPrompt> = chunk.iter().collect();
            let rollout = engine.roll_out(policy, &prompts, 1, 0, true)?;
            Ok(HeldOut::new(&rollout, &weights, &names))
        })
        .collect()
}

impl HeldOut {
    pub fn new(rollout: &Rollout, weights: &[f64], names: &[String]) -> Self {
        let rewards = super::math::combine_rewards(&rollout.rewards_per_func, weights);
        let per_func = names
            .iter()
            .enumerate()
            .map(|(f, name)| {
                let kept: Vec<f64> = rollout
                    .rewards_per_func
                    .iter()
                    .map(|r| r[f])
                    .filter(|r| !r.is_nan())
                    .collect();
                (name.clone(), kept.iter().sum(), kept.len())
            })
            .collect();
        Self {
            rows: rewards.len(),
            reward_sum: rewards.iter().filter(|r| !r.is_nan()).sum(),
            per_func,
            length_sum: rollout.completions.iter().map(|c| c.tokens.len()).sum(),
        }
    }

    pub fn weight(&self) -> f64 {
        self.rows as f64
    }

    pub fn loss_output<B: Backend>(&self, device: &B::Device) -> LossOutput<B> {
        let mut metric_sums = vec![
            ("reward", self.reward_sum),
            ("completions/mean_length", self.length_sum as f64),
        ];
        for (name, sum, n) in &self.per_func {
            // Rescaled so the loop's division by all rows leaves the mean over rows that
            // had a verdict.
            let mean = if *n > 0 { sum / *n as f64 } else { 0.0 };
            metric_sums.push((
                metric_name(format!("rewards/{name}/mean")),
                mean * self.rows as f64,
            ));
        }
        LossOutput {
            loss_sum: Tensor::from_floats([-self.reward_sum as f32], device),
            metric_sums,
        }
    }
}
