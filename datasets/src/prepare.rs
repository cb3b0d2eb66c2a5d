//! `data prepare`: read, validate, template, split, pack and cache, with a stage-by-stage
//! report. Training reads its data through here.

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use models::TextTokenizer;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::cache::{read_parquet, write_parquet, Dataset, Fingerprint};
use crate::config::{DataConfig, OnError};
use crate::dedup::{DedupReport, Embedder};
use crate::evolve::{ChatBackend, EvolveReport};
use crate::formats::Format;
use crate::pack::{pack_best_fit, PackedRow, PackingStats};
use crate::read::read_file;
use crate::records::{Record, Reject, Row};
use crate::split::is_eval;
use crate::tokenize::{Templater, TokenizeError, Tokenized};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FileReport {
    pub path: PathBuf,
    pub format: String,
    pub rows_read: usize,
    pub rejected: usize,
    pub kept: usize,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TokenizeReport {
    pub ok: usize,
    pub rejected: usize,
    pub truncated: usize,
    pub too_long: usize,
    pub no_trained_tokens: usize,
    pub template_errors: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PrepareReport {
    pub fingerprint: String,
    pub cache_dir: PathBuf,
    pub cache_hit: bool,
    pub kind: String,
    pub files: Vec<FileReport>,
    pub tokenize: TokenizeReport,
    /// Rejected rows per reason (reading and tokenizing together).
    pub rejects_by_reason: BTreeMap<String, usize>,
    pub rejects_file: Option<PathBuf>,
    pub train_rows: usize,
    pub eval_rows: usize,
    pub packing: Option<PackingStats>,
    #[serde(default)]
    pub dedup: Option<DedupReport>,
    #[serde(default)]
    pub evolve: Option<EvolveReport>,
    pub tokens: usize,
    pub trained_tokens: usize,
    pub seconds: f64,
}

impl PrepareReport {
    pub fn summary(&self) -> String {
        let mut s = String::new();
        for f in &self.files {
            s += &format!(
                "read     {}: {} rows as {}, {} rejected, {} kept\n",
                f.path.display(),
                f.rows_read,
                f.format,
                f.rejected,
                f.kept
            );
            for w in &f.warnings {
                s += &format!("         warning: {w}\n");
            }
        }
        if let Some(d) = &self.dedup {
            s += &d.summary();
        }
        if let Some(e) = &self.evolve {
            s += &e.summary();
        }
        let t = &self.tokenize;
        s += &format!(
            "template {} ok, {} rejected ({} too long, {} without trained tokens, {} template errors), {} truncated\n",
            t.ok, t.rejected, t.too_long, t.no_trained_tokens, t.template_errors, t.truncated
        );
        s += &format!(
            "split    {} train, {} eval\n",
            self.train_rows, self.eval_rows
        );
        if let Some(p) = &self.packing {
            s += &format!(
                "pack     {} sequences into {} rows, efficiency {:.1}%\n",
                p.sequences,
                p.rows,
                100.0 * p.efficiency
            );
        }
        s += &format!(
            "tokens   {} total, {} trained\n",
            self.tokens, self.trained_tokens
        );
        if let Some(r) = &self.rejects_file {
            s += &format!("rejects  {}\n", r.display());
        }
        s += &format!(
            "cache    {} ({})\n",
            self.cache_dir.display(),
            if self.cache_hit { "reused" } else { "written" }
        );
        s
    }
}

pub struct Prepared {
    pub report: PrepareReport,
    pub train: Dataset,
    pub eval: Dataset,
}

const REPORT: &str = "report.json";

fn fingerprint(cfg: &DataConfig, tok: &TextTokenizer, template_source: &str) -> Result<String> {
    let mut fp = Fingerprint::new();
    for f in &cfg.files {
        fp.file("input", f)?;
    }
    fp.field("format", cfg.format.as_deref().unwrap_or("auto").as_bytes());
    fp.file("tokenizer", &tok.dir.join("tokenizer.json"))?;
    let tc = tok.dir.join("tokenizer_config.json");
    if tc.exists() {
        fp.file("tokenizer_config", &tc)?;
    }
    fp.field("template", template_source.as_bytes());
    fp.field("max_seq_len", &(cfg.max_seq_len as u64).to_le_bytes());
    fp.field("mask", format!("{:?}", cfg.mask).as_bytes());
    fp.field("truncation", format!("{:?}", cfg.truncation).as_bytes());
    fp.field("packing", &[cfg.packing as u8]);
    fp.field("eval_fraction", &cfg.eval_fraction.to_le_bytes());
    // A "fail" run must not reuse an entry that a "skip" run wrote despite rejects.
    fp.field("on_error", format!("{:?}", cfg.on_error).as_bytes());
    if cfg.answers_as_responses {
        fp.field("answers_as_responses", b"1");
    }
    if let Some(d) = &cfg.dedup {
        fp.field("dedup", serde_json::to_string(d)?.as_bytes());
    }
    if let Some(e) = &cfg.evolve {
        fp.field("evolve", serde_json::to_string(e)?.as_bytes());
    }
    Ok(fp.hex())
}

fn load_cached(dir: &Path) -> Result<Option<Prepared>> {
    let report_path = dir.join(REPORT);
    if !report_path.exists() {
        return Ok(None);
    }
    let mut report: PrepareReport =
        serde_json::from_str(&std::fs::read_to_string(&report_path)?)
            .with_context(|| format!("corrupt cache report {}", report_path.display()))?;
    let train = read_parquet(&dir.join("train.parquet"), &report.kind)?;
    let eval = read_parquet(&dir.join("eval.parquet"), &report.kind)?;
    report.cache_hit = true;
    Ok(Some(Prepared {
        report,
        train,
        eval,
    }))
}

fn progress(len: usize, msg: &'static str) -> ProgressBar {
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:30}] {pos}/{len} rows {per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(msg);
    pb
}

fn reason_key(reason: &str) -> String {
    // Group by the reason's first clause so counts stay readable.
    reason
        .split([':', '('])
        .next()
        .unwrap_or(reason)
        .trim()
        .to_string()
}

/// What the caller can plug into the dedup and evolve stages: the backends that need a
/// model on a device (the CLI builds them), and the Ctrl-C flag of an evolve run.
#[derive(Default, Clone, Copy)]
pub struct Hooks<'a> {
    /// Used by `[data.evolve]` (required for `backend = "local"`).
    pub chat: Option<&'a dyn ChatBackend>,
    /// Used by semantic dedup (required for `semantic.model`).
    pub embedder: Option<&'a dyn Embedder>,
    pub stop: Option<&'a std::sync::atomic::AtomicBool>,
}

/// Run the pipeline, or reuse the cache entry with the same fingerprint.
pub fn prepare(cfg: &DataConfig, tok: &TextTokenizer) -> Result<Prepared> {
    prepare_with(cfg, tok, Hooks::default())
}

/// [`prepare`] with backends for the dedup and evolve stages.
pub fn prepare_with(cfg: &DataConfig, tok: &TextTokenizer, hooks: Hooks<'_>) -> Result<Prepared> {
    cfg.validate()?;
    let start = Instant::now();
    let template = tok.template(Some(&cfg.template))?;
    let fp = fingerprint(cfg, tok, &template.source)?;
    let dir = cfg.cache_dir.join(&fp);
    if let Some(hit) = load_cached(&dir)? {
        return Ok(hit);
    }
    let format = cfg.format.as_deref().map(Format::parse).transpose()?;

    let mut report = PrepareReport {
        fingerprint: fp.clone(),
        cache_dir: dir.clone(),
        ..Default::default()
    };
    let mut rows: Vec<Row> = Vec::new();
    let mut rejects: Vec<Reject> = Vec::new();
    for path in &cfg.files {
        let out = read_file(path, format)?;
        report.files.push(FileReport {
            path: path.clone(),
            format: out.format.name().to_string(),
            rows_read: out.rows_read,
            rejected: out.rejects.len(),
            kept: out.rows.len(),
            warnings: out.warnings.clone(),
        });
        rows.extend(out.rows);
        rejects.extend(out.rejects);
    }
    if let Some(d) = &cfg.dedup {
        let (kept, r) = crate::stages::dedup_rows(rows, d, hooks.embedder)?;
        rows = kept;
        report.dedup = Some(r);
    }
    if let Some(e) = &cfg.evolve {
        let out = e
            .out
            .clone()
            .unwrap_or_else(|| cfg.cache_dir.join(format!("evolve-{}.jsonl", &fp[..16])));
        let (all, r) = crate::stages::evolve_rows(rows, e, hooks.chat, &out, hooks.stop)?;
        rows = all;
        report.evolve = Some(r);
    }
    let kinds: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.record.kind()).collect();
    if kinds.len() > 1 {
        bail!(
            "the input files mix record kinds ({}); one run trains on one kind of data",
            kinds.into_iter().collect::<Vec<_>>().join(", ")
        );
    }

    let templater = Templater {
        tokenizer: tok,
        template,
        tokens: tok.template_tokens(),
        mask: cfg.mask,
        max_seq_len: cfg.max_seq_len,
        truncation: cfg.truncation,
    };
    let pb = progress(rows.len(), "template");
    let results: Vec<Result<(Tokenized, bool), TokenizeError>> = rows
        .par_iter()
        .map(|r| {
            let answered = match &r.record {
                Record::PromptTask(t) if cfg.answers_as_responses => {
                    t.as_conversation().map(Record::Conversation)
                }
                _ => None,
            };
            let out = templater.tokenize(answered.as_ref().unwrap_or(&r.record));
            pb.inc(1);
            out
        })
        .collect();
    pb.finish_and_clear();

    let mut train = Vec::new();
    let mut eval = Vec::new();
    for (row, result) in rows.iter().zip(results) {
        match result {
            Ok((t, truncated)) => {
                report.tokenize.ok += 1;
                report.tokenize.truncated += truncated as usize;
                if is_eval(&row.record, cfg.eval_fraction) {
                    eval.push(t);
                } else {
                    train.push(t);
                }
            }
            Err(e) => {
                report.tokenize.rejected += 1;
                match e {
                    TokenizeError::TooLong { .. } => report.tokenize.too_long += 1,
                    TokenizeError::NoTrainedTokens => report.tokenize.no_trained_tokens += 1,
                    TokenizeError::Template(_) | TokenizeError::PrefixBroken { .. } => {
                        report.tokenize.template_errors += 1
                    }
                }
                rejects.push(Reject {
                    origin: row.origin.clone(),
                    field: None,
                    reason: e.to_string(),
                    raw: None,
                });
            }
        }
    }
    for r in &rejects {
        *report
            .rejects_by_reason
            .entry(reason_key(&r.reason))
            .or_default() += 1;
    }
    if !rejects.is_empty() && cfg.on_error == OnError::Fail {
        let shown: Vec<String> = rejects.iter().take(5).map(|r| format!("  {r}")).collect();
        bail!(
            "{} row(s) rejected and on_error = \"fail\":\n{}{}\n(set on_error = \"skip\" to write them to a rejects file and go on)",
            rejects.len(),
            shown.join("\n"),
            if rejects.len() > 5 { "\n  ..." } else { "" }
        );
    }
    report.train_rows = train.len();
    report.eval_rows = eval.len();
    let (train, packing) = to_dataset(train, cfg)?;
    let (eval, _) = match eval.is_empty() {
        // `to_dataset` cannot tell the kind of no rows; an empty split has the train's kind.
        true => (train.empty_like(), None),
        false => to_dataset(eval, cfg)?,
    };
    report.packing = packing;
    report.kind = train.kind().to_string();
    let (tokens, trained) = count_tokens(&train);
    let (et, etr) = count_tokens(&eval);
    report.tokens = tokens + et;
    report.trained_tokens = trained + etr;
    report.seconds = start.elapsed().as_secs_f64();
    write_entry(&dir, &train, &eval, &mut report, &rejects, cfg)?;
    Ok(Prepared {
        report,
        train,
        eval,
    })
}

fn count_tokens(d: &Dataset) -> (usize, usize) {
    match d {
        Dataset::Sft(rows) => (
            rows.iter().map(PackedRow::len).sum(),
            rows.iter()
                .map(|r| r.trained.iter().filter(|&&t| t).count())
                .sum(),
        ),
        Dataset::Pairs(rows) => (
            rows.iter()
                .map(|p| p.prompt.len() * 2 + p.chosen.len() + p.rejected.len())
                .sum(),
            rows.iter().map(|p| p.chosen.len() + p.rejected.len()).sum(),
        ),
        Dataset::Prompts(rows) => (rows.iter().map(|p| p.prompt.len()).sum(), 0),
        Dataset::Unpaired(rows) => (
            rows.iter()
                .map(|u| u.prompt.len() + u.completion.len())
                .sum(),
            rows.iter().map(|u| u.completion.len()).sum(),
        ),
    }
}

fn to_dataset(items: Vec<Tokenized>, cfg: &DataConfig) -> Result<(Dataset, Option<PackingStats>)> {
    let mut seqs = Vec::new();
    let mut pairs = Vec::new();
    let mut prompts = Vec::new();
    let mut unpaired = Vec::new();
    for t in items {
        match t {
            Tokenized::Seq(s) => seqs.push(s),
            Tokenized::Pair(p) => pairs.push(p),
            Tokenized::Prompt(p) => prompts.push(p),
            Tokenized::Unpaired(u) => unpaired.push(u),
        }
    }
    if !unpaired.is_empty() {
        return Ok((Dataset::Unpaired(unpaired), None));
    }
    if !pairs.is_empty() {
        return Ok((Dataset::Pairs(pairs), None));
    }
    if !prompts.is_empty() {
        return Ok((Dataset::Prompts(prompts), None));
    }
    if cfg.packing {
        let (rows, stats) = pack_best_fit(&seqs, cfg.max_seq_len);
        Ok((Dataset::Sft(rows), Some(stats)))
    } else {
        Ok((
            Dataset::Sft(seqs.iter().map(PackedRow::single).collect()),
            None,
        ))
    }
}

fn write_entry(
    dir: &Path,
    train: &Dataset,
    eval: &Dataset,
    report: &mut PrepareReport,
    rejects: &[Reject],
    cfg: &DataConfig,
) -> Result<()> {
    crate::atomic::write_dir(dir, |tmp| {
        write_parquet(&tmp.join("train.parquet"), train)?;
        // An empty eval split still gets a file with the right columns.
        let eval = if eval.is_empty() {
            train.empty_like()
        } else {
            eval.clone()
        };
        write_parquet(&tmp.join("eval.parquet"), &eval)?;
        if !rejects.is_empty() {
            let path = cfg
                .rejects_file
                .clone()
                .unwrap_or_else(|| dir.join("rejects.jsonl"));
            let target = if cfg.rejects_file.is_some() {
                path.clone()
            } else {
                tmp.join("rejects.jsonl")
            };
            let mut f = crate::atomic::AtomicFile::create(&target)?;
            for r in rejects {
                writeln!(f, "{}", serde_json::to_string(r)?)?;
            }
            f.commit()?;
            report.rejects_file = Some(path);
        }
        crate::atomic::write(
            &tmp.join(REPORT),
            serde_json::to_string_pretty(report)?.as_bytes(),
        )
    })?;
    Ok(())
}
