//! Static shapes, for backends that compile a kernel per tensor shape: a batch padded to a
//! width bucket, with empty rows and bucketed trained positions, gives every method the loss,
//! metrics and gradients of the exact batch; and whole runs see a bounded set of shapes.

mod common;

use std::path::Path;
use std::sync::atomic::AtomicBool;

use burn::module::AutodiffModule;
use burn::prelude::*;
use common::{grad_diff, root, tiny_model};
use datasets::batch::Padding;
use datasets::pack::PackedRow;
use datasets::tokenize::TokenizedPair;
use models::backend::{Cpu, CpuTrain};
use models::checkpoint::load_model;
use models::shape_audit::{count, signatures, Recording};
use models::CausalLm;
use trainers::accumulate::accumulate_gradients;
use trainers::distill::{teacher_top_k, Distill, DistillSettings, TeacherSource};
use trainers::dpo::{Dpo, DpoSettings};
use trainers::method::{BatchShape, Method};
use trainers::reference::Reference;
use trainers::reward::{Reward, RewardSettings};
use trainers::rl::grpo::{grpo_loss_sum, GrpoSettings};
use trainers::rl::rollout::{completion_batch, padded, token_outputs, Completion};
use trainers::sft::Sft;
use trainers::{train, Recipe, TrainOptions};

const BUCKET: usize = 64;

/// A deterministic pseudo-random sequence of token ids in `3..vocab`.
fn ids(seed: usize, len: usize, vocab: usize) -> Vec<u32> {
    (0..len)
        .map(|i| ((seed * 7919 + i * 104_729 + i * i * 31) % (vocab - 3) + 3) as u32)
        .collect()
}

/// Rows of varied length whose second half is trained.
fn sft_rows(n: usize, vocab: usize) -> Vec<PackedRow> {
    (0..n)
        .map(|r| {
            let len = 9 + (r * 13) % 50;
            PackedRow {
                ids: ids(r, len, vocab),
                trained: (0..len).map(|i| i >= len / 2).collect(),
                positions: (0..len as u32).collect(),
                segments: vec![1; len],
            }
        })
        .collect()
}

fn pairs(n: usize, vocab: usize) -> Vec<TokenizedPair> {
    (0..n)
        .map(|r| TokenizedPair {
            prompt: ids(r, 4 + r % 9, vocab),
            chosen: ids(r + 100, 3 + (r * 5) % 17, vocab),
            rejected: ids(r + 200, 2 + (r * 3) % 23, vocab),
            margin: None,
        })
        .collect()
}

fn shapes(pad: Padding) -> BatchShape {
    BatchShape {
        micro_batch: 3,
        eval_batch: 3,
        pad,
        seed: 5,
    }
}

fn exact() -> Padding {
    Padding::exact(0)
}

fn bucketed() -> Padding {
    Padding {
        id: 0,
        multiple_of: BUCKET,
    }
}

/// Summed eval loss over the weight, and the metric sums, of a method's held-out batches
/// (7 rows in batches of 3: the last one holds empty rows when bucketed).
fn eval_loss<M: Method<CpuTrain>>(m: &mut M, model: &CausalLm<CpuTrain>) -> (f64, Vec<f64>) {
    let inner = model.valid();
    let (mut loss, mut weight) = (0.0, 0.0);
    let mut metrics: Vec<f64> = vec![];
    for b in m.eval_batches(model).unwrap() {
        let out = m.loss(&inner, &b);
        loss += out.loss_sum.into_scalar() as f64;
        weight += m.weight(&b);
        metrics.resize(out.metric_sums.len(), 0.0);
        for (acc, (_, v)) in metrics.iter_mut().zip(&out.metric_sums) {
            *acc += v;
        }
    }
    (loss / weight, metrics)
}

fn assert_close(what: &str, a: f64, b: f64, tol: f64) {
    assert!(
        (a - b).abs() <= tol * (1.0 + a.abs().max(b.abs())),
        "{what}: exact {a} vs bucketed {b}"
    );
}

fn assert_same_eval<M: Method<CpuTrain>>(
    what: &str,
    model: &CausalLm<CpuTrain>,
    make: impl Fn(Padding) -> M,
) {
    let (l0, m0) = eval_loss(&mut make(exact()), model);
    let (l1, m1) = eval_loss(&mut make(bucketed()), model);
    assert!(l0.is_finite(), "{what}: loss {l0}");
    assert_close(&format!("{what} loss"), l0, l1, 1e-6);
    assert_eq!(m0.len(), m1.len(), "{what}: metrics");
    for (i, (a, b)) in m0.iter().zip(&m1).enumerate() {
        assert_close(&format!("{what} metric {i}"), *a, *b, 1e-5);
    }
}

fn model() -> CausalLm<CpuTrain> {
    load_model::<CpuTrain>(tiny_model(), &Default::default())
        .unwrap()
        .1
}

#[test]
fn bucketed_sft_steps_give_the_exact_loss_and_gradients() {
    let model = model();
    let rows = sft_rows(5, model.vocab_size());
    // 5 rows in micro-batches of 3: the second is short, and bucketed it gets an empty row.
    let step = |pad: Padding| {
        let mut m = Sft::new(rows.clone(), vec![], shapes(pad)).unwrap();
        let batches = Method::<CpuTrain>::next_step(&mut m, &model, 2)
            .unwrap()
            .unwrap();
        let rows_per_batch: Vec<usize> = batches.iter().map(|b| b.ids.len()).collect();
        let widths: Vec<usize> = batches.iter().map(|b| b.ids[0].len()).collect();
        (
            accumulate_gradients(&model, &m, &batches).unwrap(),
            rows_per_batch,
            widths,
        )
    };
    let (a, rows_a, _) = step(exact());
    let (b, rows_b, widths) = step(bucketed());
    assert_eq!(rows_a, vec![3, 2]);
    assert_eq!(
        rows_b,
        vec![3, 3],
        "the short micro-batch keeps the row count"
    );
    assert!(widths.iter().all(|w| w % BUCKET == 0), "{widths:?}");
    assert_close("SFT loss", a.loss, b.loss, 1e-6);
    assert_eq!(a.total_weight, b.total_weight);
    let (diff, largest) = grad_diff(&model, &a.grads, &b.grads);
    assert!(
        diff <= 1e-5 * largest.max(1.0),
        "gradients differ by {diff} (largest {largest})"
    );
}

#[test]
fn bucketed_eval_batches_give_every_method_its_exact_loss() {
    let model = model();
    let vocab = model.vocab_size();
    let rows = sft_rows(7, vocab);
    assert_same_eval("sft", &model, |pad| {
        Sft::new(rows.clone(), rows.clone(), shapes(pad)).unwrap()
    });

    let data = pairs(7, vocab);
    for loss_type in ["sigmoid", "ipo", "simpo"] {
        assert_same_eval(&format!("dpo {loss_type}"), &model, |pad| {
            let settings: DpoSettings =
                serde_json::from_value(serde_json::json!({ "loss_type": loss_type })).unwrap();
            let reference = if settings.needs_reference() {
                Reference::Frozen(Box::new(model.valid()))
            } else {
                Reference::None
            };
            Dpo::new(data.clone(), data.clone(), shapes(pad), settings, reference).unwrap()
        });
    }

    let rm = model.clone().with_reward_head(0.5, 5);
    assert_same_eval("reward", &rm, |pad| {
        Reward::new(
            data.clone(),
            data.clone(),
            shapes(pad),
            RewardSettings::default(),
        )
        .unwrap()
    });

    let teacher = load_model::<Cpu>(tiny_model(), &Default::default())
        .unwrap()
        .1;
    let settings = |top_k: Option<usize>| -> DistillSettings {
        serde_json::from_value(serde_json::json!({
            "teacher": "unused", "divergence": "jsd", "beta": 0.3, "temperature": 2.0,
            "alpha": 0.7, "top_k": top_k,
        }))
        .unwrap()
    };
    assert_same_eval("distill online", &model, |pad| {
        let source = TeacherSource::Online(Box::new(teacher.clone()));
        Distill::<CpuTrain>::new(
            rows.clone(),
            rows.clone(),
            shapes(pad),
            vec![],
            source,
            settings(None),
        )
        .unwrap()
    });
    assert_same_eval("distill cached top-k", &model, |pad| {
        let top = teacher_top_k(&teacher, &rows, 3, 5, pad);
        let source = TeacherSource::Cached {
            train: top.clone(),
            eval: top,
            k: 5,
            model: None,
        };
        Distill::<CpuTrain>::new(
            rows.clone(),
            rows.clone(),
            shapes(pad),
            vec![],
            source,
            settings(Some(5)),
        )
        .unwrap()
    });
}

/// Every gradient of `model`'s trainable parameters, in visiting order (the same order for
/// two models built the same way, whatever their backend).
fn gradients_in_order<B: burn::tensor::backend::AutodiffBackend>(
    model: &CausalLm<B>,
    grads: &burn::optim::GradientsParams,
) -> Vec<Vec<f32>> {
    use burn::module::{Module, ModuleVisitor, Param};
    struct Collect<'a> {
        grads: &'a burn::optim::GradientsParams,
        out: Vec<Vec<f32>>,
    }
    impl<B: burn::tensor::backend::AutodiffBackend> ModuleVisitor<B> for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.get::<B::InnerBackend, D>(p.id) {
                self.out
                    .push(g.into_data().convert::<f32>().to_vec().unwrap());
            }
        }
    }
    let mut c = Collect { grads, out: vec![] };
    model.visit(&mut c);
    c.out
}

/// The gradients of one step of `method` on the tiny model with LoRA on every linear
/// layer, on autodiff backend `B`.
fn lora_step<B, M>(make: impl Fn() -> M) -> (f64, Vec<Vec<f32>>)
where
    B: burn::tensor::backend::AutodiffBackend,
    M: Method<B>,
{
    let settings = models::lora::LoraSettings {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: vec!["all-linear".into()],
        use_rslora: false,
        use_dora: false,
    };
    let model = load_model::<B>(tiny_model(), &Default::default())
        .unwrap()
        .1
        .with_lora(&settings, 9)
        .unwrap();
    let mut m = make();
    let batches = m.next_step(&model, 2).unwrap().unwrap();
    let step = accumulate_gradients(&model, &m, &batches).unwrap();
    (step.loss, gradients_in_order(&model, &step.grads))
}

/// DPO whose reference is the policy with its adapters switched off.
fn dpo_with_adapters_off<B: burn::tensor::backend::AutodiffBackend>(
    pairs: &[TokenizedPair],
) -> Dpo<B> {
    let settings = DpoSettings::default();
    Dpo::new(
        pairs.to_vec(),
        vec![],
        shapes(exact()),
        settings,
        Reference::BaseOfAdapters,
    )
    .unwrap()
}

#[test]
fn gradient_checkpointing_changes_no_gradient() {
    use models::backend::CpuTrainCheckpointed;
    let vocab = model().vocab_size();
    let rows = sft_rows(6, vocab);
    let pairs = pairs(6, vocab);
    let sft = || Sft::new(rows.clone(), vec![], shapes(exact())).unwrap();
    let plain_sft = lora_step::<CpuTrain, _>(sft);
    let kept_sft = lora_step::<CpuTrainCheckpointed, _>(sft);
    let dpo_plain = lora_step::<CpuTrain, _>(|| dpo_with_adapters_off(&pairs));
    let dpo_kept = lora_step::<CpuTrainCheckpointed, _>(|| dpo_with_adapters_off(&pairs));
    for (what, (a, b)) in [
        ("sft", (plain_sft, kept_sft)),
        ("dpo", (dpo_plain, dpo_kept)),
    ] {
        assert_close(&format!("{what} loss"), a.0, b.0, 1e-6);
        assert_eq!(a.1.len(), b.1.len(), "{what}: trainable tensors");
        assert!(a.1.len() > 10, "{what}: LoRA adapters have gradients");
        let largest = a.1.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
        let diff =
            a.1.iter()
                .zip(&b.1)
                .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
                .fold(0f32, f32::max);
        assert!(
            diff <= 1e-5 * largest.max(1.0),
            "{what}: gradients differ by {diff} (largest {largest})"
        );
    }
}

/// One full fine-tuning SFT step's loss and gradients on the tiny Mixtral fixture (some of
/// whose experts get no token) with the load-balancing loss at weight `coef`.
fn moe_step<B: burn::tensor::backend::AutodiffBackend>(coef: Option<f64>) -> (f64, Vec<Vec<f32>>) {
    let dir = root().join("tests/fixtures/models/tiny-mixtral");
    let mut model = load_model::<B>(&dir, &Default::default()).unwrap().1;
    model.router_aux_loss_coef = coef;
    let mut m = Sft::new(sft_rows(6, model.vocab_size()), vec![], shapes(exact())).unwrap();
    let batches = m.next_step(&model, 2).unwrap().unwrap();
    let step = accumulate_gradients(&model, &m, &batches).unwrap();
    (step.loss, gradients_in_order(&model, &step.grads))
}

#[test]
fn gradient_checkpointing_changes_no_gradient_of_a_mixture_of_experts() {
    use models::backend::CpuTrainCheckpointed;
    let plain = moe_step::<CpuTrain>(Some(0.02));
    let kept = moe_step::<CpuTrainCheckpointed>(Some(0.02));
    assert_close("loss", plain.0, kept.0, 1e-6);
    assert_eq!(
        plain.1.len(),
        kept.1.len(),
        "the same experts get gradients"
    );
    let largest = plain.1.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
    let diff = largest_diff(&plain.1, &kept.1);
    assert!(
        diff <= 1e-5 * largest.max(1.0),
        "gradients differ by {diff}"
    );

    // The load-balancing loss is in the loss and its gradient, and only there.
    let without = moe_step::<CpuTrain>(None);
    let added = plain.0 - without.0;
    assert!(
        added > 0.02 * 0.5 && added < 0.02 * 8.0,
        "0.02 x aux = {added}"
    );
    assert_eq!(without.1.len(), plain.1.len());
    assert!(largest_diff(&without.1, &plain.1) > 1e-7);
}

fn largest_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0f32, f32::max)
}

#[test]
fn bucketed_rollout_batches_give_the_exact_token_outputs_and_grpo_loss() {
    let model = model().with_value_head(0.5, 3).valid();
    let vocab = model.vocab_size();
    let completions: Vec<Completion> = (0..3)
        .map(|r| {
            let n = 3 + r * 4;
            Completion {
                prompt: ids(r, 5 + r, vocab),
                tokens: ids(r + 50, n, vocab),
                old_logps: (0..n).map(|i| -2.0 - 0.1 * i as f32).collect(),
                ref_logps: Some((0..n).map(|i| -2.5 + 0.05 * i as f32).collect()),
                eos: true,
            }
        })
        .collect();
    let rows: Vec<&Completion> = completions.iter().collect();
    let real: usize = completions.iter().map(|c| c.tokens.len()).sum();
    let settings: GrpoSettings = serde_json::from_value(serde_json::json!({"beta": 0.2})).unwrap();
    let device = model.device();
    let flat = |v: Vec<f32>| {
        let n = v.len();
        Tensor::<Cpu, 1>::from_data(TensorData::new(v, [n]), &device)
    };
    let host = |t: Tensor<Cpu, 1>| t.into_data().to_vec::<f32>().unwrap();
    let run = |pad: Padding| {
        let batch = completion_batch(&rows, pad, 4);
        let out = token_outputs(&model, &batch, 0.7, true, true).unwrap();
        let n = out.logps.dims()[0];
        let cat = |f: &dyn Fn(&Completion) -> Vec<f32>| {
            padded(completions.iter().flat_map(f).collect(), n)
        };
        let (loss, kl, _) = grpo_loss_sum(
            out.logps.clone(),
            flat(cat(&|c| c.old_logps.clone())),
            Some(flat(cat(&|c| c.ref_logps.clone().unwrap()))),
            flat(cat(&|c| {
                vec![if c.tokens.len() > 5 { 1.0 } else { -0.5 }; c.tokens.len()]
            })),
            flat(cat(&|c| vec![1.0; c.tokens.len()])),
            out.real,
            &completions
                .iter()
                .map(|c| c.tokens.len())
                .collect::<Vec<_>>(),
            &settings,
        );
        (
            batch.ids.len(),
            host(out.logps),
            host(out.values.unwrap()),
            out.entropy_sum,
            loss.into_scalar() as f64,
            kl.unwrap(),
        )
    };
    let a = run(exact());
    let b = run(bucketed());
    assert_eq!((a.0, b.0), (3, 4), "rows: exact, then the fixed capacity");
    assert_eq!(a.1.len(), real);
    assert_eq!(
        b.1.len(),
        BUCKET,
        "{real} completion tokens fill one bucket"
    );
    for (x, y) in a.1.iter().zip(&b.1[..real]) {
        assert_close("log-prob", *x as f64, *y as f64, 1e-6);
    }
    for (x, y) in a.2.iter().zip(&b.2[..real]) {
        assert_close("value", *x as f64, *y as f64, 1e-6);
    }
    assert!(b.1[real..].iter().chain(&b.2[real..]).all(|&v| v == 0.0));
    assert_close("entropy", a.3, b.3, 1e-6);
    assert_close("grpo loss", a.4, b.4, 1e-6);
    assert_close("kl", a.5, b.5, 1e-6);
}

fn sft_recipe(dir: &Path, steps: usize, pad_to: usize) -> Recipe {
    let text = format!(
        r#"
method = "sft"
seed = 7
[model]
path = "{model}"
[data]
files = ["{data}"]
format = "sharegpt"
max_seq_len = 256
packing = false
eval_fraction = 0.2
cache_dir = "{cache}"
[train]
output_dir = "{out}"
per_device_train_batch_size = 3
per_device_eval_batch_size = 4
pad_to_multiple_of = {pad_to}
learning_rate = 1e-3
max_steps = {steps}
eval_steps = 10
save_total_limit = 0
"#,
        model = tiny_model().display(),
        data = root()
            .join("assets/data/quickstart/fastchat_dummy_conversation.json")
            .display(),
        cache = dir.join("cache").display(),
        out = dir.join(format!("run{steps}-{pad_to}")).display(),
    );
    Recipe::parse(&text, &[]).unwrap()
}

/// Distinct (operation, shapes) signatures of a training run, per operation.
fn run_signatures(recipe: &Recipe) -> Vec<(&'static str, usize)> {
    let stop = AtomicBool::new(false);
    let opts = TrainOptions {
        resume: None,
        show_progress: false,
        stop: &stop,
        verbose: false,
        stop_after_steps: None,
    };
    let recording = Recording::start();
    train::<CpuTrain>(recipe, &opts, &Default::default()).unwrap();
    let out = ["attention", "projection", "embedding", "lm_head"]
        .map(|op| (op, count(op)))
        .to_vec();
    assert!(!signatures().is_empty(), "the run recorded its shapes");
    drop(recording);
    out
}

#[test]
fn sft_runs_see_a_bounded_set_of_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let ten = run_signatures(&sft_recipe(tmp.path(), 10, BUCKET));
    let thirty = run_signatures(&sft_recipe(tmp.path(), 30, BUCKET));
    let exact = run_signatures(&sft_recipe(tmp.path(), 30, 1));
    assert_eq!(ten, thirty, "30 steps add no shape to 10");
    let get = |v: &[(&str, usize)], op: &str| v.iter().find(|(o, _)| *o == op).unwrap().1;
    // Two row counts (train 3, eval 4) at the two width buckets these rows reach (64, 128);
    // 37 with padding to the longest row only.
    assert!(get(&thirty, "attention") <= 4, "{thirty:?}");
    assert!(get(&thirty, "lm_head") <= 8, "{thirty:?}");
    assert!(
        get(&exact, "attention") > 2 * get(&thirty, "attention"),
        "padding to the longest row alone varies far more: {exact:?} vs {thirty:?}"
    );
}
