//! A frozen base stored in half precision (`[model] dtype = "bfloat16"` or `"float16"` with an
//! adapter): the embedding, the LM head and every dense linear weight the adapter leaves
//! frozen are held in 2 bytes per weight and computed in f32. Each use casts the weight to
//! f32 for one matmul; the training graph keeps the half weight, not the f32 copy, and casts
//! it again in the backward pass (as the NF4 weights are dequantised again), so the f32 copy
//! of a layer lives only while that layer computes. Activations, adapters, gradients and
//! optimizer state stay f32, which is what PEFT users get from a bf16 base with f32
//! adapters and autocast.

use std::any::Any;

use anyhow::{bail, Result};
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{CheckpointStrategy, NoCheckpointing};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::{DType, FloatDType, TensorPrimitive};

/// The storage dtype `[model] dtype` names: None for float32.
pub fn storage_dtype(name: &str) -> Result<Option<FloatDType>> {
    match name {
        "float32" => Ok(None),
        "bfloat16" => Ok(Some(FloatDType::BF16)),
        "float16" => Ok(Some(FloatDType::F16)),
        other => bail!("[model] dtype `{other}`: expected float32, bfloat16 or float16"),
    }
}

pub fn is_half(dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16)
}

/// `t` in f32 (itself when it already is).
pub fn as_f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    if is_half(t.dtype()) {
        t.cast(FloatDType::F32)
    } else {
        t
    }
}

/// `x @ w` (`w` `[d_in, d_out]`) for a frozen half-precision `w`, computed in f32. On the
/// autodiff backends this crate trains with, the f32 copy of `w` is not kept for the
/// backward: the half weight is, and it is cast again there.
pub fn half_matmul<B: Backend>(x: Tensor<B, 2>, w: &Tensor<B, 2>) -> Tensor<B, 2> {
    let x = match on_autodiff::<B, crate::backend::Cpu>(x, w) {
        Ok(y) => return y,
        Err(x) => x,
    };
    #[cfg(feature = "cuda")]
    let x = match on_autodiff::<B, crate::backend::Gpu>(x, w) {
        Ok(y) => return y,
        Err(x) => x,
    };
    if let Some(y) = few_rows_on_cpu(&x, w) {
        return y;
    }
    x.matmul(as_f32(w.clone()))
}

/// Decoding on the CPU backend (a few rows against a large half weight): burn-flex reads
/// the weight in its own 2 bytes per element instead of casting all of it to f32 first (a
/// whole-model cast per generated token).
fn few_rows_on_cpu<B: Backend>(x: &Tensor<B, 2>, w: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
    let x = (x as &dyn Any).downcast_ref::<Tensor<crate::backend::Cpu, 2>>()?;
    let w = (w as &dyn Any).downcast_ref::<Tensor<crate::backend::Cpu, 2>>()?;
    let (x, w) = (
        x.clone().into_primitive().tensor(),
        w.clone().into_primitive().tensor(),
    );
    let y = burn::backend::flex::ops::matmul::matmul_half_rhs(&x, &w)?;
    let y: Box<dyn Any> = Box::new(Tensor::<crate::backend::Cpu, 2>::from_primitive(
        TensorPrimitive::Float(y),
    ));
    Some(*y.downcast::<Tensor<B, 2>>().expect("same backend"))
}

fn on_autodiff<B: Backend, I: Backend>(
    x: Tensor<B, 2>,
    w: &Tensor<B, 2>,
) -> std::result::Result<Tensor<B, 2>, Tensor<B, 2>> {
    let x = match with_strategy::<B, I, NoCheckpointing>(x, w) {
        Ok(y) => return Ok(y),
        Err(x) => x,
    };
    with_strategy::<B, I, crate::backend::Checkpointing>(x, w)
}

fn with_strategy<B: Backend, I: Backend, C: CheckpointStrategy>(
    x: Tensor<B, 2>,
    w: &Tensor<B, 2>,
) -> std::result::Result<Tensor<B, 2>, Tensor<B, 2>> {
    let boxed: Box<dyn Any> = Box::new(x);
    match boxed.downcast::<Tensor<Autodiff<I, C>, 2>>() {
        Ok(x) => {
            let w = (w as &dyn Any)
                .downcast_ref::<Tensor<Autodiff<I, C>, 2>>()
                .expect("the weight lives on the input's backend");
            let y: Box<dyn Any> = Box::new(recasting_matmul(*x, w.clone()));
            Ok(*y.downcast::<Tensor<B, 2>>().expect("same backend"))
        }
        Err(boxed) => Err(*boxed
            .downcast::<Tensor<B, 2>>()
            .expect("the input is unchanged")),
    }
}

#[derive(Debug)]
struct RecastMatmulBackward;

impl<B: Backend> Backward<B, 1> for RecastMatmulBackward {
    /// The half weight `[d_in, d_out]`.
    type State = Tensor<B, 2>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let w = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            // d(x W)/dx = grad @ W^T.
            let w = as_f32(w).transpose().into_primitive().tensor();
            B::float_matmul(grad, w)
        });
    }
}

fn recasting_matmul<I: Backend, C: CheckpointStrategy>(
    x: Tensor<Autodiff<I, C>, 2>,
    w: Tensor<Autodiff<I, C>, 2>,
) -> Tensor<Autodiff<I, C>, 2> {
    let inner_w = w.inner();
    let x = x.into_primitive().tensor();
    let w32 = as_f32(inner_w.clone()).into_primitive().tensor();
    let out = I::float_matmul(x.primitive, w32);
    let out = match RecastMatmulBackward
        .prepare::<C>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(inner_w, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{CpuTrain, CpuTrainCheckpointed};
    use burn::tensor::backend::AutodiffBackend;

    use crate::test_values::values;

    /// Output and input gradient of `sum(probe * x W)`, W stored in `dtype`.
    fn run<B: AutodiffBackend>(dtype: FloatDType, recasting: bool) -> (Vec<f32>, Vec<f32>) {
        let device = Default::default();
        let (n, d_in, d_out) = (5, 24, 7);
        let x = Tensor::<B, 2>::from_data(TensorData::new(values(n * d_in, 1), [n, d_in]), &device)
            .require_grad();
        let w = Tensor::<B, 2>::from_data(
            TensorData::new(values(d_in * d_out, 2), [d_in, d_out]),
            &device,
        )
        .cast(dtype);
        let probe =
            Tensor::<B, 2>::from_data(TensorData::new(values(n * d_out, 3), [n, d_out]), &device);
        let y = if recasting {
            half_matmul(x.clone(), &w)
        } else {
            x.clone().matmul(w.cast(FloatDType::F32))
        };
        let out: Vec<f32> = y.to_data().iter::<f32>().collect();
        let grads = (y * probe).sum().backward();
        let g = x.grad(&grads).unwrap().to_data().iter::<f32>().collect();
        (out, g)
    }

    #[test]
    fn recasting_matmul_equals_the_plain_cast_matmul() {
        for dtype in [FloatDType::BF16, FloatDType::F16] {
            let reference = run::<CpuTrain>(dtype, false);
            for got in [
                run::<CpuTrain>(dtype, true),
                run::<CpuTrainCheckpointed>(dtype, true),
            ] {
                assert_eq!(got, reference);
            }
        }
    }

    #[test]
    fn storage_dtypes_parse_and_others_are_refused() {
        assert_eq!(storage_dtype("float32").unwrap(), None);
        assert_eq!(storage_dtype("bfloat16").unwrap(), Some(FloatDType::BF16));
        assert_eq!(storage_dtype("float16").unwrap(), Some(FloatDType::F16));
        let err = storage_dtype("int8").unwrap_err().to_string();
        assert!(err.contains("float32, bfloat16 or float16"), "{err}");
    }
}
