//! The sparse mixture-of-experts feed-forward of Mixtral and Qwen3-MoE, as transformers'
//! `MixtralSparseMoeBlock` / `Qwen3MoeSparseMoeBlock` compute it: a linear router scores
//! every expert, softmax in f32, each token goes to its `top_k` experts (probabilities
//! renormalised over those when the model says so), and its output is their outputs
//! weighted by those probabilities.
//!
//! Each expert computes only the tokens routed to it. The routing is read on the host (one
//! read of the `[tokens, experts]` probabilities per layer, as transformers' own loop
//! synchronises on `nonzero`), then the tokens of every expert are gathered in one `select`,
//! each expert runs on its slice, and one `select_assign` adds the weighted outputs back.
//! A slice's length is rounded up to a bucket (`bucket_rows`), padded with token 0 at weight
//! 0, so the GPU backend sees a few shapes per expert, not one per routing; an expert that
//! gets no token is skipped.

use burn::prelude::*;
use burn::tensor::activation::softmax;
use burn::tensor::IndexingUpdateOp;

use crate::config::ExpertNaming;
use crate::layers::Proj;
use crate::llama::Mlp;

#[derive(Module, Debug)]
pub struct SparseMoe<B: Backend> {
    /// The router, `[hidden, experts]` (HF `gate.weight`); dense and f32 even when the
    /// experts are NF4 or half (routing flips on small differences).
    pub gate: Proj<B>,
    pub experts: Vec<Mlp<B>>,
    pub top_k: usize,
    pub normalize_top_k: bool,
    /// How checkpoints name the router and experts (for saving).
    #[module(skip)]
    pub naming: ExpertNaming,
}

/// One MoE layer's routing in one forward pass: what the load-balancing loss reads.
pub struct Routing<B: Backend> {
    /// `[tokens, experts]` router probabilities (differentiable).
    pub probs: Tensor<B, 2>,
    /// Each token's `top_k` experts, row-major `[tokens, top_k]`.
    pub chosen: Vec<usize>,
}

/// Rows an expert computes for `n` routed tokens: powers of two up to 64, then multiples of
/// an eighth of the next power of two (under 25% padding, eight shapes per doubling).
pub fn bucket_rows(n: usize) -> usize {
    if n <= 64 {
        return n.next_power_of_two();
    }
    let step = n.next_power_of_two() / 8;
    n.div_ceil(step) * step
}

/// The `k` largest entries of `row` (descending; ties to the lower index, as `torch.topk`
/// orders them on the CPU). One pass keeping the best `k` in order: every token of every
/// sparse layer runs this, and `k` is small beside the experts.
fn top_k(row: &[f32], k: usize) -> impl Iterator<Item = usize> {
    let mut best: Vec<usize> = Vec::with_capacity(k + 1);
    for (e, v) in row.iter().enumerate() {
        // Strictly greater moves ahead, so an equal value stays behind the lower index.
        let at = best.partition_point(|&b| row[b].total_cmp(v).is_ge());
        if at < k {
            best.insert(at, e);
            best.truncate(k);
        }
    }
    best.into_iter()
}

/// Where each expert's tokens sit in the gathered batch.
struct Dispatch {
    /// Per gathered row: its token (0 for bucket padding).
    tokens: Vec<i64>,
    /// Per gathered row: its entry in the flattened `[tokens * top_k]` weights, or the zero
    /// appended after them for padding.
    slots: Vec<i64>,
    /// `(expert, first row, routed rows incl. padding)` for every expert with tokens.
    spans: Vec<(usize, usize, usize)>,
}

fn dispatch(chosen: &[usize], experts: usize, top_k: usize) -> Dispatch {
    let mut routed: Vec<Vec<usize>> = vec![Vec::new(); experts];
    for (slot, &e) in chosen.iter().enumerate() {
        routed[e].push(slot);
    }
    let pad = chosen.len() as i64;
    let mut d = Dispatch {
        tokens: Vec::new(),
        slots: Vec::new(),
        spans: Vec::new(),
    };
    for (e, slots) in routed.iter().enumerate().filter(|(_, s)| !s.is_empty()) {
        let rows = bucket_rows(slots.len());
        d.spans.push((e, d.tokens.len(), rows));
        for &s in slots {
            d.tokens.push((s / top_k) as i64);
            d.slots.push(s as i64);
        }
        for _ in slots.len()..rows {
            d.tokens.push(0);
            d.slots.push(pad);
        }
    }
    d
}

impl<B: Backend> SparseMoe<B> {
    pub fn num_experts(&self) -> usize {
        self.experts.len()
    }

    /// The experts' weighted outputs for `x: [B, T, hidden]`, and the routing.
    pub fn forward(&self, x: Tensor<B, 3>) -> (Tensor<B, 3>, Routing<B>) {
        let [b, t, h] = x.dims();
        let (n, k, experts) = (b * t, self.top_k, self.num_experts());
        let device = x.device();
        let flat = x.reshape([n, h]);
        let probs = softmax(self.gate.forward(flat.clone()), 1);
        let host: Vec<f32> = probs
            .clone()
            .into_data()
            .convert::<f32>()
            .into_vec()
            .unwrap();
        let chosen: Vec<usize> = host.chunks(experts).flat_map(|r| top_k(r, k)).collect();
        let idx: Vec<i64> = chosen.iter().map(|&e| e as i64).collect();
        let idx = Tensor::<B, 2, Int>::from_data(TensorData::new(idx, [n, k]), &device);
        let weights = probs.clone().gather(1, idx);
        let weights = match self.normalize_top_k {
            true => weights.clone() / weights.sum_dim(1),
            false => weights,
        };
        let d = dispatch(&chosen, experts, k);
        let rows = d.tokens.len();
        let tokens = Tensor::<B, 1, Int>::from_data(TensorData::new(d.tokens, [rows]), &device);
        let slots = Tensor::<B, 1, Int>::from_data(TensorData::new(d.slots, [rows]), &device);
        let gathered = flat.select(0, tokens.clone());
        let outputs: Vec<Tensor<B, 2>> = d
            .spans
            .iter()
            .map(|&(e, first, len)| {
                let input = gathered.clone().narrow(0, first, len).reshape([1, len, h]);
                self.experts[e].forward(input).reshape([len, h])
            })
            .collect();
        let scale = Tensor::cat(
            vec![weights.reshape([n * k]), Tensor::zeros([1], &device)],
            0,
        )
        .select(0, slots)
        .reshape([rows, 1]);
        let out = Tensor::<B, 2>::zeros([n, h], &device).select_assign(
            0,
            tokens,
            Tensor::cat(outputs, 0) * scale,
            IndexingUpdateOp::Add,
        );
        (out.reshape([b, t, h]), Routing { probs, chosen })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_few_and_tight() {
        assert_eq!(
            [1, 3, 8, 9, 64].map(bucket_rows),
            [1, 4, 8, 16, 64],
            "small counts round to powers of two"
        );
        assert_eq!([65, 100, 129, 1000].map(bucket_rows), [80, 112, 160, 1024]);
        for n in 1..5000 {
            let b = bucket_rows(n);
            assert!(
                b >= n && (b as f64) <= (n as f64 * 1.25).max(64.0),
                "{n} -> {b}"
            );
        }
    }

    #[test]
    fn dispatch_groups_tokens_by_expert_and_pads_with_zero_weight() {
        // 3 tokens, top-2 of 4 experts; expert 2 gets nothing.
        let chosen = [0, 1, 1, 3, 0, 1];
        let d = dispatch(&chosen, 4, 2);
        assert_eq!(d.spans, vec![(0, 0, 2), (1, 2, 4), (3, 6, 1)]);
        assert_eq!(d.tokens, vec![0, 2, 0, 1, 2, 0, 1]);
        // The padding row of expert 1 reads the zero after the 6 weights.
        assert_eq!(d.slots, vec![0, 4, 1, 2, 5, 6, 3]);
    }

    #[test]
    fn top_k_is_descending_with_ties_to_the_lower_index() {
        let picked: Vec<usize> = top_k(&[0.1, 0.4, 0.4, 0.1], 3).collect();
        assert_eq!(picked, vec![1, 2, 0]);
        let row = [0.3, -1.0, 0.9, 0.3, 2.5, 0.0, 0.9, -0.2];
        let picked: Vec<usize> = top_k(&row, 4).collect();
        assert_eq!(picked, vec![4, 2, 6, 0]);
    }
}
