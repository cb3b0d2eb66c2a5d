//! Training data: readers for JSONL/JSON/Parquet in Bedrock, Alpaca, ShareGPT, OpenAI,
//! preference and prompt-only formats, validation, canonical records, conversion,
//! deduplication (exact, MinHash-LSH, semantic), Evol-Instruct augmentation, chat
//! templating with loss masks, packing, splits and a Parquet cache.

pub mod atomic;
pub mod batch;
pub mod cache;
pub mod config;
pub mod convert;
pub mod dedup;
pub mod evolve;
pub mod formats;
pub mod pack;
pub mod prepare;
pub mod read;
pub mod records;
pub mod rejects;
pub mod split;
pub mod stages;
pub mod strict_json;
pub mod tokenize;

pub use config::DataConfig;
pub use records::{Conversation, Origin, Preference, PromptTask, Record, Reject, Row, Unpaired};
