//! Wall time of training attention at a Qwen2.5-0.5B shape (14 query heads, 2 KV heads,
//! head_dim 64), batch 1 x T tokens, causal: the inference forward (what a checkpointed
//! layer's first pass runs) and the autodiff forward + backward (what its recomputation
//! runs), in the grouped layout (burn's attention op, whole causal mask) and through
//! `models::causal_attention` (the fused flash kernels). A profiling aid for issue 18:
//! `cargo run --release --example attention_timing -- [T] [fused]`.
use burn::backend::Flex;
use burn::prelude::*;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use std::time::Instant;

#[global_allocator]
static GLOBAL: trainers::allocator::MiMalloc = trainers::allocator::MiMalloc;

type Inner = Flex;
type Train = burn::backend::Autodiff<Flex>;

const HEADS: usize = 14;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 64;

fn inputs<B: Backend>(t: usize) -> [Tensor<B, 4>; 3] {
    let dev = Default::default();
    let normal = burn::tensor::Distribution::Normal(0.0, 1.0);
    let group = HEADS / KV_HEADS;
    [
        Tensor::random([1, KV_HEADS, group * t, HEAD_DIM], normal, &dev),
        Tensor::random([1, KV_HEADS, t, HEAD_DIM], normal, &dev),
        Tensor::random([1, KV_HEADS, t, HEAD_DIM], normal, &dev),
    ]
}

/// The causal mask in the grouped layout, `[1, KVH, group * T, T]`, true = blocked.
fn grouped_causal<B: Backend>(t: usize) -> Tensor<B, 4, Bool> {
    let mask = models::mask::AttentionLayout::causal(1, t).to_tensor::<B>(&Default::default());
    let group = HEADS / KV_HEADS;
    mask.reshape([1, 1, 1, t, t])
        .expand([1, KV_HEADS, group, t, t])
        .reshape([1, KV_HEADS, group * t, t])
}

fn options() -> AttentionModuleOptions {
    AttentionModuleOptions {
        scale: Some(1.0 / (HEAD_DIM as f64).sqrt()),
        softcap: None,
        is_causal: false,
    }
}

fn seconds(mut f: impl FnMut()) -> f64 {
    f();
    let runs = 3;
    let start = Instant::now();
    for _ in 0..runs {
        f();
    }
    start.elapsed().as_secs_f64() / runs as f64
}

fn main() {
    let t: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(4096);
    let flops = 4.0 * (HEADS * t * t * HEAD_DIM) as f64;
    // `fused` as the second argument times the fused path alone (for a profiler).
    let grouped = std::env::args().nth(2).as_deref() != Some("fused");
    let (fwd, train) = if grouped {
        let [q, k, v] = inputs::<Inner>(t);
        let mask = grouped_causal::<Inner>(t);
        let fwd = seconds(|| {
            let o = attention(
                q.clone(),
                k.clone(),
                v.clone(),
                Some(mask.clone()),
                None,
                options(),
            );
            let _ = o.sum().into_scalar();
        });
        let [q, k, v] = inputs::<Train>(t).map(|x| x.require_grad());
        let mask = grouped_causal::<Train>(t);
        let train = seconds(|| {
            let o = attention(
                q.clone(),
                k.clone(),
                v.clone(),
                Some(mask.clone()),
                None,
                options(),
            );
            let grads = o.sum().backward();
            let _ = q.grad(&grads).unwrap().sum().into_scalar();
        });
        (fwd, train)
    } else {
        (f64::NAN, f64::NAN)
    };
    let scale = 1.0 / (HEAD_DIM as f64).sqrt();
    let plain = |b: usize| -> [usize; 4] { [b, HEADS, t, HEAD_DIM] };
    let causal = models::mask::AttentionLayout::causal(1, t);
    let [_, k, v] = inputs::<Inner>(t);
    let q = Tensor::<Inner, 4>::random(
        plain(1),
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &Default::default(),
    );
    let mask = causal.to_tensor::<Inner>(&Default::default());
    let fused_fwd = seconds(|| {
        let o =
            models::causal_attention::forward(q.clone(), k.clone(), v.clone(), mask.clone(), scale);
        let _ = o.sum().into_scalar();
    });
    let [_, k, v] = inputs::<Train>(t).map(|x| x.require_grad());
    let q = Tensor::<Train, 4>::random(
        plain(1),
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &Default::default(),
    )
    .require_grad();
    let mask = causal.to_tensor::<Train>(&Default::default());
    let fused_train = seconds(|| {
        let o =
            models::causal_attention::forward(q.clone(), k.clone(), v.clone(), mask.clone(), scale);
        let grads = o.sum().backward();
        let _ = q.grad(&grads).unwrap().sum().into_scalar();
    });
    println!(
        "{{\"tokens\": {t}, \"grouped_inference_forward_s\": {fwd:.3}, \"grouped_train_forward_backward_s\": {train:.3}, \
         \"fused_inference_forward_s\": {fused_fwd:.3}, \"fused_train_forward_backward_s\": {fused_train:.3}, \
         \"full_matrix_forward_gflop\": {:.1}}}",
        flops / 1e9
    );
}
