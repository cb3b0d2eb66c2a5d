//! `burnish data distill`: a teacher answers prompts and the answers become SFT rows
//! (sequence-level distillation), with their lineage; ordinary SFT then trains a student.

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use std::path::PathBuf;

use datasets::convert::{convert_record, Target};
use datasets::formats::Format;
use datasets::read::read_file;
use datasets::records::{Conversation, Record, Row, ASSISTANT, USER};
use models::checkpoint::{load_model, load_tokenizer};
use models::generate::{generate, SamplingParams};
use models::weights::write_atomic;
use models::Message;

use crate::device::{dispatch, OnDevice};

#[derive(Parser, Clone)]
pub struct Args {
    /// The teacher: a model directory, or `openai:BASE_URL` for an OpenAI-compatible
    /// chat-completions endpoint (vLLM, Ollama, TGI, a Bedrock gateway, ...).
    #[arg(long)]
    pub teacher: String,
    /// Prompts: any input format (prompt-only tasks; a conversation's final assistant turn
    /// and a preference pair's answers are replaced by the teacher's).
    #[arg(long)]
    pub input: PathBuf,
    /// JSONL in Bedrock conversation format, one row per answered prompt.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub format: Option<String>,
    /// Chat template of a local teacher: `auto` (its own) or a built-in name.
    #[arg(long, default_value = "auto")]
    pub template: String,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Prompts per generation batch (local teacher) or requests in flight (endpoint).
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Model name sent to the endpoint.
    #[arg(long, default_value = "default")]
    pub model_name: String,
    /// Environment variable holding the endpoint's API key (never logged).
    #[arg(long, default_value = "OPENAI_API_KEY")]
    pub api_key_env: String,
    /// Seconds before an endpoint request times out.
    #[arg(long, default_value_t = 120)]
    pub timeout_s: u64,
}

/// The conversation a teacher continues: everything up to the last user turn.
fn prompt_of(record: &Record) -> Option<Conversation> {
    let mut c = match record {
        Record::PromptTask(t) => t.prompt.clone(),
        Record::Preference(p) => p.prompt.clone(),
        Record::Conversation(c) => c.clone(),
    };
    let last_user = c.messages.iter().rposition(|m| m.role == USER)?;
    c.messages.truncate(last_user + 1);
    Some(c)
}

/// Something that answers chats.
pub trait Answerer {
    fn answer(&mut self, prompts: &[Conversation]) -> Result<Vec<String>>;
}

pub fn run(a: Args) -> Result<()> {
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let format = a.format.as_deref().map(Format::parse).transpose()?;
    let read = read_file(&a.input, format)?;
    for r in &read.rejects {
        eprintln!("skipped {r}");
    }
    let rows: Vec<(Row, Conversation)> = read
        .rows
        .into_iter()
        .filter_map(|row| {
            let p = prompt_of(&row.record);
            if p.is_none() {
                eprintln!("skipped {}: no user turn to answer", row.origin);
            }
            p.map(|p| (row, p))
        })
        .collect();
    if rows.is_empty() {
        bail!("{} has no prompts to answer", a.input.display());
    }
    match a.teacher.strip_prefix("openai:") {
        Some(url) => {
            let mut teacher = crate::openai_teacher::OpenAiTeacher::new(url, &a)?;
            write_answers(&a, &rows, &mut teacher)
        }
        None => {
            let device = a.device.clone();
            dispatch(&device, LocalRun { args: a, rows })
        }
    }
}

struct LocalRun {
    args: Args,
    rows: Vec<(Row, Conversation)>,
}

impl OnDevice for LocalRun {
    type Output = ();

    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let dir = PathBuf::from(&self.args.teacher);
        let (cfg, model) = load_model::<B>(&dir, &device)
            .with_context(|| format!("loading the teacher {}", dir.display()))?;
        let tok = load_tokenizer(&dir, &cfg)?;
        let template = tok.template(Some(&self.args.template))?;
        let mut stop_ids = tok.stop_ids.clone();
        stop_ids.extend(cfg.eos_token_ids.iter().copied());
        let mut teacher = LocalTeacher {
            generate: Box::new(move |prompts: &[Conversation]| {
                let ids = prompts
                    .iter()
                    .map(|c| {
                        let text = template.render(&c.to_messages(), true, &tok.template_tokens())?;
                        tok.encode(&text, false)
                    })
                    .collect::<Result<Vec<_>>>()?;
                let params = SamplingParams {
                    max_new_tokens: self.args.max_new_tokens,
                    temperature: self.args.temperature,
                    seed: self.args.seed,
                    stop_ids: stop_ids.clone(),
                    pad_id: tok.pad_id.or(cfg.pad_token_id).unwrap_or(0),
                    ..Default::default()
                };
                generate(&model, &ids, &params, None)?
                    .iter()
                    .map(|g| tok.decode(&g.tokens, true).map(|s| s.trim().to_string()))
                    .collect()
            }),
        };
        write_answers(&self.args, &self.rows, &mut teacher)
    }
}

type GenerateFn<'a> = Box<dyn FnMut(&[Conversation]) -> Result<Vec<String>> + 'a>;

struct LocalTeacher<'a> {
    generate: GenerateFn<'a>,
}

impl Answerer for LocalTeacher<'_> {
    fn answer(&mut self, prompts: &[Conversation]) -> Result<Vec<String>> {
        (self.generate)(prompts)
    }
}

/// Answer every prompt in batches and write the rows (atomically, when all are done).
fn write_answers(a: &Args, rows: &[(Row, Conversation)], teacher: &mut dyn Answerer) -> Result<()> {
    let bar = ProgressBar::new(rows.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} prompts [{elapsed} < {eta}]")
            .expect("valid template"),
    );
    bar.set_message("distilling");
    let mut out = String::new();
    let mut empty = 0usize;
    for chunk in rows.chunks(a.batch) {
        let prompts: Vec<Conversation> = chunk.iter().map(|(_, p)| p.clone()).collect();
        let answers = teacher.answer(&prompts)?;
        for ((row, prompt), answer) in chunk.iter().zip(answers) {
            if answer.is_empty() {
                // Kept out of the SFT data, but reported: nothing is dropped silently.
                empty += 1;
                eprintln!("{}: the teacher's answer is empty; row left out", row.origin);
                continue;
            }
            let mut conv = prompt.clone();
            conv.messages.push(Message::new(ASSISTANT, &answer));
            let (mut v, _) = convert_record(&Record::Conversation(conv), Target::BedrockConversation)?;
            if let Value::Object(m) = &mut v {
                m.insert(
                    "lineage".into(),
                    json!({"teacher": a.teacher, "source": row.origin.to_string(), "method": "sequence_kd"}),
                );
            }
            out.push_str(&serde_json::to_string(&v)?);
            out.push('\n');
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    write_atomic(&a.out, out.as_bytes())?;
    eprintln!(
        "{} prompts answered by {} -> {}{}",
        rows.len() - empty,
        a.teacher,
        a.out.display(),
        if empty > 0 {
            format!(" ({empty} empty answers left out)")
        } else {
            String::new()
        }
    );
    Ok(())
}
