//! Online RL on the shared loop: the loop's "batches" are rollouts of the policy, scored
//! by reward functions. GRPO and PPO share rollouts, rewards and their arithmetic.

pub mod command;
pub mod critic;
pub mod grpo;
pub mod math;
pub mod ppo;
pub mod rewards;
pub mod rollout;
pub mod setup;
pub mod stats;
