//! AdamW with PyTorch's exact update, weight decay only on matrices (norm weights and biases
//! are exempt, as in HF Trainer), global-norm gradient clipping, and state saved by
//! parameter path so a resumed run continues bit for bit.
//!
//! burn's AdamW decays every parameter alike, clips per tensor, defaults to other
//! epsilons and keys its state by random parameter ids; none of that fits here.

use anyhow::{bail, Result};
use burn::module::{ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use std::collections::{BTreeMap, HashMap};

use checkpoints::tensors::NamedTensor;
use models::weights::TensorToWrite;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWSettings {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

struct Moments<B: Backend> {
    /// Flattened first and second moments (`exp_avg`, `exp_avg_sq`).
    m: Tensor<B, 1>,
    v: Tensor<B, 1>,
}

pub struct AdamW<B: AutodiffBackend> {
    pub settings: AdamWSettings,
    /// Optimizer steps taken (PyTorch's `state["step"]`).
    pub step: u64,
    state: HashMap<ParamId, Moments<B::InnerBackend>>,
}

/// Trainable parameters with their module paths (`layers.0.self_attn.q_proj.weight`).
pub fn trainable_params<B: Backend, M: Module<B>>(model: &M) -> Vec<(ParamId, String, Vec<usize>)> {
    struct Paths {
        stack: Vec<String>,
        out: Vec<(ParamId, String, Vec<usize>)>,
    }
    impl<B: Backend> ModuleVisitor<B> for Paths {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.stack.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.stack.pop();
        }
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            if p.is_require_grad() {
                self.out
                    .push((p.id, self.stack.join("."), p.val().dims().to_vec()));
            }
        }
    }
    let mut v = Paths {
        stack: vec![],
        out: vec![],
    };
    model.visit(&mut v);
    v.out
}

/// Global L2 norm of all gradients, as `torch.nn.utils.clip_grad_norm_` computes it.
pub fn global_grad_norm<B: AutodiffBackend, M: Module<B>>(
    model: &M,
    grads: &GradientsParams,
) -> f64 {
    struct SumSq<'a, B: AutodiffBackend> {
        grads: &'a GradientsParams,
        acc: Option<Tensor<B::InnerBackend, 1>>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for SumSq<'_, B> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.get::<B::InnerBackend, D>(p.id) {
                let s = g.square().sum();
                self.acc = Some(match self.acc.take() {
                    Some(a) => a + s,
                    None => s,
                });
            }
        }
    }
    let mut v = SumSq::<B> { grads, acc: None };
    model.visit(&mut v);
    match v.acc {
        Some(a) => a.sqrt().into_scalar().elem::<f64>(),
        None => 0.0,
    }
}

impl<B: AutodiffBackend> AdamW<B> {
    pub fn new(settings: AdamWSettings) -> Self {
        Self {
            settings,
            step: 0,
            state: HashMap::new(),
        }
    }

    /// One update with learning rate `lr`, gradients multiplied by `grad_scale` first
    /// (the clipping coefficient).
    pub fn step<M: Module<B>>(
        &mut self,
        model: M,
        grads: GradientsParams,
        lr: f64,
        grad_scale: f64,
    ) -> M {
        self.step += 1;
        let t = self.step as i32;
        let bias1 = 1.0 - self.settings.beta1.powi(t);
        let bias2 = 1.0 - self.settings.beta2.powi(t);
        model.map(&mut StepMapper {
            opt: self,
            grads,
            lr,
            grad_scale,
            bias1,
            bias2,
        })
    }

    /// Moments by parameter path, for a checkpoint; each is copied to the host only when
    /// its bytes are written, so saving never holds a second copy of the whole state.
    pub fn state_tensors<M: Module<B>>(&self, model: &M) -> Vec<TensorToWrite<'_>> {
        let mut out = Vec::new();
        for (id, path, shape) in trainable_params::<B, M>(model) {
            if let Some(s) = self.state.get(&id) {
                for (suffix, t) in [("exp_avg", &s.m), ("exp_avg_sq", &s.v)] {
                    out.push(TensorToWrite {
                        name: format!("{path}.{suffix}"),
                        shape: shape.clone(),
                        values: Box::new(move || {
                            t.clone()
                                .into_data()
                                .convert::<f32>()
                                .to_vec()
                                .expect("f32")
                        }),
                    });
                }
            }
        }
        out
    }

    pub fn state_metadata(&self) -> BTreeMap<String, String> {
        [("step".to_string(), self.step.to_string())].into()
    }

    /// Restore moments saved by [`Self::state_tensors`] onto the parameters of `model`.
    pub fn load_state<M: Module<B>>(
        &mut self,
        model: &M,
        step: u64,
        mut saved: HashMap<String, NamedTensor>,
    ) -> Result<()> {
        self.step = step;
        self.state.clear();
        let device = model
            .devices()
            .into_iter()
            .next()
            .expect("a model lives on a device");
        for (id, path, shape) in trainable_params::<B, M>(model) {
            let (Some(m), Some(v)) = (
                saved.remove(&format!("{path}.exp_avg")),
                saved.remove(&format!("{path}.exp_avg_sq")),
            ) else {
                if step > 0 {
                    bail!("optimizer state has no moments for `{path}`: the checkpoint belongs to another model or adapter setup");
                }
                continue;
            };
            if m.shape != shape || v.shape != shape {
                bail!(
                    "optimizer state for `{path}` has shape {:?}, the parameter {shape:?}",
                    m.shape
                );
            }
            let n = m.values.len();
            let load = |x: Vec<f32>| {
                Tensor::<B::InnerBackend, 1>::from_data(TensorData::new(x, [n]), &device)
            };
            self.state.insert(
                id,
                Moments {
                    m: load(m.values),
                    v: load(v.values),
                },
            );
        }
        if let Some(extra) = saved.keys().next() {
            bail!(
                "optimizer state has `{extra}`, which matches no trainable parameter of this model"
            );
        }
        Ok(())
    }

    /// Updates taken (bias correction counts them).
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Parameters holding optimizer state (only trainable ones ever do).
    pub fn num_states(&self) -> usize {
        self.state.len()
    }
}

struct StepMapper<'a, B: AutodiffBackend> {
    opt: &'a mut AdamW<B>,
    grads: GradientsParams,
    lr: f64,
    grad_scale: f64,
    bias1: f64,
    bias2: f64,
}

impl<B: AutodiffBackend> ModuleMapper<B> for StepMapper<'_, B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.remove::<B::InnerBackend, D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let s = self.opt.settings;
        let require_grad = tensor.is_require_grad();
        let p = tensor.inner();
        let dims = p.dims();
        let n: usize = dims.iter().product();
        let p = p.reshape([n]);
        let g = grad.reshape([n]);
        let g = if self.grad_scale != 1.0 {
            g.mul_scalar(self.grad_scale)
        } else {
            g
        };
        // torch.optim.AdamW: decoupled decay first, then the Adam step.
        let p = if s.weight_decay > 0.0 && D >= 2 {
            p.mul_scalar(1.0 - self.lr * s.weight_decay)
        } else {
            p
        };
        let (m, v) = match self.opt.state.remove(&id) {
            Some(st) => (st.m, st.v),
            None => (g.zeros_like(), g.zeros_like()),
        };
        let m = m.mul_scalar(s.beta1) + g.clone().mul_scalar(1.0 - s.beta1);
        let v = v.mul_scalar(s.beta2) + g.square().mul_scalar(1.0 - s.beta2);
        let denom = v
            .clone()
            .sqrt()
            .div_scalar(self.bias2.sqrt())
            .add_scalar(s.eps);
        let p = p - m.clone().div(denom).mul_scalar(self.lr / self.bias1);
        self.opt.state.insert(id, Moments { m, v });
        let mut t = Tensor::<B, D>::from_inner(p.reshape(dims));
        if require_grad {
            t = t.require_grad();
        }
        Param::from_mapped_value(id, t, mapper)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use models::backend::CpuTrain;

    #[derive(Module, Debug)]
    struct Toy<B: Backend> {
        w: Param<Tensor<B, 2>>,
        b: Param<Tensor<B, 1>>,
    }

    /// Reference values from torch.optim.AdamW(lr=0.1, betas=(0.9, 0.99), eps=1e-8,
    /// weight_decay=0.5) on a parameter group with decay for `w` and none for `b`,
    /// loss = sum(w * c) + sum(b * d), three steps (see scripts/parity/adamw_reference.py).
    #[test]
    fn adamw_matches_torch() {
        let dev = Default::default();
        let toy = Toy::<CpuTrain> {
            w: Param::from_tensor(Tensor::from_floats([[1.0, -2.0], [0.5, 3.0]], &dev)),
            b: Param::from_tensor(Tensor::from_floats([0.25, -0.75], &dev)),
        };
        let c = Tensor::<CpuTrain, 2>::from_floats([[0.3, -1.0], [2.0, 0.1]], &dev);
        let d = Tensor::<CpuTrain, 1>::from_floats([-0.5, 4.0], &dev);
        let mut opt = AdamW::<CpuTrain>::new(AdamWSettings {
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.5,
        });
        let mut toy = toy;
        for step in 0..3 {
            let scale = (step + 1) as f32;
            let loss = (toy.w.val() * c.clone().mul_scalar(scale)).sum()
                + (toy.b.val() * d.clone()).powf_scalar(2.0).sum();
            let grads = GradientsParams::from_grads(loss.backward(), &toy);
            toy = opt.step(toy, grads, 0.1, 1.0);
        }
        let w: Vec<f32> = toy.w.val().into_data().to_vec().unwrap();
        let b: Vec<f32> = toy.b.val().into_data().to_vec().unwrap();
        let expected_w = REFERENCE_W;
        let expected_b = REFERENCE_B;
        for (x, y) in w.iter().zip(expected_w).chain(b.iter().zip(expected_b)) {
            assert!((*x as f64 - y).abs() < 1e-6, "{w:?} {b:?}");
        }
        assert_eq!(opt.num_states(), 2);
    }

    // Printed by scripts/parity/adamw_reference.py (torch 2.x).
    const REFERENCE_W: [f64; 4] = [0.58000344, -1.43737841, 0.151315957, 2.29475355];
    const REFERENCE_B: [f64; 2] = [-0.0305538028, -0.452335536];
}
