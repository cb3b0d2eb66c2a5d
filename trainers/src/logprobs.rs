//! Log-probabilities at the trained positions of a collated batch, for every method that
//! scores completions (SFT's loss, DPO and reward pairs, distillation, rollouts): one way to
//! pick the trained positions (bucketed for static shapes, with a mask for the padding) and
//! to sum them per row.

use burn::prelude::*;

use datasets::batch::SftBatch;
use models::{CausalLm, ForwardInput};

/// The model's outputs at the trained positions of a collated batch, in row-major order.
pub struct TrainedLogits<B: Backend> {
    /// `[n, vocab]`.
    pub logits: Tensor<B, 2>,
    /// `[n]`: the next token at each position.
    pub targets: Tensor<B, 1, Int>,
    /// The batch row of each real position.
    pub rows: Vec<usize>,
    /// `[n]`: 1 at real positions, 0 at bucket padding; None when there is none.
    pub mask: Option<Tensor<B, 1>>,
}

/// Final hidden states at the trained positions of a collated batch, in row-major order.
/// With a bucketed batch (`multiple_of > 1`) the count is rounded up so the loss sees few
/// shapes: the extra entries repeat position 0 and are zeroed by `mask`.
pub struct TrainedHidden<B: Backend> {
    /// `[n, hidden]`.
    pub hidden: Tensor<B, 2>,
    /// `[n]`: the next token at each position.
    pub targets: Tensor<B, 1, Int>,
    /// The batch row of each real position (the first `rows.len()` entries).
    pub rows: Vec<usize>,
    /// `[n]`: 1 at real positions, 0 at bucket padding; None when there is none.
    pub mask: Option<Tensor<B, 1>>,
}

/// `x * mask`, so padding entries contribute nothing (and pass no gradient).
pub fn keep_real<B: Backend>(x: Tensor<B, 1>, mask: &Option<Tensor<B, 1>>) -> Tensor<B, 1> {
    match mask {
        Some(m) => x * m.clone(),
        None => x,
    }
}

/// Hidden states at the trained positions of a collated batch (None when there are none).
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
    let real = flat.len();
    if real == 0 {
        return None;
    }
    let n = batch.num_trained_padded();
    flat.resize(n, 0);
    targets.resize(n, 0);
    let mask = (n > real).then(|| {
        let m: Vec<f32> = (0..n).map(|i| if i < real { 1.0 } else { 0.0 }).collect();
        Tensor::<B, 1>::from_data(TensorData::new(m, [n]), &device)
    });
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
        mask,
    })
}

/// Logits at the trained positions of a collated batch. Only those positions go through
/// the LM head: with a chat mask and padding they are often under half of the batch, and
/// the `[positions, vocab]` logits dominate the cost of a small model.
pub fn trained_logits<B: Backend>(
    model: &CausalLm<B>,
    batch: &SftBatch,
) -> Option<TrainedLogits<B>> {
    let h = trained_hidden(model, batch)?;
    let [n, d] = h.hidden.dims();
    let logits = model
        .logits(h.hidden.reshape([1, n, d]))
        .reshape([n, model.vocab_size()]);
    Some(TrainedLogits {
        logits,
        targets: h.targets,
        rows: h.rows,
        mask: h.mask,
    })
}

/// `log p(target)` at every trained position of a collated batch, in row-major order
/// (0 at bucket padding), and the batch row of each real position.
pub fn trained_token_logps<B: Backend>(
    model: &CausalLm<B>,
    batch: &SftBatch,
) -> Option<(Tensor<B, 1>, Vec<usize>)> {
    let h = trained_hidden(model, batch)?;
    let logps = model.head_logps(h.hidden, h.targets, 1.0, false).logps;
    Some((keep_real(logps, &h.mask), h.rows))
}

/// Summed completion log-probs of every row of `rows`, `[rows]`.
pub fn completion_logps<B: Backend>(model: &CausalLm<B>, rows: &SftBatch) -> Tensor<B, 1> {
    let n_rows = rows.ids.len();
    let device = model.device();
    let Some((logps, row_of)) = trained_token_logps(model, rows) else {
        return Tensor::zeros([n_rows], &device);
    };
    // Segment sum as a matmul with a {0,1} row-membership matrix: differentiable and one op.
    // Bucket padding (entries past `row_of`) belongs to no row.
    let n = logps.dims()[0];
    let mut member = vec![0f32; n_rows * n];
    for (j, &r) in row_of.iter().enumerate() {
        member[r * n + j] = 1.0;
    }
    let member = Tensor::<B, 2>::from_data(TensorData::new(member, [n_rows, n]), &device);
    member.matmul(logps.reshape([n, 1])).reshape([n_rows])
}
