//! `choice:FILE`: multiple choice by log-likelihood, as lm-evaluation-harness scores it:
//! each choice is a continuation (" " + choice) of the question, the model picks the one
//! with the highest summed log-probability (`acc`) or the highest per character
//! (`acc_norm`, which does not favour short choices).

use anyhow::Result;
use burn::tensor::backend::Backend;
use serde_json::{json, Map, Value};
use std::path::Path;

use datasets::read::read_raw;
use datasets::records::{Origin, Reject};
use datasets::rejects::RejectLog;
use models::scoring::score_completions;

use super::{bar, limited, wilson, Ctx, Outcome};
use models::scoring::split_prompt_completion;

struct Question {
    line: usize,
    question: String,
    choices: Vec<String>,
    answer: usize,
}

/// The answer as an index, a letter (`"B"`) or the text of a choice.
fn answer_index(v: &Value, choices: &[String]) -> Result<usize, String> {
    let n = choices.len();
    let idx = match v {
        Value::Number(x) => x.as_u64().map(|i| i as usize),
        Value::String(s) => {
            let t = s.trim();
            let letter = (t.len() == 1)
                .then(|| t.chars().next())
                .flatten()
                .filter(char::is_ascii_uppercase)
                .map(|c| (c as u8 - b'A') as usize);
            letter.or_else(|| choices.iter().position(|c| c.trim() == t))
        }
        _ => None,
    };
    match idx {
        Some(i) if i < n => Ok(i),
        _ => Err(format!(
            "expected the index (0..{n}), letter or text of one of the {n} choices, got {v}"
        )),
    }
}

fn parse(v: &Value) -> Result<(String, Vec<String>, usize), (String, String)> {
    let field = |f: &str, why: String| (f.to_string(), why);
    let question = v
        .get("question")
        .and_then(Value::as_str)
        .ok_or_else(|| field("question", "expected a string".into()))?;
    let choices: Vec<String> = v
        .get("choices")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().map(|c| c.as_str().map(str::to_string)).collect())
        .ok_or_else(|| field("choices", "expected a list of strings".into()))?;
    if choices.len() < 2 {
        return Err(field("choices", "expected at least two choices".into()));
    }
    let answer = v
        .get("answer")
        .ok_or_else(|| field("answer", "missing".into()))
        .and_then(|a| answer_index(a, &choices).map_err(|e| field("answer", e)))?;
    Ok((question.to_string(), choices, answer))
}

pub fn run<B: Backend>(ctx: &Ctx<'_, B>, file: &Path) -> Result<Outcome> {
    let raw = read_raw(file)?;
    let read = raw.rows.len() + raw.rejects.len();
    let mut rejects = RejectLog::default();
    rejects.extend(raw.rejects);
    let mut questions = Vec::new();
    for row in raw.rows {
        match parse(&row.value) {
            Ok((question, choices, answer)) => questions.push(Question {
                line: row.line,
                question,
                choices,
                answer,
            }),
            Err((field, reason)) => rejects.push(Reject {
                origin: Origin {
                    file: file.to_path_buf(),
                    line: row.line,
                },
                field: Some(field),
                reason,
                raw: Some(row.value.to_string().chars().take(300).collect()),
            }),
        }
    }
    let questions = limited(questions, ctx.settings.limit);
    let pairs = questions
        .iter()
        .flat_map(|q| q.choices.iter().map(move |c| (q.question.as_str(), c)))
        .map(|(q, c)| split_prompt_completion(ctx.tok, q, &format!(" {c}")))
        .collect::<Result<Vec<_>>>()?;
    let pb = bar(questions.len(), "choice", ctx.settings.quiet);
    let mut scores = Vec::with_capacity(pairs.len());
    // Whole questions per batch, so the bar counts questions.
    let per_batch = ctx.settings.batch_size.max(1);
    let mut at = 0;
    for q in questions.chunks(per_batch) {
        let n: usize = q.iter().map(|q| q.choices.len()).sum();
        scores.extend(score_completions(
            ctx.model,
            &pairs[at..at + n],
            n,
            ctx.pad,
            ctx.shape_multiple,
        ));
        at += n;
        pb.inc(q.len() as u64);
    }
    pb.finish_and_clear();
    let (mut acc, mut acc_norm) = (0.0, 0.0);
    let mut rows = Vec::with_capacity(questions.len());
    let mut at = 0;
    for q in &questions {
        let s = &scores[at..at + q.choices.len()];
        at += q.choices.len();
        let argmax = |f: &dyn Fn(usize) -> f64| {
            (0..s.len())
                .max_by(|&a, &b| f(a).total_cmp(&f(b)))
                .unwrap_or(0)
        };
        let pick = argmax(&|i| s[i].logprob);
        let pick_norm = argmax(&|i| s[i].logprob / (q.choices[i].chars().count() + 1) as f64);
        acc += f64::from(u8::from(pick == q.answer));
        acc_norm += f64::from(u8::from(pick_norm == q.answer));
        rows.push(json!({
            "line": q.line,
            "question": q.question,
            "answer": q.answer,
            "pick": pick,
            "pick_norm": pick_norm,
            "logprobs": s.iter().map(|x| x.logprob).collect::<Vec<_>>(),
        }));
    }
    let n = rows.len();
    let mut metrics = Map::new();
    metrics.insert("acc".into(), json!(acc / n.max(1) as f64));
    metrics.insert("acc_ci95".into(), json!(wilson(acc, n)));
    metrics.insert("acc_norm".into(), json!(acc_norm / n.max(1) as f64));
    metrics.insert("acc_norm_ci95".into(), json!(wilson(acc_norm, n)));
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
    fn answers_are_indices_letters_or_texts() {
        let c = vec!["red".to_string(), "blue".to_string(), "green".to_string()];
        assert_eq!(answer_index(&json!(2), &c), Ok(2));
        assert_eq!(answer_index(&json!("B"), &c), Ok(1));
        assert_eq!(answer_index(&json!("green"), &c), Ok(2));
        assert!(answer_index(&json!(3), &c).is_err());
        assert!(answer_index(&json!("D"), &c).is_err());
    }
}
