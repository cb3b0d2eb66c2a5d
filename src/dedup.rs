//! `burnish data dedup`: exact, fuzzy (MinHash-LSH) and semantic deduplication of JSONL
//! files, rows written back unchanged.

use anyhow::{bail, Result};
use burn::tensor::backend::Backend;
use clap::Parser;
use std::path::PathBuf;

use datasets::dedup::minhash::Shingle;
use datasets::dedup::semantic::IndexKind;
use datasets::dedup::{
    dedup, write_clusters, DedupConfig, DedupReport, Embedder, Fields, KeepRule, Method, Normalize,
    StaticEmbedder,
};
use datasets::read::read_raw;
use datasets::records::{Origin, Reject};
use datasets::rejects::RejectLog;

use crate::device::{dispatch, OnDevice};

#[derive(Parser, Clone)]
pub struct DedupArgs {
    /// Input files (JSONL, JSON array, .jsonl.gz, Parquet), in order: "first" means first here.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Output JSONL of the kept rows, unchanged (required unless --dry-run).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Stages in order: exact, minhash, semantic.
    #[arg(long, default_value = "exact,minhash")]
    method: String,
    /// Compared fields as dot paths (e.g. instruction or messages.0.content); default: every
    /// string of the row except ids and metadata.
    #[arg(long, value_delimiter = ',')]
    fields: Vec<String>,
    /// Which row of a cluster to keep: first or longest.
    #[arg(long, default_value = "first")]
    keep: String,
    /// Normalisation before exact hashing and shingling: comma list of nfkc, lower, space,
    /// punct (or none).
    #[arg(long, default_value = "nfkc,lower,space")]
    normalize: String,
    /// MinHash: Jaccard threshold.
    #[arg(long, default_value_t = 0.8)]
    threshold: f64,
    #[arg(long, default_value_t = 128)]
    num_perm: usize,
    /// MinHash shingles: word or char n-grams.
    #[arg(long, default_value = "word")]
    shingle: String,
    #[arg(long, default_value_t = 5)]
    ngram: usize,
    /// Override the LSH bands (with --rows).
    #[arg(long, requires = "rows")]
    bands: Option<usize>,
    #[arg(long, requires = "bands")]
    rows: Option<usize>,
    /// Semantic: cosine threshold.
    #[arg(long, default_value_t = 0.9)]
    semantic_threshold: f32,
    /// Semantic: a static embedding folder (tokenizer.json + safetensors matrix).
    #[arg(long, conflicts_with = "embed_model")]
    embedder: Option<PathBuf>,
    /// Semantic: a model folder; mean-pooled final hidden states.
    #[arg(long)]
    embed_model: Option<PathBuf>,
    /// Semantic search: simhash (approximate, scales) or brute (exact, quadratic).
    #[arg(long, default_value = "simhash")]
    index: String,
    /// Device for --embed-model.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Use this field as the row id in the clusters file (default: FILE:LINE).
    #[arg(long)]
    id_field: Option<String>,
    /// Clusters JSONL (kept id, removed ids with similarity); default: next to --out.
    #[arg(long)]
    clusters: Option<PathBuf>,
    /// Also write the report JSON here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Report what would be removed; write nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    rejects: crate::rejects_args::RejectArgs,
}

impl DedupArgs {
    fn config(&self) -> Result<DedupConfig> {
        let mut cfg = DedupConfig {
            methods: Method::parse_list(&self.method)?,
            fields: self.fields.clone(),
            keep: KeepRule::parse(&self.keep)?,
            normalize: Normalize::parse(&self.normalize)?,
            ..Default::default()
        };
        cfg.minhash.threshold = self.threshold;
        cfg.minhash.num_perm = self.num_perm;
        cfg.minhash.shingle = Shingle::parse(&self.shingle)?;
        cfg.minhash.ngram = self.ngram;
        cfg.minhash.bands = self.bands;
        cfg.minhash.rows = self.rows;
        cfg.semantic.threshold = self.semantic_threshold;
        cfg.semantic.embedder = self.embedder.clone();
        cfg.semantic.model = self.embed_model.clone();
        cfg.semantic.index = match self.index.as_str() {
            "simhash" => IndexKind::Simhash,
            "brute" => IndexKind::Brute,
            other => bail!("unknown --index `{other}`; expected simhash or brute"),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

pub fn run(a: DedupArgs) -> Result<()> {
    if a.out.is_none() && !a.dry_run {
        bail!("give --out FILE (or --dry-run to only report)");
    }
    let cfg = a.config()?;
    let semantic = cfg.methods.contains(&Method::Semantic);
    if semantic && a.embed_model.is_some() {
        let device = a.device.clone();
        return dispatch(&device, WithModel(a, cfg));
    }
    let embedder = match (&a.embedder, semantic) {
        (Some(dir), true) => Some(StaticEmbedder::load(dir)?),
        _ => None,
    };
    execute(&a, &cfg, embedder.as_ref().map(|e| e as &dyn Embedder))
}

struct WithModel(DedupArgs, DedupConfig);

impl OnDevice for WithModel {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let dir = self.1.semantic.model.clone().expect("checked");
        let l = crate::local::load::<B>(&dir, &device)?;
        let emb = crate::local::ModelEmbedder::new(l, 512);
        execute(&self.0, &self.1, Some(&emb))
    }
}

fn execute(a: &DedupArgs, cfg: &DedupConfig, embedder: Option<&dyn Embedder>) -> Result<()> {
    a.rejects.on_error()?;
    let fields = Fields::parse(&cfg.fields);
    let mut rejects = RejectLog::default();
    let mut read = 0;
    let mut values = Vec::new();
    let mut ids = Vec::new();
    let mut texts = Vec::new();
    for path in &a.inputs {
        let raw_read = read_raw(path)?;
        read += raw_read.rows.len() + raw_read.rejects.len();
        rejects.extend(raw_read.rejects);
        for raw in raw_read.rows {
            let origin = Origin {
                file: path.clone(),
                line: raw.line,
            };
            let reject = |field: Option<String>, reason: String| Reject {
                origin: origin.clone(),
                field,
                reason,
                raw: Some(raw.value.to_string()),
            };
            let text = match fields.extract(&raw.value) {
                Ok(t) => t,
                Err(e) => {
                    rejects.push(reject(None, format!("{e:#}")));
                    continue;
                }
            };
            let id = match &a.id_field {
                Some(f) => match raw.value.get(f) {
                    Some(serde_json::Value::String(s)) => s.clone(),
                    Some(v) if !v.is_null() => v.to_string(),
                    _ => {
                        rejects.push(reject(
                            Some(f.clone()),
                            "missing (--id-field names it)".into(),
                        ));
                        continue;
                    }
                },
                None => origin.to_string(),
            };
            ids.push(id);
            texts.push(text);
            values.push(raw.value);
        }
    }
    a.rejects.check(&rejects, values.len(), read)?;
    let out = dedup(&ids, &texts, cfg, embedder)?;
    print!("{}", out.report.summary());
    if a.dry_run {
        println!("dry run: nothing written");
        for c in out.clusters.iter().take(5) {
            println!("cluster  {}", serde_json::to_string(c)?);
        }
    } else {
        let path = a.out.as_ref().expect("checked");
        let mut body = String::new();
        for (v, &k) in values.iter().zip(&out.keep) {
            if k {
                body += &serde_json::to_string(v)?;
                body.push('\n');
            }
        }
        datasets::atomic::write(path, body.as_bytes())?;
        let clusters = a.clusters.clone().unwrap_or_else(|| {
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "dedup".into());
            path.with_file_name(format!("{stem}.clusters.jsonl"))
        });
        write_clusters(&clusters, &out.clusters)?;
        println!(
            "wrote    {} ({} rows), clusters {}",
            path.display(),
            out.report.kept,
            clusters.display()
        );
    }
    a.rejects
        .finish(&rejects, a.out.as_deref().filter(|_| !a.dry_run), read)?;
    if let Some(p) = &a.report {
        write_report(p, &out.report)?;
    }
    Ok(())
}

fn write_report(p: &std::path::Path, r: &DedupReport) -> Result<()> {
    datasets::atomic::write(p, serde_json::to_string_pretty(r)?.as_bytes())
}
