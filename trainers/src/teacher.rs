//! The distillation teacher: trained first from its own recipe when it does not exist yet,
//! checked to share the student's tokenizer, loaded (optionally in NF4), and its top-k
//! log-probs cached beside the tokenized data when the recipe asks for them.

use anyhow::{bail, Context, Result};
use burn::tensor::backend::AutodiffBackend;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use datasets::pack::PackedRow;
use models::checkpoint::{load_config, load_model_quantized, load_tokenizer};
use models::nf4::Quantization;
use models::weights::write_atomic;
use models::ModelConfig;

use crate::distill::{teacher_top_k, DistillSettings, RowTopK, TeacherSource};
use crate::recipe::{MethodName, Recipe};
use crate::session::{train, TrainOptions};

/// A fingerprint of a model (or PEFT adapter) directory's config and weights, for caches
/// computed from it and for naming what an evaluation ran on.
pub fn model_fingerprint(dir: &Path) -> Result<String> {
    let mut fp = datasets::cache::Fingerprint::new();
    let adapter = dir.join("adapter_config.json");
    match adapter.exists() && !dir.join("config.json").exists() {
        true => fp.file("adapter_config", &adapter)?,
        false => fp.file("config", &dir.join("config.json"))?,
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    for path in files {
        fp.file(
            &path.file_name().unwrap_or_default().to_string_lossy(),
            &path,
        )?;
    }
    Ok(fp.hex()[..16].to_string())
}

/// Train the teacher from `teacher_recipe` when `teacher` holds no model yet.
fn ensure_teacher<B: AutodiffBackend>(
    settings: &DistillSettings,
    opts: &TrainOptions<'_>,
    device: &B::Device,
) -> Result<()> {
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
    train_sft_first::<B>(recipe_path, dir, "[distill] teacher_recipe", opts, device)
}

/// [`train_first`] for a full-fine-tuning sft recipe (a teacher, a policy's starting model).
pub fn train_sft_first<B: AutodiffBackend>(
    recipe_path: &Path,
    target: &Path,
    what: &str,
    opts: &TrainOptions<'_>,
    device: &B::Device,
) -> Result<()> {
    let full_sft = |r: &Recipe| r.method == MethodName::Sft && r.adapter.is_none();
    train_first::<B>(
        recipe_path,
        target,
        what,
        ("a full-fine-tuning sft", &full_sft),
        opts,
        device,
    )
}

/// Train the recipe at `recipe_path`, whose export (`output_dir/final`) must be `target`,
/// unless `target` already holds a model or adapter: what a recipe needs built first (a
/// teacher, a starting model, a reward model). `kind` says which recipes fit, and how.
pub fn train_first<B: AutodiffBackend>(
    recipe_path: &Path,
    target: &Path,
    what: &str,
    kind: (&str, &dyn Fn(&Recipe) -> bool),
    opts: &TrainOptions<'_>,
    device: &B::Device,
) -> Result<()> {
    if target.join("config.json").exists() || target.join("adapter_config.json").exists() {
        return Ok(());
    }
    let recipe = Recipe::load(recipe_path, &[])
        .with_context(|| format!("{what} {}", recipe_path.display()))?;
    let exported = recipe.train.output_dir.join("final");
    let (description, fits) = kind;
    if !fits(&recipe) || exported != *target {
        bail!(
            "{what} {} must be {description} recipe whose output_dir/final is {} (it exports to {})",
            recipe_path.display(),
            target.display(),
            exported.display()
        );
    }
    if opts.verbose {
        println!(
            "training {} first: {} -> {}",
            recipe_path.display(),
            recipe.train.output_dir.display(),
            target.display()
        );
    }
    let sub = TrainOptions {
        resume: None,
        stop_after_steps: None,
        ..*opts
    };
    train::<B>(&recipe, &sub, device)?;
    Ok(())
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

/// The first difference between two models' tokenizers, if any.
pub(crate) fn tokenizer_mismatch(
    student_dir: &Path,
    student: &ModelConfig,
    teacher_dir: &Path,
    teacher: &ModelConfig,
) -> Result<Option<String>> {
    let s_tok = load_tokenizer(student_dir, student)?;
    let t_tok = load_tokenizer(teacher_dir, teacher)?;
    Ok(if s_tok.vocab_size() != t_tok.vocab_size() {
        Some(format!(
            "tokenizers of {} vs {} tokens",
            s_tok.vocab_size(),
            t_tok.vocab_size()
        ))
    } else {
        (0..s_tok.vocab_size() as u32)
            .find(|&id| s_tok.id_to_token(id) != t_tok.id_to_token(id))
            .map(|id| {
                format!(
                    "token {id} is {:?} vs {:?}",
                    s_tok.id_to_token(id),
                    t_tok.id_to_token(id)
                )
            })
    })
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
#[allow(clippy::too_many_arguments)]
pub fn prepare_teacher<B: AutodiffBackend>(
    recipe: &Recipe,
    settings: &DistillSettings,
    student_cfg: &ModelConfig,
    train_rows: &[PackedRow],
    eval_rows: &[PackedRow],
    cache_dir: &Path,
    pad: datasets::batch::Padding,
    opts: &TrainOptions<'_>,
    device: &B::Device,
) -> Result<TeacherSource<B::InnerBackend>> {
    ensure_teacher::<B>(settings, opts, device)?;
    let dir = &settings.teacher;
    let teacher_cfg = load_config(dir)?;
    check_same_vocabulary(&recipe.model.path, student_cfg, dir, &teacher_cfg)?;
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
    let batch = recipe.train.per_device_eval_batch_size;
    let train = teacher_top_k(teacher, train_rows, batch, k, pad);
    let eval = teacher_top_k(teacher, eval_rows, batch, k, pad);
    write_top_k(&path, &train, &eval)?;
    if opts.verbose {
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
        let dir =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/tiny-qwen2");
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
