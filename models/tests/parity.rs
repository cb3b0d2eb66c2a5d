//! Parity with transformers on committed fixtures (scripts/parity/make_model_fixtures.py):
//! logits within 1e-4 in f32 and identical greedy continuations, for Llama (sharded f32,
//! GQA, llama3 rope scaling), Qwen2 (bf16, q/k/v bias, tied), Mistral (f16, and with a
//! sliding window), Qwen3 (per-head q/k norm, explicit head_dim), Phi-3, Gemma 2/3 and the
//! mixtures of experts Mixtral and Qwen3-MoE (whose fixtures leave some experts without a
//! token), with their load-balancing losses.

use burn::prelude::*;
use models::backend::Cpu;
use models::checkpoint::load_model;
use models::generate::{generate, SamplingParams};
use models::mask::{positions_from_attention_mask, AttentionLayout};
use models::{CausalLm, ForwardInput};
use serde_json::Value;
use std::path::PathBuf;

const MODELS: &[&str] = &[
    "tiny-llama",
    "tiny-qwen2",
    "tiny-mistral",
    "tiny-mistral-swa",
    "tiny-qwen3",
    "tiny-phi3",
    "tiny-phi3-longrope",
    "tiny-gemma2",
    "tiny-gemma3",
    "tiny-mixtral",
    "tiny-qwen3-moe",
];

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/models")
        .join(name)
}

fn expected(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture(name).join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

fn flat3(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .flat_map(|a| a.as_array().unwrap().iter())
        .flat_map(|b| b.as_array().unwrap().iter())
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn load(name: &str) -> CausalLm<Cpu> {
    load_model::<Cpu>(&fixture(name), &Default::default())
        .unwrap()
        .1
}

#[test]
fn logits_match_transformers() {
    for name in MODELS {
        let exp = expected(name);
        let model = load(name);
        let input = ids(&exp["input_ids"]);
        let logits: Vec<f32> = model
            .forward(ForwardInput::causal(&input, &model.device()))
            .into_data()
            .iter::<f32>()
            .collect();
        let want = flat3(&exp["logits"]);
        assert_eq!(logits.len(), want.len());
        let max = logits
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(max <= 1e-4, "{name}: max |logit diff| {max}");
    }
}

#[test]
fn left_padded_logits_match_transformers() {
    for name in MODELS {
        let exp = expected(name);
        let model = load(name);
        let input = ids(&exp["padded_input_ids"]);
        let mask: Vec<Vec<u8>> = ids(&exp["padded_attention_mask"])
            .into_iter()
            .map(|r| r.into_iter().map(|x| x as u8).collect())
            .collect();
        let positions = positions_from_attention_mask(&mask);
        let layout = AttentionLayout::from_attention_mask(&mask);
        let fwd = ForwardInput::from_host(&input, &positions, &layout, &model.device());
        let logits: Vec<f32> = model.forward(fwd).into_data().iter::<f32>().collect();
        let want = flat3(&exp["padded_logits"]);
        let vocab = model.vocab_size();
        let t = input[0].len();
        let mut max = 0.0f32;
        for (b, row) in mask.iter().enumerate() {
            for (i, &m) in row.iter().enumerate() {
                if m == 0 {
                    continue;
                }
                let off = (b * t + i) * vocab;
                for k in 0..vocab {
                    max = max.max((logits[off + k] - want[off + k]).abs());
                }
            }
        }
        assert!(max <= 1e-4, "{name}: max |padded logit diff| {max}");
    }
}

#[test]
fn greedy_generation_matches_transformers() {
    for name in MODELS {
        let exp = expected(name);
        let model = load(name);
        let prompts = ids(&exp["prompts"]);
        let want = ids(&exp["greedy_new_tokens"]);
        let params = SamplingParams {
            max_new_tokens: want[0].len(),
            ..Default::default()
        };
        let got = generate(&model, &prompts, &params, None).unwrap();
        let got: Vec<Vec<u32>> = got.into_iter().map(|g| g.tokens).collect();
        assert_eq!(got, want, "{name}");
    }
}

/// Greedy decoding by re-running the whole (left-padded) sequence each step.
fn greedy_without_cache(
    model: &CausalLm<Cpu>,
    prompts: &[Vec<u32>],
    steps: usize,
) -> Vec<Vec<u32>> {
    let mut seqs: Vec<Vec<u32>> = prompts.to_vec();
    let mut out = vec![vec![]; prompts.len()];
    for _ in 0..steps {
        let width = seqs.iter().map(Vec::len).max().unwrap();
        let mut ids = vec![];
        let mut mask = vec![];
        for s in &seqs {
            ids.push([vec![0; width - s.len()], s.clone()].concat());
            mask.push([vec![0u8; width - s.len()], vec![1u8; s.len()]].concat());
        }
        let positions = positions_from_attention_mask(&mask);
        let layout = AttentionLayout::from_attention_mask(&mask);
        let logits = model.forward(ForwardInput::from_host(
            &ids,
            &positions,
            &layout,
            &model.device(),
        ));
        let last = logits.slice(s![.., width - 1..width, ..]).argmax(2);
        let next: Vec<i64> = last.into_data().iter::<i64>().collect();
        for (i, &t) in next.iter().enumerate() {
            seqs[i].push(t as u32);
            out[i].push(t as u32);
        }
    }
    out
}

#[test]
fn kv_cache_equals_recomputation_on_left_padded_batches() {
    // tiny-phi3-longrope crosses its original context (8) while decoding: the cache is
    // rebuilt with the long frequencies there, as transformers does.
    for name in [
        "tiny-llama",
        "tiny-phi3",
        "tiny-phi3-longrope",
        "tiny-gemma2",
        "tiny-gemma3",
        "tiny-mixtral",
        "tiny-qwen3-moe",
    ] {
        let model = load(name);
        let prompts = vec![
            vec![5, 9, 200],
            vec![17, 3, 44, 81, 120, 7, 99],
            vec![250],
            vec![8, 8, 8, 8, 8],
        ];
        let steps = 12;
        let params = SamplingParams {
            max_new_tokens: steps,
            ..Default::default()
        };
        let cached: Vec<Vec<u32>> = generate(&model, &prompts, &params, None)
            .unwrap()
            .into_iter()
            .map(|g| g.tokens)
            .collect();
        assert_eq!(
            cached,
            greedy_without_cache(&model, &prompts, steps),
            "{name}"
        );
    }
}

#[test]
fn sampling_is_seeded() {
    let model = load("tiny-qwen2");
    let prompts = vec![vec![5, 9, 200], vec![17, 3]];
    let params = SamplingParams {
        max_new_tokens: 16,
        temperature: 1.0,
        top_p: 0.95,
        top_k: 50,
        seed: 42,
        ..Default::default()
    };
    let a: Vec<Vec<u32>> = generate(&model, &prompts, &params, None)
        .unwrap()
        .into_iter()
        .map(|g| g.tokens)
        .collect();
    let b: Vec<Vec<u32>> = generate(&model, &prompts, &params, None)
        .unwrap()
        .into_iter()
        .map(|g| g.tokens)
        .collect();
    assert_eq!(a, b);
    let other = SamplingParams { seed: 43, ..params };
    let c: Vec<Vec<u32>> = generate(&model, &prompts, &other, None)
        .unwrap()
        .into_iter()
        .map(|g| g.tokens)
        .collect();
    assert_ne!(a, c, "a different seed should sample differently");
}

#[test]
fn stops_on_eos_and_reports_it() {
    let model = load("tiny-llama");
    let exp = expected("tiny-llama");
    let prompts = ids(&exp["prompts"]);
    let greedy = ids(&exp["greedy_new_tokens"]);
    // Declare the 3rd greedy token of row 0 an EOS id: row 0 stops there, row 1 runs on.
    let eos = greedy[0][2];
    let params = SamplingParams {
        max_new_tokens: 10,
        stop_ids: vec![eos],
        ..Default::default()
    };
    let out = generate(&model, &prompts, &params, None).unwrap();
    assert_eq!(out[0].tokens, greedy[0][..3].to_vec());
    assert_eq!(out[0].finish, models::generate::FinishReason::Eos);
    let first_eos_row1 = greedy[1]
        .iter()
        .position(|&t| t == eos)
        .map_or(10, |p| p + 1);
    assert_eq!(out[1].tokens, greedy[1][..first_eos_row1].to_vec());
}

#[test]
fn scores_equal_log_softmax_of_reference_logits() {
    let exp = expected("tiny-llama");
    let model = load("tiny-llama");
    let input = ids(&exp["input_ids"]);
    let want_logits = flat3(&exp["logits"]);
    let vocab = model.vocab_size();
    let t = input[0].len();
    let rows: Vec<(Vec<u32>, Vec<u32>)> = input
        .iter()
        .map(|r| (r[..5].to_vec(), r[5..].to_vec()))
        .collect();
    let got = models::scoring::score_completions(&model, &rows, 2, 0, 1);
    // Static shapes (width 64, three rows per batch, one of them empty) score the same.
    let bucketed = models::scoring::score_completions(&model, &rows, 3, 0, 64);
    for (a, b) in got.iter().zip(&bucketed) {
        assert_eq!(a.num_tokens, b.num_tokens);
        assert!((a.logprob - b.logprob).abs() < 1e-4, "{a:?} vs {b:?}");
    }
    for (b, row) in input.iter().enumerate() {
        let mut want = 0.0f64;
        for pos in 4..t - 1 {
            let l = &want_logits[(b * t + pos) * vocab..(b * t + pos + 1) * vocab];
            let max = l.iter().copied().fold(f32::MIN, f32::max) as f64;
            let z: f64 = l.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln() + max;
            want += l[row[pos + 1] as usize] as f64 - z;
        }
        assert_eq!(got[b].num_tokens, t - 5);
        assert!(
            (got[b].logprob - want).abs() < 1e-3,
            "row {b}: {} vs {want}",
            got[b].logprob
        );
    }
}

/// A group that shares one prefill samples exactly what the prompt repeated in the batch
/// samples: the same tokens (same seed, same row order) and the same log-probs.
#[test]
fn grouped_prefill_equals_repeated_prompts() {
    let model = load("tiny-llama");
    let prompts = vec![vec![17, 3, 44, 81, 120, 7, 99], vec![250, 4]];
    let params = SamplingParams {
        max_new_tokens: 10,
        temperature: 1.0,
        top_p: 0.9,
        seed: 3,
        stop_ids: vec![2],
        ..Default::default()
    };
    let repeated: Vec<Vec<u32>> = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.clone(), 3))
        .collect();
    let want = generate(&model, &repeated, &params, None).unwrap();
    let got = models::generate::generate_groups(&model, &prompts, 3, &params, None).unwrap();
    assert_eq!(got.len(), 6);
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.tokens, w.tokens);
        for (a, b) in g.logprobs.iter().zip(&w.logprobs) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
    let distinct: std::collections::HashSet<&Vec<u32>> = got.iter().map(|g| &g.tokens).collect();
    assert!(distinct.len() > 2, "samples within a group differ");
}

/// Rollouts sample from the policy with its adapters folded in: the same greedy tokens and
/// log-probs as the adapted model computing the adapters beside the base, a base left as it
/// was, and disabled adapters left out of the fold.
#[test]
fn folded_adapters_sample_as_the_adapted_model() {
    use models::lora::{LoraAdapter, LoraSettings};
    let settings = LoraSettings {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: vec!["all-linear".into()],
        use_rslora: false,
        use_dora: false,
    };
    let mut model = load("tiny-llama").with_lora(&settings, 5).unwrap();
    // Fresh adapters are a no-op (B = 0): give every B values so the fold matters.
    for (i, (_, _, p)) in model.linear_layers_mut().into_iter().enumerate() {
        let l = p.lora.as_ref().unwrap();
        let [r, d_out] = l.b.dims();
        let b: Vec<f32> = (0..r * d_out)
            .map(|j| ((j * 7 + i * 13) % 17) as f32 / 17.0 - 0.5)
            .collect();
        let b = Tensor::from_data(TensorData::new(b, [r, d_out]), &Default::default());
        p.lora = Some(LoraAdapter::from_tensors(l.a.val(), b, &settings));
    }
    let prompts = vec![vec![17, 3, 44, 81, 120, 7, 99], vec![250, 4]];
    let params = SamplingParams {
        max_new_tokens: 8,
        ..Default::default()
    };
    let folded = model.for_sampling();
    assert!(!folded.has_adapters());
    let want = generate(&model, &prompts, &params, None).unwrap();
    let got = generate(&folded, &prompts, &params, None).unwrap();
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.tokens, w.tokens);
        for (a, b) in g.logprobs.iter().zip(&w.logprobs) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }
    let base = load("tiny-llama");
    let base_out = generate(&base, &prompts, &params, None).unwrap();
    assert_ne!(
        base_out.iter().map(|g| &g.tokens).collect::<Vec<_>>(),
        want.iter().map(|g| &g.tokens).collect::<Vec<_>>(),
        "the adapters change what the model samples"
    );
    let mut off = model.clone();
    off.set_adapters_enabled(false);
    let off_out = generate(&off.for_sampling(), &prompts, &params, None).unwrap();
    for (g, w) in off_out.iter().zip(&base_out) {
        assert_eq!(g.tokens, w.tokens, "disabled adapters are not folded in");
    }
}

/// Generation reaches the model in bucketed shapes: prompts of five lengths, 64 new tokens
/// each, give one prefill and one decoding shape per bucket, not one per length or step.
#[test]
fn generation_shapes_are_bounded() {
    use models::shape_audit::{count, Recording};
    let model = load("tiny-llama");
    let params = SamplingParams {
        max_new_tokens: 64,
        temperature: 1.0,
        seed: 9,
        ..Default::default()
    };
    let recording = Recording::start();
    for len in [3usize, 7, 20, 41, 63] {
        let prompts: Vec<Vec<u32>> = (0..2)
            .map(|r| (0..len - r).map(|i| (i * 5 + r) as u32 % 200 + 3).collect())
            .collect();
        let out = generate(&model, &prompts, &params, None).unwrap();
        assert!(out.iter().all(|g| !g.tokens.is_empty()));
    }
    // One bucket of prompt widths (64) and of capacities (128): a prefill and a decoding step.
    assert_eq!(
        count("attention"),
        2,
        "{:?}",
        models::shape_audit::signatures()
    );
    assert_eq!(count("embedding"), 2);
    // The LM head only ever sees the last position of each row.
    assert_eq!(count("lm_head"), 1);
    // The four weight shapes (q/o, k/v, gate/up, down) at the two sequence shapes, and the
    // LM head at one.
    assert_eq!(
        count("projection"),
        9,
        "{:?}",
        models::shape_audit::signatures()
    );
    drop(recording);
    assert_eq!(count("attention"), 0, "recording ends with its guard");
}

/// The load-balancing loss and the router's choices of a forward pass.
fn routed(model: &CausalLm<Cpu>, input: ForwardInput<Cpu>) -> (f32, Vec<f64>, usize) {
    let (_, routing) = models::router_loss::collecting::<Cpu, _>(|| model.forward(input));
    let (counts, layers) = (routing.expert_counts(), routing.layers());
    let aux = routing.value().expect("a mixture of experts routes");
    (aux.into_scalar(), counts, layers)
}

#[test]
fn router_load_balancing_loss_matches_transformers() {
    for name in ["tiny-mixtral", "tiny-qwen3-moe"] {
        let exp = expected(name);
        let model = load(name);
        let device = model.device();
        let (aux, counts, layers) = routed(
            &model,
            ForwardInput::causal(&ids(&exp["input_ids"]), &device),
        );
        let want = exp["router_aux_loss"].as_f64().unwrap() as f32;
        assert!((aux - want).abs() <= 1e-5, "{name}: aux {aux} vs {want}");
        // The same experts got the same tokens, some none at all.
        let per_layer = exp["expert_tokens"].as_array().unwrap();
        assert_eq!(layers, per_layer.len(), "{name}: sparse layers");
        let mut want_counts = vec![0.0; counts.len()];
        for layer in per_layer {
            for (c, x) in want_counts.iter_mut().zip(layer.as_array().unwrap()) {
                *c += x.as_f64().unwrap();
            }
        }
        assert_eq!(counts, want_counts, "{name}: routed tokens per expert");
        assert!(per_layer
            .iter()
            .any(|l| l.as_array().unwrap().contains(&0.into())));

        // Padding is left out of the loss, as transformers leaves out attention_mask == 0.
        let mask: Vec<Vec<u8>> = ids(&exp["padded_attention_mask"])
            .into_iter()
            .map(|r| r.into_iter().map(|x| x as u8).collect())
            .collect();
        let input = ForwardInput::from_host(
            &ids(&exp["padded_input_ids"]),
            &positions_from_attention_mask(&mask),
            &AttentionLayout::from_attention_mask(&mask),
            &device,
        );
        let (aux, _, _) = routed(&model, input);
        let want = exp["padded_router_aux_loss"].as_f64().unwrap() as f32;
        assert!(
            (aux - want).abs() <= 1e-5,
            "{name}: padded aux {aux} vs {want}"
        );
    }
}

#[test]
fn routings_are_recorded_only_while_collecting_and_on_its_backend() {
    let model = load("tiny-mixtral");
    let input = || ForwardInput::causal(&[vec![5, 9, 200, 7]], &model.device());
    let (_, other) = models::router_loss::collecting::<burn::backend::Autodiff<Cpu>, _>(|| {
        model.forward(input())
    });
    assert_eq!(
        other.layers(),
        0,
        "a forward on another backend is not recorded"
    );
    let (_, ours) = models::router_loss::collecting::<Cpu, _>(|| model.forward(input()));
    assert_eq!(ours.layers(), 2);
    let (_, after) = models::router_loss::collecting::<Cpu, _>(|| ());
    assert_eq!(
        after.layers(),
        0,
        "nothing is left over between collections"
    );
}

/// Experts see bucketed row counts: generating from prompts of five lengths sends each expert
/// 1, 2, 4, ... rows (padded to a power of two under 64), never an odd count.
#[test]
fn expert_row_counts_are_bucketed() {
    use models::shape_audit::{signatures, Recording};
    let model = load("tiny-mixtral");
    let params = SamplingParams {
        max_new_tokens: 24,
        temperature: 1.0,
        seed: 3,
        ..Default::default()
    };
    let recording = Recording::start();
    for len in [3usize, 7, 20, 41] {
        let prompts: Vec<Vec<u32>> = (0..3)
            .map(|r| (0..len + r).map(|i| (i * 7 + r) as u32 % 200 + 3).collect())
            .collect();
        generate(&model, &prompts, &params, None).unwrap();
    }
    // An expert's projection input is `[1, rows, d_in]` then its weight `[d_in, d_out]`.
    let expert_rows: Vec<usize> = signatures()
        .into_iter()
        .filter(|(op, dims)| *op == "projection" && dims.len() == 5 && dims[0] == 1)
        .map(|(_, dims)| dims[1])
        .collect();
    drop(recording);
    assert!(expert_rows.len() > 3, "{expert_rows:?}");
    for rows in &expert_rows {
        assert_eq!(*rows, models::moe::bucket_rows(*rows), "{expert_rows:?}");
    }
}
