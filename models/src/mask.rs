//! Attention masks built on the host: causal order, key padding (left-padded batches and
//! KV caches) and packing segments, so attention never crosses a sequence boundary.

use burn::prelude::*;

/// Which keys each query may attend to. `true` in the produced tensor means *blocked*,
/// the convention of `burn::tensor::module::attention`.
#[derive(Debug, Clone)]
pub struct AttentionLayout {
    pub batch: usize,
    pub q_len: usize,
    /// Absolute index of the first query inside the key sequence (the KV cache length).
    pub q_offset: usize,
    /// Per row, whether each key position holds a real token (false for padding).
    pub key_valid: Vec<Vec<bool>>,
    /// Per row, a segment id for each key position; keys of another segment are blocked.
    pub segments: Option<Vec<Vec<u32>>>,
}

impl AttentionLayout {
    /// Plain causal attention with every token valid.
    pub fn causal(batch: usize, len: usize) -> Self {
        Self {
            batch,
            q_len: len,
            q_offset: 0,
            key_valid: vec![vec![true; len]; batch],
            segments: None,
        }
    }

    /// Causal attention over right- or left-padded rows described by a 0/1 attention mask.
    pub fn from_attention_mask(mask: &[Vec<u8>]) -> Self {
        let len = mask.first().map_or(0, |r| r.len());
        Self {
            batch: mask.len(),
            q_len: len,
            q_offset: 0,
            key_valid: mask
                .iter()
                .map(|r| r.iter().map(|&m| m != 0).collect())
                .collect(),
            segments: None,
        }
    }

    pub fn k_len(&self) -> usize {
        self.key_valid.first().map_or(0, |r| r.len())
    }

    pub fn to_tensor<B: Backend>(&self, device: &B::Device) -> Tensor<B, 4, Bool> {
        let (b, tq, tk) = (self.batch, self.q_len, self.k_len());
        let mut blocked = Vec::with_capacity(b * tq * tk);
        for row in 0..b {
            let valid = &self.key_valid[row];
            let seg = self.segments.as_ref().map(|s| &s[row]);
            for i in 0..tq {
                let qi = self.q_offset + i;
                for j in 0..tk {
                    let same_segment = seg.is_none_or(|s| s[j] == s[qi]);
                    blocked.push(j > qi || !valid[j] || !same_segment);
                }
            }
        }
        Tensor::from_data(TensorData::new(blocked, [b, 1, tq, tk]), device)
    }
}

/// `[1, 1, tq, tk]`, true where key `j` is `size` or more slots behind query `i` (at slot
/// `q_offset + i`): what sliding-window attention blocks on top of the layout's mask.
/// Slots, not position ids, measure the distance, as transformers does (left padding and
/// packing keep distances within a sequence the same).
pub fn outside_window<B: Backend>(
    size: usize,
    q_offset: usize,
    tq: usize,
    tk: usize,
    device: &B::Device,
) -> Tensor<B, 4, Bool> {
    let mut blocked = Vec::with_capacity(tq * tk);
    for i in 0..tq {
        let qi = q_offset + i;
        blocked.extend((0..tk).map(|j| qi >= j + size));
    }
    Tensor::from_data(TensorData::new(blocked, [1, 1, tq, tk]), device)
}

/// HF's position ids for a padded batch: `cumsum(mask) - 1`, with padding set to 1.
pub fn positions_from_attention_mask(mask: &[Vec<u8>]) -> Vec<Vec<i64>> {
    mask.iter()
        .map(|row| {
            let mut seen = 0i64;
            row.iter()
                .map(|&m| {
                    if m != 0 {
                        seen += 1;
                        seen - 1
                    } else {
                        1
                    }
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn left_padding_positions_match_hf() {
        let p = positions_from_attention_mask(&[vec![0, 0, 1, 1, 1], vec![1, 1, 1, 1, 1]]);
        assert_eq!(p, vec![vec![1, 1, 0, 1, 2], vec![0, 1, 2, 3, 4]]);
    }
}
