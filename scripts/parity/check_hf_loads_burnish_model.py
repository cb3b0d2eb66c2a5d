#!/usr/bin/env python3
"""Check that transformers loads a model directory written by burnish, unchanged, and that
its log-probabilities match `burnish score` on the same rows.

Usage: python3 scripts/parity/check_hf_loads_burnish_model.py MODEL_DIR SCORES.jsonl ROWS.jsonl
(ROWS has {"prompt","completion"}; SCORES is `burnish score --model MODEL_DIR --data ROWS` output.)
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, scores_path, rows_path = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(model_dir)
worst = 0.0
for row, score in zip(map(json.loads, open(rows_path)), map(json.loads, open(scores_path))):
    p = tok(row["prompt"])["input_ids"]
    full = tok(row["prompt"] + row["completion"])["input_ids"]
    common = 0
    while common < min(len(p), len(full)) and p[common] == full[common]:
        common += 1
    ids = torch.tensor([full])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1], -1)
    lp = sum(logp[t - 1, full[t]].item() for t in range(common, len(full)))
    worst = max(worst, abs(lp - score["logprob"]))
    print(f"hf {lp:.5f}  burnish {score['logprob']:.5f}  tokens {len(full) - common} vs {score['num_tokens']}")
print(f"max |diff| = {worst:.2e}")
sys.exit(0 if worst < 1e-3 else 1)
