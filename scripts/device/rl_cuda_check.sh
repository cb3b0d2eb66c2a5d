#!/usr/bin/env bash
# GRPO and PPO on CUDA with the cuda build of burnish (recipes/grpo.toml and ppo.toml on the
# tiny model, a few steps), with cubecl's compilation and autotune logs, to see where GPU
# time goes (session 3 saw CUDA runs far slower than CPU with the host at 100% of a core).
# Usage (device machine, repo root): scripts/device/rl_cuda_check.sh BURNISH_BIN OUT_DIR [CACHE_DIR]
# With CACHE_DIR, cubecl keeps compiled kernels and autotune results there (and tunes at
# its minimal level), so the second process starts warm.
set -uo pipefail
bin=$1
out=$2
cache=${3:-}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
cat > cubecl.toml <<TOML
[compilation.logger]
level = "basic"
file = "$out/compile.log"
append = false
[autotune.logger]
level = "minimal"
file = "$out/autotune.log"
append = false
TOML
if [ -n "$cache" ]; then
  mkdir -p "$cache"
  cat >> cubecl.toml <<TOML
[compilation]
cache = { file = "$cache/compilation" }
[autotune]
level = "minimal"
cache = { file = "$cache/autotune" }
TOML
fi
run() {
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  timeout "$limit" "$bin" train --device cuda "$@" > "$out/$name.log" 2>&1
  local rc=$?
  local t1=$(date +%s)
  echo "$name rc=$rc wall=$((t1 - t0))s kernels_compiled=$(wc -l < "$out/compile.log" 2>/dev/null)" | tee -a "$out/summary.txt"
  tail -4 "$out/$name.log"
}
# The recipe starts from the quickstart model; here from a fresh tiny one.
fresh=(--set 'model.init_recipe=""' --set 'model.init_preset="tiny"' --set 'model.init_tokenizer="assets/tokenizers/phi3_vision"')
run grpo "${FIRST_LIMIT:-200}" --recipe recipes/grpo.toml "${fresh[@]}" --set train.max_steps=4 --set train.save_steps=0 \
  --set 'model.path="runs/device/grpo-model"' --set 'data.cache_dir="runs/device/cache"' \
  --set 'train.output_dir="runs/device/grpo"'
cp runs/device/grpo/metrics.jsonl "$out/grpo.metrics.jsonl" 2>/dev/null
cp "$out/compile.log" "$out/grpo.compile.log" 2>/dev/null
# The same run again in a new process: what is left once kernels are compiled is the run.
run grpo_again "${SECOND_LIMIT:-150}" --recipe recipes/grpo.toml "${fresh[@]}" --set train.max_steps=4 --set train.save_steps=0 \
  --set 'model.path="runs/device/grpo-model"' --set 'data.cache_dir="runs/device/cache"' \
  --set 'train.output_dir="runs/device/grpo2"'
cp runs/device/grpo2/metrics.jsonl "$out/grpo_again.metrics.jsonl" 2>/dev/null
for f in "$out"/*.log; do
  [ "$(stat -c %s "$f")" -gt 2000000 ] && xz -T0 -6 "$f"
done
exit 0
