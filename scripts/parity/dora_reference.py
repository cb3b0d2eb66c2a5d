#!/usr/bin/env python3
"""DoRA (weight-decomposed LoRA, PEFT `LoraConfig(use_dora=True)`) reference on the tiny-llama
fixture. Writes, with torch + transformers + peft (0.21.2) on CPU, in float32:
  tests/fixtures/peft-dora/adapter/   adapter_config.json + adapter_model.safetensors, saved by
      PEFT's save_pretrained (r=4, lora_alpha=8, q_proj/v_proj/down_proj, no rsLoRA, so
      scaling = alpha / r = 2), with lora_B and the magnitude vectors randomised so that both
      DoRA's magnitude and its direction change the output.
  tests/fixtures/losses/dora.json: "ids", "logits" (PEFT DoRA model, adapter unmerged, eval),
      "merged_logits" (merge_and_unload on a fresh load of the saved adapter), "merged_weights"
      (layer 0 q_proj / down_proj merged `weight`, torch layout [out, in]), and
      "max_abs_diff_dora_vs_merged".

Saved tensor keys (the on-disk format; PEFT strips the adapter name, and for the magnitude also
the ".weight" of its DoraLinearLayer module, peft/tuners/lora/model.py
`LoraModel._get_adapter_state_dict`, and adds it back on load in
`_remap_adapter_state_dict_for_load`):
  base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight          [r, in]
  base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight          [out, r]
  base_model.model.model.layers.{i}.self_attn.q_proj.lora_magnitude_vector  [out]
  (same for v_proj and mlp.down_proj)

DoRA in PEFT 0.21.2, for a Linear layer with base weight W [out, in] (fan_in_fan_out=False),
bias b, lora_A.weight A [r, in], lora_B.weight B [out, r], scaling s = lora_alpha / r
(lora_alpha / sqrt(r) with use_rslora), magnitude m [out]:

- Weight norm, peft/tuners/lora/dora.py `DoraLinearLayer.get_weight_norm`:
      weight_norm = torch.linalg.norm(W + s * (B @ A), dim=1)        -> shape [out]
  i.e. the L2 norm of each output row of the [out, in] weight, over the input dimension
  (the code comment says "column-wise": columns of W^T). In `DoraLinearLayer.forward` the
  LoRA product is passed `.detach()`ed and the result is `.detach()`ed again (DoRA paper
  section 4.3): the norm is a constant for the backward pass, no gradient flows through it.
  B @ A is obtained in `get_lora_weight` as lora_B(lora_A(eye(in))).T (same value).
- Magnitude init, `DoraLinearLayer.update_layer` (called from peft/tuners/lora/variants.py
  `DoraLinearVariant.init`, after `LoraLayer.update_layer` has run `reset_lora_parameters`):
      m = get_weight_norm(W, B @ A, s)  = ||W||_row at init, since B = 0 at init
  stored as `lora_magnitude_vector[adapter].weight` (nn.Parameter, trainable, fp32 if W is).
- Forward, `Linear.forward` (peft/tuners/lora/layer.py) computes result = base_layer(x) = x W^T + b,
  then `DoraLinearVariant.forward` (variants.py) adds `DoraLinearLayer.forward`'s output:
      c = (m / weight_norm).view(1, -1)          # per output feature, weight_norm detached
      lora = lora_B(lora_A(x'))                  # x' = x, or dropout(x) (see below)
      result += (c - 1) * base + c * lora * s
  * no dropout (lora_dropout is nn.Identity when p = 0, or the module is in eval mode):
    x' = x and base = result - b (the base output already computed, bias removed), so
      y = c * (x W^T + s * x A^T B^T) + b
  * with dropout, in training mode: x' = dropout(x) and base = F.linear(x', W) is recomputed on
    the dropped input (no bias), so
      y = x W^T + b + (c - 1) * (x' W^T) + c * s * (x' A^T B^T)
    i.e. the un-dropped base output plus the DoRA correction evaluated on the dropped input.
- Merge, `DoraLinearVariant.merge_unsafe` (merge_and_unload default, safe_merge=False; and
  `merge_safe` the same on a copy):
      delta = s * (B @ A)                        # Linear.get_delta_weight
      weight_norm = ||W + delta||_row            # get_weight_norm(W_unmerged, delta, scaling=1)
      W' = (m / weight_norm).view(-1, 1) * (W + delta)
  bias unchanged (lora_bias=False). Unmerge: W = W' / (m / weight_norm) - delta, with the
  weight_norm cached at merge time.

    python3 scripts/parity/dora_reference.py   (pip install torch transformers peft)
"""
import json
import os
import pathlib

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

ROOT = pathlib.Path(__file__).resolve().parents[2]
BASE = ROOT / "tests/fixtures/models/tiny-llama"
ADAPTER = ROOT / "tests/fixtures/peft-dora/adapter"
OUT = ROOT / "tests/fixtures/losses/dora.json"

IDS = [[1, 17, 42, 99, 7, 5, 66, 120, 2], [1, 250, 3, 77, 78, 79, 80, 81, 2]]
R, ALPHA = 4, 8
SCALING = ALPHA / R
MERGED_WEIGHTS = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]


def load_base():
    return AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32).eval()


def logits_of(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


os.environ.setdefault("HF_HUB_OFFLINE", "1")
x = torch.tensor(IDS)

# 1-3. DoRA adapter on the tiny base, made non-trivial.
torch.manual_seed(0)
base = load_base()
base_logits = logits_of(base, x)
config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj", "down_proj"],
                    lora_dropout=0.0, use_dora=True, bias="none", task_type="CAUSAL_LM")
model = get_peft_model(base, config)
gen = torch.Generator().manual_seed(1234)
with torch.no_grad():
    for name, p in sorted(model.named_parameters()):
        if "lora_B" in name:
            p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        elif "lora_magnitude_vector" in name:
            p.mul_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
model.eval()
dora_logits = logits_of(model, x)

# 4. Save (relative base path, like tests/fixtures/peft/adapter; no model-card README).
model.peft_config["default"].base_model_name_or_path = "tests/fixtures/models/tiny-llama"
# target_modules is a set (string-hash order varies between runs); save it sorted.
model.peft_config["default"].target_modules = sorted(model.peft_config["default"].target_modules)
ADAPTER.mkdir(parents=True, exist_ok=True)
model.save_pretrained(ADAPTER, safe_serialization=True)
(ADAPTER / "README.md").unlink(missing_ok=True)
saved = load_file(ADAPTER / "adapter_model.safetensors")
print("saved tensors:")
for k in sorted(saved):
    print(f"  {k}  {list(saved[k].shape)}  {saved[k].dtype}")
print("adapter_config.json:")
print((ADAPTER / "adapter_config.json").read_text())

# 5. Reload from disk: unmerged must match the in-memory model; then merge_and_unload.
reloaded = PeftModel.from_pretrained(load_base(), ADAPTER).eval()
reload_diff = (logits_of(reloaded, x) - dora_logits).abs().max().item()
merged = PeftModel.from_pretrained(load_base(), ADAPTER).eval().merge_and_unload().eval()
merged_logits = logits_of(merged, x)
diff = (merged_logits - dora_logits).abs().max().item()
effect = (dora_logits - base_logits).abs().max().item()

# Independent check of the documented merge formula, from the saved tensors and base weights.
base_sd = load_base().state_dict()
merged_sd = merged.state_dict()
formula_diff = 0.0
for key in saved:
    if not key.endswith("lora_magnitude_vector"):
        continue
    mod = key.removeprefix("base_model.model.").removesuffix(".lora_magnitude_vector")
    W = base_sd[mod + ".weight"]
    A = saved[f"base_model.model.{mod}.lora_A.weight"]
    B = saved[f"base_model.model.{mod}.lora_B.weight"]
    m = saved[key]
    V = W + SCALING * (B @ A)
    W_merged = (m / torch.linalg.norm(V, dim=1)).view(-1, 1) * V
    formula_diff = max(formula_diff, (W_merged - merged_sd[mod + ".weight"]).abs().max().item())
    # and of the documented eval forward, y = c * (x W^T + s * x A^T B^T), c = m / ||W + sBA||_row
    h = torch.randn(3, W.shape[1], generator=gen)
    layer = reloaded.get_submodule("base_model.model." + mod)
    with torch.no_grad():
        hand = (m / torch.linalg.norm(V, dim=1)) * (h @ W.T + SCALING * (h @ A.T) @ B.T)
        formula_diff = max(formula_diff, (layer(h) - hand).abs().max().item())
    # the magnitude is really perturbed away from the init ||W + sBA|| = ||W|| (B = 0 at init)
    assert (m - torch.linalg.norm(W, dim=1)).abs().max() > 1e-3, key

print(f"adapter changes logits by up to {effect:.4f}")
print(f"reloaded vs in-memory DoRA: {reload_diff:.2e}; DoRA vs merged: {diff:.2e}; "
      f"hand merge vs PEFT merge: {formula_diff:.2e}")
assert effect > 1e-2, "the adapter should change the logits"
assert reload_diff < 1e-6, reload_diff
assert diff < 1e-4, diff
assert formula_diff < 1e-5, formula_diff

out = {
    "ids": IDS,
    "logits": dora_logits.tolist(),
    "merged_logits": merged_logits.tolist(),
    "merged_weights": {name: merged_sd[name + ".weight"].tolist() for name in MERGED_WEIGHTS},
    "max_abs_diff_dora_vs_merged": diff,
}
OUT.write_text(json.dumps(out))
print(f"wrote {ADAPTER} and {OUT}")
