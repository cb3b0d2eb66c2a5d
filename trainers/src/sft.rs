//! Supervised fine-tuning: next-token cross-entropy summed over the trained (assistant)
//! tokens; the loop averages it over the trained tokens of the whole accumulated batch.

use anyhow::Result;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use datasets::batch::{collate_sft, SftBatch};
use datasets::pack::PackedRow;
use models::CausalLm;

use crate::logprobs::trained_token_logps;
use crate::method::{BatchShape, LossOutput};
use crate::method_spec::{DataKind, Drive, MethodSpec, Setup};
use crate::row_method::{row_method, RowMethod, Rows};

pub struct Sft {
    rows: Rows<PackedRow>,
}

impl Sft {
    pub fn new(train: Vec<PackedRow>, eval: Vec<PackedRow>, shape: BatchShape) -> Result<Self> {
        Ok(Self {
            rows: Rows::new(train, eval, shape, "rows")?,
        })
    }
}

/// `-sum(log p(target))` over the trained positions of a collated batch.
pub fn sft_loss_sum<B: Backend>(model: &CausalLm<B>, batch: &SftBatch) -> Tensor<B, 1> {
    match trained_token_logps(model, batch) {
        Some((logps, _)) => logps.sum().neg(),
        None => Tensor::zeros([1], &model.device()),
    }
}

row_method!(Sft);

impl<B: AutodiffBackend> RowMethod<B> for Sft {
    type Row = PackedRow;
    type Batch = SftBatch;

    fn rows(&self) -> &Rows<PackedRow> {
        &self.rows
    }

    fn rows_mut(&mut self) -> &mut Rows<PackedRow> {
        &mut self.rows
    }

    fn batch(&self, idx: &[usize], eval: bool, _policy: &CausalLm<B>) -> SftBatch {
        let rows: Vec<PackedRow> = self.rows.pick(idx, eval).into_iter().cloned().collect();
        let shape = &self.rows.shape;
        collate_sft(&rows, shape.pad, shape.capacity(eval))
    }

    fn batch_weight(&self, batch: &SftBatch) -> f64 {
        batch.num_trained() as f64
    }

    fn batch_tokens(&self, batch: &SftBatch) -> usize {
        batch.num_tokens()
    }

    fn batch_loss<Bk: Backend>(&self, model: &CausalLm<Bk>, batch: &SftBatch) -> LossOutput<Bk> {
        LossOutput {
            loss_sum: sft_loss_sum(model, batch),
            metric_sums: vec![],
        }
    }

    fn token_nll(&self) -> bool {
        true
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
