#!/usr/bin/env python3
"""GRPO and PPO arithmetic with PyTorch, on fixed log-probs, rewards and values.

GRPO follows TRL 1.16 (trl/trainer/grpo_trainer.py):
  * `_generate_and_score_completions`: rewards = nansum(rewards_per_func * weights) (NaN when
    every function returned None), advantages = rewards - group nanmean, divided by
    (nanstd + 1e-4) of the group (`scale_rewards="group"`), of the whole batch ("batch"), or
    not at all ("none"); NaN advantages become 0. `nanstd` is TRL's own (trl.trainer.utils).
  * `_compute_loss`: token-level ratio, two-sided clip with epsilon / epsilon_high, k3 KL to
    the reference times beta, and the four normalisations grpo / bnpo / dr_grpo / dapo,
    each for one micro-batch (no accumulation, one process).

PPO follows TRL 0.20's PPOTrainer (trl/trainer/ppo_trainer.py, the last release that ships
it; it now lives outside TRL), `masked_whiten` from trl/core.py:
  * per-token reward -kl_coef * k1 (logprob - ref_logprob), plus the score at the last
    completion token (burnish's convention, as OpenRLHF: TRL puts it one token past the
    EOS, on a padding position);
  * GAE(gamma, lam) backwards over each row, returns = advantages + values, advantages
    whitened over the valid tokens of the batch;
  * clipped policy loss masked_mean(max(-A r, -A clip(r, 1-c, 1+c))) and clipped value loss
    0.5 * masked_mean(max((v-R)^2, (clip(v, v_old-cv, v_old+cv)-R)^2)).

Writes tests/fixtures/losses/rl.json, checked by trainers/tests/loss_parity.rs.
    python3 scripts/parity/rl_reference.py   (pip install torch trl)
"""
import json
import pathlib

import torch
from trl.trainer.utils import nanstd

ROOT = pathlib.Path(__file__).resolve().parents[2]
torch.manual_seed(11)
D = torch.float64

# ---- GRPO ---------------------------------------------------------------------------
G, PROMPTS, T = 4, 3, 6
B = G * PROMPTS
rewards_per_func = torch.randn(B, 2, dtype=D)
rewards_per_func[:, 1] = (rewards_per_func[:, 1] > 0).to(D)  # a 0/1 verifier
rewards_per_func[5, 0] = float("nan")  # one function returned None
rewards_per_func[9, :] = float("nan")  # an unscorable completion
rewards_per_func[4:8, 1] = 1.0  # the middle group: reward std may collapse
rewards_per_func[4:8, 0] = float("nan")
weights = torch.tensor([0.5, 1.0], dtype=D)


def grpo_advantages(scale):
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable] = torch.nan
    mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G)
    if scale in ("group", "none"):
        std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G)
    else:
        std = nanstd(rewards).expand_as(rewards)
    adv = rewards - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    return rewards, torch.nan_to_num(adv, nan=0.0)


lengths = torch.randint(1, T + 1, (B,))
mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).to(D)
logps = -torch.rand(B, T, dtype=D) * 3
old_logps = logps + torch.randn(B, T, dtype=D) * 0.3  # off-policy enough to clip
ref_logps = logps + torch.randn(B, T, dtype=D) * 0.5
MAX_COMPLETION = 8


def grpo_loss(adv, loss_type, eps_low, eps_high, beta, level="token"):
    advantages = adv.unsqueeze(1)
    # TRL 1.16 importance_sampling_level: "sequence" is GSPO.
    log_ratio = logps - old_logps
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_ratio)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    per_token_kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * MAX_COMPLETION)
    elif loss_type == "dapo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    is_low = (coef_1 < 1 - eps_low) & (advantages < 0)
    is_high = (coef_1 > 1 + eps_high) & (advantages > 0)
    clip_ratio = ((is_low | is_high).to(D) * mask).sum() / mask.sum()
    kl = (per_token_kl * mask).sum() / mask.sum()
    return loss.item(), clip_ratio.item(), kl.item()


grpo_cases = []
for scale in ("group", "batch", "none"):
    rewards, adv = grpo_advantages(scale)
    grpo_cases.append(
        {"scale_rewards": scale, "rewards": [None if torch.isnan(r) else r.item() for r in rewards], "advantages": adv.tolist()}
    )
_, adv = grpo_advantages("group")
loss_cases = []
for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
    for eps_low, eps_high, beta in ((0.2, 0.2, 0.0), (0.2, 0.28, 0.04)):
        loss, clip, kl = grpo_loss(adv, loss_type, eps_low, eps_high, beta)
        loss_cases.append(
            {"loss_type": loss_type, "epsilon": eps_low, "epsilon_high": eps_high, "beta": beta, "loss": loss, "clip_ratio": clip, "kl": kl}
        )
for loss_type in ("grpo", "dapo"):
    for eps_low, eps_high, beta in ((0.05, 0.05, 0.0), (3e-4, 4e-4, 0.04)):
        loss, clip, kl = grpo_loss(adv, loss_type, eps_low, eps_high, beta, "sequence")
        loss_cases.append(
            {"loss_type": loss_type, "importance_sampling_level": "sequence", "epsilon": eps_low, "epsilon_high": eps_high,
             "beta": beta, "loss": loss, "clip_ratio": clip, "kl": kl}
        )

# ---- PPO ----------------------------------------------------------------------------
P, TP = 5, 7
p_lengths = torch.tensor([7, 3, 5, 1, 6])
p_valid = torch.arange(TP).unsqueeze(0) < p_lengths.unsqueeze(1)
padding_mask = ~p_valid
p_logps = -torch.rand(P, TP, dtype=D) * 2
p_ref = p_logps + torch.randn(P, TP, dtype=D) * 0.2
p_values = torch.randn(P, TP, dtype=D)
scores = torch.randn(P, dtype=D)
kl_coef, gamma, lam = 0.05, 0.99, 0.95
cliprange, cliprange_value, vf_coef = 0.2, 0.2, 0.1


def masked_mean(values, m):
    return (values * m).sum() / m.sum()


def masked_var(values, m):
    mean = masked_mean(values, m)
    var = masked_mean((values - mean) ** 2, m)
    s = m.sum()
    return var * s / (s - 1)


def masked_whiten(values, m, shift_mean=True):
    mean, var = masked_mean(values, m), masked_var(values, m)
    w = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        w += mean
    return w


logprobs = torch.masked_fill(p_logps, padding_mask, 1.0)
ref_logprobs = torch.masked_fill(p_ref, padding_mask, 1.0)
values = torch.masked_fill(p_values, padding_mask, 0)
kl = logprobs - ref_logprobs  # k1
rewards = -kl_coef * kl
rewards[torch.arange(P), p_lengths - 1] += scores
rewards = torch.masked_fill(rewards, padding_mask, 0)
lastgaelam = 0
rev = []
for t in reversed(range(TP)):
    nextvalues = values[:, t + 1] if t < TP - 1 else 0.0
    delta = rewards[:, t] + gamma * nextvalues - values[:, t]
    lastgaelam = delta + gamma * lam * lastgaelam
    rev.append(lastgaelam)
raw_adv = torch.stack(rev[::-1], axis=1)
returns = raw_adv + values
advantages = torch.masked_fill(masked_whiten(raw_adv, p_valid.to(D)), padding_mask, 0)

new_logps = p_logps + torch.randn(P, TP, dtype=D) * 0.3
vpred = values + torch.randn(P, TP, dtype=D) * 0.5
ratio = torch.exp(new_logps - p_logps)
pg1 = -advantages * ratio
pg2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
pg_loss = masked_mean(torch.max(pg1, pg2), p_valid.to(D))
vclip = torch.clamp(vpred, values - cliprange_value, values + cliprange_value)
vf1 = torch.square(vpred - returns)
vf2 = torch.square(vclip - returns)
vf_loss = 0.5 * masked_mean(torch.max(vf1, vf2), p_valid.to(D))
pg_clipfrac = masked_mean((pg2 > pg1).to(D), p_valid.to(D))
vf_clipfrac = masked_mean((vf2 > vf1).to(D), p_valid.to(D))


def rows(m, lens):
    return [m[i, : lens[i]].tolist() for i in range(len(lens))]


out = {
    "source": "scripts/parity/rl_reference.py (TRL 1.16 GRPO, TRL 0.20 PPO)",
    "grpo": {
        "num_generations": G,
        "reward_weights": weights.tolist(),
        "rewards_per_func": [[None if torch.isnan(x) else x.item() for x in r] for r in rewards_per_func],
        "advantages": grpo_cases,
        "max_completion_length": MAX_COMPLETION,
        "logps": rows(logps, lengths.tolist()),
        "old_logps": rows(old_logps, lengths.tolist()),
        "ref_logps": rows(ref_logps, lengths.tolist()),
        "losses": loss_cases,
    },
    "ppo": {
        "kl_coef": kl_coef,
        "gamma": gamma,
        "lam": lam,
        "cliprange": cliprange,
        "cliprange_value": cliprange_value,
        "vf_coef": vf_coef,
        "scores": scores.tolist(),
        "logps": rows(p_logps, p_lengths.tolist()),
        "ref_logps": rows(p_ref, p_lengths.tolist()),
        "values": rows(p_values, p_lengths.tolist()),
        "advantages": rows(advantages, p_lengths.tolist()),
        "returns": rows(returns, p_lengths.tolist()),
        "new_logps": rows(new_logps, p_lengths.tolist()),
        "vpred": rows(vpred, p_lengths.tolist()),
        "pg_loss": pg_loss.item(),
        "vf_loss": vf_loss.item(),
        "loss": (pg_loss + vf_coef * vf_loss).item(),
        "pg_clipfrac": pg_clipfrac.item(),
        "vf_clipfrac": vf_clipfrac.item(),
    },
}
path = ROOT / "tests/fixtures/losses/rl.json"
path.write_text(json.dumps(out, indent=1) + "\n")
print(f"wrote {path}")
