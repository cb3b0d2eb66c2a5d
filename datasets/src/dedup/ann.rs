//! Approximate nearest neighbours for cosine similarity: random-hyperplane LSH (SimHash).
//! Each of `tables` tables hashes a vector to the signs of `bits` random projections; vectors
//! sharing a bucket in any table are candidates, then verified by their exact cosine. A pair
//! at cosine `c` lands in one table's bucket with probability `(1 - acos(c)/pi)^bits`, so
//! `bits` and `tables` are chosen from the corpus size and the threshold, like MinHash bands.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};

use super::minhash::SplitMix;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnParams {
    pub bits: usize,
    pub tables: usize,
}

/// Probability that a pair at cosine `c` shares at least one of `tables` buckets.
pub fn recall_at(c: f64, p: AnnParams) -> f64 {
    let q = 1.0 - c.clamp(-1.0, 1.0).acos() / std::f64::consts::PI;
    1.0 - (1.0 - q.powi(p.bits as i32)).powi(p.tables as i32)
}

/// About 8 expected members per bucket (`bits ~ log2(n/8)`, at least 4), then enough
/// tables for 99% recall at the threshold (at most 64).
pub fn auto_params(n: usize, threshold: f64) -> AnnParams {
    let bits = ((n.max(2) as f64 / 8.0).log2().ceil() as usize).clamp(4, 24);
    let q = 1.0 - threshold.clamp(-1.0, 1.0).acos() / std::f64::consts::PI;
    let per_table = q.powi(bits as i32).max(1e-12);
    let tables = ((0.01f64).ln() / (1.0 - per_table).ln()).ceil();
    AnnParams {
        bits,
        tables: (tables as usize).clamp(1, 64),
    }
}

/// One table's verified pairs and how many pairs it compared.
type TablePairs = (Vec<(u32, u32, f32)>, usize);

pub struct SimHashIndex {
    params: AnnParams,
    dim: usize,
    /// `tables * bits` hyperplanes of `dim` each.
    planes: Vec<f32>,
}

impl SimHashIndex {
    pub fn new(dim: usize, params: AnnParams, seed: u64) -> Self {
        let mut rng = SplitMix(seed ^ 0x5151_5151);
        let planes = (0..params.tables * params.bits * dim)
            .map(|_| rng.normal() as f32)
            .collect();
        Self {
            params,
            dim,
            planes,
        }
    }

    fn codes(&self, v: &[f32]) -> Vec<u32> {
        (0..self.params.tables)
            .map(|t| {
                let mut code = 0u32;
                for b in 0..self.params.bits {
                    let k = (t * self.params.bits + b) * self.dim;
                    let plane = &self.planes[k..k + self.dim];
                    let dot: f32 = plane.iter().zip(v).map(|(a, b)| a * b).sum();
                    code = (code << 1) | (dot >= 0.0) as u32;
                }
                code
            })
            .collect()
    }

    /// Pairs `(i, j, cosine)`, `i < j`, that share a bucket in some table and reach
    /// `threshold`, and how many bucket pairs were compared (with repeats across tables).
    /// Pairs are verified inside each bucket, so memory holds only the verified ones.
    pub fn near_pairs(
        &self,
        vectors: &[Vec<f32>],
        threshold: f32,
    ) -> (Vec<(usize, usize, f32)>, usize) {
        let codes: Vec<Vec<u32>> = vectors.par_iter().map(|v| self.codes(v)).collect();
        let per_table: Vec<TablePairs> = (0..self.params.tables)
            .into_par_iter()
            .map(|t| {
                let mut buckets: HashMap<u32, Vec<u32>> = HashMap::new();
                for (i, c) in codes.iter().enumerate() {
                    buckets.entry(c[t]).or_default().push(i as u32);
                }
                let mut pairs = Vec::new();
                let mut compared = 0usize;
                for m in buckets.values().filter(|m| m.len() > 1) {
                    for (k, &a) in m.iter().enumerate() {
                        for &b in &m[k + 1..] {
                            compared += 1;
                            let c = cosine(&vectors[a as usize], &vectors[b as usize]);
                            if c >= threshold {
                                pairs.push((a, b, c));
                            }
                        }
                    }
                }
                (pairs, compared)
            })
            .collect();
        let compared = per_table.iter().map(|(_, n)| n).sum();
        let mut seen = HashSet::new();
        let mut out: Vec<(usize, usize, f32)> = per_table
            .into_iter()
            .flat_map(|(p, _)| p)
            .filter(|&(a, b, _)| seen.insert((a, b)))
            .map(|(a, b, c)| (a as usize, b as usize, c))
            .collect();
        out.sort_unstable_by_key(|&(a, b, _)| (a, b));
        (out, compared)
    }

    /// Candidate pairs `(i, j)`, `i < j`, sharing a bucket in some table.
    pub fn candidate_pairs(&self, vectors: &[Vec<f32>]) -> Vec<(u32, u32)> {
        let codes: Vec<Vec<u32>> = vectors.par_iter().map(|v| self.codes(v)).collect();
        let per_table: Vec<Vec<(u32, u32)>> = (0..self.params.tables)
            .into_par_iter()
            .map(|t| {
                let mut buckets: HashMap<u32, Vec<u32>> = HashMap::new();
                for (i, c) in codes.iter().enumerate() {
                    buckets.entry(c[t]).or_default().push(i as u32);
                }
                let mut pairs = Vec::new();
                for m in buckets.values().filter(|m| m.len() > 1) {
                    for (k, &a) in m.iter().enumerate() {
                        for &b in &m[k + 1..] {
                            pairs.push((a, b));
                        }
                    }
                }
                pairs
            })
            .collect();
        let mut seen = HashSet::new();
        let mut out: Vec<(u32, u32)> = per_table
            .into_iter()
            .flatten()
            .filter(|p| seen.insert(*p))
            .collect();
        out.sort_unstable();
        out
    }
}

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Every pair at cosine >= `threshold` (unit vectors), by brute force: the reference the
/// index is measured against, and the choice for small inputs.
pub fn brute_force_pairs(vectors: &[Vec<f32>], threshold: f32) -> Vec<(usize, usize, f32)> {
    (0..vectors.len())
        .into_par_iter()
        .flat_map_iter(|i| {
            ((i + 1)..vectors.len()).filter_map(move |j| {
                let c = cosine(&vectors[i], &vectors[j]);
                (c >= threshold).then_some((i, j, c))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dedup::embed::normalize;

    fn random_unit(rng: &mut SplitMix, dim: usize) -> Vec<f32> {
        let mut v: Vec<f32> = (0..dim).map(|_| rng.normal() as f32).collect();
        normalize(&mut v);
        v
    }

    #[test]
    fn index_finds_what_brute_force_finds() {
        let mut rng = SplitMix(3);
        let dim = 32;
        let mut vectors = Vec::new();
        for _ in 0..300 {
            let base = random_unit(&mut rng, dim);
            vectors.push(base.clone());
            // A close neighbour (cosine about 0.97) for every base vector.
            let noise = random_unit(&mut rng, dim);
            let mut near: Vec<f32> = base.iter().zip(&noise).map(|(a, b)| a + 0.25 * b).collect();
            normalize(&mut near);
            vectors.push(near);
        }
        let truth = brute_force_pairs(&vectors, 0.9);
        let params = auto_params(vectors.len(), 0.9);
        assert!(recall_at(0.9, params) >= 0.99);
        let index = SimHashIndex::new(dim, params, 1);
        let cands: HashSet<(u32, u32)> = index.candidate_pairs(&vectors).into_iter().collect();
        let found = truth
            .iter()
            .filter(|(i, j, _)| cands.contains(&(*i as u32, *j as u32)))
            .count();
        assert!(truth.len() >= 290, "{}", truth.len());
        assert!(
            found as f64 >= 0.97 * truth.len() as f64,
            "{found} of {}",
            truth.len()
        );
        // Inline verification finds the same pairs as verifying the candidates.
        let (near, _) = index.near_pairs(&vectors, 0.9);
        let verified = cands
            .iter()
            .filter(|&&(i, j)| cosine(&vectors[i as usize], &vectors[j as usize]) >= 0.9)
            .count();
        assert_eq!(near.len(), verified);
        // It prunes: far fewer candidates than all pairs (more so as n grows).
        let all = vectors.len() * (vectors.len() - 1) / 2;
        assert!(cands.len() < all / 5, "{} candidates of {all}", cands.len());
    }
}
