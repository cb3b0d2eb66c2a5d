//! Which training rows come next: a seeded shuffle per epoch and a position in it, saved in
//! checkpoints so a resumed run sees the rows the uninterrupted run saw.

use anyhow::{bail, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::{json, Value};

/// Where a method is in its data: how far through the epochs, and the position saved in
/// checkpoints so that a resumed run goes on with the rows the uninterrupted run would see.
pub trait DataCursor {
    /// Fractional epochs completed.
    fn epoch(&self) -> f64;
    fn to_json(&self) -> Value;
    fn restore(&mut self, cursor: &Value) -> Result<()>;
}

pub struct EpochCursor {
    rows: usize,
    seed: u64,
    epoch: usize,
    /// Entries of `order` already consumed in this epoch.
    pos: usize,
    order: Vec<usize>,
}

fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng =
        StdRng::seed_from_u64(seed ^ (epoch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    order.shuffle(&mut rng);
    order
}

impl EpochCursor {
    pub fn new(rows: usize, seed: u64) -> Self {
        Self {
            rows,
            seed,
            epoch: 0,
            pos: 0,
            order: epoch_order(rows, seed, 0),
        }
    }

    /// The next `n` row indices; a step never crosses an epoch boundary (the last step of
    /// an epoch may be short).
    pub fn take(&mut self, n: usize) -> Vec<usize> {
        if self.pos >= self.order.len() {
            self.epoch += 1;
            self.pos = 0;
            self.order = epoch_order(self.rows, self.seed, self.epoch);
        }
        let end = (self.pos + n).min(self.order.len());
        let out = self.order[self.pos..end].to_vec();
        self.pos = end;
        out
    }

    /// The next optimizer step's rows, cut into `micro_batches` micro-batches of `size`.
    pub fn next_micro_batches(&mut self, size: usize, micro_batches: usize) -> Vec<Vec<usize>> {
        let size = size.max(1);
        self.take(size * micro_batches)
            .chunks(size)
            .map(<[usize]>::to_vec)
            .collect()
    }

    pub fn steps_per_epoch(&self, rows_per_step: usize) -> usize {
        self.rows.div_ceil(rows_per_step.max(1))
    }
}

impl DataCursor for EpochCursor {
    fn epoch(&self) -> f64 {
        self.epoch as f64 + self.pos as f64 / self.rows.max(1) as f64
    }

    fn to_json(&self) -> Value {
        json!({"epoch": self.epoch, "pos": self.pos, "rows": self.rows})
    }

    fn restore(&mut self, cursor: &Value) -> Result<()> {
        let get = |k: &str| cursor.get(k).and_then(|v| v.as_u64()).map(|v| v as usize);
        let (Some(epoch), Some(pos), Some(rows)) = (get("epoch"), get("pos"), get("rows")) else {
            bail!("the checkpoint's data cursor is not a row cursor: {cursor}");
        };
        if rows != self.rows {
            bail!(
                "the checkpoint was trained on {rows} rows, the prepared data has {}: resume needs the same data",
                self.rows
            );
        }
        self.epoch = epoch;
        self.pos = pos;
        self.order = epoch_order(rows, self.seed, epoch);
        Ok(())
    }
}

/// Held-out rows `0..n` in fixed order, in batches of `size`.
pub fn eval_chunks(n: usize, size: usize) -> Vec<Vec<usize>> {
    let idx: Vec<usize> = (0..n).collect();
    idx.chunks(size.max(1)).map(<[usize]>::to_vec).collect()
}
