"""Tiny Linux guests under QEMU for demos and interop tests: initramfs builder and VM runner.

This is a tool module like the rest of ``cli/``: it reads files, runs ``modprobe`` and QEMU
and writes a cache, so it lives in the I/O shell (docs/architecture.md, "Layering rules"),
beside the commands that use it (``vhost-user demo``) and importable by the tests.

The guest is Debian's own kernel (``/boot/vmlinuz-*``) booted by QEMU under TCG with a gzip
cpio initramfs built here from Debian's static busybox and the kernel's virtio modules
(``modprobe -S KVER --show-depends`` gives their load order). The archive is written in
Python (newc format, so ``/dev/console`` needs no mknod and the bytes are reproducible) and
cached under :func:`cache_dir`, keyed by a hash of every input: a changed kernel, busybox,
module or init script builds a new one on next use (a second or two).

The guest's ``/init`` is driven by ``vu.*`` kernel command-line parameters and prints
machine-readable lines on the serial console:

``vu.nics=N``
    wait for eth0..eth(N-1) (set by :class:`GuestVM` from its NICs);
``vu.ip=ADDR/LEN``, ``vu.ip1=ADDR/LEN`` ...
    address of eth0, eth1 ... (every NIC is brought up, with or without an address);
``vu.arp=IP@MAC,...``
    static neighbour entries (busybox ``arp -s``);
``vu.peer=IP vu.ping=N [vu.wait=S] [vu.interval=S]``
    wait up to S seconds (default 30) until the peer answers, then ping it N times;
``vu.blk=pattern|check [vu.seed=K] [vu.disk=vda]``
    write the pattern of :func:`pattern_bytes` over the whole disk (O_DIRECT, fsync) and
    read it back, or only check it (the pattern is staged in the guest's RAM: keep disks
    well under half of ``mem_mb``);
``vu.cmd64=BASE64``
    run a shell script (base64 of its text) with the helper functions of ``/etc/vu-lib.sh``;
``vu.end=poweroff|shell|hold``
    what happens after the steps above (default ``poweroff -f``; ``shell``: take commands
    from the console, see :meth:`GuestVM.run`; ``hold``: stay up until stopped).

Console lines (carriage returns removed) that :class:`GuestVM` parses:

``VU-RESULT <name> key=value ...``
    one result, e.g. ``VU-RESULT ping peer=10.0.0.2 sent=20 received=20 loss=0%``;
``VU-READY``, ``VU-BEGIN <id>``, ``VU-END <id> rc=<n>``
    the command channel of ``vu.end=shell``.

Commands (``vu.cmd64`` and :meth:`GuestVM.run`) can use the helpers of ``/etc/vu-lib.sh``:
``vu_result NAME k=v...``, ``vu_param``, ``vu_netif``, ``vu_ping PEER COUNT [WAIT
[INTERVAL]]``, ``vu_pattern SEED SECTORS [FIRST]``, ``vu_disk_sum``, ``vu_blk_info``,
``vu_blk_stat`` (request counts incl. flushes and discards), ``vu_blk_pattern``,
``vu_blk_check``. IPv6 is disabled (``ipv6.disable=1``) so that no router solicitations
or MLD reports mix with the traffic a test counts.

Python side: :func:`build_initramfs` and :func:`kernel_path` give the boot files;
:class:`GuestVM` boots one guest with :class:`NetPort` NICs (``-netdev vhost-user``,
``virtio-net-pci``) and :class:`BlkDisk` disks (``vhost-user-blk-pci``), collects its
console, waits for result lines (:meth:`GuestVM.wait_result`), runs commands in a
``end="shell"`` guest (:meth:`GuestVM.run`, or :meth:`GuestVM.submit` then
:meth:`GuestVM.wait_command` to do something on the host meanwhile) and stops QEMU on
exit. :func:`pick_subnet` and :func:`host_address` give a host tap a private address.

Addresses used inside the guests are private (10.x, 192.168.x): the traffic stays between
our VMs, our switch and at most a host tap device.
"""

from __future__ import annotations

import base64
import codecs
import contextlib
import dataclasses
import gzip
import hashlib
import io
import ipaddress
import itertools
import logging
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from ..errors import VhostUserError

__all__ = [
    "GUEST_MODULES",
    "BlkDisk",
    "CommandResult",
    "GuestError",
    "GuestExited",
    "GuestResult",
    "GuestTimeout",
    "GuestVM",
    "NetPort",
    "build_initramfs",
    "cache_dir",
    "guest_unavailable",
    "host_address",
    "host_networks",
    "kernel_path",
    "kernel_release",
    "parse_results",
    "pattern_bytes",
    "pick_subnet",
    "qemu_binary",
    "wait_all",
]

log = logging.getLogger(__name__)

GUEST_MODULES = ("virtio_pci", "virtio_net", "virtio_blk")
"""Modules the guest loads, with their dependencies (resolved by modprobe)."""

INITRAMFS_FORMAT = 1
"""Bump when the archive layout changes in a way the hashed inputs do not show."""

INSTALL_HINT = (
    "run scripts/install-peers.sh (apt-get install --no-install-recommends "
    "qemu-system-x86 linux-image-amd64 busybox-static kmod)"
)

KERNEL_CMDLINE_MAX = 2048
"""COMMAND_LINE_SIZE on x86, the terminating NUL included."""

PATTERN_SECTOR = 512
"""The disk pattern is one 512-byte line per sector: see :func:`pattern_bytes`."""


class GuestError(VhostUserError):
    """A tiny guest could not be built, started or did not do what was asked."""


class GuestTimeout(GuestError):
    """A guest did not print what was waited for in time."""


class GuestExited(GuestError):
    """QEMU exited while something was still expected from the guest."""


# --------------------------------------------------------------------------- locations


def cache_dir() -> Path:
    """Where built initramfs archives are kept.

    ``$VHOSTUSER_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/vhostuser``, else
    ``~/.cache/vhostuser``.
    """
    explicit = os.environ.get("VHOSTUSER_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "vhostuser"


def _version_key(release: str) -> list[tuple[int, str]]:
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"(\d+)", release) if p]


def kernel_release(kernel: Path) -> str:
    """The release a ``vmlinuz-RELEASE`` file belongs to (its modules: /lib/modules/RELEASE).

    Raises:
        GuestError: the name does not start with ``vmlinuz-``.
    """
    name = kernel.name
    if not name.startswith("vmlinuz-") or name == "vmlinuz-":
        raise GuestError(f"kernel file name {name!r} is not vmlinuz-RELEASE")
    return name.removeprefix("vmlinuz-")


def kernel_path() -> Path:
    """The guest kernel: ``$VHOSTUSER_GUEST_KERNEL``, else the newest ``/boot/vmlinuz-*``
    whose modules are installed.

    Raises:
        GuestError: no usable kernel.
    """
    explicit = os.environ.get("VHOSTUSER_GUEST_KERNEL")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise GuestError(f"VHOSTUSER_GUEST_KERNEL={explicit} is not a file")
        return path
    found = sorted(Path("/boot").glob("vmlinuz-*"), key=lambda p: _version_key(p.name))
    usable = [p for p in found if (Path("/lib/modules") / kernel_release(p)).is_dir()]
    if not usable:
        what = ", ".join(p.name for p in found) or "no /boot/vmlinuz-*"
        raise GuestError(f"no guest kernel with modules in /lib/modules ({what}): {INSTALL_HINT}")
    return usable[-1]


def qemu_binary() -> str:
    """Path of qemu-system-x86_64.

    Raises:
        GuestError: not installed.
    """
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise GuestError(f"qemu-system-x86_64 not found: {INSTALL_HINT}")
    return qemu


def _busybox_path() -> Path:
    for candidate in (os.environ.get("VHOSTUSER_BUSYBOX"), "/bin/busybox", "/usr/bin/busybox",
                      shutil.which("busybox")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise GuestError(f"busybox not found: {INSTALL_HINT}")


def _elf_is_static(data: bytes) -> bool:
    """True for a 64-bit little-endian ELF executable without a PT_INTERP header."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + 4 > len(data):
            return False
        p_type, = struct.unpack_from("<I", data, off)
        if p_type == 3:  # PT_INTERP: needs a dynamic loader the initramfs does not have
            return False
    return True


def guest_unavailable() -> str | None:
    """None if tiny guests can run here, else why not (and how to install what is missing)."""
    try:
        qemu_binary()
        kernel_path()
        data = _busybox_path().read_bytes()
    except (GuestError, OSError) as e:
        return str(e)
    if not _elf_is_static(data):
        return f"{_busybox_path()} is not statically linked: {INSTALL_HINT}"
    if shutil.which("modprobe") is None:
        return f"modprobe not found: {INSTALL_HINT}"
    return None


# --------------------------------------------------------------------------- modules


def _module_files(release: str, names: Sequence[str]) -> list[Path]:
    """Module files for ``names`` and their dependencies, in load order, without repeats.

    Raises:
        GuestError: modprobe failed or named no file for a module.
    """
    modprobe = shutil.which("modprobe")
    if modprobe is None:
        raise GuestError(f"modprobe not found: {INSTALL_HINT}")
    order: list[Path] = []
    for name in names:
        # One module per call: further arguments would be taken as module parameters.
        proc = subprocess.run(
            [modprobe, "-S", release, "--show-depends", name],
            capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False,
        )
        if proc.returncode != 0:
            raise GuestError(
                f"modprobe -S {release} --show-depends {name} failed with {proc.returncode}: "
                f"{proc.stderr.strip()}"
            )
        for line in proc.stdout.splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] == "insmod":
                path = Path(words[1])
                if path not in order:
                    order.append(path)
            # "builtin NAME": compiled into the kernel, nothing to load
    if not order:
        raise GuestError(f"modprobe found no module files for {', '.join(names)} ({release})")
    return order


def _read_module(path: Path) -> tuple[str, bytes]:
    """(name.ko, uncompressed bytes) of a module file, .ko, .ko.xz or .ko.zst.

    Raises:
        GuestError: a .zst module and no zstd tool to decompress it.
    """
    name = path.name
    raw = path.read_bytes()
    if name.endswith(".ko.xz"):
        import lzma

        return name.removesuffix(".xz"), lzma.decompress(raw)
    if name.endswith(".ko.zst"):
        zstd = shutil.which("zstd")
        if zstd is None:
            raise GuestError(f"{path} is zstd-compressed and zstd is not installed")
        out = subprocess.run([zstd, "-dcq", str(path)], capture_output=True, check=True)
        return name.removesuffix(".zst"), out.stdout
    if name.endswith(".ko.gz"):
        return name.removesuffix(".gz"), gzip.decompress(raw)
    return name, raw


# --------------------------------------------------------------------------- cpio (newc)


class CpioWriter:
    """Writes a newc ("070701") cpio archive, the format the kernel unpacks as initramfs."""

    _DIR = 0o040000
    _FILE = 0o100000
    _LINK = 0o120000
    _CHR = 0o020000

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._ino = itertools.count(721)

    def _entry(self, name: str, mode: int, data: bytes = b"", *, nlink: int = 1,
               rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = (next(self._ino), mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._out.write(header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4))
        self._out.write(data + b"\0" * (-len(data) % 4))

    def directory(self, name: str, mode: int = 0o755) -> None:
        """Add a directory."""
        self._entry(name, self._DIR | mode, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        """Add a regular file."""
        self._entry(name, self._FILE | mode, data)

    def symlink(self, name: str, target: str) -> None:
        """Add a symbolic link."""
        self._entry(name, self._LINK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        """Add a character device node (created by the kernel: no privileges needed)."""
        self._entry(name, self._CHR | mode, rdev=(major, minor))

    def close(self) -> None:
        """Write the trailer."""
        self._entry("TRAILER!!!", 0, nlink=1)


# --------------------------------------------------------------------------- guest scripts

INIT_SCRIPT = r"""#!/bin/sh
# /init of the vhostuser tiny guest (busybox ash), built by vhostuser.cli.guest.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
exec 0</dev/console 1>/dev/console 2>&1
. /etc/vu-lib.sh

n=0
for m in /lib/modules/*.ko; do
  if insmod "$m"; then n=$((n + 1)); else vu_result error what=insmod module="${m##*/}"; fi
done
ip link set lo up
vu_result boot uptime="$(cut -d' ' -f1 /proc/uptime)" kernel="$(uname -r)" modules="$n" \
  cpus="$(nproc)"

nics=$(vu_param nics 0)
i=0
while [ "$i" -lt "$nics" ]; do
  if [ "$i" -eq 0 ]; then addr=$(vu_param ip); else addr=$(vu_param "ip$i"); fi
  vu_netif "eth$i" "$addr"
  i=$((i + 1))
done
arp_list=$(vu_param arp)
for e in $(echo "$arp_list" | tr ',' ' '); do
  arp -s "${e%@*}" "${e#*@}" && vu_result arp ip="${e%@*}" mac="${e#*@}"
done

peer=$(vu_param peer)
count=$(vu_param ping 0)
if [ -n "$peer" ] && [ "$count" -gt 0 ]; then
  vu_ping "$peer" "$count" "$(vu_param wait 30)" "$(vu_param interval 0.2)"
fi

case "$(vu_param blk)" in
  pattern) vu_blk_pattern "$(vu_param disk vda)" "$(vu_param seed 1)" ;;
  check) vu_blk_check "$(vu_param disk vda)" "$(vu_param seed 1)" ;;
esac

cmd=$(vu_param cmd64)
if [ -n "$cmd" ]; then
  echo "$cmd" | base64 -d > /tmp/cmd.sh
  sh -c '. /etc/vu-lib.sh; . /tmp/cmd.sh' </dev/null
  vu_result cmd rc=$?
fi

case "$(vu_param end poweroff)" in
  shell) vu_shell ;;
  hold) echo VU-HOLD; while :; do sleep 3600; done ;;
esac
vu_result poweroff uptime="$(cut -d' ' -f1 /proc/uptime)"
sync
poweroff -f
"""

LIB_SCRIPT = r"""# Helpers of the tiny guest, sourced by /init and by every command it runs.

vu_result() { echo "VU-RESULT $*"; }

# vu_param NAME [DEFAULT]: the value of vu.NAME= on the kernel command line.
vu_param() {
  for w in $(cat /proc/cmdline); do
    case "$w" in "vu.$1="*) echo "${w#*=}"; return 0 ;; esac
  done
  echo "$2"
}

vu_now() { cut -d' ' -f1 /proc/uptime; }

# vu_netif DEV [ADDR/LEN]: bring DEV up, wait for carrier, report it.
vu_netif() {
  dev=$1
  t=0
  while [ ! -e "/sys/class/net/$dev" ] && [ "$t" -lt 100 ]; do sleep 0.1; t=$((t + 1)); done
  if [ ! -e "/sys/class/net/$dev" ]; then vu_result net dev="$dev" present=0; return 1; fi
  ip link set "$dev" up
  [ -n "$2" ] && ip addr add "$2" dev "$dev"
  t=0
  while [ "$(cat "/sys/class/net/$dev/carrier" 2>/dev/null)" != 1 ] && [ "$t" -lt 100 ]; do
    sleep 0.1; t=$((t + 1))
  done
  drv=$(readlink "/sys/class/net/$dev/device/driver")
  q=$(ls "/sys/class/net/$dev/queues" | tr '\n' ',')
  vu_result net dev="$dev" present=1 driver="${drv##*/}" \
    carrier="$(cat "/sys/class/net/$dev/carrier" 2>/dev/null)" \
    operstate="$(cat "/sys/class/net/$dev/operstate")" \
    mac="$(cat "/sys/class/net/$dev/address")" mtu="$(cat "/sys/class/net/$dev/mtu")" \
    queues="${q%,}" ip="${2:-none}"
}

# vu_ping PEER COUNT [WAIT [INTERVAL]]: wait up to WAIT s for PEER to answer, then ping it
# COUNT times; prints the pings and "VU-RESULT ping ...".
vu_ping() {
  peer=$1; count=$2; wait=${3:-30}; interval=${4:-0.2}
  tries=0; ok=0; t0=$(vu_now)
  while [ "$tries" -lt "$wait" ]; do
    tries=$((tries + 1))
    if ping -c 1 -W 1 "$peer" >/dev/null 2>&1; then ok=1; break; fi
  done
  vu_result reach peer="$peer" ok="$ok" tries="$tries" since="$t0" at="$(vu_now)"
  ping -c "$count" -i "$interval" -W 2 "$peer" 2>&1 | tee /tmp/ping.out
  sent=$(sed -n 's/^\([0-9]*\) packets transmitted.*/\1/p' /tmp/ping.out)
  recv=$(sed -n 's/.* \([0-9]*\) packets received.*/\1/p' /tmp/ping.out)
  loss=$(sed -n 's/.* \([0-9]*\)% packet loss.*/\1/p' /tmp/ping.out)
  rtt=$(sed -n 's/^round-trip min\/avg\/max = \([^ ]*\) ms.*/\1/p' /tmp/ping.out)
  vu_result ping peer="$peer" sent="${sent:-0}" received="${recv:-0}" loss="${loss:-100}%" \
    rtt="${rtt:-none}"
}

# vu_pattern SEED SECTORS [FIRST]: the disk pattern, one 512-byte line per sector.
vu_pattern() {
  awk -v seed="$1" -v n="$2" -v first="${3:-0}" 'BEGIN {
    for (s = first; s < first + n; s++) printf "%-511s\n", "vhostuser seed " seed " sector " s
  }'
}

# vu_disk_sum DEV: sha256 of the whole device, read with O_DIRECT (not the page cache).
vu_disk_sum() {
  dd if="/dev/$1" bs=64k iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1
}

vu_blk_info() {
  dev=$1
  vu_result blkdev dev="$dev" size="$(blockdev --getsize64 "/dev/$dev")" \
    ss="$(blockdev --getss "/dev/$dev")" ro="$(blockdev --getro "/dev/$dev")" \
    cache="$(cat "/sys/block/$dev/queue/write_cache" | tr ' ' '-')" \
    discard_max="$(cat "/sys/block/$dev/queue/discard_max_bytes")" \
    queues="$(ls "/sys/block/$dev/mq" 2>/dev/null | wc -l)"
}

# vu_blk_stat DEV: request counts from /sys/block/DEV/stat (fields 1, 5, 12, 16).
vu_blk_stat() {
  set -- $(cat "/sys/block/$1/stat")
  vu_result blkstat reads="$1" writes="$5" discards="${12:-0}" flushes="${16:-0}"
}

# vu_blk_pattern DEV SEED: write the pattern over the whole disk, flush, read it back.
vu_blk_pattern() {
  dev=$1; seed=$2
  vu_blk_info "$dev"
  sectors=$(blockdev --getsz "/dev/$dev")
  vu_pattern "$seed" "$sectors" > /tmp/pattern
  want=$(sha256sum /tmp/pattern | cut -d' ' -f1)
  t0=$(vu_now)
  dd if=/tmp/pattern of="/dev/$dev" bs=64k oflag=direct conv=fsync 2>/dev/null
  wrc=$?
  rm -f /tmp/pattern
  sync; blockdev --flushbufs "/dev/$dev"
  vu_result blkwrite dev="$dev" rc="$wrc" sectors="$sectors" sha256="$want" \
    seconds="$(awk -v a="$t0" -v b="$(vu_now)" 'BEGIN{print b - a}')"
  got=$(vu_disk_sum "$dev")
  match=0; [ "$got" = "$want" ] && match=1
  vu_result blkcheck dev="$dev" sectors="$sectors" sha256="$got" match="$match"
}

# vu_blk_check DEV SEED: compare the whole disk with the pattern.
vu_blk_check() {
  dev=$1; seed=$2
  sectors=$(blockdev --getsz "/dev/$dev")
  want=$(vu_pattern "$seed" "$sectors" | sha256sum | cut -d' ' -f1)
  got=$(vu_disk_sum "$dev")
  match=0; [ "$got" = "$want" ] && match=1
  vu_result blkcheck dev="$dev" sectors="$sectors" sha256="$got" match="$match"
}

# vu_shell: run commands sent on the console (see GuestVM.run) until VU-POWEROFF.
vu_shell() {
  stty -echo 2>/dev/null
  echo VU-READY
  while IFS= read -r line; do
    set -f; set -- $line; set +f
    case "$1" in
      VU-ADD) echo "$3" >> "/tmp/cmd.$2.b64" ;;
      VU-RUN)
        base64 -d "/tmp/cmd.$2.b64" > "/tmp/cmd.$2.sh"
        echo "VU-BEGIN $2"
        sh -c ". /etc/vu-lib.sh; . /tmp/cmd.$2.sh" </dev/null
        echo "VU-END $2 rc=$?"
        rm -f "/tmp/cmd.$2.b64" "/tmp/cmd.$2.sh" ;;
      VU-POWEROFF) return 0 ;;
    esac
  done
}
"""


def pattern_bytes(seed: int | str, sectors: int, first: int = 0) -> bytes:
    """The disk pattern ``vu_pattern`` writes in the guest, for ``sectors`` sectors.

    Each 512-byte sector is the line ``vhostuser seed SEED sector N`` padded with spaces to
    511 bytes plus a newline, so a misplaced or stale sector shows its own number.
    """
    out = bytearray()
    for s in range(first, first + sectors):
        out += f"vhostuser seed {seed} sector {s}".ljust(PATTERN_SECTOR - 1).encode() + b"\n"
    return bytes(out)


# --------------------------------------------------------------------------- initramfs


@dataclasses.dataclass(frozen=True, slots=True)
class _Inputs:
    release: str
    busybox: bytes
    modules: tuple[tuple[str, bytes], ...]

    def key(self) -> str:
        h = hashlib.sha256()
        for part in (str(INITRAMFS_FORMAT).encode(), self.release.encode(), INIT_SCRIPT.encode(),
                     LIB_SCRIPT.encode(), self.busybox):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
        for name, data in self.modules:
            h.update(name.encode() + b"\0" + len(data).to_bytes(8, "little"))
            h.update(data)
        return h.hexdigest()


def _gather(kernel: Path) -> _Inputs:
    release = kernel_release(kernel)
    busybox = _busybox_path()
    data = busybox.read_bytes()
    if not _elf_is_static(data):
        raise GuestError(f"{busybox} is not a static x86-64 executable: {INSTALL_HINT}")
    modules = tuple(_read_module(p) for p in _module_files(release, GUEST_MODULES))
    return _Inputs(release=release, busybox=data, modules=modules)


def _archive(inputs: _Inputs) -> bytes:
    raw = io.BytesIO()
    w = CpioWriter(raw)
    for d in ("bin", "dev", "etc", "lib", "lib/modules", "proc", "sys", "tmp", "root", "mnt"):
        w.directory(d)
    w.char_device("dev/console", 5, 1)
    w.char_device("dev/null", 1, 3, 0o666)
    w.file("bin/busybox", inputs.busybox, 0o755)
    w.symlink("bin/sh", "busybox")
    w.file("init", INIT_SCRIPT.encode(), 0o755)
    w.file("etc/vu-lib.sh", LIB_SCRIPT.encode())
    order = "".join(f"{name}\n" for name, _ in inputs.modules)
    w.file("etc/vu-modules", order.encode())
    for i, (name, data) in enumerate(inputs.modules):
        w.file(f"lib/modules/{i:02d}-{name}", data)  # /init loads them in glob (= this) order
    w.close()
    # mtime=0: identical inputs give identical bytes
    return gzip.compress(raw.getvalue(), compresslevel=6, mtime=0)


def build_initramfs(*, kernel: Path | None = None, cache: Path | None = None,
                    force: bool = False) -> Path:
    """The initramfs for ``kernel`` (default :func:`kernel_path`), built on first use.

    The file is ``<cache>/guest/initramfs-<release>-<hash>.cpio.gz``; the hash covers the
    busybox binary, the module files, the init scripts and the release, so any change builds
    a new archive, and older archives of the same release are removed. Writing is atomic
    (temporary file, then rename): concurrent callers at worst build twice.

    Raises:
        GuestError: a missing kernel, busybox, modprobe or module.
    """
    kernel = kernel if kernel is not None else kernel_path()
    inputs = _gather(kernel)
    directory = (cache if cache is not None else cache_dir()) / "guest"
    target = directory / f"initramfs-{inputs.release}-{inputs.key()[:16]}.cpio.gz"
    if target.is_file() and not force:
        return target
    directory.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    data = _archive(inputs)
    tmp = directory / f".{target.name}.{os.getpid()}.tmp"
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    for old in directory.glob(f"initramfs-{inputs.release}-*.cpio.gz"):
        if old != target:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
    log.info("built %s (%d bytes, %d modules) in %.2f s", target, len(data),
             len(inputs.modules), time.monotonic() - t0)
    return target


# --------------------------------------------------------------------------- host side


def host_networks() -> list[ipaddress.IPv4Network]:
    """IPv4 networks the host routes to (``/proc/net/route``; the default route left out)."""
    nets: list[ipaddress.IPv4Network] = []
    with contextlib.suppress(OSError), open("/proc/net/route") as f:
        for line in f.read().splitlines()[1:]:
            cols = line.split()
            if len(cols) < 8:
                continue
            dest = ipaddress.IPv4Address(int(cols[1], 16).to_bytes(4, "little"))
            mask = ipaddress.IPv4Address(int(cols[7], 16).to_bytes(4, "little"))
            if int(mask) == 0:
                continue
            nets.append(ipaddress.IPv4Network(f"{dest}/{mask}", strict=False))
    return nets


def pick_subnet(first: int = 77) -> str:
    """A private ``10.N.M`` /24 prefix (e.g. ``"10.77.3"``) that no host route overlaps.

    Guests and a host tap use addresses in it, so the test traffic can never be routed
    anywhere but between our VMs, our switch and the tap.

    Raises:
        GuestError: every candidate is taken.
    """
    used = host_networks()
    for second in range(first, 256):
        for third in range(256):
            candidate = ipaddress.IPv4Network(f"10.{second}.{third}.0/24")
            if not any(candidate.overlaps(n) for n in used):
                return f"10.{second}.{third}"
    raise GuestError(f"no free 10.{first}-255.x.0/24 subnet: the host routes all of them")


@contextlib.contextmanager
def host_address(ifname: str, cidr: str) -> Iterator[None]:
    """Give host interface ``ifname`` the address ``cidr`` (``ip addr add``) and bring it up;
    remove the address on exit (quietly if the interface is gone by then).

    Raises:
        GuestError: ``ip`` is missing or refused.
    """
    ip = shutil.which("ip")
    if ip is None:
        raise GuestError("the 'ip' command (iproute2) is needed to address the host tap")
    for argv in ([ip, "addr", "add", cidr, "dev", ifname], [ip, "link", "set", ifname, "up"]):
        proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              check=False)
        if proc.returncode != 0:
            raise GuestError(f"{shlex.join(argv)} failed: {proc.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run([ip, "addr", "del", cidr, "dev", ifname], capture_output=True,
                       stdin=subprocess.DEVNULL, check=False)


# --------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True, slots=True)
class GuestResult:
    """One ``VU-RESULT name key=value ...`` console line."""

    name: str
    fields: dict[str, str]
    line: str

    def __getitem__(self, key: str) -> str:
        try:
            return self.fields[key]
        except KeyError:
            raise KeyError(f"result {self.name!r} has no field {key!r}: {self.line!r}") from None

    def get(self, key: str, default: str | None = None) -> str | None:
        """The field ``key`` or ``default``."""
        return self.fields.get(key, default)

    def int(self, key: str) -> int:
        """Field ``key`` as an integer (a trailing ``%`` is dropped)."""
        value = self[key].removesuffix("%")
        try:
            return int(value)
        except ValueError:
            raise ValueError(
                f"result {self.name!r} field {key!r} = {value!r} is not an integer"
            ) from None


_RESULT_RE = re.compile(r"^VU-RESULT (\S+)(.*)$", re.MULTILINE)


def parse_results(text: str) -> list[GuestResult]:
    """Every ``VU-RESULT`` line in console ``text``, in order."""
    out: list[GuestResult] = []
    for m in _RESULT_RE.finditer(text):
        fields: dict[str, str] = {}
        for word in m[2].split():
            key, _, value = word.partition("=")
            fields[key] = value
        out.append(GuestResult(name=m[1], fields=fields, line=m[0]))
    return out


@dataclasses.dataclass(frozen=True, slots=True)
class CommandResult:
    """What a command run through :meth:`GuestVM.run` printed and its exit status."""

    rc: int
    output: str

    @property
    def results(self) -> list[GuestResult]:
        """The ``VU-RESULT`` lines in the output."""
        return parse_results(self.output)


# --------------------------------------------------------------------------- the VM


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class NetPort:
    """A virtio-net-pci NIC on a vhost-user socket.

    ``server``: QEMU listens (``server=on,wait=off``) and the back-end connects;
    ``reconnect``: seconds between QEMU's connection attempts (client mode).
    """

    socket: str | os.PathLike[str]
    mac: str | None = None
    queues: int = 1
    server: bool = False
    reconnect: int | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class BlkDisk:
    """A vhost-user-blk-pci disk (the guest's /dev/vda, vdb ... in command-line order)."""

    socket: str | os.PathLike[str]
    num_queues: int = 1
    server: bool = False
    reconnect: int | None = None
    packed: bool = False
    """Offer VIRTIO_F_RING_PACKED (QEMU ``packed=on``; the guest's driver then uses it)."""


_vm_ids = itertools.count(1)


def _chardev(cid: str, socket_path: str | os.PathLike[str], server: bool,
             reconnect: int | None) -> str:
    spec = f"socket,id={cid},path={os.fspath(socket_path)}"
    if server:
        spec += ",server=on,wait=off"
    if reconnect is not None:
        spec += f",reconnect={reconnect}"
    return spec


class GuestVM:
    """One tiny guest under QEMU (TCG) with vhost-user NICs and disks.

    The serial console is read by a thread into :meth:`console` (``on_line`` sees each line
    as it arrives, ``log_path`` gets a copy). Guest RAM is a shared memfd, as vhost-user
    requires; NICs use ``vectors=0`` (MSI-X under TCG crashes QEMU 7.2's vhost-user net),
    and a NIC with ``queues > 1`` gets ``mq=on`` and the guest as many CPUs as queue pairs
    (Linux's virtio_net enables only ``min(cpus, max pairs)`` pairs and busybox has no
    ethtool to raise it). ``params`` become ``vu.KEY=VALUE`` on the kernel command line
    (see the module docstring); ``script`` is run by the guest after them (``vu.cmd64``).

    ``mem_path``/``mem_share`` put guest RAM in a file instead (QEMU's
    memory-backend-file), shared or not.

    Live migration: ``qmp`` makes QEMU serve QMP on that unix socket path (for
    ``migrate``, ``query-migrate``); ``incoming`` (e.g. ``"unix:/tmp/mig.sock"``) starts
    QEMU as a migration destination (``-incoming``) that runs the guest it receives. A
    destination must be built like its source (same NICs, MACs, disks, memory, CPUs):
    pass the source's :attr:`nets` (their MACs are then kept). The guest's console
    continues on the destination's :meth:`console`; commands submitted on the source keep
    running in the migrated guest, their output arriving there.

    Use as a context manager: leaving it stops QEMU (SIGTERM, then SIGKILL) and reaps it.
    """

    def __init__(
        self,
        *,
        nets: Sequence[NetPort] = (),
        blks: Sequence[BlkDisk] = (),
        params: Mapping[str, str | int] | None = None,
        script: str | None = None,
        end: str = "poweroff",
        mem_mb: int = 256,
        smp: int | None = None,
        name: str | None = None,
        log_path: str | os.PathLike[str] | None = None,
        on_line: Callable[[str], None] | None = None,
        kernel: Path | None = None,
        initrd: Path | None = None,
        extra_args: Sequence[str] = (),
        mem_path: str | os.PathLike[str] | None = None,
        mem_share: bool = True,
        qmp: str | os.PathLike[str] | None = None,
        incoming: str | None = None,
    ) -> None:
        if end not in ("poweroff", "shell", "hold"):
            raise ValueError(f"end {end!r} is not one of poweroff, shell, hold")
        for n in nets:
            if not 1 <= n.queues <= 64:
                raise ValueError(f"NIC on {n.socket}: queues {n.queues} is outside 1..64")
        for b in blks:
            if not 1 <= b.num_queues <= 64:
                raise ValueError(f"disk on {b.socket}: num_queues {b.num_queues} is outside "
                                 "1..64")
        if mem_mb < 64:
            raise ValueError(f"mem_mb {mem_mb} is below the 64 MiB the guest needs")
        self.vm_id = next(_vm_ids) & 0xFF
        self.name = name or f"vm{self.vm_id}"
        self.nets = [
            n if n.mac is not None else dataclasses.replace(
                n, mac=f"52:54:00:56:{self.vm_id:02x}:{i:02x}")
            for i, n in enumerate(nets)
        ]
        self.blks = list(blks)
        self.params: dict[str, str] = {"nics": str(len(self.nets)), "end": end}
        for key, value in (params or {}).items():
            if not re.fullmatch(r"[a-z][a-z0-9_]*", key):
                raise ValueError(f"guest parameter name {key!r} is not [a-z][a-z0-9_]*")
            text = str(value)
            if not text or any(c.isspace() or c == '"' for c in text):
                raise ValueError(f"guest parameter vu.{key}={text!r} is empty or has spaces")
            self.params[key] = text
        if script is not None:
            self.params["cmd64"] = base64.b64encode(script.encode()).decode()
        self.mem_mb = mem_mb
        queues = max((n.queues for n in self.nets), default=1)
        self.smp = smp if smp is not None else min(max(1, queues), 4)
        self.log_path = Path(log_path) if log_path is not None else None
        self.on_line = on_line
        self.kernel = kernel
        self.initrd = initrd
        self.extra_args = tuple(extra_args)
        self.mem_path = None if mem_path is None else os.fspath(mem_path)
        self.mem_share = mem_share
        self.qmp = None if qmp is None else os.fspath(qmp)
        if self.qmp is not None and "," in self.qmp:
            raise ValueError(f"qmp socket path {self.qmp!r} contains a comma")
        if incoming is not None and (not incoming or any(c.isspace() for c in incoming)):
            raise ValueError(f"incoming {incoming!r} is empty or has spaces")
        self.incoming = incoming
        if mem_path is None and not mem_share:
            raise ValueError("mem_share=False needs a mem_path (a memfd is always shared)")
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        self.command_line = ""
        self.started_at = 0.0
        self._text: list[str] = []
        self._joined = ""
        self._partial = ""
        self._cond = threading.Condition()
        self._eof = False
        self._reader: threading.Thread | None = None
        self._log: IO[bytes] | None = None
        self._cmd_ids = itertools.count(1)
        self._since: dict[int, int] = {}
        self._adopted: set[int] = set()  # commands started on a migration source
        self._ready = False  # a migration destination takes commands at once
        self._write_lock = threading.Lock()

    # ---------------------------------------------------------------- command line
    def append_line(self) -> str:
        """The kernel command line.

        Raises:
            GuestError: longer than the 2048 bytes x86 Linux takes (send a long script with
                :meth:`run` instead of ``script``).
        """
        vu = " ".join(f"vu.{k}={v}" for k, v in self.params.items())
        line = f"console=ttyS0 panic=-1 quiet loglevel=3 ipv6.disable=1 {vu}"
        if len(line) >= KERNEL_CMDLINE_MAX:
            raise GuestError(f"{self.name}: kernel command line of {len(line)} bytes exceeds "
                             f"{KERNEL_CMDLINE_MAX - 1}; pass long scripts with run()")
        return line

    def argv(self) -> list[str]:
        """The QEMU command line (builds the initramfs if needed)."""
        kernel = self.kernel if self.kernel is not None else kernel_path()
        initrd = self.initrd if self.initrd is not None else build_initramfs(kernel=kernel)
        m = self.mem_mb
        argv = [
            qemu_binary(), "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-name", self.name,
            "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-smp", str(self.smp),
            "-m", f"{m}M",
            "-object", self._memory_backend(),
            "-numa", "node,memdev=mem",
            "-kernel", os.fspath(kernel), "-initrd", os.fspath(initrd),
            "-append", self.append_line(),
            "-serial", "stdio", "-monitor", "none",
        ]
        if self.qmp is not None:
            argv += ["-qmp", f"unix:{self.qmp},server=on,wait=off"]
        if self.incoming is not None:
            argv += ["-incoming", self.incoming]
        for i, n in enumerate(self.nets):
            netdev = f"vhost-user,id=net{i},chardev=netc{i}"
            device = f"virtio-net-pci,netdev=net{i},mac={n.mac},romfile=,vectors=0"
            if n.queues > 1:
                netdev += f",queues={n.queues}"
                device += ",mq=on"
            argv += ["-chardev", _chardev(f"netc{i}", n.socket, n.server, n.reconnect),
                     "-netdev", netdev, "-device", device]
        for i, b in enumerate(self.blks):
            argv += ["-chardev", _chardev(f"blkc{i}", b.socket, b.server, b.reconnect),
                     "-device", f"vhost-user-blk-pci,chardev=blkc{i},num-queues={b.num_queues}"
                     + (",packed=on" if b.packed else "")]
        return [*argv, *self.extra_args]

    def _memory_backend(self) -> str:
        """Guest RAM: a shared memfd, or a file (``mem_path``: a directory on tmpfs or
        hugetlbfs, where QEMU makes and unlinks a file, or a file it uses as is) mapped
        shared or, with ``mem_share=False``, privately (the seed's ``-mem-path`` without
        share: vhost-user cannot work, which diagnostics tests rely on)."""
        m = self.mem_mb
        if self.mem_path is None:
            return f"memory-backend-memfd,id=mem,size={m}M,share=on"
        if "," in self.mem_path:
            raise GuestError(f"{self.name}: mem_path {self.mem_path!r} contains a comma")
        share = "on" if self.mem_share else "off"
        return f"memory-backend-file,id=mem,size={m}M,mem-path={self.mem_path},share={share}"

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> Self:
        """Start QEMU (the guest boots in the background).

        Raises:
            GuestError: QEMU, the kernel or the initramfs are missing; already started.
        """
        if self.proc is not None:
            raise GuestError(f"{self.name} already started (pid {self.proc.pid})")
        argv = self.argv()
        self.command_line = shlex.join(argv)
        if self.log_path is not None:
            self._log = open(self.log_path, "ab")  # noqa: SIM115 -- closed by the reader
        log.info("%s: %s", self.name, self.command_line)
        self.started_at = time.monotonic()
        try:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except BaseException:
            if self._log is not None:
                self._log.close()
                self._log = None
            raise
        self._reader = threading.Thread(target=self._read_console, name=f"{self.name} console",
                                        daemon=True)
        self._reader.start()
        return self

    def _read_console(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # chars may split
        try:
            while chunk := os.read(fd, 65536):
                if self._log is not None:
                    self._log.write(chunk)
                    self._log.flush()
                text = decoder.decode(chunk).replace("\r", "")
                with self._cond:
                    self._text.append(text)
                    self._cond.notify_all()
                if self.on_line is not None:
                    self._partial += text
                    *lines, self._partial = self._partial.split("\n")
                    for line in lines:
                        self._deliver(line)
        except (OSError, ValueError):
            pass
        finally:
            if self._partial:
                self._deliver(self._partial)
            if self._log is not None:
                self._log.close()
                self._log = None
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    def _deliver(self, line: str) -> None:
        if self.on_line is None:
            return
        try:
            self.on_line(line)
        except Exception:  # a broken callback must not stop the console reader
            log.exception("%s: on_line callback failed", self.name)

    def running(self) -> bool:
        """True while QEMU runs."""
        return self.proc is not None and self.proc.poll() is None

    def wait_exit(self, timeout: float = 60.0) -> int:
        """Wait for QEMU to exit by itself (the guest powered off); return its status.

        Raises:
            GuestTimeout: still running after ``timeout`` s.
        """
        if self.proc is None:
            raise GuestError(f"{self.name} not started")
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise self._failure(GuestTimeout, f"still running after {timeout} s") from None
        self._finish()
        return code

    def stop(self, timeout: float = 10.0) -> int | None:
        """Stop QEMU (idempotent): SIGTERM, SIGKILL after ``timeout`` s; reap it.

        Returns its exit status (negative: the signal that ended it).
        """
        proc = self.proc
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            self._finish()
        return self.returncode

    def _finish(self) -> None:
        assert self.proc is not None
        self.returncode = self.proc.returncode
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        if self._reader is not None:
            self._reader.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ---------------------------------------------------------------- console
    def console(self) -> str:
        """Everything the guest and QEMU printed so far (carriage returns removed)."""
        with self._cond:
            if self._text:
                self._joined += "".join(self._text)
                self._text.clear()
            return self._joined

    def tail(self, lines: int = 40) -> str:
        """The last ``lines`` console lines."""
        return "\n".join(self.console().splitlines()[-lines:])

    def mark(self) -> int:
        """A console position; pass it as ``since`` to look only at later output."""
        return len(self.console())

    def results(self, since: int = 0) -> list[GuestResult]:
        """Every ``VU-RESULT`` printed after position ``since``."""
        return parse_results(self.console()[since:])

    def _failure(self, cls: type[GuestError], what: str) -> GuestError:
        return cls(f"{self.name}: {what}\n$ {self.command_line}\n--- console tail ---\n"
                   f"{self.tail()}")

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 60.0, *,
                 since: int = 0) -> re.Match[str]:
        """Wait until ``pattern`` (multiline regex) matches the console after ``since``.

        Raises:
            GuestTimeout: no match in ``timeout`` s.
            GuestExited: QEMU exited without printing it.
        """
        regex = re.compile(pattern, re.MULTILINE) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                eof = self._eof
            text = self.console()
            if not eof:
                text = text[: text.rfind("\n") + 1]  # whole lines only: "$" must mean a line end
            m = regex.search(text, since)
            if m is not None:
                return m
            with self._cond:
                if self._text:
                    continue  # more output arrived meanwhile
                if eof:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._failure(GuestTimeout, f"no {regex.pattern!r} within {timeout} s")
                self._cond.wait(min(remaining, 1.0))
        if self.proc is not None:
            self.returncode = self.proc.wait()
        raise self._failure(
            GuestExited, f"QEMU exited ({self.returncode}) before printing {regex.pattern!r}")

    def wait_result(self, name: str, timeout: float = 60.0, *, since: int = 0) -> GuestResult:
        """Wait for the next ``VU-RESULT name ...`` line after ``since`` and return it."""
        m = self.wait_for(rf"^VU-RESULT {re.escape(name)}(?: .*)?$", timeout, since=since)
        return parse_results(m[0])[0]

    # ---------------------------------------------------------------- command channel
    def _send(self, data: bytes) -> None:
        if self.proc is None or self.proc.stdin is None:
            raise GuestError(f"{self.name} not started")
        with self._write_lock:
            try:
                self.proc.stdin.write(data)
                self.proc.stdin.flush()
            except (BrokenPipeError, ValueError):
                raise self._failure(GuestExited, "console closed (QEMU exited)") from None

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Wait until a ``end="shell"`` guest takes commands."""
        if self._ready:
            return
        self.wait_for(r"^VU-READY$", timeout)

    def take_over(self, source: GuestVM) -> None:
        """This VM is the destination ``source`` migrated to (QEMU's ``migrate``
        completed): the guest's shell is ready here, later commands get new ids, and a
        command submitted on ``source`` still running can be waited for here
        (:meth:`wait_command`: its output is what arrived on this console).

        Raises:
            GuestError: this VM was not started as a migration destination.
        """
        if self.incoming is None:
            raise GuestError(f"{self.name} was not started with incoming=")
        self._ready = True
        self._cmd_ids = source._cmd_ids
        for cid in source._since:
            self._since.setdefault(cid, 0)
            self._adopted.add(cid)

    def submit(self, script: str, timeout: float = 90.0) -> int:
        """Start shell ``script`` in a ``end="shell"`` guest; return its id for
        :meth:`wait_command` (the guest runs one command at a time, in order).

        The script is sent base64-encoded over the serial console in lines short enough
        for the guest tty, and runs with the helpers of ``/etc/vu-lib.sh`` (``vu_result``,
        ``vu_ping``, ``vu_pattern``, ...) and stdin from /dev/null. Kernel messages may be
        interleaved with its output.

        Raises:
            GuestTimeout: the guest did not get ready for commands in ``timeout`` s.
        """
        self.wait_ready(timeout)
        cid = next(self._cmd_ids)
        encoded = base64.b64encode(script.encode()).decode()
        self._since[cid] = self.mark()
        lines = [f"VU-ADD {cid} {encoded[i:i + 1000]}\n" for i in range(0, len(encoded), 1000)]
        self._send("".join([*lines, f"VU-RUN {cid}\n"]).encode())
        return cid

    def wait_command(self, cid: int, timeout: float = 60.0) -> CommandResult:
        """Wait for command ``cid`` (from :meth:`submit`) to finish; its status and output.

        Raises:
            GuestTimeout: it did not finish in ``timeout`` s.
            KeyError: no such command was submitted.
        """
        since = self._since[cid]
        if cid in self._adopted:  # begun on the migration source: the rest is here
            end = self.wait_for(rf"^VU-END {cid} rc=(\d+)$", timeout, since=since)
            return CommandResult(rc=int(end[1]), output=self.console()[since: end.start()])
        begin = self.wait_for(rf"^VU-BEGIN {cid}$", timeout, since=since)
        end = self.wait_for(rf"^VU-END {cid} rc=(\d+)$", timeout, since=begin.end())
        output = self.console()[begin.end() + 1: end.start()]
        return CommandResult(rc=int(end[1]), output=output)

    def run(self, script: str, timeout: float = 60.0) -> CommandResult:
        """Run shell ``script`` in a ``end="shell"`` guest and return its status and output
        (:meth:`submit` then :meth:`wait_command`).

        Raises:
            GuestTimeout: it did not finish in ``timeout`` s.
        """
        return self.wait_command(self.submit(script, timeout), timeout)

    def poweroff(self, timeout: float = 30.0) -> int:
        """Ask a ``end="shell"`` guest to power off; wait for QEMU to exit."""
        self.wait_ready(timeout)
        self._send(b"VU-POWEROFF\n")
        return self.wait_exit(timeout)


def wait_all(vms: Iterable[GuestVM], name: str, timeout: float) -> list[GuestResult]:
    """Wait for result ``name`` from every VM (one deadline for all)."""
    deadline = time.monotonic() + timeout
    return [vm.wait_result(name, max(0.1, deadline - time.monotonic())) for vm in vms]
