//! The shared training loop and the methods that plug into it.

pub mod allocator;
pub mod data_order;
pub mod distill;
pub mod dpo;
pub mod estimate;
pub mod eval;
pub mod logprobs;
pub mod method;
pub mod metrics;
pub mod optim;
pub mod pairs;
pub mod parallel;
pub mod plots;
pub mod recipe;
pub mod report;
pub mod reward;
pub mod rl;
pub mod schedule;
pub mod session;
pub mod sft;
pub mod teacher;
pub mod train_loop;
pub mod weights;

pub use recipe::Recipe;
pub use session::{dry_run, train, TrainOptions, TrainReport};
