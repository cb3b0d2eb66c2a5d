//! Exact duplicates: a BLAKE3 hash of the normalised text.

use rayon::prelude::*;
use std::collections::HashMap;

use super::normalize::Normalize;

/// 128 bits of BLAKE3 of the normalised text of each row.
pub fn fingerprints(texts: &[&str], norm: &Normalize) -> Vec<u128> {
    texts
        .par_iter()
        .map(|t| {
            let h = blake3::hash(norm.apply(t).as_bytes());
            u128::from_le_bytes(h.as_bytes()[..16].try_into().expect("16 bytes"))
        })
        .collect()
}

/// Groups (of indices into `texts`, ascending, more than one member) with equal
/// normalised text, ordered by their first member.
pub fn groups(texts: &[&str], norm: &Normalize) -> Vec<Vec<usize>> {
    let fps = fingerprints(texts, norm);
    let mut by: HashMap<u128, Vec<usize>> = HashMap::new();
    for (i, fp) in fps.into_iter().enumerate() {
        by.entry(fp).or_default().push(i);
    }
    let mut out: Vec<Vec<usize>> = by.into_values().filter(|g| g.len() > 1).collect();
    out.sort_by_key(|g| g[0]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_decides_what_is_equal() {
        let texts = ["Hello  World", "hello world", "Hello, world", "other"];
        assert_eq!(groups(&texts, &Normalize::default()), vec![vec![0, 1]]);
        let n = Normalize {
            punctuation: true,
            ..Default::default()
        };
        assert_eq!(groups(&texts, &n), vec![vec![0, 1, 2]]);
        assert!(groups(&texts, &Normalize::none()).is_empty());
    }
}
