//! Knowledge distillation from a frozen teacher (same tokenizer) into the trained student:
//!
//! `alpha * T^2 * D(p_teacher^T || p_student^T) + (1 - alpha) * CE(labels)` per trained
//! token (the loss itself, computed in chunks of positions, is in `loss.rs`). The teacher's
//! side comes from a teacher forward each step, or from its top-k log-probs cached once
//! beside the tokenized data. With `lmbda > 0` a step trains, with that probability, on the
//! student's own samples of the prompts instead of the dataset completions (on-policy GKD).

mod loss;
pub mod setup;
pub mod teacher;

use anyhow::{bail, Result};
use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::AutodiffBackend;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::any::Any;
use std::path::PathBuf;

use datasets::batch::{collate_sft, Padding, SftBatch};
use datasets::pack::PackedRow;
use models::generate::{generate, SamplingParams};
use models::CausalLm;

use crate::data_order::{eval_chunks, DataCursor, EpochCursor};
use crate::logprobs::{trained_hidden, trained_logits, TrainedHidden, TrainedLogits};
use crate::method::{BatchShape, LossOutput, Method};

pub use loss::{kd_loss_sum, kd_sums, KdLoss, KdObjective, TeacherTargets};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Divergence {
    ForwardKl,
    ReverseKl,
    Jsd,
}

/// `[distill]`: the teacher and the loss, with GKD's names (`lmbda`, `beta`, `temperature`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillSettings {
    /// Teacher model directory; its tokenizer must be the student's.
    pub teacher: PathBuf,
    /// When `teacher` holds no model yet: an SFT recipe whose run exports it there (its
    /// `output_dir/final`), trained first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_recipe: Option<PathBuf>,
    /// Load the teacher's linear layers in NF4 (`"nf4"`) to save memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_quantize: Option<String>,
    #[serde(default = "half")]
    pub alpha: f64,
    #[serde(default = "one")]
    pub temperature: f64,
    #[serde(default = "forward")]
    pub divergence: Divergence,
    /// JSD interpolation (GKD's `beta`).
    #[serde(default = "half")]
    pub beta: f64,
    /// Train from the teacher's top-k log-probs, computed once and cached beside the data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    /// Probability that a step trains on the student's own samples (on-policy GKD).
    #[serde(default)]
    pub lmbda: f64,
    /// Completion length of on-policy samples.
    #[serde(default = "default_new_tokens")]
    pub max_new_tokens: usize,
    #[serde(default = "one")]
    pub sampling_temperature: f64,
}

fn half() -> f64 {
    0.5
}
fn one() -> f64 {
    1.0
}
fn forward() -> Divergence {
    Divergence::ForwardKl
}
fn default_new_tokens() -> usize {
    64
}

impl DistillSettings {
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.alpha) {
            bail!("[distill] alpha must be in [0, 1], got {}", self.alpha);
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            bail!(
                "[distill] temperature must be positive, got {}",
                self.temperature
            );
        }
        if !(0.0..=1.0).contains(&self.beta) {
            bail!("[distill] beta must be in [0, 1], got {}", self.beta);
        }
        if !(0.0..=1.0).contains(&self.lmbda) {
            bail!("[distill] lmbda must be in [0, 1], got {}", self.lmbda);
        }
        if self.top_k == Some(0) {
            bail!("[distill] top_k must be at least 1");
        }
        Ok(())
    }

    /// The loss parameters, the divergence folded into a JSD `beta`.
    pub fn loss(&self) -> KdLoss {
        KdLoss {
            alpha: self.alpha,
            temperature: self.temperature,
            beta: match self.divergence {
                Divergence::ForwardKl => 0.0,
                Divergence::ReverseKl => 1.0,
                Divergence::Jsd => self.beta,
            },
        }
    }
}

/// The teacher's targets for a collated batch: its hidden states at the trained positions
/// (its logits are recomputed chunk by chunk in the loss), the full tempered distribution
/// when its head is not a plain weight, or (with `top_k`) its k most likely tokens at
/// temperature 1.
pub fn teacher_targets<B: Backend>(
    teacher: &CausalLm<B>,
    batch: &SftBatch,
    temperature: f64,
    top_k: Option<usize>,
) -> TeacherTargets {
    let empty = || TeacherTargets::TopK {
        ids: vec![],
        logps: vec![],
        k: top_k.unwrap_or(1),
    };
    if top_k.is_none() && teacher.has_plain_head() {
        return match trained_hidden(teacher, batch) {
            Some(TrainedHidden { hidden, .. }) => TeacherTargets::Hidden(hidden.into_data()),
            None => empty(),
        };
    }
    let Some(TrainedLogits { logits, .. }) = trained_logits(teacher, batch) else {
        return empty();
    };
    match top_k {
        None => TeacherTargets::Full(log_softmax(logits.div_scalar(temperature), 1).into_data()),
        Some(k) => {
            let k = k.min(teacher.vocab_size());
            let (values, ids) = log_softmax(logits, 1).topk_with_indices(k, 1);
            TeacherTargets::TopK {
                ids: ids.into_data().iter::<i64>().map(|v| v as i32).collect(),
                logps: values.into_data().iter::<f32>().collect(),
                k,
            }
        }
    }
}

/// A tensor of the teacher's backend (the training backend's inner one) on the backend a
/// loss runs on: that inner backend itself (evaluation) or the training backend, where it
/// enters untracked.
fn on_loss_backend<B: AutodiffBackend, Bk: Backend, const D: usize>(
    t: Tensor<B::InnerBackend, D>,
) -> Tensor<Bk, D> {
    let boxed: Box<dyn Any> = Box::new(t);
    let boxed = match boxed.downcast::<Tensor<Bk, D>>() {
        Ok(t) => return *t,
        Err(boxed) => boxed,
    };
    let t = *boxed
        .downcast::<Tensor<B::InnerBackend, D>>()
        .expect("the input is unchanged");
    let tracked: Box<dyn Any> = Box::new(Tensor::<B, D>::from_inner(t));
    *tracked
        .downcast::<Tensor<Bk, D>>()
        .expect("a loss runs on the training backend or its inner backend")
}

/// A student micro-batch and the teacher's targets for it.
pub struct DistillBatch {
    pub batch: SftBatch,
    pub teacher: TeacherTargets,
}

/// Per row, the teacher's top-k at each trained position (the cached form).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RowTopK {
    pub ids: Vec<i32>,
    pub logps: Vec<f32>,
}

pub enum TeacherSource<B: Backend> {
    /// A teacher forward for every batch.
    Online(Box<CausalLm<B>>),
    /// Cached top-k rows (train, eval); the model too when on-policy steps need it.
    Cached {
        train: Vec<RowTopK>,
        eval: Vec<RowTopK>,
        k: usize,
        model: Option<Box<CausalLm<B>>>,
    },
}

impl<B: Backend> TeacherSource<B> {
    fn model(&self) -> Option<&CausalLm<B>> {
        match self {
            TeacherSource::Online(m) => Some(m),
            TeacherSource::Cached { model, .. } => model.as_deref(),
        }
    }
}

/// Top-k rows of the teacher over `rows`, in micro-batches of `batch`.
pub fn teacher_top_k<B: Backend>(
    teacher: &CausalLm<B>,
    rows: &[PackedRow],
    batch: usize,
    k: usize,
    pad: Padding,
) -> Vec<RowTopK> {
    let mut out = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(batch.max(1)) {
        let collated = collate_sft(chunk, pad, batch);
        let TeacherTargets::TopK { ids, logps, k } =
            teacher_targets(teacher, &collated, 1.0, Some(k))
        else {
            unreachable!("top-k requested")
        };
        let mut at = 0;
        for w in &collated.weights {
            let n = w.iter().filter(|&&x| x).count();
            out.push(RowTopK {
                ids: ids[at * k..(at + n) * k].to_vec(),
                logps: logps[at * k..(at + n) * k].to_vec(),
            });
            at += n;
        }
    }
    out
}

pub struct Distill<B: AutodiffBackend> {
    train: Vec<PackedRow>,
    eval: Vec<PackedRow>,
    shape: BatchShape,
    stop_ids: Vec<u32>,
    cursor: DistillCursor,
    teacher: TeacherSource<B::InnerBackend>,
    settings: DistillSettings,
    loss: KdLoss,
}

/// The rows' order, and the steps taken (they seed the on-policy sampling).
struct DistillCursor {
    rows: EpochCursor,
    steps_taken: u64,
}

impl DataCursor for DistillCursor {
    fn epoch(&self) -> f64 {
        self.rows.epoch()
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"data": self.rows.to_json(), "steps": self.steps_taken})
    }

    fn restore(&mut self, cursor: &serde_json::Value) -> Result<()> {
        self.steps_taken = cursor["steps"].as_u64().unwrap_or(0);
        self.rows.restore(&cursor["data"])
    }
}

impl<B: AutodiffBackend> Distill<B> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        train: Vec<PackedRow>,
        eval: Vec<PackedRow>,
        shape: BatchShape,
        stop_ids: Vec<u32>,
        teacher: TeacherSource<B::InnerBackend>,
        settings: DistillSettings,
    ) -> Result<Self> {
        settings.validate()?;
        if train.is_empty() {
            bail!("the training split is empty: nothing to distil on");
        }
        if settings.lmbda > 0.0 {
            if teacher.model().is_none() {
                bail!("[distill] lmbda > 0 samples from the student: the teacher model must be loaded to score the samples");
            }
            if train.iter().any(|r| r.segments.iter().any(|&s| s > 1)) {
                bail!("[distill] lmbda > 0 needs one conversation per row: set [data] packing = false");
            }
        }
        Ok(Self {
            cursor: DistillCursor {
                rows: EpochCursor::new(train.len(), shape.seed),
                steps_taken: 0,
            },
            train,
            eval,
            shape,
            stop_ids,
            loss: settings.loss(),
            teacher,
            settings,
        })
    }

    fn batch(&self, rows: &[usize], eval: bool) -> DistillBatch {
        let from = if eval { &self.eval } else { &self.train };
        let picked: Vec<PackedRow> = rows.iter().map(|&i| from[i].clone()).collect();
        let batch = collate_sft(&picked, self.shape.pad, self.shape.capacity(eval));
        let teacher = match &self.teacher {
            TeacherSource::Online(m) => teacher_targets(m, &batch, self.loss.temperature, None),
            TeacherSource::Cached {
                train, eval: ev, k, ..
            } => {
                let table = if eval { ev } else { train };
                // Bucket padding positions get a uniform (finite) target; they weigh 0.
                let slots = batch.num_trained_padded() * k;
                let mut ids: Vec<i32> = rows.iter().flat_map(|&i| table[i].ids.clone()).collect();
                let mut logps: Vec<f32> =
                    rows.iter().flat_map(|&i| table[i].logps.clone()).collect();
                ids.resize(slots, 0);
                logps.resize(slots, 0.0);
                TeacherTargets::TopK { ids, logps, k: *k }
            }
        };
        DistillBatch { batch, teacher }
    }

    /// The rows' prompts completed by the student, every sampled token trained, scored by
    /// the teacher online.
    fn on_policy(&self, policy: &CausalLm<B>, rows: &[usize]) -> Result<DistillBatch> {
        let student = policy.valid();
        let prompts: Vec<Vec<u32>> = rows
            .iter()
            .map(|&i| {
                let r = &self.train[i];
                let first = r.trained.iter().position(|&t| t).unwrap_or(r.ids.len());
                r.ids[..first.max(1)].to_vec()
            })
            .collect();
        let params = SamplingParams {
            max_new_tokens: self.settings.max_new_tokens,
            temperature: self.settings.sampling_temperature as f32,
            top_k: 0,
            top_p: 1.0,
            seed: self.shape.seed ^ self.cursor.steps_taken.wrapping_mul(0x9E37_79B9),
            stop_ids: self.stop_ids.clone(),
            pad_id: self.shape.pad.id,
            shape_multiple: self.shape.pad.multiple_of,
        };
        let generations = generate(&student, &prompts, &params, None)?;
        let sampled: Vec<PackedRow> = prompts
            .iter()
            .zip(&generations)
            .map(|(p, g)| PackedRow::completion([p.as_slice(), &g.tokens].concat(), p.len()))
            .collect();
        let batch = collate_sft(&sampled, self.shape.pad, self.shape.micro_batch);
        let teacher = self.teacher.model().expect("checked in new");
        Ok(DistillBatch {
            teacher: teacher_targets(teacher, &batch, self.loss.temperature, None),
            batch,
        })
    }
}

impl<B: AutodiffBackend> Method<B> for Distill<B> {
    type Batch = DistillBatch;

    fn next_step(
        &mut self,
        policy: &CausalLm<B>,
        micro_batches: usize,
    ) -> Result<Option<Vec<DistillBatch>>> {
        let steps = self
            .cursor
            .rows
            .next_micro_batches(self.shape.micro_batch, micro_batches);
        // One draw per step, a function of (seed, step), so resumed runs repeat it.
        let mut rng = StdRng::seed_from_u64(
            self.shape.seed ^ (self.cursor.steps_taken + 1).wrapping_mul(0xA24B_AED4_963E_E407),
        );
        let on_policy = self.settings.lmbda > 0.0 && rng.random::<f64>() < self.settings.lmbda;
        let out = steps
            .iter()
            .map(|c| {
                if on_policy {
                    self.on_policy(policy, c)
                } else {
                    Ok(self.batch(c, false))
                }
            })
            .collect::<Result<Vec<_>>>()?;
        self.cursor.steps_taken += 1;
        Ok(Some(out))
    }

    fn weight(&self, batch: &DistillBatch) -> f64 {
        batch.batch.num_trained() as f64
    }

    fn tokens(&self, batch: &DistillBatch) -> usize {
        batch.batch.num_tokens()
    }

    fn loss<Bk: Backend>(&self, model: &CausalLm<Bk>, batch: &DistillBatch) -> LossOutput<Bk> {
        let Some(TrainedHidden {
            hidden,
            targets,
            mask,
            ..
        }) = trained_hidden(model, &batch.batch)
        else {
            return LossOutput {
                loss_sum: Tensor::zeros([1], &model.device()),
                metric_sums: vec![],
            };
        };
        let teacher_head = match &batch.teacher {
            TeacherTargets::Hidden(_) => self
                .teacher
                .model()
                .and_then(CausalLm::plain_head)
                .map(on_loss_backend::<B, Bk, 2>),
            _ => None,
        };
        let (objective, aux) = KdObjective::new(self.loss, targets, &batch.teacher, teacher_head);
        let rows = model.head_rows(hidden, aux, &objective, 1.0);
        let (loss, div, ce) = kd_sums(rows, &mask);
        LossOutput {
            loss_sum: loss,
            metric_sums: vec![
                ("divergence", div.into_scalar().elem::<f64>()),
                ("ce", ce.into_scalar().elem::<f64>()),
            ],
        }
    }

    fn eval_batches(&mut self, _policy: &CausalLm<B>) -> Result<Vec<DistillBatch>> {
        let chunks = eval_chunks(self.eval.len(), self.shape.eval_batch);
        Ok(chunks.iter().map(|c| self.batch(c, true)).collect())
    }

    fn steps_per_epoch(&self, micro_batches: usize) -> Option<usize> {
        Some(
            self.cursor
                .rows
                .steps_per_epoch(self.shape.micro_batch * micro_batches),
        )
    }

    fn data_cursor(&self) -> &dyn DataCursor {
        &self.cursor
    }

    fn data_cursor_mut(&mut self) -> &mut dyn DataCursor {
        &mut self.cursor
    }
}
