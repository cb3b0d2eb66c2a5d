//! Log-probabilities of target tokens through the LM head, computed over chunks of
//! positions so that no `[positions, vocab]` tensor larger than one chunk ever exists: not
//! in the forward, and not in the backward either. Autodiff would keep the whole logits
//! and log-softmax for the backward (two `[n, vocab]` f32 tensors: 1.2 GB at 1024
//! positions of a 152k vocabulary). Each log-prob depends on its own row only, so the op
//! computes each row's gradient with respect to its hidden state in the forward, chunk by
//! chunk, and keeps that (`[n, hidden]`); the backward scales it by the upstream gradient,
//! whatever loss sits above (Liger's fused linear cross-entropy, generalised to any loss
//! over the log-probs). A trainable head recomputes each chunk's logits in the backward for
//! its own gradient (torchtune's chunked approach). Cost without a trainable head: one
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

/// What the head computes at each position: `log p(target)` of `softmax(h W / scale)`,
/// and optionally the entropy of that distribution (a metric: no gradient).
pub struct HeadLogps<B: Backend> {
    /// `[n]`.
    pub logps: Tensor<B, 1>,
    /// `[n]`, when asked for.
    pub entropy: Option<Tensor<B, 1>>,
}

/// `log softmax(hidden @ weight / scale)[target]` per row of `hidden` (`[n, d]`), with
/// `weight` `[d, vocab]`, in chunks of `chunk` rows. On the autodiff backends this crate
/// trains with, the op keeps each row's hidden-state gradient (and recomputes chunks only
/// for a trainable head's gradient); elsewhere (inference backends) the chunks keep nothing.
pub fn head_logps<B: Backend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    scale: f64,
    chunk: usize,
    with_entropy: bool,
) -> HeadLogps<B> {
    let args = Args {
        hidden,
        weight,
        targets,
    };
    let args = match on_autodiff::<B, crate::backend::Cpu>(args, scale, chunk, with_entropy) {
        Ok(out) => return out,
        Err(args) => args,
    };
    #[cfg(feature = "cuda")]
    let args = match on_autodiff::<B, crate::backend::Gpu>(args, scale, chunk, with_entropy) {
        Ok(out) => return out,
        Err(args) => args,
    };
    if B::ad_enabled(&args.hidden.device()) {
        // An autodiff backend this crate does not build: autodiff through plain ops.
        return plain_head_logps(args, scale, with_entropy);
    }
    let out = forward_chunks(
        &args.hidden,
        &args.weight,
        &args.targets,
        scale,
        chunk,
        with_entropy,
        Keep {
            probs: false,
            jacobian: false,
        },
    );
    HeadLogps {
        logps: out.logps,
        entropy: out.entropy,
    }
}

struct Args<B: Backend> {
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
}

/// The unchunked computation: what the chunked op must equal (and the path for a backend
/// the op is not built for).
pub fn plain_head_logps_of<B: Backend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    scale: f64,
) -> Tensor<B, 1> {
    logits_logps(hidden.matmul(weight), targets, scale, false).logps
}

fn plain_head_logps<B: Backend>(args: Args<B>, scale: f64, with_entropy: bool) -> HeadLogps<B> {
    logits_logps(
        args.hidden.matmul(crate::half::as_f32(args.weight)),
        args.targets,
        scale,
        with_entropy,
    )
}

/// Target log-probs (and entropies) from whole `[n, vocab]` logits, for a head the
/// chunked op does not cover (a bias or an adapter on the LM head).
pub fn logits_logps<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    scale: f64,
    with_entropy: bool,
) -> HeadLogps<B> {
    let n = targets.dims()[0];
    let logp_all = burn::tensor::activation::log_softmax(logits.div_scalar(scale), 1);
    let entropy = with_entropy.then(|| {
        let lp = logp_all.clone().detach();
        (lp.clone().exp() * lp).sum_dim(1).reshape([n]).neg()
    });
    let logps = logp_all.gather(1, targets.reshape([n, 1])).reshape([n]);
    HeadLogps { logps, entropy }
}

/// Row chunks `[start, end)` of `n` rows.
fn chunks(n: usize, chunk: usize) -> impl Iterator<Item = (usize, usize)> {
    let chunk = chunk.max(1);
    (0..n.div_ceil(chunk)).map(move |i| (i * chunk, ((i + 1) * chunk).min(n)))
}

/// One chunk's scaled logits `[c, vocab]` and their log-sum-exp `[c, 1]`.
fn chunk_logits<B: Backend>(
    hidden: &Tensor<B, 2>,
    weight: &Tensor<B, 2>,
    (start, end): (usize, usize),
    scale: f64,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let z = hidden
        .clone()
        .slice(s![start..end])
        .matmul(weight.clone())
        .div_scalar(scale);
    let max = z.clone().max_dim(1);
    let lse = max.clone() + (z.clone() - max).exp().sum_dim(1).log();
    (z, lse)
}

/// What one pass over the chunks gives.
struct Forward<B: Backend> {
    logps: Tensor<B, 1>,
    entropy: Option<Tensor<B, 1>>,
    /// `softmax(z)` when asked for and all positions fit in one chunk.
    probs: Option<Tensor<B, 2>>,
    /// `d log p(target) / d hidden` per row `[n, d]`, when asked for.
    jacobian: Option<Tensor<B, 2>>,
}

/// What the backward will need from the forward.
#[derive(Clone, Copy)]
struct Keep {
    /// The probabilities, if they fit in one chunk (the weight's gradient needs them).
    probs: bool,
    /// Each row's gradient with respect to its hidden state.
    jacobian: bool,
}

/// `d log p(t) / dz = onehot(t) - softmax(z)` for a chunk, times `g` per row and 1/scale.
fn logit_grad<B: Backend>(
    p: Tensor<B, 2>,
    targets: Tensor<B, 2, Int>,
    g: Tensor<B, 2>,
    scale: f64,
) -> Tensor<B, 2> {
    (p * g.clone().neg())
        .scatter(1, targets, g, IndexingUpdateOp::Add)
        .div_scalar(scale)
}

/// Target log-probs `[n]` (and entropies) chunk by chunk, on any backend, without a graph.
fn forward_chunks<B: Backend>(
    hidden: &Tensor<B, 2>,
    weight: &Tensor<B, 2>,
    targets: &Tensor<B, 1, Int>,
    scale: f64,
    chunk: usize,
    with_entropy: bool,
    keep: Keep,
) -> Forward<B> {
    let n = targets.dims()[0];
    // A half-precision head is cast once per call: its f32 copy lives while the chunks run.
    let weight = &crate::half::as_f32(weight.clone());
    if n == 0 {
        let device = hidden.device();
        return Forward {
            logps: Tensor::zeros([0], &device),
            entropy: with_entropy.then(|| Tensor::zeros([0], &device)),
            probs: None,
            jacobian: keep
                .jacobian
                .then(|| Tensor::zeros([0, hidden.dims()[1]], &device)),
        };
    }
    let keep_probs = keep.probs && n <= chunk;
    let (mut logps, mut entropies, mut probs, mut jacobian) =
        (Vec::new(), Vec::new(), None, Vec::new());
    for (start, end) in chunks(n, chunk) {
        let c = end - start;
        let (z, lse) = chunk_logits(hidden, weight, (start, end), scale);
        let t = targets.clone().slice(s![start..end]).reshape([c, 1]);
        let picked = z.clone().gather(1, t.clone());
        logps.push((picked - lse.clone()).reshape([c]));
        if !(with_entropy || keep_probs || keep.jacobian) {
            continue;
        }
        let p = (z.clone() - lse.clone()).exp();
        if with_entropy {
            // H = lse - sum(p z).
            entropies.push((lse - (p.clone() * z).sum_dim(1)).reshape([c]));
        }
        if keep.jacobian {
            // Each log-prob depends on its own row only, so its gradient with respect to the
            // hidden state is known now, whatever the loss above it does with it: the
            // backward scales it by the row's upstream gradient instead of recomputing the
            // chunk's logits.
            let ones = Tensor::ones([c, 1], &hidden.device());
            let dz = logit_grad(p.clone(), t, ones, scale);
            jacobian.push(dz.matmul(weight.clone().transpose()));
        }
        if keep_probs {
            probs = Some(p);
        }
    }
    let join = |parts: Vec<Tensor<B, 1>>| match parts.len() {
        1 => parts.into_iter().next().expect("one part"),
        _ => Tensor::cat(parts, 0),
    };
    Forward {
        logps: join(logps),
        entropy: with_entropy.then(|| join(entropies)),
        probs,
        jacobian: keep.jacobian.then(|| Tensor::cat(jacobian, 0)),
    }
}

/// Runs the chunked op when `B` is `Autodiff<I, C>` for a strategy this crate uses; hands
/// the arguments back otherwise. Generic code cannot name the autodiff graph, so the
/// concrete backends are matched at run time (as `nf4_matmul` does).
fn on_autodiff<B: Backend, I: Backend>(
    args: Args<B>,
    scale: f64,
    chunk: usize,
    with_entropy: bool,
) -> std::result::Result<HeadLogps<B>, Args<B>> {
    let args = match with_strategy::<B, I, NoCheckpointing>(args, scale, chunk, with_entropy) {
        Ok(out) => return Ok(out),
        Err(args) => args,
    };
    with_strategy::<B, I, crate::backend::Checkpointing>(args, scale, chunk, with_entropy)
}

fn with_strategy<B: Backend, I: Backend, C: CheckpointStrategy>(
    args: Args<B>,
    scale: f64,
    chunk: usize,
    with_entropy: bool,
) -> std::result::Result<HeadLogps<B>, Args<B>> {
    let boxed: Box<dyn Any> = Box::new(args);
    match boxed.downcast::<Args<Autodiff<I, C>>>() {
        Ok(args) => {
            let out = chunked_op(*args, scale, chunk, with_entropy);
            let out: Box<dyn Any> = Box::new(out);
            Ok(*out.downcast::<HeadLogps<B>>().expect("same backend"))
        }
        Err(boxed) => Err(*boxed.downcast::<Args<B>>().expect("the input is unchanged")),
    }
}

#[derive(Debug)]
struct ChunkedHeadBackward;

#[derive(Debug, Clone)]
struct HeadState<B: Backend> {
    /// `[n, d]`.
    hidden: Tensor<B, 2>,
    /// `[d, vocab]`.
    weight: Tensor<B, 2>,
    /// `[n]`.
    targets: Tensor<B, 1, Int>,
    scale: f64,
    chunk: usize,
    /// `softmax(z)` `[n, vocab]` when all positions fit in one chunk: nothing to recompute
    /// for the weight's gradient.
    probs: Option<Tensor<B, 2>>,
    /// `d log p(target) / d hidden` `[n, d]` (see `forward_chunks`).
    jacobian: Option<Tensor<B, 2>>,
}

impl<B: Backend> Backward<B, 2> for ChunkedHeadBackward {
    type State = HeadState<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_h, node_w] = ops.parents;
        let grad =
            Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(grads.consume::<B>(&ops.node)));
        let HeadState {
            hidden: h,
            weight: w,
            targets,
            scale,
            chunk,
            mut probs,
            jacobian,
        } = ops.state;
        let n = targets.dims()[0];
        if let (Some(node), Some(j)) = (&node_h, jacobian) {
            let dh = j * grad.clone().reshape([n, 1]);
            grads.register::<B>(node.id, dh.into_primitive().tensor());
        }
        let Some(node) = node_w else {
            return;
        };
        let w = crate::half::as_f32(w);
        let mut dw: Option<Tensor<B, 2>> = None;
        for (start, end) in chunks(n, chunk) {
            let c = end - start;
            let p = probs.take().unwrap_or_else(|| {
                let (z, lse) = chunk_logits(&h, &w, (start, end), scale);
                (z - lse).exp()
            });
            let g = grad.clone().slice(s![start..end]).reshape([c, 1]);
            let t = targets.clone().slice(s![start..end]).reshape([c, 1]);
            let part = h
                .clone()
                .slice(s![start..end])
                .transpose()
                .matmul(logit_grad(p, t, g, scale));
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

fn chunked_op<I: Backend, C: CheckpointStrategy>(
    args: Args<Autodiff<I, C>>,
    scale: f64,
    chunk: usize,
    with_entropy: bool,
) -> HeadLogps<Autodiff<I, C>> {
    let h = args.hidden.into_primitive().tensor();
    let w = args.weight.into_primitive().tensor();
    let targets = args.targets.inner();
    let inner_h = Tensor::<I, 2>::from_primitive(TensorPrimitive::Float(h.primitive.clone()));
    let inner_w = Tensor::<I, 2>::from_primitive(TensorPrimitive::Float(w.primitive.clone()));
    let keep = Keep {
        probs: !w.node.requirement.is_none(),
        jacobian: !h.node.requirement.is_none(),
    };
    let fwd = forward_chunks(
        &inner_h,
        &inner_w,
        &targets,
        scale,
        chunk,
        with_entropy,
        keep,
    );
    let logps = fwd.logps.into_primitive().tensor();
    let out = match ChunkedHeadBackward
        .prepare::<C>([h.node.clone(), w.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            HeadState {
                hidden: inner_h,
                weight: inner_w,
                targets,
                scale,
                chunk,
                probs: fwd.probs,
                jacobian: fwd.jacobian,
            },
            logps,
        ),
        OpsKind::UnTracked(prep) => prep.finish(logps),
    };
    HeadLogps {
        logps: Tensor::from_primitive(TensorPrimitive::Float(out)),
        entropy: fwd.entropy.map(Tensor::from_inner),
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
    fn run<B: AutodiffBackend>(chunk: Option<usize>, weight_tracked: bool, scale: f64) -> Grads {
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
        let logps = match chunk {
            Some(c) => head_logps(h.clone(), w.clone(), targets, scale, c, false).logps,
            None => plain_head_logps_of(h.clone(), w.clone(), targets, scale),
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
        for scale in [1.0, 0.7] {
            for tracked in [true, false] {
                let reference = run::<CpuTrain>(None, tracked, scale);
                assert_eq!(reference.2.is_empty(), !tracked);
                for chunk in [1, 4, 5, 13, 64] {
                    assert_close(&run::<CpuTrain>(Some(chunk), tracked, scale), &reference);
                    assert_close(
                        &run::<CpuTrainCheckpointed>(Some(chunk), tracked, scale),
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
        let plain = plain_head_logps(
            Args {
                hidden: h.clone(),
                weight: w.clone(),
                targets: t.clone(),
            },
            1.3,
            true,
        );
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
