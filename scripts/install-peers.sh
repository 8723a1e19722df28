#!/usr/bin/env bash
# Install the real vhost-user peers the interop tests drive (QEMU, DPDK testpmd,
# qemu-storage-daemon, a guest kernel and busybox; tcpdump to read the switch's captures)
# from Debian 12's own packages.
# Idempotent: when every package is installed and every binary is present it does nothing.
# The DPDK PMDs are named explicitly: the dpdk package only recommends them.
set -euo pipefail

PACKAGES=(
  qemu-system-x86 qemu-system-common qemu-utils linux-image-amd64 busybox-static cpio kmod
  dpdk dpdk-dev librte-net-vhost23 librte-net-virtio23 librte-mempool-ring23 tcpdump
)
BINARIES=(qemu-system-x86_64 qemu-storage-daemon qemu-img dpdk-testpmd busybox cpio modprobe
  tcpdump)
PMD_DIR=/usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0
PMDS=(librte_net_vhost.so librte_net_virtio.so librte_mempool_ring.so)

log() { printf 'install-peers: %s\n' "$*"; }

missing=()
for b in "${BINARIES[@]}"; do
  command -v "$b" >/dev/null 2>&1 || missing+=("binary:$b")
done
for p in "${PMDS[@]}"; do
  compgen -G "$PMD_DIR/$p*" >/dev/null || missing+=("pmd:$p")
done
compgen -G '/boot/vmlinuz-*' >/dev/null || missing+=("file:/boot/vmlinuz-*")

if command -v dpkg-query >/dev/null 2>&1; then
  for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    [ "$status" = installed ] || missing+=("package:$pkg")
  done
fi

if [ "${#missing[@]}" -eq 0 ]; then
  log "all peers already installed, nothing to do"
  exit 0
fi

log "missing: ${missing[*]}"
if ! command -v apt-get >/dev/null 2>&1; then
  log "apt-get not found: this script supports Debian 12 only" >&2
  exit 1
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
  else
    log "not root and no sudo: run as root, or: apt-get install ${PACKAGES[*]}" >&2
    exit 1
  fi
fi

# Wait for a concurrent apt/dpkg (unattended upgrades, another installer) instead of failing.
APT_OPTS=(-o DPkg::Lock::Timeout=600 -o Acquire::Retries=3)

log "running apt-get update"
"${SUDO[@]}" apt-get "${APT_OPTS[@]}" update -q
log "installing: ${PACKAGES[*]}"
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get "${APT_OPTS[@]}" install -y -q --no-install-recommends "${PACKAGES[@]}"

still=()
for b in "${BINARIES[@]}"; do
  command -v "$b" >/dev/null 2>&1 || still+=("$b")
done
if [ "${#still[@]}" -ne 0 ]; then
  log "still missing after install: ${still[*]}" >&2
  exit 1
fi
log "done: installed ${PACKAGES[*]}"
