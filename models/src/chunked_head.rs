//! Per-row objectives of the LM head's logits (target log-probs, a distillation loss)
//! computed over chunks of positions, so that no `[positions, vocab]` tensor larger than
//! one chunk ever exists: not in the forward, and not in the backward either. Autodiff
//! would keep the whole logits and their softmax for the backward (two `[n, vocab]` f32
//! tensors: 1.2 GB at 1024 positions of a 152k vocabulary). Each row's output depends on
//! its own logits only, so the op computes each row's gradient with respect to its hidden
//! state in the forward, chunk by chunk, and keeps that (`[n, hidden]`); the backward
//! scales it by the upstream gradient, whatever loss sits above (Liger's fused linear
//! cross-entropy, generalised to any per-row objective through [`RowObjective`]). A
//! trainable head recomputes each chunk's logits in the backward for its own gradient
//! (torchtune's chunked approach). Cost without a trainable head: one
//! `[chunk, vocab] x [vocab, d]` matmul per chunk, as autodiff's backward would do anyway.

use std::any::Any;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{CheckpointStrategy, NoCheckpointing};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::{IndexingUpdateOp, TensorPrimitive};

/// f32 elements of one `[chunk, vocab]` tensor (64 MiB).
const CHUNK_ELEMENTS: usize = 16 << 20;

/// Positions per chunk for a vocabulary: the largest power of two whose `[chunk, vocab]`
/// f32 tensor fits in [`CHUNK_ELEMENTS`], at least 16 so the matmul keeps some rows. A
/// power of two keeps the chunk shapes few for a GPU backend (position counts there are
/// bucketed to multiples of 64).
pub fn chunk_positions(vocab: usize) -> usize {
    let rows = (CHUNK_ELEMENTS / vocab.max(1)).max(16);
    1 << (usize::BITS - 1 - rows.leading_zeros())
}

/// Untracked tensors an objective reads besides the logits. Row-indexed ones (`[n, ..]`)
/// are sliced by the objective to the chunk it is given.
#[derive(Debug, Clone)]
pub struct Aux<B: Backend> {
    pub floats: Vec<Tensor<B, 2>>,
    pub ints: Vec<Tensor<B, 2, Int>>,
}

/// An objective's outputs for a chunk of rows.
pub struct Rows<B: Backend> {
    /// `[c]`: the output that carries a gradient.
    pub value: Tensor<B, 1>,
    /// `[c]` each: outputs reported without a gradient (metrics).
    pub metrics: Vec<Tensor<B, 1>>,
    /// `d value / d z` `[c, vocab]`, when asked for.
    pub dz: Option<Tensor<B, 2>>,
}

/// A function of each row's logits, evaluated on chunks of rows.
pub trait RowObjective: Clone + Send + Sync + std::fmt::Debug + 'static {
    /// How many metric outputs [`RowObjective::rows`] gives.
    fn metric_count(&self) -> usize;

    /// Outputs for rows `[start, end)` of the batch from their logits `z` (`[c, vocab]`,
    /// already divided by the op's scale). With `grad`, also `d value / d z` per row. The
    /// value must be computed with differentiable ops on `z`: the unchunked path
    /// ([`logits_rows`]) differentiates it by autodiff.
    fn rows<X: Backend>(
        &self,
        aux: &Aux<X>,
        z: Tensor<X, 2>,
        range: (usize, usize),
        grad: bool,
    ) -> Rows<X>;
}

/// What the op gives for all rows.
pub struct RowOutputs<B: Backend> {
    /// `[n]`, differentiable with respect to the hidden states and the head.
    pub value: Tensor<B, 1>,
    /// `[n]` each, without a gradient.
    pub metrics: Vec<Tensor<B, 1>>,
}

/// `[c, 1]` row log-sum-exp of `z` (the max is a constant for the gradient).
pub fn row_logsumexp<B: Backend>(z: &Tensor<B, 2>) -> Tensor<B, 2> {
    let max = z.clone().detach().max_dim(1);
    max.clone() + (z.clone() - max).exp().sum_dim(1).log()
}

/// `objective` over the rows of `hidden` (`[n, d]`) through the head `weight`
/// (`[d, vocab]`), logits divided by `scale`, in chunks of `chunk` rows. On the autodiff
/// backends this crate trains with, the op keeps each row's hidden-state gradient (and
/// recomputes chunks only for a trainable head's gradient); elsewhere (inference backends)
/// the chunks keep nothing.
pub fn head_rows<B: Backend, O: RowObjective>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    aux: Aux<B>,
    objective: &O,
    scale: f64,
    chunk: usize,
) -> RowOutputs<B> {
    head_rows_capped(hidden, weight, aux, objective, scale, None, chunk)
}

/// [`head_rows`] of soft-capped logits (Gemma 2's `final_logit_softcapping`): the objective
/// sees `cap * tanh(h W / cap) / scale`.
pub fn head_rows_capped<B: Backend, O: RowObjective>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    aux: Aux<B>,
    objective: &O,
    scale: f64,
    softcap: Option<f64>,
    chunk: usize,
) -> RowOutputs<B> {
    let args = Args {
        hidden,
        weight,
        aux,
        softcap,
    };
    let args = match on_autodiff::<B, crate::backend::Cpu, O>(args, objective, scale, chunk) {
        Ok(out) => return out,
        Err(args) => args,
    };
    #[cfg(feature = "cuda")]
    let args = match on_autodiff::<B, crate::backend::Gpu, O>(args, objective, scale, chunk) {
        Ok(out) => return out,
        Err(args) => args,
    };
    if B::ad_enabled(&args.hidden.device()) {
        // An autodiff backend this crate does not build: autodiff through plain ops.
        let logits = args.hidden.matmul(crate::half::as_f32(args.weight));
        let logits = match args.softcap {
            Some(cap) => logits.div_scalar(cap).tanh().mul_scalar(cap),
            None => logits,
        };
        return logits_rows(logits, &args.aux, objective, scale);
    }
    let out = forward_chunks(&args, objective, scale, chunk, Keep::default());
    RowOutputs {
        value: out.value,
        metrics: out.metrics,
    }
}

/// The unchunked computation from whole `[n, vocab]` logits: what the chunked op must
/// equal, and the path for a head it does not cover (a bias or an adapter on the LM head).
pub fn logits_rows<B: Backend, O: RowObjective>(
    logits: Tensor<B, 2>,
    aux: &Aux<B>,
    objective: &O,
    scale: f64,
) -> RowOutputs<B> {
    let n = logits.dims()[0];
    let r = objective.rows(aux, divide(logits, scale), (0, n), false);
    RowOutputs {
        value: r.value,
        metrics: r.metrics.into_iter().map(Tensor::detach).collect(),
    }
}

fn divide<B: Backend, const D: usize>(x: Tensor<B, D>, scale: f64) -> Tensor<B, D> {
    if scale == 1.0 {
        x
    } else {
        x.div_scalar(scale)
    }
}

/// What the head computes at each position: `log p(target)` of `softmax(h W / scale)`,
/// and optionally the entropy of that distribution (a metric: no gradient).
pub struct HeadLogps<B: Backend> {
    /// `[n]`.
    pub logps: Tensor<B, 1>,
    /// `[n]`, when asked for.
    pub entropy: Option<Tensor<B, 1>>,
}

impl<B: Backend> From<RowOutputs<B>> for HeadLogps<B> {
    fn from(out: RowOutputs<B>) -> Self {
        Self {
            logps: out.value,
            entropy: out.metrics.into_iter().next(),
        }
    }
}

/// The target's log-prob at each row (`aux.ints[0]`: targets `[n, 1]`), and its entropy.
#[derive(Debug, Clone, Copy)]
pub struct TargetLogps {
    pub entropy: bool,
}

impl TargetLogps {
    pub fn aux<B: Backend>(targets: Tensor<B, 1, Int>) -> Aux<B> {
        let n = targets.dims()[0];
        Aux {
            floats: vec![],
            ints: vec![targets.reshape([n, 1])],
        }
    }
}

impl RowObjective for TargetLogps {
    fn metric_count(&self) -> usize {
        usize::from(self.entropy)
    }

    fn rows<X: Backend>(
        &self,
        aux: &Aux<X>,
        z: Tensor<X, 2>,
        (start, end): (usize, usize),
        grad: bool,
    ) -> Rows<X> {
        let c = end - start;
        let t = aux.ints[0].clone().slice(s![start..end]);
        // One `[c, vocab]` buffer at a time where the backend updates in place (a tensor
        // nothing else holds): the shifted logits become their exponentials, then the
        // probabilities, then the gradient. The entropy needs the shifted logits kept.
        let max = z.clone().detach().max_dim(1);
        let shifted = z - max;
        let picked = shifted.clone().gather(1, t.clone());
        let (e, shifted) = match self.entropy {
            true => (shifted.clone().exp(), Some(shifted)),
            false => (shifted.exp(), None),
        };
        let sum = e.clone().sum_dim(1);
        let lse = sum.clone().log();
        let value = (picked - lse.clone()).reshape([c]);
        if !(self.entropy || grad) {
            return Rows {
                value,
                metrics: vec![],
                dz: None,
            };
        }
        let p = e.detach() / sum.detach();
        let metrics = match self.entropy {
            // H = lse - sum(p z).
            true => {
                let shifted = shifted.expect("kept for the entropy").detach();
                vec![(lse.detach() - (p.clone() * shifted).sum_dim(1)).reshape([c])]
            }
            false => vec![],
        };
        // d log p(t) / dz = onehot(t) - softmax(z).
        let dz = grad.then(|| {
            let ones = Tensor::ones([c, 1], &p.device());
            p.neg().scatter(1, t, ones, IndexingUpdateOp::Add)
        });
        Rows { value, metrics, dz }
    }
}

/// `log softmax(hidden @ weight / scale)[target]` per row of `hidden` (`[n, d]`), with
/// `weight` `[d, vocab]`, in chunks of `chunk` rows (see [`head_rows`]).
pub fn head_logps<B: Backend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    scale: f64,
    chunk: usize,
    with_entropy: bool,
) -> HeadLogps<B> {
    let objective = TargetLogps {
        entropy: with_entropy,
    };
    head_rows(
        hidden,
        weight,
        TargetLogps::aux(targets),
        &objective,
        scale,
        chunk,
    )
    .into()
}

/// Target log-probs (and entropies) from whole `[n, vocab]` logits.
pub fn logits_logps<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    scale: f64,
    with_entropy: bool,
) -> HeadLogps<B> {
    let objective = TargetLogps {
        entropy: with_entropy,
    };
    logits_rows(logits, &TargetLogps::aux(targets), &objective, scale).into()
}

/// The unchunked computation of [`head_logps`]: what the chunked op must equal.
pub fn plain_head_logps_of<B: Backend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    scale: f64,
) -> Tensor<B, 1> {
    logits_logps(hidden.matmul(weight), targets, scale, false).logps
}

struct Args<B: Backend> {
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    aux: Aux<B>,
    softcap: Option<f64>,
}

/// Row chunks `[start, end)` of `n` rows.
fn chunks(n: usize, chunk: usize) -> impl Iterator<Item = (usize, usize)> {
    let chunk = chunk.max(1);
    (0..n.div_ceil(chunk)).map(move |i| (i * chunk, ((i + 1) * chunk).min(n)))
}

/// One chunk's logits (soft-capped when asked) divided by `scale`, `[c, vocab]`, and with a
/// soft-cap the derivative of the capped logits by the raw ones, `1 - tanh^2`.
fn chunk_logits<B: Backend>(
    hidden: &Tensor<B, 2>,
    weight: &Tensor<B, 2>,
    (start, end): (usize, usize),
    scale: f64,
    softcap: Option<f64>,
) -> (Tensor<B, 2>, Option<Tensor<B, 2>>) {
    let logits = hidden.clone().slice(s![start..end]).matmul(weight.clone());
    match softcap {
        None => (divide(logits, scale), None),
        Some(cap) => {
            let t = logits.div_scalar(cap).tanh();
            let slope = t.clone().powi_scalar(2).neg().add_scalar(1.0);
            (divide(t.mul_scalar(cap), scale), Some(slope))
        }
    }
}

/// `d value / d z` carried back through the soft-cap, if any.
fn through_cap<B: Backend>(dz: Tensor<B, 2>, slope: Option<Tensor<B, 2>>) -> Tensor<B, 2> {
    match slope {
        Some(s) => dz * s,
        None => dz,
    }
}

/// What one pass over the chunks gives.
struct Forward<B: Backend> {
    value: Tensor<B, 1>,
    metrics: Vec<Tensor<B, 1>>,
    /// `d value / d z` `[n, vocab]` when asked for and all rows fit in one chunk.
    dz: Option<Tensor<B, 2>>,
    /// `d value / d hidden` per row `[n, d]`, when asked for.
    jacobian: Option<Tensor<B, 2>>,
}

/// What the backward will need from the forward.
#[derive(Clone, Copy, Default)]
struct Keep {
    /// The head is trained: keep `d value / d z` if it fits in one chunk.
    weight: bool,
    /// The hidden states are trained: keep each row's gradient with respect to them.
    hidden: bool,
}

/// The objective over all rows, chunk by chunk, on any backend, without a graph.
fn forward_chunks<B: Backend, O: RowObjective>(
    args: &Args<B>,
    objective: &O,
    scale: f64,
    chunk: usize,
    keep: Keep,
) -> Forward<B> {
    let (hidden, aux) = (&args.hidden, &args.aux);
    let [n, d] = hidden.dims();
    // A half-precision head is cast once per call: its f32 copy lives while the chunks run.
    let weight = &crate::half::as_f32(args.weight.clone());
    if n == 0 {
        let device = hidden.device();
        return Forward {
            value: Tensor::zeros([0], &device),
            metrics: (0..objective.metric_count())
                .map(|_| Tensor::zeros([0], &device))
                .collect(),
            dz: None,
            jacobian: keep.hidden.then(|| Tensor::zeros([0, d], &device)),
        };
    }
    let keep_dz = keep.weight && n <= chunk;
    let (mut values, mut jacobian, mut kept) = (Vec::new(), Vec::new(), None);
    let mut metrics: Vec<Vec<Tensor<B, 1>>> = vec![Vec::new(); objective.metric_count()];
    for range in chunks(n, chunk) {
        let (z, slope) = chunk_logits(hidden, weight, range, scale, args.softcap);
        let rows = objective.rows(aux, z, range, keep.hidden || keep_dz);
        values.push(rows.value);
        for (all, m) in metrics.iter_mut().zip(rows.metrics) {
            all.push(m);
        }
        let Some(dz) = rows.dz else { continue };
        let dz = through_cap(dz, slope);
        if keep.hidden {
            // Each row's output depends on its own logits only, so its gradient with
            // respect to the hidden state is known now, whatever the loss above does with
            // it: the backward scales it by the row's upstream gradient instead of
            // recomputing the chunk's logits.
            jacobian.push(divide(dz.clone().matmul(weight.clone().transpose()), scale));
        }
        if keep_dz {
            kept = Some(dz);
        }
    }
    let join = |parts: Vec<Tensor<B, 1>>| match parts.len() {
        1 => parts.into_iter().next().expect("one part"),
        _ => Tensor::cat(parts, 0),
    };
    Forward {
        value: join(values),
        metrics: metrics.into_iter().map(join).collect(),
        dz: kept,
        jacobian: keep.hidden.then(|| Tensor::cat(jacobian, 0)),
    }
}

/// Runs the chunked op when `B` is `Autodiff<I, C>` for a strategy this crate uses; hands
/// the arguments back otherwise. Generic code cannot name the autodiff graph, so the
/// concrete backends are matched at run time (as `nf4_matmul` does).
fn on_autodiff<B: Backend, I: Backend, O: RowObjective>(
    args: Args<B>,
    objective: &O,
    scale: f64,
    chunk: usize,
) -> std::result::Result<RowOutputs<B>, Args<B>> {
    let args = match with_strategy::<B, I, NoCheckpointing, O>(args, objective, scale, chunk) {
        Ok(out) => return Ok(out),
        Err(args) => args,
    };
    with_strategy::<B, I, crate::backend::Checkpointing, O>(args, objective, scale, chunk)
}

fn with_strategy<B: Backend, I: Backend, C: CheckpointStrategy, O: RowObjective>(
    args: Args<B>,
    objective: &O,
    scale: f64,
    chunk: usize,
) -> std::result::Result<RowOutputs<B>, Args<B>> {
    let boxed: Box<dyn Any> = Box::new(args);
    match boxed.downcast::<Args<Autodiff<I, C>>>() {
        Ok(args) => {
            let out = chunked_op(*args, objective, scale, chunk);
            let out: Box<dyn Any> = Box::new(out);
            Ok(*out.downcast::<RowOutputs<B>>().expect("same backend"))
        }
        Err(boxed) => Err(*boxed.downcast::<Args<B>>().expect("the input is unchanged")),
    }
}

#[derive(Debug)]
struct ChunkedHeadBackward<O>(std::marker::PhantomData<O>);

#[derive(Debug, Clone)]
struct HeadState<B: Backend, O> {
    /// `[n, d]`.
    hidden: Tensor<B, 2>,
    /// `[d, vocab]`.
    weight: Tensor<B, 2>,
    aux: Aux<B>,
    objective: O,
    scale: f64,
    chunk: usize,
    softcap: Option<f64>,
    /// `d value / d z` `[n, vocab]` when all rows fit in one chunk: nothing to recompute
    /// for the weight's gradient.
    dz: Option<Tensor<B, 2>>,
    /// `d value / d hidden` `[n, d]` (see `forward_chunks`).
    jacobian: Option<Tensor<B, 2>>,
}

impl<B: Backend, O: RowObjective> Backward<B, 2> for ChunkedHeadBackward<O> {
    type State = HeadState<B, O>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_h, node_w] = ops.parents;
        let grad =
            Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(grads.consume::<B>(&ops.node)));
        let HeadState {
            hidden: h,
            weight: w,
            aux,
            objective,
            scale,
            chunk,
            softcap,
            mut dz,
            jacobian,
        } = ops.state;
        let n = h.dims()[0];
        if let (Some(node), Some(j)) = (&node_h, jacobian) {
            let dh = j * grad.clone().reshape([n, 1]);
            grads.register::<B>(node.id, dh.into_primitive().tensor());
        }
        let Some(node) = node_w else {
            return;
        };
        let w = crate::half::as_f32(w);
        let mut dw: Option<Tensor<B, 2>> = None;
        for range in chunks(n, chunk) {
            let (start, end) = range;
            let dz = dz.take().unwrap_or_else(|| {
                let (z, slope) = chunk_logits(&h, &w, range, scale, softcap);
                let dz = objective.rows(&aux, z, range, true).dz.expect("asked for");
                through_cap(dz, slope)
            });
            let g = grad.clone().slice(s![start..end]).reshape([end - start, 1]);
            let part = divide(
                h.clone().slice(s![start..end]).transpose().matmul(dz * g),
                scale,
            );
            dw = Some(match dw {
                Some(acc) => acc + part,
                None => part,
            });
        }
        if let Some(dw) = dw {
            grads.register::<B>(node.id, dw.into_primitive().tensor());
        }
    }
}

fn chunked_op<I: Backend, C: CheckpointStrategy, O: RowObjective>(
    args: Args<Autodiff<I, C>>,
    objective: &O,
    scale: f64,
    chunk: usize,
) -> RowOutputs<Autodiff<I, C>> {
    let h = args.hidden.into_primitive().tensor();
    let w = args.weight.into_primitive().tensor();
    let inner = Args {
        hidden: Tensor::<I, 2>::from_primitive(TensorPrimitive::Float(h.primitive.clone())),
        weight: Tensor::<I, 2>::from_primitive(TensorPrimitive::Float(w.primitive.clone())),
        aux: Aux {
            floats: args.aux.floats.into_iter().map(|t| t.inner()).collect(),
            ints: args.aux.ints.into_iter().map(|t| t.inner()).collect(),
        },
        softcap: args.softcap,
    };
    let keep = Keep {
        weight: !w.node.requirement.is_none(),
        hidden: !h.node.requirement.is_none(),
    };
    let fwd = forward_chunks(&inner, objective, scale, chunk, keep);
    let value = fwd.value.into_primitive().tensor();
    let out = match ChunkedHeadBackward(std::marker::PhantomData)
        .prepare::<C>([h.node.clone(), w.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            HeadState {
                hidden: inner.hidden,
                weight: inner.weight,
                aux: inner.aux,
                objective: objective.clone(),
                scale,
                chunk,
                softcap: inner.softcap,
                dz: fwd.dz,
                jacobian: fwd.jacobian,
            },
            value,
        ),
        OpsKind::UnTracked(prep) => prep.finish(value),
    };
    RowOutputs {
        value: Tensor::from_primitive(TensorPrimitive::Float(out)),
        metrics: fwd.metrics.into_iter().map(Tensor::from_inner).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Cpu, CpuTrain, CpuTrainCheckpointed};
    use burn::tensor::backend::AutodiffBackend;

    use crate::test_values::values;

    type Grads = (Vec<f32>, Vec<f32>, Vec<f32>);

    /// Value and gradients (hidden, weight) of `sum(probe * logps)`.
    fn run<B: AutodiffBackend>(
        chunk: Option<usize>,
        weight_tracked: bool,
        scale: f64,
        softcap: Option<f64>,
    ) -> Grads {
        let device = Default::default();
        let (n, d, v) = (13, 8, 37);
        let h = Tensor::<B, 2>::from_data(TensorData::new(values(n * d, 1), [n, d]), &device)
            .require_grad();
        let mut w = Tensor::<B, 2>::from_data(TensorData::new(values(d * v, 2), [d, v]), &device);
        if weight_tracked {
            w = w.require_grad();
        }
        let targets: Vec<i64> = (0..n as i64).map(|i| (i * 7) % v as i64).collect();
        let targets = Tensor::<B, 1, Int>::from_data(TensorData::new(targets, [n]), &device);
        let probe = Tensor::<B, 1>::from_data(TensorData::new(values(n, 3), [n]), &device);
        let logps = match (chunk, softcap) {
            (Some(c), None) => head_logps(h.clone(), w.clone(), targets, scale, c, false).logps,
            (None, None) => plain_head_logps_of(h.clone(), w.clone(), targets, scale),
            (Some(c), cap) => {
                let aux = TargetLogps::aux(targets);
                let objective = TargetLogps { entropy: false };
                head_rows_capped(h.clone(), w.clone(), aux, &objective, scale, cap, c).value
            }
            (None, Some(cap)) => {
                let capped = h
                    .clone()
                    .matmul(w.clone())
                    .div_scalar(cap)
                    .tanh()
                    .mul_scalar(cap);
                logits_logps(capped, targets, scale, false).logps
            }
        };
        let host = |t: Tensor<B::InnerBackend, 2>| t.to_data().iter::<f32>().collect::<Vec<_>>();
        let value: Vec<f32> = logps.to_data().iter::<f32>().collect();
        let grads = (logps * probe).sum().backward();
        let gh = host(h.grad(&grads).expect("hidden gradient"));
        let gw = w.grad(&grads).map(host).unwrap_or_default();
        (value, gh, gw)
    }

    fn assert_close(a: &Grads, b: &Grads) {
        for (x, y) in [(&a.0, &b.0), (&a.1, &b.1), (&a.2, &b.2)] {
            assert_eq!(x.len(), y.len());
            for (p, q) in x.iter().zip(y) {
                assert!((p - q).abs() <= 1e-6 * (1.0 + q.abs()), "{p} vs {q}");
            }
        }
    }

    #[test]
    fn chunked_logps_and_gradients_equal_the_unchunked_ones() {
        // A soft-cap of 0.9 bends most of these logits (Gemma 2's final_logit_softcapping).
        for (scale, cap) in [(1.0, None), (0.7, None), (1.0, Some(0.9)), (0.7, Some(0.9))] {
            for tracked in [true, false] {
                let reference = run::<CpuTrain>(None, tracked, scale, cap);
                assert_eq!(reference.2.is_empty(), !tracked);
                for chunk in [1, 4, 5, 13, 64] {
                    assert_close(
                        &run::<CpuTrain>(Some(chunk), tracked, scale, cap),
                        &reference,
                    );
                    assert_close(
                        &run::<CpuTrainCheckpointed>(Some(chunk), tracked, scale, cap),
                        &reference,
                    );
                }
            }
        }
    }

    #[test]
    fn inference_backends_chunk_too_and_entropy_matches() {
        let device = Default::default();
        let (n, d, v) = (9, 6, 21);
        let h = Tensor::<Cpu, 2>::from_data(TensorData::new(values(n * d, 4), [n, d]), &device);
        let w = Tensor::<Cpu, 2>::from_data(TensorData::new(values(d * v, 5), [d, v]), &device);
        let t = Tensor::<Cpu, 1, Int>::from_data(TensorData::new(vec![3i64; n], [n]), &device);
        let plain = logits_logps(h.clone().matmul(w.clone()), t.clone(), 1.3, true);
        let chunked = head_logps(h, w, t, 1.3, 4, true);
        let host = |x: Tensor<Cpu, 1>| x.to_data().iter::<f32>().collect::<Vec<_>>();
        for (a, b) in [
            (host(chunked.logps), host(plain.logps)),
            (host(chunked.entropy.unwrap()), host(plain.entropy.unwrap())),
        ] {
            for (p, q) in a.iter().zip(&b) {
                assert!((p - q).abs() < 1e-6, "{p} vs {q}");
            }
        }
    }

    #[test]
    fn chunk_rows_are_a_power_of_two_within_the_budget() {
        assert_eq!(chunk_positions(151_936), 64);
        assert_eq!(chunk_positions(32_000), 512);
        assert_eq!(chunk_positions(128), 1 << 17);
        assert_eq!(chunk_positions(1 << 30), 16);
        for v in [1000, 32_000, 151_936] {
            assert!(chunk_positions(v) * v <= CHUNK_ELEMENTS);
        }
    }
}
