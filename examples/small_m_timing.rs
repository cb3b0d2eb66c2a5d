//! Decode-shaped matmul latency (a profiling aid).
use burn::backend::Flex;
use burn::prelude::*;
use std::time::Instant;

#[global_allocator]
static GLOBAL: trainers::allocator::MiMalloc = trainers::allocator::MiMalloc;

fn main() {
    trainers::allocator::tune_for_training();
    let dev = Default::default();
    for (m, k, n) in [
        (8, 512, 512),
        (8, 512, 256),
        (8, 512, 1408),
        (8, 1408, 512),
        (8, 512, 8000),
        (8, 512, 16),
        (8, 16, 512),
        (8, 512, 1024),
        (8, 512, 2816),
    ] {
        let a = Tensor::<Flex, 2>::random([m, k], burn::tensor::Distribution::Default, &dev);
        // Enough distinct matrices (>= 256 MB) that each product reads its matrix from memory.
        let count = (64 << 20) / (k * n) + 1;
        let ws: Vec<_> = (0..count)
            .map(|_| Tensor::<Flex, 2>::random([k, n], burn::tensor::Distribution::Default, &dev))
            .collect();
        let _ = a.clone().matmul(ws[0].clone()).into_data();
        let reps = 200.max(count);
        let s = Instant::now();
        for i in 0..reps {
            let _ = a.clone().matmul(ws[i % count].clone());
        }
        let us = s.elapsed().as_secs_f64() * 1e6 / reps as f64;
        println!(
            "[{m},{k}]x[{k},{n}]: {us:8.1} us  {:6.1} GB/s of weights",
            (k * n * 4) as f64 / us / 1e3
        );
    }
    let x = Tensor::<Flex, 2>::random([8, 512], burn::tensor::Distribution::Default, &dev);
    let reps = 1000;
    let s = Instant::now();
    for _ in 0..reps {
        let _ = x.clone() + x.clone();
    }
    println!(
        "add [8,512]: {:.1} us",
        s.elapsed().as_secs_f64() * 1e6 / reps as f64
    );
}
