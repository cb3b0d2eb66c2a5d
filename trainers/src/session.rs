//! `burnish train`: from a recipe to a finished (or resumable) run directory. Sets up the
//! model (building it when the recipe asks), the data and the method, runs the shared loop
//! and exports the result in Hugging Face layout.

use anyhow::{bail, Context, Result};
use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use checkpoints::TrainerState;
use datasets::batch::Padding;
use datasets::cache::Dataset;
use datasets::prepare::{prepare, Prepared};
use models::checkpoint::{load_config, load_model, load_model_stored, load_tokenizer};
use models::generate::{generate, SamplingParams};
use models::presets::{new_model_config, write_new_model, NewModelSpec};
use models::weights::{write_atomic, DiskDtype};
use models::{CausalLm, Message, ModelConfig, TextTokenizer};

use crate::distill::Distill;
use crate::dpo::{reference_table, Dpo, DpoSettings, Reference};
use crate::estimate::{estimate, human_bytes, StepShape};
use crate::method::{BatchShape, Method};
use crate::optim::{trainable_params, AdamWSettings};
use crate::parallel::Replica;
use crate::recipe::{MethodName, Recipe};
use crate::reward::Reward;
use crate::rl::setup::{with_value_head, OnlineSetup};
use crate::schedule::LrSchedule;
use crate::sft::Sft;
use crate::teacher::{model_fingerprint, prepare_teacher};
use crate::train_loop::{find_resume, run_loop_on, EvalHook, LoopConfig, Outcome, Resume};
use crate::weights::WeightsFormat;

pub struct TrainOptions<'a> {
    /// `None`, `auto`, or a checkpoint / run directory.
    pub resume: Option<String>,
    pub show_progress: bool,
    /// Set by Ctrl-C: save a checkpoint and stop after the current step.
    pub stop: &'a AtomicBool,
    /// Print progress lines (data summary, samples, where things were written).
    pub verbose: bool,
    /// Save and stop, as Ctrl-C does, once this many steps are done.
    pub stop_after_steps: Option<u64>,
}

#[derive(Debug)]
pub struct TrainReport {
    pub outcome: Outcome,
    pub steps: u64,
    pub run_dir: PathBuf,
    /// The HF export (`final/`), when the run completed.
    pub final_dir: Option<PathBuf>,
    pub first_eval_loss: Option<f64>,
    pub last_eval_loss: Option<f64>,
    pub samples_before: Vec<String>,
    pub samples_after: Vec<String>,
}

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

fn sft_rows(ds: Dataset, split: &str) -> Result<Vec<datasets::pack::PackedRow>> {
    match ds {
        Dataset::Sft(rows) => Ok(rows),
        other => bail!(
            "this method trains on conversations, but the {split} data are {} rows; use a conversation format (or the method for that data)",
            other.kind()
        ),
    }
}

fn total_steps(recipe: &Recipe, steps_per_epoch: Option<usize>) -> Result<usize> {
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

fn prepare_data(recipe: &Recipe, tok: &TextTokenizer, verbose: bool) -> Result<Prepared> {
    let prepared = prepare(&data_config(recipe), tok)?;
    say(verbose, prepared.report.summary());
    Ok(prepared)
}

/// The recipe's `[data]`, with prompt-answer rows read as conversations for the methods that
/// train on conversations.
fn data_config(recipe: &Recipe) -> datasets::config::DataConfig {
    let mut data = recipe.data.clone();
    data.answers_as_responses |= matches!(recipe.method, MethodName::Sft | MethodName::Distill);
    data
}

/// `--dry-run`: validate everything, load no weights, print the resolved recipe, data
/// counts, steps and a memory estimate (for training on the CPU backend, or on CUDA).
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
        ensure_model_possible(recipe)?;
        let (Some(preset), Some(tok_dir)) =
            (&recipe.model.init_preset, &recipe.model.init_tokenizer)
        else {
            unreachable!("checked above")
        };
        new_model_config(preset, "llama", tok_dir)?
    };
    let prepared = prepare(&data_config(recipe), &tok)?;
    let expected = match recipe.method {
        MethodName::Sft | MethodName::Distill => "sft",
        MethodName::Dpo | MethodName::Reward => "pairs",
        MethodName::Grpo | MethodName::Ppo => "prompts",
    };
    if prepared.train.kind() != expected {
        bail!(
            "method {:?} needs {expected} data, but [data] gives {} rows",
            recipe.method,
            prepared.train.kind()
        );
    }
    let train_rows = prepared.train.len();
    let eval_rows = prepared.eval.len();
    let mb = recipe.train.per_device_train_batch_size;
    let per_step = mb * recipe.train.gradient_accumulation_steps;
    // Online methods: a step's rows are completions, and a rollout may feed several steps.
    let (per_epoch, seq) = match recipe.method {
        MethodName::Grpo => {
            let g = recipe.grpo.clone().unwrap_or_default();
            (
                train_rows.div_ceil((per_step / g.num_generations).max(1)) * g.num_iterations,
                recipe.data.max_seq_len + g.max_completion_length,
            )
        }
        MethodName::Ppo => {
            let p = recipe.ppo.clone().unwrap_or_default();
            let per_rollout = per_step * p.num_mini_batches;
            (
                train_rows.div_ceil(per_rollout) * p.num_ppo_epochs * p.num_mini_batches,
                recipe.data.max_seq_len + p.max_completion_length,
            )
        }
        _ => (train_rows.div_ceil(per_step), recipe.data.max_seq_len),
    };
    let total = total_steps(recipe, Some(per_epoch))?;
    let lora = recipe.adapter.as_ref().map(|a| a.lora());
    // Preference methods put chosen and rejected rows of each pair in one micro-batch.
    let rows = if expected == "pairs" { 2 * mb } else { mb };
    let quantization = recipe.model.quantization()?;
    let step = StepShape {
        micro_batch: rows,
        seq,
        checkpointing: recipe.train.gradient_checkpointing,
        half: recipe.model.half()?.is_some(),
        on_cpu,
    };
    let mut mem = estimate(&cfg, lora.as_ref(), quantization.as_ref(), &step);
    // Full-fine-tuning DPO holds a frozen reference copy unless its log-probs are precomputed.
    let dpo = recipe.dpo.clone().unwrap_or_default();
    if recipe.method == MethodName::Dpo
        && recipe.adapter.is_none()
        && dpo.needs_reference()
        && !dpo.precompute_ref_log_probs
    {
        mem.other_models = mem.weights;
    }
    let others = match (&recipe.method, &recipe.distill) {
        (MethodName::Dpo, _) if mem.other_models > 0 => {
            format!("reference   {}\n", human_bytes(mem.other_models))
        }
        (MethodName::Distill, Some(d)) => match crate::teacher::teacher_bytes(d)? {
            Some(0) => {
                "teacher     none while training (its top-k log-probs are cached first)\n".into()
            }
            Some(b) => {
                mem.other_models = b;
                format!("teacher     {}\n", human_bytes(b))
            }
            None => format!(
                "teacher     not built yet ({} is trained first)\n",
                d.teacher.display()
            ),
        },
        _ => String::new(),
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
        "\n# memory estimate (float32 training{}, micro-batch of {rows} rows x {} tokens)\n\
         parameters  {:.2}M ({:.2}M trainable)\nweights     {}\ngradients   {}\noptimizer   {}\nactivations {}\n{others}total       {}\n",
        match recipe.model.dtype.as_str() {
            "float32" => String::new(),
            half => format!(", frozen base stored in {half}"),
        },
        seq,
        mem.params as f64 / 1e6,
        mem.trainable as f64 / 1e6,
        human_bytes(mem.weights),
        human_bytes(mem.gradients),
        human_bytes(mem.optimizer),
        human_bytes(mem.activations),
        human_bytes(mem.total()),
    ));
    Ok(s)
}

/// What shows a method working, besides its eval loss: DPO's held-out reward accuracy and
/// margin, the reward model's held-out accuracy, the online methods' training reward.
fn key_metrics(method: MethodName) -> &'static [&'static str] {
    match method {
        MethodName::Dpo => &["eval_rewards/accuracies", "eval_rewards/margins"],
        MethodName::Reward => &["eval_accuracy"],
        MethodName::Grpo => &["reward"],
        MethodName::Ppo => &["objective/scores"],
        MethodName::Distill => &["eval_divergence"],
        MethodName::Sft => &[],
    }
}

/// (metric, first logged value, last logged value) of the method's key metrics.
fn key_metric_moves(method: MethodName, run_dir: &Path) -> Vec<(&'static str, f64, f64)> {
    let Ok(records) = crate::metrics::read_metrics(&run_dir.join("metrics.jsonl")) else {
        return vec![];
    };
    key_metrics(method)
        .iter()
        .filter_map(|&key| {
            let values: Vec<f64> = records
                .iter()
                .filter_map(|r| r.get(key)?.as_f64())
                .collect();
            Some((key, *values.first()?, *values.last()?))
        })
        .collect()
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

fn ensure_model_possible(recipe: &Recipe) -> Result<()> {
    if recipe.model.init_preset.is_none() {
        bail!(
            "[model] path {} holds no model (config.json missing) and the recipe sets no init_preset",
            recipe.model.path.display()
        );
    }
    Ok(())
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
/// LoRA adapters when the recipe has an `[adapter]` section.
fn load_policy<B: AutodiffBackend>(
    recipe: &Recipe,
    resume: Option<&Path>,
    device: &B::Device,
) -> Result<(ModelConfig, CausalLm<B>, WeightsFormat)> {
    let base = &recipe.model.path;
    let reward = recipe.method == MethodName::Reward;
    // A reward model grows from a causal LM: its LM head gives way to a fresh score head.
    let as_reward = |cfg: ModelConfig, model: CausalLm<B>| -> (ModelConfig, CausalLm<B>) {
        if !reward || cfg.reward_head {
            return (cfg, model);
        }
        let pad = cfg
            .pad_token_id
            .or(cfg.eos_token_ids.first().copied())
            .unwrap_or(0);
        let std = cfg
            .raw
            .get("initializer_range")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.02);
        (
            cfg.as_reward_model(pad),
            model.with_reward_head(std, recipe.seed),
        )
    };
    match &recipe.adapter {
        None => {
            let dir = resume.unwrap_or(base);
            let (cfg, model) = load_model::<B>(dir, device)?;
            let (cfg, model) = as_reward(cfg, model);
            let tokenizer_dir = base.clone();
            Ok((
                cfg.clone(),
                model,
                WeightsFormat::Full {
                    cfg: Box::new(cfg),
                    tokenizer_dir,
                },
            ))
        }
        Some(a) => {
            let settings = a.lora();
            let quantization = recipe.model.quantization()?;
            let (cfg, model) =
                load_model_stored::<B>(base, device, quantization.as_ref(), recipe.model.half()?)?;
            let (cfg, model) = as_reward(cfg, model);
            let model = match resume {
                Some(dir) => checkpoints::peft::load_adapter(model, dir)?.0,
                None => model.with_lora(&settings, recipe.seed)?,
            };
            Ok((
                cfg,
                model,
                WeightsFormat::Adapter {
                    settings,
                    base_model: base.clone(),
                },
            ))
        }
    }
}

/// What every method's run shares once the model, data and run directory are set up.
struct RunContext<'a> {
    recipe: &'a Recipe,
    opts: &'a TrainOptions<'a>,
    run_dir: PathBuf,
    resume: Option<Resume>,
    tok: TextTokenizer,
    model_cfg: ModelConfig,
    weights: WeightsFormat,
    /// This process's replica when training data-parallel.
    dp: Option<&'a mut Replica>,
}

pub fn train<B: AutodiffBackend>(
    recipe: &Recipe,
    opts: &TrainOptions<'_>,
    device: &B::Device,
) -> Result<TrainReport> {
    train_on::<B>(recipe, opts, device, None)
}

/// [`train`] as one replica of a data-parallel job (`dp`, registered: see
/// [`crate::parallel::run_replicas`]). Rank 0 sets the run up first (clears it, builds a missing model, fills the data and reference
/// caches); the other ranks wait for it, then set up from what it wrote.
pub fn train_on<B: AutodiffBackend>(
    recipe: &Recipe,
    opts: &TrainOptions<'_>,
    device: &B::Device,
    mut dp: Option<&mut Replica>,
) -> Result<TrainReport> {
    let main = dp.as_ref().is_none_or(|d| d.is_main());
    if let Some(d) = dp.as_deref_mut() {
        if !main {
            d.barrier::<B::InnerBackend>("setup", device, d.timeouts.setup)?;
        }
    }
    let run_dir = recipe.train.output_dir.clone();
    let overwrite = recipe.train.overwrite_output_dir && opts.resume.is_none();
    let resume_dir = match overwrite {
        true => None,
        false => find_resume(&run_dir, opts.resume.as_deref())?,
    };
    if let Some(init) = &recipe.model.init_recipe {
        crate::teacher::train_sft_first::<B>(
            init,
            &recipe.model.path,
            "[model] init_recipe",
            opts,
            device,
        )?;
    }
    ensure_model(recipe, opts.verbose)?;
    let cfg0 = load_config(&recipe.model.path)?;
    let tok = load_tokenizer(&recipe.model.path, &cfg0)?;
    let prepared = prepare_data(recipe, &tok, opts.verbose)?;
    let pad = Padding {
        id: tok.pad_id.or(cfg0.pad_token_id).or(tok.eos_id).unwrap_or(0),
        multiple_of: recipe.train.pad_multiple::<B>(device),
    };
    let resume = match &resume_dir {
        Some(dir) => Some(Resume {
            dir: dir.clone(),
            state: TrainerState::load(dir)?,
        }),
        None => None,
    };
    let (model_cfg, model, weights) = load_policy::<B>(recipe, resume_dir.as_deref(), device)?;
    let model = if recipe.method == MethodName::Ppo {
        with_value_head(model, &model_cfg, recipe.seed, resume_dir.as_deref())?
    } else {
        model
    };
    // The model and data loaded: only now does the run directory appear (or get cleared),
    // so a run that cannot start leaves nothing behind.
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    if overwrite && main {
        clear_run(&run_dir)?;
    }
    let cache_dir = prepared.report.cache_dir.clone();
    let ctx = RunContext {
        recipe,
        opts,
        run_dir,
        resume,
        tok,
        model_cfg,
        weights,
        dp,
    };
    match recipe.method {
        MethodName::Sft => {
            let method = Sft::new(
                sft_rows(prepared.train, "train")?,
                sft_rows(prepared.eval, "eval")?,
                batch_shape(recipe, pad),
            )?;
            drive(ctx, model, method)
        }
        MethodName::Dpo => {
            let settings = recipe.dpo.clone().unwrap_or_default();
            let (train, eval) = (
                pair_rows(prepared.train, "train")?,
                pair_rows(prepared.eval, "eval")?,
            );
            let reference = dpo_reference::<B>(
                recipe, &settings, &model, &train, &eval, &cache_dir, pad, device,
            )?;
            let method = Dpo::new(train, eval, batch_shape(recipe, pad), settings, reference)?;
            drive(ctx, model, method)
        }
        MethodName::Distill => {
            let settings = recipe
                .distill
                .clone()
                .context("method distill needs a [distill] section")?;
            let (train, eval) = (
                sft_rows(prepared.train, "train")?,
                sft_rows(prepared.eval, "eval")?,
            );
            let teacher = prepare_teacher::<B>(
                recipe, &settings, &cfg0, &train, &eval, &cache_dir, pad, opts, device,
            )?;
            let mut stop_ids = ctx.tok.stop_ids.clone();
            stop_ids.extend(cfg0.eos_token_ids.iter().copied());
            let method = Distill::<B>::new(
                train,
                eval,
                batch_shape(recipe, pad),
                stop_ids,
                teacher,
                settings,
            )?;
            drive(ctx, model, method)
        }
        MethodName::Grpo | MethodName::Ppo => {
            let setup = OnlineSetup {
                recipe,
                opts,
                tok: &ctx.tok,
                cfg: &cfg0,
                pad,
            };
            if recipe.method == MethodName::Grpo {
                let method = setup.grpo::<B>(prepared.train, prepared.eval, device)?;
                drive(ctx, model, method)
            } else {
                let method = setup.ppo::<B>(prepared.train, prepared.eval, device)?;
                drive(ctx, model, method)
            }
        }
        MethodName::Reward => {
            // Rewards are read at the last token that is not the config's pad id.
            let pad = Padding {
                id: ctx.model_cfg.pad_token_id.unwrap_or(pad.id),
                ..pad
            };
            let method = Reward::new(
                pair_rows(prepared.train, "train")?,
                pair_rows(prepared.eval, "eval")?,
                batch_shape(recipe, pad),
                recipe.reward.clone().unwrap_or_default(),
            )?;
            drive(ctx, model, method)
        }
    }
}

fn batch_shape(recipe: &Recipe, pad: Padding) -> BatchShape {
    BatchShape {
        micro_batch: recipe.train.per_device_train_batch_size,
        eval_batch: recipe.train.per_device_eval_batch_size,
        pad,
        seed: recipe.seed,
    }
}

fn pair_rows(ds: Dataset, split: &str) -> Result<Vec<datasets::tokenize::TokenizedPair>> {
    match ds {
        Dataset::Pairs(rows) => Ok(rows),
        other => bail!(
            "this method trains on preference pairs (prompt, chosen, rejected), but the {split} data are {} rows; \
             use a preference format (preference, hh-rlhf)",
            other.kind()
        ),
    }
}

/// The DPO reference: none (SimPO), the base under the adapters, a frozen copy, or
/// log-probs precomputed once and cached beside the tokenized data.
#[allow(clippy::too_many_arguments)]
fn dpo_reference<B: AutodiffBackend>(
    recipe: &Recipe,
    settings: &DpoSettings,
    policy: &CausalLm<B>,
    train: &[datasets::tokenize::TokenizedPair],
    eval: &[datasets::tokenize::TokenizedPair],
    cache_dir: &Path,
    pad: Padding,
    device: &B::Device,
) -> Result<Reference<B>> {
    if !settings.needs_reference() {
        return Ok(Reference::None);
    }
    let adapters = recipe.adapter.is_some();
    let ref_dir = settings
        .reference_model
        .clone()
        .unwrap_or_else(|| recipe.model.path.clone());
    if adapters && settings.reference_model.is_some() {
        bail!("[dpo] reference_model is for full fine-tuning; with [adapter] the reference is the base with adapters off");
    }
    let load_frozen = || -> Result<CausalLm<B::InnerBackend>> {
        Ok(load_model::<B::InnerBackend>(&ref_dir, device)?.1)
    };
    if !settings.precompute_ref_log_probs {
        return Ok(if adapters {
            Reference::BaseOfAdapters
        } else {
            Reference::Frozen(Box::new(load_frozen()?))
        });
    }
    let path = cache_dir.join(format!("ref_logps-{}.json", model_fingerprint(&ref_dir)?));
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
            if tr.len() == train.len() && ev.len() == eval.len() {
                return Ok(Reference::Precomputed {
                    train: tr,
                    eval: ev,
                });
            }
        }
    }
    let batch = recipe.train.per_device_eval_batch_size;
    let started = std::time::Instant::now();
    let (tr, ev) = if adapters {
        let mut base = policy.valid();
        base.set_adapters_enabled(false);
        (
            reference_table(&base, train, batch, pad),
            reference_table(&base, eval, batch, pad),
        )
    } else {
        let m = load_frozen()?;
        (
            reference_table(&m, train, batch, pad),
            reference_table(&m, eval, batch, pad),
        )
    };
    let json = serde_json::json!({"reference_model": ref_dir, "train": tr, "eval": ev});
    write_atomic(&path, serde_json::to_string(&json)?.as_bytes())?;
    eprintln!(
        "reference log-probs of {} pairs computed in {:.1}s, cached in {}",
        train.len() + eval.len(),
        started.elapsed().as_secs_f64(),
        path.display()
    );
    Ok(Reference::Precomputed {
        train: tr,
        eval: ev,
    })
}

/// Run the loop for a method, then export and sample.
fn drive<B: AutodiffBackend, M: Method<B>>(
    ctx: RunContext<'_>,
    model: CausalLm<B>,
    mut method: M,
) -> Result<TrainReport> {
    let RunContext {
        recipe,
        opts,
        run_dir,
        resume,
        tok,
        model_cfg,
        weights,
        mut dp,
    } = ctx;
    let t = &recipe.train;
    // Data-parallel: a step is `world` times the micro-batches, shared among the ranks.
    let main = dp.as_ref().is_none_or(|d| d.is_main());
    let world = dp.as_ref().map_or(1, |d| d.world);
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
        let s = sample(&model.valid(), &model_cfg, &tok, recipe)?;
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
            d.barrier::<B::InnerBackend>("setup", &model.device(), d.timeouts.setup)?;
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
            let ctx = crate::eval::Ctx::new(m, &model_cfg, &tok, template, settings, multiple);
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
    models::atomic::write_dir(&final_dir, |dir| weights.save(&inner, dir, dtype))?;
    report.samples_after = sample(&inner, &model_cfg, &tok, recipe)?;
    if opts.verbose {
        print_samples(recipe, "after", &report.samples_after);
        match (report.first_eval_loss, report.last_eval_loss) {
            // Online methods log minus the held-out reward as their eval loss.
            (Some(a), Some(b)) if recipe.method.is_online() => {
                println!("eval reward {:.4} -> {:.4}", -a, -b)
            }
            (Some(a), Some(b)) => println!("eval loss {a:.4} -> {b:.4}"),
            _ => {}
        }
        for (key, first, last) in key_metric_moves(recipe.method, &run_dir) {
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
