#!/usr/bin/env python3
"""Reads a burnish run's TensorBoard event files with TensorBoard's own reader and checks
every scalar against metrics.jsonl (`[train] report_to = ["tensorboard"]`).

    pip install tensorboard        # (the bench venv: target/bench-venv/bin/python -m pip install tensorboard)
    python scripts/parity/check_tensorboard.py RUN_DIR

Prints the tags and counts it read and exits non-zero on the first mismatch.
"""
import json
import math
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main(run_dir: Path) -> int:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    got = {t: {e.step: e.value for e in acc.Scalars(t)} for t in tags}
    want = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for k, v in rec.items():
            if k == "step" or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            tag = "eval/" + k[5:] if k.startswith("eval_") else "train/" + k
            want.setdefault(tag, {})[rec["step"]] = float(v)
    if set(got) != set(want):
        print(f"tags differ: only in events {set(got) - set(want)}, only in metrics {set(want) - set(got)}")
        return 1
    for tag, points in want.items():
        if set(points) != set(got[tag]):
            print(f"{tag}: steps differ: {sorted(points)} vs {sorted(got[tag])}")
            return 1
        for step, v in points.items():
            g = got[tag][step]
            if not math.isclose(g, v, rel_tol=1e-6, abs_tol=1e-6):
                print(f"{tag} step {step}: events {g} vs metrics {v}")
                return 1
    print(f"ok: {len(tags)} tags, {sum(len(p) for p in want.values())} scalars match metrics.jsonl")
    for t in sorted(tags):
        print(f"  {t}: {len(got[t])} points")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
