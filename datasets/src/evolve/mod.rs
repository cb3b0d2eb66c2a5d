//! Evol-Instruct (Xu et al. 2023): evolve instructions in depth (constraints, deepening,
//! concretizing, more reasoning steps, complicated input) or in breadth, eliminate failed
//! evolutions, answer the survivors, and write trainable rows with their lineage.

pub mod backend;
pub mod eliminate;
pub mod openai;
pub mod prompts;
pub mod run;

pub use backend::{BackendError, ChatBackend, ChatRequest};
pub use eliminate::{EliminationConfig, InfoGain, Reason};
pub use openai::{OpenAiClient, OpenAiConfig};
pub use prompts::{Operation, Templates};
pub use run::{evolve, seeds_from_rows, EvolveConfig, EvolveReport, LocalConfig, Seed};
