//! The last host-side step before tensors: collate rows into a padded batch with position
//! ids, an attention layout (segments keep packed sequences apart) and next-token targets.
//!
//! A backend that compiles a kernel per tensor shape (CUDA) must see few shapes, so
//! [`Padding`] can round the width up to a multiple and keep the row count fixed: a batch's
//! shape then depends on the settings and the longest row's bucket, not on the data.

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
    /// How it was padded; the count of trained positions handed to the loss is rounded the
    /// same way.
    pub padding: Padding,
}

/// How rows are padded into a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Padding {
    /// The token id at padding positions.
    pub id: u32,
    /// Widths (and counts of trained positions) are rounded up to a multiple of this, as
    /// transformers' `pad_to_multiple_of`; 1 pads only to the longest row.
    pub multiple_of: usize,
}

impl Padding {
    /// Pad to the longest row only, with as many rows as given.
    pub fn exact(id: u32) -> Self {
        Self { id, multiple_of: 1 }
    }

    pub fn round(&self, n: usize) -> usize {
        n.div_ceil(self.multiple_of.max(1)) * self.multiple_of.max(1)
    }

    /// Static shapes: every batch of a kind has the same row count (missing rows are empty
    /// and weigh nothing). Tied to bucketed widths, which only a shape-compiling backend
    /// wants: on the CPU an empty row would be computed for nothing.
    pub fn fixed_rows(&self) -> bool {
        self.multiple_of > 1
    }

    /// Rows in a batch of `real` rows whose kind holds `capacity`.
    pub fn rows(&self, real: usize, capacity: usize) -> usize {
        if self.fixed_rows() {
            real.max(capacity)
        } else {
            real
        }
    }
}

impl SftBatch {
    /// Number of trained target tokens: the loss normaliser.
    pub fn num_trained(&self) -> usize {
        self.weights.iter().flatten().filter(|&&w| w).count()
    }

    /// Trained positions handed to the loss: `num_trained` rounded up to `multiple_of`.
    pub fn num_trained_padded(&self) -> usize {
        self.padding.round(self.num_trained())
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

/// Collate `rows` (then empty rows up to `pad.rows(rows.len(), capacity)`).
pub fn collate_sft(rows: &[PackedRow], pad: Padding, capacity: usize) -> SftBatch {
    let pad_id = pad.id;
    let width = pad.round(rows.iter().map(PackedRow::len).max().unwrap_or(0));
    let empty = PackedRow::default();
    let n_rows = pad.rows(rows.len(), capacity);
    let rows = rows
        .iter()
        .chain(std::iter::repeat_n(&empty, n_rows - rows.len()));
    let mut b = SftBatch {
        ids: vec![],
        positions: vec![],
        padding: pad,
        layout: AttentionLayout {
            batch: n_rows,
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
        let fill = width - n;
        b.ids.push(
            r.ids
                .iter()
                .copied()
                .chain(std::iter::repeat_n(pad_id, fill))
                .collect(),
        );
        b.positions.push(
            r.positions
                .iter()
                .map(|&p| p as i64)
                .chain(std::iter::repeat_n(0, fill))
                .collect(),
        );
        b.layout
            .key_valid
            .push([vec![true; n], vec![false; fill]].concat());
        if let Some(s) = b.layout.segments.as_mut() {
            s.push(
                r.segments
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, fill))
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
