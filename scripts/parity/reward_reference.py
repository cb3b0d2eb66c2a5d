#!/usr/bin/env python3
"""Reward-model reference: transformers' LlamaForSequenceClassification loads the burnish
reward model written by `cargo run --release --example make_peft_fixture`
(tests/fixtures/reward/model: the tiny-llama backbone + a seeded score head) and scores a
fixed batch of pairs; the loss follows TRL 1.16 trl/trainer/reward_trainer.py
`compute_loss`:

    loss = -logsigmoid(r_chosen - r_rejected - margin).mean()
    loss += center_rewards_coefficient * mean((r_chosen + r_rejected) ** 2)
    accuracy = (r_chosen > r_rejected).mean(); margin = (r_chosen - r_rejected).mean()

Writes tests/fixtures/losses/reward.json, checked by trainers/tests/loss_parity.rs.
    python3 scripts/parity/reward_reference.py   (pip install torch transformers)
"""
import json
import pathlib

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

ROOT = pathlib.Path(__file__).resolve().parents[2]
pairs = [
    {"prompt": [1, 17, 42, 99, 7], "chosen": [5, 66, 120, 2], "rejected": [200, 13, 2], "margin": 0.5},
    {"prompt": [1, 250, 3], "chosen": [77, 78, 79, 80, 81, 2], "rejected": [77, 90, 2], "margin": 0.0},
    {"prompt": [1, 8, 9, 10, 11, 12, 13], "chosen": [44, 2], "rejected": [45, 46, 47, 48, 2], "margin": 1.0},
]
seqs = [p["prompt"] + p["chosen"] for p in pairs] + [p["prompt"] + p["rejected"] for p in pairs]
width = max(map(len, seqs))
ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])

model = AutoModelForSequenceClassification.from_pretrained(ROOT / "tests/fixtures/reward/model", dtype=torch.float32).eval()
assert type(model).__name__ == "LlamaForSequenceClassification", type(model)
with torch.no_grad():
    rewards = model(input_ids=ids, attention_mask=mask).logits[:, 0]
n = len(pairs)
rc, rr = rewards[:n], rewards[n:]
margins = torch.tensor([p["margin"] for p in pairs])
cases = []
for use_margin, center in [(False, None), (True, None), (True, 0.01)]:
    d = rc - rr - (margins if use_margin else 0)
    loss = -F.logsigmoid(d).mean()
    if center is not None:
        loss = loss + center * torch.mean((rc + rr) ** 2)
    cases.append({"use_margin": use_margin, "center_rewards_coefficient": center, "loss": loss.item(),
                  "accuracy": (rc > rr).float().mean().item(), "margin": (rc - rr).mean().item()})
out = {"pairs": pairs, "rewards": rewards.tolist(), "cases": cases}
(ROOT / "tests/fixtures/losses/reward.json").write_text(json.dumps(out, indent=1))
print(json.dumps(out, indent=1))
