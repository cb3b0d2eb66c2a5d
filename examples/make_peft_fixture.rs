//! Writes `tests/fixtures/peft/` and `tests/fixtures/reward/model/`: a LoRA adapter for the tiny-llama fixture, exported by
//! burnish's own PEFT writer, and the merged model from `burnish export --merge`'s code
//! path. `scripts/parity/check_peft_export.py` then loads both with transformers + PEFT
//! and records their logits for the `peft_parity` test.
//!
//!     cargo run --release --example make_peft_fixture && python3 scripts/parity/check_peft_export.py
//!
//! With a fixture name (`tiny-qwen3`, `tiny-phi3`, `tiny-mixtral`, `tiny-qwen3-moe`) it
//! writes `tests/fixtures/peft-qwen3/`
//! (adapter and merged model only); `check_peft_export.py --model tiny-qwen3` checks it.

use anyhow::Result;
use burn::module::Param;
use burn::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::PathBuf;

use checkpoints::export::{export, ExportRequest};
use checkpoints::peft::save_adapter;
use models::backend::Cpu;
use models::checkpoint::load_model;
use models::lora::LoraSettings;
use models::weights::DiskDtype;

fn main() -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let name = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "tiny-llama".into());
    let base = root.join("tests/fixtures/models").join(&name);
    let out = match name.as_str() {
        "tiny-llama" => root.join("tests/fixtures/peft"),
        other => root.join(format!(
            "tests/fixtures/peft-{}",
            other.trim_start_matches("tiny-")
        )),
    };
    let device = Default::default();
    let (_, model) = load_model::<Cpu>(&base, &device)?;
    let settings = LoraSettings {
        r: 4,
        alpha: 8.0,
        dropout: 0.05,
        // Phi-3's fused layers are adapted as PEFT adapts them: one adapter per fused layer.
        target_modules: match name.as_str() {
            "tiny-phi3" => vec!["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
            // In a mixture of experts LoRA adapts the attention (PEFT reads MLP names there
            // as the experts').
            "tiny-mixtral" => vec!["q_proj", "k_proj", "v_proj", "o_proj"],
            "tiny-qwen3-moe" => vec!["q_proj", "v_proj", "o_proj"],
            _ => vec!["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
        }
        .into_iter()
        .map(String::from)
        .collect(),
        use_rslora: true,
        use_dora: false,
    };
    let mut model = model.with_lora(&settings, 3)?;
    // A trained adapter has B != 0; draw one so the adapter changes the logits.
    let mut rng = StdRng::seed_from_u64(11);
    for (_, _, proj) in model.linear_layers_mut() {
        if let Some(l) = proj.lora.as_mut() {
            let [r, d_out] = l.b.dims();
            let v: Vec<f32> = (0..r * d_out)
                .map(|_| rng.random_range(-0.2..0.2))
                .collect();
            l.b = Param::from_tensor(Tensor::from_data(TensorData::new(v, [r, d_out]), &device));
        }
    }
    let adapter = out.join("adapter");
    save_adapter(
        &model,
        &settings,
        &format!("tests/fixtures/models/{name}"),
        &adapter,
        DiskDtype::F32,
    )?;
    let msg = export::<Cpu>(
        &ExportRequest {
            source: &adapter,
            out: &out.join("merged"),
            merge: true,
            base: Some(&base),
            dtype: DiskDtype::F32,
        },
        &device,
    )?;
    println!("wrote {} and {msg}", adapter.display());
    if name != "tiny-llama" {
        return Ok(());
    }

    // A reward model (tiny-llama backbone + seeded score head), for
    // scripts/parity/reward_reference.py; the reward_parity test rebuilds it the same way.
    let (cfg, base_model) = load_model::<Cpu>(&base, &device)?;
    let rm = base_model.with_reward_head(0.5, 5);
    let rm_dir = root.join("tests/fixtures/reward/model");
    models::checkpoint::save_model(
        &rm,
        &cfg.as_reward_model(0),
        &rm_dir,
        None,
        &Default::default(),
    )?;
    println!("wrote {}", rm_dir.display());
    Ok(())
}
