//! Deduplication in stages: exact (normalised hash), fuzzy (MinHash-LSH) and semantic
//! (embeddings + an approximate-nearest-neighbour index). Each stage clusters the rows that
//! survived the previous ones (union-find over verified pairs), keeps one row per cluster by
//! a deterministic rule and reports every cluster.

pub mod ann;
pub mod embed;
pub mod exact;
pub mod minhash;
pub mod normalize;
pub mod report;
pub mod semantic;
pub mod text;
pub mod union_find;

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Instant;

pub use embed::{Embedder, StaticEmbedder};
pub use minhash::MinHashConfig;
pub use normalize::Normalize;
pub use report::{Cluster, DedupReport, RemovedRow, StageReport};
pub use semantic::SemanticConfig;
pub use text::Fields;
use union_find::UnionFind;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    Exact,
    Minhash,
    Semantic,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Exact => "exact",
            Method::Minhash => "minhash",
            Method::Semantic => "semantic",
        }
    }

    /// A comma list such as `exact,minhash`.
    pub fn parse_list(spec: &str) -> Result<Vec<Self>> {
        let mut out = Vec::new();
        for part in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let m = match part {
                "exact" => Method::Exact,
                "minhash" | "fuzzy" => Method::Minhash,
                "semantic" => Method::Semantic,
                other => {
                    bail!("unknown dedup method `{other}`; expected exact, minhash or semantic")
                }
            };
            if !out.contains(&m) {
                out.push(m);
            }
        }
        if out.is_empty() {
            bail!("no dedup method given; expected a list of exact, minhash, semantic");
        }
        Ok(out)
    }
}

/// Which row of a cluster survives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KeepRule {
    /// The earliest row in input order.
    #[default]
    First,
    /// The row with the longest compared text (the earliest among equals).
    Longest,
}

impl KeepRule {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "first" => Ok(Self::First),
            "longest" => Ok(Self::Longest),
            other => bail!("unknown keep rule `{other}`; expected first or longest"),
        }
    }
}

fn default_methods() -> Vec<Method> {
    vec![Method::Exact, Method::Minhash]
}

/// `[data.dedup]` of a recipe, and the options of `burnish data dedup`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupConfig {
    /// Stages, in order.
    #[serde(default = "default_methods")]
    pub methods: Vec<Method>,
    /// Dot paths of the compared fields; empty = every string of the row but ids/metadata.
    #[serde(default)]
    pub fields: Vec<String>,
    #[serde(default)]
    pub keep: KeepRule,
    /// Normalisation before exact hashing and MinHash shingling.
    #[serde(default)]
    pub normalize: Normalize,
    #[serde(default)]
    pub minhash: MinHashConfig,
    #[serde(default)]
    pub semantic: SemanticConfig,
    /// Where the clusters JSONL goes (audit); none = not written.
    #[serde(default)]
    pub clusters_file: Option<PathBuf>,
}

impl Default for DedupConfig {
    fn default() -> Self {
        Self {
            methods: default_methods(),
            fields: vec![],
            keep: KeepRule::First,
            normalize: Normalize::default(),
            minhash: MinHashConfig::default(),
            semantic: SemanticConfig::default(),
            clusters_file: None,
        }
    }
}

impl DedupConfig {
    pub fn validate(&self) -> Result<()> {
        if self.methods.is_empty() {
            bail!("[data.dedup] methods is empty: name at least one of exact, minhash, semantic");
        }
        self.minhash.validate()?;
        self.semantic.validate()?;
        if self.methods.contains(&Method::Semantic)
            && self.semantic.embedder.is_none()
            && self.semantic.model.is_none()
        {
            bail!(
                "semantic dedup needs an embedder: set semantic.embedder (a static embedding folder) \
                 or semantic.model (a model folder)"
            );
        }
        Ok(())
    }
}

/// Clusters found by one method over some texts (indices into those texts).
#[derive(Debug, Clone, Default)]
pub struct Clusters {
    /// Groups of more than one member, each ascending, ordered by first member.
    pub groups: Vec<Vec<usize>>,
    /// Per text, its highest similarity to a row it was joined with (0 if none).
    pub best: Vec<f32>,
    pub params: serde_json::Map<String, serde_json::Value>,
}

fn from_pairs(n: usize, pairs: &[(usize, usize, f32)]) -> (Vec<Vec<usize>>, Vec<f32>) {
    let mut uf = UnionFind::new(n);
    let mut best = vec![0f32; n];
    for &(i, j, s) in pairs {
        uf.union(i, j);
        best[i] = best[i].max(s);
        best[j] = best[j].max(s);
    }
    (uf.groups(), best)
}

fn bar(len: usize, msg: &'static str) -> ProgressBar {
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:30}] {pos}/{len} rows {per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(msg);
    pb
}

/// Runs one method over `texts` (raw; normalised here where the method wants it).
pub fn find_clusters(
    method: Method,
    texts: &[String],
    cfg: &DedupConfig,
    embedder: Option<&dyn Embedder>,
) -> Result<Clusters> {
    let n = texts.len();
    let mut params = serde_json::Map::new();
    let mut put = |k: &str, v: serde_json::Value| {
        params.insert(k.to_string(), v);
    };
    match method {
        Method::Exact => {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let groups = exact::groups(&refs, &cfg.normalize);
            let mut best = vec![0f32; n];
            groups.iter().flatten().for_each(|&i| best[i] = 1.0);
            put("hash", "blake3-128".into());
            Ok(Clusters {
                groups,
                best,
                params,
            })
        }
        Method::Minhash => {
            let m = &cfg.minhash;
            let pb = bar(n, "minhash");
            let normed: Vec<String> = texts
                .par_iter()
                .map(|t| {
                    pb.inc(1);
                    cfg.normalize.apply(t)
                })
                .collect();
            pb.finish_and_clear();
            let pairs = minhash::near_duplicates(&normed, m);
            let (b, r) = m.banding();
            put("threshold", m.threshold.into());
            put("num_perm", m.num_perm.into());
            put("bands", b.into());
            put("rows", r.into());
            put(
                "shingle",
                format!(
                    "{}-{}",
                    m.ngram,
                    match m.shingle {
                        minhash::Shingle::Word => "word",
                        minhash::Shingle::Char => "char",
                    }
                )
                .into(),
            );
            put("verified_pairs", pairs.len().into());
            let (groups, best) = from_pairs(n, &pairs);
            Ok(Clusters {
                groups,
                best,
                params,
            })
        }
        Method::Semantic => {
            let Some(embedder) = embedder else {
                bail!("semantic dedup needs an embedder (semantic.embedder or semantic.model)");
            };
            let pb = bar(n, "embed");
            let mut vectors = Vec::with_capacity(n);
            for chunk in texts.chunks(256) {
                vectors.extend(embedder.embed(chunk)?);
                pb.inc(chunk.len() as u64);
            }
            pb.finish_and_clear();
            let (pairs, stats) = semantic::near_duplicates(&vectors, &cfg.semantic);
            // Through its decimal form, so 0.9f32 reports as 0.9.
            let t: f64 = cfg.semantic.threshold.to_string().parse().unwrap_or(0.0);
            put("threshold", t.into());
            put("embedder", embedder.describe().into());
            put("index", stats.index.into());
            if stats.bits > 0 {
                put("bits", stats.bits.into());
                put("tables", stats.tables.into());
            }
            put("candidates", stats.candidates.into());
            put("verified_pairs", pairs.len().into());
            let (groups, best) = from_pairs(n, &pairs);
            Ok(Clusters {
                groups,
                best,
                params,
            })
        }
    }
}

/// The result of [`dedup`]: which rows survive, the report and the clusters.
#[derive(Debug, Clone)]
pub struct DedupOutcome {
    pub keep: Vec<bool>,
    pub report: DedupReport,
    pub clusters: Vec<Cluster>,
}

/// Runs the configured stages over rows (`ids[i]` names row `i` in the report).
pub fn dedup(
    ids: &[String],
    texts: &[String],
    cfg: &DedupConfig,
    embedder: Option<&dyn Embedder>,
) -> Result<DedupOutcome> {
    cfg.validate()?;
    assert_eq!(ids.len(), texts.len());
    let start = Instant::now();
    let n = texts.len();
    let mut keep = vec![true; n];
    // Rows without text would all be "identical": they are kept and left out of every stage.
    let comparable: Vec<bool> = texts.iter().map(|t| !t.trim().is_empty()).collect();
    let mut report = DedupReport {
        rows: n,
        no_text: comparable.iter().filter(|&&c| !c).count(),
        ..Default::default()
    };
    let mut clusters = Vec::new();
    for &method in &cfg.methods {
        let t0 = Instant::now();
        let active: Vec<usize> = (0..n).filter(|&i| keep[i] && comparable[i]).collect();
        let sub: Vec<String> = active.iter().map(|&i| texts[i].clone()).collect();
        let found = find_clusters(method, &sub, cfg, embedder)?;
        let mut removed = 0;
        for g in &found.groups {
            let keeper = match cfg.keep {
                KeepRule::First => g[0],
                KeepRule::Longest => *g
                    .iter()
                    .max_by(|&&a, &&b| {
                        sub[a]
                            .chars()
                            .count()
                            .cmp(&sub[b].chars().count())
                            .then(b.cmp(&a))
                    })
                    .expect("non-empty group"),
            };
            let mut gone = Vec::new();
            for &m in g.iter().filter(|&&m| m != keeper) {
                keep[active[m]] = false;
                gone.push(RemovedRow {
                    id: ids[active[m]].clone(),
                    similarity: found.best[m],
                });
            }
            removed += gone.len();
            clusters.push(Cluster {
                method: method.name().into(),
                kept: ids[active[keeper]].clone(),
                removed: gone,
            });
        }
        report.stages.push(StageReport {
            method: method.name().into(),
            rows_in: active.len(),
            clusters: found.groups.len(),
            removed,
            rows_out: active.len() - removed,
            params: found.params,
            seconds: t0.elapsed().as_secs_f64(),
        });
    }
    report.kept = keep.iter().filter(|&&k| k).count();
    report.removed = n - report.kept;
    report.seconds = start.elapsed().as_secs_f64();
    Ok(DedupOutcome {
        keep,
        report,
        clusters,
    })
}

/// Writes clusters as JSONL atomically (temp file + rename).
pub fn write_clusters(path: &std::path::Path, clusters: &[Cluster]) -> Result<()> {
    let mut body = String::new();
    for c in clusters {
        body += &serde_json::to_string(c)?;
        body.push('\n');
    }
    crate::atomic::write(path, body.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("r{i}")).collect()
    }

    #[test]
    fn stages_run_on_survivors_and_report_clusters() {
        let q = "Tom has three apples and buys five more apples at the market on Sunday morning. How many apples does Tom have now after shopping?";
        let texts: Vec<String> = vec![
            q.into(),
            q.to_uppercase(),                        // exact after case folding
            format!("{q} Answer quickly please."),   // near duplicate
            "Something else entirely, about the colour of the sky at dusk over the sea and why it changes.".into(),
        ];
        let cfg = DedupConfig {
            minhash: MinHashConfig {
                threshold: 0.7,
                ..Default::default()
            },
            ..Default::default()
        };
        let out = dedup(&ids(4), &texts, &cfg, None).unwrap();
        assert_eq!(out.keep, vec![true, false, false, true]);
        assert_eq!(out.report.stages[0].removed, 1);
        assert_eq!(out.report.stages[1].rows_in, 3);
        assert_eq!(out.report.stages[1].removed, 1);
        let (bands, rows) = cfg.minhash.banding();
        assert_eq!(out.report.stages[1].params["bands"], bands);
        assert_eq!(out.report.stages[1].params["rows"], rows);
        assert_eq!(out.clusters[0].kept, "r0");
        assert_eq!(out.clusters[0].removed[0].id, "r1");
        assert_eq!(out.clusters[1].method, "minhash");
        assert!(out.clusters[1].removed[0].similarity >= 0.7);

        let longest = DedupConfig {
            keep: KeepRule::Longest,
            ..cfg
        };
        let out = dedup(&ids(4), &texts, &longest, None).unwrap();
        assert_eq!(out.keep, vec![false, false, true, true]);
    }

    #[test]
    fn semantic_without_embedder_is_a_clear_error() {
        let cfg = DedupConfig {
            methods: vec![Method::Semantic],
            ..Default::default()
        };
        let e = dedup(&ids(1), &["x".into()], &cfg, None).unwrap_err();
        assert!(e.to_string().contains("embedder"), "{e}");
        assert!(Method::parse_list("exact,bogus").is_err());
        assert_eq!(
            Method::parse_list("exact, fuzzy").unwrap(),
            vec![Method::Exact, Method::Minhash]
        );
    }
}
