#!/usr/bin/env bash
# Sets everything up and shows Trellis doing its main job on this machine:
# trellisd with its embedded store, a network, two endpoints talking, egress
# through the host, names, a service VIP, an --internal network cut off, and
# a debugging shell.
#
# The agent runs in a network namespace that plays the host, wired to a
# second namespace that plays the outside world, so the demo never touches
# this machine's own interfaces and sends no traffic off the machine.
# Safe to run twice. `--keep` leaves the agent running afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
KEEP=0; [ "${1:-}" = "--keep" ] && KEEP=1
bash scripts/setup.sh
for d in "$HOME/.cargo/bin" /root/.cargo/bin; do [ -d "$d" ] && export PATH="$d:$PATH"; done

HOST=trellis-demo OUT=trellis-demo-out
STATE=/var/lib/trellis-demo RUN=/run/trellis-demo
export TRELLIS_SOCKET=$RUN/trellisd.sock
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
cleanup() {
  [ -f "$RUN/trellisd.pid" ] && kill "$(cat "$RUN/trellisd.pid")" 2>/dev/null || true
  sleep 0.3
  for f in "$RUN"/netns/*; do [ -e "$f" ] && umount -l "$f" 2>/dev/null; done
  mountpoint -q "$RUN/bpf" 2>/dev/null && umount -l "$RUN/bpf"
  ip netns del $HOST 2>/dev/null || true
  ip netns del $OUT 2>/dev/null || true
  rm -rf "$STATE" "$RUN"
}

say "building (release)"
cargo build --release --bins --locked 2>&1 | tail -1
BIN=$PWD/target/release
ctl() { echo "\$ trellisctl $*"; "$BIN/trellisctl" "$@"; }
in_ns() { nsenter --net="$1" -- "${@:2}"; }

cleanup
say "a host (netns $HOST) with an uplink to the outside world (netns $OUT)"
ip netns add $HOST; ip netns add $OUT
ip -n $HOST link set lo up; ip -n $OUT link set lo up
ip link add tdemo-up netns $HOST type veth peer name tdemo-out netns $OUT
ip -n $HOST addr add 198.18.200.1/24 dev tdemo-up; ip -n $HOST link set tdemo-up up
ip -n $OUT addr add 198.18.200.2/24 dev tdemo-out; ip -n $OUT link set tdemo-out up
ip -n $HOST route add default via 198.18.200.2

say "starting trellisd (embedded store in $STATE)"
mkdir -p "$RUN"
start_agent() {
  # In a subshell, so the shell does not report the agent's death as a job.
  # The Docker driver's socket stays in the demo's run dir (not /run/docker).
  (nsenter --net=/run/netns/$HOST -- "$BIN/trellisd" --state-dir "$STATE" --run-dir "$RUN" \
     --docker-plugin "$RUN/docker-plugins/trellis.sock" >>"$RUN/trellisd.log" 2>&1 &
   echo $! >"$RUN/trellisd.pid")
}
start_agent
for _ in $(seq 100); do [ -S "$TRELLIS_SOCKET" ] && break; sleep 0.1; done
[ -S "$TRELLIS_SOCKET" ] || { cat "$RUN/trellisd.log"; exit 1; }
ctl status
ctl host ls

say "a network and two endpoints"
ctl network create app --subnet 10.30.0.0/24 --attachable
ctl attach app --name web --label trellis.service=frontend
ctl attach app --name client
ctl endpoint ls
WEB=$("$BIN/trellisctl" endpoint ls --json | python3 -c 'import json,sys; print([e for e in json.load(sys.stdin) if e["name"]=="web"][0]["address"].split("/")[0])')
CLIENT_NS=$("$BIN/trellisctl" endpoint ls --json | python3 -c 'import json,sys; print([e for e in json.load(sys.stdin) if e["name"]=="client"][0]["netns"])')

say "client -> web ($WEB)"
in_ns "$CLIENT_NS" ping -c 3 -i 0.2 "$WEB"
say "client -> the outside world (198.18.200.2), masqueraded by the host"
in_ns "$CLIENT_NS" ping -c 2 -i 0.2 198.18.200.2

say "names: every agent answers DNS on its networks' gateways"
echo "web           -> $(in_ns "$CLIENT_NS" dig +short +time=2 @10.30.0.1 web)"
echo "tasks.frontend -> $(in_ns "$CLIENT_NS" dig +short +time=2 @10.30.0.1 tasks.frontend)"
echo "web.app (asked of 192.0.2.53, redirected to Trellis) -> $(in_ns "$CLIENT_NS" dig +short +time=2 @192.0.2.53 web.app)"

say "a service: a virtual IP load-balanced by the eBPF datapath"
ctl attach app --name web2 --label trellis.service=frontend
ctl service create frontend --network app --port 80:8080
ctl service ls
VIP=$("$BIN/trellisctl" service inspect frontend | sed -n 's/.*"vip": "\([0-9.]*\)".*/\1/p')
echo "frontend      -> $(in_ns "$CLIENT_NS" dig +short +time=2 @10.30.0.1 frontend)   (its VIP)"
echo "tasks.frontend -> $(in_ns "$CLIENT_NS" dig +short +time=2 @10.30.0.1 tasks.frontend | tr '\n' ' ')  (its backends)"
in_ns "$CLIENT_NS" ping -c 2 -i 0.2 "$VIP" | tail -2

say "an --internal network is cut off from everything outside it"
ctl network create vault --internal --attachable
ctl attach vault --name db
DB_NS=$("$BIN/trellisctl" endpoint ls --network vault --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["netns"])')
if in_ns "$DB_NS" ping -c 2 -W 1 198.18.200.2 >/dev/null 2>&1; then echo "UNEXPECTED: vault reached the outside"; exit 1; else echo "db -> 198.18.200.2: no reply (cut off, as it should be)"; fi
if in_ns "$DB_NS" ping -c 1 -W 1 "$WEB" >/dev/null 2>&1; then echo "UNEXPECTED: vault reached app"; exit 1; else echo "db -> web ($WEB): no reply (other network)"; fi

say "an --encrypted network needs IPsec ESP in the kernel"
if "$BIN/trellisctl" status --json | python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["capabilities"].get("esp") else 1)'; then
  ctl network create sec --encrypted --attachable
  ctl network inspect sec
else
  echo "\$ trellisctl network create sec --encrypted --attachable"
  "$BIN/trellisctl" network create sec --encrypted --attachable 2>&1 | sed 's/^/  /' || true
  echo "(this kernel has no ESP: refused, nothing created; the VM test shows IPsec for real)"
fi

say "a debugging shell inside the network (trellisctl attach app -- CMD)"
ctl attach app --name debug -- sh -c "ip -br addr show eth0; ping -c 2 -i 0.2 web | tail -2"

say "the datapath outlives the agent: kill -9 under traffic"
in_ns "$CLIENT_NS" ping -q -c 60 -i 0.05 "$WEB" > "$RUN/ping.txt" &
P=$!
sleep 0.8; kill -9 "$(cat "$RUN/trellisd.pid")"; echo "trellisd killed"
sleep 0.5
start_agent; echo "trellisd restarted"
wait $P; tail -2 "$RUN/ping.txt"
for _ in $(seq 100); do [ -S "$TRELLIS_SOCKET" ] && break; sleep 0.1; done
ctl network ls

if [ $KEEP = 1 ]; then
  say "left running: export TRELLIS_SOCKET=$TRELLIS_SOCKET; $BIN/trellisctl status"
else
  say "cleaning up (run with --keep to leave it running)"
  cleanup
  echo "done"
fi
