#!/usr/bin/env bash
# Load benchmark of `burnish serve` on this machine, in one run:
#
#   scripts/bench/serve_load.sh [--preset small] [--clients 64] [--seconds 60] [--max-tokens 32]
#                               [--batches 1,16,64] [--device cpu|cuda:N] [--out target/bench/serve]
#
# Writes a random-init model of the preset (bundled tokenizer) once, then for each
# --max-batch in --batches starts the server, runs examples/serve_load (64 clients sending
# chat requests back to back, `ignore_eos` so every answer has --max-tokens tokens), and
# stops it. Prints one line per batch size and the batching gain over --max-batch 1, with
# the CPU model, server CPU use and RSS; results land in OUT/serve_load.json.
# On the GPU machine (no cargo there): carry the cuda build and the client, and run
#   BURNISH_BIN=target/cuda/release/burnish SERVE_LOAD_BIN=target/release/examples/serve_load \
#       scripts/bench/serve_load.sh --device cuda:0 --seconds 30
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PRESET=small CLIENTS=64 SECONDS_=60 MAX_TOKENS=32 BATCHES=1,16,64 DEVICE=cpu OUT=target/bench/serve
while [ $# -gt 0 ]; do
    case "$1" in
        --preset) PRESET="$2"; shift 2 ;;
        --clients) CLIENTS="$2"; shift 2 ;;
        --seconds) SECONDS_="$2"; shift 2 ;;
        --max-tokens) MAX_TOKENS="$2"; shift 2 ;;
        --batches) BATCHES="$2"; shift 2 ;;
        --device) DEVICE="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
mkdir -p "$OUT"
if [ -z "${BURNISH_BIN:-}" ]; then
    cargo build --release --bin burnish --example serve_load >&2
    BURNISH_BIN="$ROOT/target/release/burnish"
fi
LOAD="${SERVE_LOAD_BIN:-$ROOT/target/release/examples/serve_load}"
[ -x "$LOAD" ] || cargo build --release --example serve_load >&2
MODEL="$OUT/$PRESET"
[ -f "$MODEL/config.json" ] || "$BURNISH_BIN" new-model --preset "$PRESET" \
    --tokenizer assets/tokenizers/phi3_vision --out "$MODEL" --seed 0 >&2

CPU="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
FLAGS="$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|fma|avx512f|avx512_bf16|amx_tile|amx_bf16)$' | tr '\n' ' ')"
echo "cpu: $CPU, $(nproc) cores ($FLAGS)"
echo "model: $PRESET preset on $DEVICE, $CLIENTS clients, ${SECONDS_}s each, max_tokens $MAX_TOKENS"

results=()
for B in ${BATCHES//,/ }; do
    LOG="$OUT/serve-b$B.log"
    "$BURNISH_BIN" serve --model "$MODEL" --port 0 --max-batch "$B" --queue 1024 --device "$DEVICE" \
        > "$OUT/serve-b$B.url" 2> "$LOG" &
    PID=$!
    for _ in $(seq 100); do grep -q listening "$OUT/serve-b$B.url" 2>/dev/null && break; sleep 0.2; done
    URL="$(sed -n 's/^listening on //p' "$OUT/serve-b$B.url")"
    [ -n "$URL" ] || { cat "$LOG" >&2; exit 1; }
    "$LOAD" --url "$URL" --model "$PRESET" --clients "$CLIENTS" --seconds "$SECONDS_" \
        --max-tokens "$MAX_TOKENS" --pid "$PID" --out "$OUT/b$B.json" > /dev/null
    kill -TERM "$PID"; wait "$PID" || true
    results+=("$B")
done

python3 - "$OUT" "$CPU" "$FLAGS" "${results[@]}" <<'PY'
import json, sys
out, cpu, flags, batches = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
rows = {b: json.load(open(f"{out}/b{b}.json")) for b in batches}
base = rows.get("1")
print(f"{'max-batch':>9} {'req/s':>7} {'new tok/s':>9} {'p50 s':>7} {'p99 s':>7} {'failed':>6} {'cpu %':>6} {'rss MB (thirds)':>22} {'gain':>6}")
for b, r in rows.items():
    gain = r["new_tokens_per_s"] / base["new_tokens_per_s"] if base else float("nan")
    rss = "/".join(f"{x:.0f}" for x in r["server_rss_max_mb_by_third"])
    print(f"{b:>9} {r['requests_per_s']:7.2f} {r['new_tokens_per_s']:9.1f} {r['latency_p50_s']:7.2f} {r['latency_p99_s']:7.2f} {r['failed']:6d} {r['server_cpu_percent']:6.0f} {rss:>22} {gain:5.2f}x")
json.dump({"cpu": cpu, "flags": flags.split(), "runs": rows}, open(f"{out}/serve_load.json", "w"), indent=1)
PY
