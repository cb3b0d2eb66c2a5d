#!/usr/bin/env bash
# The README's main command: build, then run the offline quickstart recipe (a tiny model
# built from the bundled tokenizer, fine-tuned on the bundled conversations).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
./target/release/burnish train --recipe recipes/quickstart.toml "$@"
