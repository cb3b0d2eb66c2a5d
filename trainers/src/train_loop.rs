//! The one training loop every method runs on: invariant gradient accumulation, global-norm
//! clipping, AdamW, lr schedule, evaluation, metrics, progress, checkpoints, exact resume,
//! Ctrl-C and NaN handling.

use anyhow::{bail, Context, Result};
use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use checkpoints::run_dir::{prune_checkpoints, write_dir_atomically, OPTIMIZER_FILE};
use checkpoints::tensors::{load_tensors, save_tensors};
use checkpoints::{step_dir, TrainerState};
use models::CausalLm;

use crate::accumulate::{
    accumulate_gradients, accumulate_gradients_over, accumulate_metrics, step_weight, StepGradients,
};
use crate::method::Method;
use crate::metrics::MetricsLog;
use crate::optim::{global_grad_norm, AdamW, AdamWSettings};
use crate::replicas::Replicas;
use crate::schedule::LrSchedule;
use crate::weights::WeightsFormat;

pub struct LoopConfig {
    pub total_steps: usize,
    /// Micro-batches per optimizer step (gradient accumulation).
    pub micro_batches: usize,
    pub schedule: LrSchedule,
    pub adam: AdamWSettings,
    /// 0 = no clipping.
    pub max_grad_norm: f64,
    pub eval_steps: usize,
    pub eval_on_start: bool,
    pub save_steps: usize,
    pub save_total_limit: usize,
    pub logging_steps: usize,
    pub seed: u64,
    pub run_dir: PathBuf,
    pub recipe_fingerprint: String,
    pub show_progress: bool,
    /// Stop as Ctrl-C does (checkpoint, then exit) once this many steps are done: for
    /// preemptible jobs that get a fixed slice of time.
    pub stop_after_steps: Option<u64>,
    /// TensorBoard / CSV besides metrics.jsonl (`[train] report_to`).
    pub report_to: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    /// Stopped by Ctrl-C (or the stop flag) after this many steps; a checkpoint was saved.
    Interrupted(u64),
}

pub struct LoopResult<B: AutodiffBackend> {
    pub model: CausalLm<B>,
    pub outcome: Outcome,
    pub steps: u64,
    pub last_eval_loss: Option<f64>,
    pub first_eval_loss: Option<f64>,
}

/// A resume point: a checkpoint directory and its state (weights are loaded by the caller).
pub struct Resume {
    pub dir: PathBuf,
    pub state: TrainerState,
}

/// Per-step seed of the backend RNG (dropout): a function of (seed, step), so a resumed run
/// draws exactly the masks the uninterrupted run drew.
pub(crate) fn step_seed(seed: u64, step: u64) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step.wrapping_mul(0xD1B5_4A32_D192_ED03)
}

/// Where the method stands in its data, as a checkpoint records it.
struct DataPosition {
    epoch: f64,
    cursor: Value,
}

impl DataPosition {
    fn of<B: AutodiffBackend, M: Method<B>>(method: &M) -> Self {
        Self {
            epoch: method.data_cursor().epoch(),
            cursor: method.data_cursor().to_json(),
        }
    }
}

struct Checkpointer<'a> {
    cfg: &'a LoopConfig,
    weights: &'a WeightsFormat,
    last_saved: Option<u64>,
    /// Only data-parallel rank 0 writes; the others name the directory it writes.
    enabled: bool,
    world_size: u64,
}

impl Checkpointer<'_> {
    #[allow(clippy::too_many_arguments)]
    fn save<B: AutodiffBackend, M: Method<B>>(
        &mut self,
        model: &CausalLm<B>,
        opt: &AdamW<B>,
        method: &M,
        data: &DataPosition,
        step: u64,
        tokens_seen: u64,
        elapsed_s: f64,
    ) -> Result<PathBuf> {
        let dir = step_dir(&self.cfg.run_dir, step);
        if self.last_saved == Some(step) || !self.enabled {
            return Ok(dir);
        }
        let state = TrainerState {
            step,
            total_steps: self.cfg.total_steps as u64,
            epoch: data.epoch,
            seed: self.cfg.seed,
            weights: self.weights.kind().into(),
            data_cursor: data.cursor.clone(),
            tokens_seen,
            elapsed_s,
            recipe_fingerprint: self.cfg.recipe_fingerprint.clone(),
            world_size: self.world_size,
        };
        write_dir_atomically(&dir, |tmp| {
            self.weights
                .save(&model.valid(), tmp, models::weights::DiskDtype::F32)?;
            save_tensors(
                &tmp.join(OPTIMIZER_FILE),
                &opt.state_tensors(model),
                &opt.state_metadata(),
            )?;
            method.save_state(tmp, true)?;
            state.save(tmp)
        })
        .with_context(|| format!("saving checkpoint {}", dir.display()))?;
        prune_checkpoints(&self.cfg.run_dir, self.cfg.save_total_limit)?;
        self.last_saved = Some(step);
        Ok(dir)
    }
}

fn evaluate<B: AutodiffBackend, M: Method<B>>(
    model: &CausalLm<B>,
    method: &mut M,
) -> Result<Option<(f64, Map<String, Value>)>> {
    let batches = method.eval_batches(model)?;
    if batches.is_empty() {
        return Ok(None);
    }
    let inner = model.valid();
    let (mut loss, mut weight) = (0.0f64, 0.0f64);
    let mut sums: Vec<(&'static str, f64)> = vec![];
    for b in &batches {
        let out = method.loss(&inner, b);
        loss += out.loss_sum.into_scalar().elem::<f64>();
        weight += method.weight(b);
        accumulate_metrics(&mut sums, &out.metric_sums);
    }
    let weight = weight.max(1e-12);
    let mut m = Map::new();
    let eval_loss = loss / weight;
    m.insert("eval_loss".into(), json!(eval_loss));
    if method.loss_is_token_nll() {
        m.insert("eval_ppl".into(), json!(eval_loss.exp()));
    }
    for (k, v) in sums {
        m.insert(format!("eval_{k}"), json!(v / weight));
    }
    Ok(Some((eval_loss, m)))
}

fn progress_bar(cfg: &LoopConfig, start: u64) -> ProgressBar {
    if !cfg.show_progress {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(cfg.total_steps as u64);
    pb.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
        )
        .expect("valid template"),
    );
    pb.set_position(start);
    pb
}

/// Run the loop from step 0 or from `resume` until `total_steps`, Ctrl-C (`stop`), or a
/// non-finite loss or gradient (an error, after saving the last good state).
pub fn run_loop<B: AutodiffBackend, M: Method<B>>(
    model: CausalLm<B>,
    method: &mut M,
    cfg: &LoopConfig,
    weights: &WeightsFormat,
    resume: Option<Resume>,
    stop: &AtomicBool,
) -> Result<LoopResult<B>> {
    run_loop_on(model, method, cfg, weights, resume, stop, None, None)
}

/// Extra evaluation at every evaluation point (a recipe's `[eval]` tasks), on the model
/// without autodiff; its metrics join that step's record. The main rank runs it.
pub type EvalHook<'a, B> = Box<
    dyn FnMut(&CausalLm<<B as AutodiffBackend>::InnerBackend>) -> Result<Map<String, Value>> + 'a,
>;

/// [`run_loop`] as one replica of a data-parallel job (`dp`), or alone (`None`): each step's
/// micro-batches are shared among the ranks and their gradients summed; only rank 0 logs
/// and writes checkpoints; a stop (Ctrl-C) takes effect on every rank at the same step.
#[allow(clippy::too_many_arguments)]
pub fn run_loop_on<B: AutodiffBackend, M: Method<B>>(
    mut model: CausalLm<B>,
    method: &mut M,
    cfg: &LoopConfig,
    weights: &WeightsFormat,
    resume: Option<Resume>,
    stop: &AtomicBool,
    mut dp: Option<&mut dyn Replicas<B>>,
    mut hook: Option<EvalHook<'_, B>>,
) -> Result<LoopResult<B>> {
    let main = dp.as_ref().is_none_or(|d| d.is_main());
    let device = model.device();
    let mut opt = AdamW::<B>::new(cfg.adam);
    let mut ckpt = Checkpointer {
        cfg,
        weights,
        last_saved: None,
        enabled: main,
        world_size: dp.as_ref().map_or(1, |d| d.world() as u64),
    };
    let (mut step, mut tokens_seen, elapsed_before) = match &resume {
        Some(r) => {
            if r.state.recipe_fingerprint != cfg.recipe_fingerprint {
                bail!(
                    "checkpoint {} was made with a different recipe (model, data, adapter or optimizer settings changed); \
                     resume needs the same recipe, or start a new output_dir",
                    r.dir.display()
                );
            }
            if r.state.world_size != ckpt.world_size {
                bail!(
                    "checkpoint {} was trained on {} data-parallel replica(s), this run has {}: a step is the \
                     replicas' combined batch, so resume with the same number of devices and processes",
                    r.dir.display(),
                    r.state.world_size,
                    ckpt.world_size
                );
            }
            let saved = load_tensors(&r.dir.join(OPTIMIZER_FILE))?;
            opt.load_state(&model, r.state.step, saved)
                .with_context(|| format!("restoring the optimizer from {}", r.dir.display()))?;
            method.data_cursor_mut().restore(&r.state.data_cursor)?;
            method.restore_state(&r.dir)?;
            ckpt.last_saved = Some(r.state.step);
            (r.state.step, r.state.tokens_seen, r.state.elapsed_s)
        }
        None => (0, 0, 0.0),
    };
    let mut log = match main {
        true => Some(MetricsLog::open(
            &cfg.run_dir.join("metrics.jsonl"),
            step,
            &cfg.report_to,
        )?),
        false => None,
    };
    if let Some(d) = dp.as_deref_mut() {
        model = d.sync_params(model)?;
    }
    let started = Instant::now();
    let elapsed = || elapsed_before + started.elapsed().as_secs_f64();
    let mut first_eval_loss = None;
    let mut last_eval_loss = None;
    if step == 0 && cfg.eval_on_start {
        let mut rec = Map::new();
        if let Some((loss, m)) = evaluate(&model, method)? {
            first_eval_loss = Some(loss);
            last_eval_loss = Some(loss);
            rec = m;
        }
        if let Some(h) = hook.as_mut().filter(|_| main) {
            rec.extend(h(&model.valid())?);
        }
        if !rec.is_empty() {
            rec.insert("step".into(), json!(0));
            rec.insert("epoch".into(), json!(0.0));
            rec.insert("elapsed_s".into(), json!(elapsed()));
            if let Some(log) = &mut log {
                log.write(&rec)?;
            }
        }
    }
    let pb = progress_bar(cfg, step);
    let total = cfg.total_steps as u64;
    let first_step = step + 1;
    while step < total {
        let stopping = match &dp {
            Some(d) => d.stop_agreed(),
            None => stop.load(Ordering::SeqCst),
        };
        if stopping || cfg.stop_after_steps.is_some_and(|n| step >= n) {
            let dir = ckpt.save(
                &model,
                &opt,
                method,
                &DataPosition::of(method),
                step,
                tokens_seen,
                elapsed(),
            )?;
            pb.abandon_with_message(format!("interrupted: saved {}", dir.display()));
            return Ok(LoopResult {
                model,
                outcome: Outcome::Interrupted(step),
                steps: step,
                last_eval_loss,
                first_eval_loss,
            });
        }
        let t0 = Instant::now();
        let seed = step_seed(cfg.seed, step);
        B::seed(&device, seed);
        models::lora::reseed_dropout(seed);
        // A step that fails is saved as not taken: the data position from before it.
        let before = DataPosition::of(method);
        let Some(batches) = method.next_step(&model, cfg.micro_batches)? else {
            break;
        };
        let data_s = t0.elapsed().as_secs_f64();
        let acc = match dp.as_deref_mut() {
            Some(d) => {
                let total_weight = step_weight(method, &batches)?;
                let (lo, hi) = d.share(batches.len(), step, seed);
                let local =
                    accumulate_gradients_over(&model, method, &batches[lo..hi], total_weight)?;
                d.combine(&model, local, lo, stop.load(Ordering::SeqCst))?
            }
            None => accumulate_gradients(&model, method, &batches)?,
        };
        if let Some((i, value)) = acc.non_finite {
            let dir = ckpt.save(&model, &opt, method, &before, step, tokens_seen, elapsed())?;
            bail!(
                "loss is {value} at step {} (micro-batch {i}): stopped; the last good state (step {step}) is in {}. \
                 Lower learning_rate, check the data, or resume from there",
                step + 1,
                dir.display()
            );
        }
        let StepGradients {
            grads,
            loss,
            metric_sums: sums,
            tokens,
            total_weight,
            forward_s,
            backward_s,
            ..
        } = acc;
        let t_opt = Instant::now();
        let grad_norm = global_grad_norm(&model, &grads);
        if !grad_norm.is_finite() {
            let dir = ckpt.save(&model, &opt, method, &before, step, tokens_seen, elapsed())?;
            bail!(
                "gradient norm is {grad_norm} at step {}: stopped without applying it; the last good state (step {step}) is in {}",
                step + 1,
                dir.display()
            );
        }
        let clip = if cfg.max_grad_norm > 0.0 && grad_norm > cfg.max_grad_norm {
            cfg.max_grad_norm / (grad_norm + 1e-6)
        } else {
            1.0
        };
        let lr = cfg.schedule.lr(step as usize);
        model = opt.step(model, grads, lr, clip);
        let optimizer_s = t_opt.elapsed().as_secs_f64();
        step += 1;
        tokens_seen += tokens as u64;
        let secs = t0.elapsed().as_secs_f64();

        let mut rec = Map::new();
        rec.insert("step".into(), json!(step));
        rec.insert("epoch".into(), json!(method.data_cursor().epoch()));
        rec.insert("loss".into(), json!(loss));
        for (k, v) in &sums {
            rec.insert((*k).into(), json!(v / total_weight));
        }
        rec.insert("lr".into(), json!(lr));
        rec.insert("grad_norm".into(), json!(grad_norm));
        rec.insert("tokens".into(), json!(tokens_seen));
        rec.insert("tokens_per_s".into(), json!(tokens as f64 / secs.max(1e-9)));
        // Where the step's wall time went: batches (and rollouts), loss forward, backward,
        // optimizer (norm, clipping, AdamW); the rest is gradient exchange and bookkeeping.
        rec.insert("time/step_s".into(), json!(secs));
        rec.insert("time/data_s".into(), json!(data_s));
        rec.insert("time/forward_s".into(), json!(forward_s));
        rec.insert("time/backward_s".into(), json!(backward_s));
        rec.insert("time/optimizer_s".into(), json!(optimizer_s));
        if let Some(n) = models::kernel_cache::kernels_compiled() {
            rec.insert("kernels_compiled".into(), json!(n));
            if step == first_step && main {
                let line = format!(
                    "first step: {secs:.1} s after {:.1} s of evaluation; {n} kernels compiled so far (cache {})",
                    started.elapsed().as_secs_f64() - secs,
                    models::kernel_cache::cubecl_dir().display()
                );
                match pb.is_hidden() {
                    true => eprintln!("{line}"),
                    false => pb.println(line),
                }
            }
        }
        let last = step == total;
        let evaluating = (cfg.eval_steps > 0 && step % cfg.eval_steps as u64 == 0) || last;
        if evaluating {
            if let Some((l, m)) = evaluate(&model, method)? {
                last_eval_loss = Some(l);
                first_eval_loss.get_or_insert(l);
                rec.extend(m);
            }
            if let Some(h) = hook.as_mut().filter(|_| main) {
                rec.extend(h(&model.valid())?);
            }
        }
        rec.insert("elapsed_s".into(), json!(elapsed()));
        let has_eval = rec.keys().any(|k| k.starts_with("eval_"));
        if step % cfg.logging_steps.max(1) as u64 == 0 || last || has_eval {
            if let Some(log) = &mut log {
                log.write(&rec)?;
            }
        }
        pb.set_position(step);
        pb.set_message(format!(
            "loss {loss:.4}  lr {lr:.2e}  {:.0} tok/s{}",
            tokens as f64 / secs.max(1e-9),
            last_eval_loss
                .map(|l| format!("  eval {l:.4}"))
                .unwrap_or_default()
        ));
        if (cfg.save_steps > 0 && step % cfg.save_steps as u64 == 0) || last {
            ckpt.save(
                &model,
                &opt,
                method,
                &DataPosition::of(method),
                step,
                tokens_seen,
                elapsed(),
            )?;
        }
    }
    pb.finish();
    Ok(LoopResult {
        model,
        outcome: Outcome::Completed,
        steps: step,
        last_eval_loss,
        first_eval_loss,
    })
}

/// The checkpoint `--resume` names: `auto` = the newest in the run directory (none: start
/// fresh), else a checkpoint directory or a run directory.
pub fn find_resume(run_dir: &Path, arg: Option<&str>) -> Result<Option<PathBuf>> {
    let newest = |dir: &Path| checkpoints::latest_checkpoint(dir).map(|c| c.map(|(_, d)| d));
    match arg {
        None => {
            if let Some(dir) = newest(run_dir)? {
                bail!(
                    "{} already holds checkpoints (newest {}): pass --resume auto to continue, or choose another [train] output_dir",
                    run_dir.display(),
                    dir.display()
                );
            }
            Ok(None)
        }
        Some("auto") => newest(run_dir),
        Some(path) => {
            let p = PathBuf::from(path);
            if p.join(checkpoints::run_dir::STATE_FILE).exists() {
                Ok(Some(p))
            } else {
                newest(&p)?
                    .map(Some)
                    .with_context(|| format!("--resume {path}: no checkpoint there (expected step-NNNNNN/ with trainer_state.json)"))
            }
        }
    }
}
