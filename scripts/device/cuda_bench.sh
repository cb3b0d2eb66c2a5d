#!/usr/bin/env bash
# CUDA throughput and start-up of the cuda build of burnish, cold cache then warm cache:
# the quickstart, full SFT and LoRA on the `base` preset at 8 x 1024 tokens, DPO + LoRA, and
# GRPO with 64 completions per step. Prints, per job and pass: kernels compiled (cubecl's
# compilation log), process wall time, seconds to the end of the first step, the first
# step's own seconds (mostly compilation when cold), steady tokens/s, generation new tokens/s
# (GRPO), peak GPU memory, and the first step's loss on CUDA beside the CPU's for the same
# step (the same binary with --device cpu).
#
# Usage, on the device machine from the repository root, with the cuda binary carried over:
#   scripts/device/cuda_bench.sh BURNISH_BIN OUT_DIR
# Build it first here: cargo build --release --features cuda (and carry target/release/burnish).
# JOBS=sft,lora limits the jobs; CPU_CHECK=0 skips the CPU first steps; LIMIT (s) caps a run;
# GPU_DEVICE=cpu runs the whole script on the CPU (to check the script itself).
set -uo pipefail
bin=$(realpath "$1")
out=$(realpath -m "$2")
jobs=${JOBS:-quickstart,sft,lora,dpo,grpo}
limit=${LIMIT:-240}
mkdir -p "$out"
work=runs/cuda-bench
rm -rf "$work"
mkdir -p "$work"
# A fresh kernel cache: the first pass is cold, the second finds what the first compiled.
export BURNISH_CACHE_DIR="$work/cache-home"
{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) x $(nproc)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null)"
} | tee "$out/machine.txt"

base_model='model.init_preset="base"'
tok='model.init_tokenizer="assets/tokenizers/phi3_vision"'
# name recipe overrides...: every job writes into $work/NAME-PASS.
declare -A args
args[quickstart]='--recipe recipes/quickstart.toml --set train.max_steps=20 --set train.eval_steps=0 --set train.sample_prompts=[]'
# The base preset on packed 8 x 1024-token rows of the bundled conversations.
base_8x1024="--set $base_model --set $tok --set model.init_seed=0
  --set data.files=[\"assets/data/quickstart/fastchat_dummy_conversation.json\"] --set data.format=\"sharegpt\"
  --set data.max_seq_len=1024 --set data.packing=true --set train.per_device_train_batch_size=8
  --set train.gradient_accumulation_steps=1 --set train.max_steps=8 --set train.eval_steps=0
  --set train.eval_on_start=false --set train.sample_prompts=[] --set train.logging_steps=1"
args[sft]="--recipe recipes/sft.toml $base_8x1024"
args[lora]="--recipe recipes/lora.toml $base_8x1024"
# The preference and RL recipes start from the quickstart model; here from a fresh tiny one.
fresh_tiny='--set model.init_recipe="" --set model.init_preset="tiny" --set model.init_tokenizer="assets/tokenizers/phi3_vision"'
args[dpo]="--recipe recipes/dpo.toml $fresh_tiny --set train.max_steps=8 --set train.eval_steps=0 --set train.eval_on_start=false"
args[grpo]="--recipe recipes/grpo.toml $fresh_tiny"' --set train.max_steps=4 --set train.per_device_train_batch_size=64
  --set train.gradient_accumulation_steps=1 --set grpo.num_generations=8 --set train.eval_steps=0
  --set train.eval_on_start=false'

run_job() {
  local name=$1 pass=$2 device=$3 steps_override=${4:-}
  local dir="$work/$name-$pass"
  local model="$work/$name-model"
  local gpu_peak="$dir.gpu_mem_mib"
  mkdir -p "$dir"
  local sampler=
  if [ "$device" != cpu ] && command -v nvidia-smi > /dev/null; then
    (while :; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; sleep 0.5; done) \
      | awk '{ if ($1 > m) { m = $1; print m > "'"$gpu_peak"'"; fflush() } }' &
    sampler=$!
  fi
  local t0=$EPOCHREALTIME
  # Every output line stamped with the seconds since start: the first-step report's stamp
  # is the time to the first step.
  # shellcheck disable=SC2086
  timeout "$limit" "$bin" train --device "$device" ${args[$name]} $steps_override \
    --set "model.path=\"$model\"" --set "data.cache_dir=\"$work/$name-cache\"" \
    --set "train.output_dir=\"$dir\"" --set train.save_steps=0 --set train.overwrite_output_dir=true \
    2>&1 | while IFS= read -r line; do
      printf '%.1f %s\n' "$(awk "BEGIN { print $EPOCHREALTIME - $t0 }")" "$line"
    done > "$dir.log"
  local rc=${PIPESTATUS[0]}
  local wall=$(awk "BEGIN { print $EPOCHREALTIME - $t0 }")
  [ -n "$sampler" ] && { kill "$sampler" 2>/dev/null; pkill -P "$sampler" 2>/dev/null; }
  python3 scripts/device/summarise_cuda_bench.py "$name" "$pass" "$device" "$rc" "$wall" \
    "$dir/metrics.jsonl" "$gpu_peak" "$dir.log" | tee -a "$out/summary.tsv"
  cp "$dir/metrics.jsonl" "$out/$name-$pass.metrics.jsonl" 2>/dev/null
  tail -5 "$dir.log" > "$out/$name-$pass.tail.txt"
}

python3 scripts/device/summarise_cuda_bench.py --header | tee "$out/summary.tsv"
IFS=, read -ra selected <<< "$jobs"
for pass in cold warm; do
  for name in "${selected[@]}"; do
    run_job "$name" "$pass" "${GPU_DEVICE:-cuda}"
  done
done
if [ "${CPU_CHECK:-1}" = 1 ]; then
  for name in "${selected[@]}"; do
    [ "$name" = grpo ] && continue # sampled completions differ between devices
    run_job "$name" cpu-step1 cpu "--set train.max_steps=1"
  done
fi
cp "$work"/cache-home/cubecl/logs/*.log "$out/" 2>/dev/null
exit 0
