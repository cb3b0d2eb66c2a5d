#!/usr/bin/env bash
# Peak memory of the loss alone, chunked against unchunked, on a Qwen2.5-0.5B-shaped head
# (hidden 896, vocabulary 151,936; issue 18): the SFT token log-probs and the distillation
# loss (teacher logits recomputed from its hidden states), forward and backward, one process
# per case. Prints a markdown table and writes target/bench/loss_memory/results.jsonl.
#   scripts/bench/loss_memory.sh [--positions 512,1024,2048]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
positions=512,1024,2048
while [[ $# -gt 0 ]]; do
  case "$1" in
    --positions) positions="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
cargo build --release --example loss_memory >&2
out=target/bench/loss_memory
mkdir -p "$out"
: > "$out/results.jsonl"
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); flags: $(grep -m1 -o -w -E 'avx2|avx512f|avx512_bf16|amx_tile' /proc/cpuinfo | sort -u | xargs)" >&2
for n in ${positions//,/ }; do
  for loss in sft kd; do
    for mode in chunked plain; do
      target/release/examples/loss_memory "$loss" "$mode" "$n" | tee -a "$out/results.jsonl" >&2
    done
  done
done
python3 - "$out/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
cell = {(r["loss"], r["positions"], r["chunked"]): r for r in rows}
print("| loss | positions | chunk ratio | unchunked peak | chunked peak | fall | unchunked s | chunked s |")
print("|---|---|---|---|---|---|---|---|")
for (loss, n, chunked), r in sorted(cell.items()):
    if not chunked or (loss, n, False) not in cell:
        continue
    p = cell[(loss, n, False)]
    print(f"| {loss} | {n} | {n / r['chunk']:.0f} | {p['peak_above_inputs_mb']:,.0f} MB | "
          f"{r['peak_above_inputs_mb']:,.0f} MB | {p['peak_above_inputs_mb'] / r['peak_above_inputs_mb']:.1f}x | "
          f"{p['seconds']:.1f} | {r['seconds']:.1f} |")
PY
