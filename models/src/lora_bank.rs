//! Several LoRA adapters served over one base model, each row of a batch routed to its own
//! (vLLM's multi-LoRA): per projection the adapters' `A` and `B` are stacked, entry 0 all
//! zeros for the base model, and a batch gathers one pair per row for two batched products.

use anyhow::{bail, Result};
use burn::prelude::*;

use crate::llama::CausalLm;

#[derive(Module, Debug)]
pub struct LoraBank<B: Backend> {
    /// `[adapters + 1, d_in, r_max]`; ranks below `r_max` are padded with zero columns.
    a: Tensor<B, 3>,
    /// `[adapters + 1, r_max, d_out]`, each adapter's scale folded in.
    b: Tensor<B, 3>,
    /// Adapter of each row of the batches that follow, `[rows]`.
    route: Option<Tensor<B, 1, Int>>,
}

impl<B: Backend> LoraBank<B> {
    /// The routed adapters' update for `x: [rows, T, d_in]`.
    pub fn delta(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let rows = x.dims()[0];
        let route = match &self.route {
            Some(r) if r.dims()[0] == rows => r.clone(),
            // Unrouted rows use the base model.
            _ => Tensor::zeros([rows], &x.device()),
        };
        let a = self.a.clone().select(0, route.clone());
        let b = self.b.clone().select(0, route);
        x.matmul(a).matmul(b)
    }
}

impl<B: Backend> CausalLm<B> {
    /// Serve `adapters` (each this base with one PEFT adapter loaded) side by side: adapter
    /// `i + 1` of the bank is `adapters[i]`, 0 is the base. The base keeps no adapter of
    /// its own.
    pub fn with_lora_bank(mut self, adapters: &[CausalLm<B>]) -> Result<Self> {
        if self.has_adapters() {
            bail!("the base of a LoRA bank must have no adapter of its own");
        }
        let device = self.device();
        let per_model: Vec<_> = adapters.iter().map(|m| m.linear_layers()).collect();
        for (i, (path, _, proj)) in self.linear_layers_mut().into_iter().enumerate() {
            let [d_in, d_out] = proj.dims();
            let found: Vec<_> = per_model
                .iter()
                .map(|layers| layers[i].2.lora.as_ref())
                .collect();
            let Some(r_max) = found.iter().flatten().map(|l| l.rank()).max() else {
                continue;
            };
            let mut a = vec![Tensor::<B, 2>::zeros([d_in, r_max], &device)];
            let mut b = vec![Tensor::<B, 2>::zeros([r_max, d_out], &device)];
            for l in &found {
                let (la, lb) = match l {
                    Some(l) => {
                        if l.a.dims()[0] != d_in || l.b.dims()[1] != d_out {
                            bail!("{path}: an adapter's shapes do not fit the base model");
                        }
                        if l.magnitude.is_some() {
                            bail!(
                                "{path}: a DoRA adapter rescales the base weight per output feature, which a \
                                 shared-base bank cannot serve side by side; merge it (`burnish export --merge`) \
                                 and serve the merged model"
                            );
                        }
                        let pad = r_max - l.rank();
                        let la = l.a.val();
                        let lb = l.b.val().mul_scalar(l.scale);
                        match pad {
                            0 => (la, lb),
                            _ => (
                                Tensor::cat(vec![la, Tensor::zeros([d_in, pad], &device)], 1),
                                Tensor::cat(vec![lb, Tensor::zeros([pad, d_out], &device)], 0),
                            ),
                        }
                    }
                    None => (
                        Tensor::zeros([d_in, r_max], &device),
                        Tensor::zeros([r_max, d_out], &device),
                    ),
                };
                a.push(la);
                b.push(lb);
            }
            proj.bank = Some(LoraBank {
                a: Tensor::stack(a, 0),
                b: Tensor::stack(b, 0),
                route: None,
            });
        }
        Ok(self)
    }

    pub fn has_lora_bank(&self) -> bool {
        self.linear_layers()
            .iter()
            .any(|(_, _, p)| p.bank.is_some())
    }

    /// Route row `i` of the next forward passes to bank adapter `adapters[i]` (0 = base).
    /// Nothing to do without a bank.
    pub fn route_adapters(&mut self, adapters: &[usize]) {
        if !self.has_lora_bank() {
            return;
        }
        let device = self.device();
        let idx: Vec<i64> = adapters.iter().map(|&a| a as i64).collect();
        let route = Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [adapters.len()]), &device);
        for (_, _, proj) in self.linear_layers_mut() {
            if let Some(bank) = proj.bank.as_mut() {
                bank.route = Some(route.clone());
            }
        }
    }
}
