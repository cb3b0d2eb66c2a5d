#!/usr/bin/env python3
"""Derives the demo data of the online and preference recipes from the quickstart
conversations (assets/data/quickstart/fastchat_dummy_conversation.json, Apache-2.0):

- identity_prompts.jsonl: the distinct first user turns, as `{"prompt"}` rows (GRPO, PPO);
- identity_feedback.jsonl: `{"prompt", "completion", "label"}`, each pair's chosen (label
  true) or rejected (false) answer, alternately: unpaired feedback for KTO.
- identity_preferences.jsonl: per conversation, `{"prompt", "chosen", "rejected"}` where the
  chosen answer names the assistant (Vicuna) and the rejected one does not (DPO, reward).

The task: an assistant that says who it is. The quickstart SFT model rarely names itself
(48 of the 500 training answers do), so the preference and RL recipes have a signal they can
visibly move within their default steps. Deterministic: rerunning writes the same files.

    python3 scripts/make_demo_data.py
"""
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "assets/data/quickstart"


def main():
    rows = json.loads((DATA / "fastchat_dummy_conversation.json").read_text())
    firsts = [(r["conversations"][0]["value"], r["conversations"][1]["value"]) for r in rows
              if len(r["conversations"]) >= 2 and r["conversations"][0]["from"] == "human"]
    named = sorted({a for _, a in firsts if "Vicuna" in a})
    unnamed = sorted({a for _, a in firsts if "Vicuna" not in a})
    prompts, pairs = [], []
    for i, (q, a) in enumerate(firsts):
        if q not in prompts:
            prompts.append(q)
        chosen = a if "Vicuna" in a else named[i % len(named)]
        rejected = unnamed[i % len(unnamed)] if "Vicuna" in a else a
        pairs.append({"prompt": q, "chosen": chosen, "rejected": rejected})
    with open(DATA / "identity_prompts.jsonl", "w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p}) + "\n")
    with open(DATA / "identity_preferences.jsonl", "w") as f:
        for p in pairs:
            f.write(json.dumps(p) + "\n")
    # KTO's unpaired feedback: each prompt's answer was either liked or not, never both
    # (alternately the chosen and the rejected answer of its pair).
    with open(DATA / "identity_feedback.jsonl", "w") as f:
        for i, p in enumerate(pairs):
            liked = i % 2 == 0
            row = {"prompt": p["prompt"], "completion": p["chosen" if liked else "rejected"], "label": liked}
            f.write(json.dumps(row) + "\n")
    print(f"{len(prompts)} prompts, {len(pairs)} pairs ({len(named)} naming answers, {len(unnamed)} not)")


if __name__ == "__main__":
    main()
