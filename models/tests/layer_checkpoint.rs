//! Per-layer recomputation (`models::layer_checkpoint`, the checkpointed training backend):
//! the loss and every parameter's gradient equal the plain backend's, for full fine-tuning
//! and for LoRA on a frozen base.

use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use models::backend::{CpuTrain, CpuTrainCheckpointed};
use models::lora::LoraSettings;
use models::mask::AttentionLayout;
use models::{CausalLm, ForwardInput};

fn fixture() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/tiny-llama")
}

/// `(dims, values)` of each parameter's gradient, in module order.
type Grads = Vec<(Vec<usize>, Vec<f32>)>;

/// Loss and the gradient of every parameter that has one, in module order.
fn step<B: AutodiffBackend>(lora: bool) -> (f32, Grads) {
    let device = Default::default();
    let (_, mut model) = models::checkpoint::load_model::<B>(&fixture(), &device).unwrap();
    if lora {
        let settings = LoraSettings {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: vec!["all-linear".into()],
            use_rslora: false,
            use_dora: false,
        };
        model = model.with_lora(&settings, 3).unwrap();
        // Non-zero B, so every adapter matrix has a non-zero gradient.
        model = perturb_lora_b(model);
    }
    let (b, t) = (2, 9);
    let ids: Vec<Vec<u32>> = (0..b)
        .map(|r| (0..t).map(|i| ((r * 31 + i * 7) % 60 + 3) as u32).collect())
        .collect();
    let positions: Vec<Vec<i64>> = (0..b).map(|_| (0..t as i64).collect()).collect();
    let input = ForwardInput::from_host(&ids, &positions, &AttentionLayout::causal(b, t), &device);
    let logits = model.forward(input);
    let probe = Tensor::<B, 3>::from_data(
        TensorData::new(
            (0..logits.shape().num_elements())
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                .collect::<Vec<f32>>(),
            logits.dims(),
        ),
        &device,
    );
    let loss = (logits * probe).sum();
    let value: f32 = loss.clone().into_scalar().elem();
    let grads = loss.backward();
    struct Collect<'a, B: AutodiffBackend> {
        grads: &'a B::Gradients,
        out: Vec<(Vec<usize>, Vec<f32>)>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Collect<'_, B> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            if let Some(g) = p.val().grad(self.grads) {
                self.out
                    .push((g.dims().to_vec(), g.into_data().to_vec::<f32>().unwrap()));
            }
        }
    }
    let mut c = Collect::<B> {
        grads: &grads,
        out: vec![],
    };
    model.visit(&mut c);
    (value, c.out)
}

fn perturb_lora_b<B: Backend>(mut model: CausalLm<B>) -> CausalLm<B> {
    for (i, (_, _, p)) in model.linear_layers_mut().into_iter().enumerate() {
        if let Some(l) = p.lora.as_mut() {
            let [r, d] = l.b.dims();
            let w: Vec<f32> = (0..r * d)
                .map(|j| ((j + i) % 7) as f32 * 0.01 - 0.03)
                .collect();
            let t = Tensor::from_data(TensorData::new(w, [r, d]), &l.b.device());
            l.b = Param::from_tensor(t);
        }
    }
    model
}

fn check(lora: bool) {
    let (plain_loss, plain) = step::<CpuTrain>(lora);
    let (ckpt_loss, ckpt) = step::<CpuTrainCheckpointed>(lora);
    assert!((plain_loss - ckpt_loss).abs() <= 1e-5 * plain_loss.abs().max(1.0));
    assert_eq!(
        plain.iter().map(|g| g.0.clone()).collect::<Vec<_>>(),
        ckpt.iter().map(|g| g.0.clone()).collect::<Vec<_>>(),
        "the same parameters get gradients"
    );
    let largest = plain
        .iter()
        .flat_map(|g| &g.1)
        .fold(0f32, |m, x| m.max(x.abs()));
    for ((dims, a), (_, b)) in plain.iter().zip(&ckpt) {
        for (x, y) in a.iter().zip(b) {
            assert!(
                (x - y).abs() <= 1e-5 * largest.max(1.0),
                "{dims:?}: {x} vs {y} (largest {largest})"
            );
        }
    }
}

#[test]
fn per_layer_recomputation_gives_the_plain_gradients_in_full_fine_tuning() {
    check(false);
}

#[test]
fn per_layer_recomputation_gives_the_plain_gradients_with_lora() {
    check(true);
}
