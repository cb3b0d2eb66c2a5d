//! The seam between the shared loop and a training method. A method turns its data (or its
//! own rollouts) into micro-batches and says how to score one; the loop owns everything
//! else: accumulation, clipping, the optimizer, schedules, evaluation, logging, checkpoints.

use anyhow::Result;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use std::path::Path;

use datasets::batch::Padding;
use models::CausalLm;

use crate::data_order::DataCursor;

/// A micro-batch's summed loss and metrics. The loop divides both by the total weight of
/// the accumulated batch, so the update does not depend on how it was split.
pub struct LossOutput<B: Backend> {
    pub loss_sum: Tensor<B, 1>,
    /// Metric sums (`name`, value), normalised by the loop the same way as the loss.
    pub metric_sums: Vec<(&'static str, f64)>,
}

pub trait Method<B: AutodiffBackend> {
    type Batch;

    /// The micro-batches of the next optimizer step, or `None` when the data is exhausted.
    /// Online methods roll out `policy` here.
    fn next_step(
        &mut self,
        policy: &CausalLm<B>,
        micro_batches: usize,
    ) -> Result<Option<Vec<Self::Batch>>>;

    /// What the loss is averaged over (trained tokens for SFT, pairs for DPO).
    fn weight(&self, batch: &Self::Batch) -> f64;

    /// Tokens through the model, for throughput.
    fn tokens(&self, batch: &Self::Batch) -> usize;

    /// Summed loss of one micro-batch, on any backend (autodiff for training, the inner
    /// backend for evaluation).
    fn loss<Bk: Backend>(&self, model: &CausalLm<Bk>, batch: &Self::Batch) -> LossOutput<Bk>;

    /// Held-out micro-batches, in a fixed order (`policy` for methods whose batches carry
    /// model outputs, such as reference log-probs).
    fn eval_batches(&mut self, policy: &CausalLm<B>) -> Result<Vec<Self::Batch>>;

    /// Whether `exp(eval_loss)` means anything (a token-level cross-entropy).
    fn loss_is_token_nll(&self) -> bool {
        false
    }

    /// Optimizer steps in one pass over the data, when that is defined.
    fn steps_per_epoch(&self, micro_batches: usize) -> Option<usize>;

    /// What it trains beside the policy (PPO's separate critic), written into `dir` with
    /// the policy: every checkpoint (`checkpoint`, with optimizer state) and the export.
    fn save_state(&self, _dir: &Path, _checkpoint: bool) -> Result<()> {
        Ok(())
    }

    /// Restore what [`Self::save_state`] wrote into a checkpoint.
    fn restore_state(&mut self, _dir: &Path) -> Result<()> {
        Ok(())
    }

    /// Where it is in its data (epochs; the position checkpoints save and restore).
    fn data_cursor(&self) -> &dyn DataCursor;
    fn data_cursor_mut(&mut self) -> &mut dyn DataCursor;
}

/// How a dataset method cuts its rows into micro-batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchShape {
    /// Rows (SFT) or pairs (DPO) per training micro-batch.
    pub micro_batch: usize,
    pub eval_batch: usize,
    pub pad: Padding,
    /// Seeds the per-epoch shuffle.
    pub seed: u64,
}

impl BatchShape {
    /// Rows a training (or, with `eval`, held-out) batch holds: what static shapes fill up to.
    pub fn capacity(&self, eval: bool) -> usize {
        if eval {
            self.eval_batch
        } else {
            self.micro_batch
        }
    }

    /// Batches padded to their longest row only, with the rows they hold (the CPU default).
    pub fn exact(micro_batch: usize, eval_batch: usize, pad_id: u32, seed: u64) -> Self {
        Self {
            micro_batch,
            eval_batch,
            pad: Padding::exact(pad_id),
            seed,
        }
    }
}
