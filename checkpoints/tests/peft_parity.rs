//! PEFT parity on committed fixtures (examples/make_peft_fixture.rs +
//! scripts/parity/check_peft_export.py): an adapter burnish exported, loaded by PEFT, gives
//! the logits burnish computes with it, unmerged and merged; export round-trips.

use serde_json::Value;
use std::path::PathBuf;

use checkpoints::export::{export, ExportRequest};
use checkpoints::peft::{load_adapter, save_adapter};
use models::backend::Cpu;
use models::checkpoint::load_model;
use models::weights::{DiskDtype, SafetensorsReader};
use models::{CausalLm, ForwardInput};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("peft/expected.json")).unwrap())
        .unwrap()
}

fn logits(model: &CausalLm<Cpu>, ids: &[Vec<u32>]) -> Vec<f32> {
    let input = ForwardInput::causal(ids, &Default::default());
    model.forward(input).into_data().to_vec().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn flat(v: &Value) -> Vec<f32> {
    fn walk(v: &Value, out: &mut Vec<f32>) {
        match v {
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            x => out.push(x.as_f64().unwrap() as f32),
        }
    }
    let mut out = vec![];
    walk(v, &mut out);
    out
}

fn base() -> CausalLm<Cpu> {
    load_model::<Cpu>(&fixtures().join("models/tiny-llama"), &Default::default())
        .unwrap()
        .1
}

#[test]
fn peft_logits_match_burnish_unmerged_and_merged() {
    let exp = expected();
    assert!(
        exp["burnish_merged_in_transformers_max_abs_diff"]
            .as_f64()
            .unwrap()
            < 1e-4
    );
    let ids: Vec<Vec<u32>> = serde_json::from_value(exp["input_ids"].clone()).unwrap();
    let want = flat(&exp["peft_logits"]);
    let (model, settings) = load_adapter(base(), &fixtures().join("peft/adapter")).unwrap();
    assert!(settings.use_rslora && settings.r == 4);
    let got = logits(&model, &ids);
    assert!(
        max_diff(&got, &want) < 1e-4,
        "unmerged: {}",
        max_diff(&got, &want)
    );
    let merged = model.merge_adapters();
    assert!(!merged.has_adapters());
    let got = logits(&merged, &ids);
    assert!(
        max_diff(&got, &want) < 1e-4,
        "merged: {}",
        max_diff(&got, &want)
    );
    // Adapters switched off give the base model back (the DPO/PPO reference).
    let (mut model, _) = load_adapter(base(), &fixtures().join("peft/adapter")).unwrap();
    model.set_adapters_enabled(false);
    assert_eq!(logits(&model, &ids), logits(&base(), &ids));
}

#[test]
fn adapter_and_merged_exports_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join("peft/adapter");
    let (model, settings) = load_adapter(base(), &src).unwrap();
    let out = tmp.path().join("adapter");
    save_adapter(
        &model,
        &settings,
        "tests/fixtures/models/tiny-llama",
        &out,
        DiskDtype::F32,
    )
    .unwrap();
    let read = |dir: &PathBuf| {
        let mut r =
            SafetensorsReader::open_files(&[dir.join("adapter_model.safetensors")]).unwrap();
        let mut names: Vec<String> = r.names().cloned().collect();
        names.sort();
        names
            .into_iter()
            .map(|n| {
                let t = r.read_f32(&n).unwrap();
                (n, t)
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(read(&src), read(&out));
    let cfg = |dir: &PathBuf| -> Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap()
    };
    assert_eq!(cfg(&src), cfg(&out));

    let merged_dir = tmp.path().join("merged");
    export::<Cpu>(
        &ExportRequest {
            source: &src,
            out: &merged_dir,
            merge: true,
            base: Some(&fixtures().join("models/tiny-llama")),
            dtype: DiskDtype::F32,
        },
        &Default::default(),
    )
    .unwrap();
    let exp = expected();
    let ids: Vec<Vec<u32>> = serde_json::from_value(exp["input_ids"].clone()).unwrap();
    let (_, merged) = load_model::<Cpu>(&merged_dir, &Default::default()).unwrap();
    let d = max_diff(&logits(&merged, &ids), &flat(&exp["peft_logits"]));
    assert!(d < 1e-4, "{d}");
}

#[test]
fn adapters_for_another_model_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("bad");
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixtures().join("peft/adapter");
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        dir.join("adapter_model.safetensors"),
    )
    .unwrap();
    let cfg = std::fs::read_to_string(src.join("adapter_config.json"))
        .unwrap()
        .replace("\"r\": 4", "\"r\": 8");
    std::fs::write(dir.join("adapter_config.json"), cfg).unwrap();
    let e = format!("{:#}", load_adapter(base(), &dir).err().unwrap());
    assert!(e.contains("shape"), "{e}");
    let cfg = std::fs::read_to_string(src.join("adapter_config.json"))
        .unwrap()
        .replace("\"LORA\"", "\"IA3\"");
    std::fs::write(dir.join("adapter_config.json"), cfg).unwrap();
    let e = format!("{:#}", load_adapter(base(), &dir).err().unwrap());
    assert!(e.contains("IA3"), "{e}");
}

/// The same check for Qwen3 (per-head q/k norm, explicit head_dim): the adapter of
/// `make_peft_fixture tiny-qwen3`, loaded by PEFT over transformers' Qwen3ForCausalLM.
#[test]
fn peft_logits_match_burnish_on_qwen3() {
    peft_logits_match_burnish_on("qwen3");
}

/// And for Phi-3, whose adapters sit on the fused `qkv_proj` and `gate_up_proj` (one
/// `lora_A` shared by q, k and v, as PEFT has it).
#[test]
fn peft_logits_match_burnish_on_phi3() {
    peft_logits_match_burnish_on("phi3");
}

/// And for Gemma 2 (1 + weight norms, GeGLU, soft-capped attention and logits).
#[test]
fn peft_logits_match_burnish_on_gemma2() {
    peft_logits_match_burnish_on("gemma2");
}

/// And for Gemma 3 (per-head q/k norms, a rotary base per layer type).
#[test]
fn peft_logits_match_burnish_on_gemma3() {
    peft_logits_match_burnish_on("gemma3");
}

/// And for the mixtures of experts, whose adapters sit on the attention (PEFT reads the MLP
/// names there as the routed experts', which burnish refuses to target).
#[test]
fn peft_logits_match_burnish_on_mixtures_of_experts() {
    peft_logits_match_burnish_on("mixtral");
    peft_logits_match_burnish_on("qwen3-moe");
    let (_, model) = load_model::<Cpu>(
        &fixtures().join("models/tiny-qwen3-moe"),
        &Default::default(),
    )
    .unwrap();
    assert_eq!(
        model.linear_names(),
        ["q_proj", "k_proj", "v_proj", "o_proj"]
    );
    let settings = models::lora::LoraSettings {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: vec!["q_proj".into(), "up_proj".into()],
        use_rslora: false,
        use_dora: false,
    };
    let e = format!("{:#}", model.with_lora(&settings, 1).err().unwrap());
    assert!(
        e.contains("`up_proj`") && e.contains("routed experts"),
        "{e}"
    );
}

fn peft_logits_match_burnish_on(arch: &str) {
    let dir = fixtures().join(format!("peft-{arch}"));
    let exp: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    assert!(exp["adapter_effect_max_abs"].as_f64().unwrap() > 1e-2);
    let ids: Vec<Vec<u32>> = serde_json::from_value(exp["input_ids"].clone()).unwrap();
    let want = flat(&exp["peft_logits"]);
    let base_dir = fixtures().join(format!("models/tiny-{arch}"));
    let (_, base) = load_model::<Cpu>(&base_dir, &Default::default()).unwrap();
    let (model, _) = load_adapter(base, &dir.join("adapter")).unwrap();
    let got = logits(&model, &ids);
    assert!(
        max_diff(&got, &want) < 1e-4,
        "{arch} unmerged: {}",
        max_diff(&got, &want)
    );
    let got = logits(&model.merge_adapters(), &ids);
    assert!(
        max_diff(&got, &want) < 1e-4,
        "{arch} merged: {}",
        max_diff(&got, &want)
    );
}

fn dora_expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("losses/dora.json")).unwrap())
        .unwrap()
}

/// A DoRA adapter PEFT made (scripts/parity/dora_reference.py: magnitude and direction both
/// moved) gives PEFT's logits in burnish, unmerged and merged, and PEFT's merged weights.
#[test]
fn peft_dora_adapter_logits_and_merge_match() {
    let exp = dora_expected();
    let ids: Vec<Vec<u32>> = serde_json::from_value(exp["ids"].clone()).unwrap();
    let (model, settings) = load_adapter(base(), &fixtures().join("peft-dora/adapter")).unwrap();
    assert!(settings.use_dora && settings.r == 4);
    let got = logits(&model, &ids);
    let want = flat(&exp["logits"]);
    assert!(
        max_diff(&got, &want) < 1e-5,
        "DoRA: {}",
        max_diff(&got, &want)
    );
    let merged = model.clone().merge_adapters();
    let got = logits(&merged, &ids);
    let want = flat(&exp["merged_logits"]);
    assert!(
        max_diff(&got, &want) < 1e-5,
        "merged: {}",
        max_diff(&got, &want)
    );
    for (path, _, proj) in merged.linear_layers() {
        let Some(w) = exp["merged_weights"].get(&path) else {
            continue;
        };
        // PEFT's `[out, in]` against burnish's `[in, out]`.
        let got: Vec<f32> = proj
            .dense_weight()
            .transpose()
            .into_data()
            .to_vec()
            .unwrap();
        assert!(max_diff(&got, &flat(w)) < 1e-5, "{path}");
    }

    // Saved by burnish: PEFT's tensor names and shapes, and the same model loaded back.
    let dir = tempfile::tempdir().unwrap();
    save_adapter(&model, &settings, "tiny-llama", dir.path(), DiskDtype::F32).unwrap();
    let names = |d: &std::path::Path| {
        let r = SafetensorsReader::open_files(&[d.join("adapter_model.safetensors")]).unwrap();
        let mut v: Vec<(String, Vec<usize>)> = r
            .names()
            .map(|n| (n.clone(), r.shape(n).unwrap().to_vec()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        names(dir.path()),
        names(&fixtures().join("peft-dora/adapter"))
    );
    let (again, s2) = load_adapter(base(), dir.path()).unwrap();
    assert!(s2.use_dora);
    assert_eq!(logits(&again, &ids), logits(&model, &ids));
}
