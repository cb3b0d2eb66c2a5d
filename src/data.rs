//! `burnish data inspect | convert | dedup | evolve | prepare`.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use datasets::config::{DataConfig, OnError};
use datasets::convert::{convert_record, Target};
use datasets::dedup::Method;
use datasets::evolve::run::BackendKind;
use datasets::formats::Format;
use datasets::prepare::{prepare_with, Hooks, Prepared};
use datasets::read::read_file;
use datasets::records::Reject;
use datasets::rejects::RejectLog;
use datasets::tokenize::{MaskPolicy, Templater, Tokenized, Truncation};
use models::TextTokenizer;

#[derive(Parser)]
pub struct Args {
    #[command(subcommand)]
    command: DataCommand,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Detected format, counts, rejects, token lengths and a rendered sample of a file.
    Inspect(InspectArgs),
    /// Rewrite a file in another format.
    Convert(ConvertArgs),
    /// Remove exact, near (MinHash-LSH) and semantic duplicates.
    Dedup(crate::dedup::DedupArgs),
    /// Evol-Instruct: evolve instructions with an LLM and answer them.
    Evolve(crate::evolve::EvolveArgs),
    /// Sequence-level distillation: a teacher (model or endpoint) answers prompts as SFT rows.
    Distill(crate::distill_data::Args),
    /// Read, validate, (dedup, evolve,) template, split, pack and cache a dataset.
    Prepare(PrepareArgs),
}

#[derive(Parser)]
struct InspectArgs {
    file: PathBuf,
    /// Model directory: its tokenizer and chat template give token statistics and a sample.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long)]
    format: Option<String>,
    #[arg(long, default_value = "auto")]
    template: String,
    #[arg(long, default_value_t = 1024)]
    max_seq_len: usize,
    #[arg(long, default_value = "assistant")]
    mask: String,
}

#[derive(Parser)]
struct ConvertArgs {
    file: PathBuf,
    /// bedrock, bedrock-conversation, alpaca, sharegpt or openai.
    #[arg(long)]
    to: String,
    /// Output JSONL, written whole or not at all (it may be the input); default stdout.
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long)]
    format: Option<String>,
    #[command(flatten)]
    rejects: crate::rejects_args::RejectArgs,
}

#[derive(Parser)]
struct PrepareArgs {
    /// A recipe whose `[data]` section (and `[model] path`) configure the run.
    #[arg(long, conflicts_with = "data")]
    recipe: Option<PathBuf>,
    /// Input files (instead of a recipe).
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
    /// Model directory whose tokenizer and chat template are used.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long)]
    format: Option<String>,
    #[arg(long)]
    template: Option<String>,
    #[arg(long)]
    max_seq_len: Option<usize>,
    /// assistant, last_assistant or all.
    #[arg(long)]
    mask: Option<String>,
    #[arg(long)]
    pack: bool,
    #[arg(long)]
    eval_fraction: Option<f64>,
    /// fail or skip.
    #[arg(long)]
    on_error: Option<String>,
    /// drop or left.
    #[arg(long)]
    truncation: Option<String>,
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Also write the report JSON here.
    #[arg(long)]
    report: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    match a.command {
        DataCommand::Inspect(a) => inspect(a),
        DataCommand::Convert(a) => convert(a),
        DataCommand::Dedup(a) => crate::dedup::run(a),
        DataCommand::Evolve(a) => crate::evolve::run(a),
        DataCommand::Distill(a) => crate::distill_data::run(a),
        DataCommand::Prepare(a) => prepare_cmd(a),
    }
}

fn parse_format(f: &Option<String>) -> Result<Option<Format>> {
    f.as_deref().map(Format::parse).transpose()
}

fn percentile(sorted: &[usize], p: f64) -> usize {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn inspect(a: InspectArgs) -> Result<()> {
    if a.max_seq_len == 0 {
        bail!("--max-seq-len must be at least 1 (train refuses 0 as well)");
    }
    let out = read_file(&a.file, parse_format(&a.format)?)?;
    println!("file:     {}", a.file.display());
    println!("format:   {}", out.format.name());
    println!(
        "rows:     {} read, {} rejected, {} kept",
        out.rows_read,
        out.rejects.len(),
        out.rows.len()
    );
    for w in &out.warnings {
        println!("warning:  {w}");
    }
    for r in out.rejects.iter().take(10) {
        println!("reject:   {r}");
    }
    if out.rejects.len() > 10 {
        println!("reject:   ... and {} more", out.rejects.len() - 10);
    }
    let Some(model) = &a.model else { return Ok(()) };
    let tok = TextTokenizer::from_dir(model)?;
    let templater = Templater {
        tokenizer: &tok,
        template: tok.template(Some(&a.template))?,
        tokens: tok.template_tokens(),
        mask: MaskPolicy::parse(&a.mask)?,
        max_seq_len: usize::MAX,
        truncation: Truncation::Drop,
    };
    let mut lengths = Vec::new();
    let mut failures = 0;
    let mut sample = None;
    for row in &out.rows {
        match templater.tokenize(&row.record) {
            Ok((t, _)) => {
                lengths.push(t.len());
                if sample.is_none() {
                    sample = Some(t);
                }
            }
            Err(e) => {
                failures += 1;
                if failures <= 5 {
                    println!("template: {}: {e}", row.origin);
                }
            }
        }
    }
    lengths.sort_unstable();
    let over = lengths.iter().filter(|&&l| l > a.max_seq_len).count();
    println!(
        "tokens:   p50 {} p90 {} p99 {} max {}; {over} row(s) over max_seq_len {}; {failures} row(s) fail templating",
        percentile(&lengths, 0.5),
        percentile(&lengths, 0.9),
        percentile(&lengths, 0.99),
        lengths.last().copied().unwrap_or(0),
        a.max_seq_len
    );
    if let Some(t) = sample {
        println!(
            "sample (trained tokens {}):",
            if std::io::stdout().is_terminal() {
                "in green"
            } else {
                "in [[ ]]"
            }
        );
        println!("{}", render_sample(&tok, &t)?);
    }
    Ok(())
}

/// The sample's text with trained runs highlighted.
fn render_sample(tok: &TextTokenizer, t: &Tokenized) -> Result<String> {
    let (ids, trained): (Vec<u32>, Vec<bool>) = match t {
        Tokenized::Seq(s) => (s.ids.clone(), s.trained.clone()),
        Tokenized::Pair(p) => {
            let ids = [p.prompt.as_slice(), p.chosen.as_slice()].concat();
            let trained = [vec![false; p.prompt.len()], vec![true; p.chosen.len()]].concat();
            (ids, trained)
        }
        Tokenized::Prompt(p) => (p.prompt.clone(), vec![false; p.prompt.len()]),
        Tokenized::Unpaired(u) => {
            let ids = [u.prompt.as_slice(), u.completion.as_slice()].concat();
            let trained = [vec![false; u.prompt.len()], vec![true; u.completion.len()]].concat();
            (ids, trained)
        }
    };
    let colour = std::io::stdout().is_terminal();
    let mut out = String::new();
    let mut i = 0;
    while i < ids.len() {
        let j = (i..ids.len())
            .find(|&j| trained[j] != trained[i])
            .unwrap_or(ids.len());
        let text = tok.decode(&ids[i..j], false)?;
        out += &match (trained[i], colour) {
            (true, true) => format!("\x1b[32m{text}\x1b[0m"),
            (true, false) => format!("[[{text}]]"),
            (false, _) => text,
        };
        i = j;
    }
    Ok(out)
}

fn convert(a: ConvertArgs) -> Result<()> {
    let target = Target::parse(&a.to)?;
    a.rejects.on_error()?;
    let out = read_file(&a.file, parse_format(&a.format)?)?;
    let mut rejects = RejectLog::default();
    rejects.extend(out.rejects);
    let mut warnings: std::collections::BTreeMap<String, usize> = Default::default();
    let mut lines = Vec::with_capacity(out.rows.len());
    for row in &out.rows {
        match convert_record(&row.record, target) {
            Ok((value, warns)) => {
                lines.push(serde_json::to_string(&value)?);
                for w in warns {
                    *warnings.entry(w).or_default() += 1;
                }
            }
            Err(e) => rejects.push(Reject {
                origin: row.origin.clone(),
                field: None,
                reason: format!("{e:#}"),
                raw: None,
            }),
        }
    }
    // Everything is decided before a byte is written: the output (which may be the input)
    // is replaced whole, or not at all.
    a.rejects.check(&rejects, lines.len(), out.rows_read)?;
    let body: String = lines.iter().map(|l| format!("{l}\n")).collect();
    match &a.out {
        Some(p) => datasets::atomic::write(p, body.as_bytes())?,
        None => std::io::stdout().lock().write_all(body.as_bytes())?,
    }
    eprintln!(
        "converted {} of {} rows from {} to {}; {} rejected",
        lines.len(),
        out.rows_read,
        out.format.name(),
        target.name(),
        rejects.len(),
    );
    a.rejects
        .finish(&rejects, a.out.as_deref(), out.rows_read)?;
    for (w, n) in warnings {
        eprintln!("warning ({n} rows): {w}");
    }
    Ok(())
}

/// The `[data]` section and model path of a recipe.
fn recipe_data(path: &Path) -> Result<(DataConfig, Option<PathBuf>)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read recipe {}", path.display()))?;
    let value: toml::Value = toml::from_str(&text)
        .with_context(|| format!("recipe {} is not valid TOML", path.display()))?;
    let data = value
        .get("data")
        .with_context(|| format!("recipe {} has no [data] section", path.display()))?
        .clone();
    let mut cfg: DataConfig = data
        .try_into()
        .with_context(|| format!("recipe {}: invalid [data] section", path.display()))?;
    // As `train` reads it: SFT and distillation take prompt-answer rows as conversations.
    let method = value.get("method").and_then(|m| m.as_str());
    cfg.answers_as_responses |= matches!(method, Some("sft" | "distill"));
    let model = value
        .get("model")
        .and_then(|m| m.get("path"))
        .and_then(|p| p.as_str())
        .map(PathBuf::from);
    Ok((cfg, model))
}

fn prepare_cmd(a: PrepareArgs) -> Result<()> {
    let (mut cfg, recipe_model) = match &a.recipe {
        Some(r) => recipe_data(r)?,
        None if !a.data.is_empty() => (DataConfig::new(a.data.clone()), None),
        None => bail!("give --recipe RECIPE or --data FILE..."),
    };
    if let Some(v) = &a.format {
        cfg.format = Some(v.clone());
    }
    if let Some(v) = &a.template {
        cfg.template = v.clone();
    }
    if let Some(v) = a.max_seq_len {
        cfg.max_seq_len = v;
    }
    if let Some(v) = &a.mask {
        cfg.mask = MaskPolicy::parse(v)?;
    }
    if a.pack {
        cfg.packing = true;
    }
    if let Some(v) = a.eval_fraction {
        cfg.eval_fraction = v;
    }
    if let Some(v) = &a.on_error {
        cfg.on_error = OnError::parse(v)?;
    }
    if let Some(v) = &a.truncation {
        cfg.truncation = match v.as_str() {
            "drop" => Truncation::Drop,
            "left" => Truncation::Left,
            other => bail!("unknown truncation `{other}`; expected drop or left"),
        };
    }
    if let Some(v) = &a.cache_dir {
        cfg.cache_dir = v.clone();
    }
    let model = a
        .model
        .clone()
        .or(recipe_model)
        .context("no model: give --model DIR or set [model] path in the recipe")?;
    let tok = TextTokenizer::from_dir(&model)?;
    let prepared = prepare_stages(&cfg, &tok)?;
    print!("{}", prepared.report.summary());
    if let Some(p) = &a.report {
        datasets::atomic::write(
            p,
            serde_json::to_string_pretty(&prepared.report)?.as_bytes(),
        )?;
    }
    Ok(())
}

/// `prepare` with the dedup/evolve stages' model backends loaded when the recipe asks for
/// them (a local evolve model, a semantic-dedup model), and Ctrl-C wired to evolve.
fn prepare_stages(cfg: &DataConfig, tok: &TextTokenizer) -> Result<Prepared> {
    if cfg.evolve.is_some() {
        crate::evolve::install_ctrlc()?;
    }
    let local_evolve = cfg
        .evolve
        .as_ref()
        .filter(|e| e.backend == BackendKind::Local);
    let embed_model = cfg
        .dedup
        .as_ref()
        .filter(|d| d.methods.contains(&Method::Semantic))
        .and_then(|d| d.semantic.model.clone());
    if local_evolve.is_none() && embed_model.is_none() {
        return prepare_with(
            cfg,
            tok,
            Hooks {
                stop: Some(&crate::evolve::STOP),
                ..Default::default()
            },
        );
    }
    let device = local_evolve
        .map(|e| e.local.device.clone())
        .unwrap_or_else(|| "cpu".into());
    crate::device::dispatch(
        &device,
        WithModels {
            cfg,
            tok,
            embed_model,
        },
    )
}

struct WithModels<'a> {
    cfg: &'a DataConfig,
    tok: &'a TextTokenizer,
    embed_model: Option<PathBuf>,
}

impl crate::device::OnDevice for WithModels<'_> {
    type Output = Prepared;
    fn run<B: burn::tensor::backend::Backend>(self, device: B::Device) -> Result<Prepared> {
        let chat = match &self.cfg.evolve {
            Some(e) if e.backend == BackendKind::Local => {
                Some(crate::evolve::local_chat::<B>(e, &device)?)
            }
            _ => None,
        };
        let embedder = match &self.embed_model {
            Some(dir) => Some(crate::local::ModelEmbedder::new(
                crate::local::load::<B>(dir, &device)?,
                512,
            )),
            None => None,
        };
        prepare_with(
            self.cfg,
            self.tok,
            Hooks {
                chat: chat
                    .as_ref()
                    .map(|c| c as &dyn datasets::evolve::ChatBackend),
                embedder: embedder
                    .as_ref()
                    .map(|e| e as &dyn datasets::dedup::Embedder),
                stop: Some(&crate::evolve::STOP),
            },
        )
    }
}
