#!/usr/bin/env bash
# Runs the benchmark harness (release build) and writes BENCHMARKS.md.
# Run as root. Extra arguments go to trellis-bench (--endpoints N, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
for d in "$HOME/.cargo/bin" /root/.cargo/bin; do [ -d "$d" ] && export PATH="$d:$PATH"; done
cargo build --release --bins --locked
TRELLIS_BIN_DIR=$PWD/target/release exec ./target/release/trellis-bench "$@"
