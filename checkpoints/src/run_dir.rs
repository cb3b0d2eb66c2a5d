//! The run directory: `recipe.toml`, `metrics.jsonl` and `step-NNNNNN/` checkpoints, each
//! written into a temporary directory and renamed into place, so a crash never leaves a
//! half-written checkpoint that resume would pick up.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// Everything besides weights and optimizer moments that a resumed run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    pub total_steps: u64,
    pub epoch: f64,
    pub seed: u64,
    /// `full` or `lora`: which weights the checkpoint holds.
    pub weights: String,
    /// The method's data cursor (epoch, position in the shuffled order, ...).
    pub data_cursor: serde_json::Value,
    pub tokens_seen: u64,
    pub elapsed_s: f64,
    /// Fingerprint of the recipe fields that change the loss curve; resume refuses a mismatch.
    pub recipe_fingerprint: String,
    /// Data-parallel replicas the run trained with (a step is their combined batch);
    /// resume needs the same number. Absent in checkpoints from before data parallelism.
    #[serde(default = "one")]
    pub world_size: u64,
}

fn one() -> u64 {
    1
}

impl TrainerState {
    pub fn save(&self, dir: &Path) -> Result<()> {
        models::weights::write_atomic(
            &dir.join(STATE_FILE),
            serde_json::to_string_pretty(self)?.as_bytes(),
        )
    }

    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "{} is not a checkpoint: cannot read {}",
                dir.display(),
                path.display()
            )
        })?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid trainer state", path.display()))
    }
}

pub fn step_dir(run: &Path, step: u64) -> PathBuf {
    run.join(format!("step-{step:06}"))
}

/// Complete checkpoints of a run, oldest first.
pub fn list_checkpoints(run: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(run) else {
        return Ok(out);
    };
    for e in entries {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        let Some(n) = name
            .strip_prefix("step-")
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if e.path().join(STATE_FILE).exists() {
            out.push((n, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

pub fn latest_checkpoint(run: &Path) -> Result<Option<(u64, PathBuf)>> {
    Ok(list_checkpoints(run)?.pop())
}

/// Build a directory with `fill` in a temporary sibling, then put it in place of `dir`
/// (see [`models::atomic::write_dir`]).
pub use models::atomic::write_dir as write_dir_atomically;

/// Keep the newest `keep` checkpoints (all when `keep` is 0).
pub fn prune_checkpoints(run: &Path, keep: usize) -> Result<()> {
    if keep == 0 {
        return Ok(());
    }
    let all = list_checkpoints(run)?;
    for (_, dir) in all.iter().take(all.len().saturating_sub(keep)) {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_dirs_listing_and_pruning() {
        let run = tempfile::tempdir().unwrap();
        for step in [3u64, 1, 2] {
            write_dir_atomically(&step_dir(run.path(), step), |d| {
                std::fs::write(d.join(STATE_FILE), "{}")?;
                Ok(())
            })
            .unwrap();
        }
        // An unfinished checkpoint (no state file) and a failed write are never listed.
        std::fs::create_dir_all(step_dir(run.path(), 9)).unwrap();
        let failed =
            write_dir_atomically(&step_dir(run.path(), 10), |_| anyhow::bail!("disk full"));
        assert!(failed.is_err());
        assert!(!step_dir(run.path(), 10).exists());
        let steps: Vec<u64> = list_checkpoints(run.path())
            .unwrap()
            .iter()
            .map(|c| c.0)
            .collect();
        assert_eq!(steps, vec![1, 2, 3]);
        prune_checkpoints(run.path(), 2).unwrap();
        let steps: Vec<u64> = list_checkpoints(run.path())
            .unwrap()
            .iter()
            .map(|c| c.0)
            .collect();
        assert_eq!(steps, vec![2, 3]);
        assert_eq!(latest_checkpoint(run.path()).unwrap().unwrap().0, 3);
    }
}
