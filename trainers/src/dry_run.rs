//! `--dry-run`: validate everything, load no weights, print the resolved recipe, data
//! counts, steps and a memory estimate (for training on the CPU backend, or on CUDA).

use anyhow::{bail, Context, Result};
use std::path::Path;

use datasets::prepare::prepare;
use models::checkpoint::{load_config, load_tokenizer};
use models::presets::new_model_config;
use models::{ModelConfig, TextTokenizer};

use crate::estimate::{estimate, human_bytes, StepShape};
use crate::method_spec::{MethodSpec, SpecVisitor};
use crate::recipe::Recipe;
use crate::session::{data_config, total_steps};

/// The dry run's plan of `recipe`, as printed.
pub fn dry_run(recipe: &Recipe, on_cpu: bool) -> Result<String> {
    let (cfg, tok) = if recipe.model.path.join("config.json").exists() {
        let cfg = load_config(&recipe.model.path)?;
        let tok = load_tokenizer(&recipe.model.path, &cfg)?;
        // Headers only: names, shapes, dtypes and byte ranges against config.json.
        models::checkpoint::check_weights(&recipe.model.path, &cfg)?;
        (cfg, tok)
    } else if let Some(init) = &recipe.model.init_recipe {
        // The model the init recipe trains is its own model, fine-tuned: same shapes.
        let sub = Recipe::load(init, &[])
            .with_context(|| format!("[model] init_recipe {}", init.display()))?;
        return dry_run_with_model_of(recipe, &sub, on_cpu);
    } else {
        let (Some(preset), Some(tok_dir)) =
            (&recipe.model.init_preset, &recipe.model.init_tokenizer)
        else {
            bail!(
                "[model] path {} holds no model (config.json missing) and the recipe sets no init_preset",
                recipe.model.path.display()
            );
        };
        new_model_config(preset, "llama", tok_dir)?
    };
    crate::methods::visit(
        recipe.method,
        Plan {
            recipe,
            cfg: &cfg,
            tok: &tok,
            on_cpu,
        },
    )
}

/// The plan of one method's run.
struct Plan<'a> {
    recipe: &'a Recipe,
    cfg: &'a ModelConfig,
    tok: &'a TextTokenizer,
    on_cpu: bool,
}

impl SpecVisitor for Plan<'_> {
    type Out = Result<String>;

    fn visit<S: MethodSpec>(self, spec: S) -> Result<String> {
        let Plan {
            recipe,
            cfg,
            tok,
            on_cpu,
        } = self;
        let prepared = prepare(&data_config(recipe, &spec), tok)?;
        let expected = spec.data_kind().name();
        if !spec.accepts(prepared.train.kind()) {
            bail!(
                "method {:?} needs {expected} data, but [data] gives {} rows",
                recipe.method,
                prepared.train.kind()
            );
        }
        let train_rows = prepared.train.len();
        let eval_rows = prepared.eval.len();
        let mb = recipe.train.per_device_train_batch_size;
        let plan = spec.step_plan(recipe, train_rows);
        let per_epoch = plan.steps_per_epoch;
        let total = total_steps(recipe, Some(per_epoch))?;
        let lora = recipe.adapter.as_ref().map(|a| a.lora());
        let quantization = recipe.model.quantization()?;
        let step = StepShape {
            micro_batch: plan.rows,
            seq: plan.seq,
            checkpointing: recipe.train.gradient_checkpointing,
            half: recipe.model.half()?.is_some(),
            on_cpu,
        };
        let mut mem = estimate(cfg, lora.as_ref(), quantization.as_ref(), &step);
        let others = match spec.other_model(recipe, mem.weights)? {
            Some(other) => {
                let shown = match other.bytes {
                    Ok(b) => {
                        mem.other_models = b;
                        human_bytes(b)
                    }
                    Err(why) => why,
                };
                format!("{:<11} {shown}\n", other.label)
            }
            None => String::new(),
        };
        let mut s = String::new();
        s.push_str("# resolved recipe\n");
        s.push_str(&recipe.to_toml()?);
        s.push_str(&format!("\n# data\n{}\n", prepared.report.summary()));
        s.push_str(&format!(
            "train rows {train_rows}, eval rows {eval_rows}; {per_epoch} steps per epoch, {total} steps \
             (micro-batch {mb} x accumulation {})\n",
            recipe.train.gradient_accumulation_steps
        ));
        s.push_str(&format!(
            "\n# memory estimate (float32 training{}, micro-batch of {} rows x {} tokens)\n\
             parameters  {:.2}M ({:.2}M trainable)\nweights     {}\ngradients   {}\noptimizer   {}\nactivations {}\n{others}total       {}\n",
            match recipe.model.dtype.as_str() {
                "float32" => String::new(),
                half => format!(", frozen base stored in {half}"),
            },
            plan.rows,
            plan.seq,
            mem.params as f64 / 1e6,
            mem.trainable as f64 / 1e6,
            human_bytes(mem.weights),
            human_bytes(mem.gradients),
            human_bytes(mem.optimizer),
            human_bytes(mem.activations),
            human_bytes(mem.total()),
        ));
        if let Some(moe) = &cfg.moe {
            s.push_str(&experts_summary(
                moe,
                recipe.train.router_aux_loss_coef(cfg)?,
            ));
        }
        Ok(s)
    }
}

/// What a mixture of experts trains with, for the dry run.
fn experts_summary(moe: &models::config::MoeOptions, aux: Option<f64>) -> String {
    let sparse = moe.sparse.iter().filter(|&&s| s).count();
    let loss = match aux {
        Some(coef) => format!("load-balancing loss weight {coef}"),
        None => "no load-balancing loss (router_aux_loss_coef is 0)".into(),
    };
    format!(
        "\n# mixture of experts\n{} experts of width {}, top-{} per token, in {sparse} of {} layers; {loss}\n\
         (activations assume every token reaches {} experts; an expert's tokens are padded by \
         under 25% to a bucket)\n",
        moe.experts,
        moe.intermediate_size,
        moe.top_k,
        moe.sparse.len(),
        moe.top_k,
    )
}

/// The dry run of `recipe` whose model `init` trains first: `init`'s model stands in.
fn dry_run_with_model_of(recipe: &Recipe, init: &Recipe, on_cpu: bool) -> Result<String> {
    let mut r = recipe.clone();
    r.model.path = init.model.path.clone();
    r.model.init_recipe = None;
    r.model.init_preset = init.model.init_preset.clone();
    r.model.init_tokenizer = init.model.init_tokenizer.clone();
    r.model.init_seed = init.model.init_seed;
    let plan = dry_run(&r, on_cpu)?;
    Ok(format!(
        "# [model] {} is trained first by {}\n{plan}",
        recipe.model.path.display(),
        recipe
            .model
            .init_recipe
            .as_deref()
            .unwrap_or(Path::new(""))
            .display()
    ))
}
