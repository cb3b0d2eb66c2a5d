//! Building blocks with Hugging Face semantics: a bias-optional projection, RMSNorm and
//! rotate-half rotary embeddings evaluated at arbitrary position ids.

use burn::module::Param;
use burn::prelude::*;

use crate::config::{LongRopeScaling, ModelConfig, RopeScaling};
use crate::lora::LoraAdapter;
use crate::lora_bank::LoraBank;
use crate::nf4::{nf4_matmul, Nf4Weight};

/// `y = x W + b` with `W` stored `[d_in, d_out]` (burn layout; HF stores `[d_out, d_in]`),
/// or a frozen NF4 weight in its place (QLoRA), plus an optional LoRA update.
#[derive(Module, Debug)]
pub struct Proj<B: Backend> {
    /// The dense weight; `None` when the layer is NF4-quantised.
    pub weight: Option<Param<Tensor<B, 2>>>,
    pub nf4: Option<Nf4Weight<B>>,
    pub bias: Option<Param<Tensor<B, 1>>>,
    pub lora: Option<LoraAdapter<B>>,
    /// Adapters served side by side, one per batch row (`burnish serve`); never trained.
    pub bank: Option<LoraBank<B>>,
}

impl<B: Backend> Proj<B> {
    pub fn from_tensors(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Self {
        Self {
            weight: Some(Param::from_tensor(weight)),
            nf4: None,
            bias: bias.map(Param::from_tensor),
            lora: None,
            bank: None,
        }
    }

    pub fn from_nf4(weight: Nf4Weight<B>, bias: Option<Tensor<B, 1>>) -> Self {
        Self {
            weight: None,
            nf4: Some(weight),
            bias: bias.map(Param::from_tensor),
            lora: None,
            bank: None,
        }
    }

    /// `[d_in, d_out]`.
    pub fn dims(&self) -> [usize; 2] {
        match (&self.weight, &self.nf4) {
            (Some(w), _) => w.dims(),
            (None, Some(q)) => [q.d_in, q.d_out],
            (None, None) => unreachable!("a projection has a dense or an NF4 weight"),
        }
    }

    /// The weight as a dense f32 `[d_in, d_out]` tensor, dequantised or cast if need be.
    pub fn dense_weight(&self) -> Tensor<B, 2> {
        crate::half::as_f32(self.stored_weight())
    }

    /// The weight as a dense `[d_in, d_out]` tensor in its stored float dtype (half for a
    /// half-precision base), dequantised if it is NF4.
    pub fn stored_weight(&self) -> Tensor<B, 2> {
        match (&self.weight, &self.nf4) {
            (Some(w), _) => w.val(),
            (None, Some(q)) => q.dequantize().transpose(),
            (None, None) => unreachable!("a projection has a dense or an NF4 weight"),
        }
    }

    pub fn set_dense_weight(&mut self, weight: Tensor<B, 2>) {
        self.weight = Some(Param::from_tensor(weight));
        self.nf4 = None;
    }

    /// `x W + scale * dropout(x) A B + b` (PEFT's LoRA), or DoRA's rescaled sum.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        crate::shape_audit::record("projection", &[&x.dims(), &self.dims()]);
        let adapter = self.lora.as_ref().filter(|l| l.enabled);
        let lora_in = adapter.map(|_| x.clone());
        let bank_in = self.bank.as_ref().map(|_| x.clone());
        let y = self.base_product(x);
        let y = match (adapter, lora_in) {
            (Some(l), Some(x)) => match l
                .magnitude
                .as_ref()
                .and_then(|_| l.dora_factor(self.dense_weight()))
            {
                None => y + l.delta(x),
                Some(g) => {
                    // PEFT's DoRA: `(g - 1) * x W + g * scale * x A B` beside the base
                    // output; with dropout both on the dropped input.
                    let mut dims = [1usize; D];
                    dims[D - 1] = g.dims()[0];
                    let g = g.reshape(dims);
                    if l.drops(&x.device()) {
                        let x = l.dropout_of(x);
                        let low = l.low_rank(x.clone());
                        y + g.clone().sub_scalar(1.0) * self.base_product(x) + g * low
                    } else {
                        (y + l.low_rank(x)) * g
                    }
                }
            },
            _ => y,
        };
        let y = match &self.bias {
            Some(b) => y + b.val().unsqueeze(),
            None => y,
        };
        match (&self.bank, bank_in) {
            (Some(bank), Some(x)) => {
                let dims = x.dims();
                let rows = dims[0];
                let d_in = dims[D - 1];
                let mut out = y.dims();
                let x = x.reshape([
                    rows,
                    dims.iter().product::<usize>() / (rows * d_in).max(1),
                    d_in,
                ]);
                let delta = bank.delta(x);
                out[D - 1] = delta.dims()[2];
                y + delta.reshape(out)
            }
            _ => y,
        }
    }

    /// `x W` (no bias), whatever the weight is stored in.
    fn base_product<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match (&self.weight, &self.nf4) {
            (Some(w), _) if crate::half::is_half(w.val().dtype()) => {
                let (rows, mut dims) = flat_rows(&x);
                let w = w.val();
                dims[D - 1] = w.dims()[1];
                crate::half::half_matmul(x.reshape([rows, w.dims()[0]]), &w).reshape(dims)
            }
            (Some(w), _) => matmul_2d(x, w.val()),
            (None, Some(q)) => {
                let (rows, mut dims) = flat_rows(&x);
                dims[D - 1] = q.d_out;
                nf4_matmul(x.reshape([rows, q.d_in]), q).reshape(dims)
            }
            (None, None) => unreachable!("a projection has a dense or an NF4 weight"),
        }
    }
}

/// Rows of `x` seen as `[rows, last dim]`, and its dims.
fn flat_rows<B: Backend, const D: usize>(x: &Tensor<B, D>) -> (usize, [usize; D]) {
    let dims = x.dims();
    let rows = x.shape().num_elements() / dims[D - 1].max(1);
    (rows, dims)
}

/// `x @ w` for `x: [..., d_in]` and `w: [d_in, d_out]`, flattening `x` to 2-D instead of
/// broadcasting `w`: reshaping a shared weight makes burn-flex copy it on every call (a
/// 64 MB copy per token for a 32k-vocabulary LM head).
pub fn matmul_2d<B: Backend, const D: usize>(x: Tensor<B, D>, w: Tensor<B, 2>) -> Tensor<B, D> {
    let (rows, mut dims) = flat_rows(&x);
    let d_in = dims[D - 1];
    dims[D - 1] = w.dims()[1];
    x.reshape([rows, d_in]).matmul(w).reshape(dims)
}

/// RMSNorm as HF Llama computes it: normalise in the input dtype, then scale by `weight`.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
    /// Gemma scales by `1 + weight` (its stored weights are offsets from one); 0 otherwise.
    pub offset: f64,
}

impl<B: Backend> RmsNorm<B> {
    pub fn from_tensor(weight: Tensor<B, 1>, eps: f64) -> Self {
        Self {
            weight: Param::from_tensor(weight),
            eps,
            offset: 0.0,
        }
    }

    /// Gemma's norm: `x / rms(x) * (1 + weight)`.
    pub fn with_unit_offset(self) -> Self {
        Self {
            offset: 1.0,
            ..self
        }
    }

    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let variance = x.clone().powf_scalar(2.0).mean_dim(2);
        let normed = x * variance.add_scalar(self.eps).sqrt().recip();
        let weight = match self.offset {
            0.0 => self.weight.val(),
            o => self.weight.val().add_scalar(o),
        };
        normed * weight.unsqueeze()
    }
}

/// Inverse frequencies of rotary embeddings, including Llama-3 / linear scaling, computed
/// as transformers' `ROPE_INIT_FUNCTIONS` do.
pub fn rope_inv_freq(cfg: &ModelConfig) -> Vec<f32> {
    scaled_inv_freq(cfg, |s| &s.short_factor)
}

/// The base frequencies of `cfg`'s rotary dimensions, scaled as its `rope_scaling` says
/// (LongRoPE: divided by the factors `pick` chooses).
fn scaled_inv_freq(cfg: &ModelConfig, pick: impl Fn(&LongRopeScaling) -> &Vec<f64>) -> Vec<f32> {
    let dim = cfg.rotary_dim;
    let base = cfg.rope_theta;
    let inv: Vec<f64> = (0..dim)
        .step_by(2)
        .map(|i| 1.0 / base.powf(i as f64 / dim as f64))
        .collect();
    let scaled: Vec<f64> = match &cfg.rope_scaling {
        RopeScaling::None => inv,
        RopeScaling::Linear(f) => inv.iter().map(|x| x / f).collect(),
        RopeScaling::LongRope(s) => inv.iter().zip(pick(s)).map(|(x, f)| x / f).collect(),
        RopeScaling::Llama3(s) => {
            let old = s.original_max_position_embeddings as f64;
            let low_wavelen = old / s.low_freq_factor;
            let high_wavelen = old / s.high_freq_factor;
            inv.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / s.factor
                    } else {
                        let smooth = (old / wavelen - s.low_freq_factor)
                            / (s.high_freq_factor - s.low_freq_factor);
                        (1.0 - smooth) * f / s.factor + smooth * f
                    }
                })
                .collect()
        }
    };
    scaled.into_iter().map(|x| x as f32).collect()
}

/// A model's rotary embedding: the frequencies of its rotary dimensions, the factor cos and
/// sin are scaled by (LongRoPE's attention factor, else 1), and LongRoPE's long frequencies
/// with the length past which a forward pass uses them, decided per call from its largest
/// position as transformers does.
#[derive(Debug, Clone)]
pub struct Rope {
    pub inv_freq: Vec<f32>,
    pub scale: f32,
    pub long: Option<(usize, Vec<f32>)>,
}

impl Rope {
    pub fn new(cfg: &ModelConfig) -> Self {
        match &cfg.rope_scaling {
            RopeScaling::LongRope(s) => Self {
                inv_freq: rope_inv_freq(cfg),
                scale: s.attention_factor as f32,
                long: Some((
                    s.original_max_position_embeddings,
                    scaled_inv_freq(cfg, |s| &s.long_factor),
                )),
            },
            _ => Self {
                inv_freq: rope_inv_freq(cfg),
                scale: 1.0,
                long: None,
            },
        }
    }

    /// The length past which LongRoPE turns with its long factors (None without LongRoPE).
    pub fn long_from(&self) -> Option<usize> {
        self.long.as_ref().map(|(original, _)| *original)
    }

    pub fn tables<B: Backend>(&self, positions: Tensor<B, 2, Int>) -> RopeTables<B> {
        let inv_freq = match &self.long {
            // One read of the largest position, only for LongRoPE models.
            Some((original, long))
                if positions.clone().max().into_scalar().elem::<i64>() + 1 > *original as i64 =>
            {
                long
            }
            _ => &self.inv_freq,
        };
        RopeTables::new(inv_freq, positions, self.scale)
    }
}

/// cos/sin tables for the given positions, shaped `[B, 1, T, rotary_dim]` to broadcast over
/// heads; dimensions past `rotary_dim` (Phi's partial rotary) pass unturned.
pub struct RopeTables<B: Backend> {
    pub cos: Tensor<B, 4>,
    /// `[-sin, sin]` over the two halves of `head_dim`.
    pub sin_signed: Tensor<B, 4>,
}

impl<B: Backend> RopeTables<B> {
    pub fn new(inv_freq: &[f32], positions: Tensor<B, 2, Int>, scale: f32) -> Self {
        let device = positions.device();
        let [b, t] = positions.dims();
        let half = inv_freq.len();
        let inv = Tensor::<B, 1>::from_data(TensorData::new(inv_freq.to_vec(), [half]), &device)
            .reshape([1, 1, half]);
        let freqs = positions.float().reshape([b, t, 1]) * inv;
        let (cos, sin) = match scale {
            1.0 => (freqs.clone().cos(), freqs.sin()),
            s => (freqs.clone().cos() * s, freqs.sin() * s),
        };
        let table = |halves: Vec<Tensor<B, 3>>| Tensor::cat(halves, 2).reshape([b, 1, t, 2 * half]);
        Self {
            cos: table(vec![cos.clone(), cos]),
            sin_signed: table(vec![sin.clone().neg(), sin]),
        }
    }

    /// `x * cos + rotate_half(x) * sin` for `x: [B, H, T, head_dim]`, where
    /// `rotate_half(x) * sin = [x2, x1] * [-sin, sin]`: the sign lives in the table (built
    /// once per forward) instead of a negation of every query and key. Negation is exact, so
    /// the result is bit-identical to HF's.
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let (d, rotary) = (x.dims()[3], self.cos.dims()[3]);
        if rotary < d {
            let turned = self.apply(x.clone().slice(s![.., .., .., 0..rotary]));
            return Tensor::cat(vec![turned, x.slice(s![.., .., .., rotary..d])], 3);
        }
        let x1 = x.clone().slice(s![.., .., .., 0..d / 2]);
        let x2 = x.clone().slice(s![.., .., .., d / 2..d]);
        let swapped = Tensor::cat(vec![x2, x1], 3);
        x * self.cos.clone() + swapped * self.sin_signed.clone()
    }
}
