//! `burnish score`: summed log-probability of each row's completion given its prompt, or,
//! with `--reward-model`, a reward model's score of each row (both sides of a pair).

use anyhow::Result;
use burn::tensor::backend::Backend;
use clap::Parser;
use std::io::Write;
use std::path::{Path, PathBuf};

use datasets::formats::Format;
use datasets::read::read_file;
use datasets::records::Record;
use datasets::rejects::RejectLog;

use models::checkpoint::{load_model, load_tokenizer};
use models::scoring::{score_completions, split_prompt_completion};

use crate::device::{dispatch, OnDevice};

#[derive(Parser, Clone)]
pub struct Args {
    /// A causal LM: write completion log-probs.
    #[arg(
        long,
        required_unless_present = "reward_model",
        conflicts_with = "reward_model"
    )]
    pub model: Option<PathBuf>,
    /// A reward model (or its PEFT adapter, or a reward run): write a reward per row, any
    /// supported format; preference rows get `reward_chosen` and `reward_rejected`.
    #[arg(long)]
    pub reward_model: Option<PathBuf>,
    /// With --model: JSONL with `{"prompt": ..., "completion": ...}` rows.
    #[arg(long)]
    pub data: PathBuf,
    /// With --reward-model: the data format (default: detected).
    #[arg(long)]
    pub format: Option<String>,
    /// With --reward-model: the chat template (`auto` = the model's own).
    #[arg(long, default_value = "auto")]
    pub template: String,
    /// Output JSONL (stdout when omitted).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[command(flatten)]
    pub rejects: crate::rejects_args::RejectArgs,
}

pub fn run(a: Args) -> Result<()> {
    let device = a.device.clone();
    dispatch(&device, a)
}

/// One `{"prompt", "completion"}` row: its line, prompt and completion.
type ScoreRow = (usize, String, String);

/// Every `{"prompt", "completion"}` row and the count of rows read; the rows that are not
/// go to `rejects` (file, line, field, reason).
fn read_rows(path: &Path, rejects: &mut RejectLog) -> Result<(Vec<ScoreRow>, usize)> {
    let read = read_file(path, Some(Format::BedrockPromptCompletion))?;
    rejects.extend(read.rejects);
    let rows = read
        .rows
        .into_iter()
        .filter_map(|row| match row.record {
            Record::Conversation(c) => match c.messages.as_slice() {
                [p, c] => Some((row.origin.line, p.content.clone(), c.content.clone())),
                _ => None,
            },
            _ => None,
        })
        .collect();
    Ok((rows, read.rows_read))
}

impl OnDevice for Args {
    type Output = ();

    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        if let Some(rm) = &self.reward_model {
            return crate::reward_score::run::<B>(rm, &self, &device);
        }
        let model_dir = self
            .model
            .clone()
            .expect("clap requires --model or --reward-model");
        self.rejects.on_error()?;
        let mut rejects = RejectLog::default();
        let (rows, read) = read_rows(&self.data, &mut rejects)?;
        self.rejects.check(&rejects, rows.len(), read)?;
        let (cfg, model) = load_model::<B>(&model_dir, &device)?;
        let tok = load_tokenizer(&model_dir, &cfg)?;
        let ids = rows
            .iter()
            .map(|(_, p, c)| split_prompt_completion(&tok, p, c))
            .collect::<Result<Vec<_>>>()?;
        let pad = tok.pad_id.or(cfg.pad_token_id).unwrap_or(0);
        let multiple_of = models::backend::default_pad_multiple::<B>(&device);
        let scores = score_completions(&model, &ids, self.batch_size, pad, multiple_of);
        let mut out = output(self.out.as_ref())?;
        for (i, (s, (line, _, _))) in scores.iter().zip(&rows).enumerate() {
            let line = serde_json::json!({
                "row": i,
                "line": line,
                "logprob": s.logprob,
                "num_tokens": s.num_tokens,
                "mean_logprob": if s.num_tokens > 0 { s.logprob / s.num_tokens as f64 } else { 0.0 },
            });
            writeln!(out, "{line}")?;
        }
        out.finish()?;
        self.rejects.finish(&rejects, self.out.as_deref(), read)
    }
}

/// Where results go: a file that appears whole when [`Output::finish`] runs, or stdout.
pub enum Output {
    File(datasets::atomic::AtomicFile),
    Stdout(std::io::StdoutLock<'static>),
}

impl Output {
    pub fn finish(self) -> Result<()> {
        match self {
            Output::File(f) => f.commit(),
            Output::Stdout(mut s) => Ok(s.flush()?),
        }
    }
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Output::File(f) => f.write(buf),
            Output::Stdout(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Output::File(f) => f.flush(),
            Output::Stdout(s) => s.flush(),
        }
    }
}

pub fn output(path: Option<&PathBuf>) -> Result<Output> {
    Ok(match path {
        Some(p) => Output::File(datasets::atomic::AtomicFile::create(p)?),
        None => Output::Stdout(std::io::stdout().lock()),
    })
}
