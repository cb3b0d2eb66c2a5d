//! The shared training loop and the methods that plug into it.

pub mod accumulate;
pub mod allocator;
pub mod data_order;
pub mod distill;
pub mod dpo;
pub mod dry_run;
pub mod estimate;
pub mod eval;
pub mod kto;
pub mod logprobs;
pub mod method;
pub mod method_spec;
pub mod methods;
pub mod metrics;
pub mod optim;
pub mod options;
pub mod orpo;
pub mod pairs;
pub mod parallel;
pub mod plots;
pub mod prerequisites;
pub mod recipe;
pub mod reference;
pub mod replicas;
pub mod report;
pub mod reward;
pub mod rl;
pub mod schedule;
pub mod session;
pub mod sft;
pub mod train_loop;
pub mod weights;

pub use dry_run::dry_run;
pub use options::{TrainOptions, TrainReport};
pub use recipe::Recipe;
pub use session::train;
