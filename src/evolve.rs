//! `burnish data evolve`: Evol-Instruct augmentation through an OpenAI-compatible server or
//! the local burnish generator, resumable and safe to interrupt.

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use clap::Parser;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use datasets::evolve::run::BackendKind;
use datasets::evolve::{
    evolve, seeds_from_rows, ChatBackend, EvolveConfig, InfoGain, OpenAiClient, Operation,
};
use datasets::formats::Format;
use datasets::read::read_file;
use datasets::rejects::RejectLog;

use crate::device::{dispatch, OnDevice};

pub static STOP: AtomicBool = AtomicBool::new(false);

/// First Ctrl-C: finish the requests in flight and stop (everything done is on disk);
/// second: quit at once.
pub fn install_ctrlc() -> Result<()> {
    ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond Ctrl-C: exiting now (finished rows are on disk)");
            std::process::exit(130);
        }
        eprintln!("\nCtrl-C: stopping after the requests in flight (Ctrl-C again to quit now)");
    })?;
    Ok(())
}

#[derive(Parser, Clone)]
pub struct EvolveArgs {
    /// Seed instructions: any format `data inspect` reads (the first user turn is evolved).
    input: PathBuf,
    /// Append-only output JSONL (OpenAI messages + lineage); eliminated tries go to
    /// OUT_STEM.eliminated.jsonl. Rerunning resumes.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// openai (any OpenAI-compatible server) or local (a burnish model folder).
    #[arg(long, default_value = "openai")]
    backend: String,
    #[command(flatten)]
    rejects: crate::rejects_args::RejectArgs,
    /// Model name on the server (openai), or model folder (local).
    #[arg(long)]
    model: String,
    /// Server base URL, up to /v1.
    #[arg(long, default_value = "http://localhost:8000/v1")]
    base_url: String,
    /// Environment variable holding the API key (never logged).
    #[arg(long, default_value = "OPENAI_API_KEY")]
    api_key_env: String,
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Seconds per request.
    #[arg(long, default_value_t = 120.0)]
    timeout: f64,
    /// Retries for 429, 5xx, timeouts and connection errors.
    #[arg(long, default_value_t = 5)]
    max_retries: u32,
    /// First retry pause in seconds (doubles each time).
    #[arg(long, default_value_t = 1.0)]
    backoff: f64,
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Max tokens per reply (new tokens for local).
    #[arg(long, default_value_t = 1024)]
    max_tokens: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Operations to pick from: add_constraints, deepen, concretize, reasoning,
    /// complicate_input, breadth (default all).
    #[arg(long, value_delimiter = ',')]
    operations: Vec<String>,
    /// Folder overriding the bundled prompt templates (same file names).
    #[arg(long)]
    templates: Option<PathBuf>,
    /// judge (ask the model Equal / Not Equal), similarity (word Jaccard) or none.
    #[arg(long, default_value = "judge")]
    info_gain: String,
    #[arg(long, default_value_t = 0.9)]
    similarity_threshold: f64,
    #[arg(long, default_value_t = 3)]
    min_answer_words: usize,
    /// Input format (default: detected).
    #[arg(long)]
    format: Option<String>,
    /// Device for the local backend.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Also write the report JSON here.
    #[arg(long)]
    report: Option<PathBuf>,
}

impl EvolveArgs {
    fn config(&self) -> Result<EvolveConfig> {
        let mut cfg = EvolveConfig {
            rounds: self.rounds,
            seed: self.seed,
            templates_dir: self.templates.clone(),
            out: Some(self.out.clone()),
            ..Default::default()
        };
        if !self.operations.is_empty() {
            cfg.operations = self
                .operations
                .iter()
                .map(|s| Operation::parse(s.trim()))
                .collect::<Result<_>>()?;
        }
        cfg.eliminate.info_gain = match self.info_gain.as_str() {
            "judge" => InfoGain::Judge,
            "similarity" => InfoGain::Similarity,
            "none" => InfoGain::None,
            other => bail!("unknown --info-gain `{other}`; expected judge, similarity or none"),
        };
        cfg.eliminate.similarity_threshold = self.similarity_threshold;
        cfg.eliminate.min_answer_words = self.min_answer_words;
        match self.backend.as_str() {
            "openai" => {
                cfg.backend = BackendKind::Openai;
                cfg.openai.model = self.model.clone();
                cfg.openai.base_url = self.base_url.clone();
                cfg.openai.api_key_env = self.api_key_env.clone();
                cfg.openai.concurrency = self.concurrency;
                cfg.openai.timeout_s = self.timeout;
                cfg.openai.max_retries = self.max_retries;
                cfg.openai.backoff_s = self.backoff;
                cfg.openai.temperature = self.temperature;
                cfg.openai.max_tokens = self.max_tokens;
            }
            "local" => {
                cfg.backend = BackendKind::Local;
                cfg.local.model = Some(PathBuf::from(&self.model));
                cfg.local.temperature = self.temperature;
                cfg.local.max_new_tokens = self.max_tokens;
                cfg.local.device = self.device.clone();
            }
            other => bail!("unknown --backend `{other}`; expected openai or local"),
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

pub fn run(a: EvolveArgs) -> Result<()> {
    let cfg = a.config()?;
    install_ctrlc()?;
    match cfg.backend {
        BackendKind::Openai => {
            let client = OpenAiClient::new(cfg.openai.clone())?;
            execute(&a, &cfg, &client)
        }
        BackendKind::Local => {
            let device = cfg.local.device.clone();
            dispatch(&device, Local(a, cfg))
        }
    }
}

struct Local(EvolveArgs, EvolveConfig);

impl OnDevice for Local {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let chat = local_chat::<B>(&self.1, &device)?;
        execute(&self.0, &self.1, &chat)
    }
}

/// The local chat backend a config asks for.
pub fn local_chat<B: Backend>(
    cfg: &EvolveConfig,
    device: &B::Device,
) -> Result<crate::local::LocalChat<B>> {
    let dir = cfg.local.model.as_ref().context("local.model is not set")?;
    let l = crate::local::load::<B>(dir, device)?;
    crate::local::LocalChat::new(
        l,
        cfg.local.max_new_tokens,
        cfg.local.temperature,
        cfg.local.top_p,
        cfg.seed,
    )
}

fn execute(a: &EvolveArgs, cfg: &EvolveConfig, backend: &dyn ChatBackend) -> Result<()> {
    let format = a.format.as_deref().map(Format::parse).transpose()?;
    a.rejects.on_error()?;
    let read = read_file(&a.input, format)?;
    let mut rejects = RejectLog::default();
    rejects.extend(read.rejects);
    let (seeds, skipped) = seeds_from_rows(&read.rows);
    rejects.extend(skipped);
    a.rejects.check(&rejects, seeds.len(), read.rows_read)?;
    a.rejects.finish(&rejects, Some(&a.out), read.rows_read)?;
    let report = evolve(&seeds, cfg, backend, &a.out, &STOP)?;
    print!("{}", report.summary());
    if let Some(p) = &a.report {
        datasets::atomic::write(p, serde_json::to_string_pretty(&report)?.as_bytes())?;
    }
    if report.interrupted {
        std::process::exit(130);
    }
    let failed: usize = report.failed.values().sum();
    if failed > 0 {
        bail!(
            "{failed} step(s) failed ({:?}); run the same command again to retry them",
            report.failed
        );
    }
    Ok(())
}
