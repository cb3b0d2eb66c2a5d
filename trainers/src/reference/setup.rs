//! A run's reference from its method's settings: loaded, or its log-probs precomputed once
//! and cached beside the data.

use anyhow::{bail, Context, Result};
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use std::path::PathBuf;

use models::checkpoint::load_model;
use models::weights::write_atomic;
use models::CausalLm;

use super::Reference;
use crate::method_spec::Setup;
use crate::prerequisites::model_fingerprint;

/// What a method's section says about its reference.
pub struct ReferenceSettings {
    /// The recipe section, for messages (`[dpo]`).
    pub section: &'static str,
    pub needed: bool,
    /// Full fine-tuning: the reference model (default: a frozen copy of `[model] path`).
    pub reference_model: Option<PathBuf>,
    pub precompute: bool,
    /// Names the cache file, with what the table depends on besides the model and data.
    pub cache_name: String,
}

/// The reference of a run. Precomputed tables are `(train, eval)`, `table` computes them
/// from the reference model; they are cached beside the data, keyed by the model.
pub fn reference_for<B: AutodiffBackend>(
    setup: &Setup<'_, B>,
    settings: ReferenceSettings,
    policy: &CausalLm<B>,
    rows: (usize, usize),
    table: impl Fn(&CausalLm<B::InnerBackend>) -> (Vec<(f64, f64)>, Vec<(f64, f64)>),
) -> Result<Reference<B>> {
    if !settings.needed {
        return Ok(Reference::None);
    }
    let recipe = setup.recipe;
    let adapters = recipe.adapter.is_some();
    if adapters && settings.reference_model.is_some() {
        bail!(
            "{} reference_model is for full fine-tuning; with [adapter] the reference is the base with adapters off",
            settings.section
        );
    }
    let ref_dir = settings
        .reference_model
        .unwrap_or_else(|| recipe.model.path.clone());
    let load_frozen = || -> Result<CausalLm<B::InnerBackend>> {
        Ok(load_model::<B::InnerBackend>(&ref_dir, setup.device)?.1)
    };
    if !settings.precompute {
        return Ok(if adapters {
            Reference::BaseOfAdapters
        } else {
            Reference::Frozen(Box::new(load_frozen()?))
        });
    }
    let path = setup.cache_dir.join(format!(
        "{}-{}.json",
        settings.cache_name,
        model_fingerprint(&ref_dir)?
    ));
    if let Ok(text) = std::fs::read_to_string(&path) {
        let v: serde_json::Value = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not valid JSON; delete it to recompute",
                path.display()
            )
        })?;
        let table =
            |k: &str| -> Option<Vec<(f64, f64)>> { serde_json::from_value(v[k].clone()).ok() };
        if let (Some(tr), Some(ev)) = (table("train"), table("eval")) {
            if (tr.len(), ev.len()) == rows {
                return Ok(Reference::Precomputed {
                    train: tr,
                    eval: ev,
                });
            }
        }
    }
    let started = std::time::Instant::now();
    let (tr, ev) = if adapters {
        let mut base = policy.valid();
        base.set_adapters_enabled(false);
        table(&base)
    } else {
        table(&load_frozen()?)
    };
    let json = serde_json::json!({"reference_model": ref_dir, "train": tr, "eval": ev});
    write_atomic(&path, serde_json::to_string(&json)?.as_bytes())?;
    eprintln!(
        "reference log-probs of {} rows computed in {:.1}s, cached in {}",
        rows.0 + rows.1,
        started.elapsed().as_secs_f64(),
        path.display()
    );
    Ok(Reference::Precomputed {
        train: tr,
        eval: ev,
    })
}
