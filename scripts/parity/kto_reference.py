#!/usr/bin/env python3
"""KTO reference values on the tiny-llama fixture, with the PEFT adapter of
tests/fixtures/peft/adapter as the policy and the base (adapter disabled) as the reference,
for four unpaired rows made from the pairs of dpo_reference.py:
(prompt0, chosen0, True), (prompt1, rejected1, False), (prompt2, chosen2, True),
(prompt0, rejected0, False). Writes tests/fixtures/losses/kto.json.

The loss and metrics come from TRL 1.16.0 itself: `KTOTrainer._compute_loss` and
`_compute_kl_logps` (trl/trainer/kto_trainer.py; trl/experimental/kto only re-exports the
stable trainer with a deprecation warning) are called unbound on a types.SimpleNamespace
standing in for the trainer (model = the PeftModel, ref_model = None so the reference is
the same model under `use_adapter(..., None)` = `disable_adapter()`, precompute_ref_logps
False, calculate_KL True, loss_type "kto", one process: gather_for_metrics is the
identity). As in the trainer's __init__, TRL's fused LM head (`add_fused_lm_head`,
trl/trainer/utils.py, outputs log_probs/entropy/mean_logits) is patched onto the base model
before the adapter is wrapped. The batch is built by TRL's own
`DataCollatorForUnpairedPreference(pad_token_id=0)` (right padding, completion_mask).
TRL 1.16 has no `kto_loss` method any more; the formulas are inline in `_compute_loss`.
An independent re-implementation below, with the model's plain logits, is asserted to match.

Formulas (kto_trainer.py):
- KL rows (`_prepare_dataset`, `add_kl_completion_ids`, mapped with
  batch_size=per_device_train_batch_size, sequential sampling required):
  `KL_completion_ids = [completion_ids[-1]] + completion_ids[:-1]`, a rotation by +1:
  row i is (prompt_i, completion_{i-1}), row 0 gets the LAST row's completion. With these
  rows, KL row 0 is (prompt0, rejected0), the very sequence of row 3, so it is not actually
  mismatched (TRL does not check for shared prompts): policy_kl_logps[0] == policy_logps[3].
- log-probs: SUMS over completion tokens, for the rows and for the KL rows, policy and
  reference (`per_token_logps.sum(-1)`, labels = ids with -100 outside completion_mask).
- `kl = (KL_logps - ref_KL_logps).mean().detach()`, then `gather(...).mean().clamp(min=0)`:
  the batch mean of policy_KL - ref_KL over ALL rows (desirable and undesirable), clamped
  at 0. It gets no gradient: the policy KL forward runs under `torch.no_grad()` in
  `_compute_kl_logps` and the value is detached as well.
- desirable rows: `1 - sigmoid(beta * ((pol - ref) - kl))`;
  undesirable rows: `1 - sigmoid(beta * (kl - (pol - ref)))`;
  `loss = nanmean(cat(desirable_weight * chosen_losses, undesirable_weight * rejected_losses))`,
  a plain mean over the rows (divided by the row count, not by the sum of weights).
  Each case also stores the per-row "rewards" and weighted "losses" in ROW order (TRL
  concatenates desirable then undesirable; the mean is the same).
- rewards: `beta * (pol - ref)` (detached), per row.
- logged metrics (`self._metrics[mode][...]`; names as logged, without prefix in train and
  with "eval_" in eval): "kl"; "rewards/chosen" = sum(chosen rewards) / num_chosen,
  "logps/chosen" = sum(chosen policy logps) / num_chosen, "rewards/rejected",
  "logps/rejected" likewise (so these are plain means; TRL < 1.0's "rewards/chosen_sum",
  "logps/chosen_sum", "count/chosen" no longer exist); "rewards/margins" =
  rewards/chosen - rewards/rejected; "logits/chosen", "logits/rejected" = token mean over
  the completion tokens of those rows of the vocabulary-mean logit; "entropy" = token mean
  of the next-token entropy over all completion tokens; "num_tokens" (train only; 0 here).

    python3 scripts/parity/kto_reference.py   (pip install torch transformers peft trl)
"""
import contextlib
import json
import pathlib
import types
from collections import defaultdict

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoModelForCausalLM
from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference, KTOTrainer
from trl.trainer.utils import add_fused_lm_head

ROOT = pathlib.Path(__file__).resolve().parents[2]
BASE = ROOT / "tests/fixtures/models/tiny-llama"

pairs = [
    {"prompt": [1, 17, 42, 99, 7], "chosen": [5, 66, 120, 2], "rejected": [200, 13, 2]},
    {"prompt": [1, 250, 3], "chosen": [77, 78, 79, 80, 81, 2], "rejected": [77, 90, 2]},
    {"prompt": [1, 8, 9, 10, 11, 12, 13], "chosen": [44, 2], "rejected": [45, 46, 47, 48, 2]},
]
rows = [
    {"prompt": pairs[0]["prompt"], "completion": pairs[0]["chosen"], "label": True},
    {"prompt": pairs[1]["prompt"], "completion": pairs[1]["rejected"], "label": False},
    {"prompt": pairs[2]["prompt"], "completion": pairs[2]["chosen"], "label": True},
    {"prompt": pairs[0]["prompt"], "completion": pairs[0]["rejected"], "label": False},
]

# TRL's add_kl_completion_ids, verbatim, on one batch of per_device_train_batch_size = 4 rows.
completion_ids = [r["completion"] for r in rows]
KL_completion_ids = [completion_ids[-1]] + completion_ids[:-1]
kl_rows = [{"prompt": r["prompt"], "completion": c} for r, c in zip(rows, KL_completion_ids)]

examples = [{"prompt_ids": r["prompt"], "completion_ids": r["completion"], "KL_completion_ids": c,
             "label": r["label"]} for r, c in zip(rows, KL_completion_ids)]
batch = DataCollatorForUnpairedPreference(pad_token_id=0)(examples)

base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32).eval()
add_fused_lm_head(base, outputs=("log_probs", "entropy", "mean_logits"))
policy = PeftModel.from_pretrained(base, ROOT / "tests/fixtures/peft/adapter").eval()


def trainer_stand_in(beta, dw, uw):
    ns = types.SimpleNamespace(
        model=policy, ref_model=None, beta=beta, desirable_weight=dw, undesirable_weight=uw,
        loss_type="kto", calculate_KL=True, precompute_ref_logps=False, aux_loss_enabled=False,
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x,
                                          unwrap_model=lambda m: m, autocast=contextlib.nullcontext),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1,
    )
    ns._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, ns)
    return ns


def summed_logps(model, ids, mask, comp):
    """Plain-logits re-implementation: sum of completion-token log-probs (shifted mask)."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), -1).gather(2, ids[:, 1:, None]).squeeze(2)
    return (logp * comp[:, 1:].float()).sum(1)


def all_logps(model):
    return (summed_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]),
            summed_logps(model, batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"]))


pol, pol_kl = all_logps(policy)
with policy.disable_adapter():
    ref, ref_kl = all_logps(policy)

# The same values through TRL's fused head: `compute_ref_log_probs` (adapter disabled) and,
# with the adapter on, the policy path of `_compute_kl_logps`.
ns = trainer_stand_in(0.1, 1.0, 1.0)
trl_ref, trl_ref_kl = KTOTrainer.compute_ref_log_probs(ns, policy, batch)
trl_pol_kl = ns._compute_kl_logps(policy, batch)
for a, b in [(trl_ref, ref), (trl_ref_kl, ref_kl), (trl_pol_kl, pol_kl)]:
    assert torch.allclose(a, b, atol=1e-4), (a, b)

label = batch["label"]
cases = []
for beta, dw, uw in [(0.1, 1.0, 1.0), (0.5, 1.33, 0.7)]:
    ns = trainer_stand_in(beta, dw, uw)
    with torch.no_grad():
        loss = KTOTrainer._compute_loss(ns, policy, batch, return_outputs=False)
    metrics = {k: v[-1] for k, v in ns._metrics["eval"].items()}
    # independent re-implementation
    kl = (pol_kl - ref_kl).mean().clamp(min=0)
    logratio = pol - ref
    rewards = beta * logratio
    losses = torch.where(label, dw * (1 - torch.sigmoid(beta * (logratio - kl))),
                         uw * (1 - torch.sigmoid(beta * (kl - logratio))))
    indep = {"loss": losses.mean().item(), "kl": kl.item(),
             "rewards/chosen": rewards[label].mean().item(), "rewards/rejected": rewards[~label].mean().item(),
             "logps/chosen": pol[label].mean().item(), "logps/rejected": pol[~label].mean().item()}
    indep["rewards/margins"] = indep["rewards/chosen"] - indep["rewards/rejected"]
    case = {"beta": beta, "desirable_weight": dw, "undesirable_weight": uw, "loss": loss.item()}
    for k in ["kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
              "logits/chosen", "logits/rejected", "entropy"]:
        case[k] = metrics[k]
    for k, v in indep.items():
        assert abs(case[k] - v) < 1e-4 * max(1.0, abs(v)), (k, case[k], v)
    case["rewards"] = rewards.tolist()
    case["losses"] = losses.tolist()
    cases.append(case)

out = {
    "rows": rows, "policy_logps": pol.tolist(), "reference_logps": ref.tolist(),
    "kl_rows": kl_rows, "policy_kl_logps": pol_kl.tolist(), "reference_kl_logps": ref_kl.tolist(),
    "cases": cases,
}
(ROOT / "tests/fixtures/losses/kto.json").write_text(json.dumps(out, indent=1))
print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=1))
