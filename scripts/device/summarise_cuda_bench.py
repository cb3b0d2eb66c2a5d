#!/usr/bin/env python3
"""One TSV row of scripts/device/cuda_bench.sh from a run's metrics.jsonl and stamped log.

Usage: summarise_cuda_bench.py --header
       summarise_cuda_bench.py JOB PASS DEVICE RC WALL_S METRICS GPU_PEAK_FILE STAMPED_LOG
"""
import json
import re
import sys

COLUMNS = [
    "job", "pass", "device", "rc", "wall_s", "to_first_step_s", "first_step_s",
    "kernels_compiled", "steady_tok_s", "gen_new_tok_s", "gpu_peak_mib", "step1_loss",
]


def rows(path):
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except OSError:
        return []


def first_step_stamp(log):
    """Seconds from the process start to the first-step report (CUDA runs print one)."""
    try:
        with open(log) as f:
            for line in f:
                m = re.match(r"([\d.]+) first step: ", line)
                if m:
                    return float(m.group(1))
    except OSError:
        pass
    return None


def main():
    if sys.argv[1:] == ["--header"]:
        print("\t".join(COLUMNS))
        return
    job, pss, device, rc, wall, metrics, gpu_peak, log = sys.argv[1:9]
    steps = [r for r in rows(metrics) if "loss" in r and "time/step_s" in r]
    first = steps[0] if steps else {}
    # Steady state: the steps after the first two (shapes seen, caches warm).
    steady = steps[2:] or steps[1:]
    tok = sum(r["tokens_per_s"] * r["time/step_s"] for r in steady)
    secs = sum(r["time/step_s"] for r in steady)
    gen = [r["generation_tokens_per_s"] for r in steady if "generation_tokens_per_s" in r]
    try:
        with open(gpu_peak) as f:
            peak = f.read().strip()
    except OSError:
        peak = ""
    kernels = max((r.get("kernels_compiled", 0) for r in steps), default="")
    fmt = lambda v, p=1: "" if v is None or v == "" else f"{v:.{p}f}"
    print("\t".join([
        job, pss, device, rc, fmt(float(wall)), fmt(first_step_stamp(log)),
        fmt(first.get("time/step_s")), str(kernels), fmt(tok / secs if secs else None, 0),
        fmt(sum(gen) / len(gen) if gen else None, 0), peak, fmt(first.get("loss"), 6),
    ]))


if __name__ == "__main__":
    main()
