#!/usr/bin/env python3
"""DPO / SimPO reference values on the tiny-llama fixture with the PEFT adapter of
tests/fixtures/peft/adapter as the policy and the base (adapter disabled) as the reference,
for a fixed batch of preference pairs. Writes tests/fixtures/losses/dpo.json, checked by
trainers/tests/loss_parity.rs.

Formulas, copied from TRL 1.16.0:
- log-probs: summed over completion tokens (trl/trainer/dpo_trainer.py, `_compute_loss`:
  `logps = per_token_logps.sum(dim=1)`), batch ordered [chosen..., rejected...].
- sigmoid: `-F.logsigmoid(beta * delta)` (dpo_trainer.py); with label smoothing, the cDPO
  form `-logsigmoid(beta*d)*(1-ls) - logsigmoid(-beta*d)*ls` (trl/experimental/cpo/
  cpo_trainer.py `cpo_loss`, and DPOTrainer before TRL 1.0).
- hinge: `torch.relu(1 - beta * delta)` (dpo_trainer.py).
- ipo: `(chosen_scores/len_c - rejected_scores/len_r - 1/(2*beta))**2` (dpo_trainer.py).
- simpo: average log-probs, `logits = (pc - pr) - simpo_gamma / beta`, sigmoid with label
  smoothing, rewards `beta * avg_logps` (cpo_trainer.py `cpo_loss`, `loss_type="simpo"`),
  without CPO's NLL term (cpo_alpha = 0, as the SimPO paper trains).
- rewards/chosen = beta * (pc - rc), accuracies = chosen > rejected (dpo_trainer.py).

    python3 scripts/parity/dpo_reference.py   (pip install torch transformers peft)
"""
import json
import pathlib

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoModelForCausalLM

ROOT = pathlib.Path(__file__).resolve().parents[2]
BASE = ROOT / "tests/fixtures/models/tiny-llama"

pairs = [
    {"prompt": [1, 17, 42, 99, 7], "chosen": [5, 66, 120, 2], "rejected": [200, 13, 2]},
    {"prompt": [1, 250, 3], "chosen": [77, 78, 79, 80, 81, 2], "rejected": [77, 90, 2]},
    {"prompt": [1, 8, 9, 10, 11, 12, 13], "chosen": [44, 2], "rejected": [45, 46, 47, 48, 2]},
]


def rows():
    seqs = [(p["prompt"], p["chosen"]) for p in pairs] + [(p["prompt"], p["rejected"]) for p in pairs]
    width = max(len(a) + len(b) for a, b in seqs)
    ids, mask, comp = [], [], []
    for prompt, completion in seqs:
        x = prompt + completion
        pad = width - len(x)
        ids.append(x + [0] * pad)
        mask.append([1] * len(x) + [0] * pad)
        comp.append([0] * len(prompt) + [1] * len(completion) + [0] * pad)
    return torch.tensor(ids), torch.tensor(mask), torch.tensor(comp)


def completion_logps(model, ids, mask, comp):
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), -1).gather(2, ids[:, 1:, None]).squeeze(2)
    m = comp[:, 1:].float()
    return (logp * m).sum(1), m.sum(1)


ids, mask, comp = rows()
base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32).eval()
ref, lens = completion_logps(base, ids, mask, comp)
policy_model = PeftModel.from_pretrained(base, ROOT / "tests/fixtures/peft/adapter").eval()
pol, _ = completion_logps(policy_model, ids, mask, comp)
n = len(pairs)
pc, pr, rc, rr, lc, lr = pol[:n], pol[n:], ref[:n], ref[n:], lens[:n], lens[n:]

cases = []
for loss_type, beta, ls, gamma in [
    ("sigmoid", 0.1, 0.0, 0.5), ("sigmoid", 0.5, 0.2, 0.5), ("hinge", 0.1, 0.0, 0.5),
    ("ipo", 0.1, 0.0, 0.5), ("simpo", 2.0, 0.0, 0.5), ("simpo", 2.0, 0.1, 1.0),
]:
    if loss_type == "simpo":
        ac, ar = pc / lc, pr / lr
        logits = (ac - ar) - gamma / beta
        losses = -F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls
        cr, rj = beta * ac, beta * ar
    else:
        delta = (pc - rc) - (pr - rr)
        if loss_type == "sigmoid":
            losses = -F.logsigmoid(beta * delta) * (1 - ls) - F.logsigmoid(-beta * delta) * ls
        elif loss_type == "hinge":
            losses = torch.relu(1 - beta * delta)
        else:
            d = (pc - rc) / lc - (pr - rr) / lr
            losses = (d - 1 / (2 * beta)) ** 2
        cr, rj = beta * (pc - rc), beta * (pr - rr)
    cases.append({
        "loss_type": loss_type, "beta": beta, "label_smoothing": ls, "simpo_gamma": gamma,
        "loss": losses.mean().item(),
        "rewards/chosen": cr.mean().item(), "rewards/rejected": rj.mean().item(),
        "rewards/accuracies": (cr > rj).float().mean().item(),
        "rewards/margins": (cr - rj).mean().item(),
    })

out = {"pairs": pairs, "policy_logps": pol.tolist(), "reference_logps": ref.tolist(), "cases": cases}
(ROOT / "tests/fixtures/losses/dpo.json").write_text(json.dumps(out, indent=1))
print(json.dumps(cases, indent=1))
