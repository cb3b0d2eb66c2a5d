//! Continuous batching (`models::slots`): sequences that join a running batch at different
//! steps, at different positions, decode exactly as each would alone, and a LoRA bank
//! routes every row to its own adapter.

use burn::prelude::*;
use models::backend::Cpu;
use models::checkpoint::load_model;
use models::generate::{generate, SamplingParams};
use models::lora::LoraSettings;
use models::slots::SlotBatch;
use models::{CausalLm, ForwardInput};
use std::path::PathBuf;

fn load(name: &str) -> CausalLm<Cpu> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/models")
        .join(name);
    load_model::<Cpu>(&dir, &Default::default()).unwrap().1
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Logits of the last token of `seq`, recomputed without a cache.
fn recomputed(model: &CausalLm<Cpu>, seq: &[u32]) -> Vec<f32> {
    let input = ForwardInput::<Cpu>::causal(&[seq.to_vec()], &Default::default());
    let t = seq.len();
    let logits = model.forward(input).slice(s![.., t - 1..t, ..]);
    logits.into_data().iter::<f32>().collect()
}

type Live = (usize, Vec<u32>, Vec<f32>);

/// Greedy decoding of `prompts`, prompt `i` joining at step `joins[i]`, `steps` tokens
/// each; returns every sequence's tokens and the logits of its last step.
fn staggered(
    model: &mut CausalLm<Cpu>,
    prompts: &[Vec<u32>],
    joins: &[usize],
    adapters: &[usize],
    steps: usize,
    shape_multiple: usize,
) -> Vec<(Vec<u32>, Vec<f32>)> {
    let mut batch = SlotBatch::new(model, 4, 256, 0, shape_multiple);
    // Per prompt while it decodes: (slot, tokens so far, logits of its last step).
    let mut live: Vec<Option<Live>> = vec![None; prompts.len()];
    let mut done = vec![None; prompts.len()];
    for step in 0.. {
        for (i, p) in prompts.iter().enumerate() {
            if joins[i] == step {
                let slot = batch.free_slots()[0];
                let logits = batch.admit(model, p, &[slot], adapters[i]).unwrap();
                live[i] = Some((slot, vec![argmax(&logits)], logits));
            }
        }
        let mut feed = vec![];
        let mut who = vec![];
        for (i, l) in live.iter_mut().enumerate() {
            if let Some((slot, toks, logits)) = l.take() {
                if toks.len() == steps {
                    batch.release(slot);
                    done[i] = Some((toks, logits));
                } else {
                    feed.push((slot, *toks.last().unwrap()));
                    who.push(i);
                    *l = Some((slot, toks, logits));
                }
            }
        }
        if done.iter().all(Option::is_some) {
            break;
        }
        let out = batch.step(model, &feed).unwrap();
        for (i, logits) in who.into_iter().zip(out) {
            let (_, toks, last) = live[i].as_mut().unwrap();
            toks.push(argmax(&logits));
            *last = logits;
        }
    }
    done.into_iter().map(Option::unwrap).collect()
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "{what}: logits differ by {worst}");
}

#[test]
fn sequences_joining_a_running_batch_decode_as_alone() {
    for (name, multiple) in [
        ("tiny-llama", 64),
        ("tiny-mistral-swa", 64),
        ("tiny-qwen3", 64),
        ("tiny-phi3", 64),
        ("tiny-llama", 1),
    ] {
        let mut model = load(name);
        let prompts = vec![
            vec![5, 9, 200],
            vec![17, 3, 44, 81, 120, 7, 99],
            vec![250],
            vec![8, 8, 8, 8, 8],
            vec![31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41],
        ];
        // The last one reuses a released slot, whose cache still holds the old sequence.
        let joins = [0, 0, 3, 7, 22];
        let steps = 20;
        let got = staggered(&mut model, &prompts, &joins, &[0; 5], steps, multiple);
        let params = SamplingParams {
            max_new_tokens: steps,
            shape_multiple: multiple,
            ..Default::default()
        };
        for (p, (toks, last)) in prompts.iter().zip(&got) {
            let alone = generate(&model, std::slice::from_ref(p), &params, None).unwrap();
            assert_eq!(toks, &alone[0].tokens, "{name}: prompt {p:?}");
            let seq = [p.clone(), toks[..steps - 1].to_vec()].concat();
            assert_close(last, &recomputed(&model, &seq), name);
        }
    }
}

/// The model with one LoRA adapter whose `B` is random (a fresh one changes nothing).
fn with_adapter(base: &CausalLm<Cpu>, r: usize, seed: u64) -> CausalLm<Cpu> {
    let settings = LoraSettings {
        r,
        alpha: 2.0 * r as f64,
        dropout: 0.0,
        target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        use_rslora: false,
        use_dora: false,
    };
    let mut m = base.clone().with_lora(&settings, seed).unwrap();
    for (_, _, p) in m.linear_layers_mut() {
        if let Some(l) = p.lora.as_mut() {
            let dims = l.b.dims();
            let b = Tensor::<Cpu, 2>::random(
                dims,
                burn::tensor::Distribution::Uniform(-0.5, 0.5),
                &Default::default(),
            );
            *l = models::lora::LoraAdapter::from_tensors(l.a.val(), b, &settings);
        }
    }
    m
}

#[test]
fn a_lora_bank_routes_each_row_to_its_adapter() {
    let base = load("tiny-llama");
    let adapters = vec![with_adapter(&base, 4, 1), with_adapter(&base, 8, 2)];
    let mut served = base.clone().with_lora_bank(&adapters).unwrap();
    let prompts = vec![
        vec![5, 9, 200],
        vec![17, 3, 44, 81],
        vec![250, 1],
        vec![8, 8],
    ];
    let routes = [0, 1, 2, 1];
    let steps = 8;
    let got = staggered(&mut served, &prompts, &[0, 0, 1, 2], &routes, steps, 64);
    let params = SamplingParams {
        max_new_tokens: steps,
        ..Default::default()
    };
    for ((p, route), (toks, last)) in prompts.iter().zip(routes).zip(&got) {
        let alone = if route == 0 {
            &base
        } else {
            &adapters[route - 1]
        };
        let want = generate(alone, std::slice::from_ref(p), &params, None).unwrap();
        assert_eq!(toks, &want[0].tokens, "adapter {route}");
        let seq = [p.clone(), toks[..steps - 1].to_vec()].concat();
        assert_close(last, &recomputed(alone, &seq), "bank");
    }
    let base_tokens = generate(&base, &prompts[1..2], &params, None).unwrap();
    assert_ne!(
        got[1].0, base_tokens[0].tokens,
        "adapter 1 must change the output"
    );
}
