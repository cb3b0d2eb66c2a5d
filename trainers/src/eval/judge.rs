//! `judge:FILE`: the win rate of the model against `--against`, judged pairwise by an LLM over
//! an OpenAI-compatible endpoint with MT-Bench's pairwise prompt. Every prompt is judged in
//! both orders, so a judge that prefers the first (or second) answer cancels out; how often
//! the two orders agree is reported as `position_consistency`.

use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use serde_json::{json, Map};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use checkpoints::export::load_causal_lm;
use datasets::evolve::{ChatBackend, ChatRequest, OpenAiClient, OpenAiConfig};
use models::checkpoint::load_tokenizer;
use models::Message;

use super::generative::{answers, read_prompts};
use super::{bar, mean_ci, Ctx, Outcome};

const SYSTEM: &str = "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to the user question displayed below. You should choose the assistant that follows the user's instructions and answers the user's question better. Your evaluation should consider factors such as the helpfulness, relevance, accuracy, depth, creativity, and level of detail of their responses. Begin your evaluation by comparing the two responses and provide a short explanation. Avoid any position biases and ensure that the order in which the responses were presented does not influence your decision. Do not allow the length of the responses to influence your evaluation. Do not favor certain names of the assistants. Be as objective as possible. After providing your explanation, output your final verdict by strictly following this format: \"[[A]]\" if assistant A is better, \"[[B]]\" if assistant B is better, and \"[[C]]\" for a tie.";

fn judge_prompt(question: &str, a: &str, b: &str) -> String {
    format!(
        "[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{a}\n[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\n{b}\n[The End of Assistant B's Answer]"
    )
}

/// The judge's last verdict: Some(0) first answer, Some(1) second, Some(2) tie.
fn verdict(reply: &str) -> Option<usize> {
    ["[[A]]", "[[B]]", "[[C]]"]
        .iter()
        .enumerate()
        .filter_map(|(i, tag)| reply.rfind(tag).map(|at| (at, i)))
        .max()
        .map(|(_, i)| i)
}

/// The evaluated model's score in one judgment: 1 win, 0.5 tie, 0 loss.
fn score(v: usize, model_first: bool) -> f64 {
    match (v, model_first) {
        (2, _) => 0.5,
        (0, true) | (1, false) => 1.0,
        _ => 0.0,
    }
}

pub fn run<B: Backend>(ctx: &Ctx<'_, B>, file: &Path) -> Result<Outcome> {
    let a = ctx.settings;
    let (prompts, rejects, read) = read_prompts(file, false, a.limit)?;
    let messages: Vec<Vec<Message>> = prompts.iter().map(|p| p.messages.clone()).collect();
    let ours = answers(ctx, ctx.model, &messages, "model")?;
    let against = a
        .against
        .as_ref()
        .context("the judge task needs --against")?;
    let (other_cfg, other, other_dir) = load_causal_lm::<B>(against, None, &ctx.device)?;
    let other_tok = load_tokenizer(&other_dir, &other_cfg)?;
    let other_template = other_tok.template(Some(&a.template))?;
    let other_ctx = Ctx::new(
        &other,
        &other_cfg,
        &other_tok,
        &other_template,
        a,
        ctx.shape_multiple,
    );
    let theirs = answers(&other_ctx, &other, &messages, "against")?;
    let client = OpenAiClient::new(OpenAiConfig {
        base_url: a.judge_url.clone().context("--judge-url")?,
        model: a.judge_model.clone().context("--judge-model")?,
        api_key_env: a.judge_api_key_env.clone(),
        ..Default::default()
    })?;
    // Judgment 2i asks with the model's answer first, 2i + 1 with it second.
    let jobs = prompts.len() * 2;
    let replies: Mutex<Vec<Option<String>>> = Mutex::new(vec![None; jobs]);
    let next = AtomicUsize::new(0);
    let pb = bar(jobs, "judge", a.quiet);
    let failure: Mutex<Option<String>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..a.judge_concurrency.max(1) {
            s.spawn(|| loop {
                let j = next.fetch_add(1, Ordering::SeqCst);
                if j >= jobs || failure.lock().map(|f| f.is_some()).unwrap_or(true) {
                    break;
                }
                let (i, model_first) = (j / 2, j.is_multiple_of(2));
                let (x, y) = match model_first {
                    true => (&ours[i].text, &theirs[i].text),
                    false => (&theirs[i].text, &ours[i].text),
                };
                let question = prompts[i]
                    .messages
                    .last()
                    .map_or("", |m| m.content.as_str());
                let req = ChatRequest {
                    messages: vec![
                        Message::new("system", SYSTEM),
                        Message::new("user", &judge_prompt(question, x, y)),
                    ],
                    temperature: Some(0.0),
                    max_tokens: Some(1024),
                };
                match client.complete(&req) {
                    Ok(reply) => {
                        if let Ok(mut r) = replies.lock() {
                            r[j] = Some(reply);
                        }
                    }
                    Err(e) => {
                        if let Ok(mut f) = failure.lock() {
                            f.get_or_insert(format!(
                                "judge request for prompt {} failed: {e}",
                                prompts[i].line
                            ));
                        }
                    }
                }
                pb.inc(1);
            });
        }
    });
    pb.finish_and_clear();
    if let Some(e) = failure.into_inner().ok().flatten() {
        anyhow::bail!("{e}");
    }
    let replies = replies.into_inner().unwrap_or_default();
    let (mut wins, mut ties, mut losses, mut invalid, mut consistent, mut both_valid) =
        (0, 0, 0, 0, 0, 0);
    let mut per_prompt = Vec::new();
    let mut rows = Vec::with_capacity(prompts.len());
    for (i, p) in prompts.iter().enumerate() {
        let v: Vec<Option<usize>> = (0..2)
            .map(|k| replies[2 * i + k].as_deref().and_then(verdict))
            .collect();
        let scores: Vec<f64> = v
            .iter()
            .zip([true, false])
            .filter_map(|(v, first)| v.map(|v| score(v, first)))
            .collect();
        for &s in &scores {
            if s > 0.75 {
                wins += 1;
            } else if s > 0.25 {
                ties += 1;
            } else {
                losses += 1;
            }
        }
        invalid += 2 - scores.len();
        if scores.len() == 2 {
            both_valid += 1;
            consistent += usize::from(scores[0] == scores[1]);
        }
        if !scores.is_empty() {
            per_prompt.push(scores.iter().sum::<f64>() / scores.len() as f64);
        }
        rows.push(json!({
            "line": p.line,
            "prompt": p.messages.last().map(|m| m.content.clone()),
            "model_answer": ours[i].text,
            "against_answer": theirs[i].text,
            "verdict_model_first": v[0].map(|x| ["A", "B", "tie"][x]),
            "verdict_model_second": v[1].map(|x| ["A", "B", "tie"][x]),
            "judge_model_first": replies[2 * i],
            "judge_model_second": replies[2 * i + 1],
        }));
    }
    let (win_rate, ci) = mean_ci(&per_prompt);
    let mut metrics = Map::new();
    metrics.insert("win_rate".into(), json!(win_rate));
    metrics.insert("win_rate_ci95".into(), json!(ci));
    metrics.insert("wins".into(), json!(wins));
    metrics.insert("ties".into(), json!(ties));
    metrics.insert("losses".into(), json!(losses));
    metrics.insert("invalid_verdicts".into(), json!(invalid));
    metrics.insert(
        "position_consistency".into(),
        json!(consistent as f64 / both_valid.max(1) as f64),
    );
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
    fn the_last_verdict_counts_and_orders_are_undone() {
        assert_eq!(verdict("A is fine but [[B]]"), Some(1));
        assert_eq!(verdict("[[A]] no wait [[C]]"), Some(2));
        assert_eq!(verdict("no idea"), None);
        assert_eq!(score(0, true), 1.0);
        assert_eq!(score(0, false), 0.0);
        assert_eq!(score(1, false), 1.0);
        assert_eq!(score(2, false), 0.5);
    }
}
