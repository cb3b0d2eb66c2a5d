#!/usr/bin/env python3
"""SFT loss reference: transformers' causal-LM loss (labels = -100 outside the trained
tokens, shifted inside the model, mean over trained tokens) on the tiny-llama fixture,
for the base model and with the PEFT adapter of tests/fixtures/peft/adapter.
Writes tests/fixtures/losses/sft.json, checked by trainers/tests/loss_parity.rs.

    python3 scripts/parity/sft_loss_reference.py   (pip install torch transformers peft)
"""
import json
import pathlib

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

ROOT = pathlib.Path(__file__).resolve().parents[2]
BASE = ROOT / "tests/fixtures/models/tiny-llama"

# Two rows of different lengths, right-padded with 0; `trained` marks completion tokens
# (the tokens whose prediction counts), as burnish's loss masks do.
rows = [
    {"ids": [235, 64, 160, 178, 33, 26, 12, 101, 252, 91, 4, 117], "trained": [0] * 5 + [1] * 7},
    {"ids": [145, 250, 3, 157, 34, 27, 100, 119], "trained": [0] * 3 + [1] * 3 + [0, 1]},
]
width = max(len(r["ids"]) for r in rows)
ids, mask, labels = [], [], []
for r in rows:
    pad = width - len(r["ids"])
    ids.append(r["ids"] + [0] * pad)
    mask.append([1] * len(r["ids"]) + [0] * pad)
    labels.append([t if m else -100 for t, m in zip(r["ids"], r["trained"])] + [-100] * pad)
ids, mask, labels = map(torch.tensor, (ids, mask, labels))

model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
model.eval()
with torch.no_grad():
    base_loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
peft = PeftModel.from_pretrained(model, ROOT / "tests/fixtures/peft/adapter")
peft.eval()
with torch.no_grad():
    lora_loss = peft(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
out = {"rows": rows, "base_loss": base_loss, "lora_loss": lora_loss}
(ROOT / "tests/fixtures/losses").mkdir(parents=True, exist_ok=True)
(ROOT / "tests/fixtures/losses/sft.json").write_text(json.dumps(out, indent=1))
print(out)
