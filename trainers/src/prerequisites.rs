//! What a run needs before it starts that other runs or models provide: a model trained
//! first from its own recipe (a teacher, a starting policy, a reward model), a check that
//! two models share a tokenizer, and fingerprints for caches computed from a model.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

use models::checkpoint::load_tokenizer;
use models::ModelConfig;

use crate::recipe::{MethodName, Recipe};

/// Trains a recipe to completion, as `burnish train` does (the session passes it down, so
/// methods can train what they need first without calling back into the session).
pub type TrainFirst<'a> = dyn Fn(&Recipe) -> Result<()> + 'a;

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

/// Train the recipe at `recipe_path`, whose export (`output_dir/final`) must be `target`,
/// unless `target` already holds a model or adapter: what a recipe needs built first (a
/// teacher, a starting model, a reward model). `kind` says which recipes fit, and how.
pub fn train_first(
    recipe_path: &Path,
    target: &Path,
    what: &str,
    kind: (&str, &dyn Fn(&Recipe) -> bool),
    run: &TrainFirst<'_>,
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
    run(&recipe)
}

/// The first difference between two models' tokenizers, if any.
pub fn tokenizer_mismatch(
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

/// [`train_first`] for a full-fine-tuning sft recipe (a teacher, a policy's starting model).
pub fn train_sft_first(
    recipe_path: &Path,
    target: &Path,
    what: &str,
    run: &TrainFirst<'_>,
) -> Result<()> {
    let full_sft = |r: &Recipe| r.method == MethodName::Sft && r.adapter.is_none();
    train_first(
        recipe_path,
        target,
        what,
        ("a full-fine-tuning sft", &full_sft),
        run,
    )
}
