//! Supervised fine-tuning: next-token cross-entropy summed over the trained (assistant)
//! tokens; the loop averages it over the trained tokens of the whole accumulated batch.

use anyhow::{bail, Result};
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::AutodiffBackend;

use datasets::batch::{collate_sft, SftBatch};
use datasets::pack::PackedRow;
use models::{CausalLm, ForwardInput};

use crate::data_order::{eval_chunks, EpochCursor};
use crate::method::{LossOutput, Method};

pub struct Sft {
    train: Vec<PackedRow>,
    eval: Vec<PackedRow>,
    micro_batch: usize,
    eval_batch: usize,
    pad_id: u32,
    cursor: EpochCursor,
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
        Ok(Self {
            cursor: EpochCursor::new(train.len(), seed),
            train,
            eval,
            micro_batch,
            eval_batch,
            pad_id,
        })
    }

    fn collate(&self, rows: &[usize], from: &[PackedRow]) -> SftBatch {
        let rows: Vec<PackedRow> = rows.iter().map(|&i| from[i].clone()).collect();
        collate_sft(&rows, self.pad_id)
    }
}

/// The model's outputs at the trained positions of a collated batch, in row-major order.
pub struct TrainedLogits<B: Backend> {
    /// `[n, vocab]`.
    pub logits: Tensor<B, 2>,
    /// `[n]`: the next token at each position.
    pub targets: Tensor<B, 1, Int>,
    /// The batch row of each position.
    pub rows: Vec<usize>,
}

/// Final hidden states at the trained positions of a collated batch, in row-major order.
pub struct TrainedHidden<B: Backend> {
    /// `[n, hidden]`.
    pub hidden: Tensor<B, 2>,
    /// `[n]`: the next token at each position.
    pub targets: Tensor<B, 1, Int>,
    /// The batch row of each position.
    pub rows: Vec<usize>,
}

/// Hidden states at the n trained positions of a collated batch (None when there are none).
pub fn trained_hidden<B: Backend>(
    model: &CausalLm<B>,
    batch: &SftBatch,
) -> Option<TrainedHidden<B>> {
    let device = model.device();
    let [b, t] = [batch.ids.len(), batch.ids.first().map_or(0, Vec::len)];
    let mut flat: Vec<i64> = Vec::new();
    let mut rows: Vec<usize> = Vec::new();
    let mut targets: Vec<i64> = Vec::new();
    for (i, (w, tg)) in batch.weights.iter().zip(&batch.targets).enumerate() {
        for (j, (&keep, &target)) in w.iter().zip(tg).enumerate() {
            if keep {
                flat.push((i * t + j) as i64);
                rows.push(i);
                targets.push(target as i64);
            }
        }
    }
    let n = flat.len();
    if n == 0 {
        return None;
    }
    let input = ForwardInput::from_host(&batch.ids, &batch.positions, &batch.layout, &device);
    let hidden = model.hidden_states(input, None);
    let d = hidden.dims()[2];
    let flat = Tensor::<B, 1, Int>::from_data(TensorData::new(flat, [n]), &device);
    let hidden = hidden.reshape([b * t, d]).select(0, flat);
    let targets = Tensor::<B, 1, Int>::from_data(TensorData::new(targets, [n]), &device);
    Some(TrainedHidden {
        hidden,
        targets,
        rows,
    })
}

/// Logits at the n trained positions of a collated batch. Only those positions go through
/// the LM head: with a chat mask and padding they are often under half of the batch, and
/// the `[positions, vocab]` logits dominate the cost of a small model.
pub fn trained_logits<B: Backend>(
    model: &CausalLm<B>,
    batch: &SftBatch,
) -> Option<TrainedLogits<B>> {
    let h = trained_hidden(model, batch)?;
    let n = h.rows.len();
    let d = h.hidden.dims()[1];
    let logits = model
        .logits(h.hidden.reshape([1, n, d]))
        .reshape([n, model.vocab_size()]);
    Some(TrainedLogits {
        logits,
        targets: h.targets,
        rows: h.rows,
    })
}

/// `log p(target)` at every trained position of a collated batch, in row-major order, and
/// the batch row of each.
pub fn trained_token_logps<B: Backend>(
    model: &CausalLm<B>,
    batch: &SftBatch,
) -> Option<(Tensor<B, 1>, Vec<usize>)> {
    let t = trained_logits(model, batch)?;
    let n = t.rows.len();
    let logps = log_softmax(t.logits, 1)
        .gather(1, t.targets.reshape([n, 1]))
        .reshape([n]);
    Some((logps, t.rows))
}

/// `-sum(log p(target))` over the trained positions of a collated batch.
pub fn sft_loss_sum<B: Backend>(model: &CausalLm<B>, batch: &SftBatch) -> Tensor<B, 1> {
    match trained_token_logps(model, batch) {
        Some((logps, _)) => logps.sum().neg(),
        None => Tensor::zeros([1], &model.device()),
    }
}

impl<B: AutodiffBackend> Method<B> for Sft {
    type Batch = SftBatch;

    fn next_step(
        &mut self,
        _policy: &CausalLm<B>,
        micro_batches: usize,
    ) -> Result<Option<Vec<SftBatch>>> {
        let steps = self
            .cursor
            .next_micro_batches(self.micro_batch, micro_batches);
        Ok(Some(
            steps.iter().map(|c| self.collate(c, &self.train)).collect(),
        ))
    }

    fn weight(&self, batch: &SftBatch) -> f64 {
        batch.num_trained() as f64
    }

    fn tokens(&self, batch: &SftBatch) -> usize {
        batch.num_tokens()
    }

    fn loss<Bk: Backend>(&self, model: &CausalLm<Bk>, batch: &SftBatch) -> LossOutput<Bk> {
        LossOutput {
            loss_sum: sft_loss_sum(model, batch),
            metric_sums: vec![],
        }
    }

    fn eval_batches(&mut self, _policy: &CausalLm<B>) -> Result<Vec<SftBatch>> {
        let chunks = eval_chunks(self.eval.len(), self.eval_batch);
        Ok(chunks.iter().map(|c| self.collate(c, &self.eval)).collect())
    }

    fn loss_is_token_nll(&self) -> bool {
        true
    }

    fn steps_per_epoch(&self, micro_batches: usize) -> Option<usize> {
        Some(
            self.cursor
                .steps_per_epoch(self.micro_batch * micro_batches),
        )
    }

    fn epoch(&self) -> f64 {
        self.cursor.epoch()
    }

    fn cursor(&self) -> serde_json::Value {
        self.cursor.to_json()
    }

    fn restore_cursor(&mut self, cursor: &serde_json::Value) -> Result<()> {
        self.cursor.restore(cursor)
    }
}
