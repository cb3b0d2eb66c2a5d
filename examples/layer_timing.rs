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
    println!(
        "{name:>28}: {ms:8.2} ms  {:7.1} GFLOP/s  ({acc:.1})",
        flops / ms / 1e6
    );
}

fn main() {
    trainers::allocator::tune_for_training();
    let dev = Default::default();
    let (b, t, d, ff, v, h, hd) = (
        8usize, 256usize, 512usize, 1408usize, 8000usize, 8usize, 64usize,
    );
    let n = b * t;
    let x = Tensor::<B, 2>::random([n, d], burn::tensor::Distribution::Normal(0.0, 1.0), &dev);
    let w = Tensor::<B, 2>::random([d, ff], burn::tensor::Distribution::Normal(0.0, 0.02), &dev);
    let w2 = Tensor::<B, 2>::random([ff, d], burn::tensor::Distribution::Normal(0.0, 0.02), &dev);
    let wd = Tensor::<B, 2>::random([d, d], burn::tensor::Distribution::Normal(0.0, 0.02), &dev);
    let wv = Tensor::<B, 2>::random([d, v], burn::tensor::Distribution::Normal(0.0, 0.02), &dev);
    let y = Tensor::<B, 2>::random([n, ff], burn::tensor::Distribution::Normal(0.0, 1.0), &dev);
    let s = |t: Tensor<B, 2>| t.slice([0..1, 0..1]).into_scalar();
    time(
        "x[2048,512] @ [512,1408]",
        2.0 * (n * d * ff) as f64,
        || s(x.clone().matmul(w.clone())),
    );
    time(
        "y[2048,1408] @ [1408,512]",
        2.0 * (n * d * ff) as f64,
        || s(y.clone().matmul(w2.clone())),
    );
    time("x @ [512,512]", 2.0 * (n * d * d) as f64, || {
        s(x.clone().matmul(wd.clone()))
    });
    time("x^T @ y (weight grad)", 2.0 * (n * d * ff) as f64, || {
        s(x.clone().transpose().matmul(y.clone()))
    });
    time("y @ w^T (input grad)", 2.0 * (n * d * ff) as f64, || {
        s(y.clone().matmul(w.clone().transpose()))
    });
    time("x @ [512,8000] lm head", 2.0 * (n * d * v) as f64, || {
        s(x.clone().matmul(wv.clone()))
    });
    let logits = x.clone().matmul(wv.clone());
    time("log_softmax [2048,8000]", 0.0, || {
        s(log_softmax(logits.clone(), 1))
    });
    time("max_dim [2048,8000]", 0.0, || s(logits.clone().max_dim(1)));
    time("sum_dim [2048,8000]", 0.0, || s(logits.clone().sum_dim(1)));
    time("exp [2048,8000]", 0.0, || s(logits.clone().exp()));
    let m = logits.clone().max_dim(1);
    time("sub row [2048,8000]", 0.0, || s(logits.clone() - m.clone()));
    time("sigmoid [2048,1408]", 0.0, || {
        s(burn::tensor::activation::sigmoid(y.clone()))
    });
    time("silu [2048,1408]", 0.0, || s(silu(y.clone())));
    time("y * y [2048,1408]", 0.0, || s(y.clone() * y.clone()));
    let q = Tensor::<B, 4>::random(
        [b, h, t, hd],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &dev,
    );
    time(
        "scores q k^T [8,8,256,256]",
        2.0 * (b * h * t * t * hd) as f64,
        || {
            q.clone()
                .matmul(q.clone().swap_dims(2, 3))
                .slice([0..1, 0..1, 0..1, 0..1])
                .into_scalar()
        },
    );
    let sc = q.clone().matmul(q.clone().swap_dims(2, 3));
    time("softmax scores", 0.0, || {
        softmax(sc.clone(), 3)
            .slice([0..1, 0..1, 0..1, 0..1])
            .into_scalar()
    });
    let x3 = x.clone().reshape([b, t, d]);
    time("split heads + contiguous", 0.0, || {
        x3.clone()
            .reshape([b, t, h, hd])
            .swap_dims(1, 2)
            .reshape([b * h * t, hd])
            .slice([0..1, 0..1])
            .into_scalar()
    });
    time("rmsnorm", 0.0, || {
        let var = x3.clone().powf_scalar(2.0).mean_dim(2);
        (x3.clone() * var.add_scalar(1e-5).sqrt().recip())
            .slice([0..1, 0..1, 0..1])
            .into_scalar()
    });
}
