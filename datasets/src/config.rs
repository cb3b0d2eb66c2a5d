//! The `[data]` section of a recipe (also built from `burnish data prepare` flags).

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

use crate::tokenize::{MaskPolicy, Truncation};

/// What a bad row does to the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Stop with the first rejected rows and their reasons.
    Fail,
    /// Write rejected rows with their reasons to a rejects JSONL and go on (counted).
    #[default]
    Skip,
}

impl OnError {
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        match s {
            "fail" => Ok(Self::Fail),
            "skip" => Ok(Self::Skip),
            other => anyhow::bail!("unknown on_error `{other}`; expected fail or skip"),
        }
    }
}

fn default_template() -> String {
    "auto".into()
}
fn default_max_seq_len() -> usize {
    1024
}
fn default_eval_fraction() -> f64 {
    0.05
}
fn default_cache_dir() -> PathBuf {
    PathBuf::from(".burnish-cache")
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Input files (JSONL, JSON array, .jsonl.gz, Parquet); relative to the working directory.
    pub files: Vec<PathBuf>,
    /// A format name for every file, or none to auto-detect each.
    #[serde(default)]
    pub format: Option<String>,
    /// `auto` (the model's own chat template) or a built-in name.
    #[serde(default = "default_template")]
    pub template: String,
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
    #[serde(default)]
    pub mask: MaskPolicy,
    #[serde(default)]
    pub truncation: Truncation,
    #[serde(default)]
    pub packing: bool,
    /// Share of rows held out for evaluation, chosen by content hash.
    #[serde(default = "default_eval_fraction")]
    pub eval_fraction: f64,
    #[serde(default)]
    pub on_error: OnError,
    /// Where rejected rows go (default: `rejects.jsonl` in the cache entry).
    #[serde(default)]
    pub rejects_file: Option<PathBuf>,
    #[serde(default = "default_cache_dir")]
    pub cache_dir: PathBuf,
    /// Prompt-answer rows (GSM8K's `question` / `answer`) become conversations with the
    /// answer as the assistant's turn, for SFT. SFT and distillation recipes set it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub answers_as_responses: bool,
    /// `[data.dedup]`: deduplicate the rows before templating.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup: Option<crate::dedup::DedupConfig>,
    /// `[data.evolve]`: Evol-Instruct augmentation after dedup, before templating.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evolve: Option<crate::evolve::EvolveConfig>,
}

impl DataConfig {
    pub fn new(files: Vec<PathBuf>) -> Self {
        Self {
            files,
            format: None,
            template: default_template(),
            max_seq_len: default_max_seq_len(),
            mask: MaskPolicy::default(),
            truncation: Truncation::default(),
            packing: false,
            eval_fraction: default_eval_fraction(),
            on_error: OnError::default(),
            rejects_file: None,
            cache_dir: default_cache_dir(),
            answers_as_responses: false,
            dedup: None,
            evolve: None,
        }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.files.is_empty() {
            anyhow::bail!("[data] files is empty: name at least one input file");
        }
        if self.max_seq_len < 2 {
            anyhow::bail!(
                "[data] max_seq_len must be at least 2, got {}",
                self.max_seq_len
            );
        }
        if !(0.0..1.0).contains(&self.eval_fraction) {
            anyhow::bail!(
                "[data] eval_fraction must be in [0, 1), got {}",
                self.eval_fraction
            );
        }
        if let Some(d) = &self.dedup {
            d.validate()
                .map_err(|e| anyhow::anyhow!("[data.dedup] {e}"))?;
        }
        if let Some(e) = &self.evolve {
            e.validate()
                .map_err(|x| anyhow::anyhow!("[data.evolve] {x}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_and_evolve_tables_round_trip_through_toml() {
        let text = r#"
files = ["a.jsonl"]

[dedup]
methods = ["exact", "minhash", "semantic"]
fields = ["messages.0.content"]
keep = "longest"

[dedup.normalize]
punctuation = true

[dedup.minhash]
threshold = 0.7
shingle = "char"
ngram = 7

[dedup.semantic]
embedder = "emb"

[evolve]
rounds = 3
operations = ["deepen", "breadth"]

[evolve.openai]
model = "m"

[evolve.eliminate]
info_gain = "similarity"
"#;
        let cfg: DataConfig = toml::from_str(text).unwrap();
        cfg.validate().unwrap();
        let d = cfg.dedup.as_ref().unwrap();
        assert!(d.normalize.punctuation && d.normalize.nfkc);
        assert_eq!(d.minhash.ngram, 7);
        assert_eq!(d.minhash.num_perm, 128);
        let e = cfg.evolve.as_ref().unwrap();
        assert_eq!(e.rounds, 3);
        assert!(e.keep_original);
        // The resolved recipe a run directory stores reads back the same.
        let back: DataConfig = toml::from_str(&toml::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(back, cfg);

        let bad = text.replace("rounds = 3", "rounds = 0");
        let e = toml::from_str::<DataConfig>(&bad)
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("[data.evolve] evolve rounds"), "{e}");
        let unknown = text.replace("ngram = 7", "ngrams = 7");
        let e = toml::from_str::<DataConfig>(&unknown).unwrap_err();
        assert!(e.to_string().contains("ngrams"), "{e}");
    }
}
