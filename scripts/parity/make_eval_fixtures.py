#!/usr/bin/env python3
"""Expected results of `burnish eval --task choice:tests/fixtures/eval/mc.jsonl` on a seeded
tiny model, computed with transformers and lm-evaluation-harness's formulas.

    python scripts/parity/make_eval_fixtures.py [--burnish target/release/burnish]

1. `burnish new-model --preset tiny --tokenizer assets/tokenizers/phi3_vision --seed 21` writes
   the model (the test writes the same one, so no weights are committed);
2. each choice is the continuation `" " + choice` of its question: context ids are the
   question's tokens (with BOS, as `tokenizer(text)` gives them), the continuation the rest of
   `question + " " + choice`'s tokens; its log-likelihood is the sum of the model's log-softmax
   at each continuation token (transformers, float32);
3. acc = argmax(loglik) == gold and acc_norm = argmax(loglik / len(" " + choice)) == gold, as
   lm-evaluation-harness's multiple_choice `process_results` computes them.

Writes tests/fixtures/eval/expected.json.
"""
import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
SEED = 21


def answer_index(answer, choices):
    if isinstance(answer, int):
        return answer
    if len(answer) == 1 and answer.isupper():
        return ord(answer) - ord("A")
    return [c.strip() for c in choices].index(answer.strip())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--burnish", default=str(ROOT / "target/release/burnish"))
    args = ap.parse_args()
    rows = [json.loads(l) for l in (ROOT / "tests/fixtures/eval/mc.jsonl").read_text().splitlines() if l.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "tiny"
        subprocess.run(
            [args.burnish, "new-model", "--preset", "tiny", "--tokenizer", str(ROOT / "assets/tokenizers/phi3_vision"),
             "--out", str(model_dir), "--seed", str(SEED)],
            check=True, capture_output=True,
        )
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
        logprobs, acc, acc_norm = [], 0, 0
        for r in rows:
            lls = []
            for c in r["choices"]:
                cont = " " + c
                ctx_ids = tok(r["question"])["input_ids"]
                whole = tok(r["question"] + cont)["input_ids"]
                common = 0
                while common < min(len(ctx_ids), len(whole)) and ctx_ids[common] == whole[common]:
                    common += 1
                with torch.no_grad():
                    logits = model(torch.tensor([whole])).logits[0].float()
                lp = torch.log_softmax(logits, dim=-1)
                lls.append(float(sum(lp[t - 1, whole[t]] for t in range(max(common, 1), len(whole)))))
            gold = answer_index(r["answer"], r["choices"])
            lens = [float(len(" " + c)) for c in r["choices"]]
            acc += int(max(range(len(lls)), key=lambda i: lls[i]) == gold)
            acc_norm += int(max(range(len(lls)), key=lambda i: lls[i] / lens[i]) == gold)
            logprobs.append(lls)
    out = {
        "model": {"preset": "tiny", "tokenizer": "assets/tokenizers/phi3_vision", "seed": SEED},
        "logprobs": logprobs,
        "acc": acc / len(rows),
        "acc_norm": acc_norm / len(rows),
    }
    path = ROOT / "tests/fixtures/eval/expected.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}: acc {out['acc']}, acc_norm {out['acc_norm']}")


if __name__ == "__main__":
    main()
