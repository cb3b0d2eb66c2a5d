#!/usr/bin/env python3
"""Where a training step's CPU time goes, from a `perf` sample of `burnish train`.

    scripts/bench/profile_step.py [--recipe target/bench/vs_trl/runs/sft/burnish/recipe.toml]
                                  [--steps 8] [--freq 299] [--burnish target/release/burnish]

Runs the recipe under `perf record` (user and kernel samples of this process only; needs
`perf` and perf_event_paranoid <= 2), then prints the share of samples per kind of work and
the share taken by the main thread. rayon's two workers do the threaded work; whatever the
main thread runs itself (`main thread` below) runs while the second core idles. The default
recipe is the full-SFT job that `scripts/bench/vs_trl.sh` writes.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# First match wins: (kind, regular expression over the symbol name).
KINDS = [
    ("matmul: gemm kernels", r"gemm_f32::microkernel|gemm_f32::gemm|gemm_basic"),
    ("matmul: gemm packing", r"gemm_common::(simd|pack)|gemm_common::gemm"),
    ("matmul: small-row kernel", r"small_m"),
    ("zero fill (memset, page clearing)", r"memset|clear_page|from_elem|_mi_page_malloc_zero"),
    ("copies (memmove, contiguous, strided)", r"memmove|memcpy|copy_contiguous|to_contiguous|copy_rows|copy_2d|StridedIter|slice_write|cat::"),
    ("element-wise / reductions", r"burn_flex::ops|macerator|call_mut|fold_with|consume_iter|Folder|exp_f32"),
    ("rayon scheduling", r"rayon|crossbeam|sched_yield|futex|finish_task_switch|__schedule"),
    ("allocator", r"mi_|mimalloc|_mi_"),
    ("autodiff bookkeeping", r"burn_autodiff"),
    ("checkpoint writing", r"write_safetensors|ext4|folio|HfTensor"),
]


def perf_report(data: Path, sort: str, extra=()):
    out = subprocess.run(
        ["perf", "report", "-i", str(data), "--no-children", "--sort", sort, "--stdio", *extra],
        check=True, capture_output=True, text=True,
    ).stdout
    rows = []
    for line in out.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(.*\S)", line)
        if m and not line.lstrip().startswith("#"):
            rows.append((float(m.group(1)), m.group(2)))
    return rows


def classify(sym: str) -> str:
    kernel = sym.startswith("[k]")
    name = re.sub(r"^\[[.k]\]\s*", "", sym)
    for kind, pat in KINDS:
        if re.search(pat, name):
            return kind
    return "kernel (other)" if kernel else "other"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", type=Path, default=ROOT / "target/bench/vs_trl/runs/sft/burnish/recipe.toml")
    ap.add_argument("--burnish", type=Path, default=Path(os.environ.get("BURNISH_BIN") or ROOT / "target/release/burnish"))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--freq", type=int, default=299)
    ap.add_argument("--top", type=int, default=15, help="symbols to list")
    ap.add_argument("--perf-data", type=Path, help="classify this perf.data instead of recording one")
    args = ap.parse_args()
    if args.perf_data:
        report(perf_report(args.perf_data, "pid"), perf_report(args.perf_data, "symbol"), args, str(args.perf_data))
        return
    if not args.recipe.exists():
        sys.exit(f"{args.recipe} does not exist: run `scripts/bench/vs_trl.sh --sides burnish --jobs sft` first")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "perf.data"
        cmd = ["perf", "record", "-q", "-F", str(args.freq), "-o", str(data), "--",
               str(args.burnish), "train", "--recipe", str(args.recipe),
               "--set", f"train.output_dir={tmp}/run", "--set", f"train.max_steps={args.steps}"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        by_thread = perf_report(data, "pid")
        symbols = perf_report(data, "symbol")
    report(by_thread, symbols, args, f"`burnish train --recipe {args.recipe}`, {args.steps} steps")


def report(by_thread, symbols, args, what):
    kinds = defaultdict(float)
    for pct, sym in symbols:
        kinds[classify(sym)] += pct
    print(f"perf samples of {what} (whole process)\n")
    print("| kind of work | share of CPU samples |\n|---|---|")
    for kind, pct in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {pct:.1f}% |")
    # The main thread's id is the process id, the smallest of its threads' ids; rayon's
    # workers do the threaded work, the main thread only what it runs itself.
    tids = [(int(m.group(1)), pct) for pct, name in by_thread if (m := re.match(r"(\d+):", name))]
    if tids:
        main_pct = min(tids)[1]
        print(f"\nmain thread alone: {main_pct:.1f}% of samples (work the second core waits through); "
              f"threads: {', '.join(f'{p:.1f}%' for p, _ in sorted(by_thread, reverse=True))}")
    print(f"\ntop {args.top} symbols:")
    for pct, sym in symbols[: args.top]:
        print(f"  {pct:5.2f}%  {sym[:110]}")


if __name__ == "__main__":
    main()
