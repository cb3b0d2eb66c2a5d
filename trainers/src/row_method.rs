//! The methods that train on a fixed set of rows (SFT, DPO, ORPO, KTO, reward models): their
//! rows, shuffled order and batch shape in one place, and the `Method` they all are in the
//! same way (`row_method!`). Such a method says how to batch rows and score a batch; the
//! rest follows.

use anyhow::{bail, Result};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use models::CausalLm;

use crate::data_order::{eval_chunks, EpochCursor};
use crate::method::{BatchShape, LossOutput};

/// A method's train and eval rows, how they are cut, and where training is in them.
pub struct Rows<T> {
    pub train: Vec<T>,
    pub eval: Vec<T>,
    pub shape: BatchShape,
    cursor: EpochCursor,
}

impl<T> Rows<T> {
    /// `what` names a row (`preference pairs`), for the error when there are none.
    pub fn new(train: Vec<T>, eval: Vec<T>, shape: BatchShape, what: &str) -> Result<Self> {
        if train.is_empty() {
            bail!("the training split has no {what}: nothing to train on");
        }
        Ok(Self {
            cursor: EpochCursor::new(train.len(), shape.seed),
            train,
            eval,
            shape,
        })
    }

    /// Optimizer steps in one pass over the train rows.
    pub fn steps_per_epoch(&self, micro_batches: usize) -> usize {
        self.cursor
            .steps_per_epoch(self.shape.micro_batch * micro_batches)
    }

    pub fn cursor(&self) -> &EpochCursor {
        &self.cursor
    }

    pub fn cursor_mut(&mut self) -> &mut EpochCursor {
        &mut self.cursor
    }

    /// The rows `idx` of the eval or the train split.
    pub fn pick(&self, idx: &[usize], eval: bool) -> Vec<&T> {
        let from = if eval { &self.eval } else { &self.train };
        idx.iter().map(|&i| &from[i]).collect()
    }
}

/// A method over [`Rows`]: the loop's step, evaluation and cursor come from its rows.
pub trait RowMethod<B: AutodiffBackend> {
    type Row;
    type Batch;

    fn rows(&self) -> &Rows<Self::Row>;
    fn rows_mut(&mut self) -> &mut Rows<Self::Row>;

    /// The micro-batch of rows `idx` (`policy`: for what is computed from the model when
    /// the batch is drawn, such as reference log-probs).
    fn batch(&self, idx: &[usize], eval: bool, policy: &CausalLm<B>) -> Self::Batch;

    /// `Method::weight`, `tokens`, `loss` and `loss_is_token_nll` of a batch.
    fn batch_weight(&self, batch: &Self::Batch) -> f64;
    fn batch_tokens(&self, batch: &Self::Batch) -> usize;
    fn batch_loss<Bk: Backend>(&self, model: &CausalLm<Bk>, batch: &Self::Batch) -> LossOutput<Bk>;
    fn token_nll(&self) -> bool {
        false
    }
}

/// `impl Method<B> for $ty` through its [`RowMethod`] impl (a blanket impl would conflict
/// with the other methods' own `Method` impls). `$ty` may name the backend `B`.
macro_rules! row_method {
    ($ty:ty) => {
        impl<B: burn::tensor::backend::AutodiffBackend> $crate::method::Method<B> for $ty {
            type Batch = <Self as $crate::row_method::RowMethod<B>>::Batch;

            fn next_step(
                &mut self,
                policy: &models::CausalLm<B>,
                micro_batches: usize,
            ) -> anyhow::Result<Option<Vec<Self::Batch>>> {
                $crate::row_method::next_step(self, policy, micro_batches)
            }

            fn weight(&self, batch: &Self::Batch) -> f64 {
                <Self as $crate::row_method::RowMethod<B>>::batch_weight(self, batch)
            }

            fn tokens(&self, batch: &Self::Batch) -> usize {
                <Self as $crate::row_method::RowMethod<B>>::batch_tokens(self, batch)
            }

            fn loss<Bk: burn::prelude::Backend>(
                &self,
                model: &models::CausalLm<Bk>,
                batch: &Self::Batch,
            ) -> $crate::method::LossOutput<Bk> {
                <Self as $crate::row_method::RowMethod<B>>::batch_loss(self, model, batch)
            }

            fn eval_batches(
                &mut self,
                policy: &models::CausalLm<B>,
            ) -> anyhow::Result<Vec<Self::Batch>> {
                Ok($crate::row_method::eval_batches(self, policy))
            }

            fn loss_is_token_nll(&self) -> bool {
                <Self as $crate::row_method::RowMethod<B>>::token_nll(self)
            }

            fn steps_per_epoch(&self, micro_batches: usize) -> Option<usize> {
                Some(
                    <Self as $crate::row_method::RowMethod<B>>::rows(self)
                        .steps_per_epoch(micro_batches),
                )
            }

            fn data_cursor(&self) -> &dyn $crate::data_order::DataCursor {
                <Self as $crate::row_method::RowMethod<B>>::rows(self).cursor()
            }

            fn data_cursor_mut(&mut self) -> &mut dyn $crate::data_order::DataCursor {
                <Self as $crate::row_method::RowMethod<B>>::rows_mut(self).cursor_mut()
            }
        }
    };
}
pub(crate) use row_method;

/// The micro-batches of the next optimizer step.
pub fn next_step<B: AutodiffBackend, M: RowMethod<B>>(
    method: &mut M,
    policy: &CausalLm<B>,
    micro_batches: usize,
) -> Result<Option<Vec<M::Batch>>> {
    let size = method.rows().shape.micro_batch;
    let steps = method
        .rows_mut()
        .cursor
        .next_micro_batches(size, micro_batches);
    Ok(Some(
        steps
            .iter()
            .map(|c| method.batch(c, false, policy))
            .collect(),
    ))
}

/// Every held-out row, in fixed order, in batches of the eval batch size.
pub fn eval_batches<B: AutodiffBackend, M: RowMethod<B>>(
    method: &M,
    policy: &CausalLm<B>,
) -> Vec<M::Batch> {
    let rows = method.rows();
    let chunks = eval_chunks(rows.eval.len(), rows.shape.eval_batch);
    chunks
        .iter()
        .map(|c| method.batch(c, true, policy))
        .collect()
}
