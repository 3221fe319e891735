#!/usr/bin/env bash
# Installs everything Trellis needs to build, run and test on a fresh Debian
# machine of this kind. Safe to run again: it only installs what is missing.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh: run as root (it installs Debian packages)" >&2
  exit 1
fi

PACKAGES=(
  protobuf-compiler libprotobuf-dev  # protoc and its well-known .proto files: tonic and etcd-client compile .proto files
  clang-19 llvm-19 libbpf-dev  # the eBPF datapath (C programs)
  nftables iptables iproute2 util-linux iputils-ping conntrack  # iptables-legacy: the kube-proxy benchmark peer
  containernetworking-plugins  # the reference CNI bridge + host-local (benchmark peer)
  iperf3 tcpdump bind9-dnsutils busybox-static
  etcd-server              # the cluster store
  docker.io containerd runc  # real engines as clients (Docker driver, CNI via ctr)
  dnsmasq-base dnsperf aardvark-dns  # a real upstream resolver for DNS tests; DNS benchmark tool and peer
  prometheus curl          # promtool checks the agent's metrics
  bpftool                  # tests tamper with the pinned maps as an operator would
  qemu-system-x86 linux-image-amd64 cpio  # stock-kernel VMs: IPsec ESP tests (this kernel has no ESP)
  ca-certificates
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup.sh: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "setup.sh: all packages present"
fi

# The Rust toolchain comes with the machine (rustup, cargo 1.95); check it.
if ! command -v cargo >/dev/null 2>&1; then
  for d in "$HOME/.cargo/bin" /root/.cargo/bin /usr/local/cargo/bin; do
    [ -x "$d/cargo" ] && export PATH="$d:$PATH" && break
  done
fi
command -v cargo >/dev/null 2>&1 || { echo "setup.sh: cargo not found (install Rust 1.95 with rustup)" >&2; exit 1; }
rustup component list --installed 2>/dev/null | grep -q clippy || rustup component add clippy rustfmt >/dev/null 2>&1 || true
echo "setup.sh: $(cargo --version)"
# cargo-fuzz, for the fuzz targets under fuzz/ (stable Rust: built with
# `--sanitizer none`).
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "setup.sh: installing cargo-fuzz"
  cargo install cargo-fuzz --locked --version 0.13.2 >/dev/null
fi
echo "setup.sh: $(cargo fuzz --version)"
