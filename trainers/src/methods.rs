//! The list of methods: a recipe's `method` names one, and everything method-specific is
//! reached through its [`MethodSpec`]. A new method is its own file (or folder) with a spec,
//! a `MethodName` variant and one line here.

use crate::distill::setup::DistillSpec;
use crate::dpo::setup::DpoSpec;
use crate::kto::setup::KtoSpec;
use crate::method_spec::SpecVisitor;
use crate::orpo::setup::OrpoSpec;
use crate::recipe::MethodName;
use crate::reward::setup::RewardSpec;
use crate::rl::setup::{GrpoSpec, PpoSpec};
use crate::sft::SftSpec;

/// Do `visitor` with the spec of `method`.
pub fn visit<V: SpecVisitor>(method: MethodName, visitor: V) -> V::Out {
    match method {
        MethodName::Sft => visitor.visit(SftSpec),
        MethodName::Dpo => visitor.visit(DpoSpec),
        MethodName::Reward => visitor.visit(RewardSpec),
        MethodName::Distill => visitor.visit(DistillSpec),
        MethodName::Grpo => visitor.visit(GrpoSpec),
        MethodName::Ppo => visitor.visit(PpoSpec),
        MethodName::Orpo => visitor.visit(OrpoSpec),
        MethodName::Kto => visitor.visit(KtoSpec),
    }
}
