//! Log-probability of completions given prompts: the probe behind `burnish score`.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;

use crate::llama::{CausalLm, ForwardInput};
use crate::mask::AttentionLayout;
use crate::TextTokenizer;

/// Summed log-probability and token count of each completion given its prompt.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct CompletionScore {
    pub logprob: f64,
    pub num_tokens: usize,
}

/// Score `(prompt_ids, completion_ids)` pairs in right-padded batches of `batch_size`. With
/// `multiple_of > 1` (static shapes, for backends that compile per shape) widths are rounded
/// up to a multiple of it and every batch has `batch_size` rows, the missing ones empty.
pub fn score_completions<B: Backend>(
    model: &CausalLm<B>,
    rows: &[(Vec<u32>, Vec<u32>)],
    batch_size: usize,
    pad_id: u32,
    multiple_of: usize,
) -> Vec<CompletionScore> {
    let masked: Vec<(Vec<u32>, Vec<bool>)> = rows
        .iter()
        .map(|(p, c)| {
            let ids = [p.as_slice(), c.as_slice()].concat();
            let scored = (0..ids.len()).map(|t| t >= p.len()).collect();
            (ids, scored)
        })
        .collect();
    score_masked(model, &masked, batch_size, pad_id, multiple_of)
}

/// Summed log-probability and count of the tokens marked in each row's mask (a loss mask,
/// several assistant turns alike), each predicted from the tokens before it; a row's first
/// token has nothing before it and is never scored. Batching as [`score_completions`].
pub fn score_masked<B: Backend>(
    model: &CausalLm<B>,
    rows: &[(Vec<u32>, Vec<bool>)],
    batch_size: usize,
    pad_id: u32,
    multiple_of: usize,
) -> Vec<CompletionScore> {
    let device = model.device();
    let mut out = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(batch_size.max(1)) {
        let longest = chunk.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
        if longest < 2 {
            out.extend(chunk.iter().map(|_| CompletionScore {
                logprob: 0.0,
                num_tokens: 0,
            }));
            continue;
        }
        let m = multiple_of.max(1);
        let width = longest.div_ceil(m) * m;
        let empty_rows = if m > 1 {
            batch_size.saturating_sub(chunk.len())
        } else {
            0
        };
        let mut ids = Vec::new();
        let mut attn = Vec::new();
        let empty = Vec::new();
        for s in chunk
            .iter()
            .map(|(ids, _)| ids)
            .chain(std::iter::repeat_n(&empty, empty_rows))
        {
            let pad = width - s.len();
            ids.push([s.clone(), vec![pad_id; pad]].concat());
            attn.push([vec![1u8; s.len()], vec![0u8; pad]].concat());
        }
        let positions: Vec<Vec<i64>> = ids.iter().map(|_| (0..width as i64).collect()).collect();
        let layout = AttentionLayout::from_attention_mask(&attn);
        let input = ForwardInput::from_host(&ids, &positions, &layout, &device);
        // Predict token t+1 from position t: targets are the ids shifted left.
        let logits = model.forward(input).slice(s![.., 0..width - 1, ..]);
        let logp = log_softmax(logits, 2);
        let targets: Vec<i64> = ids
            .iter()
            .flat_map(|r| r[1..].iter().map(|&t| t as i64))
            .collect();
        let b = ids.len();
        let targets =
            Tensor::<B, 3, Int>::from_data(TensorData::new(targets, [b, width - 1, 1]), &device);
        let picked: Vec<f32> = logp.gather(2, targets).into_data().iter::<f32>().collect();
        for (row, (seq, scored)) in chunk.iter().enumerate() {
            let mut lp = 0.0f64;
            let mut n = 0;
            for t in 1..seq.len() {
                if scored.get(t).copied().unwrap_or(false) {
                    lp += picked[row * (width - 1) + t - 1] as f64;
                    n += 1;
                }
            }
            out.push(CompletionScore {
                logprob: lp,
                num_tokens: n,
            });
        }
    }
    out
}

/// `(prompt ids, completion ids)` as TRL's SFT splits them: the tokens of `prompt +
/// completion` after the longest prefix they share with the prompt's own tokens (a
/// completion may merge with the prompt's last token).
pub fn split_prompt_completion(
    tok: &TextTokenizer,
    prompt: &str,
    completion: &str,
) -> anyhow::Result<(Vec<u32>, Vec<u32>)> {
    let p = tok.encode(prompt, true)?;
    let full = tok.encode(&format!("{prompt}{completion}"), true)?;
    let common = p.iter().zip(&full).take_while(|(a, b)| a == b).count();
    Ok((full[..common].to_vec(), full[common..].to_vec()))
}
