//! What a method owns besides its loss: the data it trains on, how it sets itself up from a
//! recipe (reference, heads, teacher, reward models), what the dry run counts for it and
//! which metrics show it working. The session orchestrates through this trait only; the
//! list of methods is `crate::methods`.

use anyhow::{bail, Result};
use burn::tensor::backend::AutodiffBackend;
use std::path::{Path, PathBuf};

use datasets::batch::Padding;
use datasets::cache::Dataset;
use datasets::pack::PackedRow;
use datasets::tokenize::{TokenizedPair, TokenizedPrompt};
use models::{CausalLm, ModelConfig, TextTokenizer};

use crate::method::{BatchShape, Method};
use crate::prerequisites::TrainFirst;
use crate::recipe::Recipe;

/// The row kinds of `[data]` (`Dataset::kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataKind {
    /// Conversations or prompt-completion rows, templated and masked.
    Sft,
    /// Preference pairs (prompt, chosen, rejected).
    Pairs,
    /// Prompts that online methods complete themselves.
    Prompts,
    /// Completions labelled desirable or not (KTO).
    Unpaired,
}

impl DataKind {
    pub fn name(self) -> &'static str {
        match self {
            DataKind::Sft => "sft",
            DataKind::Pairs => "pairs",
            DataKind::Prompts => "prompts",
            DataKind::Unpaired => "unpaired",
        }
    }
}

/// One optimizer step as the dry run sees it.
pub struct StepPlan {
    pub steps_per_epoch: usize,
    /// Longest sequence through the model (prompt plus generated completion for online methods).
    pub seq: usize,
    /// Rows through the model in one micro-batch.
    pub rows: usize,
}

/// A model held beside the policy while it trains, for the dry run's memory estimate.
pub struct OtherModel {
    /// What it is (`reference`, `teacher`), as the estimate prints it.
    pub label: &'static str,
    /// Its bytes, or why there are none to count (`None` with a reason).
    pub bytes: Result<u64, String>,
}

/// What the session hands a method to set itself up.
pub struct Setup<'a, B: AutodiffBackend> {
    pub recipe: &'a Recipe,
    pub tok: &'a TextTokenizer,
    /// The base model's config (the policy's own may differ: a reward model's score head).
    pub base_cfg: &'a ModelConfig,
    pub policy_cfg: &'a ModelConfig,
    pub train: Dataset,
    pub eval: Dataset,
    /// Where the tokenized data are cached: caches computed from them go beside.
    pub cache_dir: PathBuf,
    pub pad: Padding,
    pub device: &'a B::Device,
    /// Print what setting up does (caches computed, models trained first).
    pub verbose: bool,
    /// Trains a recipe whose export this run needs first.
    pub train_first: &'a TrainFirst<'a>,
}

impl<B: AutodiffBackend> Setup<'_, B> {
    pub fn batch_shape(&self, pad: Padding) -> BatchShape {
        let t = &self.recipe.train;
        BatchShape {
            micro_batch: t.per_device_train_batch_size,
            eval_batch: t.per_device_eval_batch_size,
            pad,
            seed: self.recipe.seed,
        }
    }

    /// The train and eval rows of a conversation method.
    pub fn sft_data(&mut self) -> Result<(Vec<PackedRow>, Vec<PackedRow>)> {
        let take = |ds: Dataset, split: &str| {
            match ds {
            Dataset::Sft(rows) => Ok(rows),
            other => bail!(
                "this method trains on conversations, but the {split} data are {} rows; use a conversation format (or the method for that data)",
                other.kind()
            ),
        }
        };
        Ok((
            take(self.take_train(), "train")?,
            take(self.take_eval(), "eval")?,
        ))
    }

    /// The train and eval rows of a preference method.
    pub fn pair_data(&mut self) -> Result<(Vec<TokenizedPair>, Vec<TokenizedPair>)> {
        let take = |ds: Dataset, split: &str| {
            match ds {
            Dataset::Pairs(rows) => Ok(rows),
            other => bail!(
                "this method trains on preference pairs (prompt, chosen, rejected), but the {split} data are {} rows; \
                 use a preference format (preference, hh-rlhf)",
                other.kind()
            ),
        }
        };
        Ok((
            take(self.take_train(), "train")?,
            take(self.take_eval(), "eval")?,
        ))
    }

    /// The train and eval prompts of an online method.
    pub fn prompt_data(&mut self) -> Result<(Vec<TokenizedPrompt>, Vec<TokenizedPrompt>)> {
        let take = |ds: Dataset, split: &str| {
            match ds {
            Dataset::Prompts(rows) => Ok(rows),
            // An empty split (eval_fraction = 0) carries no row kind.
            other if other.is_empty() => Ok(vec![]),
            other => bail!(
                "online methods roll out prompts, but the {split} data are {} rows; use a prompt format \
                 (GSM8K question/answer, Bedrock RFT `messages` + `ground_truth`, or `prompt` with an optional `answer`)",
                other.kind()
            ),
        }
        };
        Ok((
            take(self.take_train(), "train")?,
            take(self.take_eval(), "eval")?,
        ))
    }

    /// The train and eval rows as prepared, whatever their kind (left empty here).
    pub fn take_data(&mut self) -> (Dataset, Dataset) {
        (self.take_train(), self.take_eval())
    }

    fn take_train(&mut self) -> Dataset {
        std::mem::replace(&mut self.train, Dataset::Sft(vec![]))
    }

    fn take_eval(&mut self) -> Dataset {
        std::mem::replace(&mut self.eval, Dataset::Sft(vec![]))
    }
}

/// Runs the shared loop on the method a spec built (the session's side of [`MethodSpec::launch`]).
pub trait Drive<B: AutodiffBackend> {
    type Out;
    fn drive<M: Method<B>>(self, policy: CausalLm<B>, method: M) -> Result<Self::Out>;
}

pub trait MethodSpec {
    /// The `[data]` rows it trains on.
    fn data_kind(&self) -> DataKind;

    /// Whether it trains on `[data]` rows of this kind (`Dataset::kind`): its own kind, by
    /// default.
    fn accepts(&self, kind: &str) -> bool {
        kind == self.data_kind().name()
    }

    /// Whether prompt-answer rows are read as conversations (the methods that train on them).
    fn answers_as_responses(&self) -> bool {
        false
    }

    /// Logged metrics that show it working, besides the eval loss (first and last printed).
    fn key_metrics(&self) -> &'static [&'static str] {
        &[]
    }

    /// Whether the eval loss is minus the held-out reward (online methods).
    fn eval_loss_is_negative_reward(&self) -> bool {
        false
    }

    /// The dry run's view of a step: by default one pass over the rows, `micro_batch` rows
    /// of `max_seq_len` (preference methods put both sides of a pair in one micro-batch).
    fn step_plan(&self, recipe: &Recipe, train_rows: usize) -> StepPlan {
        let t = &recipe.train;
        let per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps;
        let sides = if self.data_kind() == DataKind::Pairs {
            2
        } else {
            1
        };
        StepPlan {
            steps_per_epoch: train_rows.div_ceil(per_step),
            seq: recipe.data.max_seq_len,
            rows: sides * t.per_device_train_batch_size,
        }
    }

    /// A model held beside the policy (`policy_weights`: the policy's weight bytes).
    fn other_model(&self, _recipe: &Recipe, _policy_weights: u64) -> Result<Option<OtherModel>> {
        Ok(None)
    }

    /// The base model as this method trains it, before any adapter (a reward model's
    /// score head replaces the LM head).
    fn base_model<B: AutodiffBackend>(
        &self,
        _recipe: &Recipe,
        cfg: ModelConfig,
        model: CausalLm<B>,
    ) -> (ModelConfig, CausalLm<B>) {
        (cfg, model)
    }

    /// The policy with what this method adds on top of adapters (PPO's value head; `resume`:
    /// the checkpoint it is restored from).
    fn policy<B: AutodiffBackend>(
        &self,
        _recipe: &Recipe,
        _cfg: &ModelConfig,
        model: CausalLm<B>,
        _resume: Option<&Path>,
    ) -> Result<CausalLm<B>> {
        Ok(model)
    }

    /// Build the method from its setup and hand it, with the policy, to the loop (`policy`
    /// as loaded: what adapter-off references are computed from).
    fn launch<B: AutodiffBackend, D: Drive<B>>(
        &self,
        setup: Setup<'_, B>,
        policy: CausalLm<B>,
        drive: D,
    ) -> Result<D::Out>;
}

/// Something done with a method's spec, whatever its type (see `crate::methods::visit`).
pub trait SpecVisitor {
    type Out;
    fn visit<S: MethodSpec>(self, spec: S) -> Self::Out;
}
