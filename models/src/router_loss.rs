//! The load-balancing loss of a mixture of experts, as transformers'
//! `load_balancing_loss_func` computes it (Switch Transformer, eq. 4-6):
//! `experts * sum_e f_e * P_e`, with `f_e` the share of the (token, top-k slot) routings
//! that went to expert `e` and `P_e` its mean router probability, both taken over the real
//! (non-padding) tokens of every MoE layer together. `f` is a count and takes no gradient;
//! the loss trains the router (and what feeds it) through `P`.
//!
//! The layers' routings reach it through a collector armed around one loss computation
//! ([`collecting`]): the shared training loop arms it around each micro-batch's loss, so
//! every method (SFT, DPO, GRPO, distillation...) gets the term without threading it through
//! its own forward passes. Only forward passes on the collecting backend are recorded:
//! references and teachers run on the inner backend (`valid()`) and are not.

use std::any::Any;
use std::cell::RefCell;

use burn::prelude::*;

use crate::moe::Routing;

thread_local! {
    static COLLECTOR: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
}

/// One MoE layer's routing over the real tokens of one forward pass.
pub struct LayerRouting<B: Backend> {
    /// `[experts]`: router probabilities summed over the real tokens.
    probs: Tensor<B, 1>,
    /// Routings of real tokens to each expert.
    counts: Vec<f64>,
    tokens: f64,
}

/// The routings recorded while [`collecting`].
pub struct RouterLoss<B: Backend> {
    layers: Vec<LayerRouting<B>>,
}

impl<B: Backend> RouterLoss<B> {
    /// MoE layers recorded (one per layer per forward pass).
    pub fn layers(&self) -> usize {
        self.layers.len()
    }

    /// Routings of real tokens to each expert, summed over the recorded layers.
    pub fn expert_counts(&self) -> Vec<f64> {
        let experts = self.layers.first().map_or(0, |l| l.counts.len());
        let mut counts = vec![0.0; experts];
        for l in &self.layers {
            for (c, x) in counts.iter_mut().zip(&l.counts) {
                *c += x;
            }
        }
        counts
    }

    /// The loss, `[1]`; None when no MoE layer ran.
    pub fn value(self) -> Option<Tensor<B, 1>> {
        let first = self.layers.first()?;
        let device = first.probs.device();
        let experts = first.counts.len();
        let rows: f64 = self.layers.iter().map(|l| l.tokens).sum();
        if rows == 0.0 {
            return Some(Tensor::zeros([1], &device));
        }
        let shares: Vec<f32> = self
            .expert_counts()
            .iter()
            .map(|c| (c / rows) as f32)
            .collect();
        let shares = Tensor::<B, 1>::from_data(TensorData::new(shares, [experts]), &device);
        let probs = self
            .layers
            .into_iter()
            .map(|l| l.probs)
            .reduce(|a, b| a + b)
            .expect("one layer at least");
        Some((probs * shares).sum().mul_scalar(experts as f64 / rows))
    }
}

/// Restores the collector that was armed before (none, usually), also on unwinding.
struct Armed(Option<Option<Box<dyn Any>>>);

impl Drop for Armed {
    fn drop(&mut self) {
        if let Some(previous) = self.0.take() {
            COLLECTOR.with(|c| *c.borrow_mut() = previous);
        }
    }
}

/// Run `f`, recording the routing of every MoE layer that runs on backend `B` meanwhile.
pub fn collecting<B: Backend, R>(f: impl FnOnce() -> R) -> (R, RouterLoss<B>) {
    let fresh: Box<dyn Any> = Box::new(Vec::<LayerRouting<B>>::new());
    let mut armed = Armed(Some(COLLECTOR.with(|c| c.borrow_mut().replace(fresh))));
    let out = f();
    let previous = armed.0.take().expect("armed until here");
    let recorded = COLLECTOR.with(|c| std::mem::replace(&mut *c.borrow_mut(), previous));
    let layers = recorded
        .and_then(|b| b.downcast::<Vec<LayerRouting<B>>>().ok())
        .map_or_else(Vec::new, |b| *b);
    (out, RouterLoss { layers })
}

/// Whether routings on backend `B` are being collected (else the forward pass drops them
/// at once).
pub(crate) fn recording<B: Backend>() -> bool {
    COLLECTOR.with(|c| {
        c.borrow()
            .as_ref()
            .is_some_and(|b| b.is::<Vec<LayerRouting<B>>>())
    })
}

/// Record a forward pass's routings; `real[i]` says whether flattened token `i` is a real
/// token (padding is left out, as transformers leaves out `attention_mask == 0`).
pub(crate) fn record<B: Backend>(routings: Vec<Routing<B>>, real: &[bool]) {
    if routings.is_empty() || !recording::<B>() {
        return;
    }
    let n = routings[0].probs.dims()[0];
    // Every token counts when the input did not say which are padding.
    let all = vec![true; n];
    let real = if real.len() == n { real } else { &all };
    let tokens = real.iter().filter(|&&r| r).count();
    let mask = (tokens < n).then(|| {
        let m: Vec<f32> = real.iter().map(|&r| f32::from(u8::from(r))).collect();
        let device = routings[0].probs.device();
        Tensor::<B, 2>::from_data(TensorData::new(m, [n, 1]), &device)
    });
    let layers: Vec<LayerRouting<B>> = routings
        .into_iter()
        .map(|r| {
            let experts = r.probs.dims()[1];
            let k = r.chosen.len() / n.max(1);
            let mut counts = vec![0.0; experts];
            for (i, &e) in r.chosen.iter().enumerate() {
                if real[i / k] {
                    counts[e] += 1.0;
                }
            }
            let probs = match &mask {
                Some(m) => r.probs * m.clone(),
                None => r.probs,
            };
            LayerRouting {
                probs: probs.sum_dim(0).reshape([experts]),
                counts,
                tokens: tokens as f64,
            }
        })
        .collect();
    COLLECTOR.with(|c| {
        if let Some(v) = c
            .borrow_mut()
            .as_mut()
            .and_then(|b| b.downcast_mut::<Vec<LayerRouting<B>>>())
        {
            v.extend(layers);
        }
    });
}
