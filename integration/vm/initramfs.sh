#!/usr/bin/env bash
# Builds the tiny initramfs the stock-kernel VM tests boot (see
# ../shared/notes/stock-kernel-vm.md): busybox, the modules needed to reach
# this machine's root over 9p, and an init that mounts it read-only, makes
# the writable places a Trellis host needs, lets the guest kernel load any
# module from this machine, and runs the script named on the kernel command
# line (`trellis.run=PATH`, under the host root) with `trellis.idx=N`.
# Usage: initramfs.sh OUT.cpio.gz  (prints the kernel image path)
set -euo pipefail
out=$1
ver=$(ls /lib/modules | sort -V | tail -1)
[ -n "$ver" ] && [ -f "/boot/vmlinuz-$ver" ] || { echo "initramfs.sh: no stock kernel (apt-get install linux-image-amd64)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work"/{bin,proc,sys,dev,host,lib/modules}
cp /bin/busybox "$work/bin/busybox"
for l in sh mount umount mkdir modprobe insmod chroot poweroff cat echo sleep; do ln -s busybox "$work/bin/$l"; done
for m in virtio_pci virtio_net 9pnet_virtio 9p; do
  modprobe -S "$ver" --show-depends "$m" | awk '$1=="insmod"{print $2}'
done | awk '!seen[$0]++' > "$work/modules.list"
while read -r ko; do
  mkdir -p "$work$(dirname "$ko")"
  cp "$ko" "$work$ko"
done < "$work/modules.list"
cat > "$work/bin/host-modprobe" <<'MP'
#!/bin/sh
exec /bin/chroot /host /sbin/modprobe "$@"
MP
chmod +x "$work/bin/host-modprobe"
cat > "$work/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
while read -r ko; do insmod "$ko" 2>/dev/null; done < /modules.list
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose host /host || { echo "TRELLIS-VM: no host share"; poweroff -f; }
echo /bin/host-modprobe > /proc/sys/kernel/modprobe
for d in run tmp var/tmp; do mount -t tmpfs tmpfs /host/$d 2>/dev/null; done
mount -t proc proc /host/proc
mount -t sysfs sys /host/sys
mount -t devtmpfs dev /host/dev
mkdir -p /host/dev/pts /host/dev/shm && mount -t devpts devpts /host/dev/pts && mount -t tmpfs tmpfs /host/dev/shm
ln -sf /proc/self/fd /host/dev/fd
ln -sf /proc/self/fd/0 /host/dev/stdin
ln -sf /proc/self/fd/1 /host/dev/stdout
ln -sf /proc/self/fd/2 /host/dev/stderr
mount -t bpf bpf /host/sys/fs/bpf
mkdir -p /host/run/out && mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 out /host/run/out
run=$(sed -n 's/.*trellis\.run=\([^ ]*\).*/\1/p' /proc/cmdline)
chroot /host /bin/bash "$run" > /host/run/out/guest.log 2>&1
echo "TRELLIS-VM: exit $?"
sync
poweroff -f
INIT
chmod +x "$work/init"
(cd "$work" && find . | cpio -o -H newc 2>/dev/null | gzip -1) > "$out.tmp"
mv "$out.tmp" "$out"
echo "/boot/vmlinuz-$ver"
