#!/usr/bin/env python3
"""Load burnish's exported LoRA adapter with PEFT and its merged export with transformers,
and record logits for the `peft_parity` test (tests/fixtures/peft/expected.json).

    cargo run --release --example make_peft_fixture
    python3 scripts/parity/check_peft_export.py      (pip install torch transformers peft)
    cargo run --release --example make_peft_fixture -- tiny-qwen3
    python3 scripts/parity/check_peft_export.py --model tiny-qwen3   (tests/fixtures/peft-qwen3)

Checks here, before writing: the PEFT model (adapter unmerged) and the burnish-merged
model give the same logits, and PEFT's own merge_and_unload agrees with both.
"""
import argparse
import json
import pathlib

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

ROOT = pathlib.Path(__file__).resolve().parents[2]
ap = argparse.ArgumentParser()
ap.add_argument("--model", default="tiny-llama")
NAME = ap.parse_args().model
BASE = ROOT / "tests/fixtures/models" / NAME
FIX = ROOT / "tests/fixtures" / ("peft" if NAME == "tiny-llama" else "peft-" + NAME.removeprefix("tiny-"))

ids = json.loads((BASE / "expected.json").read_text())["input_ids"]
x = torch.tensor(ids)

# Eager attention: the only one of transformers' that soft-caps (Gemma 2).
base = AutoModelForCausalLM.from_pretrained(BASE, torch_dtype=torch.float32, attn_implementation="eager")
base.eval()
with torch.no_grad():
    base_logits = base(x).logits
peft = PeftModel.from_pretrained(base, FIX / "adapter")
peft.eval()
with torch.no_grad():
    peft_logits = peft(x).logits
    peft_merged_logits = peft.merge_and_unload()(x).logits
merged = AutoModelForCausalLM.from_pretrained(FIX / "merged", torch_dtype=torch.float32,
                                              attn_implementation="eager")
merged.eval()
with torch.no_grad():
    burnish_merged_logits = merged(x).logits

adapter_effect = (peft_logits - base_logits).abs().max().item()
diff_merged = (burnish_merged_logits - peft_logits).abs().max().item()
diff_peft_merge = (peft_merged_logits - peft_logits).abs().max().item()
print(f"adapter changes logits by up to {adapter_effect:.4f}")
print(f"burnish merged vs PEFT: {diff_merged:.2e}; PEFT merge_and_unload vs PEFT: {diff_peft_merge:.2e}")
assert adapter_effect > 1e-2, "the adapter should change the logits"
assert diff_merged < 1e-4, diff_merged

out = {
    "input_ids": ids,
    "peft_logits": peft_logits.tolist(),
    "burnish_merged_in_transformers_max_abs_diff": diff_merged,
    "adapter_effect_max_abs": adapter_effect,
}
(FIX / "expected.json").write_text(json.dumps(out))
print(f"wrote {FIX / 'expected.json'}")
