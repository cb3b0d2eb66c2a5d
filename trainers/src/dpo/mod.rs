//! Direct preference optimisation and its common variants, with TRL's definitions:
//! `sigmoid` (with cDPO label smoothing), `hinge`, `ipo` (per-token averaged log-ratios),
//! from trl/trainer/dpo_trainer.py (`_compute_loss`, TRL 1.16), and reference-free `simpo`
//! (length-normalised log-probs and a target margin `gamma`) from
//! trl/experimental/cpo/cpo_trainer.py (`cpo_loss`), without CPO's extra NLL term.
//!
//! Chosen and rejected completions of a micro-batch go through the model in one forward
//! pass (`[chosen..., rejected...]`, right-padded). The reference is either computed per
//! batch (the policy with adapters switched off, or a frozen copy) or read from
//! log-probs precomputed once for the whole dataset.

use anyhow::{bail, Result};
use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::activation::{log_sigmoid, relu};
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use datasets::batch::{Padding, SftBatch};
use datasets::tokenize::TokenizedPair;
use models::CausalLm;

pub mod setup;

use crate::logprobs::completion_logps;
use crate::method::{BatchShape, LossOutput};
use crate::pairs::{collate_pairs, real_pairs};
use crate::reference::Reference;
use crate::row_method::{row_method, RowMethod, Rows};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpoLoss {
    Sigmoid,
    Hinge,
    Ipo,
    Simpo,
}

fn default_beta() -> f64 {
    0.1
}
fn default_gamma() -> f64 {
    0.5
}
fn default_loss() -> DpoLoss {
    DpoLoss::Sigmoid
}

/// The `[dpo]` section of a recipe (TRL `DPOConfig` names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpoSettings {
    #[serde(default = "default_loss")]
    pub loss_type: DpoLoss,
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// cDPO: the probability that a pair's label is flipped (`sigmoid` and `simpo`).
    #[serde(default)]
    pub label_smoothing: f64,
    /// SimPO's target reward margin.
    #[serde(default = "default_gamma")]
    pub simpo_gamma: f64,
    /// Compute reference log-probs once before training and cache them beside the
    /// tokenized data; the loop then never runs the reference model.
    #[serde(default)]
    pub precompute_ref_log_probs: bool,
    /// Reference model for full fine-tuning (default: a frozen copy of `[model] path`).
    /// With adapters the reference is the base with adapters off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference_model: Option<std::path::PathBuf>,
}

impl Default for DpoSettings {
    fn default() -> Self {
        Self {
            loss_type: default_loss(),
            beta: default_beta(),
            label_smoothing: 0.0,
            simpo_gamma: default_gamma(),
            precompute_ref_log_probs: false,
            reference_model: None,
        }
    }
}

impl DpoSettings {
    pub fn validate(&self) -> Result<()> {
        if !(self.beta.is_finite() && self.beta > 0.0) {
            bail!("[dpo] beta must be positive, got {}", self.beta);
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            bail!(
                "[dpo] label_smoothing must be in [0, 0.5), got {}",
                self.label_smoothing
            );
        }
        if self.label_smoothing > 0.0
            && !matches!(self.loss_type, DpoLoss::Sigmoid | DpoLoss::Simpo)
        {
            bail!("[dpo] label_smoothing applies to loss_type sigmoid and simpo only");
        }
        Ok(())
    }

    /// SimPO needs no reference model.
    pub fn needs_reference(&self) -> bool {
        self.loss_type != DpoLoss::Simpo
    }
}

/// A micro-batch of `pairs` preference pairs: rows `0..pairs` are prompt + chosen, rows
/// `pairs..2*pairs` prompt + rejected, with only the completion tokens trained.
pub struct PairBatch {
    pub rows: SftBatch,
    /// Real pairs; with static shapes the rows hold empty pairs after them.
    pub pairs: usize,
    /// Completion tokens per row.
    pub lengths: Vec<usize>,
    /// Reference summed log-probs per row, when the loss uses a reference.
    pub reference: Option<Vec<f64>>,
}

pub struct Dpo<B: AutodiffBackend> {
    rows: Rows<TokenizedPair>,
    pub settings: DpoSettings,
    reference: Reference<B>,
}

fn host(t: Tensor<impl Backend, 1>) -> Vec<f64> {
    t.into_data().convert::<f64>().to_vec().expect("f64")
}

/// Per-pair losses and the rewards TRL logs, from policy and reference log-probs.
pub struct PairTerms<B: Backend> {
    pub losses: Tensor<B, 1>,
    pub chosen_rewards: Tensor<B, 1>,
    pub rejected_rewards: Tensor<B, 1>,
    pub chosen_logps: Tensor<B, 1>,
    pub rejected_logps: Tensor<B, 1>,
}

/// The loss table. `policy` is `[chosen..., rejected...]` summed log-probs, `reference`
/// the same for the reference (unused by SimPO), `lengths` the completion lengths.
pub fn pair_terms<B: Backend>(
    s: &DpoSettings,
    policy: Tensor<B, 1>,
    reference: Option<&[f64]>,
    lengths: &[usize],
) -> PairTerms<B> {
    let device = policy.device();
    let p = lengths.len() / 2;
    let lens = Tensor::<B, 1>::from_data(
        TensorData::new(
            lengths.iter().map(|&l| l.max(1) as f32).collect::<Vec<_>>(),
            [2 * p],
        ),
        &device,
    );
    let beta = s.beta;
    let sigmoid_ls = |x: Tensor<B, 1>| {
        let scaled = x.mul_scalar(beta);
        let clean = log_sigmoid(scaled.clone())
            .neg()
            .mul_scalar(1.0 - s.label_smoothing);
        if s.label_smoothing > 0.0 {
            clean - log_sigmoid(scaled.neg()).mul_scalar(s.label_smoothing)
        } else {
            clean
        }
    };
    if s.loss_type == DpoLoss::Simpo {
        let avg = policy / lens;
        let (pc, pr) = (avg.clone().slice(0..p), avg.slice(p..2 * p));
        let logits = (pc.clone() - pr.clone()).sub_scalar(s.simpo_gamma / beta);
        return PairTerms {
            losses: sigmoid_ls(logits),
            chosen_rewards: pc.clone().mul_scalar(beta).detach(),
            rejected_rewards: pr.clone().mul_scalar(beta).detach(),
            chosen_logps: pc.detach(),
            rejected_logps: pr.detach(),
        };
    }
    let reference = reference.expect("DPO losses other than simpo need reference log-probs");
    let reference = Tensor::<B, 1>::from_data(
        TensorData::new(
            reference.iter().map(|&x| x as f32).collect::<Vec<_>>(),
            [2 * p],
        ),
        &device,
    );
    let ratios = policy.clone() - reference;
    let (rc, rr) = (ratios.clone().slice(0..p), ratios.clone().slice(p..2 * p));
    let delta = rc.clone() - rr.clone();
    let losses = match s.loss_type {
        DpoLoss::Sigmoid => sigmoid_ls(delta),
        DpoLoss::Hinge => relu(delta.mul_scalar(beta).neg().add_scalar(1.0)),
        DpoLoss::Ipo => {
            let avg = ratios / lens;
            let d = avg.clone().slice(0..p) - avg.slice(p..2 * p);
            d.sub_scalar(1.0 / (2.0 * beta)).powf_scalar(2.0)
        }
        DpoLoss::Simpo => unreachable!("handled above"),
    };
    PairTerms {
        losses,
        chosen_rewards: rc.mul_scalar(beta).detach(),
        rejected_rewards: rr.mul_scalar(beta).detach(),
        chosen_logps: policy.clone().slice(0..p).detach(),
        rejected_logps: policy.slice(p..2 * p).detach(),
    }
}

impl<B: AutodiffBackend> Dpo<B> {
    pub fn new(
        train: Vec<TokenizedPair>,
        eval: Vec<TokenizedPair>,
        shape: BatchShape,
        settings: DpoSettings,
        reference: Reference<B>,
    ) -> Result<Self> {
        Ok(Self {
            rows: Rows::new(train, eval, shape, "preference pairs")?,
            settings,
            reference,
        })
    }
}

/// Reference log-probs `(chosen, rejected)` of every pair, in micro-batches.
pub fn reference_table<B: Backend>(
    model: &CausalLm<B>,
    pairs: &[TokenizedPair],
    batch: usize,
    pad: Padding,
) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(batch.max(1)) {
        let refs: Vec<&TokenizedPair> = chunk.iter().collect();
        let (rows, lengths) = collate_pairs(&refs, pad, batch);
        let v = host(completion_logps(model, &rows));
        let p = lengths.len() / 2;
        out.extend((0..chunk.len()).map(|i| (v[i], v[p + i])));
    }
    out
}

row_method!(Dpo<B>);

impl<B: AutodiffBackend> RowMethod<B> for Dpo<B> {
    type Row = TokenizedPair;
    type Batch = PairBatch;

    fn rows(&self) -> &Rows<TokenizedPair> {
        &self.rows
    }

    fn rows_mut(&mut self) -> &mut Rows<TokenizedPair> {
        &mut self.rows
    }

    fn batch(&self, idx: &[usize], eval: bool, policy: &CausalLm<B>) -> PairBatch {
        let pairs = self.rows.pick(idx, eval);
        let shape = &self.rows.shape;
        let (rows, lengths) = collate_pairs(&pairs, shape.pad, shape.capacity(eval));
        let slots = lengths.len() / 2;
        let reference = match &self.reference {
            Reference::None => None,
            Reference::Precomputed { train, eval: ev } => {
                let table = if eval { ev } else { train };
                let (mut c, mut r): (Vec<f64>, Vec<f64>) = idx.iter().map(|&i| table[i]).unzip();
                c.resize(slots, 0.0);
                r.resize(slots, 0.0);
                Some([c, r].concat())
            }
            live => {
                let model = live.live_model(&policy.valid()).expect("a live reference");
                Some(host(completion_logps(model.as_ref(), &rows)))
            }
        };
        PairBatch {
            rows,
            pairs: idx.len(),
            lengths,
            reference,
        }
    }

    fn batch_weight(&self, batch: &PairBatch) -> f64 {
        batch.pairs as f64
    }

    fn batch_tokens(&self, batch: &PairBatch) -> usize {
        batch.rows.num_tokens()
    }

    fn batch_loss<Bk: Backend>(&self, model: &CausalLm<Bk>, batch: &PairBatch) -> LossOutput<Bk> {
        let policy = completion_logps(model, &batch.rows);
        let t = pair_terms(
            &self.settings,
            policy,
            batch.reference.as_deref(),
            &batch.lengths,
        );
        let p = batch.pairs;
        let real = |x: Tensor<Bk, 1>| host(x)[..p].to_vec();
        let (c, r) = (real(t.chosen_rewards), real(t.rejected_rewards));
        let slots = batch.lengths.len() / 2;
        let losses = match real_pairs(p, slots, &model.device()) {
            Some(mask) => t.losses * mask,
            None => t.losses,
        };
        let wins = c.iter().zip(&r).filter(|(a, b)| a > b).count() as f64;
        let margin: f64 = c.iter().zip(&r).map(|(a, b)| a - b).sum();
        LossOutput {
            loss_sum: losses.sum(),
            metric_sums: vec![
                ("rewards/chosen", c.iter().sum()),
                ("rewards/rejected", r.iter().sum()),
                ("rewards/accuracies", wins),
                ("rewards/margins", margin),
                ("logps/chosen", real(t.chosen_logps).iter().sum()),
                ("logps/rejected", real(t.rejected_logps).iter().sum()),
            ],
        }
    }
}
