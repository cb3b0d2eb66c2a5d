//! Where metrics go besides `metrics.jsonl` (`[train] report_to`, TRL's name): TensorBoard
//! event files and a CSV. Both are rebuilt from `metrics.jsonl` when a run starts or resumes,
//! so they always hold exactly its one curve.

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The integrations `report_to` accepts (`"none"` and an empty list mean none).
pub const REPORT_TO: &[&str] = &["tensorboard", "csv"];

pub fn check_report_to(list: &[String]) -> Result<()> {
    for r in list {
        if r != "none" && r != "all" && !REPORT_TO.contains(&r.as_str()) {
            bail!(
                "[train] report_to: unknown `{r}`; expected some of {} (or \"all\", \"none\")",
                REPORT_TO.join(", ")
            );
        }
    }
    Ok(())
}

/// A place metrics are written to as they are logged.
pub trait Sink {
    fn write(&mut self, record: &Map<String, Value>) -> Result<()>;
}

/// The sinks `report_to` names, started over in `run_dir` with `history` written first.
pub fn open_sinks(
    run_dir: &Path,
    report_to: &[String],
    history: &[Map<String, Value>],
) -> Result<Vec<Box<dyn Sink>>> {
    let wants = |name: &str| report_to.iter().any(|r| r == name || r == "all");
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    if wants("tensorboard") {
        sinks.push(Box::new(TensorBoard::create(&run_dir.join("tensorboard"))?));
    }
    if wants("csv") {
        sinks.push(Box::new(Csv::create(&run_dir.join("metrics.csv"))?));
    }
    for sink in sinks.iter_mut() {
        for record in history {
            sink.write(record)?;
        }
    }
    Ok(sinks)
}

/// TensorBoard's event files: TFRecord framing (length, masked CRC-32C, data, masked
/// CRC-32C) around `Event` protocol buffers, one scalar summary per numeric metric, tagged
/// `train/NAME` and `eval/NAME` as transformers' TensorBoard callback names them.
pub struct TensorBoard {
    path: PathBuf,
    file: File,
}

impl TensorBoard {
    /// A fresh event file in `dir` (earlier event files there are removed: they are rebuilt
    /// from the metrics history).
    pub fn create(dir: &Path) -> Result<Self> {
        if dir.exists() {
            for e in std::fs::read_dir(dir)?.flatten() {
                if e.file_name().to_string_lossy().contains("tfevents") {
                    std::fs::remove_file(e.path())?;
                }
            }
        }
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let now = wall_time();
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let path = dir.join(format!("events.out.tfevents.{}.{host}.burnish", now as u64));
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let mut tb = Self { path, file };
        let mut first = Vec::new();
        proto::double(&mut first, 1, now);
        proto::bytes(&mut first, 3, b"brain.Event:2");
        tb.record(&first)?;
        Ok(tb)
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut out = Vec::with_capacity(data.len() + 16);
        out.extend_from_slice(&len);
        out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
        out.extend_from_slice(data);
        out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
        self.file
            .write_all(&out)
            .and_then(|_| self.file.flush())
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

/// `eval_loss` -> `eval/loss`, `loss` -> `train/loss`.
pub fn tensorboard_tag(key: &str) -> String {
    match key.strip_prefix("eval_") {
        Some(rest) => format!("eval/{rest}"),
        None => format!("train/{key}"),
    }
}

impl Sink for TensorBoard {
    fn write(&mut self, record: &Map<String, Value>) -> Result<()> {
        let step = record.get("step").and_then(Value::as_i64).unwrap_or(0);
        let mut summary = Vec::new();
        for (key, v) in record {
            let Some(x) = v.as_f64() else { continue };
            if key == "step" {
                continue;
            }
            let mut value = Vec::new();
            proto::bytes(&mut value, 1, tensorboard_tag(key).as_bytes());
            proto::float(&mut value, 2, x as f32);
            proto::bytes(&mut summary, 1, &value);
        }
        let mut event = Vec::new();
        proto::double(&mut event, 1, wall_time());
        proto::varint_field(&mut event, 2, step as u64);
        proto::bytes(&mut event, 5, &summary);
        self.record(&event)
    }
}

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The few protocol-buffer encodings an `Event` needs.
mod proto {
    pub fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn key(out: &mut Vec<u8>, field: u32, wire: u32) {
        varint(out, u64::from((field << 3) | wire));
    }

    pub fn varint_field(out: &mut Vec<u8>, field: u32, v: u64) {
        key(out, field, 0);
        varint(out, v);
    }

    pub fn double(out: &mut Vec<u8>, field: u32, v: f64) {
        key(out, field, 1);
        out.extend_from_slice(&v.to_le_bytes());
    }

    pub fn float(out: &mut Vec<u8>, field: u32, v: f32) {
        key(out, field, 5);
        out.extend_from_slice(&v.to_le_bytes());
    }

    pub fn bytes(out: &mut Vec<u8>, field: u32, v: &[u8]) {
        key(out, field, 2);
        varint(out, v.len() as u64);
        out.extend_from_slice(v);
    }
}

/// CRC-32C (Castagnoli), as TFRecord uses it.
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 == 1 {
                    0x82F6_3B78 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

pub fn masked_crc32c(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// `metrics.csv`: one row per logged step, one column per metric seen so far. A metric that
/// appears later (the first eval) rewrites the file with the wider header.
pub struct Csv {
    path: PathBuf,
    columns: Vec<String>,
    rows: Vec<Map<String, Value>>,
}

impl Csv {
    pub fn create(path: &Path) -> Result<Self> {
        let csv = Self {
            path: path.to_path_buf(),
            columns: vec![],
            rows: vec![],
        };
        models::atomic::write(path, b"")?;
        Ok(csv)
    }

    fn cell(v: Option<&Value>) -> String {
        match v {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) if s.contains([',', '"', '\n']) => {
                format!("\"{}\"", s.replace('"', "\"\""))
            }
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
        }
    }

    fn line(&self, record: &Map<String, Value>) -> String {
        let cells: Vec<String> = self
            .columns
            .iter()
            .map(|c| Self::cell(record.get(c)))
            .collect();
        cells.join(",") + "\n"
    }
}

impl Sink for Csv {
    fn write(&mut self, record: &Map<String, Value>) -> Result<()> {
        let before = self.columns.len();
        for k in record.keys() {
            if !self.columns.contains(k) {
                self.columns.push(k.clone());
            }
        }
        self.rows.push(record.clone());
        if self.columns.len() != before {
            let mut text = self.columns.join(",") + "\n";
            for r in &self.rows {
                text.push_str(&self.line(r));
            }
            return models::atomic::write(&self.path, text.as_bytes());
        }
        let mut f = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .with_context(|| format!("cannot open {}", self.path.display()))?;
        f.write_all(self.line(record).as_bytes())
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn csv_widens_its_header_when_a_metric_appears() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.csv");
        let mut csv = Csv::create(&path).unwrap();
        let rec = |v: Value| v.as_object().unwrap().clone();
        csv.write(&rec(serde_json::json!({"step": 1, "loss": 2.5})))
            .unwrap();
        csv.write(&rec(
            serde_json::json!({"step": 2, "loss": 2.0, "eval_loss": 2.2}),
        ))
        .unwrap();
        csv.write(&rec(
            serde_json::json!({"step": 3, "loss": 1.5, "note": "a,b"}),
        ))
        .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            "step,loss,eval_loss,note\n1,2.5,,\n2,2.0,2.2,\n3,1.5,,\"a,b\"\n"
        );
    }
}
