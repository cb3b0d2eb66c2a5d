#!/usr/bin/env bash
# QLoRA and LoRA on CUDA with the cuda build of burnish: the same 30 steps as on CPU
# (recipes/qlora.toml, tiny model, bundled data), with GPU memory sampled by nvidia-smi.
# Usage (device machine, repo root): scripts/device/qlora_cuda_check.sh BURNISH_BIN OUT_DIR
set -uo pipefail
bin=$1
out=$2
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
run() {
  local name=$1
  shift
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$out/$name.mem" &
  local smi=$!
  local t0=$(date +%s.%N)
  "$bin" train --recipe recipes/qlora.toml --device cuda \
    --set train.max_steps=30 --set train.eval_steps=10 --set train.save_steps=0 \
    --set train.sample_prompts=[] \
    --set "model.path=\"runs/device/base-model\"" \
    --set "data.cache_dir=\"runs/device/cache\"" \
    --set "train.output_dir=\"runs/device/$name\"" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  local t1=$(date +%s.%N)
  kill $smi
  echo "$name rc=$rc wall=$(echo "$t1 - $t0" | bc)s peak_gpu_mem_mib=$(sort -n "$out/$name.mem" | tail -1)" | tee -a "$out/summary.txt"
  tail -3 "$out/$name.log"
  cp "runs/device/$name/metrics.jsonl" "$out/$name.metrics.jsonl" 2>/dev/null
}
run qlora
run lora --set 'model.quantize="none"'
