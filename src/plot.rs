//! `burnish plot RUN... [--out FILE.svg|png]`: the curves of one run or several side by side
//! (one colour per run), as the end of every run draws them.

use anyhow::{bail, Result};
use clap::Parser;
use std::path::PathBuf;

use trainers::metrics::read_metrics;
use trainers::plots::{plot, Run};

#[derive(Parser, Clone)]
pub struct Args {
    /// Run folders (holding metrics.jsonl) or metrics.jsonl files.
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// .svg or .png (default: RUN/plots/metrics.svg and .png for one run, plots.svg for several).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    let mut runs = Vec::new();
    for path in &a.runs {
        let file = match path.is_dir() {
            true => path.join("metrics.jsonl"),
            false => path.clone(),
        };
        if !file.exists() {
            bail!("{} has no metrics.jsonl", path.display());
        }
        let dir = file.parent().map(PathBuf::from).unwrap_or_default();
        let label = std::fs::canonicalize(&dir)
            .unwrap_or(dir)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        runs.push(Run {
            label,
            records: read_metrics(&file)?,
        });
    }
    // Two runs named alike (`a/run`, `b/run`) are told apart by the paths given.
    let labels: Vec<String> = runs.iter().map(|r| r.label.clone()).collect();
    for (r, path) in runs.iter_mut().zip(&a.runs) {
        if labels.iter().filter(|l| **l == r.label).count() > 1 {
            r.label = path.display().to_string();
        }
    }
    let outs = match (&a.out, runs.len()) {
        (Some(o), _) => vec![o.clone()],
        (None, 1) => {
            let dir = match a.runs[0].is_dir() {
                true => a.runs[0].clone(),
                false => a.runs[0].parent().map(PathBuf::from).unwrap_or_default(),
            };
            vec![dir.join("plots/metrics.svg"), dir.join("plots/metrics.png")]
        }
        (None, _) => vec![PathBuf::from("plots.svg")],
    };
    for out in outs {
        let keys = plot(&runs, &out)?;
        println!("wrote {} ({})", out.display(), keys.join(", "));
    }
    Ok(())
}
