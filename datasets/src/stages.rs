//! The dedup and evolve stages of `data prepare`, over canonical rows.

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::sync::atomic::AtomicBool;

use crate::dedup::StaticEmbedder;
use crate::dedup::{dedup, write_clusters, DedupConfig, DedupReport, Embedder, Fields, Method};
use crate::evolve::run::BackendKind;
use crate::evolve::{
    evolve, seeds_from_rows, ChatBackend, EvolveConfig, EvolveReport, OpenAiClient,
};
use crate::read::read_raw;
use crate::records::{Conversation, Message, Origin, Record, Row, ASSISTANT, USER};

/// The text a canonical row is compared on: `fields` are dot paths into its JSON form
/// (`{"kind": "conversation", "system": .., "messages": [{"role", "content"}]}`, preference
/// `prompt`/`chosen`/`rejected`, prompt task `prompt`/`answer`), e.g. `messages.0.content`.
pub fn row_text(row: &Row, fields: &Fields) -> Result<String> {
    let mut value = serde_json::to_value(&row.record)?;
    if let Some(obj) = value.as_object_mut() {
        // The record's kind tag is the same for every row of a run: not content.
        obj.remove("kind");
    }
    fields.extract(&value).map_err(|e| {
        anyhow::anyhow!(
            "{}: [data.dedup] {e} in this {} row (fields are dot paths into the canonical record, e.g. messages.0.content)",
            row.origin,
            row.record.kind()
        )
    })
}

/// Loads the static embedder named by the config when semantic dedup needs one and the
/// caller gave none.
pub fn config_embedder(cfg: &DedupConfig) -> Result<Option<StaticEmbedder>> {
    if !cfg.methods.contains(&Method::Semantic) {
        return Ok(None);
    }
    match &cfg.semantic.embedder {
        Some(dir) => Ok(Some(StaticEmbedder::load(dir)?)),
        None => Ok(None),
    }
}

pub fn dedup_rows(
    rows: Vec<Row>,
    cfg: &DedupConfig,
    embedder: Option<&dyn Embedder>,
) -> Result<(Vec<Row>, DedupReport)> {
    let fields = Fields::parse(&cfg.fields);
    let texts: Vec<String> = rows
        .iter()
        .map(|r| row_text(r, &fields))
        .collect::<Result<_>>()?;
    let ids: Vec<String> = rows.iter().map(|r| r.origin.to_string()).collect();
    let owned = match embedder {
        Some(_) => None,
        None => config_embedder(cfg)?,
    };
    let embedder = embedder.or(owned.as_ref().map(|e| e as &dyn Embedder));
    if cfg.methods.contains(&Method::Semantic) && embedder.is_none() {
        bail!(
            "[data.dedup] semantic.model needs a model loaded on a device: run it through `burnish data prepare` (or set semantic.embedder to a static embedding folder)"
        );
    }
    let out = dedup(&ids, &texts, cfg, embedder)?;
    if let Some(path) = &cfg.clusters_file {
        write_clusters(path, &out.clusters)?;
    }
    let kept = rows
        .into_iter()
        .zip(&out.keep)
        .filter_map(|(r, &k)| k.then_some(r))
        .collect();
    Ok((kept, out.report))
}

/// Evolves the rows' instructions into `out` (resuming), then returns the originals (when
/// `keep_original`) followed by every evolved row of these seeds in the file.
pub fn evolve_rows(
    rows: Vec<Row>,
    cfg: &EvolveConfig,
    chat: Option<&dyn ChatBackend>,
    out: &Path,
    stop: Option<&AtomicBool>,
) -> Result<(Vec<Row>, EvolveReport)> {
    if cfg.keep_original
        && rows
            .iter()
            .any(|r| !matches!(r.record, Record::Conversation(_)))
    {
        bail!(
            "[data.evolve] evolved rows are conversations, but the input has {} rows: set keep_original = false to train on the evolved rows only",
            rows.iter().find(|r| !matches!(r.record, Record::Conversation(_))).map(|r| r.record.kind()).unwrap_or("other")
        );
    }
    let (seeds, _) = seeds_from_rows(&rows);
    let owned;
    let backend: &dyn ChatBackend = match (chat, cfg.backend) {
        (Some(b), _) => b,
        (None, BackendKind::Openai) => {
            owned = OpenAiClient::new(cfg.openai.clone())?;
            &owned
        }
        (None, BackendKind::Local) => bail!(
            "[data.evolve] backend = \"local\" needs the model loaded on a device: run it through `burnish data prepare`"
        ),
    };
    let never = AtomicBool::new(false);
    let report = evolve(&seeds, cfg, backend, out, stop.unwrap_or(&never))?;
    let failed: usize = report.failed.values().sum();
    if report.interrupted || failed > 0 {
        bail!(
            "[data.evolve] did not finish ({} step(s) failed: {:?}{}); finished rows are kept in {}, run again to resume",
            failed,
            report.failed,
            if report.interrupted { ", interrupted" } else { "" },
            out.display()
        );
    }
    let roots: std::collections::HashSet<&str> = seeds.iter().map(|s| s.id.as_str()).collect();
    let mut all = if cfg.keep_original {
        rows.clone()
    } else {
        vec![]
    };
    all.extend(read_evolved(out, &roots)?);
    Ok((all, report))
}

/// The evolved rows of an evolve output file whose root is in `roots`.
pub fn read_evolved(out: &Path, roots: &std::collections::HashSet<&str>) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    if std::fs::metadata(out).map_or(true, |m| m.len() == 0) {
        return Ok(rows);
    }
    let read = read_raw(out)?;
    if let Some(r) = read.rejects.first() {
        bail!("{r}");
    }
    for raw in read.rows {
        let v = &raw.value;
        let root = v.get("root_id").and_then(|x| x.as_str()).unwrap_or("");
        if !roots.contains(root) {
            continue;
        }
        let text = |i: usize| {
            v.pointer(&format!("/messages/{i}/content"))
                .and_then(|c| c.as_str())
                .map(String::from)
                .with_context(|| {
                    format!("{}:{}: no messages[{i}].content", out.display(), raw.line)
                })
        };
        rows.push(Row {
            origin: Origin {
                file: out.to_path_buf(),
                line: raw.line,
            },
            record: Record::Conversation(Conversation {
                system: None,
                messages: vec![
                    Message::new(USER, &text(0)?),
                    Message::new(ASSISTANT, &text(1)?),
                ],
                tools: Vec::new(),
            }),
        });
    }
    Ok(rows)
}
