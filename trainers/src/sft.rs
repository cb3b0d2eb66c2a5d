//! Supervised fine-tuning: next-token cross-entropy summed over the trained (assistant)
//! tokens; the loop averages it over the trained tokens of the whole accumulated batch.

use anyhow::{bail, Result};
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::AutodiffBackend;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::json;

use datasets::batch::{collate_sft, SftBatch};
use datasets::pack::PackedRow;
use models::{CausalLm, ForwardInput};

use crate::method::{LossOutput, Method};

pub struct Sft {
    train: Vec<PackedRow>,
    eval: Vec<PackedRow>,
    micro_batch: usize,
    eval_batch: usize,
    pad_id: u32,
    seed: u64,
    epoch: usize,
    /// Rows of `order` already consumed in this epoch.
    pos: usize,
    order: Vec<usize>,
}

/// The row order of an epoch: a seeded shuffle, reproducible on resume.
fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng =
        StdRng::seed_from_u64(seed ^ (epoch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    order.shuffle(&mut rng);
    order
}

impl Sft {
    pub fn new(
        train: Vec<PackedRow>,
        eval: Vec<PackedRow>,
        micro_batch: usize,
        eval_batch: usize,
        pad_id: u32,
        seed: u64,
    ) -> Result<Self> {
        if train.is_empty() {
            bail!("the training split is empty: nothing to train on");
        }
        let order = epoch_order(train.len(), seed, 0);
        Ok(Self {
            train,
            eval,
            micro_batch,
            eval_batch,
            pad_id,
            seed,
            epoch: 0,
            pos: 0,
            order,
        })
    }

    fn collate(&self, rows: &[usize], from: &[PackedRow]) -> SftBatch {
        let rows: Vec<PackedRow> = rows.iter().map(|&i| from[i].clone()).collect();
        collate_sft(&rows, self.pad_id)
    }
}

/// `-sum(log p(target))` over the trained positions of a collated batch. Only those
/// positions go through the LM head and the log-softmax: with a chat mask and padding they
/// are often under half of the batch, and the `[positions, vocab]` logits dominate the cost
/// of a small model.
pub fn sft_loss_sum<B: Backend>(model: &CausalLm<B>, batch: &SftBatch) -> Tensor<B, 1> {
    let device = model.device();
    let input = ForwardInput::from_host(&batch.ids, &batch.positions, &batch.layout, &device);
    let [b, t] = [batch.ids.len(), batch.ids.first().map_or(0, Vec::len)];
    let mut rows: Vec<i64> = Vec::new();
    let mut targets: Vec<i64> = Vec::new();
    for (i, (w, tg)) in batch.weights.iter().zip(&batch.targets).enumerate() {
        for (j, (&keep, &target)) in w.iter().zip(tg).enumerate() {
            if keep {
                rows.push((i * t + j) as i64);
                targets.push(target as i64);
            }
        }
    }
    let n = rows.len();
    if n == 0 {
        return Tensor::zeros([1], &device);
    }
    let hidden = model.hidden_states(input, None);
    let d = hidden.dims()[2];
    let rows = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [n]), &device);
    let picked = hidden
        .reshape([b * t, d])
        .select(0, rows)
        .reshape([1, n, d]);
    let logp = log_softmax(model.logits(picked), 2);
    let targets = Tensor::<B, 1, Int>::from_data(TensorData::new(targets, [n]), &device);
    logp.reshape([n, model.vocab_size()])
        .gather(1, targets.reshape([n, 1]))
        .sum()
        .neg()
}

impl<B: AutodiffBackend> Method<B> for Sft {
    type Batch = SftBatch;

    fn next_step(
        &mut self,
        _policy: &CausalLm<B>,
        micro_batches: usize,
    ) -> Result<Option<Vec<SftBatch>>> {
        if self.pos >= self.order.len() {
            self.epoch += 1;
            self.pos = 0;
            self.order = epoch_order(self.train.len(), self.seed, self.epoch);
        }
        let end = (self.pos + self.micro_batch * micro_batches).min(self.order.len());
        let rows = self.order[self.pos..end].to_vec();
        self.pos = end;
        Ok(Some(
            rows.chunks(self.micro_batch)
                .map(|c| self.collate(c, &self.train))
                .collect(),
        ))
    }

    fn weight(&self, batch: &SftBatch) -> f64 {
        batch.num_trained() as f64
    }

    fn tokens(&self, batch: &SftBatch) -> usize {
        batch
            .layout
            .key_valid
            .iter()
            .flatten()
            .filter(|&&v| v)
            .count()
    }

    fn loss<Bk: Backend>(&self, model: &CausalLm<Bk>, batch: &SftBatch) -> LossOutput<Bk> {
        LossOutput {
            loss_sum: sft_loss_sum(model, batch),
            metric_sums: vec![],
        }
    }

    fn eval_batches(&self) -> Vec<SftBatch> {
        let idx: Vec<usize> = (0..self.eval.len()).collect();
        idx.chunks(self.eval_batch)
            .map(|c| self.collate(c, &self.eval))
            .collect()
    }

    fn steps_per_epoch(&self, micro_batches: usize) -> Option<usize> {
        Some(self.train.len().div_ceil(self.micro_batch * micro_batches))
    }

    fn epoch(&self) -> f64 {
        self.epoch as f64 + self.pos as f64 / self.order.len() as f64
    }

    fn cursor(&self) -> serde_json::Value {
        json!({"epoch": self.epoch, "pos": self.pos, "rows": self.train.len()})
    }

    fn restore_cursor(&mut self, cursor: &serde_json::Value) -> Result<()> {
        let get = |k: &str| cursor.get(k).and_then(|v| v.as_u64()).map(|v| v as usize);
        let (Some(epoch), Some(pos), Some(rows)) = (get("epoch"), get("pos"), get("rows")) else {
            bail!("the checkpoint's data cursor is not an SFT cursor: {cursor}");
        };
        if rows != self.train.len() {
            bail!(
                "the checkpoint was trained on {rows} rows, the prepared data has {}: resume needs the same data",
                self.train.len()
            );
        }
        self.epoch = epoch;
        self.pos = pos;
        self.order = epoch_order(rows, self.seed, epoch);
        Ok(())
    }
}
