//! What a caller of `burnish train` chooses besides the recipe, and what it gets back.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use crate::train_loop::Outcome;

pub struct TrainOptions<'a> {
    /// `None`, `auto`, or a checkpoint / run directory.
    pub resume: Option<String>,
    pub show_progress: bool,
    /// Set by Ctrl-C: save a checkpoint and stop after the current step.
    pub stop: &'a AtomicBool,
    /// Print progress lines (data summary, samples, where things were written).
    pub verbose: bool,
    /// Save and stop, as Ctrl-C does, once this many steps are done.
    pub stop_after_steps: Option<u64>,
}

#[derive(Debug)]
pub struct TrainReport {
    pub outcome: Outcome,
    pub steps: u64,
    pub run_dir: PathBuf,
    /// The HF export (`final/`), when the run completed.
    pub final_dir: Option<PathBuf>,
    pub first_eval_loss: Option<f64>,
    pub last_eval_loss: Option<f64>,
    pub samples_before: Vec<String>,
    pub samples_after: Vec<String>,
}
