#!/usr/bin/env python3
"""ORPO reference values on the tiny-llama fixture, with the PEFT adapter of
tests/fixtures/peft/adapter as the policy (ORPO has no reference model), for the same fixed
batch of preference pairs as dpo_reference.py. Writes tests/fixtures/losses/orpo.json.

The loss and metrics come from TRL 1.16.0 itself: `ORPOTrainer.get_batch_loss_metrics`,
`concatenated_forward`, `concatenated_inputs`, `get_batch_logps` and `odds_ratio_loss`
(trl/experimental/orpo/orpo_trainer.py) are called unbound, with a types.SimpleNamespace
standing in for the trainer (beta, padding_value=0, is_encoder_decoder=False,
aux_loss_enabled=False, a one-process accelerator whose gather_for_metrics is the identity).
The batch is what TRL's `tokenize_row` + padding collator produce for token-id rows whose
prompt already starts with BOS (1) and whose completions already end with EOS (2):
`chosen_input_ids` / `rejected_input_ids` right-padded with 0, attention masks, and
`*_labels` equal to the ids with -100 on the prompt and on padding. An independent
re-implementation below is asserted to match.

Formulas (orpo_trainer.py):
- `get_batch_logps(..., average_log_prob=True)`: labels shifted (`labels[:, 1:]`), the
  log-prob of every non -100 label, summed and divided by the count, i.e. the AVERAGE
  log-prob over the completion tokens of each row (`pc`, `pr` below).
- `odds_ratio_loss`: `log_odds = (pc - pr) - (log1mexp(pc) - log1mexp(pr))`, with
  `log1mexp(x) = log(1 - exp(x))` (module function `log1mexp`, branch at -ln 2);
  `ratio = logsigmoid(log_odds)`; `losses = beta * ratio`;
  rewards `beta * pc`, `beta * pr` (average log-probs, detached; no reference model);
  it returns `mean(ratio)` (logged as "log_odds_ratio") and `mean(log_odds)` (logged as
  "log_odds_chosen").
- `concatenated_forward`: the NLL term is `nn.CrossEntropyLoss()` (mean over non-ignored
  tokens) on the CHOSEN rows, with labels = `concatenated_input_ids` where
  `attention_mask == 1` (else -100), shifted by one. So it is computed "over the full prompt
  and response" (TRL's own comment): every real token after the first one of each chosen
  row, prompt tokens included, and it is one token mean over the whole chosen batch (sum of
  -log p over all those tokens / their total count), not a mean of per-row means.
  "nll_loss_completion_only" below gives the completion-only variant for comparison; it is
  NOT what TRL computes.
- `get_batch_loss_metrics`: `loss = nll_loss - losses.mean()`
  (= nll - mean(beta * logsigmoid(log_odds))); metrics "rewards/chosen",
  "rewards/rejected" (means of the rewards), "rewards/accuracies" (mean of
  chosen > rejected), "rewards/margins" (mean of chosen - rejected), "logps/chosen",
  "logps/rejected" (means of the AVERAGE log-probs), "logits/chosen", "logits/rejected"
  (mean of the whole padded `all_logits[rows, :-1, :]` tensor, prompt and padding positions
  included, so they depend on the padded width; here both halves are padded to 12, the
  longest row), "nll_loss", "log_odds_ratio", "log_odds_chosen".

Per-pair values: "chosen_logps"/"rejected_logps" are SUMS of completion-token log-probs
(as in dpo.json), "chosen_avg_logps"/"rejected_avg_logps" the averages ORPO uses,
"chosen_tokens"/"rejected_tokens" the completion-label counts (shifted mask),
"chosen_nll_sum" the sum of -log p over the chosen completion tokens, and
"chosen_full_nll_sum"/"chosen_full_tokens" the same over every predicted real token
(prompt included), which is what TRL's nll_loss averages:
nll_loss = sum(chosen_full_nll_sum) / sum(chosen_full_tokens).

    python3 scripts/parity/orpo_reference.py   (pip install torch transformers peft trl)
"""
import json
import pathlib
import types

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoModelForCausalLM
from trl.experimental.orpo.orpo_trainer import ORPOTrainer

ROOT = pathlib.Path(__file__).resolve().parents[2]
BASE = ROOT / "tests/fixtures/models/tiny-llama"

pairs = [
    {"prompt": [1, 17, 42, 99, 7], "chosen": [5, 66, 120, 2], "rejected": [200, 13, 2]},
    {"prompt": [1, 250, 3], "chosen": [77, 78, 79, 80, 81, 2], "rejected": [77, 90, 2]},
    {"prompt": [1, 8, 9, 10, 11, 12, 13], "chosen": [44, 2], "rejected": [45, 46, 47, 48, 2]},
]
PAD = 0


def side(key):
    """TRL's per-side tensors: `{key}_input_ids`, `_attention_mask`, `_labels`, right-padded
    to the longest row of that side (the collator pads each key separately)."""
    seqs = [(p["prompt"], p[key]) for p in pairs]
    width = max(len(a) + len(b) for a, b in seqs)
    ids, mask, labels = [], [], []
    for prompt, completion in seqs:
        x = prompt + completion
        pad = width - len(x)
        ids.append(x + [PAD] * pad)
        mask.append([1] * len(x) + [0] * pad)
        labels.append([-100] * len(prompt) + completion + [-100] * pad)
    return {f"{key}_input_ids": torch.tensor(ids), f"{key}_attention_mask": torch.tensor(mask),
            f"{key}_labels": torch.tensor(labels)}


batch = {**side("chosen"), **side("rejected")}


def trainer_stand_in(beta):
    ns = types.SimpleNamespace(
        beta=beta, padding_value=PAD, is_encoder_decoder=False, aux_loss_enabled=False,
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x),
    )
    ns.concatenated_inputs = ORPOTrainer.concatenated_inputs  # staticmethods
    ns.get_batch_logps = ORPOTrainer.get_batch_logps
    ns.concatenated_forward = types.MethodType(ORPOTrainer.concatenated_forward, ns)
    ns.odds_ratio_loss = types.MethodType(ORPOTrainer.odds_ratio_loss, ns)
    return ns


def per_token(model, ids, mask):
    """log p of each next real token (shifted), with the model's plain logits."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    return torch.log_softmax(logits.float(), -1).gather(2, ids[:, 1:, None]).squeeze(2)


base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32).eval()
policy = PeftModel.from_pretrained(base, ROOT / "tests/fixtures/peft/adapter").eval()

per_pair = {}
for key in ("chosen", "rejected"):
    ids, mask, labels = (batch[f"{key}_{k}"] for k in ("input_ids", "attention_mask", "labels"))
    logp = per_token(policy, ids, mask)
    comp = (labels[:, 1:] != -100).float()
    full = mask[:, 1:].float()
    per_pair[f"{key}_logps"] = (logp * comp).sum(1)
    per_pair[f"{key}_tokens"] = comp.sum(1)
    per_pair[f"{key}_full_nll_sum"] = -(logp * full).sum(1)
    per_pair[f"{key}_full_tokens"] = full.sum(1)
pc_sum, pr_sum = per_pair["chosen_logps"], per_pair["rejected_logps"]
lc, lr = per_pair["chosen_tokens"], per_pair["rejected_tokens"]
pc, pr = pc_sum / lc, pr_sum / lr
nll_trl_indep = per_pair["chosen_full_nll_sum"].sum() / per_pair["chosen_full_tokens"].sum()
nll_completion_only = -pc_sum.sum() / lc.sum()


def log1mexp(x):
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


cases = []
for beta in [0.1, 0.5, 1.0]:
    ns = trainer_stand_in(beta)
    with torch.no_grad():
        loss, metrics = ORPOTrainer.get_batch_loss_metrics(ns, policy, batch)
    # independent re-implementation of the same formulas
    log_odds = (pc - pr) - (log1mexp(pc) - log1mexp(pr))
    ratio = F.logsigmoid(log_odds)
    indep = {
        "loss": (nll_trl_indep - (beta * ratio).mean()).item(),
        "nll_loss": nll_trl_indep.item(),
        "log_odds_ratio": ratio.mean().item(),
        "log_odds_chosen": log_odds.mean().item(),
        "rewards/chosen": (beta * pc).mean().item(),
        "rewards/rejected": (beta * pr).mean().item(),
        "rewards/accuracies": (pc > pr).float().mean().item(),
        "rewards/margins": (beta * (pc - pr)).mean().item(),
        "logps/chosen": pc.mean().item(),
        "logps/rejected": pr.mean().item(),
    }
    case = {"beta": beta, "loss": loss.item()}
    for k in ["nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/chosen", "rewards/rejected",
              "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
              "logits/chosen", "logits/rejected"]:
        case[k] = metrics[k]
    for k, v in indep.items():
        assert abs(case[k] - v) < 1e-5 * max(1.0, abs(v)), (k, case[k], v)
    case["nll_loss_completion_only"] = nll_completion_only.item()
    cases.append(case)

out = {
    "pairs": pairs,
    "chosen_logps": pc_sum.tolist(), "rejected_logps": pr_sum.tolist(),
    "chosen_avg_logps": pc.tolist(), "rejected_avg_logps": pr.tolist(),
    "chosen_tokens": lc.tolist(), "rejected_tokens": lr.tolist(),
    "chosen_nll_sum": (-pc_sum).tolist(),
    "chosen_full_nll_sum": per_pair["chosen_full_nll_sum"].tolist(),
    "chosen_full_tokens": per_pair["chosen_full_tokens"].tolist(),
    "cases": cases,
}
(ROOT / "tests/fixtures/losses/orpo.json").write_text(json.dumps(out, indent=1))
print(json.dumps({k: v for k, v in out.items() if k != "pairs"}, indent=1))
