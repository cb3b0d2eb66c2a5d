//! Tasks that generate answers: exact match against reference answers (GSM8K: the number
//! after `####`, extracted as GRPO's accuracy reward does), and the mean reward-model score
//! of the answers.

use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use serde_json::{json, Map, Value};
use std::path::Path;

use crate::reward::{score_pairs, sequence_pair};
use crate::rl::rewards::accuracy;
use checkpoints::export::load_reward_model;
use datasets::read::read_file;
use datasets::records::{Record, Reject, Row};
use datasets::rejects::RejectLog;
use datasets::tokenize::{MaskPolicy, Templater, TokenizedPair, Truncation};
use models::checkpoint::load_tokenizer;
use models::generate::{generate, SamplingParams};
use models::Message;

use super::{bar, limited, mean_ci, wilson, Ctx, Outcome};

/// A prompt to answer and, when the row has one, its reference answer.
pub struct Prompted {
    pub line: usize,
    pub messages: Vec<Message>,
    pub answer: Option<String>,
}

fn reject(row: &Row, reason: &str) -> Reject {
    Reject {
        origin: row.origin.clone(),
        field: None,
        reason: reason.into(),
        raw: None,
    }
}

/// The prompts of a file in any format the pipeline reads: prompt/answer tasks, preference
/// pairs (their prompt) and conversations (up to the last assistant turn, which becomes the
/// reference answer).
pub fn read_prompts(
    file: &Path,
    need_answer: bool,
    limit: Option<usize>,
) -> Result<(Vec<Prompted>, RejectLog, usize)> {
    let read = read_file(file, None)?;
    let mut rejects = RejectLog::default();
    rejects.extend(read.rejects);
    let mut out = Vec::new();
    for row in &read.rows {
        let tools = match &row.record {
            Record::PromptTask(t) => &t.prompt.tools,
            Record::Preference(p) => &p.prompt.tools,
            Record::Unpaired(u) => &u.prompt.tools,
            Record::Conversation(c) => &c.tools,
        };
        if !tools.is_empty() {
            // Answers are generated from prompts rendered without `tools=` and compared as
            // text: a tool-use row would be asked and scored as something else.
            rejects.push(reject(
                row,
                "the row uses tools; evaluation does not pass tool definitions to the model or \
                 compare tool calls yet",
            ));
            continue;
        }
        let (messages, answer) = match &row.record {
            Record::PromptTask(t) => (t.prompt.to_messages(), t.answer.clone()),
            Record::Preference(p) => (p.prompt.to_messages(), None),
            Record::Unpaired(u) => (u.prompt.to_messages(), None),
            Record::Conversation(c) => {
                let mut messages = c.to_messages();
                match messages.last() {
                    Some(m) if m.role == "assistant" => {
                        let last = messages.pop().map(|m| m.content);
                        (messages, last)
                    }
                    _ => (messages, None),
                }
            }
        };
        if messages.last().is_none_or(|m| m.role != "user") {
            rejects.push(reject(row, "no user turn to answer"));
        } else if need_answer && answer.is_none() {
            rejects.push(reject(row, "no reference answer to compare with"));
        } else {
            out.push(Prompted {
                line: row.origin.line,
                messages,
                answer,
            });
        }
    }
    Ok((limited(out, limit), rejects, read.rows_read))
}

/// `--fewshot` rows as earlier user/assistant turns.
fn fewshot_turns(ctx: &Ctx<'_, impl Backend>) -> Result<Vec<Message>> {
    let Some(file) = &ctx.settings.fewshot else {
        return Ok(vec![]);
    };
    let (shots, _, _) = read_prompts(file, true, ctx.settings.num_fewshot)
        .with_context(|| format!("--fewshot {}", file.display()))?;
    let mut turns = Vec::new();
    for s in shots {
        turns.extend(s.messages.into_iter().filter(|m| m.role != "system"));
        turns.push(Message::new(
            "assistant",
            s.answer.as_deref().unwrap_or_default(),
        ));
    }
    Ok(turns)
}

/// Put the few-shot turns after a leading system message, before the question.
fn with_shots(messages: &[Message], shots: &[Message]) -> Vec<Message> {
    let split = usize::from(messages.first().is_some_and(|m| m.role == "system"));
    [&messages[..split], shots, &messages[split..]].concat()
}

/// One generated answer.
pub struct Answer {
    pub text: String,
    pub new_tokens: usize,
}

/// Answers to `prompts` (chat messages) from `model`, in batches, with a progress bar.
pub fn answers<B: Backend>(
    ctx: &Ctx<'_, B>,
    model: &models::CausalLm<B>,
    prompts: &[Vec<Message>],
    what: &str,
) -> Result<Vec<Answer>> {
    let a = ctx.settings;
    let ids = prompts
        .iter()
        .map(|m| {
            let text = ctx.template.render(m, true, &ctx.tok.template_tokens())?;
            ctx.tok.encode(&text, false)
        })
        .collect::<Result<Vec<_>>>()?;
    let params = SamplingParams {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_k: 0,
        top_p: a.top_p,
        seed: a.seed,
        stop_ids: ctx.stop_ids.clone(),
        pad_id: ctx.pad,
        shape_multiple: ctx.shape_multiple,
    };
    let pb = bar(ids.len(), what, a.quiet);
    let mut out = Vec::with_capacity(ids.len());
    for (i, chunk) in ids.chunks(a.batch_size.max(1)).enumerate() {
        // A different stream per batch, the same for a given --seed and batch size.
        let params = SamplingParams {
            seed: params.seed.wrapping_add(i as u64),
            ..params.clone()
        };
        for g in generate(model, chunk, &params, None)? {
            out.push(Answer {
                text: ctx.tok.decode(&g.tokens, true)?,
                new_tokens: g.tokens.len(),
            });
        }
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    Ok(out)
}

fn last_user(messages: &[Message]) -> &str {
    messages.last().map_or("", |m| m.content.as_str())
}

/// `gsm8k:FILE`: the share of answers whose final number equals the reference's.
pub fn exact_match<B: Backend>(ctx: &Ctx<'_, B>, file: &Path) -> Result<Outcome> {
    let (prompts, rejects, read) = read_prompts(file, true, ctx.settings.limit)?;
    let shots = fewshot_turns(ctx)?;
    let messages: Vec<Vec<Message>> = prompts
        .iter()
        .map(|p| with_shots(&p.messages, &shots))
        .collect();
    let got = answers(ctx, ctx.model, &messages, "gsm8k")?;
    let mut rows = Vec::with_capacity(got.len());
    let mut hits = 0.0;
    let mut new_tokens = 0;
    for (p, ans) in prompts.iter().zip(&got) {
        let correct = accuracy(&ans.text, p.answer.as_deref()) == 1.0;
        hits += f64::from(u8::from(correct));
        new_tokens += ans.new_tokens;
        rows.push(json!({
            "line": p.line,
            "prompt": last_user(&p.messages),
            "completion": ans.text,
            "reference": p.answer,
            "correct": correct,
        }));
    }
    let n = rows.len();
    let mut metrics = Map::new();
    metrics.insert("exact_match".into(), json!(hits / n.max(1) as f64));
    metrics.insert("exact_match_ci95".into(), json!(wilson(hits, n)));
    metrics.insert("num_fewshot".into(), json!(shots.len() / 2));
    metrics.insert(
        "mean_new_tokens".into(),
        json!(new_tokens as f64 / n.max(1) as f64),
    );
    Ok(Outcome {
        metrics,
        rows,
        rejects,
        read,
    })
}

/// `reward:FILE`: the mean score the reward model gives the model's answers.
pub fn reward<B: Backend>(ctx: &Ctx<'_, B>, file: &Path) -> Result<Outcome> {
    let rm_path = ctx
        .settings
        .reward_model
        .as_ref()
        .context("the reward task needs --reward-model")?;
    let (prompts, rejects, read) = read_prompts(file, false, ctx.settings.limit)?;
    let messages: Vec<Vec<Message>> = prompts.iter().map(|p| p.messages.clone()).collect();
    let got = answers(ctx, ctx.model, &messages, "reward")?;
    let (rm_cfg, rm, rm_dir) = load_reward_model::<B>(rm_path, &ctx.device)?;
    let rm_tok = load_tokenizer(&rm_dir, &rm_cfg)?;
    let templater = Templater {
        tokenizer: &rm_tok,
        template: rm_tok.template(None)?,
        tokens: rm_tok.template_tokens(),
        mask: MaskPolicy::All,
        max_seq_len: rm_cfg.max_position_embeddings,
        truncation: Truncation::Left,
    };
    let pad = datasets::batch::Padding {
        id: rm_cfg.pad_token_id.or(rm_tok.pad_id).unwrap_or(0),
        multiple_of: ctx.shape_multiple,
    };
    let seqs = prompts
        .iter()
        .zip(&got)
        .map(|(p, a)| {
            let mut conv = datasets::records::Conversation {
                system: None,
                messages: p.messages.clone(),
                tools: Vec::new(),
            };
            conv.messages.push(Message::new("assistant", &a.text));
            let (seq, _) = templater
                .conversation(&conv)
                .map_err(|e| anyhow::anyhow!("{}:{}: {e}", file.display(), p.line))?;
            Ok(sequence_pair(seq.ids))
        })
        .collect::<Result<Vec<_>>>()?;
    let pb = bar(seqs.len(), "scoring", ctx.settings.quiet);
    let pairs: Vec<&TokenizedPair> = seqs.iter().collect();
    let batch_size = ctx.settings.batch_size;
    let (rewards, _) = score_pairs(&rm, &pairs, pad, batch_size, |n| pb.inc(n as u64));
    pb.finish_and_clear();
    let rows: Vec<Value> = prompts
        .iter()
        .zip(&got)
        .zip(&rewards)
        .map(|((p, a), r)| {
            json!({"line": p.line, "prompt": last_user(&p.messages), "completion": a.text, "reward": r})
        })
        .collect();
    let (mean, ci) = mean_ci(&rewards);
    let mut metrics = Map::new();
    metrics.insert("reward_mean".into(), json!(mean));
    metrics.insert("reward_ci95".into(), json!(ci));
    Ok(Outcome {
        metrics,
        rows,
        rejects,
        read,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_use_rows_are_rejected_rather_than_scored_as_text() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.jsonl");
        let tools = json!([{"type": "function", "function": {"name": "get_weather"}}]);
        let rows = [
            json!({"messages": [{"role": "user", "content": "Weather in Oslo?"},
                                {"role": "assistant", "content": null, "tool_calls": [
                                    {"id": "c", "type": "function", "function": {
                                        "name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]}],
                   "tools": tools}),
            json!({"messages": [{"role": "user", "content": "2+2?"},
                                {"role": "assistant", "content": "4"}]}),
        ];
        let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
        std::fs::write(&file, text).unwrap();
        let (prompts, rejects, read) = read_prompts(&file, true, None).unwrap();
        assert_eq!(read, 2);
        assert_eq!(prompts.len(), 1);
        assert_eq!(prompts[0].answer.as_deref(), Some("4"));
        let reasons: Vec<&str> = rejects.by_reason().into_keys().collect();
        assert_eq!(rejects.len(), 1, "{reasons:?}");
        assert!(reasons[0].contains("the row uses tools"), "{reasons:?}");
    }
}
