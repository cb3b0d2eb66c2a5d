//! The SFT loss equals transformers' causal-LM loss (and PEFT's, with an adapter) on the
//! tiny-llama fixture (scripts/parity/sft_loss_reference.py), padded or packed.

use serde_json::Value;
use std::path::PathBuf;

use datasets::batch::collate_sft;
use datasets::pack::PackedRow;
use models::backend::Cpu;
use models::checkpoint::load_model;
use models::CausalLm;
use trainers::sft::sft_loss_sum;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn rows(v: &Value) -> Vec<PackedRow> {
    v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let ids: Vec<u32> = serde_json::from_value(r["ids"].clone()).unwrap();
            let trained: Vec<u32> = serde_json::from_value(r["trained"].clone()).unwrap();
            PackedRow {
                positions: (0..ids.len() as u32).collect(),
                segments: vec![0; ids.len()],
                trained: trained.iter().map(|&t| t == 1).collect(),
                ids,
            }
        })
        .collect()
}

/// Both rows in one packed row: segment ids keep attention and targets apart.
fn packed(rows: &[PackedRow]) -> PackedRow {
    let mut p = PackedRow {
        ids: vec![],
        trained: vec![],
        positions: vec![],
        segments: vec![],
    };
    for (s, r) in rows.iter().enumerate() {
        p.ids.extend(&r.ids);
        p.trained.extend(&r.trained);
        p.positions.extend(&r.positions);
        p.segments
            .extend(std::iter::repeat_n(s as u32, r.ids.len()));
    }
    p
}

fn mean_loss(model: &CausalLm<Cpu>, rows: &[PackedRow]) -> f64 {
    let batch = collate_sft(rows, 0);
    let sum: f32 = sft_loss_sum(model, &batch).into_scalar();
    sum as f64 / batch.num_trained() as f64
}

#[test]
fn sft_loss_matches_transformers_and_peft() {
    let exp: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("losses/sft.json")).unwrap())
            .unwrap();
    let rows = rows(&exp);
    let (_, base) =
        load_model::<Cpu>(&fixtures().join("models/tiny-llama"), &Default::default()).unwrap();
    let want = exp["base_loss"].as_f64().unwrap();
    for (name, got) in [
        ("padded", mean_loss(&base, &rows)),
        ("packed", mean_loss(&base, &[packed(&rows)])),
    ] {
        assert!(
            (got - want).abs() < 1e-5,
            "{name}: {got} vs transformers {want}"
        );
    }
    let (lora, _) =
        checkpoints::peft::load_adapter(base, &fixtures().join("peft/adapter")).unwrap();
    let got = mean_loss(&lora, &rows);
    let want = exp["lora_loss"].as_f64().unwrap();
    assert!((got - want).abs() < 1e-5, "lora: {got} vs PEFT {want}");
}

#[test]
fn dpo_losses_and_rewards_match_trl() {
    use trainers::dpo::{collate_pairs, completion_logps, pair_terms, DpoLoss, DpoSettings};
    let exp: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("losses/dpo.json")).unwrap())
            .unwrap();
    let pairs: Vec<datasets::tokenize::TokenizedPair> = exp["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| datasets::tokenize::TokenizedPair {
            prompt: serde_json::from_value(p["prompt"].clone()).unwrap(),
            chosen: serde_json::from_value(p["chosen"].clone()).unwrap(),
            rejected: serde_json::from_value(p["rejected"].clone()).unwrap(),
            margin: None,
        })
        .collect();
    let refs: Vec<&datasets::tokenize::TokenizedPair> = pairs.iter().collect();
    let (rows, lengths) = collate_pairs(&refs, 0);
    let (_, base) =
        load_model::<Cpu>(&fixtures().join("models/tiny-llama"), &Default::default()).unwrap();
    let (mut policy, _) =
        checkpoints::peft::load_adapter(base, &fixtures().join("peft/adapter")).unwrap();
    let pol: Vec<f64> = completion_logps(&policy, &rows)
        .into_data()
        .convert::<f64>()
        .to_vec()
        .unwrap();
    policy.set_adapters_enabled(false);
    let reference: Vec<f64> = completion_logps(&policy, &rows)
        .into_data()
        .convert::<f64>()
        .to_vec()
        .unwrap();
    policy.set_adapters_enabled(true);
    for (got, want) in [
        (&pol, &exp["policy_logps"]),
        (&reference, &exp["reference_logps"]),
    ] {
        let want: Vec<f64> = serde_json::from_value(want.clone()).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-4, "log-probs {got:?} vs {want:?}");
        }
    }
    for case in exp["cases"].as_array().unwrap() {
        let settings = DpoSettings {
            loss_type: serde_json::from_value::<DpoLoss>(case["loss_type"].clone()).unwrap(),
            beta: case["beta"].as_f64().unwrap(),
            label_smoothing: case["label_smoothing"].as_f64().unwrap(),
            simpo_gamma: case["simpo_gamma"].as_f64().unwrap(),
            ..Default::default()
        };
        let t = pair_terms(
            &settings,
            completion_logps(&policy, &rows),
            Some(&reference),
            &lengths,
        );
        let mean = |x: burn::tensor::Tensor<Cpu, 1>| -> f64 {
            let v: Vec<f64> = x.into_data().convert::<f64>().to_vec().unwrap();
            v.iter().sum::<f64>() / v.len() as f64
        };
        let (c, r) = (
            mean(t.chosen_rewards.clone()),
            mean(t.rejected_rewards.clone()),
        );
        for (name, got) in [
            ("loss", mean(t.losses)),
            ("rewards/chosen", c),
            ("rewards/rejected", r),
            ("rewards/margins", c - r),
        ] {
            let want = case[name].as_f64().unwrap();
            assert!(
                (got - want).abs() < 1e-5 * want.abs().max(1.0),
                "{case}: {name} {got} vs TRL {want}"
            );
        }
    }
}

#[test]
fn reward_model_matches_transformers_sequence_classification_and_trl_loss() {
    use trainers::reward::{batch_rewards, pair_losses, reward_batch, RewardSettings};
    let exp: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("losses/reward.json")).unwrap(),
    )
    .unwrap();
    let pairs: Vec<datasets::tokenize::TokenizedPair> =
        serde_json::from_value(exp["pairs"].clone()).unwrap();
    // The same reward model examples/make_peft_fixture.rs exported for transformers.
    let (_, base) =
        load_model::<Cpu>(&fixtures().join("models/tiny-llama"), &Default::default()).unwrap();
    let rm = base.with_reward_head(0.5, 5);
    let refs: Vec<&datasets::tokenize::TokenizedPair> = pairs.iter().collect();
    let batch = reward_batch(&refs, 0);
    let rewards = batch_rewards(&rm, &batch);
    let got: Vec<f64> = rewards
        .clone()
        .into_data()
        .convert::<f64>()
        .to_vec()
        .unwrap();
    let want: Vec<f64> = serde_json::from_value(exp["rewards"].clone()).unwrap();
    for (g, w) in got.iter().zip(&want) {
        assert!(
            (g - w).abs() < 1e-5,
            "rewards {got:?} vs transformers {want:?}"
        );
    }
    for case in exp["cases"].as_array().unwrap() {
        let settings = RewardSettings {
            center_rewards_coefficient: case["center_rewards_coefficient"].as_f64(),
        };
        let margins = case["use_margin"]
            .as_bool()
            .unwrap()
            .then(|| batch.margins.clone().unwrap());
        let losses: Vec<f64> = pair_losses(rewards.clone(), margins.as_deref(), &settings)
            .into_data()
            .convert::<f64>()
            .to_vec()
            .unwrap();
        let loss = losses.iter().sum::<f64>() / losses.len() as f64;
        let want = case["loss"].as_f64().unwrap();
        assert!((loss - want).abs() < 1e-5, "{case}: {loss} vs TRL {want}");
    }
}

#[test]
fn distillation_losses_match_trl_gkd_and_the_top_k_reference() {
    use burn::prelude::*;
    use trainers::distill::{kd_loss_sum, KdLoss, TeacherTargets};

    let f: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("losses/distill.json")).unwrap(),
    )
    .unwrap();
    let matrix = |k: &str| -> Vec<Vec<f32>> { serde_json::from_value(f[k].clone()).unwrap() };
    let (student, teacher) = (matrix("student_logits"), matrix("teacher_logits"));
    let labels: Vec<i64> = serde_json::from_value(f["labels"].clone()).unwrap();
    let trained: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] >= 0).collect();
    let vocab = student[0].len();
    let n = trained.len();
    let device = Default::default();
    let rows = |m: &[Vec<f32>]| -> Vec<f32> {
        trained.iter().flat_map(|&i| m[i].iter().copied()).collect()
    };
    let student_logits =
        Tensor::<Cpu, 2>::from_data(TensorData::new(rows(&student), [n, vocab]), &device);
    let targets = Tensor::<Cpu, 1, Int>::from_data(
        TensorData::new(trained.iter().map(|&i| labels[i]).collect::<Vec<_>>(), [n]),
        &device,
    );
    let temperature = f["temperature"].as_f64().unwrap();
    let teacher_full = {
        let t = Tensor::<Cpu, 2>::from_data(TensorData::new(rows(&teacher), [n, vocab]), &device);
        burn::tensor::activation::log_softmax(t.div_scalar(temperature), 1).into_data()
    };
    for case in f["cases"].as_array().unwrap() {
        let p = KdLoss {
            alpha: f["alpha"].as_f64().unwrap(),
            temperature,
            beta: case["beta"].as_f64().unwrap(),
        };
        let targets_of_teacher = match case["top_k"].as_u64() {
            None => TeacherTargets::Full(teacher_full.clone()),
            Some(k) => TeacherTargets::TopK {
                ids: serde_json::from_value::<Vec<Vec<i32>>>(case["teacher_top_ids"].clone())
                    .unwrap()
                    .concat(),
                logps: serde_json::from_value::<Vec<Vec<f32>>>(case["teacher_top_logps"].clone())
                    .unwrap()
                    .concat(),
                k: k as usize,
            },
        };
        let (loss, div, ce) = kd_loss_sum(
            student_logits.clone(),
            targets.clone(),
            &targets_of_teacher,
            &p,
        );
        let label = format!(
            "{} beta {} top_k {:?}",
            case["divergence"], p.beta, case["top_k"]
        );
        for (got, key) in [(loss, "loss_sum"), (div, "divergence_sum"), (ce, "ce_sum")] {
            let got = got.into_scalar() as f64;
            let want = case[key].as_f64().unwrap();
            assert!(
                (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                "{label} {key}: {got} vs {want}"
            );
        }
    }
}
