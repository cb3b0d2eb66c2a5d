//! Packing: best-fit-decreasing of tokenized sequences into rows of `max_seq_len`, with
//! per-sequence position ids and segment ids so attention never crosses a boundary.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::tokenize::TokenizedSeq;

/// One training row: one sequence, or several packed together.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackedRow {
    pub ids: Vec<u32>,
    pub trained: Vec<bool>,
    /// Position of each token within its own sequence (restarts at 0 per sequence).
    pub positions: Vec<u32>,
    /// 1-based index of the sequence each token belongs to.
    pub segments: Vec<u32>,
}

impl PackedRow {
    pub fn single(seq: &TokenizedSeq) -> Self {
        let n = seq.ids.len();
        Self {
            ids: seq.ids.clone(),
            trained: seq.trained.clone(),
            positions: (0..n as u32).collect(),
            segments: vec![1; n],
        }
    }

    /// One sequence (a prompt and its completion) whose tokens from `trained_from` on are
    /// trained.
    pub fn completion(ids: Vec<u32>, trained_from: usize) -> Self {
        let n = ids.len();
        Self {
            trained: (0..n).map(|i| i >= trained_from).collect(),
            positions: (0..n as u32).collect(),
            segments: vec![1; n],
            ids,
        }
    }

    fn push(&mut self, seq: &TokenizedSeq) {
        let segment = self.segments.last().copied().unwrap_or(0) + 1;
        self.ids.extend(&seq.ids);
        self.trained.extend(&seq.trained);
        self.positions.extend(0..seq.ids.len() as u32);
        self.segments
            .extend(std::iter::repeat_n(segment, seq.ids.len()));
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn num_sequences(&self) -> usize {
        self.segments.last().copied().unwrap_or(0) as usize
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PackingStats {
    pub sequences: usize,
    pub rows: usize,
    pub tokens: usize,
    /// Real tokens / (rows × max_seq_len).
    pub efficiency: f64,
}

/// Best-fit decreasing: longest sequences first, each into the fullest row that still has
/// room. Deterministic: ties keep input order.
pub fn pack_best_fit(seqs: &[TokenizedSeq], max_seq_len: usize) -> (Vec<PackedRow>, PackingStats) {
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by(|&a, &b| seqs[b].ids.len().cmp(&seqs[a].ids.len()).then(a.cmp(&b)));
    let mut rows: Vec<PackedRow> = Vec::new();
    // Free space -> rows with that much room (ordered, so the best fit is a range query).
    let mut by_room: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for i in order {
        let len = seqs[i].ids.len().min(max_seq_len);
        let best = by_room
            .range(len..)
            .next()
            .map(|(&room, rows)| (room, rows[0]));
        let row = match best {
            Some((room, r)) => {
                let list = by_room.get_mut(&room).expect("present");
                list.remove(0);
                if list.is_empty() {
                    by_room.remove(&room);
                }
                r
            }
            None => {
                rows.push(PackedRow {
                    ids: vec![],
                    trained: vec![],
                    positions: vec![],
                    segments: vec![],
                });
                rows.len() - 1
            }
        };
        rows[row].push(&seqs[i]);
        let room = max_seq_len.saturating_sub(rows[row].len());
        if room > 0 {
            let list = by_room.entry(room).or_default();
            let at = list.partition_point(|&x| x < row);
            list.insert(at, row);
        }
    }
    let tokens: usize = rows.iter().map(PackedRow::len).sum();
    let stats = PackingStats {
        sequences: seqs.len(),
        rows: rows.len(),
        tokens,
        efficiency: if rows.is_empty() {
            1.0
        } else {
            tokens as f64 / (rows.len() * max_seq_len) as f64
        },
    };
    (rows, stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(n: usize) -> TokenizedSeq {
        TokenizedSeq {
            ids: (0..n as u32).collect(),
            trained: vec![true; n],
        }
    }

    #[test]
    fn best_fit_decreasing_fills_rows_and_restarts_positions() {
        let seqs: Vec<TokenizedSeq> = [6, 5, 4, 3, 2, 2, 1, 1].iter().map(|&n| seq(n)).collect();
        let (rows, stats) = pack_best_fit(&seqs, 8);
        assert_eq!(stats.tokens, 24);
        assert_eq!(stats.rows, 3);
        assert!((stats.efficiency - 1.0).abs() < 1e-12);
        for r in &rows {
            assert!(r.len() <= 8);
            for i in 1..r.len() {
                if r.segments[i] == r.segments[i - 1] {
                    assert_eq!(r.positions[i], r.positions[i - 1] + 1);
                } else {
                    assert_eq!(r.positions[i], 0);
                    assert_eq!(r.segments[i], r.segments[i - 1] + 1);
                }
            }
        }
        let packed: usize = rows.iter().map(PackedRow::num_sequences).sum();
        assert_eq!(packed, seqs.len());
    }
}
