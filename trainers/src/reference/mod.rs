//! The reference model of the methods that compare the policy with one (DPO, KTO): none,
//! the base under the adapters, a frozen copy, or its log-probs computed once before
//! training and cached beside the tokenized data.

pub mod setup;

use burn::tensor::backend::AutodiffBackend;
use std::borrow::Cow;

use models::CausalLm;

/// Where reference log-probs come from during training.
pub enum Reference<B: AutodiffBackend> {
    /// None (reference-free losses).
    None,
    /// The policy with its adapters switched off.
    BaseOfAdapters,
    /// A frozen model, without autodiff.
    Frozen(Box<CausalLm<B::InnerBackend>>),
    /// Two summed log-probs per row of the train and eval splits (DPO: chosen and rejected
    /// of a pair; KTO: a row and its mismatched row).
    Precomputed {
        train: Vec<(f64, f64)>,
        eval: Vec<(f64, f64)>,
    },
}

impl<B: AutodiffBackend> Reference<B> {
    /// The model that scores the reference now, given the policy without autodiff (None
    /// when there is none, or only precomputed log-probs).
    pub fn live_model<'a>(
        &'a self,
        policy: &CausalLm<B::InnerBackend>,
    ) -> Option<Cow<'a, CausalLm<B::InnerBackend>>> {
        match self {
            Reference::BaseOfAdapters => {
                let mut base = policy.clone();
                base.set_adapters_enabled(false);
                Some(Cow::Owned(base))
            }
            Reference::Frozen(m) => Some(Cow::Borrowed(m.as_ref())),
            Reference::None | Reference::Precomputed { .. } => None,
        }
    }
}
