//! The reject options of every command that reads data (`data convert`, `dedup`, `evolve`,
//! `distill`, `score`), so they all handle bad rows the same way (`datasets::rejects`).

use anyhow::{Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};

use datasets::config::OnError;
use datasets::rejects::{rejects_path, RejectLog};

#[derive(Args, Clone, Debug)]
pub struct RejectArgs {
    /// skip: go on without the rows that cannot be used (each listed, counted and written
    /// to the rejects file); fail: stop before writing anything if there is one.
    #[arg(long, default_value = "skip")]
    pub on_error: String,
    /// Rejected rows with their reasons, as JSONL (default: OUT_STEM.rejects.jsonl beside
    /// the output file).
    #[arg(long)]
    pub rejects: Option<PathBuf>,
}

impl RejectArgs {
    pub fn on_error(&self) -> Result<OnError> {
        OnError::parse(&self.on_error).context("--on-error")
    }

    /// Fails under `fail` with rejects, or when nothing is left; call before writing.
    pub fn check(&self, log: &RejectLog, kept: usize, read: usize) -> Result<()> {
        log.check(self.on_error()?, kept, read)
    }

    /// Writes the rejects beside `out` (or to `--rejects`) and says where, with the counts.
    pub fn finish(&self, log: &RejectLog, out: Option<&Path>, read: usize) -> Result<()> {
        if log.is_empty() {
            return Ok(());
        }
        let path = self.rejects.clone().or_else(|| out.map(rejects_path));
        eprintln!("rejected {} of {read} rows{}", log.len(), log.counts_line());
        match path {
            Some(p) => {
                log.write(&p)?;
                eprintln!("rejects  {}", p.display());
            }
            None => eprintln!("(give --rejects FILE to keep the rejected rows with their reasons)"),
        }
        Ok(())
    }
}
