//! `loss:FILE`: held-out loss and perplexity on any file the data pipeline reads, tokenized
//! and masked as training masks it (`--mask`, default the assistant turns): the token-weighted
//! mean negative log-likelihood of the trained tokens, and its exponential.

use anyhow::Result;
use burn::tensor::backend::Backend;
use serde_json::{json, Map};
use std::path::Path;

use datasets::read::read_file;
use datasets::records::Reject;
use datasets::rejects::RejectLog;
use datasets::tokenize::{MaskPolicy, Templater, Tokenized, Truncation};
use models::scoring::score_masked;

use super::{bar, limited, mean_ci, Ctx, Outcome};

pub fn run<B: Backend>(ctx: &Ctx<'_, B>, file: &Path) -> Result<Outcome> {
    let read = read_file(file, None)?;
    let mut rejects = RejectLog::default();
    rejects.extend(read.rejects);
    let templater = Templater {
        tokenizer: ctx.tok,
        template: ctx.tok.template(Some(&ctx.settings.template))?,
        tokens: ctx.tok.template_tokens(),
        mask: MaskPolicy::parse(&ctx.settings.mask)?,
        max_seq_len: ctx.cfg.max_position_embeddings,
        truncation: Truncation::Left,
    };
    let mut seqs = Vec::new();
    for row in &read.rows {
        // A prompt/answer row is scored on its answer, a preference pair on its chosen side.
        let record = match &row.record {
            datasets::records::Record::PromptTask(t) => t.as_conversation(),
            datasets::records::Record::Preference(p) => {
                let mut c = p.prompt.clone();
                c.messages.extend(p.chosen.iter().cloned());
                Some(c)
            }
            datasets::records::Record::Conversation(c) => Some(c.clone()),
            // A desirable unpaired row is scored on its completion; an undesirable one is
            // not an answer to score.
            datasets::records::Record::Unpaired(u) if u.label => {
                let mut c = u.prompt.clone();
                c.messages.extend(u.completion.iter().cloned());
                Some(c)
            }
            datasets::records::Record::Unpaired(_) => None,
        };
        let result = match record {
            Some(c) => templater
                .tokenize(&datasets::records::Record::Conversation(c))
                .map_err(|e| e.to_string()),
            None => Err(
                "the row has no answer to score (a prompt without an answer, or an undesirable completion)"
                    .to_string(),
            ),
        };
        match result {
            Ok((Tokenized::Seq(s), _)) => seqs.push((row.origin.line, s)),
            Ok(_) => unreachable!("a conversation tokenizes to a sequence"),
            Err(reason) => rejects.push(Reject {
                origin: row.origin.clone(),
                field: None,
                reason,
                raw: None,
            }),
        }
    }
    let seqs = limited(seqs, ctx.settings.limit);
    let masked: Vec<(Vec<u32>, Vec<bool>)> = seqs
        .iter()
        .map(|(_, s)| (s.ids.clone(), s.trained.clone()))
        .collect();
    let pb = bar(masked.len(), "loss", ctx.settings.quiet);
    let mut scores = Vec::with_capacity(masked.len());
    let per_batch = ctx.settings.batch_size.max(1);
    for chunk in masked.chunks(per_batch) {
        scores.extend(score_masked(
            ctx.model,
            chunk,
            per_batch,
            ctx.pad,
            ctx.shape_multiple,
        ));
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    let (mut nll, mut tokens) = (0.0, 0usize);
    let mut per_row = Vec::with_capacity(scores.len());
    let rows = seqs
        .iter()
        .zip(&scores)
        .map(|((line, _), s)| {
            nll -= s.logprob;
            tokens += s.num_tokens;
            let loss = -s.logprob / s.num_tokens.max(1) as f64;
            per_row.push(loss);
            json!({"line": line, "loss": loss, "num_tokens": s.num_tokens})
        })
        .collect::<Vec<_>>();
    let loss = nll / tokens.max(1) as f64;
    let (_, row_ci) = mean_ci(&per_row);
    let mut metrics = Map::new();
    metrics.insert("loss".into(), json!(loss));
    metrics.insert("perplexity".into(), json!(loss.exp()));
    metrics.insert("tokens".into(), json!(tokens));
    metrics.insert("row_loss_ci95".into(), json!(row_ci));
    Ok(Outcome {
        metrics,
        rows,
        rejects,
        read: read.rows_read,
    })
}
