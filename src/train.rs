//! `burnish train --recipe R [--set section.key=value]... [--dry-run] [--resume auto|DIR]`.

use anyhow::Result;
use burn::tensor::backend::AutodiffBackend;
use clap::Parser;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use trainers::train_loop::Outcome;
use trainers::{dry_run, train, Recipe, TrainOptions};

use crate::device::{dispatch_train, OnTrainDevice};

#[derive(Parser)]
pub struct Args {
    #[arg(long)]
    pub recipe: PathBuf,
    /// Override a recipe field: `train.learning_rate=1e-4`, `adapter.r=16`, `seed=3`.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
    /// Validate the recipe and data, print the resolved recipe, step count and a memory
    /// estimate; load no weights.
    #[arg(long)]
    pub dry_run: bool,
    /// `auto` (the newest checkpoint in output_dir, if any) or a checkpoint / run directory.
    #[arg(long)]
    pub resume: Option<String>,
    /// Save a checkpoint and stop once this many steps are done (for time-sliced jobs;
    /// continue with --resume auto).
    #[arg(long)]
    pub stop_after_steps: Option<u64>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

static STOP: AtomicBool = AtomicBool::new(false);

struct Run {
    recipe: Recipe,
    resume: Option<String>,
    stop_after_steps: Option<u64>,
}

impl OnTrainDevice for Run {
    type Output = Outcome;

    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<Outcome> {
        let opts = TrainOptions {
            resume: self.resume,
            show_progress: std::io::stderr().is_terminal(),
            stop: &STOP,
            verbose: true,
            stop_after_steps: self.stop_after_steps,
        };
        Ok(train::<B>(&self.recipe, &opts, &device)?.outcome)
    }
}

pub fn run(a: Args) -> Result<()> {
    let recipe = Recipe::load(&a.recipe, &a.set)?;
    if a.dry_run {
        print!("{}", dry_run(&recipe)?);
        return Ok(());
    }
    ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond Ctrl-C: exiting without saving");
            std::process::exit(130);
        }
        eprintln!("\nCtrl-C: saving a checkpoint after this step (Ctrl-C again to quit now)");
    })?;
    let outcome = dispatch_train(
        &a.device,
        Run {
            recipe,
            resume: a.resume,
            stop_after_steps: a.stop_after_steps,
        },
    )?;
    // Ctrl-C ends with the shell's SIGINT status; --stop-after-steps is a normal end.
    if matches!(outcome, Outcome::Interrupted(_)) && STOP.load(Ordering::SeqCst) {
        std::process::exit(130);
    }
    Ok(())
}
