//! The distillation teacher: trained first from its own recipe when it does not exist yet,
//! checked to share the student's tokenizer, loaded (optionally in NF4), and its top-k
//! log-probs cached beside the tokenized data when the recipe asks for them.

use anyhow::{bail, Context, Result};
use burn::tensor::backend::AutodiffBackend;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::Path;

use datasets::pack::PackedRow;
use models::checkpoint::{load_config, load_model_quantized};
use models::nf4::Quantization;
use models::weights::write_atomic;
use models::ModelConfig;

use super::{teacher_top_k, DistillSettings, RowTopK, TeacherSource};
use crate::method_spec::Setup;
use crate::prerequisites::{model_fingerprint, tokenizer_mismatch, train_sft_first, TrainFirst};

/// Train the teacher from `teacher_recipe` when `teacher` holds no model yet.
fn ensure_teacher(settings: &DistillSettings, train_first: &TrainFirst<'_>) -> Result<()> {
    let dir = &settings.teacher;
    if dir.join("config.json").exists() {
        return Ok(());
    }
    let Some(recipe_path) = &settings.teacher_recipe else {
        bail!(
            "[distill] teacher {} holds no model (config.json missing); point it at a model directory, \
             or set teacher_recipe to train one there first",
            dir.display()
        );
    };
    train_sft_first(recipe_path, dir, "[distill] teacher_recipe", train_first)
}

/// Refuse a teacher whose vocabulary is not the student's: their distributions would be
/// over different tokens.
fn check_same_vocabulary(
    student_dir: &Path,
    student: &ModelConfig,
    teacher_dir: &Path,
    teacher: &ModelConfig,
) -> Result<()> {
    let mismatch = if student.vocab_size != teacher.vocab_size {
        Some(format!(
            "vocab_size {} vs {}",
            student.vocab_size, teacher.vocab_size
        ))
    } else {
        tokenizer_mismatch(student_dir, student, teacher_dir, teacher)?
    };
    match mismatch {
        Some(m) => bail!(
            "[distill] the teacher {} and the student {} do not share a vocabulary ({m}); distillation compares \
             their distributions token by token, so both need the same tokenizer",
            teacher_dir.display(),
            student_dir.display()
        ),
        None => Ok(()),
    }
}

fn teacher_quantization(settings: &DistillSettings) -> Result<Option<Quantization>> {
    match settings.teacher_quantize.as_deref() {
        None | Some("none") => Ok(None),
        Some("nf4") => Ok(Some(Quantization::default())),
        Some(other) => {
            bail!(
                "[distill] teacher_quantize = `{other}` is not supported; expected `nf4` or `none`"
            )
        }
    }
}

/// Bytes of the teacher's weights held while the student trains (`--dry-run`): none when
/// only its cached top-k log-probs are (it runs once, before training), None when it has
/// not been trained yet.
pub fn teacher_bytes(settings: &DistillSettings) -> Result<Option<u64>> {
    if settings.top_k.is_some() && settings.lmbda == 0.0 {
        return Ok(Some(0));
    }
    if !settings.teacher.join("config.json").exists() {
        return Ok(None);
    }
    let cfg = load_config(&settings.teacher)?;
    let quantization = teacher_quantization(settings)?;
    Ok(Some(crate::estimate::frozen_model_bytes(
        &cfg,
        quantization.as_ref(),
    )))
}

/// Everything the distillation method needs from its teacher.
pub fn prepare_teacher<B: AutodiffBackend>(
    setup: &Setup<'_, B>,
    settings: &DistillSettings,
    train_rows: &[PackedRow],
    eval_rows: &[PackedRow],
) -> Result<TeacherSource<B::InnerBackend>> {
    let (device, pad, cache_dir) = (setup.device, setup.pad, &setup.cache_dir);
    ensure_teacher(settings, setup.train_first)?;
    let dir = &settings.teacher;
    let teacher_cfg = load_config(dir)?;
    check_same_vocabulary(&setup.recipe.model.path, setup.base_cfg, dir, &teacher_cfg)?;
    let quantization = teacher_quantization(settings)?;
    let load = || -> Result<Box<models::CausalLm<B::InnerBackend>>> {
        let (_, m) = load_model_quantized::<B::InnerBackend>(dir, device, quantization.as_ref())?;
        Ok(Box::new(m))
    };
    let Some(k) = settings.top_k else {
        return Ok(TeacherSource::Online(load()?));
    };
    let path = cache_dir.join(format!(
        "teacher_topk{k}-{}.safetensors",
        model_fingerprint(dir)?
    ));
    let model = if settings.lmbda > 0.0 {
        Some(load()?)
    } else {
        None
    };
    if let Some((train, eval)) = read_top_k(&path, train_rows.len(), eval_rows.len())? {
        return Ok(TeacherSource::Cached {
            train,
            eval,
            k,
            model,
        });
    }
    let started = std::time::Instant::now();
    let loaded;
    let teacher = match &model {
        Some(m) => m,
        None => {
            loaded = load()?;
            &loaded
        }
    };
    let batch = setup.recipe.train.per_device_eval_batch_size;
    let train = teacher_top_k(teacher, train_rows, batch, k, pad);
    let eval = teacher_top_k(teacher, eval_rows, batch, k, pad);
    write_top_k(&path, &train, &eval)?;
    if setup.verbose {
        println!(
            "teacher top-{k} log-probs of {} rows computed in {:.1}s, cached in {}",
            train_rows.len() + eval_rows.len(),
            started.elapsed().as_secs_f64(),
            path.display()
        );
    }
    Ok(TeacherSource::Cached {
        train,
        eval,
        k,
        model,
    })
}

fn le_bytes<T: Copy, const N: usize>(values: &[T], to: fn(T) -> [u8; N]) -> Vec<u8> {
    values.iter().flat_map(|&v| to(v)).collect()
}

/// One safetensors file: per split, the concatenated ids and log-probs and each row's
/// number of trained positions.
fn write_top_k(path: &Path, train: &[RowTopK], eval: &[RowTopK]) -> Result<()> {
    let mut buffers: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (split, rows) in [("train", train), ("eval", eval)] {
        let ids: Vec<i32> = rows.iter().flat_map(|r| r.ids.iter().copied()).collect();
        let logps: Vec<f32> = rows.iter().flat_map(|r| r.logps.iter().copied()).collect();
        let lens: Vec<i32> = rows.iter().map(|r| r.ids.len() as i32).collect();
        buffers.push((
            format!("{split}.ids"),
            Dtype::I32,
            vec![ids.len()],
            le_bytes(&ids, i32::to_le_bytes),
        ));
        buffers.push((
            format!("{split}.logps"),
            Dtype::F32,
            vec![logps.len()],
            le_bytes(&logps, f32::to_le_bytes),
        ));
        buffers.push((
            format!("{split}.lens"),
            Dtype::I32,
            vec![lens.len()],
            le_bytes(&lens, i32::to_le_bytes),
        ));
    }
    let views: Vec<(String, TensorView<'_>)> = buffers
        .iter()
        .map(|(n, d, s, b)| Ok((n.clone(), TensorView::new(*d, s.clone(), b)?)))
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, None)?;
    write_atomic(path, &bytes)
}

/// The cached top-k rows, when the file exists and matches the data's row counts.
fn read_top_k(
    path: &Path,
    train_rows: usize,
    eval_rows: usize,
) -> Result<Option<(Vec<RowTopK>, Vec<RowTopK>)>> {
    let Ok(bytes) = std::fs::read(path) else {
        return Ok(None);
    };
    let file = safetensors::SafeTensors::deserialize(&bytes).with_context(|| {
        format!(
            "{} is not a valid cache; delete it to recompute",
            path.display()
        )
    })?;
    let mut tensors: HashMap<String, Vec<u8>> = HashMap::new();
    for (name, view) in file.tensors() {
        tensors.insert(name, view.data().to_vec());
    }
    let i32s = |b: &[u8]| -> Vec<i32> {
        b.chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let f32s = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let split = |name: &str, expected: usize| -> Option<Vec<RowTopK>> {
        let ids = i32s(tensors.get(&format!("{name}.ids"))?);
        let logps = f32s(tensors.get(&format!("{name}.logps"))?);
        let lens = i32s(tensors.get(&format!("{name}.lens"))?);
        if lens.len() != expected || ids.len() != logps.len() {
            return None;
        }
        let mut at = 0;
        let mut rows = Vec::with_capacity(lens.len());
        for n in lens {
            let n = n as usize;
            rows.push(RowTopK {
                ids: ids.get(at..at + n)?.to_vec(),
                logps: logps.get(at..at + n)?.to_vec(),
            });
            at += n;
        }
        Some(rows)
    };
    Ok(split("train", train_rows).zip(split("eval", eval_rows)))
}

#[cfg(test)]
mod memory_tests {
    use super::*;

    fn settings(teacher: &Path) -> DistillSettings {
        toml::from_str(&format!("teacher = {:?}", teacher.display().to_string()))
            .expect("a [distill] section")
    }

    #[test]
    fn the_dry_run_counts_the_teacher_it_holds() {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/models/tiny-qwen2");
        let cfg = load_config(&dir).unwrap();
        let mut s = settings(&dir);
        let full = teacher_bytes(&s).unwrap().unwrap();
        assert_eq!(full, 4 * cfg.num_parameters() as u64);
        s.teacher_quantize = Some("nf4".into());
        let nf4 = teacher_bytes(&s).unwrap().unwrap();
        assert!(nf4 < full, "{nf4} vs {full}");
        s.top_k = Some(4);
        assert_eq!(teacher_bytes(&s).unwrap(), Some(0), "cached top-k only");
        s.lmbda = 0.5;
        assert_eq!(
            teacher_bytes(&s).unwrap(),
            Some(nf4),
            "on-policy steps keep it"
        );
        let missing = settings(&dir.join("not-trained-yet"));
        assert_eq!(teacher_bytes(&missing).unwrap(), None);
    }
}
