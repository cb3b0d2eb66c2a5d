//! `metrics.jsonl`: one JSON object per logged step, appended and flushed as training goes.

use anyhow::{Context, Result};
use serde_json::{Map, Value};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct MetricsLog {
    path: PathBuf,
    file: File,
    /// `report_to`'s TensorBoard and CSV writers.
    sinks: Vec<Box<dyn crate::report::Sink>>,
}

impl MetricsLog {
    /// Open for appending, first dropping records after `resume_step` (a resumed run
    /// rewrites the steps it repeats, so the file holds one curve); the `report_to` sinks
    /// beside it are rebuilt from the records kept.
    pub fn open(path: &Path, resume_step: u64, report_to: &[String]) -> Result<Self> {
        let mut history = Vec::new();
        if path.exists() {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<Value>(l)
                        .ok()
                        .and_then(|v| v.get("step").and_then(Value::as_u64))
                        .is_some_and(|s| s <= resume_step && resume_step > 0)
                })
                .collect();
            history = kept
                .iter()
                .filter_map(|l| serde_json::from_str::<Map<String, Value>>(l).ok())
                .collect();
            let mut body = kept.join("\n");
            if !body.is_empty() {
                body.push('\n');
            }
            models::weights::write_atomic(path, body.as_bytes())?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        Ok(Self {
            path: path.to_path_buf(),
            file,
            sinks: crate::report::open_sinks(dir, report_to, &history)?,
        })
    }

    pub fn write(&mut self, record: &Map<String, Value>) -> Result<()> {
        let line = serde_json::to_string(record)?;
        writeln!(self.file, "{line}")
            .and_then(|_| self.file.flush())
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        for sink in self.sinks.iter_mut() {
            sink.write(record)?;
        }
        Ok(())
    }
}

/// Read every record of a metrics file.
pub fn read_metrics(path: &Path) -> Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))
        })
        .collect()
}
