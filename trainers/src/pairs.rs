//! Preference pairs as collated rows (chosen rows first, then rejected), shared by DPO and
//! reward-model training.

use burn::prelude::*;

use datasets::batch::{collate_sft, Padding, SftBatch};
use datasets::pack::PackedRow;
use datasets::tokenize::TokenizedPair;

/// The collated rows of some pairs (chosen rows first) and their completion lengths. With
/// static shapes (`pad.fixed_rows()`), empty pairs fill the batch up to `capacity` pairs.
pub fn collate_pairs(
    pairs: &[&TokenizedPair],
    pad: Padding,
    capacity: usize,
) -> (SftBatch, Vec<usize>) {
    collate_pairs_trained(pairs, pad, capacity, Trained::Completions)
}

/// Which tokens of a pair's rows are trained (scored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trained {
    /// The completions only.
    Completions,
    /// The chosen rows from their second token on (prompt included: ORPO's NLL term), the
    /// rejected rows' completions. The completions are the last `lengths` trained tokens.
    WholeChosen,
}

/// [`collate_pairs`] with the trained tokens of `trained`.
pub fn collate_pairs_trained(
    pairs: &[&TokenizedPair],
    pad: Padding,
    capacity: usize,
    trained: Trained,
) -> (SftBatch, Vec<usize>) {
    let empty = TokenizedPair::default();
    let slots = pad.rows(pairs.len(), capacity);
    let pairs: Vec<&TokenizedPair> = pairs
        .iter()
        .copied()
        .chain(std::iter::repeat_n(&empty, slots - pairs.len()))
        .collect();
    let row = |p: &TokenizedPair, completion: &[u32], from: usize| {
        PackedRow::completion([p.prompt.as_slice(), completion].concat(), from)
    };
    let chosen_from = |p: &TokenizedPair| match trained {
        Trained::Completions => p.prompt.len(),
        Trained::WholeChosen => 1,
    };
    let mut rows: Vec<PackedRow> = pairs
        .iter()
        .map(|p| row(p, &p.chosen, chosen_from(p)))
        .collect();
    rows.extend(pairs.iter().map(|p| row(p, &p.rejected, p.prompt.len())));
    let lengths = pairs
        .iter()
        .map(|p| p.chosen.len())
        .chain(pairs.iter().map(|p| p.rejected.len()))
        .collect();
    (collate_sft(&rows, pad, rows.len()), lengths)
}

/// `[slots]`: 1 for the first `pairs` entries, 0 for the empty pairs after them (None
/// when there are none).
pub fn real_pairs<B: Backend>(
    pairs: usize,
    slots: usize,
    device: &B::Device,
) -> Option<Tensor<B, 1>> {
    (slots > pairs).then(|| {
        let m: Vec<f32> = (0..slots).map(|i| f32::from(u8::from(i < pairs))).collect();
        Tensor::from_data(TensorData::new(m, [slots]), device)
    })
}
