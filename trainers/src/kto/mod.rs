//! KTO, Kahneman-Tversky optimisation (Ethayarajh et al. 2024), with TRL's definitions
//! (trl/trainer/kto_trainer.py, `_compute_loss` and `_compute_kl_logps`, TRL 1.16): each row
//! is one completion labelled desirable or not, with no paired alternative. With `r` the
//! summed completion log-prob ratio of policy to reference and `z` the KL reference point,
//!
//! desirable: `w_d * (1 - sigmoid(beta * (r - z)))`,
//! undesirable: `w_u * (1 - sigmoid(beta * (z - r)))`, averaged over the rows;
//!
//! `z = max(0, mean(log p_policy - log p_ref))` over the batch's mismatched rows (each row's
//! prompt with another row's completion), without gradient. As TRL's dataset map does, the
//! mismatched completion of a row is fixed once: the previous row's within chunks of
//! `per_device_train_batch_size` rows (the first takes the last's). Preference pairs are
//! split into a desirable and an undesirable row (TRL's `unpair_preference_dataset`),
//! chunk by chunk so that a chunk holds both rows of its pairs; held-out batches of pairs
//! then also report how often the chosen row out-rewards its rejected one.

pub mod setup;

use anyhow::{bail, Result};
use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::activation::sigmoid;
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

use datasets::batch::{collate_sft, Padding, SftBatch};
use datasets::pack::PackedRow;
use datasets::tokenize::{TokenizedPair, TokenizedUnpaired};
use models::CausalLm;

use crate::logprobs::completion_logps;
use crate::method::{BatchShape, LossOutput};
use crate::reference::Reference;
use crate::row_method::{row_method, RowMethod, Rows};

fn default_beta() -> f64 {
    0.1
}
fn default_weight() -> f64 {
    1.0
}

/// The `[kto]` section of a recipe (TRL `KTOConfig` names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KtoSettings {
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// Weights of the desirable and undesirable rows' losses (TRL suggests keeping
    /// `desirable_weight * n_desirable / (undesirable_weight * n_undesirable)` in [1, 4/3]).
    #[serde(default = "default_weight")]
    pub desirable_weight: f64,
    #[serde(default = "default_weight")]
    pub undesirable_weight: f64,
    /// Compute the reference log-probs (rows and mismatched rows) once before training and
    /// cache them beside the data.
    #[serde(default)]
    pub precompute_ref_log_probs: bool,
    /// Full fine-tuning: the reference model (default: a frozen copy of `[model] path`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference_model: Option<PathBuf>,
}

impl Default for KtoSettings {
    fn default() -> Self {
        Self {
            beta: default_beta(),
            desirable_weight: default_weight(),
            undesirable_weight: default_weight(),
            precompute_ref_log_probs: false,
            reference_model: None,
        }
    }
}

impl KtoSettings {
    pub fn validate(&self) -> Result<()> {
        if !(self.beta.is_finite() && self.beta > 0.0) {
            bail!("[kto] beta must be positive, got {}", self.beta);
        }
        for (name, w) in [
            ("desirable_weight", self.desirable_weight),
            ("undesirable_weight", self.undesirable_weight),
        ] {
            if !(w.is_finite() && w > 0.0) {
                bail!("[kto] {name} must be positive, got {w}");
            }
        }
        Ok(())
    }
}

/// One training row: a completion of a prompt, desirable or not, and the completion of
/// another row that the KL reference point scores after this row's prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct KtoRow {
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
    pub kl_completion: Vec<u32>,
    pub desirable: bool,
    /// The preference pair the row came from, when it came from one.
    pub pair: Option<usize>,
}

/// Each row's mismatched completion: the previous row's within chunks of `chunk` rows.
fn with_kl_partners(mut rows: Vec<KtoRow>, chunk: usize) -> Vec<KtoRow> {
    for block in rows.chunks_mut(chunk.max(1)) {
        let n = block.len();
        let completions: Vec<Vec<u32>> = block.iter().map(|r| r.completion.clone()).collect();
        for (i, row) in block.iter_mut().enumerate() {
            row.kl_completion = completions[(i + n - 1) % n].clone();
        }
    }
    rows
}

/// KTO rows of unpaired data, in file order.
pub fn rows_of_unpaired(data: Vec<TokenizedUnpaired>, chunk: usize) -> Vec<KtoRow> {
    let rows = data
        .into_iter()
        .map(|u| KtoRow {
            prompt: u.prompt,
            completion: u.completion,
            kl_completion: vec![],
            desirable: u.label,
            pair: None,
        })
        .collect();
    with_kl_partners(rows, chunk)
}

/// KTO rows of preference pairs: per chunk of `chunk / 2` pairs, their chosen rows then
/// their rejected rows.
pub fn rows_of_pairs(pairs: Vec<TokenizedPair>, chunk: usize) -> Vec<KtoRow> {
    let per_chunk = (chunk / 2).max(1);
    let mut rows = Vec::with_capacity(2 * pairs.len());
    for (c, block) in pairs.chunks(per_chunk).enumerate() {
        for desirable in [true, false] {
            rows.extend(block.iter().enumerate().map(|(i, p)| KtoRow {
                prompt: p.prompt.clone(),
                completion: if desirable {
                    p.chosen.clone()
                } else {
                    p.rejected.clone()
                },
                kl_completion: vec![],
                desirable,
                pair: Some(c * per_chunk + i),
            }));
        }
    }
    with_kl_partners(rows, chunk)
}

/// Collated rows and mismatched (KL) rows of some KTO rows, completions trained.
pub fn collate_kto(rows: &[&KtoRow], pad: Padding, capacity: usize) -> (SftBatch, SftBatch) {
    let collate = |completion: fn(&KtoRow) -> &[u32]| {
        let packed: Vec<PackedRow> = rows
            .iter()
            .map(|r| {
                PackedRow::completion(
                    [r.prompt.as_slice(), completion(r)].concat(),
                    r.prompt.len(),
                )
            })
            .collect();
        collate_sft(&packed, pad, capacity)
    };
    (collate(|r| &r.completion), collate(|r| &r.kl_completion))
}

/// A micro-batch: `n` real rows (then empty ones, for static shapes), with the reference's
/// log-probs and the batch's KL reference point already computed.
pub struct KtoBatch {
    pub rows: SftBatch,
    pub n: usize,
    pub desirable: Vec<bool>,
    /// Row indices `(chosen, rejected)` of the pairs whose both rows are in the batch.
    pub pairs: Vec<(usize, usize)>,
    /// Reference summed log-probs per row slot.
    pub reference: Vec<f64>,
    pub kl: f64,
}

/// The batch of `rows` from their collated rows, the policy's log-probs of their KL rows,
/// and the reference's of both (per slot).
pub fn kto_batch(
    rows: &[&KtoRow],
    collated: SftBatch,
    policy_kl: &[f64],
    reference: Vec<f64>,
    reference_kl: &[f64],
) -> KtoBatch {
    let n = rows.len();
    let kl = (0..n).map(|i| policy_kl[i] - reference_kl[i]).sum::<f64>() / n.max(1) as f64;
    let mut pairs = vec![];
    for (i, r) in rows.iter().enumerate() {
        if let (true, Some(p)) = (r.desirable, r.pair) {
            if let Some(j) = rows.iter().position(|o| !o.desirable && o.pair == Some(p)) {
                pairs.push((i, j));
            }
        }
    }
    KtoBatch {
        rows: collated,
        n,
        desirable: rows.iter().map(|r| r.desirable).collect(),
        pairs,
        reference,
        kl: kl.max(0.0),
    }
}

fn host(t: Tensor<impl Backend, 1>) -> Vec<f64> {
    t.into_data().convert::<f64>().to_vec().expect("f64")
}

/// The summed loss and TRL's metrics of one micro-batch. The loop divides by the rows of
/// the step; means over the desirable (or undesirable) rows only, as TRL logs them, are
/// given as the micro-batch's mean times its rows.
pub fn kto_loss<B: Backend>(
    s: &KtoSettings,
    model: &CausalLm<B>,
    batch: &KtoBatch,
) -> LossOutput<B> {
    let device = model.device();
    let slots = batch.reference.len();
    let policy = completion_logps(model, &batch.rows);
    let reference: Vec<f32> = batch.reference.iter().map(|&x| x as f32).collect();
    let ratio =
        policy.clone() - Tensor::<B, 1>::from_data(TensorData::new(reference, [slots]), &device);
    let mask = |want: bool, weight: f64| {
        let m: Vec<f32> = (0..slots)
            .map(|i| match batch.desirable.get(i) {
                Some(&d) if d == want => weight as f32,
                _ => 0.0,
            })
            .collect();
        Tensor::<B, 1>::from_data(TensorData::new(m, [slots]), &device)
    };
    let (beta, kl) = (s.beta, batch.kl);
    let desirable = sigmoid(ratio.clone().sub_scalar(kl).mul_scalar(beta))
        .neg()
        .add_scalar(1.0);
    let undesirable = sigmoid(ratio.clone().neg().add_scalar(kl).mul_scalar(beta))
        .neg()
        .add_scalar(1.0);
    let loss_sum = (desirable * mask(true, s.desirable_weight)
        + undesirable * mask(false, s.undesirable_weight))
    .sum();
    let rewards: Vec<f64> = host(ratio.detach()).iter().map(|r| beta * r).collect();
    let logps = host(policy.detach());
    let n = batch.n as f64;
    // Mean over the rows of one label, times the rows (0 when the batch has none).
    let label_mean = |values: &[f64], want: bool| {
        let picked: Vec<f64> = (0..batch.n)
            .filter(|&i| batch.desirable[i] == want)
            .map(|i| values[i])
            .collect();
        match picked.len() {
            0 => 0.0,
            k => picked.iter().sum::<f64>() / k as f64 * n,
        }
    };
    let (rc, rr) = (label_mean(&rewards, true), label_mean(&rewards, false));
    let mut metric_sums = vec![
        ("kl", kl * n),
        ("rewards/chosen", rc),
        ("rewards/rejected", rr),
        ("rewards/margins", rc - rr),
        ("logps/chosen", label_mean(&logps, true)),
        ("logps/rejected", label_mean(&logps, false)),
    ];
    if !batch.pairs.is_empty() {
        let wins = batch
            .pairs
            .iter()
            .filter(|&&(c, r)| rewards[c] > rewards[r])
            .count();
        metric_sums.push((
            "rewards/accuracies",
            wins as f64 / batch.pairs.len() as f64 * n,
        ));
    }
    LossOutput {
        loss_sum,
        metric_sums,
    }
}

pub struct Kto<B: AutodiffBackend> {
    rows: Rows<KtoRow>,
    pub settings: KtoSettings,
    reference: Reference<B>,
}

impl<B: AutodiffBackend> Kto<B> {
    pub fn new(
        train: Vec<KtoRow>,
        eval: Vec<KtoRow>,
        shape: BatchShape,
        settings: KtoSettings,
        reference: Reference<B>,
    ) -> Result<Self> {
        if matches!(reference, Reference::None) {
            bail!("KTO needs a reference model");
        }
        Ok(Self {
            rows: Rows::new(train, eval, shape, "rows")?,
            settings,
            reference,
        })
    }
}

row_method!(Kto<B>);

impl<B: AutodiffBackend> RowMethod<B> for Kto<B> {
    type Row = KtoRow;
    type Batch = KtoBatch;

    fn rows(&self) -> &Rows<KtoRow> {
        &self.rows
    }

    fn rows_mut(&mut self) -> &mut Rows<KtoRow> {
        &mut self.rows
    }

    fn batch(&self, idx: &[usize], eval: bool, policy: &CausalLm<B>) -> KtoBatch {
        let rows = self.rows.pick(idx, eval);
        let (collated, kl_rows) =
            collate_kto(&rows, self.rows.shape.pad, self.rows.shape.capacity(eval));
        let slots = collated.ids.len();
        let live = policy.valid();
        let policy_kl = host(completion_logps(&live, &kl_rows));
        let (reference, reference_kl) = match &self.reference {
            Reference::Precomputed { train, eval: ev } => {
                let table = if eval { ev } else { train };
                let (mut r, k): (Vec<f64>, Vec<f64>) = idx.iter().map(|&i| table[i]).unzip();
                r.resize(slots, 0.0);
                (r, k)
            }
            live_reference => {
                let model = live_reference.live_model(&live).expect("a live reference");
                (
                    host(completion_logps(model.as_ref(), &collated)),
                    host(completion_logps(model.as_ref(), &kl_rows)),
                )
            }
        };
        kto_batch(&rows, collated, &policy_kl, reference, &reference_kl)
    }

    fn batch_weight(&self, batch: &KtoBatch) -> f64 {
        batch.n as f64
    }

    fn batch_tokens(&self, batch: &KtoBatch) -> usize {
        batch.rows.num_tokens()
    }

    fn batch_loss<Bk: Backend>(&self, model: &CausalLm<Bk>, batch: &KtoBatch) -> LossOutput<Bk> {
        kto_loss(&self.settings, model, batch)
    }
}
