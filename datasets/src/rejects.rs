//! One discipline for the rows a command cannot use: the first few are printed with file,
//! line, field and reason as they come, all of them go to a rejects JSONL beside the output
//! (so they can be fixed and fed back), the run ends with counts by reason, `--on-error
//! fail` stops before anything is written, and a run that keeps no row fails.

use anyhow::{bail, Result};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::config::OnError;
use crate::records::Reject;

/// Rejects printed as they come; the rest are counted and written to the file.
const SHOWN: usize = 10;

#[derive(Default)]
pub struct RejectLog {
    rejects: Vec<Reject>,
}

impl RejectLog {
    pub fn push(&mut self, r: Reject) {
        if self.rejects.len() < SHOWN {
            eprintln!("rejected {r}");
        } else if self.rejects.len() == SHOWN {
            eprintln!("(more rejected rows: see the rejects file and the counts at the end)");
        }
        self.rejects.push(r);
    }

    pub fn extend(&mut self, rejects: impl IntoIterator<Item = Reject>) {
        for r in rejects {
            self.push(r);
        }
    }

    pub fn len(&self) -> usize {
        self.rejects.len()
    }

    /// Take over another log's rejects (already printed when they were pushed there).
    pub fn absorb(&mut self, other: RejectLog) {
        self.rejects.extend(other.rejects);
    }

    pub fn is_empty(&self) -> bool {
        self.rejects.is_empty()
    }

    pub fn by_reason(&self) -> BTreeMap<&str, usize> {
        let mut counts = BTreeMap::new();
        for r in &self.rejects {
            *counts.entry(r.reason.as_str()).or_default() += 1;
        }
        counts
    }

    /// Fails (before any output is written) when rows were rejected under `fail`, or when
    /// none of `read` rows is left to write.
    pub fn check(&self, on_error: OnError, kept: usize, read: usize) -> Result<()> {
        if on_error == OnError::Fail && !self.is_empty() {
            bail!(
                "{} of {read} rows rejected and --on-error fail: nothing written (first: {})",
                self.len(),
                self.rejects[0]
            );
        }
        if kept == 0 {
            bail!(
                "no row is left to write: {} of {read} rows rejected{}; nothing written",
                self.len(),
                self.counts_line()
            );
        }
        Ok(())
    }

    /// Writes every reject to `path` (atomically) when there are any; returns the path.
    pub fn write(&self, path: &Path) -> Result<Option<PathBuf>> {
        if self.is_empty() {
            return Ok(None);
        }
        let mut f = crate::atomic::AtomicFile::create(path)?;
        for r in &self.rejects {
            writeln!(f, "{}", serde_json::to_string(r)?)?;
        }
        f.commit()?;
        Ok(Some(path.to_path_buf()))
    }

    /// `; by reason: N reason, ...` (empty when nothing was rejected).
    pub fn counts_line(&self) -> String {
        if self.is_empty() {
            return String::new();
        }
        let parts: Vec<String> = self
            .by_reason()
            .iter()
            .map(|(reason, n)| format!("{n} x {reason}"))
            .collect();
        format!("; by reason: {}", parts.join("; "))
    }
}

/// Where the rejects of a run writing `out` go: `OUT_STEM.rejects.jsonl` beside it.
pub fn rejects_path(out: &Path) -> PathBuf {
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let stem = stem.strip_suffix(".jsonl").unwrap_or(&stem).to_string();
    out.with_file_name(format!("{stem}.rejects.jsonl"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::Origin;

    fn reject(line: usize, reason: &str) -> Reject {
        Reject {
            origin: Origin {
                file: "in.jsonl".into(),
                line,
            },
            field: Some("prompt".into()),
            reason: reason.into(),
            raw: None,
        }
    }

    #[test]
    fn counts_write_and_refuse_as_the_run_asks() {
        let mut log = RejectLog::default();
        log.push(reject(2, "expected a string"));
        log.push(reject(5, "expected a string"));
        log.push(reject(7, "empty"));
        assert!(log.counts_line().contains("2 x expected a string"));
        assert!(log.check(OnError::Skip, 1, 4).is_ok());
        let e = log.check(OnError::Fail, 1, 4).unwrap_err().to_string();
        assert!(e.contains("in.jsonl:2"), "{e}");
        let e = log.check(OnError::Skip, 0, 3).unwrap_err().to_string();
        assert!(e.contains("no row is left"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let path = rejects_path(&dir.path().join("out.jsonl"));
        assert_eq!(path.file_name().unwrap(), "out.rejects.jsonl");
        log.write(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 3);
    }
}
