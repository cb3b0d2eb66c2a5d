//! `burnish`: fine-tuning and alignment of language models on burn.

mod data;
mod dedup;
mod device;
mod distill_data;
mod eval;
mod evolve;
mod export;
mod generate;
mod launch;
mod local;
mod new_model;
mod plot;
mod rejects_args;
mod reward_score;
mod score;
mod serve;
mod train;

use clap::{Parser, Subcommand};

// Training allocates and frees logits-sized buffers every step; the system allocator
// returns them to the OS each time (mmap/munmap and page faults), mimalloc reuses them
// (tuned in `main`, see `trainers::allocator`).
#[global_allocator]
static GLOBAL: trainers::allocator::MiMalloc = trainers::allocator::MiMalloc;

#[derive(Parser)]
#[command(
    name = "burnish",
    version,
    about = "Fine-tune and align language models (SFT, LoRA, QLoRA, DPO, RM, PPO, GRPO, distillation) on burn"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a seeded random-init model in Hugging Face layout.
    NewModel(new_model::Args),
    /// Generate text from a model.
    Generate(generate::Args),
    /// Write the log-probability of each row's completion given its prompt.
    Score(score::Args),
    /// Inspect, convert, deduplicate, evolve and prepare datasets.
    Data(Box<data::Args>),
    /// Train with a recipe (SFT or LoRA; more methods follow the same loop).
    Train(train::Args),
    /// Start this machine's ranks of a data-parallel job: `launch --nproc-per-node N -- train ...`.
    Launch(launch::Args),
    /// Write a run, checkpoint or adapter as a Hugging Face model (or PEFT adapter).
    Export(export::Args),
    /// Draw the metrics of one or more runs (SVG or PNG).
    Plot(plot::Args),
    /// Serve a model (and LoRA adapters) over an OpenAI-compatible HTTP API.
    Serve(serve::Args),
    /// Evaluate a model: exact match, multiple choice, held-out loss, reward, LLM-judged win rate.
    Eval(Box<eval::Args>),
}

/// A panic (a bug, in burnish or in a dependency) ends with one line saying where, not the
/// default hook's report; `RUST_BACKTRACE=1` keeps the default, backtrace included.
fn one_line_panics() {
    if std::env::var_os("RUST_BACKTRACE").is_some() {
        return;
    }
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!(
            "error: internal error: {message}{at} (a bug: please report it; RUST_BACKTRACE=1 shows where it came from)"
        );
    }));
}

fn main() {
    one_line_panics();
    trainers::allocator::tune_for_training();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::NewModel(a) => new_model::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Score(a) => score::run(a),
        Command::Data(a) => data::run(*a),
        Command::Train(a) => train::run(a),
        Command::Launch(a) => launch::run(a),
        Command::Export(a) => export::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Plot(a) => plot::run(a),
        Command::Eval(a) => eval::run(*a),
    };
    models::shape_audit::report_if_requested();
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
