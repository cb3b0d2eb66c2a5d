//! `burnish score --reward-model DIR --data FILE`: a reward per row, read through the data
//! pipeline (any supported format) and templated as the reward model was trained.

use anyhow::Result;
use burn::tensor::backend::Backend;
use std::io::Write;
use std::path::Path;

use checkpoints::export::load_reward_model;
use datasets::formats::Format;
use datasets::read::read_file;
use datasets::records::Reject;
use datasets::rejects::RejectLog;
use datasets::tokenize::{MaskPolicy, Templater, Tokenized, TokenizedPair, Truncation};
use models::checkpoint::load_tokenizer;
use trainers::reward::{score_pairs, sequence_pair};

use crate::score::{output, Args};

pub fn run<B: Backend>(rm: &Path, a: &Args, device: &B::Device) -> Result<()> {
    let (cfg, model, tok_dir) = load_reward_model::<B>(rm, device)?;
    let tok = load_tokenizer(&tok_dir, &cfg)?;
    let pad = datasets::batch::Padding {
        id: cfg.pad_token_id.or(tok.pad_id).unwrap_or(0),
        multiple_of: models::backend::default_pad_multiple::<B>(device),
    };
    let format = a.format.as_deref().map(Format::parse).transpose()?;
    a.rejects.on_error()?;
    let read = read_file(&a.data, format)?;
    let mut rejects = RejectLog::default();
    rejects.extend(read.rejects);
    let templater = Templater {
        tokenizer: &tok,
        template: tok.template(Some(&a.template))?,
        tokens: tok.template_tokens(),
        mask: MaskPolicy::All,
        max_seq_len: cfg.max_position_embeddings,
        truncation: Truncation::Left,
    };
    let mut items: Vec<(usize, bool, TokenizedPair)> = Vec::new();
    for row in &read.rows {
        let line = row.origin.line;
        match templater.tokenize(&row.record) {
            Ok((Tokenized::Pair(p), _)) => items.push((line, true, p)),
            Ok((Tokenized::Seq(s), _)) => items.push((line, false, sequence_pair(s.ids))),
            // An unpaired row is scored as its prompt and completion, whatever its label.
            Ok((Tokenized::Unpaired(u), _)) => items.push((
                line,
                false,
                sequence_pair([u.prompt, u.completion].concat()),
            )),
            Ok((Tokenized::Prompt(_), _)) => rejects.push(Reject {
                origin: row.origin.clone(),
                field: None,
                reason: "a prompt without a completion has nothing to score".into(),
                raw: None,
            }),
            Err(e) => rejects.push(Reject {
                origin: row.origin.clone(),
                field: None,
                reason: e.to_string(),
                raw: None,
            }),
        }
    }
    a.rejects.check(&rejects, items.len(), read.rows_read)?;
    let pairs: Vec<&TokenizedPair> = items.iter().map(|(_, _, p)| p).collect();
    let (c, r) = score_pairs(&model, &pairs, pad, a.batch_size, |_| {});
    let mut out = output(a.out.as_ref())?;
    for (i, (line, pair, _)) in items.iter().enumerate() {
        let v = if *pair {
            serde_json::json!({"line": line, "reward_chosen": c[i], "reward_rejected": r[i]})
        } else {
            serde_json::json!({"line": line, "reward": c[i]})
        };
        writeln!(out, "{v}")?;
    }
    out.finish()?;
    a.rejects
        .finish(&rejects, a.out.as_deref(), read.rows_read)?;
    Ok(())
}
