//! `burnish data distill`: a teacher answers prompts and the answers become SFT rows
//! (sequence-level distillation), with their lineage; ordinary SFT then trains a student.

use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use std::path::PathBuf;

use datasets::convert::{convert_record, Target};
use datasets::evolve::{ChatBackend, ChatRequest, OpenAiClient, OpenAiConfig};
use datasets::formats::Format;
use datasets::read::read_file;
use datasets::records::{Conversation, Record, Reject, Row, ASSISTANT, USER};
use datasets::rejects::RejectLog;
use models::weights::write_atomic;
use models::Message;

use crate::device::{dispatch, OnDevice};
use crate::local::LocalChat;

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
    /// Requests in flight to an endpoint (a local teacher answers one at a time).
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Model name sent to the endpoint.
    #[arg(long, default_value = "default")]
    pub model_name: String,
    /// Environment variable holding the endpoint's API key (never logged).
    #[arg(long, default_value = "OPENAI_API_KEY")]
    pub api_key_env: String,
    #[command(flatten)]
    pub rejects: crate::rejects_args::RejectArgs,
    /// Seconds before an endpoint request times out.
    #[arg(long, default_value_t = 120)]
    pub timeout_s: u64,
}

/// The conversation a teacher continues: everything up to the last user turn.
fn prompt_of(record: &Record) -> Option<Conversation> {
    let mut c = match record {
        Record::PromptTask(t) => t.prompt.clone(),
        Record::Preference(p) => p.prompt.clone(),
        Record::Unpaired(u) => u.prompt.clone(),
        Record::Conversation(c) => c.clone(),
    };
    let last_user = c.messages.iter().rposition(|m| m.role == USER)?;
    c.messages.truncate(last_user + 1);
    Some(c)
}

/// The prompts to answer, and the rows that gave none.
struct Prompts {
    rows: Vec<(Row, Conversation)>,
    rejects: RejectLog,
    read: usize,
}

pub fn run(a: Args) -> Result<()> {
    a.rejects.on_error()?;
    let format = a.format.as_deref().map(Format::parse).transpose()?;
    let read = read_file(&a.input, format)?;
    let mut rejects = RejectLog::default();
    rejects.extend(read.rejects);
    let mut rows = Vec::new();
    for row in read.rows {
        match prompt_of(&row.record) {
            Some(p) => rows.push((row, p)),
            None => rejects.push(Reject {
                origin: row.origin,
                field: None,
                reason: "no user turn to answer".into(),
                raw: None,
            }),
        }
    }
    a.rejects.check(&rejects, rows.len(), read.rows_read)?;
    let prompts = Prompts {
        rows,
        rejects,
        read: read.rows_read,
    };
    match a.teacher.strip_prefix("openai:") {
        Some(url) => {
            let client = OpenAiClient::new(OpenAiConfig {
                base_url: url.to_string(),
                model: a.model_name.clone(),
                api_key_env: a.api_key_env.clone(),
                timeout_s: a.timeout_s as f64,
                concurrency: a.concurrency.max(1),
                temperature: a.temperature,
                max_tokens: a.max_new_tokens,
                ..Default::default()
            })?;
            write_answers(&a, prompts, &client)
        }
        None => {
            let device = a.device.clone();
            dispatch(&device, LocalRun { args: a, prompts })
        }
    }
}

struct LocalRun {
    args: Args,
    prompts: Prompts,
}

impl OnDevice for LocalRun {
    type Output = ();

    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let dir = PathBuf::from(&self.args.teacher);
        let loaded = crate::local::load::<B>(&dir, &device)
            .with_context(|| format!("loading the teacher {}", dir.display()))?;
        let teacher = LocalChat::new(
            loaded,
            self.args.max_new_tokens,
            self.args.temperature,
            1.0,
            self.args.seed,
        )?;
        write_answers(&self.args, self.prompts, &teacher)
    }
}

/// Answer every prompt (`concurrency` at a time) and write the rows atomically when all
/// are done; the first request that fails for good stops the run with its row named.
fn write_answers(a: &Args, prompts: Prompts, teacher: &dyn ChatBackend) -> Result<()> {
    let Prompts {
        rows,
        mut rejects,
        read,
    } = prompts;
    let bar = ProgressBar::new(rows.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} prompts [{elapsed} < {eta}]")
            .expect("valid template"),
    );
    bar.set_message("distilling");
    let mut out = String::new();
    let mut answered = 0usize;
    for chunk in rows.chunks(teacher.concurrency().max(1)) {
        let answers: Vec<Result<String>> = std::thread::scope(|s| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|(row, prompt)| {
                    s.spawn(move || {
                        let req = ChatRequest {
                            messages: prompt.to_messages(),
                            temperature: Some(a.temperature),
                            max_tokens: Some(a.max_new_tokens),
                        };
                        teacher.complete(&req).map_err(|e| {
                            anyhow::anyhow!(
                                "{}: the teacher {} failed: {e}",
                                row.origin,
                                teacher.describe()
                            )
                        })
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("teacher thread"))
                .collect()
        });
        for ((row, prompt), answer) in chunk.iter().zip(answers) {
            let answer = answer?.trim().to_string();
            if answer.is_empty() {
                // Kept out of the SFT data, but reported: nothing is dropped silently.
                rejects.push(Reject {
                    origin: row.origin.clone(),
                    field: None,
                    reason: "the teacher's answer is empty".into(),
                    raw: None,
                });
                continue;
            }
            answered += 1;
            let mut conv = prompt.clone();
            conv.messages.push(Message::new(ASSISTANT, &answer));
            let (mut v, _) =
                convert_record(&Record::Conversation(conv), Target::BedrockConversation)?;
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
    a.rejects.check(&rejects, answered, read)?;
    write_atomic(&a.out, out.as_bytes())?;
    eprintln!(
        "{answered} prompts answered by {} -> {}",
        a.teacher,
        a.out.display(),
    );
    a.rejects.finish(&rejects, Some(&a.out), read)
}
