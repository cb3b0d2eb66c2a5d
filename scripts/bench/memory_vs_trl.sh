#!/usr/bin/env bash
# Peak memory and speed of LoRA on a Qwen2.5-0.5B-shaped model, burnish beside TRL with
# gradient checkpointing, at several sequence lengths (issue 18). Same venv and build as
# vs_trl.sh:
#   scripts/bench/memory_vs_trl.sh [--seqs 1024,2048,4096] [--steps 2] [--warmup 1] [--sides burnish,burnish-bf16,ref]
# Writes target/bench/memory_vs_trl/results.{md,json}.
set -euo pipefail
BENCH_SCRIPT=memory_vs_trl.py exec "$(dirname "${BASH_SOURCE[0]}")/vs_trl.sh" "$@"
