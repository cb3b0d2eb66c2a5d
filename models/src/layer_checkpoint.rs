//! Per-layer activation checkpointing, as transformers' `gradient_checkpointing`: on the
//! checkpointed training backend (`[train] gradient_checkpointing = true`) each decoder layer
//! runs as one op that keeps only its input. The forward runs the layer without a graph; the
//! backward runs it again on fresh leaves (the input, and the layer's parameters), takes the
//! gradients of that small graph, and hands them to the outer one: the input's to the layer
//! below, the parameters' to the parameters themselves. So the activations kept for the
//! backward are one `[tokens, hidden]` tensor per layer plus, while the backward is inside
//! it, one layer's worth.
//!
//! A layer whose adapter draws dropout keeps the plain path (its forward without a graph
//! would skip the dropout, and the recomputation would draw another mask).
//!
//! A mixture of experts' sparse layer also hands out its router probabilities, which the
//! load-balancing loss reads: the op's output is then the layer's output and those
//! probabilities joined in one flat tensor, so that their gradients come back together.

use std::any::Any;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::Autodiff;
use burn::module::{AutodiffModule, ModuleMapper, Param};
use burn::prelude::*;
use burn::tensor::TensorPrimitive;

use crate::layers::RopeTables;
use crate::llama::DecoderLayer;
use crate::moe::Routing;

/// A layer's output, and its routing when it is a sparse layer.
type LayerOutput<B> = (Tensor<B, 3>, Option<Routing<B>>);

/// `layer.forward(x, rope, mask)` without a KV cache, recomputed in the backward pass on the
/// checkpointed training backends.
pub fn layer_forward<B: Backend>(
    layer: &DecoderLayer<B>,
    x: Tensor<B, 3>,
    rope: &RopeTables<B>,
    mask: Tensor<B, 4, Bool>,
) -> LayerOutput<B> {
    let args = Args {
        x,
        rope: RopeTables {
            cos: rope.cos.clone(),
            sin_signed: rope.sin_signed.clone(),
        },
        mask,
    };
    let args = match on_checkpointed::<B, crate::backend::Cpu>(layer, args) {
        Ok(y) => return y,
        Err(args) => args,
    };
    #[cfg(feature = "cuda")]
    let args = match on_checkpointed::<B, crate::backend::Gpu>(layer, args) {
        Ok(y) => return y,
        Err(args) => args,
    };
    layer.forward(args.x, &args.rope, args.mask, None)
}

struct Args<B: Backend> {
    x: Tensor<B, 3>,
    rope: RopeTables<B>,
    mask: Tensor<B, 4, Bool>,
}

fn on_checkpointed<B: Backend, I: Backend>(
    layer: &DecoderLayer<B>,
    args: Args<B>,
) -> std::result::Result<LayerOutput<B>, Args<B>> {
    type Ckpt<I> = Autodiff<I, crate::backend::Checkpointing>;
    let boxed: Box<dyn Any> = Box::new(args);
    match boxed.downcast::<Args<Ckpt<I>>>() {
        Ok(args) => {
            let layer = (layer as &dyn Any)
                .downcast_ref::<DecoderLayer<Ckpt<I>>>()
                .expect("the layer lives on the input's backend");
            let y = match draws_dropout(layer) {
                true => layer.forward(args.x, &args.rope, args.mask, None),
                false => recomputed_layer(layer, *args),
            };
            let y: Box<dyn Any> = Box::new(y);
            Ok(*y.downcast::<LayerOutput<B>>().expect("same backend"))
        }
        Err(boxed) => Err(*boxed.downcast::<Args<B>>().expect("the input is unchanged")),
    }
}

fn draws_dropout<B: Backend>(layer: &DecoderLayer<B>) -> bool {
    layer.projections().iter().any(|(_, p)| {
        p.lora
            .as_ref()
            .is_some_and(|l| l.enabled && l.dropout > 0.0)
    })
}

/// Whether any parameter of the module takes a gradient.
struct AnyTracked(bool);

impl<B: Backend> burn::module::ModuleVisitor<B> for AnyTracked {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.0 |= param.val().is_require_grad();
    }
}

/// The layer with every float parameter replaced by a fresh leaf over the same data (tracked
/// where the original is), and how to hand each fresh leaf's gradient to the original node.
struct FreshLeaves<I: Backend, C: CheckpointStrategy> {
    handoffs: Vec<Handoff>,
    backend: std::marker::PhantomData<(I, C)>,
}

type Handoff = Box<dyn FnOnce(&Gradients, &mut Gradients)>;

impl<I: Backend, C: CheckpointStrategy> ModuleMapper<Autodiff<I, C>> for FreshLeaves<I, C> {
    fn map_float<const D: usize>(
        &mut self,
        param: Param<Tensor<Autodiff<I, C>, D>>,
    ) -> Param<Tensor<Autodiff<I, C>, D>> {
        let (id, tensor, mapper) = param.consume();
        if !tensor.is_require_grad() {
            let fresh = Tensor::from_inner(tensor.inner());
            return Param::from_mapped_value(id, fresh, mapper);
        }
        let original: NodeId = tensor.clone().into_primitive().tensor().node.id;
        let fresh = Tensor::<Autodiff<I, C>, D>::from_inner(tensor.inner()).require_grad();
        let leaf = fresh.clone();
        self.handoffs.push(Box::new(move |nested, outer| {
            if let Some(g) = leaf.grad(nested) {
                outer.register::<I>(original, g.into_primitive().tensor());
            }
        }));
        Param::from_mapped_value(id, fresh, mapper)
    }
}

#[derive(Debug, Clone)]
struct LayerState<I: Backend, C: CheckpointStrategy> {
    layer: DecoderLayer<Autodiff<I, C>>,
    x: Tensor<I, 3>,
    cos: Tensor<I, 4>,
    sin_signed: Tensor<I, 4>,
    mask: Tensor<I, 4, Bool>,
    /// The op's flat output holds router probabilities after the layer's output (`joined`).
    routed: bool,
}

/// A sparse layer's output and router probabilities as one flat tensor.
fn joined<B: Backend>(out: Tensor<B, 3>, probs: Tensor<B, 2>) -> Tensor<B, 1> {
    let (n, p) = (out.shape().num_elements(), probs.shape().num_elements());
    Tensor::cat(vec![out.reshape([n]), probs.reshape([p])], 0)
}

#[derive(Debug)]
struct RecomputedLayerBackward<C: CheckpointStrategy>(std::marker::PhantomData<C>);

impl<I: Backend, C: CheckpointStrategy> Backward<I, 1> for RecomputedLayerBackward<C> {
    type State = LayerState<I, C>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<I>(&ops.node);
        let st = ops.state;
        let mut fresh = FreshLeaves::<I, C> {
            handoffs: Vec::new(),
            backend: std::marker::PhantomData,
        };
        let layer = st.layer.clone().map(&mut fresh);
        let x = Tensor::<Autodiff<I, C>, 3>::from_inner(st.x).require_grad();
        let rope = RopeTables {
            cos: Tensor::from_inner(st.cos),
            sin_signed: Tensor::from_inner(st.sin_signed),
        };
        let mask = Tensor::<Autodiff<I, C>, 4, Bool>::from_inner(st.mask);
        let (out, routing) = layer.forward(x.clone(), &rope, mask, None);
        let grad = TensorPrimitive::Float(grad);
        let nested = match routing.filter(|_| st.routed) {
            Some(r) => {
                let upstream =
                    Tensor::<Autodiff<I, C>, 1>::from_inner(Tensor::from_primitive(grad));
                (joined(out, r.probs) * upstream).sum().backward()
            }
            None => {
                let upstream =
                    Tensor::<Autodiff<I, C>, 3>::from_inner(Tensor::from_primitive(grad));
                (out * upstream).sum().backward()
            }
        };
        if let (Some(node), Some(dx)) = (node_x, x.grad(&nested)) {
            grads.register::<I>(node.id, dx.into_primitive().tensor());
        }
        for handoff in fresh.handoffs {
            handoff(&nested, grads);
        }
    }
}

fn recomputed_layer<I: Backend, C: CheckpointStrategy>(
    layer: &DecoderLayer<Autodiff<I, C>>,
    args: Args<Autodiff<I, C>>,
) -> LayerOutput<Autodiff<I, C>> {
    let mut tracked = AnyTracked(false);
    burn::module::Module::visit(layer, &mut tracked);
    // With a frozen embedding the first layer's input takes no gradient; the op must still
    // run its backward for the layer's own parameters.
    // (`is_require_grad` is true for leaves only: an op's output is tracked without it.)
    let x_tracked = !args
        .x
        .clone()
        .into_primitive()
        .tensor()
        .node
        .requirement
        .is_none();
    let x = if tracked.0 && !x_tracked {
        // Untracked already: a fresh leaf over the same data loses nothing.
        Tensor::from_inner(args.x.inner()).require_grad()
    } else {
        args.x
    };
    let inner = layer.valid();
    let (x_inner, cos, sin_signed, mask) = (
        x.clone().inner(),
        args.rope.cos.inner(),
        args.rope.sin_signed.inner(),
        args.mask.inner(),
    );
    let rope = RopeTables {
        cos: cos.clone(),
        sin_signed: sin_signed.clone(),
    };
    let (out, routing) = inner.forward(x_inner.clone(), &rope, mask.clone(), None);
    let dims = out.dims();
    // A dense layer's output keeps its shape (no slicing of it, nor of its gradient).
    let (out, routed) = match routing {
        Some(r) => {
            let shape = r.probs.dims();
            (
                joined(out, r.probs).into_primitive(),
                Some((shape, r.chosen)),
            )
        }
        None => (out.into_primitive(), None),
    };
    let out = out.tensor();
    let x = x.into_primitive().tensor();
    let out = match RecomputedLayerBackward::<C>(std::marker::PhantomData)
        .prepare::<C>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            LayerState {
                layer: layer.clone(),
                x: x_inner,
                cos,
                sin_signed,
                mask,
                routed: routed.is_some(),
            },
            out,
        ),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    let out = TensorPrimitive::Float(out);
    let Some(([tokens, experts], chosen)) = routed else {
        return (Tensor::from_primitive(out), None);
    };
    let flat = Tensor::<Autodiff<I, C>, 1>::from_primitive(out);
    let n: usize = dims.iter().product();
    let routing = Routing {
        probs: flat
            .clone()
            .narrow(0, n, tokens * experts)
            .reshape([tokens, experts]),
        chosen,
    };
    (flat.narrow(0, 0, n).reshape(dims), Some(routing))
}
