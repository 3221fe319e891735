#!/usr/bin/env bash
# Sets everything up and shows Trellis doing its job on this machine: a
# cluster of three hosts, each a network namespace with its own trellisd,
# wired to one underlay bridge (in a namespace of its own, which also runs
# the cluster's etcd). Containers on different hosts ping and resolve each
# other across the VXLAN mesh, a service VIP spreads connections over
# backends on all three hosts, two tenants' networks cannot reach each
# other, an --internal network is cut off, and a host is killed: its peers
# forget it when its lease runs out and reclaim its endpoints.
#
# Nothing on this machine's own interfaces is touched and no traffic leaves
# the namespaces the demo makes. Every step shown is checked: the demo exits
# non-zero with a message when one does not work. Safe to run twice;
# everything it made is removed on exit (also on failure or Ctrl-C), unless
# `--keep` is given and the demo succeeded.
set -Eeuo pipefail
cd "$(dirname "$0")/.."
KEEP=0
case "${1:-}" in
  --keep) KEEP=1 ;;
  "") ;;
  *) echo "usage: $0 [--keep]" >&2; exit 2 ;;
esac
bash scripts/setup.sh
for d in "$HOME/.cargo/bin" /root/.cargo/bin; do [ -d "$d" ] && export PATH="$d:$PATH"; done

# Names and addresses of the lab: every namespace starts with "tdemo-", the
# underlay is 198.18.200.0/24 inside it (hosts .1-.3, the underlay
# namespace .254: etcd, and the "outside world" the hosts route to).
P=tdemo
UL=$P-ul
DIR=/tmp/trellis-demo
UNDERLAY=198.18.200
ETCD_URL=etcd://$UNDERLAY.254:2379
LEASE_MS=3000 GRACE_MS=2000
BIN=$PWD/target/debug

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
FAILED="" FAILED_AT=""
fail() { FAILED=1; printf '\n\033[1;31mDEMO FAILED: %s\033[0m\n' "$*" >&2; exit 1; }
trap 'FAILED_AT="line $LINENO: $BASH_COMMAND"' ERR
hns() { echo "$P-h$1"; }                      # host N's namespace
sock() { echo "$DIR/h$1/run/trellisd.sock"; }
# Show and run `trellisctl ARGS` on host N.
ctl() {
  local h=$1 a shown=""; shift
  for a in "$@"; do case $a in *" "*) shown+=" \"$a\"" ;; *) shown+=" $a" ;; esac; done
  echo "host$h\$ trellisctl$shown"
  "$BIN/trellisctl" --socket "$(sock "$h")" "$@"
}
# The same, quietly, for the script's own use.
q() { local h=$1; shift; "$BIN/trellisctl" --socket "$(sock "$h")" "$@"; }
# A field of an endpoint (by name) from host N's `endpoint ls --json`.
ep() {
  q "$1" endpoint ls --json | python3 -c '
import json, sys
m = [e for e in json.load(sys.stdin) if e["name"] == sys.argv[1]]
if not m: sys.exit("no endpoint " + sys.argv[1])
v = m[0][sys.argv[2]]
print(v.split("/")[0] if sys.argv[2] == "address" else v)' "$2" "$3"
}
# Run a command inside endpoint NAME's network namespace (as seen by host N).
in_ep() { local h=$1 name=$2; shift 2; nsenter --net="$(ep "$h" "$name" netns)" -- "$@"; }
# Poll CMD until it succeeds or SECS pass.
wait_for() {
  local secs=$1 what=$2; shift 2
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || fail "$what (waited ${secs}s)"
    sleep 0.2
  done
}
now() { date +%s.%N; }
since() { python3 -c 'import sys; print(f"{float(sys.argv[2]) - float(sys.argv[1]):.1f}")' "$1" "$(now)"; }

# The processes inside a network namespace (a /run/netns file or any
# namespace file the agents pinned): only ever ones this demo started.
netns_pids() {
  local ino p
  ino=$(stat -L -c %i "$1" 2>/dev/null) || return 0
  for p in /proc/[0-9]*; do
    [ "$(readlink "$p/ns/net" 2>/dev/null)" = "net:[$ino]" ] && echo "${p#/proc/}"
  done
  return 0
}
cleanup() {  # never stops half-way: every step may find nothing to do
  local f pids
  # Every process in the lab's namespaces: agents, etcd, servers, pings.
  for f in /run/netns/$P-* "$DIR"/h*/run/netns/*; do
    [ -e "$f" ] || continue
    pids=$(netns_pids "$f")
    if [ -n "$pids" ]; then kill -9 $pids 2>/dev/null || true; fi
  done
  sleep 0.3
  # The namespaces the agents pinned, their bpffs, then the lab itself.
  for f in "$DIR"/h*/run/netns/*; do umount -l "$f" 2>/dev/null || true; done
  for f in "$DIR"/h*/run/bpf; do
    if mountpoint -q "$f" 2>/dev/null; then umount -l "$f" || true; fi
  done
  for f in /run/netns/$P-*; do
    if [ -e "$f" ]; then ip netns del "${f##*/}" 2>/dev/null || true; fi
  done
  rm -rf "$DIR" || true
}
on_exit() {
  local rc=$?
  trap - EXIT INT TERM ERR
  set +e
  if [ $rc -eq 130 ]; then
    printf '\n\033[1;31mDEMO INTERRUPTED\033[0m\n' >&2
  elif [ $rc -ne 0 ]; then
    [ -n "$FAILED" ] || printf '\n\033[1;31mDEMO FAILED (exit %s) at %s\033[0m\n' "$rc" "${FAILED_AT:-?}" >&2
    for h in 1 2 3; do
      [ -f "$DIR/h$h/trellisd.log" ] && { echo "--- last lines of host$h's trellisd log:"; tail -n 8 "$DIR/h$h/trellisd.log"; }
    done >&2
    [ -f "$DIR/etcd.log" ] && { echo "--- last lines of etcd's log:"; tail -n 3 "$DIR/etcd.log"; } >&2
  fi
  if [ $rc -eq 0 ] && [ $KEEP = 1 ]; then
    say "left running; \`bash $0\` again removes it first (host3 stays dead)"
    for h in 1 2 3; do echo "host$h: $BIN/trellisctl --socket $(sock "$h") host ls   (netns $(hns "$h"))"; done
  else
    echo; echo "cleaning up: processes, namespaces, mounts and $DIR"
    cleanup
  fi
  exit $rc
}

say "building"
if ! build=$(cargo build --workspace --bins --locked 2>&1); then
  echo "$build" | tail -n 40
  fail "the build failed"
fi
echo "$build" | tail -n 1
T0=$(now)

cleanup   # whatever a previous run left (--keep, or a machine reset mid-run)
trap on_exit EXIT
trap 'exit 130' INT TERM
mkdir -p "$DIR"

say "a lab: three hosts (netns $P-h1..3) on one underlay bridge (netns $UL), etcd on $UNDERLAY.254"
ip netns add "$UL"
ip -n "$UL" link set lo up
ip -n "$UL" link add ul0 type bridge
ip -n "$UL" addr add "$UNDERLAY.254/24" dev ul0
ip -n "$UL" link set ul0 up
for h in 1 2 3; do
  ns=$(hns "$h")
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  ip link add "$P-up$h" netns "$ns" type veth peer name "$P-br$h" netns "$UL"
  ip -n "$UL" link set "$P-br$h" master ul0 up
  ip -n "$ns" addr add "$UNDERLAY.$h/24" dev "$P-up$h"
  ip -n "$ns" link set "$P-up$h" up
  ip -n "$ns" route add default via "$UNDERLAY.254"
  echo "host$h: $(ip -n "$ns" -br addr show "$P-up$h" | awk '{print $1, $3}')"
done
(nsenter --net=/run/netns/$UL -- /usr/bin/etcd --name demo --data-dir "$DIR/etcd" \
   --listen-client-urls "http://$UNDERLAY.254:2379" --advertise-client-urls "http://$UNDERLAY.254:2379" \
   --listen-peer-urls "http://$UNDERLAY.254:2380" --initial-advertise-peer-urls "http://$UNDERLAY.254:2380" \
   --initial-cluster "demo=http://$UNDERLAY.254:2380" --heartbeat-interval 50 --election-timeout 500 \
   >"$DIR/etcd.log" 2>&1 &)
wait_for 20 "etcd did not start" grep -q "ready to serve client requests" "$DIR/etcd.log"
echo "etcd $(/usr/bin/etcd --version | head -1 | awk '{print $3}') serving on $ETCD_URL"

start_agent() {
  local h=$1
  mkdir -p "$DIR/h$h"
  rm -f "$(sock "$h")"
  # In a subshell, so the shell does not report the agent's death as a job.
  (nsenter --net="/run/netns/$(hns "$h")" -- env TRELLIS_LOG="info,h2=warn,tower=warn,hickory_server=warn" \
     "$BIN/trellisd" --store "$ETCD_URL" --host-id "host$h" --advertise-addr "$UNDERLAY.$h" \
     --state-dir "$DIR/h$h/state" --run-dir "$DIR/h$h/run" --socket "$(sock "$h")" \
     --metrics-addr "$UNDERLAY.$h:9473" --no-docker-plugin --dns-upstream "$UNDERLAY.254" \
     --lease-ttl-ms $LEASE_MS --reclaim-grace-ms $GRACE_MS >>"$DIR/h$h/trellisd.log" 2>&1 &
   echo $! >"$DIR/h$h/trellisd.pid")
  wait_for 30 "host$h's trellisd did not come up" q "$h" network ls
}
say "one trellisd per host, all on that etcd (lease ${LEASE_MS} ms, reclaim grace ${GRACE_MS} ms)"
for h in 1 2 3; do start_agent "$h"; done
host_count() { q "$1" host ls --json | python3 -c 'import json,sys; sys.exit(len(json.load(sys.stdin)) != int(sys.argv[1]))' "$2"; }
peers_probed() {
  q 1 host ls --json | python3 -c '
import json, sys
hs = json.load(sys.stdin)
sys.exit(not (len(hs) == 3 and all(h["local"] or h["probe"] == "ok" for h in hs)))'
}
wait_for 20 "host1 does not see (and probe) both other hosts" peers_probed
ctl 1 host ls

say "a network created on host1 is there on every host"
ctl 1 network create app --subnet 10.30.0.0/24 --attachable
ctl 3 network ls
GW=$(q 1 network inspect app | python3 -c 'import json,sys; print(json.load(sys.stdin)["gateway"])')

say "containers on three hosts: a client, and a web server on each host (answering its name on TCP 8080)"
ctl 1 attach app --name client
for h in 1 2 3; do
  ctl "$h" attach app --name "web$h" --label trellis.service=web
  (nsenter --net="$(ep "$h" "web$h" netns)" -- busybox nc -ll -p 8080 -e echo "web$h@host$h" >/dev/null 2>&1 &)
done
ctl 2 endpoint ls
# Every host has a VXLAN tunnel to both others, probed through the tunnel.
tunnels_up() {
  q 1 host ls --json | python3 -c '
import json, sys
hs = [h for h in json.load(sys.stdin) if not h["local"]]
sys.exit(not (len(hs) == 2 and all(h["tunnel"].startswith("programmed") and h.get("tunnel_probe_rtt_us") for h in hs)))'
}
wait_for 20 "host1's tunnels to host2 and host3 are not up" tunnels_up
ctl 1 host ls

say "across the VXLAN mesh: names from the gateway's DNS ($GW), then ping"
dig_() { in_ep "$1" "$2" dig +short +time=2 +tries=2 "@$GW" "$3"; }
for pair in "1 client 2 web2" "1 client 3 web3" "3 web3 2 web2"; do
  set -- $pair
  want=$(ep "$3" "$4" address)
  got=$(dig_ "$1" "$2" "$4")
  echo "$2 (host$1)\$ dig +short @$GW $4   -> $got"
  [ "$got" = "$want" ] || fail "$4 resolved to '$got' from $2, not $want"
  echo "$2 (host$1)\$ ping -c 3 $got   ($4, host$3)"
  in_ep "$1" "$2" ping -q -c 3 -i 0.2 -W 1 "$got" | tail -2 || fail "$2 on host$1 cannot ping $4 on host$3"
done

say "a service: a virtual IP, balanced over backends on three hosts by the eBPF datapath"
ctl 2 service create web --network app --port 80:8080
VIP=$(q 2 service inspect web | python3 -c 'import json,sys; print(json.load(sys.stdin)["vip"])')
backends_programmed() {
  q 1 service inspect web | python3 -c '
import json, sys
b = json.load(sys.stdin)["backends"]
sys.exit(not (len(b) == int(sys.argv[1]) and all(x["programmed"] for x in b)))' "$1"
}
wait_for 20 "host1 did not program the three backends" backends_programmed 3
ctl 1 service ls
got=$(dig_ 1 client web)
echo "client\$ dig +short @$GW web         -> $got"
[ "$got" = "$VIP" ] || fail "web resolved to '$got', not its VIP $VIP"
got=$(dig_ 1 client tasks.web | sort | tr '\n' ' ')
echo "client\$ dig +short @$GW tasks.web   -> $got"
[ "$(echo $got | wc -w)" = 3 ] || fail "tasks.web is not three backends: $got"
CLIENT_NS=$(ep 1 client netns)
spread() {  # N connections from the client to the VIP: who answered, how often
  local n=$1 i
  for i in $(seq "$n"); do nsenter --net="$CLIENT_NS" -- busybox nc -w 2 "$VIP" 80 </dev/null 2>/dev/null || echo "(no answer)"; done \
    | sort | uniq -c | tee "$DIR/spread.txt"
  ! grep -q "no answer" "$DIR/spread.txt" || fail "a connection to the VIP got no answer"
}
echo "client\$ for i in \$(seq 60); do nc $VIP 80; done | sort | uniq -c"
spread 60
[ "$(wc -l <"$DIR/spread.txt")" = 3 ] || fail "60 connections did not reach all three backends"

say "tenants: a second network (shop) cannot be reached from app"
ctl 1 network create shop --subnet 10.31.0.0/24 --attachable
ctl 2 attach shop --name till
TILL=$(ep 2 till address)
for from in "1 client" "2 web2"; do
  set -- $from
  if in_ep "$1" "$2" ping -c 2 -i 0.2 -W 1 "$TILL" >/dev/null 2>&1; then fail "$2 (app) reached till (shop)"; fi
  echo "$2 (host$1, app)\$ ping $TILL (till, shop, host2)   -> no reply"
done
got=$(dig_ 1 client till)
echo "client\$ dig +short @$GW till   -> '${got}' (another tenant's names are not answered)"
[ -z "$got" ] || fail "client resolved shop's till: $got"
drops() { nsenter --net="/run/netns/$(hns "$1")" -- curl -sf "http://$UNDERLAY.$1:9473/metrics" \
  | awk '/^trellis_endpoint_drops/ && /reason="isolation"/ {s += $NF} END {print s + 0}'; }
echo "host1: trellis_endpoint_drops{reason=\"isolation\"} = $(drops 1)   host2: $(drops 2)"
[ "$(drops 1)" -gt 0 ] && [ "$(drops 2)" -gt 0 ] || fail "the isolation drops were not counted"

say "egress: app reaches the outside ($UNDERLAY.254, masqueraded); an --internal network does not"
echo "client\$ ping -c 2 $UNDERLAY.254"
in_ep 1 client ping -q -c 2 -i 0.2 -W 1 "$UNDERLAY.254" | tail -2 || fail "client cannot reach the outside"
ctl 1 network create vault --internal --attachable
ctl 2 attach vault --name db
if in_ep 2 db ping -c 2 -i 0.2 -W 1 "$UNDERLAY.254" >/dev/null 2>&1; then fail "the internal network reached the outside"; fi
echo "db (host2, vault)\$ ping $UNDERLAY.254   -> no reply (cut off, as it should be)"

say "an --encrypted network needs IPsec ESP in the kernel"
if q 1 status --json | python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["capabilities"].get("esp") else 1)'; then
  ctl 1 network create sec --encrypted --attachable
  ctl 1 network inspect sec
else
  echo "host1\$ trellisctl network create sec --encrypted --attachable"
  if q 1 network create sec --encrypted --attachable >"$DIR/enc.txt" 2>&1; then fail "an encrypted network was created on a kernel without ESP"; fi
  sed 's/^/  /' "$DIR/enc.txt"
  q 1 network inspect sec >/dev/null 2>&1 && fail "the refused encrypted network exists"
  echo "(this kernel has no ESP: refused, nothing created; the VM test shows IPsec for real)"
fi

say "a debugging shell on host3 inside app (trellisctl attach app -- CMD): ping client on host1 by name"
ctl 3 attach app -- sh -c "ip -br addr show eth0 && ping -q -c 2 -i 0.2 client" || fail "the debugging shell failed"

say "the datapath outlives the agent: kill -9 host2's trellisd under traffic from host1"
WEB2=$(ep 2 web2 address)
echo "client (host1)\$ ping -c 100 -i 0.05 $WEB2   (web2, host2) &"
in_ep 1 client ping -q -c 100 -i 0.05 -W 1 "$WEB2" >"$DIR/ping.txt" 2>&1 &
PING=$!
sleep 0.8
kill -9 "$(cat "$DIR/h2/trellisd.pid")"; echo "host2's trellisd killed (kill -9)"
sleep 0.5
start_agent 2; echo "host2's trellisd restarted"
wait $PING || true
tail -2 "$DIR/ping.txt"
grep -q ' 0% packet loss' "$DIR/ping.txt" || fail "packets were lost across the agent's kill -9"

say "a host dies: kill -9 host3's trellisd and cut its underlay link"
kill -9 "$(cat "$DIR/h3/trellisd.pid")"
ip -n "$(hns 3)" link set "$P-up3" down
DEATH=$(now)
echo "host3\$ kill -9 <trellisd>; ip link set $P-up3 down"
wait_for 30 "host1 still lists host3" host_count 1 2
echo "host1 forgot host3 $(since "$DEATH") s after its death (its lease: ${LEASE_MS} ms from its last renewal):"
ctl 1 host ls
wait_for 10 "web3 still resolves" sh -c "[ -z \"\$(nsenter --net=$CLIENT_NS -- dig +short +time=1 @$GW web3)\" ]"
echo "client\$ dig @$GW web3   -> $(in_ep 1 client dig +time=2 "@$GW" web3 | grep -o 'status: [A-Z]*')"
got=$(dig_ 1 client tasks.web | sort | tr '\n' ' ')
echo "client\$ dig +short @$GW tasks.web   -> $got"
[ "$(echo $got | wc -w)" = 2 ] || fail "tasks.web is not the two surviving backends: $got"
wait_for 10 "host1 still balances to web3" backends_programmed 2
echo "client\$ for i in \$(seq 40); do nc $VIP 80; done | sort | uniq -c"
spread 40
grep -q web3 "$DIR/spread.txt" && fail "the dead host's backend still got connections"
[ "$(wc -l <"$DIR/spread.txt")" = 2 ] || fail "40 connections did not reach both surviving backends"
web3_gone() { ! q 2 endpoint ls --json | grep -q '"web3"'; }
wait_for 30 "host3's endpoints were never reclaimed" web3_gone
echo "host3's endpoints reclaimed by a survivor: gone $(since "$DEATH") s after its death (lease, ${GRACE_MS} ms grace, a resync pass):"
ctl 2 endpoint ls

say "done in $(since "$T0") s after the build"
