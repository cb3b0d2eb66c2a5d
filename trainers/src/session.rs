//! `burnish train`: from a recipe to a finished (or resumable) run directory. Sets up the
//! model (building it when the recipe asks), the data and the method, runs the shared loop
//! and exports the result in Hugging Face layout.

use anyhow::{bail, Context, Result};
use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use std::path::{Path, PathBuf};

use checkpoints::TrainerState;
use datasets::batch::Padding;
use datasets::prepare::prepare;
use models::checkpoint::{load_config, load_model, load_model_stored, load_tokenizer};
use models::generate::{generate, SamplingParams};
use models::presets::{write_new_model, NewModelSpec};
use models::weights::{write_atomic, DiskDtype};
use models::{CausalLm, Message, ModelConfig, TextTokenizer};

use crate::method::Method;
use crate::method_spec::{Drive, MethodSpec, Setup, SpecVisitor};
use crate::optim::{trainable_params, AdamWSettings};
use crate::options::{TrainOptions, TrainReport};
use crate::prerequisites::train_sft_first;
use crate::recipe::Recipe;
use crate::replicas::Replicas;
use crate::schedule::LrSchedule;
use crate::train_loop::{find_resume, run_loop_on, EvalHook, LoopConfig, Outcome, Resume};
use crate::weights::WeightsFormat;

fn say(verbose: bool, msg: impl AsRef<str>) {
    if verbose {
        eprintln!("{}", msg.as_ref());
    }
}

/// Build the recipe's model when it does not exist and the recipe names a preset.
fn ensure_model(recipe: &Recipe, verbose: bool) -> Result<()> {
    let m = &recipe.model;
    if m.path.join("config.json").exists() {
        return Ok(());
    }
    let (Some(preset), Some(tok)) = (&m.init_preset, &m.init_tokenizer) else {
        bail!(
            "[model] path {} holds no model (config.json missing); point it at a Hugging Face model directory, \
             or set init_preset and init_tokenizer to build one",
            m.path.display()
        );
    };
    let cfg = write_new_model(&NewModelSpec {
        preset,
        arch: "llama",
        tokenizer_dir: tok,
        out: &m.path,
        seed: m.init_seed,
        chat_template: "chatml",
        dtype: DiskDtype::F32,
    })?;
    say(
        verbose,
        format!(
            "built a {preset} model ({:.2}M parameters, seed {}) in {}",
            cfg.num_parameters() as f64 / 1e6,
            m.init_seed,
            m.path.display()
        ),
    );
    Ok(())
}

pub(crate) fn total_steps(recipe: &Recipe, steps_per_epoch: Option<usize>) -> Result<usize> {
    let t = &recipe.train;
    if t.max_steps > 0 {
        return Ok(t.max_steps);
    }
    let per_epoch = steps_per_epoch.context("[train] this method has no epochs: set max_steps")?;
    Ok(((t.num_train_epochs * per_epoch as f64).ceil() as usize).max(1))
}

fn loop_config(recipe: &Recipe, total: usize, opts: &TrainOptions<'_>) -> LoopConfig {
    let t = &recipe.train;
    LoopConfig {
        total_steps: total,
        micro_batches: t.gradient_accumulation_steps,
        schedule: LrSchedule {
            peak: t.learning_rate,
            warmup: LrSchedule::warmup_steps(t.warmup_steps, t.warmup_ratio, total),
            total,
            kind: t.lr_scheduler_type,
        },
        adam: AdamWSettings {
            beta1: t.adam_beta1,
            beta2: t.adam_beta2,
            eps: t.adam_epsilon,
            weight_decay: t.weight_decay,
        },
        max_grad_norm: t.max_grad_norm,
        eval_steps: t.eval_steps,
        eval_on_start: t.eval_on_start,
        save_steps: t.save_steps,
        save_total_limit: t.save_total_limit,
        logging_steps: t.logging_steps,
        seed: recipe.seed,
        run_dir: t.output_dir.clone(),
        recipe_fingerprint: recipe.fingerprint(),
        show_progress: opts.show_progress,
        stop_after_steps: opts.stop_after_steps,
        report_to: t.report_to.clone(),
    }
}

/// Greedy completions of the recipe's sample prompts, rendered with the chat template.
pub fn sample<B: Backend>(
    model: &CausalLm<B>,
    cfg: &ModelConfig,
    tok: &TextTokenizer,
    recipe: &Recipe,
) -> Result<Vec<String>> {
    // Reward models score text; they do not generate it.
    if recipe.train.sample_prompts.is_empty() || model.score.is_some() {
        return Ok(vec![]);
    }
    let template = tok.template(Some(&recipe.data.template))?;
    let prompts: Vec<Vec<u32>> = recipe
        .train
        .sample_prompts
        .iter()
        .map(|p| {
            let text = template.render(&[Message::new("user", p)], true, &tok.template_tokens())?;
            tok.encode(&text, false)
        })
        .collect::<Result<_>>()?;
    let mut stop_ids = tok.stop_ids.clone();
    stop_ids.extend(cfg.eos_token_ids.iter().copied());
    let params = SamplingParams {
        max_new_tokens: recipe.train.sample_max_new_tokens,
        temperature: 0.0,
        stop_ids,
        pad_id: tok.pad_id.or(cfg.pad_token_id).unwrap_or(0),
        shape_multiple: recipe.train.pad_multiple::<B>(&model.device()),
        ..Default::default()
    };
    let mut out = Vec::new();
    for p in &prompts {
        let g = generate(model, std::slice::from_ref(p), &params, None)?;
        out.push(tok.decode(&g[0].tokens, true)?);
    }
    Ok(out)
}

fn print_samples(recipe: &Recipe, label: &str, samples: &[String]) {
    for (p, s) in recipe.train.sample_prompts.iter().zip(samples) {
        let text = s.trim();
        let shown = if text.is_empty() {
            "(no text: only special tokens)"
        } else {
            text
        };
        println!("[{label}] {p}\n  -> {shown}");
    }
}

/// The recipe's `[data]`, with prompt-answer rows read as conversations for the methods that
/// train on conversations.
pub(crate) fn data_config(recipe: &Recipe, spec: &impl MethodSpec) -> datasets::config::DataConfig {
    let mut data = recipe.data.clone();
    data.answers_as_responses |= spec.answers_as_responses();
    data
}

/// (metric, first logged value, last logged value) of the method's key metrics.
fn key_metric_moves(
    keys: &'static [&'static str],
    run_dir: &Path,
) -> Vec<(&'static str, f64, f64)> {
    let Ok(records) = crate::metrics::read_metrics(&run_dir.join("metrics.jsonl")) else {
        return vec![];
    };
    keys.iter()
        .filter_map(|&key| {
            let values: Vec<f64> = records
                .iter()
                .filter_map(|r| r.get(key)?.as_f64())
                .collect();
            Some((key, *values.first()?, *values.last()?))
        })
        .collect()
}

/// Remove an earlier run's checkpoints, metrics and export (nothing else in the directory).
fn clear_run(run_dir: &Path) -> Result<()> {
    for (_, dir) in checkpoints::list_checkpoints(run_dir)? {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    for name in ["final", "metrics.jsonl"] {
        let p = run_dir.join(name);
        if p.is_dir() {
            std::fs::remove_dir_all(&p)?;
        } else if p.exists() {
            std::fs::remove_file(&p)?;
        }
    }
    Ok(())
}

/// Load the policy: from a checkpoint when resuming, else from `[model] path`, with fresh
/// LoRA adapters when the recipe has an `[adapter]` section, as `spec`'s method trains it.
fn load_policy<B: AutodiffBackend, S: MethodSpec>(
    spec: &S,
    recipe: &Recipe,
    resume: Option<&Path>,
    device: &B::Device,
) -> Result<(ModelConfig, CausalLm<B>, WeightsFormat)> {
    let base = &recipe.model.path;
    let (cfg, model, weights) = match &recipe.adapter {
        None => {
            let dir = resume.unwrap_or(base);
            let (cfg, model) = load_model::<B>(dir, device)?;
            let (cfg, model) = spec.base_model(recipe, cfg, model);
            let tokenizer_dir = base.clone();
            let weights = WeightsFormat::Full {
                cfg: Box::new(cfg.clone()),
                tokenizer_dir,
            };
            (cfg, model, weights)
        }
        Some(a) => {
            let settings = a.lora();
            let quantization = recipe.model.quantization()?;
            let (cfg, model) =
                load_model_stored::<B>(base, device, quantization.as_ref(), recipe.model.half()?)?;
            let (cfg, model) = spec.base_model(recipe, cfg, model);
            let model = match resume {
                Some(dir) => checkpoints::peft::load_adapter(model, dir)?.0,
                None => model.with_lora(&settings, recipe.seed)?,
            };
            let weights = WeightsFormat::Adapter {
                settings,
                base_model: base.clone(),
            };
            (cfg, model, weights)
        }
    };
    let mut model = spec.policy(recipe, &cfg, model, resume)?;
    model.router_aux_loss_coef = recipe.train.router_aux_loss_coef(&cfg)?;
    Ok((cfg, model, weights))
}

pub fn train<B: AutodiffBackend>(
    recipe: &Recipe,
    opts: &TrainOptions<'_>,
    device: &B::Device,
) -> Result<TrainReport> {
    train_on::<B>(recipe, opts, device, None)
}

/// [`train`] as one replica of a data-parallel job (`dp`, registered: see
/// `crate::parallel::run_replicas`). Rank 0 sets the run up first (clears it, builds a
/// missing model, fills the data and reference caches); the other ranks wait for it, then
/// set up from what it wrote.
pub fn train_on<B: AutodiffBackend>(
    recipe: &Recipe,
    opts: &TrainOptions<'_>,
    device: &B::Device,
    dp: Option<&mut dyn Replicas<B>>,
) -> Result<TrainReport> {
    crate::methods::visit(
        recipe.method,
        Run {
            recipe,
            opts,
            device,
            dp,
        },
    )
}

/// A run of one method: set up, train, export.
struct Run<'a, 'o, 'd, B: AutodiffBackend> {
    recipe: &'a Recipe,
    opts: &'a TrainOptions<'o>,
    device: &'a B::Device,
    dp: Option<&'d mut dyn Replicas<B>>,
}

impl<B: AutodiffBackend> SpecVisitor for Run<'_, '_, '_, B> {
    type Out = Result<TrainReport>;

    fn visit<S: MethodSpec>(self, spec: S) -> Result<TrainReport> {
        let Run {
            recipe,
            opts,
            device,
            mut dp,
        } = self;
        let main = dp.as_ref().is_none_or(|d| d.is_main());
        if let Some(d) = dp.as_deref_mut() {
            if !main {
                d.setup_barrier(device)?;
            }
        }
        let run_dir = recipe.train.output_dir.clone();
        let overwrite = recipe.train.overwrite_output_dir && opts.resume.is_none();
        let resume_dir = match overwrite {
            true => None,
            false => find_resume(&run_dir, opts.resume.as_deref())?,
        };
        let train_first = |r: &Recipe| -> Result<()> {
            if opts.verbose {
                println!(
                    "training {} first ({:?}) -> {}",
                    r.train.output_dir.display(),
                    r.method,
                    r.train.output_dir.join("final").display()
                );
            }
            let sub = TrainOptions {
                resume: None,
                stop_after_steps: None,
                ..*opts
            };
            train::<B>(r, &sub, device).map(drop)
        };
        if let Some(init) = &recipe.model.init_recipe {
            train_sft_first(
                init,
                &recipe.model.path,
                "[model] init_recipe",
                &train_first,
            )?;
        }
        ensure_model(recipe, opts.verbose)?;
        let base_cfg = load_config(&recipe.model.path)?;
        let tok = load_tokenizer(&recipe.model.path, &base_cfg)?;
        let prepared = prepare(&data_config(recipe, &spec), &tok)?;
        say(opts.verbose, prepared.report.summary());
        let pad = Padding {
            id: tok
                .pad_id
                .or(base_cfg.pad_token_id)
                .or(tok.eos_id)
                .unwrap_or(0),
            multiple_of: recipe.train.pad_multiple::<B>(device),
        };
        let resume = match &resume_dir {
            Some(dir) => Some(Resume {
                dir: dir.clone(),
                state: TrainerState::load(dir)?,
            }),
            None => None,
        };
        let (policy_cfg, model, weights) =
            load_policy::<B, S>(&spec, recipe, resume_dir.as_deref(), device)?;
        // The model and data loaded: only now does the run directory appear (or get
        // cleared), so a run that cannot start leaves nothing behind.
        std::fs::create_dir_all(&run_dir)
            .with_context(|| format!("cannot create {}", run_dir.display()))?;
        if overwrite && main {
            clear_run(&run_dir)?;
        }
        let setup = Setup {
            recipe,
            tok: &tok,
            base_cfg: &base_cfg,
            policy_cfg: &policy_cfg,
            train: prepared.train,
            eval: prepared.eval,
            cache_dir: prepared.report.cache_dir.clone(),
            pad,
            device,
            verbose: opts.verbose,
            train_first: &train_first,
        };
        let finish = Finish {
            recipe,
            opts,
            run_dir,
            resume,
            tok: &tok,
            model_cfg: &policy_cfg,
            weights,
            dp,
            key_metrics: spec.key_metrics(),
            eval_reward: spec.eval_loss_is_negative_reward(),
        };
        spec.launch(setup, model, finish)
    }
}

/// What runs the loop on the method a spec built, then exports and samples.
struct Finish<'a, 'o, 'd, B: AutodiffBackend> {
    recipe: &'a Recipe,
    opts: &'a TrainOptions<'o>,
    run_dir: PathBuf,
    resume: Option<Resume>,
    tok: &'a TextTokenizer,
    model_cfg: &'a ModelConfig,
    weights: WeightsFormat,
    /// This process's replica when training data-parallel.
    dp: Option<&'d mut dyn Replicas<B>>,
    key_metrics: &'static [&'static str],
    /// The eval loss is minus the held-out reward.
    eval_reward: bool,
}

impl<B: AutodiffBackend> Drive<B> for Finish<'_, '_, '_, B> {
    type Out = TrainReport;

    fn drive<M: Method<B>>(self, model: CausalLm<B>, method: M) -> Result<TrainReport> {
        finish(self, model, method)
    }
}

/// Run the loop for a method, then export and sample.
fn finish<B: AutodiffBackend, M: Method<B>>(
    ctx: Finish<'_, '_, '_, B>,
    model: CausalLm<B>,
    mut method: M,
) -> Result<TrainReport> {
    let Finish {
        recipe,
        opts,
        run_dir,
        resume,
        tok,
        model_cfg,
        weights,
        mut dp,
        key_metrics,
        eval_reward,
    } = ctx;
    let t = &recipe.train;
    // Data-parallel: a step is `world` times the micro-batches, shared among the ranks.
    let main = dp.as_ref().is_none_or(|d| d.is_main());
    let world = dp.as_ref().map_or(1, |d| d.world());
    let micro_batches = t.gradient_accumulation_steps * world;
    let total = total_steps(recipe, method.steps_per_epoch(micro_batches))?;
    let mut cfg = loop_config(recipe, total, opts);
    cfg.micro_batches = micro_batches;
    if main {
        write_atomic(&run_dir.join("recipe.toml"), recipe.to_toml()?.as_bytes())?;
    }
    let trainable: usize = trainable_params::<B, _>(&model)
        .iter()
        .map(|(_, _, s)| s.iter().product::<usize>())
        .sum();
    say(
        opts.verbose,
        format!(
            "{}: {} with {}: {:.2}M parameters, {:.3}M trainable; {total} steps{}",
            recipe.train.output_dir.display(),
            format!("{:?}", recipe.method).to_lowercase(),
            if recipe.adapter.is_some() {
                "LoRA"
            } else {
                "full fine-tuning"
            },
            model.num_params() as f64 / 1e6,
            trainable as f64 / 1e6,
            resume
                .as_ref()
                .map(|r| format!(
                    ", resuming from step {} ({})",
                    r.state.step,
                    r.dir.display()
                ))
                .unwrap_or_default()
        ),
    );
    let samples_before = if resume.is_none() && main {
        let s = sample(&model.valid(), model_cfg, tok, recipe)?;
        if opts.verbose {
            print_samples(recipe, "before", &s);
        }
        s
    } else {
        vec![]
    };

    if let Some(d) = dp.as_deref_mut() {
        if main {
            // Setup done: the other ranks may set up from what rank 0 wrote.
            d.setup_barrier(&model.device())?;
        }
    }
    let eval_settings = recipe.eval.clone().map(|mut e| {
        e.quiet = true;
        e
    });
    let eval_tasks = match &eval_settings {
        Some(e) => e.parsed_tasks(&e.tasks).context("[eval]")?,
        None => vec![],
    };
    let eval_template = match &eval_settings {
        Some(e) if !eval_tasks.is_empty() => Some(tok.template(Some(&e.template))?),
        _ => None,
    };
    let multiple = t.pad_multiple::<B::InnerBackend>(&model.valid().device());
    let hook: Option<EvalHook<'_, B>> = match (&eval_settings, &eval_template) {
        (Some(settings), Some(template)) => Some(Box::new(|m: &CausalLm<B::InnerBackend>| {
            let ctx = crate::eval::Ctx::new(m, model_cfg, tok, template, settings, multiple);
            crate::eval::metrics_record(&ctx, &eval_tasks)
        })),
        _ => None,
    };
    let result = run_loop_on(
        model,
        &mut method,
        &cfg,
        &weights,
        resume,
        opts.stop,
        dp,
        hook,
    )?;
    let mut report = TrainReport {
        outcome: result.outcome,
        steps: result.steps,
        run_dir: run_dir.clone(),
        final_dir: None,
        first_eval_loss: result.first_eval_loss,
        last_eval_loss: result.last_eval_loss,
        samples_before,
        samples_after: vec![],
    };
    if main {
        // A plot that cannot be drawn is not worth losing the run over.
        if let Err(e) = crate::plots::plot_run(&run_dir) {
            eprintln!("warning: no plots for {}: {e:#}", run_dir.display());
        }
    }
    if let Outcome::Interrupted(step) = result.outcome {
        say(
            opts.verbose,
            format!("interrupted after step {step}: checkpoint saved; continue with --resume auto"),
        );
        return Ok(report);
    }
    if !main {
        return Ok(report);
    }
    let final_dir = run_dir.join("final");
    let inner = result.model.valid();
    let dtype = DiskDtype::parse(&t.export_dtype)?;
    models::atomic::write_dir(&final_dir, |dir| {
        weights.save(&inner, dir, dtype)?;
        method.save_state(dir, false)
    })?;
    report.samples_after = sample(&inner, model_cfg, tok, recipe)?;
    if opts.verbose {
        print_samples(recipe, "after", &report.samples_after);
        match (report.first_eval_loss, report.last_eval_loss) {
            // Online methods log minus the held-out reward as their eval loss.
            (Some(a), Some(b)) if eval_reward => {
                println!("eval reward {:.4} -> {:.4}", -a, -b)
            }
            (Some(a), Some(b)) => println!("eval loss {a:.4} -> {b:.4}"),
            _ => {}
        }
        for (key, first, last) in key_metric_moves(key_metrics, &run_dir) {
            println!("{key} {first:.4} -> {last:.4}");
        }
        println!(
            "wrote {} ({}), {} and {}",
            final_dir.display(),
            weights.kind(),
            run_dir.join("metrics.jsonl").display(),
            run_dir.join("plots").display()
        );
    }
    report.final_dir = Some(final_dir);
    Ok(report)
}
