//! The SFT loss equals transformers' causal-LM loss (and PEFT's, with an adapter) on the
//! tiny-llama fixture (scripts/parity/sft_loss_reference.py), padded or packed.

use serde_json::Value;
use std::path::PathBuf;

use datasets::batch::{collate_sft, Padding};
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
    let batch = collate_sft(rows, Padding::exact(0), rows.len());
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
    use trainers::dpo::{pair_terms, DpoLoss, DpoSettings};
    use trainers::logprobs::completion_logps;
    use trainers::pairs::collate_pairs;
    let exp: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("losses/dpo.json")).unwrap())
            .unwrap();
    let pairs = fixture_pairs(&exp);
    let refs: Vec<&datasets::tokenize::TokenizedPair> = pairs.iter().collect();
    let (rows, lengths) = collate_pairs(&refs, Padding::exact(0), refs.len());
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
    let batch = reward_batch(&refs, Padding::exact(0), refs.len());
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
    use models::chunked_head::head_rows;
    use trainers::distill::{kd_loss_sum, kd_sums, KdLoss, KdObjective, TeacherTargets};

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
    let teacher_logits = TensorData::new(rows(&teacher), [n, vocab]);
    let teacher_full = {
        let t = Tensor::<Cpu, 2>::from_data(teacher_logits.clone(), &device);
        burn::tensor::activation::log_softmax(t.div_scalar(temperature), 1).into_data()
    };
    // The chunked path with identity heads: the logits are the "hidden states".
    let identity = Tensor::<Cpu, 2>::eye(vocab, &device);
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
        let unchunked = kd_loss_sum(
            student_logits.clone(),
            targets.clone(),
            &None,
            &targets_of_teacher,
            None,
            &p,
        );
        // Chunks of 3 positions; a full teacher as hidden states through its head.
        let chunked_teacher = match &targets_of_teacher {
            TeacherTargets::Full(_) => TeacherTargets::Hidden(teacher_logits.clone()),
            other => other.clone(),
        };
        let (objective, aux) =
            KdObjective::new(p, targets.clone(), &chunked_teacher, Some(identity.clone()));
        let rows = head_rows(
            student_logits.clone(),
            identity.clone(),
            aux,
            &objective,
            1.0,
            3,
        );
        let chunked = kd_sums(rows, &None);
        let label = format!(
            "{} beta {} top_k {:?}",
            case["divergence"], p.beta, case["top_k"]
        );
        for (path, (loss, div, ce)) in [("unchunked", unchunked), ("chunked", chunked)] {
            for (got, key) in [(loss, "loss_sum"), (div, "divergence_sum"), (ce, "ce_sum")] {
                let got = got.into_scalar() as f64;
                let want = case[key].as_f64().unwrap();
                assert!(
                    (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "{label} {path} {key}: {got} vs {want}"
                );
            }
        }
    }
}

/// GRPO advantages and losses, and PPO's GAE targets and losses, equal the PyTorch
/// reference that follows TRL's source (scripts/parity/rl_reference.py).
mod rl {
    use super::*;
    use burn::prelude::*;
    use trainers::rl::grpo::{grpo_loss_sum, token_weights, GrpoLoss, GrpoSettings};
    use trainers::rl::math::{
        clip_fraction, combine_rewards, group_advantages, KlEstimator, ScaleRewards,
    };
    use trainers::rl::ppo::{ppo_loss, ppo_targets, PpoSettings};

    fn fixture() -> Value {
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("losses/rl.json")).unwrap())
            .unwrap()
    }

    fn close(a: f64, b: f64, tol: f64, what: &str) {
        assert!(
            (a - b).abs() <= tol * (1.0 + b.abs()),
            "{what}: {a} vs reference {b}"
        );
    }

    fn nan_rows(v: &Value) -> Vec<Vec<f64>> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap_or(f64::NAN))
                    .collect()
            })
            .collect()
    }

    fn rows(v: &Value) -> Vec<Vec<f64>> {
        serde_json::from_value(v.clone()).unwrap()
    }

    fn flat(rows: &[Vec<f64>]) -> Tensor<Cpu, 1> {
        let v: Vec<f32> = rows.iter().flatten().map(|&x| x as f32).collect();
        let n = v.len();
        Tensor::from_data(TensorData::new(v, [n]), &Default::default())
    }

    fn scalar(t: Tensor<Cpu, 1>) -> f64 {
        t.into_scalar().elem::<f64>()
    }

    #[test]
    fn grpo_group_advantages_match_trl() {
        let f = fixture();
        let g = &f["grpo"];
        let weights: Vec<f64> = serde_json::from_value(g["reward_weights"].clone()).unwrap();
        let rewards = combine_rewards(&nan_rows(&g["rewards_per_func"]), &weights);
        let group = g["num_generations"].as_u64().unwrap() as usize;
        for case in g["advantages"].as_array().unwrap() {
            let scale: ScaleRewards =
                serde_json::from_value(case["scale_rewards"].clone()).unwrap();
            for (r, want) in rewards.iter().zip(case["rewards"].as_array().unwrap()) {
                match want.as_f64() {
                    Some(w) => close(*r, w, 1e-12, "combined reward"),
                    None => assert!(r.is_nan(), "an unscorable row stays NaN"),
                }
            }
            let adv = group_advantages(&rewards, group, scale);
            let want: Vec<f64> = serde_json::from_value(case["advantages"].clone()).unwrap();
            for (a, w) in adv.iter().zip(&want) {
                // TRL's nanstd takes its Bessel factor count / (count - 1) in float32.
                close(*a, *w, 1e-6, &format!("advantage ({scale:?})"));
            }
        }
    }

    #[test]
    fn grpo_losses_match_trl_for_every_normalisation() {
        let f = fixture();
        let g = &f["grpo"];
        let (logps, old, reference) = (
            rows(&g["logps"]),
            rows(&g["old_logps"]),
            rows(&g["ref_logps"]),
        );
        let lens: Vec<usize> = logps.iter().map(Vec::len).collect();
        let adv: Vec<f64> =
            serde_json::from_value(g["advantages"][0]["advantages"].clone()).unwrap();
        let adv_tokens: Vec<Vec<f64>> = lens.iter().zip(&adv).map(|(&l, &a)| vec![a; l]).collect();
        let max_len = g["max_completion_length"].as_u64().unwrap() as usize;
        for case in g["losses"].as_array().unwrap() {
            let loss_type: GrpoLoss = serde_json::from_value(case["loss_type"].clone()).unwrap();
            let s = GrpoSettings {
                loss_type,
                epsilon: case["epsilon"].as_f64().unwrap(),
                epsilon_high: case["epsilon_high"].as_f64(),
                beta: case["beta"].as_f64().unwrap(),
                max_completion_length: max_len,
                importance_sampling_level: match case["importance_sampling_level"].as_str() {
                    Some(level) => serde_json::from_value(serde_json::json!(level)).unwrap(),
                    None => Default::default(),
                },
                ..Default::default()
            };
            let (w, weight) = token_weights(loss_type, &lens, &vec![false; lens.len()], max_len);
            let n = w.len();
            let w = Tensor::<Cpu, 1>::from_data(TensorData::new(w, [n]), &Default::default());
            let (loss_sum, kl, ratio) = grpo_loss_sum(
                flat(&logps),
                flat(&old),
                Some(flat(&reference)),
                flat(&adv_tokens),
                w,
                n,
                &lens,
                &s,
            );
            let what = format!("{case}");
            close(
                scalar(loss_sum) / weight,
                case["loss"].as_f64().unwrap(),
                1e-5,
                &what,
            );
            if s.beta > 0.0 {
                close(kl.unwrap(), case["kl"].as_f64().unwrap(), 1e-5, "k3 KL");
            }
            let ratio: Vec<f32> = ratio.into_data().to_vec().unwrap();
            let adv32: Vec<f32> = adv_tokens.iter().flatten().map(|&a| a as f32).collect();
            let clipped =
                clip_fraction(&ratio, &adv32, s.epsilon, s.epsilon_high.unwrap()) / n as f64;
            close(
                clipped,
                case["clip_ratio"].as_f64().unwrap(),
                1e-9,
                "clip ratio",
            );
        }
    }

    #[test]
    fn ppo_gae_targets_and_clipped_losses_match_trl() {
        let f = fixture();
        let p = &f["ppo"];
        let s = PpoSettings {
            kl_coef: p["kl_coef"].as_f64().unwrap(),
            kl_estimator: KlEstimator::K1,
            gamma: p["gamma"].as_f64().unwrap(),
            lam: p["lam"].as_f64().unwrap(),
            cliprange: p["cliprange"].as_f64().unwrap(),
            cliprange_value: p["cliprange_value"].as_f64().unwrap(),
            vf_coef: p["vf_coef"].as_f64().unwrap(),
            ..Default::default()
        };
        let (logps, reference, values) =
            (rows(&p["logps"]), rows(&p["ref_logps"]), rows(&p["values"]));
        let kl: Vec<Vec<f64>> = logps
            .iter()
            .zip(&reference)
            .map(|(l, r)| {
                l.iter()
                    .zip(r)
                    .map(|(&a, &b)| s.kl_estimator.host(a, b))
                    .collect()
            })
            .collect();
        let scores: Vec<f64> = serde_json::from_value(p["scores"].clone()).unwrap();
        let t = ppo_targets(&s, &kl, &scores, &values);
        for (key, got) in [("advantages", &t.advantages), ("returns", &t.returns)] {
            for (g, w) in got.iter().flatten().zip(rows(&p[key]).iter().flatten()) {
                close(*g, *w, 1e-9, key);
            }
        }
        let l = ppo_loss(
            flat(&rows(&p["new_logps"])),
            flat(&logps),
            flat(&t.advantages),
            flat(&rows(&p["vpred"])),
            flat(&values),
            flat(&t.returns),
            logps.iter().map(Vec::len).sum(),
            &s,
        );
        let (pg, vf) = (scalar(l.policy), scalar(l.value));
        close(pg, p["pg_loss"].as_f64().unwrap(), 1e-5, "policy loss");
        close(vf, p["vf_loss"].as_f64().unwrap(), 1e-5, "value loss");
        close(
            pg + s.vf_coef * vf,
            p["loss"].as_f64().unwrap(),
            1e-5,
            "PPO loss",
        );
        let n = t.advantages.iter().flatten().count() as f64;
        let ratio: Vec<f32> = l.ratio.into_data().to_vec().unwrap();
        let adv32: Vec<f32> = t.advantages.iter().flatten().map(|&a| a as f32).collect();
        close(
            clip_fraction(&ratio, &adv32, s.cliprange, s.cliprange) / n,
            p["pg_clipfrac"].as_f64().unwrap(),
            1e-9,
            "policy clip fraction",
        );
        let vclip: Vec<f32> = l.value_clipped.float().into_data().to_vec().unwrap();
        close(
            vclip.iter().sum::<f32>() as f64 / n,
            p["vf_clipfrac"].as_f64().unwrap(),
            1e-9,
            "value clip fraction",
        );
    }
}

fn fixture_pairs(exp: &Value) -> Vec<datasets::tokenize::TokenizedPair> {
    exp["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| datasets::tokenize::TokenizedPair {
            prompt: serde_json::from_value(p["prompt"].clone()).unwrap(),
            chosen: serde_json::from_value(p["chosen"].clone()).unwrap(),
            rejected: serde_json::from_value(p["rejected"].clone()).unwrap(),
            margin: None,
        })
        .collect()
}

/// ORPO's loss, NLL, odds-ratio terms and rewards equal TRL's `ORPOTrainer` on the PEFT
/// policy of the fixture (scripts/parity/orpo_reference.py), with the chosen rows' NLL over
/// prompt and completion as TRL computes it.
#[test]
fn orpo_loss_and_log_odds_match_trl() {
    use trainers::orpo::{orpo_loss, OrpoBatch, OrpoSettings};
    use trainers::pairs::{collate_pairs_trained, Trained};
    let exp: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("losses/orpo.json")).unwrap(),
    )
    .unwrap();
    let pairs = fixture_pairs(&exp);
    let refs: Vec<&datasets::tokenize::TokenizedPair> = pairs.iter().collect();
    let (_, base) =
        load_model::<Cpu>(&fixtures().join("models/tiny-llama"), &Default::default()).unwrap();
    let (policy, _) =
        checkpoints::peft::load_adapter(base, &fixtures().join("peft/adapter")).unwrap();
    // Exact shapes, and a static-shape batch with an empty pair slot after the real ones.
    for capacity in [refs.len(), refs.len() + 1] {
        let pad = Padding {
            id: 0,
            multiple_of: if capacity > refs.len() { 8 } else { 1 },
        };
        let (rows, lengths) = collate_pairs_trained(&refs, pad, capacity, Trained::WholeChosen);
        let batch = OrpoBatch {
            rows,
            pairs: refs.len(),
            lengths,
        };
        for case in exp["cases"].as_array().unwrap() {
            let settings = OrpoSettings {
                beta: case["beta"].as_f64().unwrap(),
            };
            let out = orpo_loss(&settings, &policy, &batch);
            let p = refs.len() as f64;
            let loss_sum: f32 = out.loss_sum.into_scalar();
            let loss = loss_sum as f64 / p;
            let want = case["loss"].as_f64().unwrap();
            assert!(
                (loss - want).abs() < 1e-5,
                "capacity {capacity}, beta {}: loss {loss} vs TRL {want}",
                settings.beta
            );
            for (name, sum) in &out.metric_sums {
                let want = case[*name].as_f64().unwrap();
                let got = sum / p;
                assert!(
                    (got - want).abs() < 1e-5,
                    "capacity {capacity}, beta {}: {name} {got} vs TRL {want}",
                    settings.beta
                );
            }
        }
    }
}

/// KTO's loss, KL reference point and rewards equal TRL's `KTOTrainer` on the PEFT policy
/// of the fixture with its base as the reference (scripts/parity/kto_reference.py), the
/// mismatched completions paired as TRL's dataset map pairs them.
#[test]
fn kto_loss_kl_and_rewards_match_trl() {
    use datasets::tokenize::TokenizedUnpaired;
    use trainers::kto::{collate_kto, kto_batch, kto_loss, rows_of_unpaired, KtoRow, KtoSettings};
    use trainers::logprobs::completion_logps;
    let exp: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("losses/kto.json")).unwrap())
            .unwrap();
    let ids = |v: &Value| -> Vec<u32> { serde_json::from_value(v.clone()).unwrap() };
    let data: Vec<TokenizedUnpaired> = exp["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| TokenizedUnpaired {
            prompt: ids(&r["prompt"]),
            completion: ids(&r["completion"]),
            label: r["label"].as_bool().unwrap(),
        })
        .collect();
    let n = data.len();
    let rows = rows_of_unpaired(data, n);
    for (row, kl) in rows.iter().zip(exp["kl_rows"].as_array().unwrap()) {
        assert_eq!(row.kl_completion, ids(&kl["completion"]), "TRL's pairing");
    }
    let refs: Vec<&KtoRow> = rows.iter().collect();
    let (_, base) =
        load_model::<Cpu>(&fixtures().join("models/tiny-llama"), &Default::default()).unwrap();
    let (mut policy, _) =
        checkpoints::peft::load_adapter(base, &fixtures().join("peft/adapter")).unwrap();
    let (collated, kl_rows) = collate_kto(&refs, Padding::exact(0), n);
    let host = |t: burn::tensor::Tensor<Cpu, 1>| -> Vec<f64> {
        t.into_data().convert::<f64>().to_vec().unwrap()
    };
    let policy_kl = host(completion_logps(&policy, &kl_rows));
    policy.set_adapters_enabled(false);
    let reference = host(completion_logps(&policy, &collated));
    let reference_kl = host(completion_logps(&policy, &kl_rows));
    policy.set_adapters_enabled(true);
    for (got, key) in [
        (&policy_kl, "policy_kl_logps"),
        (&reference, "reference_logps"),
        (&reference_kl, "reference_kl_logps"),
    ] {
        let want: Vec<f64> = serde_json::from_value(exp[key].clone()).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-4, "{key}: {got:?} vs {want:?}");
        }
    }
    for case in exp["cases"].as_array().unwrap() {
        let settings = KtoSettings {
            beta: case["beta"].as_f64().unwrap(),
            desirable_weight: case["desirable_weight"].as_f64().unwrap(),
            undesirable_weight: case["undesirable_weight"].as_f64().unwrap(),
            ..Default::default()
        };
        let batch = kto_batch(
            &refs,
            collated.clone(),
            &policy_kl,
            reference.clone(),
            &reference_kl,
        );
        let out = kto_loss(&settings, &policy, &batch);
        let loss_sum: f32 = out.loss_sum.into_scalar();
        let got = loss_sum as f64 / n as f64;
        let want = case["loss"].as_f64().unwrap();
        assert!((got - want).abs() < 1e-5, "loss {got} vs TRL {want}");
        for (name, sum) in &out.metric_sums {
            let (got, want) = (sum / n as f64, case[*name].as_f64().unwrap());
            assert!((got - want).abs() < 1e-5, "{name} {got} vs TRL {want}");
        }
    }
}
