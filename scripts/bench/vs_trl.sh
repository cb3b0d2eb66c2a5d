#!/usr/bin/env bash
# burnish vs TRL/PyTorch on this machine, in one run:
#
#   scripts/bench/vs_trl.sh [--jobs sft,lora,dpo,grpo,distill,distill-cached,sft-moe] [--steps 6] [--warmup 2]
#                           [--out target/bench/vs_trl] [--sides burnish,ref] ...
#
# 1. makes (once) a venv at target/bench-venv with pinned torch/transformers/trl/peft from PyPI
#    (BENCH_VENV=DIR to use another; BENCH_PIP_ARGS="--index-url ..." passes options to pip);
# 2. builds burnish (cargo build --release) unless BURNISH_BIN names a binary;
# 3. runs scripts/bench/vs_trl.py with the venv's python and these arguments
#    (see `scripts/bench/vs_trl.sh --help`).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
VENV="${BENCH_VENV:-$ROOT/target/bench-venv}"
PINS=(torch==2.15.0 transformers==5.25.0 trl==1.16.0 peft==0.21.2 datasets accelerate)
CHECK='import torch, transformers, trl, peft, datasets, accelerate, tokenizers
want = {"torch": "2.15.0", "transformers": "5.25.0", "trl": "1.16.0", "peft": "0.21.2"}
have = {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
        "trl": trl.__version__, "peft": peft.__version__}
bad = {k: have[k] for k in want if have[k] != want[k]}
assert not bad, f"version mismatch: {bad}"'

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "$CHECK" >/dev/null 2>&1; then
    echo "[venv] installing ${PINS[*]} into $VENV" >&2
    PY="${PYTHON:-python3}"
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install -q ${BENCH_PIP_ARGS:-} "${PINS[@]}"
    "$VENV/bin/python" -c "$CHECK"
fi

WANT_HELP=0
for arg in "$@"; do case "$arg" in -h|--help) WANT_HELP=1 ;; esac; done
if [ -z "${BURNISH_BIN:-}" ] && [ "$WANT_HELP" = 0 ]; then
    echo "[build] cargo build --release" >&2
    cargo build --release
    BURNISH_BIN="$ROOT/target/release/burnish"
fi
export BURNISH_BIN="${BURNISH_BIN:-$ROOT/target/release/burnish}"

# memory_vs_trl.sh runs its own harness through the same venv and build.
exec "$VENV/bin/python" "$ROOT/scripts/bench/${BENCH_SCRIPT:-vs_trl.py}" --burnish "$BURNISH_BIN" "$@"
