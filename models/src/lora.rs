//! LoRA adapters inside [`Proj`], initialised, scaled and named as PEFT does, so adapters
//! move between burnish and PEFT unchanged.

use anyhow::{bail, Result};
use burn::module::Param;
use burn::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::layers::{matmul_2d, Proj};
use crate::llama::CausalLm;

/// Every linear layer of a decoder block, in PEFT's `all-linear` order.
pub const LINEAR_MODULES: [&str; 9] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "qkv_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "gate_up_proj",
    "down_proj",
];

/// The linear layers of one decoder block of `cfg`'s architecture, in
/// [`LINEAR_MODULES`] order.
pub fn linear_module_names(cfg: &crate::ModelConfig) -> Vec<&'static str> {
    let fused = ["qkv_proj", "gate_up_proj"];
    let split = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"];
    LINEAR_MODULES
        .into_iter()
        .filter(|m| match cfg.fused_projections {
            true => !split.contains(m),
            false => !fused.contains(m),
        })
        .filter(|m| cfg.moe.is_none() || !MLP_MODULES.contains(m))
        .collect()
}

/// The MLP's projections. In a mixture of experts PEFT takes these names for the experts'
/// projections (transformers 5 fuses them into 3-D parameters that PEFT adapts as
/// `target_parameters`), which burnish does not adapt: there LoRA targets the attention.
pub const MLP_MODULES: [&str; 4] = ["gate_proj", "up_proj", "gate_up_proj", "down_proj"];

/// Why a mixture of experts' MLP names are no LoRA targets, for error messages.
fn expert_targets_note(present: &[&str]) -> &'static str {
    match present.iter().any(|m| MLP_MODULES.contains(m)) {
        true => "",
        false => {
            " (in a mixture of experts PEFT takes the MLP names for the routed experts, \
             which burnish does not adapt: target the attention, or train in full)"
        }
    }
}

/// `delta(x) = scale * dropout(x) A B`, with `A: [d_in, r]` and `B: [r, d_out]` (burn layout;
/// PEFT stores `lora_A.weight: [r, d_in]` and `lora_B.weight: [d_out, r]`).
///
/// With a `magnitude` it is DoRA (PEFT's `use_dora`, peft/tuners/lora/dora.py): the layer's
/// weight becomes `m * (W + scale A B) / ||W + scale A B||`, the norm per output column and
/// treated as a constant in the backward pass (the paper's section 4.3, as PEFT does).
#[derive(Module, Debug)]
pub struct LoraAdapter<B: Backend> {
    pub a: Param<Tensor<B, 2>>,
    pub b: Param<Tensor<B, 2>>,
    /// DoRA's magnitude `m`, `[d_out]`.
    pub magnitude: Option<Param<Tensor<B, 1>>>,
    pub scale: f64,
    pub dropout: f64,
    /// Off: the layer computes the frozen base alone (a reference model without a copy).
    pub enabled: bool,
}

impl<B: Backend> LoraAdapter<B> {
    /// PEFT's default init: `A` from `kaiming_uniform_(a=sqrt(5))`, i.e. uniform in
    /// `±1/sqrt(d_in)`, and `B = 0`, so a new adapter leaves the model unchanged.
    pub fn new(
        d_in: usize,
        d_out: usize,
        settings: &LoraSettings,
        rng: &mut StdRng,
        device: &B::Device,
    ) -> Self {
        let r = settings.r;
        let bound = 1.0 / (d_in as f64).sqrt();
        let a: Vec<f32> = (0..d_in * r)
            .map(|_| rng.random_range(-bound..bound) as f32)
            .collect();
        Self::from_tensors(
            Tensor::from_data(TensorData::new(a, [d_in, r]), device),
            Tensor::zeros([r, d_out], device),
            settings,
        )
    }

    pub fn from_tensors(a: Tensor<B, 2>, b: Tensor<B, 2>, settings: &LoraSettings) -> Self {
        Self {
            a: Param::from_tensor(a),
            b: Param::from_tensor(b),
            magnitude: None,
            scale: settings.scale(),
            dropout: settings.dropout,
            enabled: true,
        }
    }

    pub fn rank(&self) -> usize {
        self.a.dims()[1]
    }

    pub fn delta<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.low_rank(self.dropout_of(x))
    }

    /// Whether dropout changes the input now (training, with a rate).
    pub fn drops(&self, device: &B::Device) -> bool {
        self.dropout > 0.0 && B::ad_enabled(device)
    }

    /// Inverted dropout, as torch.nn.Dropout, while training.
    pub fn dropout_of<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        if self.drops(&x.device()) {
            let mask = dropout_mask(x.dims(), self.dropout, &x.device());
            x * mask
        } else {
            x
        }
    }

    /// `scale * x A B`.
    pub fn low_rank<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        matmul_2d(matmul_2d(x, self.a.val()), self.b.val()).mul_scalar(self.scale)
    }

    /// DoRA's per-column factor `m / ||W + scale A B||` for the base weight `W` (f32,
    /// `[d_in, d_out]`), the norm without gradient; None for plain LoRA.
    pub fn dora_factor(&self, weight: Tensor<B, 2>) -> Option<Tensor<B, 1>> {
        let m = self.magnitude.as_ref()?;
        Some(m.val() / column_norms(weight + self.merged_delta().detach()).detach())
    }

    /// `scale * A B`, the update merging adds to the `[d_in, d_out]` base weight.
    pub fn merged_delta(&self) -> Tensor<B, 2> {
        self.a.val().matmul(self.b.val()).mul_scalar(self.scale)
    }
}

thread_local! {
    /// (seed, masks drawn since it was set) of this thread's dropout stream.
    static DROPOUT_STREAM: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
}

/// Restart this thread's dropout stream. The training loop calls it before every step with
/// a seed derived from (recipe seed, step), so masks depend on nothing but the step: runs
/// repeat exactly, resumed runs draw the masks the uninterrupted run drew, and threads
/// (tests, data-parallel replicas) never disturb each other, as they would through burn's
/// process-wide backend RNG.
pub fn reseed_dropout(seed: u64) {
    DROPOUT_STREAM.with(|s| s.set((seed, 0)));
}

/// A `{0, 1/keep}` mask, drawn on the host from the thread's dropout stream.
fn dropout_mask<B: Backend, const D: usize>(
    dims: [usize; D],
    p: f64,
    device: &B::Device,
) -> Tensor<B, D> {
    let (seed, n) = DROPOUT_STREAM.with(|s| {
        let v = s.get();
        s.set((v.0, v.1 + 1));
        v
    });
    let mut rng = StdRng::seed_from_u64(seed ^ (n + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let keep = 1.0 - p;
    let scale = (1.0 / keep) as f32;
    let len: usize = dims.iter().product();
    let values: Vec<f32> = (0..len)
        .map(|_| {
            if rng.random::<f64>() < keep {
                scale
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_data(TensorData::new(values, dims), device)
}

/// The Euclidean norm of every column of `w` (`[d_in, d_out]` -> `[d_out]`): per output
/// feature, as PEFT's `get_weight_norm` takes it over the rows of torch's `[out, in]` weight.
pub fn column_norms<B: Backend>(w: Tensor<B, 2>) -> Tensor<B, 1> {
    let d_out = w.dims()[1];
    w.powf_scalar(2.0).sum_dim(0).sqrt().reshape([d_out])
}

/// LoRA hyper-parameters, as PEFT's `LoraConfig` names them.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSettings {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Module names (`q_proj`, ...) or `["all-linear"]`.
    pub target_modules: Vec<String>,
    /// rsLoRA: scale by `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
    /// DoRA: a trained magnitude per output feature beside the low-rank direction update.
    pub use_dora: bool,
}

impl LoraSettings {
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// The targeted module names, `all-linear` expanded, each checked.
    pub fn targets(&self) -> Result<Vec<&'static str>> {
        if self.r == 0 {
            bail!("[adapter] r must be at least 1");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("[adapter] dropout must be in [0, 1), got {}", self.dropout);
        }
        let mut out = Vec::new();
        for t in &self.target_modules {
            if t == "all-linear" {
                return Ok(LINEAR_MODULES.to_vec());
            }
            match LINEAR_MODULES.iter().find(|m| **m == t.as_str()) {
                Some(m) => out.push(*m),
                None => bail!(
                    "[adapter] target_modules: unknown module `{t}`; expected `all-linear` or some of {}",
                    LINEAR_MODULES.join(", ")
                ),
            }
        }
        if out.is_empty() {
            bail!("[adapter] target_modules is empty");
        }
        Ok(out)
    }

    /// [`Self::targets`] for a model whose linear layers are `present`: `all-linear` means
    /// those, and a named module the model lacks is an error (PEFT's "target modules not
    /// found"), with the fused names to use instead on Phi-3.
    pub fn targets_in(&self, present: &[&'static str]) -> Result<Vec<&'static str>> {
        if self.target_modules.iter().any(|t| t == "all-linear") {
            self.targets()?;
            return Ok(present.to_vec());
        }
        let targets = self.targets()?;
        if let Some(missing) = targets.iter().find(|t| !present.contains(t)) {
            let fused = if present.contains(&"qkv_proj") {
                " (this architecture fuses q/k/v into `qkv_proj` and gate/up into \
                 `gate_up_proj`; PEFT's default for it is [\"qkv_proj\"])"
            } else if MLP_MODULES.contains(missing) {
                expert_targets_note(present)
            } else {
                ""
            };
            bail!(
                "[adapter] target_modules: this model has no `{missing}` layers; its linear \
                 layers are {}{fused}",
                present.join(", ")
            );
        }
        Ok(targets)
    }
}

impl<B: Backend> CausalLm<B> {
    /// Every linear layer of the decoder blocks with its HF module path
    /// (`model.layers.0.self_attn.q_proj`) and short name (`q_proj`).
    pub fn linear_layers(&self) -> Vec<(String, &'static str, &Proj<B>)> {
        let mut out = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            for (name, p) in layer.projections() {
                out.push((module_path(l, name), name, p));
            }
        }
        out
    }

    pub fn linear_layers_mut(&mut self) -> Vec<(String, &'static str, &mut Proj<B>)> {
        let mut out = Vec::new();
        for (l, layer) in self.layers.iter_mut().enumerate() {
            for (name, p) in layer.projections_mut() {
                out.push((module_path(l, name), name, p));
            }
        }
        out
    }

    /// The short names of the linear layers LoRA may target (`q_proj` ... or Phi-3's fused
    /// `qkv_proj` and `gate_up_proj`; in a mixture of experts the attention's only, see
    /// [`MLP_MODULES`]), in [`LINEAR_MODULES`] order.
    pub fn linear_names(&self) -> Vec<&'static str> {
        let experts = self.layers.iter().any(|l| l.moe.is_some());
        let present: Vec<&'static str> = self
            .layers
            .iter()
            .flat_map(|l| l.projections().into_iter().map(|(n, _)| n))
            .collect();
        LINEAR_MODULES
            .into_iter()
            .filter(|m| present.contains(m) && !(experts && MLP_MODULES.contains(m)))
            .collect()
    }

    /// Freeze every base weight (no gradients, no optimizer state) and add fresh adapters
    /// to the targeted layers; `seed` makes their init reproducible.
    pub fn with_lora(self, settings: &LoraSettings, seed: u64) -> Result<Self> {
        let targets = settings.targets_in(&self.linear_names())?;
        let mut model = self.no_grad();
        let device = model.device();
        let mut rng = StdRng::seed_from_u64(seed);
        for (_, name, proj) in model.linear_layers_mut() {
            if targets.contains(&name) {
                let [d_in, d_out] = proj.dims();
                let mut adapter = LoraAdapter::new(d_in, d_out, settings, &mut rng, &device);
                if settings.use_dora {
                    // B = 0: the magnitude starts as the base weight's norms (PEFT's init).
                    let norms = column_norms(proj.dense_weight()).detach();
                    adapter.magnitude = Some(Param::from_tensor(norms));
                }
                proj.lora = Some(adapter);
            }
        }
        // A reward head is new, task-specific and tiny: it trains in full (PEFT's
        // `modules_to_save` for sequence classification).
        if let Some(score) = model.score.as_mut() {
            score.set_dense_weight(score.dense_weight().detach());
        }
        Ok(model)
    }

    pub fn has_adapters(&self) -> bool {
        self.linear_layers()
            .iter()
            .any(|(_, _, p)| p.lora.is_some())
    }

    /// Switch every adapter on or off (off = the frozen base model).
    pub fn set_adapters_enabled(&mut self, enabled: bool) {
        for (_, _, p) in self.linear_layers_mut() {
            if let Some(l) = p.lora.as_mut() {
                l.enabled = enabled;
            }
        }
    }

    /// The model to sample from: enabled adapters folded into their dense base weights
    /// (the base itself is shared, not changed), so a decoding step reads one matrix per
    /// projection instead of running two small products and an add beside it, as vLLM
    /// serves a merged policy for TRL. An NF4 base keeps its adapters: folding would
    /// dequantise the whole model into f32.
    pub fn for_sampling(&self) -> Self {
        let mut model = self.clone();
        for (_, _, p) in model.linear_layers_mut() {
            if p.lora.as_ref().is_some_and(|l| l.enabled) && p.nf4.is_none() {
                p.fold_adapter();
            }
        }
        model
    }

    /// Fold every adapter into its base weight: `W += scale * A B`; adapters are removed.
    /// A quantised base is dequantised here: the merged model is full precision.
    pub fn merge_adapters(mut self) -> Self {
        for (_, _, p) in self.linear_layers_mut() {
            p.fold_adapter();
        }
        self
    }
}

impl<B: Backend> Proj<B> {
    /// `W += scale * A B` (DoRA: `W = m * (W + scale A B) / ||W + scale A B||`) and the
    /// adapter removed (nothing without one).
    fn fold_adapter(&mut self) {
        if let Some(l) = self.lora.take() {
            let base = self.dense_weight();
            let factor = l.dora_factor(base.clone());
            let w = base + l.merged_delta();
            let w = match factor {
                Some(g) => w * g.unsqueeze(),
                None => w,
            };
            self.set_dense_weight(w);
        }
    }
}

fn module_path(layer: usize, name: &str) -> String {
    let block = if ["gate_proj", "up_proj", "gate_up_proj", "down_proj"].contains(&name) {
        "mlp"
    } else {
        "self_attn"
    };
    format!("model.layers.{layer}.{block}.{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(targets: &[&str]) -> LoraSettings {
        LoraSettings {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: targets.iter().map(|t| t.to_string()).collect(),
            use_rslora: false,
            use_dora: false,
        }
    }

    #[test]
    fn targets_are_the_models_own_layers() {
        let fused = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"];
        assert_eq!(settings(&["all-linear"]).targets_in(&fused).unwrap(), fused);
        assert_eq!(
            settings(&["qkv_proj"]).targets_in(&fused).unwrap(),
            ["qkv_proj"]
        );
        let e = settings(&["q_proj", "v_proj"])
            .targets_in(&fused)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no `q_proj` layers"), "{e}");
        assert!(e.contains("PEFT's default for it is [\"qkv_proj\"]"), "{e}");
        let e = settings(&["gate_up_proj"])
            .targets_in(&["q_proj", "k_proj", "v_proj", "o_proj"])
            .unwrap_err()
            .to_string();
        assert!(!e.contains("fuses"), "{e}");
    }
}
