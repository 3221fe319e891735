#!/usr/bin/env bash
# The whole Trellis test suite: setup, format and lint checks, then every
# unit test and every root integration test (network namespaces, real
# kernel objects). Run as root; CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
for d in "$HOME/.cargo/bin" /root/.cargo/bin; do [ -d "$d" ] && export PATH="$d:$PATH"; done

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== the agent's dependency rule (scripts/check-layers.sh)"
bash scripts/check-layers.sh
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== build"
cargo build --workspace --bins --locked

echo "== fuzz smoke runs (cargo-fuzz, 20,000 inputs per target; longer runs: README)"
fuzz_log=$(mktemp)
for target in $(cd fuzz && cargo fuzz list); do
  if (cd fuzz && cargo fuzz run --sanitizer none "$target" -- -runs=20000 -max_len=1024 >"$fuzz_log" 2>&1); then
    grep -E '^(Done|==|SUMMARY|thread)' "$fuzz_log" || true
  else
    # A build error or a crash: show what cargo-fuzz said.
    tail -n 40 "$fuzz_log" >&2
    echo "fuzz target $target failed" >&2
    exit 1
  fi
done
rm -f "$fuzz_log"

if [ "$(id -u)" -ne 0 ]; then
  echo "test.sh: not root: root tests will show as ignored" >&2
  ignored=()
else
  ignored=(--run-ignored all)
fi
echo "== tests"
if command -v cargo-nextest >/dev/null 2>&1; then
  exec cargo nextest run --workspace --locked --no-fail-fast "${ignored[@]}"
else
  include=()
  [ ${#ignored[@]} -gt 0 ] && include=(--include-ignored)
  exec cargo test --workspace --locked --no-fail-fast -- "${include[@]}"
fi
