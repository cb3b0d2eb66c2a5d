//! Reward-model training with TRL's `RewardTrainer` loss (trl/trainer/reward_trainer.py,
//! `compute_loss`, TRL 1.16): Bradley-Terry `-logsigmoid(r_chosen - r_rejected - margin)`,
//! plus `center_rewards_coefficient * (r_chosen + r_rejected)^2` when set. The model is the
//! LM backbone with a scalar `score` head on the last non-padding token, exactly
//! `LlamaForSequenceClassification` with `num_labels = 1`.

use anyhow::Result;
use burn::prelude::*;
use burn::tensor::activation::log_sigmoid;
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use datasets::batch::{Padding, SftBatch};
use datasets::tokenize::TokenizedPair;
use models::{CausalLm, ForwardInput};

pub mod setup;

use crate::method::{BatchShape, LossOutput};
use crate::pairs::{collate_pairs, real_pairs};
use crate::row_method::{row_method, RowMethod, Rows};

/// The `[reward]` section of a recipe (TRL `RewardConfig` names).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardSettings {
    /// Pushes rewards towards zero mean (TRL's `center_rewards_coefficient`, e.g. 0.01).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub center_rewards_coefficient: Option<f64>,
}

/// `slots` chosen rows then `slots` rejected rows, each scored at `last[row]`; the first
/// `pairs` of each are real, the rest empty (static shapes).
pub struct RewardBatch {
    pub rows: SftBatch,
    pub pairs: usize,
    pub slots: usize,
    pub last: Vec<usize>,
    /// Per slot; 0 where the data has none.
    pub margins: Option<Vec<f64>>,
}

/// The rightmost position whose id is not `pad_id`, per row: transformers'
/// `LlamaForSequenceClassification` rule, which this must match for exported models to
/// score the same there.
pub fn last_non_pad(ids: &[Vec<u32>], pad_id: u32) -> Vec<usize> {
    ids.iter()
        .map(|r| r.iter().rposition(|&x| x != pad_id).unwrap_or(0))
        .collect()
}

pub fn reward_batch(pairs: &[&TokenizedPair], pad: Padding, capacity: usize) -> RewardBatch {
    let (rows, lengths) = collate_pairs(pairs, pad, capacity);
    let slots = lengths.len() / 2;
    let last = last_non_pad(&rows.ids, pad.id);
    let margins = pairs.iter().any(|p| p.margin.is_some()).then(|| {
        let mut m: Vec<f64> = pairs.iter().map(|p| p.margin.unwrap_or(0.0)).collect();
        m.resize(slots, 0.0);
        m
    });
    RewardBatch {
        rows,
        pairs: pairs.len(),
        slots,
        last,
        margins,
    }
}

/// Rewards of the real rows: `(chosen, rejected)`, one per pair.
pub fn host_rewards<B: Backend>(
    rewards: Tensor<B, 1>,
    batch: &RewardBatch,
) -> (Vec<f64>, Vec<f64>) {
    let host: Vec<f64> = rewards.into_data().convert::<f64>().to_vec().expect("f64");
    let (p, s) = (batch.pairs, batch.slots);
    (host[..p].to_vec(), host[s..s + p].to_vec())
}

/// Rewards of every row `[2 * pairs]`.
/// A single sequence scored as a pair whose sides are the same.
pub fn sequence_pair(ids: Vec<u32>) -> TokenizedPair {
    TokenizedPair {
        prompt: vec![],
        chosen: ids.clone(),
        rejected: ids,
        margin: None,
    }
}

/// The (chosen, rejected) rewards of every pair, scored `batch_size` pairs at a time;
/// `done(n)` hears of each batch's `n` pairs (a progress bar).
pub fn score_pairs<B: Backend>(
    model: &CausalLm<B>,
    pairs: &[&TokenizedPair],
    pad: Padding,
    batch_size: usize,
    mut done: impl FnMut(usize),
) -> (Vec<f64>, Vec<f64>) {
    let (mut chosen, mut rejected) = (vec![], vec![]);
    for chunk in pairs.chunks(batch_size.max(1)) {
        let batch = reward_batch(chunk, pad, batch_size);
        let (c, r) = host_rewards(batch_rewards(model, &batch), &batch);
        chosen.extend(c);
        rejected.extend(r);
        done(chunk.len());
    }
    (chosen, rejected)
}

pub fn batch_rewards<B: Backend>(model: &CausalLm<B>, batch: &RewardBatch) -> Tensor<B, 1> {
    let r = &batch.rows;
    let input = ForwardInput::from_host(&r.ids, &r.positions, &r.layout, &model.device());
    model.rewards(input, &batch.last)
}

/// Per-pair Bradley-Terry losses (with margin and centring) from rewards `[chosen..., rejected...]`.
pub fn pair_losses<B: Backend>(
    rewards: Tensor<B, 1>,
    margins: Option<&[f64]>,
    s: &RewardSettings,
) -> Tensor<B, 1> {
    let p = rewards.dims()[0] / 2;
    let device = rewards.device();
    let (c, r) = (rewards.clone().slice(0..p), rewards.slice(p..2 * p));
    let mut diff = c.clone() - r.clone();
    if let Some(m) = margins {
        let m: Vec<f32> = m.iter().map(|&x| x as f32).collect();
        diff = diff - Tensor::<B, 1>::from_data(TensorData::new(m, [p]), &device);
    }
    let loss = log_sigmoid(diff).neg();
    match s.center_rewards_coefficient {
        Some(k) => loss + (c + r).powf_scalar(2.0).mul_scalar(k),
        None => loss,
    }
}

pub struct Reward {
    rows: Rows<TokenizedPair>,
    settings: RewardSettings,
}

impl Reward {
    pub fn new(
        train: Vec<TokenizedPair>,
        eval: Vec<TokenizedPair>,
        shape: BatchShape,
        settings: RewardSettings,
    ) -> Result<Self> {
        Ok(Self {
            rows: Rows::new(train, eval, shape, "preference pairs")?,
            settings,
        })
    }
}

row_method!(Reward);

impl<B: AutodiffBackend> RowMethod<B> for Reward {
    type Row = TokenizedPair;
    type Batch = RewardBatch;

    fn rows(&self) -> &Rows<TokenizedPair> {
        &self.rows
    }

    fn rows_mut(&mut self) -> &mut Rows<TokenizedPair> {
        &mut self.rows
    }

    fn batch(&self, idx: &[usize], eval: bool, _policy: &CausalLm<B>) -> RewardBatch {
        let pairs = self.rows.pick(idx, eval);
        reward_batch(&pairs, self.rows.shape.pad, self.rows.shape.capacity(eval))
    }

    fn batch_weight(&self, batch: &RewardBatch) -> f64 {
        batch.pairs as f64
    }

    fn batch_tokens(&self, batch: &RewardBatch) -> usize {
        batch.rows.num_tokens()
    }

    fn batch_loss<Bk: Backend>(&self, model: &CausalLm<Bk>, batch: &RewardBatch) -> LossOutput<Bk> {
        let rewards = batch_rewards(model, batch);
        let (c, r) = host_rewards(rewards.clone(), batch);
        let losses = pair_losses(rewards, batch.margins.as_deref(), &self.settings);
        let losses = match real_pairs(batch.pairs, batch.slots, &model.device()) {
            Some(mask) => losses * mask,
            None => losses,
        };
        LossOutput {
            loss_sum: losses.sum(),
            metric_sums: vec![
                (
                    "accuracy",
                    c.iter().zip(&r).filter(|(a, b)| a > b).count() as f64,
                ),
                ("margin", c.iter().zip(&r).map(|(a, b)| a - b).sum()),
                ("rewards/chosen", c.iter().sum()),
                ("rewards/rejected", r.iter().sum()),
            ],
        }
    }
}
