//! `burnish train --recipe R [--set section.key=value]... [--dry-run] [--resume auto|DIR]
//! [--device cpu|cuda:0,cuda:1,...]`: one device, or data-parallel replicas on several (and,
//! under `burnish launch`, torchrun or `srun`, one process of a multi-process job).

use anyhow::{bail, Context, Result};
use burn::tensor::backend::AutodiffBackend;
use clap::Parser;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use models::backend::DeviceSpec;
use trainers::parallel::{train_data_parallel, Fault, ParallelOptions, Timeouts, Topology};
use trainers::train_loop::Outcome;
use trainers::{dry_run, train, Recipe, TrainOptions};

use crate::device::{dispatch_train, parse_devices, OnTrainDevice};

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
    /// `cpu`, `cuda:N`, or several of one kind (`cuda:0,cuda:1`): one data-parallel
    /// replica per device. Under a multi-process launch, `cuda` is `cuda:LOCAL_RANK`.
    #[arg(long, visible_alias = "devices", default_value = "cpu")]
    pub device: String,
    /// Data-parallel watchdog: seconds a rank waits in a collective of the training loop
    /// for the others before every rank stops with a message naming the missing one
    /// (default 600, or BURNISH_COLLECTIVE_TIMEOUT). Must exceed the longest pause of
    /// rank 0 alone (evaluation, checkpoint).
    #[arg(long, value_name = "SECONDS")]
    pub collective_timeout: Option<f64>,
    /// The same for setup (registration, and the others waiting while rank 0 prepares the
    /// data and caches): default 1800, or BURNISH_SETUP_TIMEOUT.
    #[arg(long, value_name = "SECONDS")]
    pub setup_timeout: Option<f64>,
}

static STOP: AtomicBool = AtomicBool::new(false);

struct Run {
    recipe: Recipe,
    resume: Option<String>,
    stop_after_steps: Option<u64>,
    topology: Option<Topology>,
    parallel: ParallelOptions,
}

impl OnTrainDevice for Run {
    type Output = Outcome;

    fn run<B: AutodiffBackend>(self, mut devices: Vec<B::Device>) -> Result<Outcome> {
        let opts = TrainOptions {
            resume: self.resume,
            show_progress: std::io::stderr().is_terminal(),
            stop: &STOP,
            verbose: true,
            stop_after_steps: self.stop_after_steps,
        };
        if devices.len() == 1 && self.topology.is_none() {
            let device = devices.remove(0);
            return Ok(train::<B>(&self.recipe, &opts, &device)?.outcome);
        }
        let report =
            train_data_parallel::<B>(&self.recipe, &opts, devices, self.topology, &self.parallel)?;
        Ok(report.outcome)
    }
}

/// A timeout from the flag, else the environment variable, else the default.
fn seconds(flag: Option<f64>, var: &str, default: Duration) -> Result<Duration> {
    let v = match (flag, std::env::var(var).ok()) {
        (Some(s), _) => s,
        (None, Some(v)) => v
            .trim()
            .parse::<f64>()
            .with_context(|| format!("{var}={v} is not a number of seconds"))?,
        (None, None) => return Ok(default),
    };
    if !(v > 0.0 && v.is_finite()) {
        bail!("a timeout must be a positive number of seconds, got {v}");
    }
    Ok(Duration::from_secs_f64(v))
}

pub fn run(a: Args) -> Result<()> {
    let recipe = Recipe::load(&a.recipe, &a.set)?;
    if a.dry_run {
        let on_cpu = a.device.trim() == "cpu";
        print!("{}", dry_run(&recipe, on_cpu)?);
        return Ok(());
    }
    ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond Ctrl-C: exiting without saving");
            std::process::exit(130);
        }
        eprintln!("\nCtrl-C: saving a checkpoint after this step (Ctrl-C again to quit now)");
    })?;
    let topology = Topology::from_env()?;
    if topology.is_some() {
        crate::launch::watch_launcher();
    }
    let defaults = Timeouts::default();
    let parallel = ParallelOptions {
        timeouts: Timeouts {
            step: seconds(
                a.collective_timeout,
                "BURNISH_COLLECTIVE_TIMEOUT",
                defaults.step,
            )?,
            setup: seconds(a.setup_timeout, "BURNISH_SETUP_TIMEOUT", defaults.setup)?,
        },
        // Test hook: `kill:RANK:STEP` or `stall:RANK:STEP` (see trainers::parallel::Fault).
        fault: match std::env::var("BURNISH_FAULT_INJECT") {
            Ok(f) => Some(f.parse::<Fault>()?),
            Err(_) => None,
        },
    };
    let devices = parse_devices(&a.device, topology.as_ref().map(|t| t.local_rank))?;
    if devices.iter().any(|d| *d != DeviceSpec::Cpu) {
        models::kernel_cache::configure(recipe.train.autotune_level)?;
    }
    let checkpointing = recipe.train.gradient_checkpointing;
    let outcome = dispatch_train(
        &devices,
        checkpointing,
        Run {
            recipe,
            resume: a.resume,
            stop_after_steps: a.stop_after_steps,
            topology,
            parallel,
        },
    )?;
    // Ctrl-C ends with the shell's SIGINT status; --stop-after-steps is a normal end.
    if matches!(outcome, Outcome::Interrupted(_)) && STOP.load(Ordering::SeqCst) {
        std::process::exit(130);
    }
    Ok(())
}
