//! Deterministic train/eval split by content hash: a row stays on its side whatever the
//! order, the other rows or the machine.

use crate::records::Record;

/// True when the record belongs to the held-out split.
pub fn is_eval(record: &Record, eval_fraction: f64) -> bool {
    if eval_fraction <= 0.0 {
        return false;
    }
    let bytes = serde_json::to_vec(record).unwrap_or_default();
    let hash = blake3::hash(&bytes);
    let x = u64::from_le_bytes(hash.as_bytes()[..8].try_into().expect("8 bytes"));
    (x as f64 / u64::MAX as f64) < eval_fraction
}
