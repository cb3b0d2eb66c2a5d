//! ORPO, odds-ratio preference optimisation (Hong et al. 2024), with TRL's definitions
//! (trl/experimental/orpo/orpo_trainer.py, `odds_ratio_loss` and `get_batch_loss_metrics`,
//! TRL 1.16): no reference model and no prior SFT stage. Per micro-batch,
//!
//! `loss = NLL(chosen) - beta * mean(logsigmoid(log_odds))`, with
//! `log_odds = (pc - pr) - (log(1 - exp(pc)) - log(1 - exp(pr)))`,
//!
//! `pc`, `pr` the chosen and rejected completions' log-probs averaged over their tokens, and
//! NLL the token mean of the chosen rows' cross-entropy over every token after the first,
//! prompt included (TRL: "computed over the full prompt and response"). TRL's `beta` is
//! the paper's lambda.
//!
//! Chosen and rejected rows go through the model in one forward pass; the chosen rows are
//! trained from their second token, and their completion log-probs are the last tokens of
//! each row.

pub mod setup;

use anyhow::{bail, Result};
use burn::prelude::*;
use burn::tensor::activation::log_sigmoid;
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use datasets::batch::SftBatch;
use datasets::tokenize::TokenizedPair;
use models::CausalLm;

use crate::logprobs::trained_token_logps;
use crate::method::{BatchShape, LossOutput};
use crate::pairs::{collate_pairs_trained, real_pairs, Trained};
use crate::row_method::{row_method, RowMethod, Rows};

fn default_beta() -> f64 {
    0.1
}

/// The `[orpo]` section of a recipe (TRL `ORPOConfig` names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrpoSettings {
    /// Weight of the odds-ratio term against the NLL (the paper's lambda; TRL default 0.1).
    #[serde(default = "default_beta")]
    pub beta: f64,
}

impl Default for OrpoSettings {
    fn default() -> Self {
        Self {
            beta: default_beta(),
        }
    }
}

impl OrpoSettings {
    pub fn validate(&self) -> Result<()> {
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            bail!("[orpo] beta must be zero or positive, got {}", self.beta);
        }
        Ok(())
    }
}

/// `slots` chosen rows (trained from their second token) then `slots` rejected rows
/// (completions); the first `pairs` of each are real, the rest empty (static shapes).
pub struct OrpoBatch {
    pub rows: SftBatch,
    pub pairs: usize,
    /// Completion lengths, chosen then rejected, per slot.
    pub lengths: Vec<usize>,
}

pub struct Orpo {
    rows: Rows<TokenizedPair>,
    pub settings: OrpoSettings,
}

/// What one forward pass gives ORPO: per-slot summed completion log-probs (`[2 * slots]`,
/// chosen then rejected) and the chosen rows' summed NLL and token count.
pub struct OrpoLogps<B: Backend> {
    pub completion: Tensor<B, 1>,
    pub chosen_nll_sum: Tensor<B, 1>,
    pub chosen_tokens: usize,
}

/// Log-probs of an [`OrpoBatch`]'s rows: a trained position belongs to a completion when
/// it is among the last `lengths[row]` trained positions of its row.
pub fn orpo_logps<B: Backend>(model: &CausalLm<B>, batch: &OrpoBatch) -> OrpoLogps<B> {
    let device = model.device();
    let n_rows = batch.lengths.len();
    let slots = n_rows / 2;
    let Some((logps, row_of)) = trained_token_logps(model, &batch.rows) else {
        return OrpoLogps {
            completion: Tensor::zeros([n_rows], &device),
            chosen_nll_sum: Tensor::zeros([1], &device),
            chosen_tokens: 0,
        };
    };
    let n = logps.dims()[0];
    let mut per_row = vec![0usize; n_rows];
    for &r in &row_of {
        per_row[r] += 1;
    }
    // Positions are row-major, so a row's are contiguous and its completion is their tail.
    let mut member = vec![0f32; n_rows * n];
    let mut chosen = vec![0f32; n];
    let mut seen = vec![0usize; n_rows];
    for (j, &r) in row_of.iter().enumerate() {
        if seen[r] >= per_row[r] - batch.lengths[r].min(per_row[r]) {
            member[r * n + j] = 1.0;
        }
        seen[r] += 1;
        if r < slots {
            chosen[j] = 1.0;
        }
    }
    let chosen_tokens = chosen.iter().filter(|&&c| c > 0.0).count();
    let member = Tensor::<B, 2>::from_data(TensorData::new(member, [n_rows, n]), &device);
    let chosen = Tensor::<B, 1>::from_data(TensorData::new(chosen, [n]), &device);
    OrpoLogps {
        completion: member
            .matmul(logps.clone().reshape([n, 1]))
            .reshape([n_rows]),
        chosen_nll_sum: (logps * chosen).sum().neg(),
        chosen_tokens,
    }
}

/// `log(1 - exp(x))` for `x < 0`, accurate near 0 as well: with `t = tanh(x / 2)`,
/// `1 - exp(x) = -2t / (1 - t)`. `x` is kept below -1e-6 (a completion of probability 1
/// would make the odds infinite).
pub fn log1m_exp<B: Backend>(x: Tensor<B, 1>) -> Tensor<B, 1> {
    let t = x.clamp_max(-1e-6).div_scalar(2.0).tanh();
    t.clone().mul_scalar(-2.0).log() - t.neg().add_scalar(1.0).log()
}

/// Per-pair terms of ORPO from the average completion log-probs `pc`, `pr` (`[pairs]`):
/// `logsigmoid(log_odds)` and `log_odds`.
pub fn odds_ratio<B: Backend>(pc: Tensor<B, 1>, pr: Tensor<B, 1>) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let log_odds = (pc.clone() - pr.clone()) - (log1m_exp(pc) - log1m_exp(pr));
    (log_sigmoid(log_odds.clone()), log_odds)
}

fn host(t: Tensor<impl Backend, 1>) -> Vec<f64> {
    t.into_data().convert::<f64>().to_vec().expect("f64")
}

impl Orpo {
    pub fn new(
        train: Vec<TokenizedPair>,
        eval: Vec<TokenizedPair>,
        shape: BatchShape,
        settings: OrpoSettings,
    ) -> Result<Self> {
        Ok(Self {
            rows: Rows::new(train, eval, shape, "preference pairs")?,
            settings,
        })
    }
}

/// The summed loss and TRL's metrics of one micro-batch (sums over its pairs; the loop
/// divides by the pairs of the step).
pub fn orpo_loss<B: Backend>(
    settings: &OrpoSettings,
    model: &CausalLm<B>,
    batch: &OrpoBatch,
) -> LossOutput<B> {
    let device = model.device();
    let lp = orpo_logps(model, batch);
    let slots = batch.lengths.len() / 2;
    let p = batch.pairs;
    let lens: Vec<f32> = batch.lengths.iter().map(|&l| l.max(1) as f32).collect();
    let lens = Tensor::<B, 1>::from_data(TensorData::new(lens, [2 * slots]), &device);
    let avg = lp.completion / lens;
    let (pc, pr) = (avg.clone().slice(0..slots), avg.slice(slots..2 * slots));
    let (ratio, log_odds) = odds_ratio(pc.clone(), pr.clone());
    let ratio = match real_pairs(p, slots, &device) {
        Some(mask) => ratio * mask,
        None => ratio,
    };
    // NLL is a token mean over the micro-batch's chosen rows, as TRL computes it; times the
    // pairs so that the loop's division by pairs gives it back.
    let nll_mean = lp.chosen_nll_sum.div_scalar(lp.chosen_tokens.max(1) as f64);
    let loss_sum =
        nll_mean.clone().mul_scalar(p as f64) - ratio.clone().sum().mul_scalar(settings.beta);
    let real = |x: Tensor<B, 1>| host(x.detach())[..p].to_vec();
    let (c, r) = (real(pc), real(pr));
    let beta = settings.beta;
    let wins = c.iter().zip(&r).filter(|(a, b)| a > b).count() as f64;
    let sum = |v: &[f64]| v.iter().sum::<f64>();
    LossOutput {
        loss_sum,
        metric_sums: vec![
            ("rewards/chosen", beta * sum(&c)),
            ("rewards/rejected", beta * sum(&r)),
            ("rewards/accuracies", wins),
            ("rewards/margins", beta * (sum(&c) - sum(&r))),
            ("logps/chosen", sum(&c)),
            ("logps/rejected", sum(&r)),
            ("nll_loss", host(nll_mean.detach())[0] * p as f64),
            ("log_odds_ratio", sum(&real(ratio))),
            ("log_odds_chosen", sum(&real(log_odds))),
        ],
    }
}

row_method!(Orpo);

impl<B: AutodiffBackend> RowMethod<B> for Orpo {
    type Row = TokenizedPair;
    type Batch = OrpoBatch;

    fn rows(&self) -> &Rows<TokenizedPair> {
        &self.rows
    }

    fn rows_mut(&mut self) -> &mut Rows<TokenizedPair> {
        &mut self.rows
    }

    fn batch(&self, idx: &[usize], eval: bool, _policy: &CausalLm<B>) -> OrpoBatch {
        let pairs = self.rows.pick(idx, eval);
        let (rows, lengths) = collate_pairs_trained(
            &pairs,
            self.rows.shape.pad,
            self.rows.shape.capacity(eval),
            Trained::WholeChosen,
        );
        OrpoBatch {
            rows,
            pairs: idx.len(),
            lengths,
        }
    }

    fn batch_weight(&self, batch: &OrpoBatch) -> f64 {
        batch.pairs as f64
    }

    fn batch_tokens(&self, batch: &OrpoBatch) -> usize {
        batch.rows.num_tokens()
    }

    fn batch_loss<Bk: Backend>(&self, model: &CausalLm<Bk>, batch: &OrpoBatch) -> LossOutput<Bk> {
        orpo_loss(&self.settings, model, batch)
    }
}
