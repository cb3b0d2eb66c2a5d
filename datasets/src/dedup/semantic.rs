//! Semantic duplicates: embeddings compared by cosine, through the SimHash index (or by
//! brute force when asked).

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

use super::ann::{auto_params, brute_force_pairs, AnnParams, SimHashIndex};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum IndexKind {
    /// Random-hyperplane LSH, candidates verified by exact cosine.
    #[default]
    Simhash,
    /// Every pair (exact, quadratic).
    Brute,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SemanticConfig {
    /// Cosine similarity at or above which two rows are duplicates.
    #[serde(default = "default_threshold")]
    pub threshold: f32,
    /// A model2vec-style static embedder folder (tokenizer.json + safetensors matrix).
    #[serde(default)]
    pub embedder: Option<PathBuf>,
    /// Or a burnish/Hugging Face model folder: mean-pooled final hidden states.
    #[serde(default)]
    pub model: Option<PathBuf>,
    #[serde(default)]
    pub index: IndexKind,
    /// Override the index's hyperplanes per table and number of tables.
    #[serde(default)]
    pub bits: Option<usize>,
    #[serde(default)]
    pub tables: Option<usize>,
    #[serde(default = "default_seed")]
    pub seed: u64,
}

fn default_threshold() -> f32 {
    0.9
}
fn default_seed() -> u64 {
    1
}

impl Default for SemanticConfig {
    fn default() -> Self {
        Self {
            threshold: default_threshold(),
            embedder: None,
            model: None,
            index: IndexKind::Simhash,
            bits: None,
            tables: None,
            seed: default_seed(),
        }
    }
}

impl SemanticConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(self.threshold > -1.0 && self.threshold <= 1.0) {
            anyhow::bail!(
                "semantic threshold must be in (-1, 1], got {}",
                self.threshold
            );
        }
        if self.embedder.is_some() && self.model.is_some() {
            anyhow::bail!("semantic dedup: give either an embedder folder or a model, not both");
        }
        if let Some(b) = self.bits {
            if !(1..=32).contains(&b) {
                anyhow::bail!("semantic bits must be in 1..=32, got {b}");
            }
        }
        if self.tables == Some(0) {
            anyhow::bail!("semantic tables must be at least 1");
        }
        Ok(())
    }

    pub fn params(&self, n: usize) -> AnnParams {
        let auto = auto_params(n, self.threshold as f64);
        AnnParams {
            bits: self.bits.unwrap_or(auto.bits),
            tables: self.tables.unwrap_or(auto.tables),
        }
    }
}

/// What the search did, for the report.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SearchStats {
    pub index: String,
    pub bits: usize,
    pub tables: usize,
    /// Pairs whose cosine was computed (for the index: bucket pairs, repeats included).
    pub candidates: usize,
}

/// Pairs `(i, j, cosine)` at or above the threshold among unit `vectors`.
pub fn near_duplicates(
    vectors: &[Vec<f32>],
    cfg: &SemanticConfig,
) -> (Vec<(usize, usize, f32)>, SearchStats) {
    let Some(dim) = vectors.first().map(Vec::len) else {
        return (vec![], SearchStats::default());
    };
    match cfg.index {
        IndexKind::Brute => {
            let n = vectors.len();
            let pairs = brute_force_pairs(vectors, cfg.threshold);
            (
                pairs,
                SearchStats {
                    index: "brute".into(),
                    candidates: n * n.saturating_sub(1) / 2,
                    ..Default::default()
                },
            )
        }
        IndexKind::Simhash => {
            // Identical vectors (identical texts) are duplicates at cosine 1; the index
            // searches one of each.
            let keys: Vec<Vec<u32>> = vectors
                .iter()
                .map(|v| v.iter().map(|x| x.to_bits()).collect())
                .collect();
            let (reps, copies) = super::union_find::collapse_identical(&keys);
            let rep_vecs: Vec<Vec<f32>> = reps.iter().map(|&i| vectors[i].clone()).collect();
            let params = cfg.params(rep_vecs.len());
            let index = SimHashIndex::new(dim, params, cfg.seed);
            let (found, compared) = index.near_pairs(&rep_vecs, cfg.threshold);
            let mut pairs: Vec<(usize, usize, f32)> =
                copies.into_iter().map(|(a, c)| (a, c, 1.0)).collect();
            pairs.extend(found.into_iter().map(|(i, j, c)| (reps[i], reps[j], c)));
            (
                pairs,
                SearchStats {
                    index: "simhash".into(),
                    bits: params.bits,
                    tables: params.tables,
                    candidates: compared,
                },
            )
        }
    }
}
