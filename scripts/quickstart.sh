#!/usr/bin/env bash
# The README's main job: build burnish, create a tiny model with the bundled tokenizer if
# none exists, and generate from it. Offline; needs only cargo.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
BIN=target/release/burnish
MODEL=runs/quickstart/tiny-model
if [ ! -f "$MODEL/config.json" ]; then
  "$BIN" new-model --preset tiny --tokenizer assets/tokenizers/phi3_vision --out "$MODEL" --seed 0
fi
"$BIN" generate --model "$MODEL" --chat "Write a haiku about autumn." --max-new-tokens 24 --temperature 0.8 --top-p 0.95 --seed 0
