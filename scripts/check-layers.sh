#!/usr/bin/env bash
# The agent's dependency rule (agent/src/lib.rs, ARCHITECTURE.md), checked:
# the pure parts — model/, reconcile/ but its runner, dataplane/ but linux/
# and the fake — import no side-effect crate: no tokio, no netlink, no aya,
# no store, no nftables executor, no file or process I/O, no syscalls.
# Test code (a file's `#[cfg(test)]` tail, and tests.rs files) is exempt.
# Also: api/ (translation only) never touches the store or the kernel
# itself, and only dataplane/linux/ touches the kernel.
#
#   scripts/check-layers.sh [SRC]    (default: agent/src)
set -euo pipefail
cd "$(dirname "$0")/.."
src="${1:-agent/src}"

# Each rule: a glob of files, the files exempt, a pattern they must not hold.
side_effects='\b(tokio|rtnetlink|netlink_packet_[a-z]+|netlink_sys|aya|trellis_store|nix|socket2|libc)::|\bnftables::helper|std::(fs|process)::|\btrellis_ebpf::Datapath\b'
failed=0

# check NAME PATTERN FILE... — fail on every non-test line of FILE matching PATTERN.
check() {
  local name=$1 pattern=$2
  shift 2
  local f
  for f in "$@"; do
    [ -f "$f" ] || continue
    case "$f" in */tests.rs) continue ;; esac
    # The file up to its test module, comments dropped.
    if awk '/^#\[cfg\(test\)\]/ { exit } { sub(/\/\/.*/, ""); print FILENAME ":" FNR ": " $0 }' "$f" \
      | grep -E "$pattern"; then
      echo "check-layers: $name: $f imports or does what its layer must not (above)" >&2
      failed=1
    fi
  done
}

pure=$(find "$src/model" "$src/reconcile" "$src/dataplane" -name '*.rs' \
  ! -path "$src/reconcile/runner.rs" ! -path "$src/dataplane/linux/*" ! -path "$src/dataplane/fake.rs" | sort)
# shellcheck disable=SC2086
check "pure folders" "$side_effects" $pure

# The front doors translate: no store, no kernel of their own.
front=$(find "$src/api" -name '*.rs' | sort)
# shellcheck disable=SC2086
check "api (translation only)" '\b(rtnetlink|netlink_packet_[a-z]+|aya|nftables)::|crate::dataplane::linux|\.store\.(txn|put|delete)\b' $front

# The kernel is touched in dataplane/linux only.
rest=$(find "$src" -name '*.rs' ! -path "$src/dataplane/linux/*" ! -path "$src/bin/*" | sort)
# shellcheck disable=SC2086
check "one kernel boundary" '\b(rtnetlink|netlink_packet_[a-z]+|netlink_sys|socket2|aya)::|crate::dataplane::linux::(netns|xfrm|sysctl|probe)::' $rest

if [ "$failed" -ne 0 ]; then
  echo "check-layers: FAILED (see the dependency rule in agent/src/lib.rs and ARCHITECTURE.md)" >&2
  exit 1
fi
echo "check-layers: the dependency rule holds ($(echo "$pure" | wc -w) pure files, $(echo "$front" | wc -w) front-door files)"
