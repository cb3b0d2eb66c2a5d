//! Causal self-attention over a whole sequence (training and scoring forwards, no KV
//! cache). On the CPU backend it is one fused flash kernel each way (vendored burn-flex
//! `attention_flash_with_lse` / `attention_flash_backward`): blocks of query rows visit only
//! the key tiles they can see, so causal attention does half the work of the full matrix,
//! nothing `[queries, keys]`-sized is ever allocated, and the backward recomputes each
//! block's probabilities from the row log-sum-exps the forward kept (FlashAttention-2).
//! Elsewhere (CUDA) and for short sequences, the grouped-query layout through burn's
//! `attention` (the vendored burn-autodiff op) stays.

use std::any::{Any, TypeId};

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{CheckpointStrategy, NoCheckpointing};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::ops::attention::{attention_flash_backward, attention_flash_with_lse};
use burn::backend::flex::FlexTensor;
use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::TensorPrimitive;

use crate::backend::{Checkpointing, Cpu};

/// Sequences shorter than this keep the grouped layout: the whole probability matrix is
/// small there, and a few large matmuls beat many tile-sized ones.
pub const FUSED_FROM_TOKENS: usize = 1024;

/// Whether `forward` takes the fused path for `tokens` on backend `B` (then the decoder's
/// mask stays `[B, 1, T, T]` instead of being grouped).
pub fn fused<B: Backend>(tokens: usize) -> bool {
    let b = TypeId::of::<B>();
    tokens >= FUSED_FROM_TOKENS
        && (b == TypeId::of::<Cpu>()
            || b == TypeId::of::<Autodiff<Cpu, NoCheckpointing>>()
            || b == TypeId::of::<Autodiff<Cpu, Checkpointing>>())
}

fn options(scale: f64) -> AttentionModuleOptions {
    AttentionModuleOptions {
        scale: Some(scale),
        softcap: None,
        is_causal: true,
    }
}

/// `softmax(scale q kᵀ, causal and masked) v` for `q` `[B, H, T, D]`, `k` and `v`
/// `[B, KVH, T, D]` (query head `h` reads KV head `h / (H / KVH)`), `mask` `[B, 1, T, T]`
/// (true = blocked; the causal order is applied on top). Output `[B, H, T, D]`.
pub fn forward<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Tensor<B, 4, Bool>,
    scale: f64,
) -> Tensor<B, 4> {
    let [b, h, t, d] = q.dims();
    let kvh = k.dims()[1];
    // Each query head gets its KV head's rows (autodiff sums their gradients back).
    let repeat = |x: Tensor<B, 4>| {
        let dv = x.dims()[3];
        x.reshape([b, kvh, 1, t, dv])
            .expand([b, kvh, h / kvh, t, dv])
            .reshape([b, h, t, dv])
    };
    let args = Args {
        q,
        k: repeat(k),
        v: repeat(v),
        mask,
    };
    let args = match with_strategy::<B, NoCheckpointing>(args, scale) {
        Ok(out) => return out,
        Err(args) => args,
    };
    let args = match with_strategy::<B, Checkpointing>(args, scale) {
        Ok(out) => return out,
        Err(args) => args,
    };
    debug_assert_eq!(args.q.dims(), [b, h, t, d]);
    // The inference backend: burn-flex's flash forward, causal blocks skipped.
    burn::tensor::module::attention(
        args.q,
        args.k,
        args.v,
        Some(args.mask),
        None,
        options(scale),
    )
}

struct Args<B: Backend> {
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Tensor<B, 4, Bool>,
}

fn with_strategy<B: Backend, C: CheckpointStrategy>(
    args: Args<B>,
    scale: f64,
) -> std::result::Result<Tensor<B, 4>, Args<B>> {
    let boxed: Box<dyn Any> = Box::new(args);
    match boxed.downcast::<Args<Autodiff<Cpu, C>>>() {
        Ok(args) => {
            let out: Box<dyn Any> = Box::new(fused_op(*args, scale));
            Ok(*out.downcast::<Tensor<B, 4>>().expect("same backend"))
        }
        Err(boxed) => Err(*boxed.downcast::<Args<B>>().expect("the input is unchanged")),
    }
}

#[derive(Debug)]
struct FusedAttentionBackward;

#[derive(Debug, Clone)]
struct FusedState {
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    out: FlexTensor,
    lse: FlexTensor,
    mask: FlexTensor,
    scale: f64,
}

impl Backward<Cpu, 3> for FusedAttentionBackward {
    type State = FusedState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_q, node_k, node_v] = ops.parents;
        let grad = grads.consume::<Cpu>(&ops.node);
        let st = ops.state;
        let (dq, dk, dv) = attention_flash_backward(
            st.q,
            st.k,
            st.v,
            st.out,
            st.lse,
            grad,
            Some(st.mask),
            options(st.scale),
        );
        for (node, g) in [(node_q, dq), (node_k, dk), (node_v, dv)] {
            if let Some(node) = node {
                grads.register::<Cpu>(node.id, g);
            }
        }
    }
}

fn fused_op<C: CheckpointStrategy>(
    args: Args<Autodiff<Cpu, C>>,
    scale: f64,
) -> Tensor<Autodiff<Cpu, C>, 4> {
    let [q, k, v] = [args.q, args.k, args.v].map(|t| t.into_primitive().tensor());
    let mask = args.mask.inner().into_primitive();
    let (out, lse) = attention_flash_with_lse(
        q.primitive.clone(),
        k.primitive.clone(),
        v.primitive.clone(),
        Some(mask.clone()),
        options(scale),
    );
    let out = match FusedAttentionBackward
        .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            FusedState {
                q: q.primitive,
                k: k.primitive,
                v: v.primitive,
                out: out.clone(),
                lse,
                mask,
                scale,
            },
            out,
        ),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}
