//! The last host-side step before tensors: collate rows into a padded batch with position
//! ids, an attention layout (segments keep packed sequences apart) and next-token targets.

use models::mask::AttentionLayout;

use crate::pack::PackedRow;

/// A right-padded SFT batch. Position `t` predicts `targets[b][t]`; it counts in the loss
/// when `weights[b][t]` (the target is trained and in the same sequence as position `t`).
#[derive(Debug, Clone)]
pub struct SftBatch {
    pub ids: Vec<Vec<u32>>,
    pub positions: Vec<Vec<i64>>,
    pub layout: AttentionLayout,
    pub targets: Vec<Vec<u32>>,
    pub weights: Vec<Vec<bool>>,
}

impl SftBatch {
    /// Number of trained target tokens: the loss normaliser.
    pub fn num_trained(&self) -> usize {
        self.weights.iter().flatten().filter(|&&w| w).count()
    }

    /// Real (non-padding) tokens: what throughput counts.
    pub fn num_tokens(&self) -> usize {
        self.layout
            .key_valid
            .iter()
            .flatten()
            .filter(|&&v| v)
            .count()
    }
}

pub fn collate_sft(rows: &[PackedRow], pad_id: u32) -> SftBatch {
    let width = rows.iter().map(PackedRow::len).max().unwrap_or(0);
    let mut b = SftBatch {
        ids: vec![],
        positions: vec![],
        layout: AttentionLayout {
            batch: rows.len(),
            q_len: width,
            q_offset: 0,
            key_valid: vec![],
            segments: Some(vec![]),
        },
        targets: vec![],
        weights: vec![],
    };
    for r in rows {
        let n = r.len();
        let pad = width - n;
        b.ids.push(
            r.ids
                .iter()
                .copied()
                .chain(std::iter::repeat_n(pad_id, pad))
                .collect(),
        );
        b.positions.push(
            r.positions
                .iter()
                .map(|&p| p as i64)
                .chain(std::iter::repeat_n(0, pad))
                .collect(),
        );
        b.layout
            .key_valid
            .push([vec![true; n], vec![false; pad]].concat());
        if let Some(s) = b.layout.segments.as_mut() {
            s.push(
                r.segments
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, pad))
                    .collect(),
            );
        }
        let mut targets = vec![pad_id; width];
        let mut weights = vec![false; width];
        for t in 0..n.saturating_sub(1) {
            targets[t] = r.ids[t + 1];
            weights[t] = r.trained[t + 1] && r.segments[t + 1] == r.segments[t];
        }
        b.targets.push(targets);
        b.weights.push(weights);
    }
    b
}
