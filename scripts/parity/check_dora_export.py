#!/usr/bin/env python3
"""PEFT loads a DoRA adapter that burnish wrote, and transformers loads burnish's merged
DoRA export; both give the logits PEFT gives with its own adapter
(tests/fixtures/losses/dora.json, from scripts/parity/dora_reference.py).

    burnish export tests/fixtures/peft-dora/adapter --base tests/fixtures/models/tiny-llama --out /tmp/dora/adapter
    burnish export tests/fixtures/peft-dora/adapter --base tests/fixtures/models/tiny-llama --merge --out /tmp/dora/merged
    python3 scripts/parity/check_dora_export.py /tmp/dora      (pip install torch transformers peft)
"""
import json
import pathlib
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = pathlib.Path(sys.argv[1])
exp = json.loads((ROOT / "tests/fixtures/losses/dora.json").read_text())
ids = torch.tensor(exp["ids"])
want = torch.tensor(exp["logits"])

base = AutoModelForCausalLM.from_pretrained(ROOT / "tests/fixtures/models/tiny-llama", dtype=torch.float32)
peft = PeftModel.from_pretrained(base, OUT / "adapter").eval()
assert peft.peft_config["default"].use_dora
with torch.no_grad():
    got = peft(input_ids=ids).logits
d_adapter = (got - want).abs().max().item()
merged = AutoModelForCausalLM.from_pretrained(OUT / "merged", dtype=torch.float32).eval()
with torch.no_grad():
    got = merged(input_ids=ids).logits
d_merged = (got - want).abs().max().item()
print(json.dumps({"peft_loads_burnish_adapter_max_abs_diff": d_adapter,
                  "transformers_loads_burnish_merged_max_abs_diff": d_merged}))
assert d_adapter < 1e-5 and d_merged < 1e-5
