//! The data-parallel step: each rank backpropagates its share of the step's micro-batches,
//! then one all-reduce sums the gradients together with what the loop logs and decides.
//!
//! Every rank builds the whole global step (the method's cursor therefore stays per global
//! batch, and resume is exact) and trains on a contiguous share of its micro-batches. Each
//! micro-batch's loss is divided by the weight of the *whole* global step, as the
//! single-device loop divides by the weight of its whole accumulated batch, so the summed
//! gradients are the single-device gradients of the same global batch, up to the order of
//! the additions. Clipping and AdamW then run identically on every rank.

use anyhow::{bail, Result};
use burn::module::{ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, FloatDType};

use models::CausalLm;

use super::replica::Replica;
use crate::accumulate::StepGradients;
use crate::replicas::Replicas;

/// Metric sums one step can carry across ranks.
const MAX_METRICS: usize = 32;

/// The micro-batches `lo..hi` of `n` that `rank` of `world` trains on: contiguous, sizes
/// differing by at most one (the first ranks take the extra ones).
pub fn shard_range(n: usize, rank: usize, world: usize) -> (usize, usize) {
    let (base, extra) = (n / world, n % world);
    let lo = rank * base + rank.min(extra);
    (lo, lo + base + usize::from(rank < extra))
}

/// Flattened trainable gradients in visiting order, with one presence flag per parameter
/// (a parameter the loss does not reach has no gradient, and must get none after the sum).
/// They travel as f32 (a bf16 model's gradients are summed in f32) and come back in the
/// parameter's dtype.
struct FlattenGrads<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    device: B::Device,
    parts: Vec<Tensor<B::InnerBackend, 1>>,
    present: Vec<f32>,
    dtypes: Vec<DType>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for FlattenGrads<'_, B> {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
        if !p.is_require_grad() {
            return;
        }
        let n: usize = p.shape().num_elements();
        match self.grads.get::<B::InnerBackend, D>(p.id) {
            Some(g) => {
                self.dtypes.push(g.dtype());
                self.parts.push(g.reshape([n]).cast(FloatDType::F32));
                self.present.push(1.0);
            }
            None => {
                self.dtypes.push(p.val().dtype());
                self.parts.push(Tensor::zeros([n], &self.device));
                self.present.push(0.0);
            }
        }
    }
}

/// The reverse: slices of the summed vector become the gradients of the parameters that
/// had one on some rank.
struct UnflattenGrads<'a, B: AutodiffBackend> {
    flat: Tensor<B::InnerBackend, 1>,
    present: &'a [f32],
    dtypes: &'a [DType],
    offset: usize,
    index: usize,
    out: GradientsParams,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for UnflattenGrads<'_, B> {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
        if !p.is_require_grad() {
            return;
        }
        let shape = p.shape();
        let n = shape.num_elements();
        if self.present[self.index] > 0.0 {
            let g = self
                .flat
                .clone()
                .slice(self.offset..self.offset + n)
                .reshape(shape)
                .cast(self.dtypes[self.index]);
            self.out.register::<B::InnerBackend, D>(p.id, g);
        }
        self.offset += n;
        self.index += 1;
    }
}

/// Trainable parameter values, flattened in visiting order.
struct FlattenParams<B: AutodiffBackend> {
    parts: Vec<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for FlattenParams<B> {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
        if p.is_require_grad() {
            let v = p.val().inner();
            let n = v.shape().num_elements();
            self.parts.push(v.reshape([n]).cast(FloatDType::F32));
        }
    }
}

/// Overwrite trainable parameter values with slices of `flat` (ids and trainability kept).
struct AssignParams<B: AutodiffBackend> {
    flat: Tensor<B::InnerBackend, 1>,
    offset: usize,
}

impl<B: AutodiffBackend> ModuleMapper<B> for AssignParams<B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        if !param.is_require_grad() {
            return param;
        }
        let (id, tensor, mapper) = param.consume();
        let (shape, dtype) = (tensor.shape(), tensor.dtype());
        let n = shape.num_elements();
        let v = self
            .flat
            .clone()
            .slice(self.offset..self.offset + n)
            .reshape(shape)
            .cast(dtype);
        self.offset += n;
        let t = Tensor::<B, D>::from_inner(v).require_grad();
        Param::from_mapped_value(id, t, mapper)
    }
}

fn scalars<B: Backend>(values: Vec<f32>, device: &B::Device) -> Tensor<B, 1> {
    let n = values.len();
    Tensor::from_data(TensorData::new(values, [n]), device)
}

fn host(t: Tensor<impl Backend, 1>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().expect("f32 values")
}

/// Tokens as two exactly summable f32 parts (low 12 bits, the rest).
fn split_count(n: usize) -> [f32; 2] {
    [(n & 0xfff) as f32, (n >> 12) as f32]
}

fn join_count(parts: &[f32]) -> usize {
    parts[0].round() as usize + ((parts[1].round() as usize) << 12)
}

impl<B: AutodiffBackend> Replicas<B> for Replica {
    fn is_main(&self) -> bool {
        Replica::is_main(self)
    }

    fn world(&self) -> usize {
        self.world
    }

    fn setup_barrier(&mut self, device: &B::Device) -> Result<()> {
        self.barrier::<B::InnerBackend>("setup", device, self.timeouts.setup)
    }

    fn stop_agreed(&self) -> bool {
        Replica::stop_agreed(self)
    }

    /// Make every replica's trainable weights rank 0's (a sum where the others add zeros),
    /// before the first step. Replicas load the same files, so this changes nothing unless
    /// something drew differently; it also waits for every rank to be ready.
    fn sync_params(&mut self, model: CausalLm<B>) -> Result<CausalLm<B>> {
        let mut v = FlattenParams::<B> { parts: vec![] };
        model.visit(&mut v);
        if v.parts.is_empty() {
            return Ok(model);
        }
        let mut flat = Tensor::cat(v.parts, 0);
        if !self.is_main() {
            flat = flat.zeros_like();
        }
        let flat = self.all_reduce_sum(flat, "all_reduce(weights)", self.timeouts.setup)?;
        Ok(model.map(&mut AssignParams::<B> { flat, offset: 0 }))
    }

    /// Contiguous shares, and each rank draws its own dropout masks.
    fn share(&mut self, n: usize, step: u64, step_seed: u64) -> (usize, usize) {
        self.step = step + 1;
        models::lora::reseed_dropout(
            step_seed ^ (self.rank as u64).wrapping_mul(0xA24B_AED4_963E_E407),
        );
        shard_range(n, self.rank, self.world)
    }

    fn combine(
        &mut self,
        model: &CausalLm<B>,
        local: StepGradients,
        lo: usize,
        stop_requested: bool,
    ) -> Result<StepGradients> {
        if local.metric_sums.len() > MAX_METRICS {
            bail!(
                "the method logs {} metrics; data-parallel steps carry at most {MAX_METRICS}",
                local.metric_sums.len()
            );
        }
        self.maybe_fail(self.step);

        let device = model.device();
        let mut flat = FlattenGrads::<B> {
            grads: &local.grads,
            device: device.clone(),
            parts: vec![],
            present: vec![],
            dtypes: vec![],
        };
        model.visit(&mut flat);
        let n_params = flat.present.len();
        let flat_dtypes = flat.dtypes.clone();
        // Scalars: [presence per parameter][loss, stop, tokens lo, tokens hi]
        // [failed micro-batch + 1, per rank][metric sums].
        let mut extra = flat.present.clone();
        // A non-finite loss travels as the loss itself, so the sum is non-finite too.
        extra.push(match local.non_finite {
            Some((_, value)) => value as f32,
            None => local.loss as f32,
        });
        extra.push(if stop_requested { 1.0 } else { 0.0 });
        extra.extend(split_count(local.tokens));
        let mut failed = vec![0.0f32; self.world];
        if let Some((i, _)) = local.non_finite {
            failed[self.rank] = (lo + i) as f32;
        }
        extra.extend(failed);
        let mut metrics = vec![0.0f32; MAX_METRICS];
        for (slot, (_, v)) in metrics.iter_mut().zip(&local.metric_sums) {
            *slot = *v as f32;
        }
        extra.extend(metrics);
        let n_extra = extra.len();
        let mut parts = flat.parts;
        parts.push(scalars::<B::InnerBackend>(extra, &device));
        let flat = Tensor::cat(parts, 0);
        let started = std::time::Instant::now();
        let summed = self.all_reduce_sum(flat, "all_reduce(gradients)", self.timeouts.step)?;
        self.gradient_sync_time += started.elapsed();
        self.gradient_syncs += 1;

        let total = summed.dims()[0];
        let extra = host(summed.clone().slice(total - n_extra..total));
        let (present, rest) = extra.split_at(n_params);
        let loss = rest[0] as f64;
        self.set_stop_agreed(rest[1] > 0.0);
        let tokens = join_count(&rest[2..4]);
        let failed = &rest[4..4 + self.world];
        let metric_values = &rest[4 + self.world..];
        let mut unflat = UnflattenGrads::<B> {
            flat: summed,
            present,
            dtypes: &flat_dtypes,
            offset: 0,
            index: 0,
            out: GradientsParams::new(),
        };
        model.visit(&mut unflat);
        // Metric names: rank 0 always has micro-batches (it takes the first share).
        let metric_sums = local
            .metric_sums
            .iter()
            .zip(metric_values)
            .map(|((k, _), v)| (*k, *v as f64))
            .collect();
        let non_finite = failed
            .iter()
            .filter(|v| **v > 0.0)
            .map(|v| v.round() as usize)
            .min()
            .map(|i| (i, loss));
        Ok(StepGradients {
            grads: unflat.out,
            loss,
            metric_sums,
            tokens,
            total_weight: local.total_weight,
            non_finite,
            forward_s: local.forward_s,
            backward_s: local.backward_s,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_step_in_order() {
        for n in 0..9 {
            for world in 1..5 {
                let mut next = 0;
                for r in 0..world {
                    let (lo, hi) = shard_range(n, r, world);
                    assert_eq!(lo, next);
                    assert!(hi - lo <= n.div_ceil(world));
                    next = hi;
                }
                assert_eq!(next, n);
            }
        }
    }

    #[test]
    fn token_counts_survive_f32_sums() {
        let counts = [0usize, 1, 4095, 4096, 123_456_789, 3_000_000_000];
        for a in counts {
            for b in counts {
                let (x, y) = (split_count(a), split_count(b));
                assert_eq!(join_count(&[x[0] + y[0], x[1] + y[1]]), a + b);
            }
        }
    }
}
