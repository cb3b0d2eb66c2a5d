//! PPO's separate critic (`[ppo] critic = "separate"`, TRL's and OpenRLHF's setup): a model
//! of its own with a value head, initialised from the reward model (its backbone, and its
//! score head as the value head, as TRL's `AutoModelForSequenceClassification` value model),
//! trained in full on the clipped value loss with its own AdamW and learning rate. It
//! trains on the same micro-batches as the policy, when a step's batches are drawn; it is
//! saved beside the policy (`critic/`, a reward-model directory) and restored on resume.

use anyhow::{Context, Result};
use burn::module::{AutodiffModule, ModuleMapper, Param};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use std::path::{Path, PathBuf};

use checkpoints::export::load_reward_model;
use checkpoints::tensors::{load_tensors, save_tensors};
use datasets::batch::{Padding, SftBatch};
use models::checkpoint::{save_model, SaveOptions};
use models::weights::DiskDtype;
use models::{CausalLm, ModelConfig};

use super::math::clipped_value_loss;
use super::rollout::{completion_batch, flat_tensor, host_f32, padded, Completion};
use crate::logprobs::{keep_real, trained_hidden};
use crate::optim::{global_grad_norm, AdamW, AdamWSettings};

/// Where a run keeps its critic: beside the policy, in checkpoints and the final export.
pub const CRITIC_DIR: &str = "critic";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "critic_state.json";

pub struct Critic<B: AutodiffBackend> {
    /// The backbone with a value head (no LM head, no score head).
    model: CausalLm<B>,
    /// The reward model's config, to save the critic as one.
    cfg: ModelConfig,
    tokenizer_dir: PathBuf,
    opt: AdamW<B>,
    lr: f64,
    max_grad_norm: f64,
}

/// The critic's view of a PPO micro-batch: completions, rollout values and returns.
pub struct ValueRows<'a> {
    pub completions: &'a [Completion],
    pub old_values: &'a [f32],
    pub returns: &'a [f32],
}

/// What one critic update measured (means over its micro-batches).
pub struct CriticStats {
    pub value_loss: f64,
    pub clipfrac: f64,
    pub grad_norm: f64,
}

/// A reward model as a critic: its score head becomes the value head.
fn as_critic<B: Backend>(mut model: CausalLm<B>) -> CausalLm<B> {
    model.value_head = model.score.take();
    model
}

/// Every weight a trainable leaf: a reward adapter merged into its base leaves computed
/// tensors and a frozen base behind.
struct Trainable;

impl<B: AutodiffBackend> ModuleMapper<B> for Trainable {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        param.set_require_grad(true)
    }
}

/// A reward model (full, or an adapter merged into its base) loaded as a trainable critic.
fn trainable_critic<B: AutodiffBackend>(
    dir: &Path,
    device: &B::Device,
) -> Result<(ModelConfig, CausalLm<B>)> {
    let (cfg, model, _) = load_reward_model::<B::InnerBackend>(dir, device)?;
    let model = CausalLm::<B>::from_inner(as_critic(model)).map(&mut Trainable);
    Ok((cfg, model))
}

impl<B: AutodiffBackend> Critic<B> {
    /// From a reward model (full, or a reward adapter merged into its base).
    pub fn from_reward_model(
        dir: &Path,
        tokenizer_dir: &Path,
        adam: AdamWSettings,
        lr: f64,
        max_grad_norm: f64,
        device: &B::Device,
    ) -> Result<Self> {
        let (cfg, model) = trainable_critic::<B>(dir, device)
            .with_context(|| format!("[ppo] the critic starts from {}", dir.display()))?;
        Ok(Self {
            model,
            cfg,
            tokenizer_dir: tokenizer_dir.to_path_buf(),
            opt: AdamW::new(adam),
            lr,
            max_grad_norm,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    /// Values `[n]` at the completion tokens of `batch` (bucket padding zeroed), and the
    /// real token count.
    fn values<Bk: Backend>(
        model: &CausalLm<Bk>,
        batch: &SftBatch,
    ) -> Option<(Tensor<Bk, 1>, usize)> {
        let h = trained_hidden(model, batch)?;
        Some((keep_real(model.values(h.hidden), &h.mask), h.rows.len()))
    }

    /// Per-token values of each completion, without gradient (the rollout's old values).
    pub fn host_values(&self, completions: &[Completion], pad: Padding) -> Vec<Vec<f32>> {
        const ROWS: usize = 16;
        let model = self.model.valid();
        let mut out = Vec::with_capacity(completions.len());
        for chunk in completions.chunks(ROWS) {
            let rows: Vec<&Completion> = chunk.iter().collect();
            let batch = completion_batch(&rows, pad, ROWS);
            let v = Self::values(&model, &batch).map_or(vec![], |(v, _)| host_f32(v));
            let mut at = 0;
            for c in chunk {
                out.push(v[at..at + c.tokens.len()].to_vec());
                at += c.tokens.len();
            }
        }
        out
    }

    /// One optimizer step on the clipped value loss (`vf_coef * 0.5 *` token mean per
    /// micro-batch, averaged over the micro-batches, as the policy's PPO loss averages).
    pub fn update(
        &mut self,
        micro_batches: &[ValueRows<'_>],
        pad: Padding,
        capacity: usize,
        cliprange_value: f64,
        vf_coef: f64,
    ) -> Result<CriticStats> {
        let device = self.model.device();
        let mut acc = GradientsAccumulator::<CausalLm<B>>::new();
        let (mut loss_sum, mut clipped, mut tokens) = (0.0, 0.0, 0usize);
        let k = micro_batches.len().max(1) as f64;
        for rows in micro_batches {
            let refs: Vec<&Completion> = rows.completions.iter().collect();
            let batch = completion_batch(&refs, pad, capacity);
            let Some((values, real)) = Self::values(&self.model, &batch) else {
                continue;
            };
            let slots = values.dims()[0];
            let pad_to = |v: &[f32]| flat_tensor(padded(v.to_vec(), slots), &device);
            let (vf, won) = clipped_value_loss(
                values,
                pad_to(rows.old_values),
                pad_to(rows.returns),
                cliprange_value,
            );
            let n = real.max(1) as f64;
            let loss = vf.sum().div_scalar(n).mul_scalar(0.5);
            loss_sum += loss.clone().into_scalar().elem::<f64>() / k;
            clipped += host_f32(won.float())[..real].iter().sum::<f32>() as f64;
            tokens += real;
            let scaled = loss.mul_scalar(vf_coef / k);
            acc.accumulate(
                &self.model,
                GradientsParams::from_grads(scaled.backward(), &self.model),
            );
        }
        let grads = acc.grads();
        let norm = global_grad_norm(&self.model, &grads);
        if !norm.is_finite() {
            anyhow::bail!("the critic's gradient norm is {norm}: stopped");
        }
        let clip = if self.max_grad_norm > 0.0 && norm > self.max_grad_norm {
            self.max_grad_norm / (norm + 1e-6)
        } else {
            1.0
        };
        self.model = self.opt.step(self.model.clone(), grads, self.lr, clip);
        Ok(CriticStats {
            value_loss: loss_sum,
            clipfrac: clipped / tokens.max(1) as f64,
            grad_norm: norm,
        })
    }

    /// The critic as a reward-model directory under `dir` (`critic/`), with its optimizer
    /// state when `with_optimizer` (checkpoints).
    pub fn save(&self, dir: &Path, with_optimizer: bool) -> Result<()> {
        let out = dir.join(CRITIC_DIR);
        let mut model = self.model.valid();
        model.score = model.value_head.take();
        save_model(
            &model,
            &self.cfg,
            &out,
            Some(&self.tokenizer_dir),
            &SaveOptions {
                dtype: DiskDtype::F32,
                ..Default::default()
            },
        )?;
        if with_optimizer {
            save_tensors(
                &out.join(OPTIMIZER_FILE),
                &self.opt.state_tensors(&self.model),
                &self.opt.state_metadata(),
            )?;
            let state = serde_json::json!({"optimizer_steps": self.opt.steps()});
            std::fs::write(out.join(STATE_FILE), state.to_string())?;
        }
        Ok(())
    }

    /// Restore the critic and its optimizer from a checkpoint `dir`.
    pub fn restore(&mut self, dir: &Path) -> Result<()> {
        let from = dir.join(CRITIC_DIR);
        let (_, model) = trainable_critic::<B>(&from, &self.model.device())
            .with_context(|| format!("checkpoint {} has no critic", dir.display()))?;
        self.model = model;
        let text = std::fs::read_to_string(from.join(STATE_FILE))
            .with_context(|| format!("cannot read {}", from.join(STATE_FILE).display()))?;
        let state: serde_json::Value = serde_json::from_str(&text)?;
        let steps = state["optimizer_steps"].as_u64().unwrap_or(0);
        self.opt
            .load_state(
                &self.model,
                steps,
                load_tensors(&from.join(OPTIMIZER_FILE))?,
            )
            .with_context(|| format!("restoring the critic's optimizer from {}", from.display()))
    }
}
