//! Supervised fine-tuning: next-token cross-entropy summed over the trained (assistant)
//! tokens; the loop averages it over the trained tokens of the whole accumulated batch.

use anyhow::{bail, Result};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use datasets::batch::{collate_sft, SftBatch};
use datasets::pack::PackedRow;
use models::CausalLm;

use crate::data_order::{eval_chunks, DataCursor, EpochCursor};
use crate::logprobs::trained_token_logps;
use crate::method::{BatchShape, LossOutput, Method};
use crate::method_spec::{DataKind, Drive, MethodSpec, Setup};

pub struct Sft {
    train: Vec<PackedRow>,
    eval: Vec<PackedRow>,
    shape: BatchShape,
    cursor: EpochCursor,
}

impl Sft {
    pub fn new(train: Vec<PackedRow>, eval: Vec<PackedRow>, shape: BatchShape) -> Result<Self> {
        if train.is_empty() {
            bail!("the training split is empty: nothing to train on");
        }
        Ok(Self {
            cursor: EpochCursor::new(train.len(), shape.seed),
            train,
            eval,
            shape,
        })
    }

    fn collate(&self, rows: &[usize], eval: bool) -> SftBatch {
        let from = if eval { &self.eval } else { &self.train };
        let rows: Vec<PackedRow> = rows.iter().map(|&i| from[i].clone()).collect();
        collate_sft(&rows, self.shape.pad, self.shape.capacity(eval))
    }
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
            .next_micro_batches(self.shape.micro_batch, micro_batches);
        Ok(Some(steps.iter().map(|c| self.collate(c, false)).collect()))
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
        let chunks = eval_chunks(self.eval.len(), self.shape.eval_batch);
        Ok(chunks.iter().map(|c| self.collate(c, true)).collect())
    }

    fn loss_is_token_nll(&self) -> bool {
        true
    }

    fn steps_per_epoch(&self, micro_batches: usize) -> Option<usize> {
        Some(
            self.cursor
                .steps_per_epoch(self.shape.micro_batch * micro_batches),
        )
    }

    fn data_cursor(&self) -> &dyn DataCursor {
        &self.cursor
    }

    fn data_cursor_mut(&mut self) -> &mut dyn DataCursor {
        &mut self.cursor
    }
}

/// `method = "sft"`.
pub struct SftSpec;

impl MethodSpec for SftSpec {
    fn data_kind(&self) -> DataKind {
        DataKind::Sft
    }

    fn answers_as_responses(&self) -> bool {
        true
    }

    fn launch<B: AutodiffBackend, D: Drive<B>>(
        &self,
        mut setup: Setup<'_, B>,
        policy: CausalLm<B>,
        drive: D,
    ) -> Result<D::Out> {
        let (train, eval) = setup.sft_data()?;
        let method = Sft::new(train, eval, setup.batch_shape(setup.pad))?;
        drive.drive(policy, method)
    }
}
