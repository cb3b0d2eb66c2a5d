//! Batched incremental decoding with a KV cache over left-padded prompts: greedy,
//! temperature, top-k and top-p sampling, stop on EOS ids or a caller's stop test, seeded.

use anyhow::{bail, Result};
use burn::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::llama::{CausalLm, ForwardInput, KvCache};
use crate::mask::{positions_from_attention_mask, AttentionLayout};

#[derive(Debug, Clone)]
pub struct SamplingParams {
    pub max_new_tokens: usize,
    /// 0 means greedy decoding.
    pub temperature: f32,
    /// 0 disables top-k filtering.
    pub top_k: usize,
    /// 1.0 disables nucleus filtering.
    pub top_p: f32,
    pub seed: u64,
    /// Ids that end a completion (they are kept as its last token).
    pub stop_ids: Vec<u32>,
    /// Id fed for padding and for rows that already finished.
    pub pad_id: u32,
    /// Prompt widths and cache capacities round up to a multiple of this, so a backend
    /// that compiles per shape sees few shapes ([`SHAPE_BUCKET`]); 1 on the CPU, where
    /// padding is only extra work (`models::backend::default_pad_multiple`).
    pub shape_multiple: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 32,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            stop_ids: vec![],
            pad_id: 0,
            shape_multiple: SHAPE_BUCKET,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Eos,
    StopString,
    Length,
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    /// Log-probability of each sampled token under the temperature-scaled model
    /// distribution (before top-k/top-p filtering), as RL trainers recompute it.
    pub logprobs: Vec<f32>,
    pub finish: FinishReason,
}

/// Extra stop test, called with (row, tokens generated so far) after each new token.
pub type StopFn<'a> = dyn Fn(usize, &[u32]) -> bool + 'a;

/// One row's softmax, computed once: `exp(logit - max)` per token and their f64 sum.
struct Softmax {
    unnormalised: Vec<f32>,
    sum: f64,
    log_z: f64,
}

impl Softmax {
    fn new(logits: &[f32]) -> Self {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let unnormalised: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
        let sum: f64 = unnormalised.iter().map(|&e| e as f64).sum();
        Self {
            unnormalised,
            sum,
            log_z: max as f64 + sum.ln(),
        }
    }

    fn prob(&self, i: usize) -> f64 {
        self.unnormalised[i] as f64 / self.sum
    }

    fn logprob(&self, logits: &[f32], i: usize) -> f32 {
        (logits[i] as f64 - self.log_z) as f32
    }
}

/// Choose the next token from one row of logits; returns (token, logprob).
pub fn sample_token(logits: &[f32], p: &SamplingParams, rng: &mut StdRng) -> (u32, f32) {
    if p.temperature <= 0.0 {
        let (best, _) =
            logits
                .iter()
                .enumerate()
                .fold((0usize, f32::NEG_INFINITY), |acc, (i, &l)| {
                    if l > acc.1 {
                        (i, l)
                    } else {
                        acc
                    }
                });
        return (best as u32, Softmax::new(logits).logprob(logits, best));
    }
    let scaled: Vec<f32> = logits.iter().map(|&l| l / p.temperature).collect();
    let softmax = Softmax::new(&scaled);
    let prob = |i: usize| softmax.prob(i);
    let desc = |a: &usize, b: &usize| scaled[*b].total_cmp(&scaled[*a]).then(a.cmp(b));
    // Only the head of the distribution can be drawn: select it in O(vocab) instead of
    // sorting the whole vocabulary for every row at every step.
    let mut order: Vec<usize> = (0..scaled.len()).collect();
    if p.top_k > 0 && p.top_k < order.len() {
        order.select_nth_unstable_by(p.top_k - 1, desc);
        order.truncate(p.top_k);
    }
    let cut = if p.top_p < 1.0 {
        nucleus(&mut order, &prob, p.top_p as f64, desc)
    } else {
        order.len()
    };
    let mass: f64 = order[..cut].iter().map(|&i| prob(i)).sum();
    let mut u = rng.random::<f64>() * mass;
    for (n, &tok) in order[..cut].iter().enumerate() {
        let q = prob(tok);
        if u < q || n + 1 == cut {
            return (tok as u32, softmax.logprob(&scaled, tok));
        }
        u -= q;
    }
    unreachable!("cut >= 1")
}

/// HF's nucleus filter over `order` (renormalised over it): sorts a growing head of
/// `order` until it holds `top_p` of the mass, and returns how many tokens to keep (>= 1).
fn nucleus(
    order: &mut [usize],
    prob: &dyn Fn(usize) -> f64,
    top_p: f64,
    desc: impl Fn(&usize, &usize) -> std::cmp::Ordering + Copy,
) -> usize {
    let total: f64 = order.iter().map(|&i| prob(i)).sum();
    let len = order.len();
    let mut k = len.min(64);
    loop {
        if k < len {
            order.select_nth_unstable_by(k - 1, desc);
        }
        order[..k].sort_unstable_by(desc);
        let mut cum = 0.0;
        for (n, &i) in order[..k].iter().enumerate() {
            if n > 0 && cum >= top_p {
                return n;
            }
            cum += prob(i) / total;
        }
        if k == len {
            return len;
        }
        k = (k * 8).min(len);
    }
}

/// The default shape multiple (transformers' collators' `pad_to_multiple_of` for tensor
/// cores is 64 too).
pub const SHAPE_BUCKET: usize = 64;

/// `len` (at least 1) rounded up to a multiple of `multiple`.
pub fn bucket(len: usize, multiple: usize) -> usize {
    let m = multiple.max(1);
    len.max(1).div_ceil(m) * m
}

/// `prompts` left-padded to `width`: their ids and 0/1 attention masks.
pub(crate) fn left_padded(
    prompts: &[Vec<u32>],
    width: usize,
    pad_id: u32,
) -> (Vec<Vec<u32>>, Vec<Vec<u8>>) {
    prompts
        .iter()
        .map(|p| {
            let pad = width - p.len();
            (
                [vec![pad_id; pad], p.clone()].concat(),
                [vec![0u8; pad], vec![1u8; p.len()]].concat(),
            )
        })
        .unzip()
}

pub(crate) fn host_rows<B: Backend>(logits: Tensor<B, 3>) -> Vec<Vec<f32>> {
    let [b, _, v] = logits.dims();
    let flat: Vec<f32> = logits.reshape([b * v]).into_data().iter::<f32>().collect();
    flat.chunks(v).map(|c| c.to_vec()).collect()
}

fn repeat_rows<T: Clone>(rows: Vec<T>, copies: usize) -> Vec<T> {
    rows.into_iter()
        .flat_map(|r| std::iter::repeat_n(r, copies))
        .collect()
}

/// Generate continuations for every prompt in one left-padded batch.
pub fn generate<B: Backend>(
    model: &CausalLm<B>,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
    stop: Option<&StopFn<'_>>,
) -> Result<Vec<Generation>> {
    generate_groups(model, prompts, 1, params, stop)
}

/// Sample `copies` continuations of every prompt (rows `p * copies ..`), prefilling each
/// prompt once and sharing its KV cache across the group, as GRPO's groups need: with
/// long prompts and short completions the prefill is most of the work.
pub fn generate_groups<B: Backend>(
    model: &CausalLm<B>,
    prompts: &[Vec<u32>],
    copies: usize,
    params: &SamplingParams,
    stop: Option<&StopFn<'_>>,
) -> Result<Vec<Generation>> {
    if copies == 0 {
        bail!("copies must be at least 1");
    }
    if prompts.is_empty() {
        return Ok(vec![]);
    }
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        bail!("prompt {i} is empty: generation needs at least one prompt token");
    }
    let vocab = model.vocab_size() as u32;
    if let Some(bad) = prompts.iter().flatten().find(|&&t| t >= vocab) {
        bail!("prompt token id {bad} is outside the model's vocabulary (size {vocab})");
    }
    let device = model.device();
    let batch = prompts.len() * copies;
    // Shapes come in buckets (prompt width and cache capacity rounded up to a multiple of
    // `shape_multiple`): a generation uses one prefill and one decoding shape, the same for
    // every prompt batch of the same bucket, so a JIT backend compiles them once.
    let m = params.shape_multiple;
    let width = bucket(prompts.iter().map(Vec::len).max().unwrap_or(0), m);
    let (ids, attn) = left_padded(prompts, width, params.pad_id);
    let positions = positions_from_attention_mask(&attn);
    let mut next_pos: Vec<i64> = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.len() as i64, copies))
        .collect();
    // The cache attends over its whole capacity: key slots not yet written are invalid.
    let capacity = bucket(width + params.max_new_tokens, m);
    let mut layout = AttentionLayout::from_attention_mask(&attn);
    for valid in layout.key_valid.iter_mut() {
        valid.resize(capacity, false);
    }
    let mut cache = model.new_cache(capacity);
    let mut rng = StdRng::seed_from_u64(params.seed);
    let mut out: Vec<Generation> = (0..batch)
        .map(|_| Generation {
            tokens: vec![],
            logprobs: vec![],
            finish: FinishReason::Length,
        })
        .collect();
    let mut done = vec![false; batch];

    // Every row's tokens so far, kept only while a LongRoPE model may still need its cache
    // rebuilt (below).
    let mut fed = model.rope.long_from().map(|_| {
        (
            repeat_rows(ids.clone(), copies),
            repeat_rows(attn.clone(), copies),
        )
    });
    let input = ForwardInput::from_host(&ids, &positions, &layout, &device);
    let hidden = model.hidden_states(input, Some(&mut cache));
    let prefill_logits = host_rows(model.logits(hidden.slice(s![.., width - 1..width, ..])));
    cache.repeat_rows(copies);
    layout.key_valid = repeat_rows(std::mem::take(&mut layout.key_valid), copies);
    layout.segments = layout.segments.take().map(|s| repeat_rows(s, copies));
    layout.batch = batch;
    let mut logits = repeat_rows(prefill_logits, copies);

    for _ in 0..params.max_new_tokens {
        let mut step_ids = Vec::with_capacity(batch);
        for row in 0..batch {
            if done[row] {
                step_ids.push(vec![params.pad_id]);
                continue;
            }
            let (tok, lp) = sample_token(&logits[row], params, &mut rng);
            let g = &mut out[row];
            g.tokens.push(tok);
            g.logprobs.push(lp);
            if params.stop_ids.contains(&tok) {
                g.finish = FinishReason::Eos;
                done[row] = true;
            } else if stop.is_some_and(|f| f(row, &g.tokens)) {
                g.finish = FinishReason::StopString;
                done[row] = true;
            }
            step_ids.push(vec![tok]);
        }
        if done.iter().all(|&d| d) || out.iter().all(|g| g.tokens.len() >= params.max_new_tokens) {
            break;
        }
        let step_pos: Vec<Vec<i64>> = next_pos.iter().map(|&p| vec![p]).collect();
        for p in next_pos.iter_mut() {
            *p += 1;
        }
        if let Some((rows, masks)) = fed.as_mut() {
            for ((row, mask), id) in rows.iter_mut().zip(masks.iter_mut()).zip(&step_ids) {
                row.push(id[0]);
                mask.push(1);
            }
            // LongRoPE turns with other frequencies once a pass reaches past the original
            // context: the cached keys were turned with the short ones, so the cache is
            // rebuilt from every token so far at that step, as transformers' Phi-3 drops its
            // cache there. That happens once.
            let reach = step_pos.iter().map(|p| p[0]).max().unwrap_or(0) as usize;
            if model.rope.long_from() == Some(reach) {
                (cache, layout, logits) = prefill(model, rows, masks, capacity)?;
                fed = None;
                continue;
            }
        }
        for valid in layout.key_valid.iter_mut() {
            valid[cache.len] = true;
        }
        layout.q_len = 1;
        layout.q_offset = cache.len;
        let input = ForwardInput::from_host(&step_ids, &step_pos, &layout, &device);
        let hidden = model.hidden_states(input, Some(&mut cache));
        logits = host_rows(model.logits(hidden));
    }
    Ok(out)
}

/// A fresh cache of `capacity` filled from the rows `ids` (attention `mask`), the layout to
/// go on decoding with, and the last position's logits.
fn prefill<B: Backend>(
    model: &CausalLm<B>,
    ids: &[Vec<u32>],
    mask: &[Vec<u8>],
    capacity: usize,
) -> Result<(KvCache<B>, AttentionLayout, Vec<Vec<f32>>)> {
    let width = ids.first().map_or(0, Vec::len);
    let positions = positions_from_attention_mask(mask);
    let mut layout = AttentionLayout::from_attention_mask(mask);
    for valid in layout.key_valid.iter_mut() {
        valid.resize(capacity, false);
    }
    let mut cache = model.new_cache(capacity);
    let input = ForwardInput::from_host(ids, &positions, &layout, &model.device());
    let hidden = model.hidden_states(input, Some(&mut cache));
    let logits = host_rows(model.logits(hidden.slice(s![.., width - 1..width, ..])));
    Ok((cache, layout, logits))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_one_is_greedy_and_top_p_keeps_the_head() {
        let logits = vec![0.1, 3.0, 0.2, 2.9];
        let mut rng = StdRng::seed_from_u64(7);
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 1,
            ..Default::default()
        };
        for _ in 0..20 {
            assert_eq!(sample_token(&logits, &p, &mut rng).0, 1);
        }
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.4,
            ..Default::default()
        };
        for _ in 0..20 {
            assert_eq!(
                sample_token(&logits, &p, &mut rng).0,
                1,
                "0.4 mass is reached by the top token alone"
            );
        }
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            ..Default::default()
        };
        let picks: std::collections::HashSet<u32> = (0..200)
            .map(|_| sample_token(&logits, &p, &mut rng).0)
            .collect();
        assert_eq!(picks, [1, 3].into_iter().collect());
    }

    #[test]
    fn nucleus_on_a_large_vocabulary_keeps_exactly_the_full_sort_head() {
        // 1000 tokens; the top 150 hold most mass, so the partial sort must grow past 64.
        let logits: Vec<f32> = (0..1000)
            .map(|i| {
                if i % 7 == 0 {
                    3.0 + (i % 13) as f32 * 0.01
                } else {
                    -2.0
                }
            })
            .collect();
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            ..Default::default()
        };
        let softmax = Softmax::new(&logits);
        let mut sorted: Vec<usize> = (0..1000).collect();
        sorted.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        let mut cum = 0.0;
        let mut want = std::collections::HashSet::new();
        for &i in &sorted {
            if !want.is_empty() && cum >= 0.9 {
                break;
            }
            cum += softmax.prob(i);
            want.insert(i as u32);
        }
        assert!(want.len() > 64, "{}", want.len());
        let mut rng = StdRng::seed_from_u64(5);
        let got: std::collections::HashSet<u32> = (0..4000)
            .map(|_| sample_token(&logits, &p, &mut rng).0)
            .collect();
        assert!(got.is_subset(&want) && got.len() as f64 > 0.9 * want.len() as f64);
    }

    #[test]
    fn logprob_is_of_the_tempered_distribution() {
        let logits = vec![1.0f32, 2.0];
        let mut rng = StdRng::seed_from_u64(1);
        let p = SamplingParams {
            temperature: 2.0,
            top_k: 1,
            ..Default::default()
        };
        let (tok, lp) = sample_token(&logits, &p, &mut rng);
        let expect = (1.0f64 / (1.0 + (-0.5f64).exp())).ln() as f32;
        assert_eq!(tok, 1);
        assert!((lp - expect).abs() < 1e-6);
    }
}
