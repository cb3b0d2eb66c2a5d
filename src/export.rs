//! `burnish export RUN_OR_CKPT --out DIR [--merge] [--base DIR] [--dtype D]`.

use anyhow::Result;
use burn::tensor::backend::Backend;
use clap::Parser;
use std::path::PathBuf;

use checkpoints::export::{export, ExportRequest};
use models::weights::DiskDtype;

use crate::device::{dispatch, OnDevice};

#[derive(Parser)]
pub struct Args {
    /// A run directory (its final/ export or newest checkpoint), a checkpoint, or an adapter.
    pub source: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// Fold LoRA adapters into the base weights and write a plain model.
    #[arg(long)]
    pub merge: bool,
    /// Base model of an adapter (default: its base_model_name_or_path).
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// float32, bfloat16 or float16.
    #[arg(long, default_value = "float32")]
    pub dtype: String,
}

impl OnDevice for Args {
    type Output = String;

    fn run<B: Backend>(self, device: B::Device) -> Result<String> {
        export::<B>(
            &ExportRequest {
                source: &self.source,
                out: &self.out,
                merge: self.merge,
                base: self.base.as_deref(),
                dtype: DiskDtype::parse(&self.dtype)?,
            },
            &device,
        )
    }
}

pub fn run(a: Args) -> Result<()> {
    let msg = dispatch("cpu", a)?;
    println!("exported {msg}");
    Ok(())
}
