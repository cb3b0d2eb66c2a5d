//! Per-piece wall time of one decoder layer's forward at training shapes (a profiling aid).
use burn::backend::Flex;
use burn::prelude::*;
use burn::tensor::activation::{log_softmax, silu, softmax};
use std::time::Instant;

type B = Flex;

#[global_allocator]
static GLOBAL: trainers::allocator::MiMalloc = trainers::allocator::MiMalloc;

fn time<F: FnMut() -> f32>(name: &str, flops: f64, mut f: F) {
    f();
    let s = Instant::now();
    let n = 5;
    let mut acc = 0.0;
    for _ in 0..n {
        acc += f();
    }
    let ms = s.elapsed().as_secs_f64() * 1000.0 / n as f64;
    println!("{name:>28}: {ms:8.2} ms  {:7.1} GFLOP/s  ({acc:.1})", flops / ms / 1e6);
}

fn main() {
    trainers::allocator::tune_for_training();
    let dev = Default::default();
    let (b, t, d, ff, v, h, hd) = (8usize, 256usize, 512usize, 1408usize, 8000usize, 8usize, 64usize);
    let n = b * t;
    let x = Tensor::<B, 2>::random([n, d], burn::tensor::Distribution::Normal(0.0, 1.0), &dev);
    let w = Tensor::<B, 2>::random([d, ff], burn::tensor::Distribution::Normal(0.0, 0.02), &dev);
    let w2 = Tensor::<B, 2>::random([ff, d], burn::tensor::Distribution::Normal(0.0, 0.02), &dev);
    let wd = Tensor::<B, 2>::random([d, d], burn::tensor::Distribution::Normal(0.0, 0.02), &dev);
    let wv = Tensor::<B, 2>::random([d, v], burn::tensor::Distribution::Normal(0.0, 0.02), &dev);
    let y = Tensor::<B, 2>::random([n, ff], burn::tensor::Distribution::Normal(0.0, 1.0), &dev);
    let s = |t: Tensor<B, 2>| t.slice([0..1, 0..1]).into_scalar();
    time("x[2048,512] @ [512,1408]", 2.0 * (n * d * ff) as f64, || s(x.clone().matmul(w.clone())));
    time("y[2048,1408] @ [1408,512]", 2.0 * (n * d * ff) as f64, || s(y.clone().matmul(w2.clone())));
    time("x @ [512,512]", 2.0 * (n * d * d) as f64, || s(x.clone().matmul(wd.clone())));
    time("x^T @ y (weight grad)", 2.0 * (n * d * ff) as f64, || s(x.clone().transpose().matmul(y.clone())));
    time("y @ w^T (input grad)", 2.0 * (n * d * ff) as f64, || s(y.clone().matmul(w.clone().transpose())));
    time("x @ [512,8000] lm head", 2.0 * (n * d * v) as f64, || s(x.clone().matmul(wv.clone())));
    let logits = x.clone().matmul(wv.clone());
    time("log_softmax [2048,8000]", 0.0, || s(log_softmax(logits.clone(), 1)));
    let raw: Vec<f32> = (0..16_000_000).map(|i| (i % 1000) as f32 * 0.01 - 5.0).collect();
    time("host exp 16M (libm)", 0.0, || raw.iter().map(|x| x.exp()).sum::<f32>());
    let mut outv = vec![0f32; raw.len()];
    time("host exp_f32 16M 1 thread", 0.0, || { for (o, &x) in outv.iter_mut().zip(&raw) { *o = exp_f32(x); } outv[5] });
    time("max_dim [2048,8000]", 0.0, || s(logits.clone().max_dim(1)));
    time("sum_dim [2048,8000]", 0.0, || s(logits.clone().sum_dim(1)));
    time("exp [2048,8000]", 0.0, || s(logits.clone().exp()));
    let m = logits.clone().max_dim(1);
    time("sub row [2048,8000]", 0.0, || s(logits.clone() - m.clone()));
    time("sigmoid [2048,1408]", 0.0, || s(burn::tensor::activation::sigmoid(y.clone())));
    time("silu [2048,1408]", 0.0, || s(silu(y.clone())));
    time("y * y [2048,1408]", 0.0, || s(y.clone() * y.clone()));
    let q = Tensor::<B, 4>::random([b, h, t, hd], burn::tensor::Distribution::Normal(0.0, 1.0), &dev);
    time("scores q k^T [8,8,256,256]", 2.0 * (b * h * t * t * hd) as f64, || {
        q.clone().matmul(q.clone().swap_dims(2, 3)).slice([0..1, 0..1, 0..1, 0..1]).into_scalar()
    });
    let sc = q.clone().matmul(q.clone().swap_dims(2, 3));
    time("softmax scores", 0.0, || softmax(sc.clone(), 3).slice([0..1, 0..1, 0..1, 0..1]).into_scalar());
    let x3 = x.clone().reshape([b, t, d]);
    time("split heads + contiguous", 0.0, || {
        x3.clone().reshape([b, t, h, hd]).swap_dims(1, 2).reshape([b * h * t, hd]).slice([0..1, 0..1]).into_scalar()
    });
    time("rmsnorm", 0.0, || {
        let var = x3.clone().powf_scalar(2.0).mean_dim(2);
        (x3.clone() * var.add_scalar(1e-5).sqrt().recip()).slice([0..1, 0..1, 0..1]).into_scalar()
    });
}

#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const HI: f32 = 88.722_83; // ln(f32::MAX)
    const LO: f32 = -88.0;
    const LOG2E: f32 = core::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to the nearest integer and leaves it in the low mantissa
    // bits, so neither `floor` nor a float-to-int cast is needed: every step below is a
    // plain SSE2/AVX lane operation and the loops calling this vectorise.
    const ROUND: f32 = 12_582_912.0;
    let xc = if x < LO { LO } else if x > HI { HI } else { x };
    let kr = xc * LOG2E + ROUND;
    let k_bits = kr.to_bits() as i32 - ROUND.to_bits() as i32;
    let k = kr - ROUND;
    let r = xc - k * LN2_HI - k * LN2_LO;
    let p = ((((1.987_569_2e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
        * r
        + 1.666_666_5e-1)
        * r
        + 5.000_000_1e-1;
    let y = p * (r * r) + r + 1.0;
    // 2^k as 2^(k/2) * 2^(k - k/2): both biased exponents stay normal for k in -127..=128.
    let half = k_bits >> 1;
    let s1 = f32::from_bits(((half + 127) as u32) << 23);
    let s2 = f32::from_bits(((k_bits - half + 127) as u32) << 23);
    let out = y * s1 * s2;
    let out = if x < LO { 0.0 } else { out };
    let out = if x > HI { f32::INFINITY } else { out };
    // NaN compares false everywhere above; hand it back unchanged.
    if x.is_nan() { x } else { out }
}

