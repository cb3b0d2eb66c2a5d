//! The training backend's patched ops (vendor/burn-autodiff: attention, softmax and
//! log-softmax with their own backward) against the same functions written op by op, whose
//! gradients autodiff derives: outputs and gradients must agree. Attention is checked with a
//! causal mask broadcast over heads and a fully masked row.

use burn::prelude::*;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{activation::softmax, Bool};
use models::backend::CpuTrain;

type B = CpuTrain;

mod common;
use common::values;

fn param(shape: [usize; 4], seed: u64) -> Tensor<B, 4> {
    let n = shape.iter().product();
    Tensor::<B, 4>::from_data(TensorData::new(values(n, seed), shape), &Default::default())
        .require_grad()
}

/// Causal mask `[b, 1, t, t]` (true = masked) where the last row of batch 0 is masked entirely.
fn mask(b: usize, t: usize) -> Tensor<B, 4, Bool> {
    let mut m = vec![false; b * t * t];
    for bi in 0..b {
        for i in 0..t {
            for j in 0..t {
                m[(bi * t + i) * t + j] = j > i || (bi == 0 && i == t - 1);
            }
        }
    }
    Tensor::from_data(TensorData::new(m, [b, 1, t, t]), &Default::default())
}

/// Attention op by op, NaN-safe for fully masked rows as burn's fallback is.
fn reference(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Tensor<B, 4, Bool>,
    scale: f64,
) -> Tensor<B, 4> {
    let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale);
    let [b, h, t, s] = scores.dims();
    let full = mask.clone().expand([b, h, t, s]);
    let probs = softmax(scores.mask_fill(full.clone(), -1e30), 3);
    probs.mask_fill(full, 0.0).matmul(v)
}

fn host(t: Tensor<<B as burn::tensor::backend::AutodiffBackend>::InnerBackend, 4>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len());
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let scale = b.iter().map(|x| x.abs()).fold(0f32, f32::max);
    assert!(
        worst <= 1e-5 * (1.0 + scale),
        "{what}: largest difference {worst} (largest value {scale})"
    );
}

/// The patched attention's output and gradients against `reference` for one shape.
fn check_attention(b: usize, h: usize, t: usize, d: usize) {
    let scale = 1.0 / (d as f64).sqrt();
    let upstream = values(b * h * t * d, 99);
    let upstream =
        Tensor::<B, 4>::from_data(TensorData::new(upstream, [b, h, t, d]), &Default::default());
    let run = |fused: bool| {
        let (q, k, v) = (
            param([b, h, t, d], 1),
            param([b, h, t, d], 2),
            param([b, h, t, d], 3),
        );
        let out = if fused {
            let m = mask(b, t).expand([b, h, t, t]);
            let options = AttentionModuleOptions {
                scale: Some(scale),
                softcap: None,
                is_causal: false,
            };
            attention(q.clone(), k.clone(), v.clone(), Some(m), None, options)
        } else {
            reference(q.clone(), k.clone(), v.clone(), mask(b, t), scale)
        };
        let grads = (out.clone() * upstream.clone()).sum().backward();
        let g = |x: &Tensor<B, 4>| host(x.grad(&grads).unwrap());
        (host(out.inner()), g(&q), g(&k), g(&v))
    };
    let (fused, reference) = (run(true), run(false));
    assert_close(&fused.0, &reference.0, "output");
    assert_close(&fused.1, &reference.1, "query gradient");
    assert_close(&fused.2, &reference.2, "key gradient");
    assert_close(&fused.3, &reference.3, "value gradient");
    // The fully masked row gives zeros, not NaN.
    assert!(fused.0[(t - 1) * d..t * d].iter().all(|&x| x == 0.0));
}

#[test]
fn attention_gradients_match_the_op_by_op_attention() {
    check_attention(2, 3, 17, 8);
}

/// Past 4M score elements per call the probabilities are not kept: the forward and the
/// backward run over blocks of query rows (776 and 124 rows here) and recompute them.
#[test]
fn blockwise_recomputed_attention_matches_the_op_by_op_attention() {
    check_attention(2, 3, 900, 4);
}

#[test]
fn softmax_and_log_softmax_gradients_match_the_op_by_op_versions() {
    let (rows, cols) = (7, 300);
    let device = Default::default();
    let x0 = values(rows * cols, 21)
        .iter()
        .map(|v| v * 8.0)
        .collect::<Vec<_>>();
    let upstream = Tensor::<B, 2>::from_data(
        TensorData::new(values(rows * cols, 22), [rows, cols]),
        &device,
    );
    let run = |patched: bool, log: bool| {
        let x = Tensor::<B, 2>::from_data(TensorData::new(x0.clone(), [rows, cols]), &device)
            .require_grad();
        let y = match (patched, log) {
            (true, true) => burn::tensor::activation::log_softmax(x.clone(), 1),
            (true, false) => softmax(x.clone(), 1),
            (false, _) => {
                let shifted = x.clone() - x.clone().detach().max_dim(1);
                let lse = shifted.clone().exp().sum_dim(1).log();
                let logp = shifted - lse;
                if log {
                    logp
                } else {
                    logp.exp()
                }
            }
        };
        let grads = (y.clone() * upstream.clone()).sum().backward();
        let g = x.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap();
        (y.inner().into_data().to_vec::<f32>().unwrap(), g)
    };
    for log in [true, false] {
        let (a, b) = (run(true, log), run(false, log));
        assert_close(&a.0, &b.0, if log { "log_softmax" } else { "softmax" });
        assert_close(
            &a.1,
            &b.1,
            if log {
                "log_softmax gradient"
            } else {
                "softmax gradient"
            },
        );
    }
}
