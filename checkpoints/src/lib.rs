//! Run state on disk: step checkpoints written atomically and resumed exactly, and exports
//! in Hugging Face layout (full models, PEFT adapters, merged models).

pub mod export;
pub mod peft;
pub mod run_dir;
pub mod tensors;

pub use run_dir::{latest_checkpoint, list_checkpoints, step_dir, TrainerState};
