#!/usr/bin/env bash
# `burnish serve` on CUDA: does a served model stop compiling kernels once warm (static
# shapes: prefill [1, 64k], decoding [2^k rows, 1] over a 64-multiple view), and what does
# continuous batching give on a GPU? Runs the small preset, 64 clients: a warm-up load, then
# a measured one, and counts nvrtc compilations (cubecl's compile log) in each phase.
#
# Usage, on the device machine from the repository root, with the cuda build and the load
# client carried over (no cargo there):
#   scripts/device/serve_cuda_check.sh BURNISH_BIN SERVE_LOAD_BIN OUT_DIR
# GPU_DEVICE=cpu runs it on the CPU (to check the script itself); WARM_S, MEASURE_S, BATCH.
set -uo pipefail
bin=$(realpath "$1")
load=$(realpath "$2")
out=$(realpath -m "$3")
device=${GPU_DEVICE:-cuda:0}
warm=${WARM_S:-20}
measure=${MEASURE_S:-40}
batch=${BATCH:-16}
mkdir -p "$out"
work=runs/serve-cuda
rm -rf "$work"
mkdir -p "$work"
export BURNISH_CACHE_DIR="$work/cache-home"
{
  echo "date: $(date -u +%FT%TZ)"
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) x $(nproc)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null)"
} | tee "$out/machine.txt"
"$bin" new-model --preset small --tokenizer assets/tokenizers/phi3_vision --out "$work/small" > /dev/null
"$bin" serve --model "$work/small" --port 0 --device "$device" --max-batch "$batch" --queue 1024 \
  > "$work/url" 2> "$out/serve.log" &
pid=$!
for _ in $(seq 300); do grep -q listening "$work/url" 2>/dev/null && break; sleep 0.5; done
url=$(sed -n 's/^listening on //p' "$work/url")
[ -n "$url" ] || { cat "$out/serve.log"; exit 1; }
compiled() { cat "$BURNISH_CACHE_DIR"/cubecl/logs/compile-*.log 2>/dev/null | wc -l; }
"$load" --url "$url" --model small --clients 64 --seconds "$warm" --max-tokens 32 --pid "$pid" \
  --out "$out/warm.json" > /dev/null
after_warm=$(compiled)
"$load" --url "$url" --model small --clients 64 --seconds "$measure" --max-tokens 32 --pid "$pid" \
  --out "$out/measure.json" > /dev/null
after_measure=$(compiled)
kill -TERM "$pid"; wait "$pid"
echo "kernels compiled: $after_warm during the warm-up, $((after_measure - after_warm)) more during the measured load" \
  | tee "$out/summary.txt"
python3 - "$out" <<'PY' | tee -a "$out/summary.txt"
import json, sys
for phase in ("warm", "measure"):
    r = json.load(open(f"{sys.argv[1]}/{phase}.json"))
    print(f"{phase}: {r['requests_per_s']:.2f} req/s, {r['new_tokens_per_s']:.1f} new tok/s, p50 {r['latency_p50_s']:.2f} s, "
          f"p99 {r['latency_p99_s']:.2f} s, failed {r['failed']}, rss {r['server_rss_max_mb_by_third']}")
PY
