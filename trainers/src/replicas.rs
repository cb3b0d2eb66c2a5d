//! What the loop sees of data parallelism: a replica of a job that shares each step's
//! micro-batches with the others and sums their gradients. Training alone has none; the
//! implementation is `crate::parallel::Replica`.

use anyhow::Result;
use burn::tensor::backend::AutodiffBackend;

use models::CausalLm;

use crate::accumulate::StepGradients;

pub trait Replicas<B: AutodiffBackend> {
    /// Rank 0: the one that sets the run up, logs and writes checkpoints.
    fn is_main(&self) -> bool;

    /// Replicas in the job.
    fn world(&self) -> usize;

    /// Wait until every replica has set up (the main one first, the others from what it wrote).
    fn setup_barrier(&mut self, device: &B::Device) -> Result<()>;

    /// Every replica's trainable weights made the main one's, before the first step.
    fn sync_params(&mut self, model: CausalLm<B>) -> Result<CausalLm<B>>;

    /// The micro-batches `lo..hi` of a step of `n` this replica trains (and its own dropout
    /// masks drawn for `step`).
    fn share(&mut self, n: usize, step: u64, step_seed: u64) -> (usize, usize);

    /// This replica's gradients of its share (micro-batches from `lo`) summed with the
    /// others', with the step's loss, metrics, tokens and stop decision (`stop_requested`:
    /// this replica was asked to stop; all stop after this step if any was).
    fn combine(
        &mut self,
        model: &CausalLm<B>,
        local: StepGradients,
        lo: usize,
        stop_requested: bool,
    ) -> Result<StepGradients>;

    /// Whether the replicas agreed, at the last step, to stop.
    fn stop_agreed(&self) -> bool;
}
