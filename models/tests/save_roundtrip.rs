//! Saving writes HF names and layout: reloading gives identical logits, in one file or shards.

use models::backend::Cpu;
use models::checkpoint::{load_model, save_model, SaveOptions};
use models::weights::DiskDtype;
use models::ForwardInput;
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/models")
        .join(name)
}

#[test]
fn save_then_load_is_lossless_single_and_sharded() {
    let device = Default::default();
    for (name, shard) in [
        ("tiny-llama", None),
        ("tiny-qwen2", Some(100_000u64)),
        ("tiny-qwen3", None),
        ("tiny-phi3", None),
        ("tiny-gemma2", None),
        ("tiny-gemma3", None),
        ("tiny-mixtral", None),
        ("tiny-qwen3-moe", Some(400_000)),
    ] {
        let (cfg, model) = load_model::<Cpu>(&fixture(name), &device).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        save_model(
            &model,
            &cfg,
            tmp.path(),
            None,
            &SaveOptions {
                dtype: DiskDtype::F32,
                max_shard_bytes: shard,
            },
        )
        .unwrap();
        assert_eq!(
            tmp.path().join("model.safetensors.index.json").exists(),
            shard.is_some()
        );
        let (_, again) = load_model::<Cpu>(tmp.path(), &device).unwrap();
        let ids = vec![vec![3u32, 7, 11, 200, 5]];
        let a: Vec<f32> = model
            .forward(ForwardInput::causal(&ids, &device))
            .into_data()
            .iter::<f32>()
            .collect();
        let b: Vec<f32> = again
            .forward(ForwardInput::causal(&ids, &device))
            .into_data()
            .iter::<f32>()
            .collect();
        assert_eq!(a, b, "{name}");
    }
}

#[test]
fn bf16_save_matches_bf16_source_bit_for_bit() {
    // tiny-qwen2 is stored in bf16: f32 -> bf16 of its upcast values must give the same bytes.
    let device = Default::default();
    let (cfg, model) = load_model::<Cpu>(&fixture("tiny-qwen2"), &device).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    save_model(
        &model,
        &cfg,
        tmp.path(),
        None,
        &SaveOptions {
            dtype: DiskDtype::BF16,
            max_shard_bytes: None,
        },
    )
    .unwrap();
    let mut a = models::weights::SafetensorsReader::open_dir(&fixture("tiny-qwen2")).unwrap();
    let mut b = models::weights::SafetensorsReader::open_dir(tmp.path()).unwrap();
    let names: Vec<String> = a.names().cloned().collect();
    for n in names {
        assert_eq!(a.read_f32(&n).unwrap(), b.read_f32(&n).unwrap(), "{n}");
    }
    let cfg_out: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg_out["torch_dtype"], "bfloat16");
}
