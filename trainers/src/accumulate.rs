//! One optimizer step's gradients, accumulated over its micro-batches so that they do not
//! depend on how the step was split.

use anyhow::{bail, Result};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use std::time::Instant;

use models::CausalLm;

use crate::method::Method;

/// The summed gradients of one optimizer step and what it measured.
pub struct StepGradients {
    pub grads: GradientsParams,
    /// Loss of the whole accumulated batch (sum over micro-batches of sum / total weight).
    pub loss: f64,
    pub metric_sums: Vec<(&'static str, f64)>,
    pub tokens: usize,
    pub total_weight: f64,
    /// The first micro-batch (1-based) whose loss was NaN/Inf, and that value; the
    /// gradients are then incomplete and must not be applied.
    pub non_finite: Option<(usize, f64)>,
    /// Wall seconds in the loss forward passes and in the backward passes (this rank's).
    pub forward_s: f64,
    pub backward_s: f64,
}

/// Backward through every micro-batch, each loss divided by the weight of the *whole*
/// accumulated batch: the summed gradients then equal those of one big batch however it is
/// split (averaging per-micro-batch means, the usual bug, weighs short batches' tokens more).
pub fn accumulate_gradients<B: AutodiffBackend, M: Method<B>>(
    model: &CausalLm<B>,
    method: &M,
    batches: &[M::Batch],
) -> Result<StepGradients> {
    accumulate_gradients_over(model, method, batches, step_weight(method, batches)?)
}

/// What a step's losses are divided by: the weight of all its micro-batches.
pub fn step_weight<B: AutodiffBackend, M: Method<B>>(
    method: &M,
    batches: &[M::Batch],
) -> Result<f64> {
    let total_weight: f64 = batches.iter().map(|b| method.weight(b)).sum();
    if total_weight <= 0.0 {
        bail!("the batch has nothing to train on (zero loss weight)");
    }
    Ok(total_weight)
}

/// [`accumulate_gradients`] over some of a step's micro-batches, each loss divided by
/// `total_weight`, the weight of the whole step (a data-parallel rank's share of it).
pub fn accumulate_gradients_over<B: AutodiffBackend, M: Method<B>>(
    model: &CausalLm<B>,
    method: &M,
    batches: &[M::Batch],
    total_weight: f64,
) -> Result<StepGradients> {
    let mut acc = GradientsAccumulator::<CausalLm<B>>::new();
    let mut out = StepGradients {
        grads: GradientsParams::new(),
        loss: 0.0,
        metric_sums: vec![],
        tokens: 0,
        total_weight,
        non_finite: None,
        forward_s: 0.0,
        backward_s: 0.0,
    };
    for (i, b) in batches.iter().enumerate() {
        out.tokens += method.tokens(b);
        let t0 = Instant::now();
        let o = loss_with_router_balance(model, method, b);
        let l = o.loss_sum.div_scalar(total_weight);
        let value = l.clone().into_scalar().elem::<f64>();
        out.forward_s += t0.elapsed().as_secs_f64();
        if !value.is_finite() {
            out.non_finite = Some((i + 1, value));
            return Ok(out);
        }
        out.loss += value;
        accumulate_metrics(&mut out.metric_sums, &o.metric_sums);
        let t0 = Instant::now();
        acc.accumulate(model, GradientsParams::from_grads(l.backward(), model));
        out.backward_s += t0.elapsed().as_secs_f64();
    }
    out.grads = acc.grads();
    Ok(out)
}

/// The method's loss of one micro-batch, plus, for a mixture of experts trained with it,
/// the router's load-balancing loss of the policy's forward passes (weighted by the
/// micro-batch's weight, so that the step's loss adds its weighted mean, as transformers adds
/// it once per forward), logged as `router_aux_loss`.
fn loss_with_router_balance<B: AutodiffBackend, M: Method<B>>(
    model: &CausalLm<B>,
    method: &M,
    batch: &M::Batch,
) -> crate::method::LossOutput<B> {
    let Some(coef) = model.router_aux_loss_coef else {
        return method.loss(model, batch);
    };
    let (mut o, routing) = models::router_loss::collecting::<B, _>(|| method.loss(model, batch));
    if let Some(aux) = routing.value() {
        let weight = method.weight(batch);
        let value = aux.clone().into_scalar().elem::<f64>();
        o.loss_sum = o.loss_sum + aux.mul_scalar(coef * weight);
        o.metric_sums.push(("router_aux_loss", value * weight));
    }
    o
}

pub(crate) fn accumulate_metrics(into: &mut Vec<(&'static str, f64)>, add: &[(&'static str, f64)]) {
    for (k, v) in add {
        match into.iter_mut().find(|(n, _)| n == k) {
            Some(e) => e.1 += v,
            None => into.push((k, *v)),
        }
    }
}
