//! Fuzzy duplicates: MinHash signatures over word or character n-gram shingles, LSH banding
//! tuned to a Jaccard threshold, and candidate pairs verified by their estimated Jaccard.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};

/// The 64-bit finaliser of MurmurHash3: a bijection with full avalanche.
#[inline]
pub fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51afd7ed558ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ceb9fe1a85ec53);
    k ^= k >> 33;
    k
}

/// SplitMix64: a seeded stream of well-mixed 64-bit values.
#[derive(Debug, Clone)]
pub struct SplitMix(pub u64);

impl SplitMix {
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        fmix64(self.0)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// FNV-1a over bytes, then fmix64.
#[inline]
fn hash_bytes(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for &x in b {
        h ^= x as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    fmix64(h)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Shingle {
    /// n consecutive words (split on anything that is not a letter or digit).
    #[default]
    Word,
    /// n consecutive characters of the normalised text.
    Char,
}

impl Shingle {
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        match s {
            "word" => Ok(Self::Word),
            "char" => Ok(Self::Char),
            other => anyhow::bail!("unknown shingle `{other}`; expected word or char"),
        }
    }
}

/// Distinct shingle hashes of a (normalised) text. A text shorter than `n` units is one
/// shingle; an empty text has none.
pub fn shingles(text: &str, kind: Shingle, n: usize) -> Vec<u64> {
    let n = n.max(1);
    let units: Vec<u64> = match kind {
        Shingle::Word => text
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(|w| hash_bytes(w.as_bytes()))
            .collect(),
        Shingle::Char => text.chars().map(|c| fmix64(c as u64 + 1)).collect(),
    };
    if units.is_empty() {
        return vec![];
    }
    let combine = |w: &[u64]| {
        w.iter()
            .fold(0x243f6a8885a308d3u64, |h, &u| fmix64(h.rotate_left(17) ^ u))
    };
    let mut out: Vec<u64> = if units.len() <= n {
        vec![combine(&units)]
    } else {
        units.windows(n).map(combine).collect()
    };
    out.sort_unstable();
    out.dedup();
    out
}

/// A family of `num_perm` hash functions `h_i(x) = fmix64(x ^ s_i)`.
#[derive(Debug, Clone)]
pub struct MinHasher {
    seeds: Vec<u64>,
}

impl MinHasher {
    pub fn new(num_perm: usize, seed: u64) -> Self {
        let mut rng = SplitMix(seed);
        Self {
            seeds: (0..num_perm).map(|_| rng.next()).collect(),
        }
    }

    pub fn num_perm(&self) -> usize {
        self.seeds.len()
    }

    /// The signature: per hash function, the minimum over the shingles (`u64::MAX` when
    /// there are none).
    pub fn signature(&self, shingles: &[u64]) -> Vec<u64> {
        let mut sig = vec![u64::MAX; self.seeds.len()];
        for &s in shingles {
            for (m, &seed) in sig.iter_mut().zip(&self.seeds) {
                let h = fmix64(s ^ seed);
                if h < *m {
                    *m = h;
                }
            }
        }
        sig
    }
}

/// Share of equal positions: the MinHash estimate of the Jaccard similarity.
pub fn estimate(a: &[u64], b: &[u64]) -> f64 {
    let eq = a.iter().zip(b).filter(|(x, y)| x == y).count();
    eq as f64 / a.len().max(1) as f64
}

/// Probability that a pair with Jaccard `s` shares at least one of `b` bands of `r` rows.
pub fn collision_probability(s: f64, b: usize, r: usize) -> f64 {
    1.0 - (1.0 - s.powi(r as i32)).powi(b as i32)
}

fn integrate(f: impl Fn(f64) -> f64, a: f64, b: f64) -> f64 {
    let steps = 200;
    let h = (b - a) / steps as f64;
    (0..steps)
        .map(|i| {
            let x = a + h * (i as f64 + 0.5);
            f(x) * h
        })
        .sum()
}

/// Bands and rows (`b * r <= num_perm`) that minimise the equally weighted areas of false
/// positives below `threshold` and false negatives above it (the datasketch rule).
pub fn optimal_bands(threshold: f64, num_perm: usize) -> (usize, usize) {
    let mut best = (1, num_perm.max(1));
    let mut best_err = f64::INFINITY;
    for b in 1..=num_perm {
        let max_r = num_perm / b;
        for r in 1..=max_r {
            let fp = integrate(|s| collision_probability(s, b, r), 0.0, threshold);
            let fneg = integrate(|s| 1.0 - collision_probability(s, b, r), threshold, 1.0);
            let err = 0.5 * fp + 0.5 * fneg;
            if err < best_err {
                best_err = err;
                best = (b, r);
            }
        }
    }
    best
}

/// LSH over signatures: returns candidate pairs `(i, j)` with `i < j` that share a band.
pub fn candidate_pairs(signatures: &[Vec<u64>], bands: usize, rows: usize) -> Vec<(u32, u32)> {
    let per_band: Vec<Vec<(u32, u32)>> = (0..bands)
        .into_par_iter()
        .map(|band| {
            let mut buckets: HashMap<u64, Vec<u32>> = HashMap::new();
            for (i, sig) in signatures.iter().enumerate() {
                let key = sig[band * rows..(band + 1) * rows]
                    .iter()
                    .fold(band as u64, |h, &x| fmix64(h ^ x).rotate_left(5));
                buckets.entry(key).or_default().push(i as u32);
            }
            let mut pairs = Vec::new();
            for members in buckets.values().filter(|m| m.len() > 1) {
                for (k, &a) in members.iter().enumerate() {
                    for &b in &members[k + 1..] {
                        pairs.push((a, b));
                    }
                }
            }
            pairs
        })
        .collect();
    let mut seen: HashSet<(u32, u32)> = HashSet::new();
    let mut out = Vec::new();
    for p in per_band.into_iter().flatten() {
        if seen.insert(p) {
            out.push(p);
        }
    }
    out.sort_unstable();
    out
}

/// MinHash-LSH settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MinHashConfig {
    /// Estimated Jaccard similarity at or above which two rows are duplicates.
    #[serde(default = "default_threshold")]
    pub threshold: f64,
    #[serde(default = "default_num_perm")]
    pub num_perm: usize,
    #[serde(default)]
    pub shingle: Shingle,
    /// Shingle length in words (or characters).
    #[serde(default = "default_ngram")]
    pub ngram: usize,
    /// Override the bands/rows chosen for the threshold (both or neither).
    #[serde(default)]
    pub bands: Option<usize>,
    #[serde(default)]
    pub rows: Option<usize>,
    #[serde(default = "default_seed")]
    pub seed: u64,
}

fn default_threshold() -> f64 {
    0.8
}
fn default_num_perm() -> usize {
    128
}
fn default_ngram() -> usize {
    5
}
fn default_seed() -> u64 {
    1
}

impl Default for MinHashConfig {
    fn default() -> Self {
        Self {
            threshold: default_threshold(),
            num_perm: default_num_perm(),
            shingle: Shingle::Word,
            ngram: default_ngram(),
            bands: None,
            rows: None,
            seed: default_seed(),
        }
    }
}

impl MinHashConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(self.threshold > 0.0 && self.threshold <= 1.0) {
            anyhow::bail!(
                "minhash threshold must be in (0, 1], got {}",
                self.threshold
            );
        }
        if self.num_perm < 2 || self.num_perm > 4096 {
            anyhow::bail!(
                "minhash num_perm must be in 2..=4096, got {}",
                self.num_perm
            );
        }
        if self.ngram == 0 {
            anyhow::bail!("minhash ngram must be at least 1");
        }
        match (self.bands, self.rows) {
            (None, None) => {}
            (Some(b), Some(r)) if b >= 1 && r >= 1 && b * r <= self.num_perm => {}
            (Some(b), Some(r)) => anyhow::bail!(
                "minhash bands x rows = {b} x {r} must be at least 1 x 1 and at most num_perm = {}",
                self.num_perm
            ),
            _ => anyhow::bail!("minhash: give both bands and rows, or neither"),
        }
        Ok(())
    }

    /// (bands, rows) used: the override, or the optimum for the threshold.
    pub fn banding(&self) -> (usize, usize) {
        match (self.bands, self.rows) {
            (Some(b), Some(r)) => (b, r),
            _ => optimal_bands(self.threshold, self.num_perm),
        }
    }
}

/// Verified near-duplicate pairs `(i, j, estimated Jaccard)` among normalised `texts`.
pub fn near_duplicates(texts: &[String], cfg: &MinHashConfig) -> Vec<(usize, usize, f32)> {
    let hasher = MinHasher::new(cfg.num_perm, cfg.seed);
    let sigs: Vec<Vec<u64>> = texts
        .par_iter()
        .map(|t| hasher.signature(&shingles(t, cfg.shingle, cfg.ngram)))
        .collect();
    // Rows with identical signatures are duplicates at estimate 1; LSH runs on one of each.
    let (reps, copies) = super::union_find::collapse_identical(&sigs);
    let rep_sigs: Vec<Vec<u64>> = reps.iter().map(|&i| sigs[i].clone()).collect();
    let (b, r) = cfg.banding();
    let cands = candidate_pairs(&rep_sigs, b, r);
    let mut out: Vec<(usize, usize, f32)> = copies.into_iter().map(|(a, c)| (a, c, 1.0)).collect();
    out.par_extend(cands.par_iter().filter_map(|&(i, j)| {
        let (i, j) = (i as usize, j as usize);
        let s = estimate(&rep_sigs[i], &rep_sigs[j]);
        (s >= cfg.threshold).then_some((reps[i], reps[j], s as f32))
    }));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jaccard(a: &[u64], b: &[u64]) -> f64 {
        let sa: HashSet<_> = a.iter().collect();
        let sb: HashSet<_> = b.iter().collect();
        sa.intersection(&sb).count() as f64 / sa.union(&sb).count() as f64
    }

    #[test]
    fn estimate_tracks_true_jaccard() {
        let a = "the quick brown fox jumps over the lazy dog and runs far away into the woods";
        let b = "the quick brown fox jumps over the lazy cat and runs far away into the woods";
        let (sa, sb) = (shingles(a, Shingle::Word, 2), shingles(b, Shingle::Word, 2));
        let truth = jaccard(&sa, &sb);
        let h = MinHasher::new(512, 7);
        let est = estimate(&h.signature(&sa), &h.signature(&sb));
        assert!((est - truth).abs() < 0.08, "est {est} truth {truth}");
    }

    #[test]
    fn banding_matches_datasketch_for_the_default() {
        // datasketch.MinHashLSH(threshold=0.8, num_perm=128) picks b=9, r=13.
        assert_eq!(optimal_bands(0.8, 128), (9, 13));
        let (b, r) = optimal_bands(0.5, 128);
        assert!(collision_probability(0.5, b, r) > 0.3);
    }

    #[test]
    fn char_and_short_texts() {
        assert_eq!(shingles("ab", Shingle::Char, 5).len(), 1);
        assert!(shingles("", Shingle::Word, 5).is_empty());
        assert_eq!(shingles("abcabc", Shingle::Char, 3).len(), 3);
    }

    #[test]
    fn finds_near_duplicates_only() {
        let base = "Natalia sold clips to 48 of her friends in April and then she sold half as many clips in May how many clips did Natalia sell altogether in April and May";
        let texts = vec![
            base.to_string(),
            base.replace("48", "49"),
            "A completely different question about trains leaving stations at different speeds and when they meet".to_string(),
            format!("{base} please"),
        ];
        let cfg = MinHashConfig {
            threshold: 0.7,
            ..Default::default()
        };
        let mut pairs: Vec<(usize, usize)> = near_duplicates(&texts, &cfg)
            .into_iter()
            .map(|(i, j, _)| (i, j))
            .collect();
        pairs.sort();
        assert!(pairs.contains(&(0, 3)), "{pairs:?}");
        assert!(pairs.iter().all(|&(i, j)| i != 2 && j != 2));
    }

    #[test]
    fn many_copies_cluster_without_quadratic_pairs() {
        let mut texts = vec!["one two three four five six seven eight nine ten".to_string(); 2000];
        texts.push("something else entirely with other words in it".into());
        let pairs = near_duplicates(&texts, &MinHashConfig::default());
        // Each copy links to the first occurrence: n - 1 pairs, not n^2 / 2.
        assert_eq!(pairs.len(), 1999);
        assert!(pairs.iter().all(|&(a, _, s)| a == 0 && s == 1.0));
    }
}
