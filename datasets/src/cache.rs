//! Parquet cache of tokenized data, one directory per fingerprint of everything that
//! determines its contents, written atomically (temp dir + rename).

use anyhow::{bail, Context, Result};
use arrow::array::{
    Array, ArrayRef, AsArray, BooleanBuilder, Float64Array, ListBuilder, RecordBatch,
    StringBuilder, UInt32Builder,
};
use arrow::datatypes::{Float64Type, UInt32Type};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use crate::pack::PackedRow;
use crate::tokenize::{TokenizedPair, TokenizedPrompt, TokenizedUnpaired};

/// Tokenized rows of one split, in the shape training consumes.
#[derive(Debug, Clone, PartialEq)]
pub enum Dataset {
    Sft(Vec<PackedRow>),
    Pairs(Vec<TokenizedPair>),
    Prompts(Vec<TokenizedPrompt>),
    /// Completions labelled desirable or not (KTO).
    Unpaired(Vec<TokenizedUnpaired>),
}

impl Dataset {
    pub fn len(&self) -> usize {
        match self {
            Dataset::Sft(v) => v.len(),
            Dataset::Pairs(v) => v.len(),
            Dataset::Prompts(v) => v.len(),
            Dataset::Unpaired(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// No rows, of the same kind (an empty eval split of a pairs or prompts dataset is still
    /// pairs or prompts).
    pub fn empty_like(&self) -> Dataset {
        match self {
            Dataset::Sft(_) => Dataset::Sft(vec![]),
            Dataset::Pairs(_) => Dataset::Pairs(vec![]),
            Dataset::Prompts(_) => Dataset::Prompts(vec![]),
            Dataset::Unpaired(_) => Dataset::Unpaired(vec![]),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Dataset::Sft(_) => "sft",
            Dataset::Pairs(_) => "pairs",
            Dataset::Prompts(_) => "prompts",
            Dataset::Unpaired(_) => "unpaired",
        }
    }
}

fn u32_lists<'a>(rows: impl Iterator<Item = &'a [u32]>) -> ArrayRef {
    let mut b = ListBuilder::new(UInt32Builder::new());
    for r in rows {
        b.values().append_slice(r);
        b.append(true);
    }
    Arc::new(b.finish())
}

fn bool_lists<'a>(rows: impl Iterator<Item = &'a [bool]>) -> ArrayRef {
    let mut b = ListBuilder::new(BooleanBuilder::new());
    for r in rows {
        for &x in r {
            b.values().append_value(x);
        }
        b.append(true);
    }
    Arc::new(b.finish())
}

fn columns(data: &Dataset) -> Vec<(&'static str, ArrayRef)> {
    match data {
        Dataset::Sft(rows) => vec![
            (
                "input_ids",
                u32_lists(rows.iter().map(|r| r.ids.as_slice())),
            ),
            (
                "trained",
                bool_lists(rows.iter().map(|r| r.trained.as_slice())),
            ),
            (
                "position_ids",
                u32_lists(rows.iter().map(|r| r.positions.as_slice())),
            ),
            (
                "segment_ids",
                u32_lists(rows.iter().map(|r| r.segments.as_slice())),
            ),
        ],
        Dataset::Pairs(rows) => vec![
            (
                "prompt_ids",
                u32_lists(rows.iter().map(|r| r.prompt.as_slice())),
            ),
            (
                "chosen_ids",
                u32_lists(rows.iter().map(|r| r.chosen.as_slice())),
            ),
            (
                "rejected_ids",
                u32_lists(rows.iter().map(|r| r.rejected.as_slice())),
            ),
            (
                "margin",
                Arc::new(Float64Array::from(
                    rows.iter().map(|r| r.margin).collect::<Vec<_>>(),
                )) as ArrayRef,
            ),
        ],
        Dataset::Unpaired(rows) => {
            let mut labels = BooleanBuilder::new();
            for r in rows {
                labels.append_value(r.label);
            }
            vec![
                (
                    "prompt_ids",
                    u32_lists(rows.iter().map(|r| r.prompt.as_slice())),
                ),
                (
                    "completion_ids",
                    u32_lists(rows.iter().map(|r| r.completion.as_slice())),
                ),
                ("label", Arc::new(labels.finish()) as ArrayRef),
            ]
        }
        Dataset::Prompts(rows) => {
            let mut answers = StringBuilder::new();
            for r in rows {
                answers.append_option(r.answer.as_deref());
            }
            vec![
                (
                    "prompt_ids",
                    u32_lists(rows.iter().map(|r| r.prompt.as_slice())),
                ),
                ("answer", Arc::new(answers.finish()) as ArrayRef),
            ]
        }
    }
}

pub fn write_parquet(path: &Path, data: &Dataset) -> Result<()> {
    let batch = RecordBatch::try_from_iter(columns(data)).context("building the Arrow batch")?;
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut w = ArrowWriter::try_new(file, batch.schema(), None)?;
    w.write(&batch)?;
    w.close()?;
    Ok(())
}

fn list_column<'a>(
    batch: &'a RecordBatch,
    name: &str,
    path: &Path,
) -> Result<&'a arrow::array::ListArray> {
    batch
        .column_by_name(name)
        .with_context(|| format!("{}: column `{name}` is missing", path.display()))?
        .as_list_opt::<i32>()
        .with_context(|| format!("{}: column `{name}` is not a list", path.display()))
}

fn read_u32_lists(batch: &RecordBatch, name: &str, path: &Path) -> Result<Vec<Vec<u32>>> {
    let list = list_column(batch, name, path)?;
    (0..list.len())
        .map(|i| {
            let v = list.value(i);
            let p = v.as_primitive_opt::<UInt32Type>().with_context(|| {
                format!("{}: column `{name}` does not hold u32 ids", path.display())
            })?;
            Ok(p.values().to_vec())
        })
        .collect()
}

fn read_bool_lists(batch: &RecordBatch, name: &str, path: &Path) -> Result<Vec<Vec<bool>>> {
    let list = list_column(batch, name, path)?;
    (0..list.len())
        .map(|i| {
            let v = list.value(i);
            let b = v.as_boolean_opt().with_context(|| {
                format!("{}: column `{name}` does not hold booleans", path.display())
            })?;
            Ok((0..b.len()).map(|j| b.value(j)).collect())
        })
        .collect()
}

pub fn read_parquet(path: &Path, kind: &str) -> Result<Dataset> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{} is not a valid Parquet file", path.display()))?
        .build()?;
    let mut data = match kind {
        "sft" => Dataset::Sft(vec![]),
        "pairs" => Dataset::Pairs(vec![]),
        "prompts" => Dataset::Prompts(vec![]),
        "unpaired" => Dataset::Unpaired(vec![]),
        other => bail!("unknown cached dataset kind `{other}`"),
    };
    for batch in reader {
        let batch = batch.with_context(|| format!("reading {}", path.display()))?;
        match &mut data {
            Dataset::Sft(rows) => {
                let ids = read_u32_lists(&batch, "input_ids", path)?;
                let trained = read_bool_lists(&batch, "trained", path)?;
                let pos = read_u32_lists(&batch, "position_ids", path)?;
                let seg = read_u32_lists(&batch, "segment_ids", path)?;
                for (((ids, trained), positions), segments) in
                    ids.into_iter().zip(trained).zip(pos).zip(seg)
                {
                    rows.push(PackedRow {
                        ids,
                        trained,
                        positions,
                        segments,
                    });
                }
            }
            Dataset::Pairs(rows) => {
                let p = read_u32_lists(&batch, "prompt_ids", path)?;
                let c = read_u32_lists(&batch, "chosen_ids", path)?;
                let r = read_u32_lists(&batch, "rejected_ids", path)?;
                // Caches written before margins were kept have no column: no margins.
                let m = batch
                    .column_by_name("margin")
                    .and_then(|c| c.as_primitive_opt::<Float64Type>().cloned());
                for (i, ((prompt, chosen), rejected)) in p.into_iter().zip(c).zip(r).enumerate() {
                    rows.push(TokenizedPair {
                        prompt,
                        chosen,
                        rejected,
                        margin: m.as_ref().and_then(|m| (!m.is_null(i)).then(|| m.value(i))),
                    });
                }
            }
            Dataset::Unpaired(rows) => {
                let p = read_u32_lists(&batch, "prompt_ids", path)?;
                let c = read_u32_lists(&batch, "completion_ids", path)?;
                let l = batch
                    .column_by_name("label")
                    .and_then(|c| c.as_boolean_opt().cloned())
                    .with_context(|| format!("{}: column `label` is missing", path.display()))?;
                for (i, (prompt, completion)) in p.into_iter().zip(c).enumerate() {
                    rows.push(TokenizedUnpaired {
                        prompt,
                        completion,
                        label: l.value(i),
                    });
                }
            }
            Dataset::Prompts(rows) => {
                let p = read_u32_lists(&batch, "prompt_ids", path)?;
                let a = batch
                    .column_by_name("answer")
                    .and_then(|c| c.as_string_opt::<i32>().cloned())
                    .with_context(|| format!("{}: column `answer` is missing", path.display()))?;
                for (i, prompt) in p.into_iter().enumerate() {
                    let answer = (!a.is_null(i)).then(|| a.value(i).to_string());
                    rows.push(TokenizedPrompt { prompt, answer });
                }
            }
        }
    }
    Ok(data)
}

/// Fingerprint of everything that shapes the cached data.
#[derive(Default)]
pub struct Fingerprint(blake3::Hasher);

/// Bumped whenever the cache layout or the tokenization logic changes.
const CACHE_VERSION: &str = "burnish-data-cache-v1";

impl Fingerprint {
    pub fn new() -> Self {
        let mut h = blake3::Hasher::new();
        h.update(CACHE_VERSION.as_bytes());
        Self(h)
    }

    pub fn field(&mut self, name: &str, value: &[u8]) -> &mut Self {
        self.0.update(&(name.len() as u64).to_le_bytes());
        self.0.update(name.as_bytes());
        self.0.update(&(value.len() as u64).to_le_bytes());
        self.0.update(value);
        self
    }

    pub fn file(&mut self, name: &str, path: &Path) -> Result<&mut Self> {
        // Streamed: model weights may be far larger than memory.
        let mut hasher = blake3::Hasher::new();
        std::fs::File::open(path)
            .and_then(|f| hasher.update_reader(f).map(|_| ()))
            .with_context(|| format!("cannot read {}", path.display()))?;
        Ok(self.field(name, hasher.finalize().as_bytes()))
    }

    pub fn hex(&self) -> String {
        self.0.finalize().to_hex()[..16].to_string()
    }
}
