//! The fused causal attention (`models::causal_attention`, burn-flex's flash kernels with
//! causal block skipping) equals attention written out with plain tensor ops, in value and
//! in the gradients of queries, keys and values; and a model long enough to take it gives
//! the loss and parameter gradients of the grouped-query path it replaces.

use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::activation::softmax;
use burn::tensor::backend::AutodiffBackend;
use models::backend::{Cpu, CpuTrain, CpuTrainCheckpointed};
use models::mask::AttentionLayout;
use models::{causal_attention, ForwardInput};

mod common;
use common::values;

const B: usize = 2;
const H: usize = 4;
const KVH: usize = 2;
const D: usize = 8;

/// Row 0: right padding from `pad` on; row 1: two packed segments (or left padding).
fn layout(t: usize, pad: usize, left_pad: bool) -> AttentionLayout {
    let mut key_valid = vec![(0..t).map(|j| j < pad).collect::<Vec<_>>()];
    key_valid.push(match left_pad {
        true => (0..t).map(|j| j >= t - pad).collect(),
        false => vec![true; t],
    });
    let segments = (!left_pad).then(|| {
        vec![
            vec![0; t],
            (0..t).map(|j| u32::from(j >= t / 3)).collect::<Vec<_>>(),
        ]
    });
    AttentionLayout {
        batch: B,
        q_len: t,
        q_offset: 0,
        key_valid,
        segments,
    }
}

fn tensor<Bk: Backend>(dims: [usize; 4], seed: u64) -> Tensor<Bk, 4> {
    let n = dims.iter().product();
    Tensor::from_data(TensorData::new(values(n, seed), dims), &Default::default())
}

/// Softmax attention written out; rows with every key blocked give 0, as the kernels do.
fn reference<Bk: Backend>(
    q: Tensor<Bk, 4>,
    k: Tensor<Bk, 4>,
    v: Tensor<Bk, 4>,
    mask: Tensor<Bk, 4, Bool>,
) -> Tensor<Bk, 4> {
    let t = q.dims()[2];
    let repeat = |x: Tensor<Bk, 4>| {
        x.reshape([B, KVH, 1, t, D])
            .expand([B, KVH, H / KVH, t, D])
            .reshape([B, H, t, D])
    };
    let scores = q
        .matmul(repeat(k).transpose())
        .mul_scalar(1.0 / (D as f64).sqrt());
    let blocked = mask.clone().expand([B, H, t, t]);
    let p = softmax(scores.mask_fill(blocked.clone(), -1e30), 3);
    let all_blocked = blocked.bool_not().int().sum_dim(3).equal_elem(0);
    let p = p.mask_fill(all_blocked.expand([B, H, t, t]), 0.0);
    p.matmul(repeat(v))
}

type Outcome = (Vec<f32>, Vec<Vec<f32>>);

fn run<Bk: AutodiffBackend>(t: usize, left_pad: bool, fused: bool) -> Outcome {
    let device = Default::default();
    let q = tensor::<Bk>([B, H, t, D], 1).require_grad();
    let k = tensor::<Bk>([B, KVH, t, D], 2).require_grad();
    let v = tensor::<Bk>([B, KVH, t, D], 3).require_grad();
    let mask = layout(t, t - 37, left_pad).to_tensor::<Bk>(&device);
    let scale = 1.0 / (D as f64).sqrt();
    let out = match fused {
        true => causal_attention::forward(q.clone(), k.clone(), v.clone(), mask, scale),
        false => reference(q.clone(), k.clone(), v.clone(), mask),
    };
    let probe = tensor::<Bk>([B, H, t, D], 4);
    let value: Vec<f32> = out.to_data().to_vec().unwrap();
    let grads = (out * probe).sum().backward();
    let g = |x: &Tensor<Bk, 4>| -> Vec<f32> { x.grad(&grads).unwrap().to_data().to_vec().unwrap() };
    (value, vec![g(&q), g(&k), g(&v)])
}

fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(x.is_finite(), "{what}[{i}] = {x}");
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{what}[{i}]: {x} vs {y}"
        );
    }
}

#[test]
fn fused_attention_equals_the_written_out_softmax_in_value_and_gradients() {
    // 300 rows: a full 256-row block and a partial one, key tiles of 64 and a partial one.
    for (t, left_pad) in [(300, false), (300, true), (70, false)] {
        let want = run::<CpuTrain>(t, left_pad, false);
        for (name, got) in [
            ("fused", run::<CpuTrain>(t, left_pad, true)),
            (
                "fused, checkpointed",
                run::<CpuTrainCheckpointed>(t, left_pad, true),
            ),
        ] {
            let what = format!("{name} t {t} left_pad {left_pad}");
            assert_close(&got.0, &want.0, 1e-5, &format!("{what} output"));
            for (i, (g, w)) in got.1.iter().zip(&want.1).enumerate() {
                assert_close(g, w, 1e-5, &format!("{what} grad {}", ["q", "k", "v"][i]));
            }
        }
        // The inference backend (flex's flash forward with causal blocks skipped).
        let device = Default::default();
        let mask = layout(t, t - 37, left_pad).to_tensor::<Cpu>(&device);
        let out = causal_attention::forward(
            tensor::<Cpu>([B, H, t, D], 1),
            tensor::<Cpu>([B, KVH, t, D], 2),
            tensor::<Cpu>([B, KVH, t, D], 3),
            mask,
            1.0 / (D as f64).sqrt(),
        );
        let got: Vec<f32> = out.to_data().to_vec().unwrap();
        assert_close(&got, &want.0, 1e-5, &format!("inference t {t}"));
    }
}

fn fixture() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/tiny-llama")
}

/// Logits at the first `kept` slots and every parameter's gradient of a probe-weighted sum
/// of them, for a tiny Llama over `t` tokens (two rows, one left-padded). Causality makes
/// both independent of the tokens past `kept`.
fn model_step<Bk: AutodiffBackend>(t: usize, kept: usize) -> (Vec<f32>, Vec<Vec<f32>>) {
    let device = Default::default();
    let (_, model) = models::checkpoint::load_model::<Bk>(&fixture(), &device).unwrap();
    let ids: Vec<Vec<u32>> = (0..B)
        .map(|r| (0..t).map(|i| ((r * 31 + i * 7) % 60 + 3) as u32).collect())
        .collect();
    let pad = 50;
    let mask: Vec<Vec<u8>> = vec![vec![1; t], (0..t).map(|j| u8::from(j >= pad)).collect()];
    let positions = models::mask::positions_from_attention_mask(&mask);
    let layout = AttentionLayout::from_attention_mask(&mask);
    let logits = model
        .forward(ForwardInput::from_host(&ids, &positions, &layout, &device))
        .slice(s![.., 0..kept]);
    let n = logits.shape().num_elements();
    let probe = Tensor::<Bk, 3>::from_data(TensorData::new(values(n, 9), logits.dims()), &device);
    let value: Vec<f32> = logits.to_data().to_vec().unwrap();
    let grads = (logits * probe).sum().backward();
    struct Collect<'a, Bk: AutodiffBackend>(&'a Bk::Gradients, Vec<Vec<f32>>);
    impl<Bk: AutodiffBackend> ModuleVisitor<Bk> for Collect<'_, Bk> {
        fn visit_float<const N: usize>(&mut self, p: &Param<Tensor<Bk, N>>) {
            if let Some(g) = p.val().grad(self.0) {
                self.1
                    .push(g.into_data().convert::<f32>().to_vec().unwrap());
            }
        }
    }
    let mut c = Collect::<Bk>(&grads, vec![]);
    model.visit(&mut c);
    (value, c.1)
}

#[test]
fn a_long_sequence_trains_as_through_the_grouped_path() {
    // 1030 tokens take the fused path, 1000 the grouped one; the first 1000 slots' logits
    // and the gradients of a loss over them must agree.
    let (long, short) = (1030, 1000);
    assert!(causal_attention::fused::<CpuTrain>(long));
    assert!(!causal_attention::fused::<CpuTrain>(short));
    let (want, want_grads) = model_step::<CpuTrain>(short, short);
    for (got, grads) in [
        model_step::<CpuTrain>(long, short),
        model_step::<CpuTrainCheckpointed>(long, short),
    ] {
        assert_close(&got, &want, 1e-5, "logits");
        assert_eq!(grads.len(), want_grads.len());
        for (g, w) in grads.iter().zip(&want_grads) {
            let scale = w.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
            for (x, y) in g.iter().zip(w) {
                assert!(
                    (x - y).abs() <= 1e-5 * scale,
                    "{x} vs {y} (largest {scale})"
                );
            }
        }
    }
}
