//! LoRA adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors` with
//! PEFT's tensor names, so `PeftModel.from_pretrained` loads them unchanged (and back).

use anyhow::{bail, Context, Result};
use burn::module::Param;
use burn::prelude::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

use models::lora::LoraSettings;
use models::nf4::{Nf4Settings, Quantization};
use models::weights::{
    write_atomic, write_safetensors, DiskDtype, SafetensorsReader, TensorToWrite,
};
use models::CausalLm;

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// Beside a QLoRA adapter: how its base was quantised while it trained, with
/// transformers' `BitsAndBytesConfig` names (PEFT itself records nothing).
pub const QUANTIZATION_CONFIG: &str = "quantization_config.json";
const SCORE: &str = "base_model.model.score.weight";

pub fn is_adapter_dir(dir: &Path) -> bool {
    dir.join(ADAPTER_CONFIG).exists()
}

fn tensor_name(module: &str, which: &str) -> String {
    format!("base_model.model.{module}.{which}.weight")
}

/// DoRA's magnitude vector, as PEFT saves it (no `.weight` suffix).
fn magnitude_name(module: &str) -> String {
    format!("base_model.model.{module}.lora_magnitude_vector")
}

fn transposed<B: Backend>(t: Tensor<B, 2>) -> Vec<f32> {
    t.transpose()
        .into_data()
        .convert::<f32>()
        .to_vec()
        .expect("f32 data")
}

/// Write the model's adapters as PEFT does. `base_model` is recorded as
/// `base_model_name_or_path`.
pub fn save_adapter<B: Backend>(
    model: &CausalLm<B>,
    settings: &LoraSettings,
    base_model: &str,
    out: &Path,
    dtype: DiskDtype,
) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let layers = model.linear_layers();
    let mut writes: Vec<TensorToWrite<'_>> = Vec::new();
    let mut targets: Vec<&str> = Vec::new();
    for (path, name, proj) in &layers {
        let Some(l) = &proj.lora else { continue };
        if !targets.contains(name) {
            targets.push(name);
        }
        let [d_in, r] = l.a.dims();
        let d_out = l.b.dims()[1];
        writes.push(TensorToWrite {
            name: tensor_name(path, "lora_A"),
            shape: vec![r, d_in],
            values: Box::new(move || transposed(l.a.val())),
        });
        writes.push(TensorToWrite {
            name: tensor_name(path, "lora_B"),
            shape: vec![d_out, r],
            values: Box::new(move || transposed(l.b.val())),
        });
        if let Some(m) = &l.magnitude {
            writes.push(TensorToWrite {
                name: magnitude_name(path),
                shape: vec![d_out],
                values: Box::new(move || {
                    m.val()
                        .into_data()
                        .convert::<f32>()
                        .to_vec()
                        .expect("f32 data")
                }),
            });
        }
    }
    if writes.is_empty() {
        bail!("the model has no LoRA adapters to save");
    }
    // A reward model's score head trains in full beside the adapters: PEFT's SEQ_CLS
    // `modules_to_save`, stored under its plain name.
    if let Some(score) = &model.score {
        let [d_in, d_out] = score.dims();
        writes.push(TensorToWrite {
            name: "base_model.model.score.weight".into(),
            shape: vec![d_out, d_in],
            values: Box::new(move || transposed(score.dense_weight())),
        });
    }
    let meta: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    write_safetensors(&out.join(ADAPTER_WEIGHTS), &writes, dtype, &meta)?;
    let (task, modules_to_save) = match model.score {
        Some(_) => ("SEQ_CLS", json!(["score"])),
        None => ("CAUSAL_LM", Value::Null),
    };
    let config = json!({
        "peft_type": "LORA",
        "task_type": task,
        "base_model_name_or_path": base_model,
        "r": settings.r,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": targets,
        "use_rslora": settings.use_rslora,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": modules_to_save,
        "use_dora": settings.use_dora,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null
    });
    let quantization_path = out.join(QUANTIZATION_CONFIG);
    match model.quantization() {
        Some(q) => write_quantization_config(out, &q)?,
        None if quantization_path.exists() => std::fs::remove_file(&quantization_path)
            .with_context(|| format!("cannot remove {}", quantization_path.display()))?,
        None => {}
    }
    write_atomic(
        &out.join(ADAPTER_CONFIG),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )
}

/// An adapter directory's settings and the base model it names.
pub struct AdapterConfig {
    pub settings: LoraSettings,
    pub base_model: String,
    /// PEFT `SEQ_CLS`: the adapter belongs to a reward model (it carries the score head).
    pub reward_model: bool,
    /// Set for a QLoRA adapter: the quantisation its base trained under.
    pub quantization: Option<Quantization>,
}

fn write_quantization_config(dir: &Path, q: &Quantization) -> Result<()> {
    let v = json!({
        "quant_method": "bitsandbytes",
        "load_in_4bit": true,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": q.nf4.double_quant,
        "bnb_4bit_compute_dtype": "float32",
        "bnb_4bit_blocksize": q.nf4.block_size,
        "llm_int8_skip_modules": if q.lm_head { json!([]) } else { json!(["lm_head"]) },
    });
    write_atomic(
        &dir.join(QUANTIZATION_CONFIG),
        serde_json::to_string_pretty(&v)?.as_bytes(),
    )
}

fn read_quantization_config(dir: &Path) -> Result<Option<Quantization>> {
    let path = dir.join(QUANTIZATION_CONFIG);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    let kind = v["bnb_4bit_quant_type"].as_str().unwrap_or("");
    if v["load_in_4bit"] != json!(true) || kind != "nf4" {
        bail!(
            "{}: only 4-bit NF4 bases are supported (load_in_4bit = true, bnb_4bit_quant_type = \"nf4\"), got `{kind}`",
            path.display()
        );
    }
    let q = Quantization {
        nf4: Nf4Settings {
            block_size: v["bnb_4bit_blocksize"].as_u64().unwrap_or(64) as usize,
            double_quant: v["bnb_4bit_use_double_quant"].as_bool().unwrap_or(false),
        },
        lm_head: !v["llm_int8_skip_modules"]
            .as_array()
            .is_some_and(|m| m.iter().any(|x| x == "lm_head")),
    };
    q.nf4
        .validate()
        .with_context(|| format!("in {}", path.display()))?;
    Ok(Some(q))
}

pub fn read_adapter_config(dir: &Path) -> Result<AdapterConfig> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    let field = |k: &str| v.get(k).filter(|x| !x.is_null());
    let peft_type = field("peft_type").and_then(Value::as_str).unwrap_or("LORA");
    if peft_type != "LORA" {
        bail!(
            "{}: peft_type `{peft_type}` is not supported (only LORA)",
            path.display()
        );
    }
    for k in ["rank_pattern", "alpha_pattern"] {
        if field(k)
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
        {
            bail!("{}: per-module `{k}` is not supported", path.display());
        }
    }
    let r = field("r")
        .and_then(Value::as_u64)
        .with_context(|| format!("{}: missing integer `r`", path.display()))?;
    let targets = match field("target_modules") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_str().map(String::from))
            .collect(),
        _ => bail!(
            "{}: missing `target_modules` (a list of module names)",
            path.display()
        ),
    };
    let settings = LoraSettings {
        r: r as usize,
        alpha: field("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0),
        dropout: field("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
        target_modules: targets,
        use_rslora: field("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        use_dora: field("use_dora").and_then(Value::as_bool).unwrap_or(false),
    };
    settings
        .targets()
        .with_context(|| format!("in {}", path.display()))?;
    Ok(AdapterConfig {
        settings,
        quantization: read_quantization_config(dir)?,
        reward_model: field("task_type").and_then(Value::as_str) == Some("SEQ_CLS"),
        base_model: field("base_model_name_or_path")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
    })
}

/// Add the adapters stored in `dir` (PEFT format) to `model`; the base is frozen.
pub fn load_adapter<B: Backend>(
    model: CausalLm<B>,
    dir: &Path,
) -> Result<(CausalLm<B>, LoraSettings)> {
    let cfg = read_adapter_config(dir)?;
    let mut model = model.with_lora(&cfg.settings, 0)?;
    let weights = dir.join(ADAPTER_WEIGHTS);
    let mut reader = SafetensorsReader::open_files(std::slice::from_ref(&weights))?;
    let device = model.device();
    let has_score = reader.shape(SCORE).is_some();
    let mut read = |name: &str, shape: &[usize]| -> Result<TensorData> {
        let (got, values) = reader
            .read_f32(name)
            .with_context(|| format!("{}: missing tensor `{name}`", weights.display()))?;
        if got != shape {
            bail!(
                "{}: `{name}` has shape {got:?}, expected {shape:?}",
                weights.display()
            );
        }
        Ok(TensorData::new(values, shape.to_vec()))
    };
    // PEFT's `[out, in]` matrices in burn's `[in, out]` layout.
    let matrix = |data: TensorData| Tensor::<B, 2>::from_data(data, &device).transpose();
    for (path, _, proj) in model.linear_layers_mut() {
        let Some(l) = proj.lora.as_mut() else {
            continue;
        };
        let [d_in, r] = l.a.dims();
        let d_out = l.b.dims()[1];
        let a = matrix(read(&tensor_name(&path, "lora_A"), &[r, d_in])?);
        let b = matrix(read(&tensor_name(&path, "lora_B"), &[d_out, r])?);
        let magnitude = match cfg.settings.use_dora {
            true => Some(Param::from_tensor(Tensor::<B, 1>::from_data(
                read(&magnitude_name(&path), &[d_out])?,
                &device,
            ))),
            false => None,
        };
        *l = models::lora::LoraAdapter::from_tensors(a, b, &cfg.settings);
        l.magnitude = magnitude;
    }
    if has_score {
        let Some(score) = model.score.as_mut() else {
            bail!(
                "{} holds a reward model's score head (task SEQ_CLS) but the base is a causal LM; load it as a reward model",
                weights.display()
            );
        };
        let [d_in, d_out] = score.dims();
        score.set_dense_weight(matrix(read(SCORE, &[d_out, d_in])?));
    }
    let unused = reader.unused();
    if !unused.is_empty() {
        bail!(
            "{}: {} tensors match no targeted layer of this model (first: `{}`); is it an adapter for another architecture?",
            weights.display(),
            unused.len(),
            unused[0]
        );
    }
    Ok((model, cfg.settings))
}
