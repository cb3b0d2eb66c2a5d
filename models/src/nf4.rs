//! 4-bit NormalFloat (NF4) weights, as the QLoRA paper and bitsandbytes define them: the
//! 16-value NF4 code book, block-wise absmax scaling, and double quantisation of the absmax
//! constants (centred on their mean, then 8-bit blockwise with bitsandbytes' dynamic map).
//!
//! Quantisation runs once on the host while a model loads, so no full-precision copy of a
//! quantised layer ever reaches the device. On the device a layer keeps eight codes per
//! `i32` word (4 bits per weight) plus its statistics, and dequantises itself block-wise
//! with tensor ops (shift, mask, code-book lookup, scale) whenever it is used; the training
//! backward dequantises again instead of keeping the forward's copy (see `nf4_matmul`).
//! burn's own Q4 schemes are linear (scale + offset): they cannot hold the NF4 code book.

use std::any::Any;

use anyhow::{bail, Result};
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{CheckpointStrategy, NoCheckpointing};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::{ElementConversion, TensorPrimitive};

/// The NF4 code book (bitsandbytes `get_4bit_type("nf4")`, QLoRA appendix E): quantiles
/// of N(0, 1) normalised to [-1, 1], with an exact zero.
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Block size of the second-level (absmax) quantisation, as bitsandbytes fixes it.
pub const NESTED_BLOCK: usize = 256;

/// Block sizes bitsandbytes accepts for 4-bit quantisation.
pub const BLOCK_SIZES: [usize; 7] = [64, 128, 256, 512, 1024, 2048, 4096];

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Nf4Settings {
    pub block_size: usize,
    /// Quantise the absmax constants too (QLoRA's double quantisation).
    pub double_quant: bool,
}

impl Default for Nf4Settings {
    fn default() -> Self {
        Self {
            block_size: 64,
            double_quant: true,
        }
    }
}

impl Nf4Settings {
    pub fn validate(&self) -> Result<()> {
        if !BLOCK_SIZES.contains(&self.block_size) {
            bail!(
                "NF4 block size {} is not supported; expected one of {:?}",
                self.block_size,
                BLOCK_SIZES
            );
        }
        Ok(())
    }

    /// Storage per quantised weight, in bits: 4 for the code, plus the statistics.
    pub fn bits_per_param(&self) -> f64 {
        let b = self.block_size as f64;
        if self.double_quant {
            4.0 + 8.0 / b + 32.0 / (b * NESTED_BLOCK as f64)
        } else {
            4.0 + 32.0 / b
        }
    }
}

/// What to quantise when a model loads.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Quantization {
    pub nf4: Nf4Settings,
    /// Quantise the LM head too (untied models only; embeddings always stay f32).
    pub lm_head: bool,
}

/// bitsandbytes' `create_dynamic_map(signed=True)`: the 8-bit dynamic tree code used for the
/// nested absmax. Computed in f32 as torch computes it (linspace, midpoints, decade scale).
pub fn dynamic_map() -> Vec<f32> {
    let max_exponent_bits = 7;
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..max_exponent_bits {
        let items = (1usize << i) + 1;
        let bounds = torch_linspace(0.1, 1.0, items);
        let decade = 10f64.powi(i - (max_exponent_bits - 1)) as f32;
        for w in bounds.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(decade * mean);
            data.push(-decade * mean);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    data
}

/// `torch.linspace(start, end, steps, dtype=float32)`: the first half steps up from
/// `start`, the second half down from `end`, each with one fused multiply-add.
fn torch_linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// Quantised values on the host: one code per value, in input order.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Host {
    pub codes: Vec<u8>,
    pub absmax: Absmax,
    pub block_size: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    Plain(Vec<f32>),
    /// `absmax ≈ dynamic_map[codes] * absmax2[block / 256] + offset`.
    Nested {
        codes: Vec<u8>,
        absmax2: Vec<f32>,
        offset: f32,
    },
}

impl Absmax {
    /// The per-block scales the 4-bit codes are multiplied by.
    pub fn values(&self) -> Vec<f32> {
        match self {
            Absmax::Plain(v) => v.clone(),
            Absmax::Nested {
                codes,
                absmax2,
                offset,
            } => {
                let map = dynamic_map();
                codes
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| map[c as usize] * absmax2[i / NESTED_BLOCK] + offset)
                    .collect()
            }
        }
    }
}

/// Block-wise absmax quantisation to the nearest entry of a sorted code book, as
/// bitsandbytes' reference kernel does it (`backends/default/ops.py`): full blocks scale by
/// the reciprocal of their absmax, a trailing partial block divides by it, and a value
/// exactly between two codes takes the lower one.
fn quantize_blockwise(values: &[f32], block: usize, code: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mids: Vec<f32> = code.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
    let nearest = |s: f32| mids.partition_point(|&m| m < s) as u8;
    let mut codes = Vec::with_capacity(values.len());
    let mut absmax = Vec::with_capacity(values.len().div_ceil(block));
    for chunk in values.chunks(block) {
        let am = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let floor = am.max(1e-38);
        if chunk.len() == block {
            let inv = 1.0 / floor;
            codes.extend(chunk.iter().map(|v| nearest((v * inv).clamp(-1.0, 1.0))));
        } else {
            codes.extend(chunk.iter().map(|v| nearest((v / floor).clamp(-1.0, 1.0))));
        }
        absmax.push(am);
    }
    (codes, absmax)
}

/// Quantise `values` (a weight in Hugging Face `[d_out, d_in]` order, flattened).
pub fn quantize(values: &[f32], settings: &Nf4Settings) -> Nf4Host {
    let (codes, absmax) = quantize_blockwise(values, settings.block_size, &NF4_CODE);
    let absmax = if settings.double_quant {
        let mean = absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len().max(1) as f64;
        let offset = mean as f32;
        let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
        let (codes, absmax2) = quantize_blockwise(&centred, NESTED_BLOCK, &dynamic_map());
        Absmax::Nested {
            codes,
            absmax2,
            offset,
        }
    } else {
        Absmax::Plain(absmax)
    };
    Nf4Host {
        codes,
        absmax,
        block_size: settings.block_size,
    }
}

impl Nf4Host {
    pub fn dequantize(&self) -> Vec<f32> {
        let scales = self.absmax.values();
        self.codes
            .iter()
            .enumerate()
            .map(|(i, &c)| NF4_CODE[c as usize] * scales[i / self.block_size])
            .collect()
    }
}

/// `codes` (each below `1 << bits`) packed little-end first into `i32` words, padded with
/// `pad` to `len` codes.
fn pack(codes: &[u8], bits: u32, len: usize, pad: u8) -> Vec<i32> {
    let per_word = (32 / bits) as usize;
    let mut words = vec![0i32; len.div_ceil(per_word)];
    for i in 0..len {
        let c = codes.get(i).copied().unwrap_or(pad) as u32;
        words[i / per_word] |= (c << (bits * (i % per_word) as u32)) as i32;
    }
    words
}

/// The inverse of [`pack`] on the device: `[words]` -> `[words * 32 / bits]` codes, with
/// one broadcast shift and one mask over all of them.
fn unpack<B: Backend>(words: Tensor<B, 1, Int>, bits: u32) -> Tensor<B, 1, Int> {
    let per_word = (32 / bits) as usize;
    let n = words.dims()[0];
    let device = words.device();
    let shifts: Vec<i32> = (0..per_word as i32).map(|j| j * bits as i32).collect();
    let shifts = Tensor::<B, 2, Int>::from_data(TensorData::new(shifts, [1, per_word]), &device);
    let mask = ((1i32 << bits) - 1).elem::<B::IntElem>();
    // Arithmetic shifts smear the sign bit in from the left; the mask drops it.
    words
        .reshape([n, 1])
        .bitwise_right_shift(shifts)
        .bitwise_and_scalar(mask)
        .reshape([n * per_word])
}

/// Second-level statistics of a double-quantised layer.
#[derive(Module, Debug)]
pub struct NestedAbsmax<B: Backend> {
    /// Four 8-bit codes per word.
    pub packed: Tensor<B, 1, Int>,
    pub code: Tensor<B, 1>,
    pub absmax2: Tensor<B, 1>,
    pub offset: f32,
}

/// A frozen linear weight in NF4, stored in Hugging Face `[d_out, d_in]` order so blocks
/// run along rows exactly as bitsandbytes lays them out.
#[derive(Module, Debug)]
pub struct Nf4Weight<B: Backend> {
    /// Eight 4-bit codes per word; padded with the code of 0.0 to whole blocks.
    pub packed: Tensor<B, 1, Int>,
    pub code: Tensor<B, 1>,
    /// Per-block absmax, when not double-quantised.
    pub absmax: Option<Tensor<B, 1>>,
    pub nested: Option<NestedAbsmax<B>>,
    pub d_out: usize,
    pub d_in: usize,
    pub block_size: usize,
}

/// Index of 0.0 in [`NF4_CODE`], used to pad the last block.
const NF4_ZERO: u8 = 7;

impl<B: Backend> Nf4Weight<B> {
    /// Quantise an HF-layout `[d_out, d_in]` weight given as flat f32 values.
    pub fn quantize_hf(
        values: &[f32],
        d_out: usize,
        d_in: usize,
        settings: &Nf4Settings,
        device: &B::Device,
    ) -> Self {
        let host = quantize(values, settings);
        Self::from_host(&host, d_out, d_in, device)
    }

    pub fn from_host(host: &Nf4Host, d_out: usize, d_in: usize, device: &B::Device) -> Self {
        let n = d_out * d_in;
        let block = host.block_size;
        let blocks = n.div_ceil(block);
        let words = pack(&host.codes, 4, blocks * block, NF4_ZERO);
        let int1 = |w: Vec<i32>| {
            let len = w.len();
            Tensor::<B, 1, Int>::from_data(TensorData::new(w, [len]), device)
        };
        let float1 = |v: Vec<f32>| {
            let len = v.len();
            Tensor::<B, 1>::from_data(TensorData::new(v, [len]), device)
        };
        let (absmax, nested) = match &host.absmax {
            Absmax::Plain(v) => (Some(float1(v.clone())), None),
            Absmax::Nested {
                codes,
                absmax2,
                offset,
            } => {
                let len = blocks.div_ceil(NESTED_BLOCK) * NESTED_BLOCK;
                // Padding codes only reach padded scales, which are sliced away.
                let nested = NestedAbsmax {
                    packed: int1(pack(codes, 8, len, 0)),
                    code: float1(dynamic_map()),
                    absmax2: float1(absmax2.clone()),
                    offset: *offset,
                };
                (None, Some(nested))
            }
        };
        Self {
            packed: int1(words),
            code: float1(NF4_CODE.to_vec()),
            absmax,
            nested,
            d_out,
            d_in,
            block_size: block,
        }
    }

    fn blocks(&self) -> usize {
        (self.d_out * self.d_in).div_ceil(self.block_size)
    }

    /// Per-block scales `[blocks]`.
    fn scales(&self) -> Tensor<B, 1> {
        if let Some(a) = &self.absmax {
            return a.clone();
        }
        let n = self
            .nested
            .as_ref()
            .expect("an NF4 weight has plain or nested absmax");
        let groups = n.absmax2.dims()[0];
        let values = n
            .code
            .clone()
            .select(0, unpack(n.packed.clone(), 8))
            .reshape([groups, NESTED_BLOCK])
            * n.absmax2.clone().reshape([groups, 1]);
        values
            .reshape([groups * NESTED_BLOCK])
            .slice(0..self.blocks())
            .add_scalar(n.offset)
    }

    /// The full-precision weight, `[d_out, d_in]` (HF layout).
    pub fn dequantize(&self) -> Tensor<B, 2> {
        let blocks = self.blocks();
        let values = self
            .code
            .clone()
            .select(0, unpack(self.packed.clone(), 4))
            .reshape([blocks, self.block_size])
            * self.scales().reshape([blocks, 1]);
        values
            .reshape([blocks * self.block_size])
            .slice(0..self.d_out * self.d_in)
            .reshape([self.d_out, self.d_in])
    }

    /// Bytes held on the device by this weight (codes and statistics).
    pub fn storage_bytes(&self) -> usize {
        let words = self.packed.dims()[0] * 4;
        let stats = match (&self.absmax, &self.nested) {
            (Some(a), _) => a.dims()[0] * 4,
            (None, Some(n)) => n.packed.dims()[0] * 4 + n.absmax2.dims()[0] * 4 + 4,
            (None, None) => 0,
        };
        words + stats
    }
}

impl<B: Backend> crate::CausalLm<B> {
    /// How the base was quantised when it loaded, read back from its layers.
    pub fn quantization(&self) -> Option<Quantization> {
        let layers = self.linear_layers();
        let q = layers.iter().find_map(|(_, _, p)| p.nf4.as_ref())?;
        Some(Quantization {
            nf4: Nf4Settings {
                block_size: q.block_size,
                double_quant: q.nested.is_some(),
            },
            lm_head: self.lm_head.as_ref().is_some_and(|h| h.nf4.is_some()),
        })
    }

    /// Bytes the weights occupy on the device: NF4 layers at their packed size.
    pub fn weight_bytes(&self) -> usize {
        use burn::module::{ModuleVisitor, Param};
        struct Dense(usize);
        impl<B: Backend> ModuleVisitor<B> for Dense {
            fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
                self.0 += p.shape().num_elements() * 4;
            }
        }
        let mut dense = Dense(0);
        self.visit(&mut dense);
        let mut projs: Vec<&crate::layers::Proj<B>> = self
            .linear_layers()
            .into_iter()
            .map(|(_, _, p)| p)
            .collect();
        projs.extend(self.lm_head.iter());
        let packed: usize = projs
            .iter()
            .filter_map(|p| p.nf4.as_ref())
            .map(Nf4Weight::storage_bytes)
            .sum();
        dense.0 + packed
    }
}

/// `x @ W^T` for `x: [rows, d_in]`. Under autodiff the backward recomputes `W` from the
/// codes instead of keeping the dequantised copy alive until the backward pass (which
/// would hold every layer's f32 weight at once and undo the memory saving).
pub fn nf4_matmul<B: Backend>(x: Tensor<B, 2>, weight: &Nf4Weight<B>) -> Tensor<B, 2> {
    let x = match on_autodiff::<B, crate::backend::Cpu>(x, weight) {
        Ok(y) => return y,
        Err(x) => x,
    };
    #[cfg(feature = "cuda")]
    let x = match on_autodiff::<B, crate::backend::Gpu>(x, weight) {
        Ok(y) => return y,
        Err(x) => x,
    };
    // Inference backends (and autodiff over a backend we do not build) keep nothing.
    x.matmul(weight.dequantize().transpose())
}

/// Runs the recomputing op when `B` is `Autodiff<I, C>` for a strategy this crate trains
/// with; hands `x` back otherwise. Generic code cannot name the autodiff graph, so the
/// concrete backends are matched at run time.
fn on_autodiff<B: Backend, I: Backend>(
    x: Tensor<B, 2>,
    weight: &Nf4Weight<B>,
) -> std::result::Result<Tensor<B, 2>, Tensor<B, 2>> {
    let x = match with_strategy::<B, I, NoCheckpointing>(x, weight) {
        Ok(y) => return Ok(y),
        Err(x) => x,
    };
    with_strategy::<B, I, crate::backend::Checkpointing>(x, weight)
}

fn with_strategy<B: Backend, I: Backend, C: CheckpointStrategy>(
    x: Tensor<B, 2>,
    weight: &Nf4Weight<B>,
) -> std::result::Result<Tensor<B, 2>, Tensor<B, 2>> {
    let boxed: Box<dyn Any> = Box::new(x);
    match boxed.downcast::<Tensor<Autodiff<I, C>, 2>>() {
        Ok(x) => {
            let weight = (weight as &dyn Any)
                .downcast_ref::<Nf4Weight<Autodiff<I, C>>>()
                .expect("the weight lives on the input's backend");
            let y: Box<dyn Any> = Box::new(recomputing_matmul(*x, weight));
            Ok(*y.downcast::<Tensor<B, 2>>().expect("same backend"))
        }
        Err(boxed) => Err(*boxed
            .downcast::<Tensor<B, 2>>()
            .expect("the input is unchanged")),
    }
}

#[derive(Debug)]
struct DequantMatmulBackward;

impl<B: Backend> Backward<B, 1> for DequantMatmulBackward {
    type State = Nf4Weight<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let weight = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            // d(x W^T)/dx = grad @ W, with W in its stored [d_out, d_in] layout.
            let w = weight.dequantize().into_primitive().tensor();
            B::float_matmul(grad, w)
        });
    }
}

fn recomputing_matmul<B: Backend, C: CheckpointStrategy>(
    x: Tensor<Autodiff<B, C>, 2>,
    weight: &Nf4Weight<Autodiff<B, C>>,
) -> Tensor<Autodiff<B, C>, 2> {
    let inner = weight.valid();
    let x = x.into_primitive().tensor();
    let w = inner.dequantize().transpose().into_primitive().tensor();
    let out = B::float_matmul(x.primitive, w);
    let out = match DequantMatmulBackward
        .prepare::<C>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(inner, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Cpu, CpuTrain};

    fn weights(n: usize) -> Vec<f32> {
        let mut x = 3u64;
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
            })
            .collect()
    }

    #[test]
    fn device_dequantisation_matches_the_host_reference() {
        for double_quant in [false, true] {
            let s = Nf4Settings {
                block_size: 64,
                double_quant,
            };
            // 37 x 29 leaves a partial block and pads the nested statistics.
            let values = weights(37 * 29 * 20);
            let host = quantize(&values, &s);
            let w = Nf4Weight::<Cpu>::from_host(&host, 37 * 20, 29, &Default::default());
            let device: Vec<f32> = w.dequantize().to_data().iter::<f32>().collect();
            assert_eq!(device, host.dequantize());
        }
    }

    #[test]
    fn storage_is_close_to_the_theoretical_bits_per_weight() {
        let s = Nf4Settings::default();
        let (d_out, d_in) = (512, 1408);
        let w = Nf4Weight::<Cpu>::quantize_hf(
            &weights(d_out * d_in),
            d_out,
            d_in,
            &s,
            &Default::default(),
        );
        let bits = w.storage_bytes() as f64 * 8.0 / (d_out * d_in) as f64;
        assert!((bits - s.bits_per_param()).abs() < 0.01, "{bits}");
        assert!((s.bits_per_param() - 4.127).abs() < 0.001);
    }

    #[test]
    fn recomputing_backward_matches_the_plain_matmul_gradient() {
        let device = Default::default();
        let (d_out, d_in) = (24, 64);
        let w = Nf4Weight::<CpuTrain>::quantize_hf(
            &weights(d_out * d_in),
            d_out,
            d_in,
            &Nf4Settings::default(),
            &device,
        );
        let x_data = TensorData::new(weights(5 * d_in), [5, d_in]);
        let probe = Tensor::<CpuTrain, 2>::from_data(
            TensorData::new(weights(5 * d_out), [5, d_out]),
            &device,
        );
        let grad_of = |custom: bool| {
            let x = Tensor::<CpuTrain, 2>::from_data(x_data.clone(), &device).require_grad();
            let y = if custom {
                on_autodiff::<CpuTrain, Cpu>(x.clone(), &w)
                    .unwrap_or_else(|_| panic!("Autodiff<Cpu> takes the recomputing op"))
            } else {
                x.clone().matmul(w.dequantize().transpose())
            };
            let grads = (y.clone() * probe.clone()).sum().backward();
            let g: Vec<f32> = x.grad(&grads).unwrap().to_data().iter::<f32>().collect();
            let y: Vec<f32> = y.to_data().iter::<f32>().collect();
            (y, g)
        };
        let (y1, g1) = grad_of(true);
        let (y2, g2) = grad_of(false);
        for (a, b) in y1.iter().zip(&y2).chain(g1.iter().zip(&g2)) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }
}
