"""Our front-end drives a migration of real back-ends: DPDK's vhost PMD (testpmd
``net_vhost`` in macswap mode, which sends every frame back), our blk back-end, and
qemu-storage-daemon's vhost-user-blk export.

Net: with logging on (SET_LOG_BASE with a memfd, LOG_ALL, the ring log flags), frames go
out and come back; a shadow copy of guest memory from before and after says which pages
DPDK wrote, and every one must be marked in the log (pages marked but unchanged are
allowed: see :mod:`vhostuser.testing.migration`). Then the rings are stopped
(GET_VRING_BASE) and resumed at the returned index on a second connection to the same
testpmd (after the first is closed: a net_vhost port serves one front-end at a time), or
re-based on the same connection, and traffic goes on exactly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from vhostuser.frontends.blk import BlkOp, VirtioBlkFrontend
from vhostuser.frontends.net import VirtioNetFrontend, probe_template, stamp_probe
from vhostuser.io.frontend import FrontendClient
from vhostuser.protocol.enums import ProtocolFeature, VirtioFeature
from vhostuser.testing.migration import LogAudit, audit_blk_reads, audit_net_echo

from .peers import TestpmdVhost, require_peer
from .test_blk_interop import backend, wait_ready

pytestmark = pytest.mark.interop

MAC_A = bytes.fromhex("02000000000a")
MAC_B = bytes.fromhex("02000000000b")


def frames(n: int, size: int, magic: int) -> list[bytes]:
    t = probe_template(size, src_mac=MAC_A, dst_mac=MAC_B, magic=magic)
    out = []
    for i in range(n):
        stamp_probe(t, i, 0, magic)
        out.append(bytes(t))
    return out


def swapped(fr: list[bytes]) -> list[bytes]:
    """What macswap sends back: destination and source MACs exchanged."""
    return [f[6:12] + f[0:6] + f[12:] for f in fr]


def receive(nic: VirtioNetFrontend, n: int, timeout: float = 20.0) -> list[bytes]:
    import time

    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += nic.recv(timeout=0.2)
    return got


def assert_packed_logging_is_shifted(nic: VirtioNetFrontend, audit: LogAudit) -> None:
    """What DPDK 22.11 does with packed rings, recorded: it logs its writes to a packed
    descriptor ring at ``log_guest_addr`` + (their offset in the descriptor ring), as if
    log_guest_addr were the descriptor ring's address. QEMU (``vhost_virtqueue_set_addr``)
    and we send the device area's address there (``used_phys``: vhost-user.rst calls it
    the used ring's), so the pages of the receive descriptor ring DPDK wrote go unmarked
    and pages of the device area (which it did not write) are marked instead. A migration
    of a packed-ring guest on DPDK could therefore lose used descriptors. Receive buffers
    are logged. Fails if DPDK changes (then this case joins the split one)."""
    rx = next(a for a in nic.ring_areas() if a.rx)
    desc_pages = set(range(rx.desc // 4096, (rx.desc + 16 * nic.queue_size - 1) // 4096 + 1))
    assert audit.missing, "DPDK now logs packed descriptor writes where they are: " \
        + audit.describe()
    assert audit.missing <= desc_pages, audit.describe()
    shift = rx.used - rx.desc
    shifted = {(p * 4096 + shift) // 4096 for p in audit.missing}
    assert shifted <= audit.marked, (sorted(shifted), audit.describe())
    assert not (audit.changed & audit.rx_pages) - audit.marked, audit.describe()


@pytest.mark.parametrize("same", [False, True], ids=["new-connection", "same-connection"])
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_dpdk_logs_what_it_writes_and_resumes_at_its_base(
        no_leaks: Any, sock_dir: Path, packed: bool, same: bool) -> None:
    require_peer("testpmd")
    sock = str(sock_dir / "vhost.sock")
    cpu = sorted(os.sched_getaffinity(0))[-1]
    with TestpmdVhost(sock, forward_mode="macswap", cpu=cpu) as be:
        be.wait_listening()
        with VirtioNetFrontend.connect(sock, packed=packed, reconnect=False) as nic:
            c = nic.client
            assert c.conn.backend_features is not None
            assert c.conn.backend_features & VirtioFeature.LOG_ALL, "DPDK offers LOG_ALL"
            assert c.conn.has(ProtocolFeature.LOG_SHMFD), "DPDK offers LOG_SHMFD"
            warm = frames(20, 200, 0x11)
            assert nic.send_all(warm) == 20 and receive(nic, 20) == swapped(warm)
            with nic.start_logging() as log:
                audit, back = audit_net_echo(nic, log, frames(64, 1000, 0x22))
                print(f"DPDK {'packed' if packed else 'split'}: {audit.describe()}")
                assert back == swapped(frames(64, 1000, 0x22))
                if packed:
                    assert_packed_logging_is_shifted(nic, audit)
                else:
                    assert not audit.missing, audit.describe()
                # What DPDK was seen to write, and marked: receive buffers and ring state.
                assert audit.changed & audit.rx_pages, audit.describe()
                assert audit.changed & audit.ring_pages, audit.describe()
                mark = be.mark()
                bases = nic.migrate(None if same else (lambda: FrontendClient.connect(sock)))
                if not packed:
                    assert bases[1] == 20 + 64, bases
                if same:
                    nic.stop_logging()
            msgs = be.messages(mark)
            assert "GET_VRING_BASE" in msgs and "SET_VRING_BASE" in msgs, msgs
            more = frames(200, 600, 0x33)
            got: list[bytes] = []
            for i in range(0, 200, 50):
                assert nic.send_all(more[i : i + 50]) == 50
                got += receive(nic, 50)
            assert got == swapped(more)
            assert nic.stats.rx_errors == 0


# -- blk: qemu-storage-daemon and our blk back-end ---------------------------------------------


@pytest.mark.parametrize("kind", ["qsd", "ours"])
def test_blk_backend_logs_reads_and_resumes_at_its_base(no_leaks: Any, sock_dir: Path,
                                                        kind: str) -> None:
    """qemu-storage-daemon's vhost-user-blk export (libvhost-user) and ``vhost-user blk``:
    with logging on, every page a read writes (data, status, used ring) is marked; the
    ring then moves to a new connection at GET_VRING_BASE's index."""
    size = 8 << 20
    img = sock_dir / "disk.raw"
    pattern = bytes(range(256)) * (size // 256)
    img.write_bytes(pattern)
    sock = sock_dir / "blk.sock"
    peer = backend(kind, sock, img)
    with peer:
        wait_ready(peer)
        with VirtioBlkFrontend(str(sock), reconnect=False) as disk:
            fe = disk._session.fe if disk._session is not None else None
            assert fe is not None
            offered = fe.conn.backend_features or 0
            print(f"{kind}: features {offered:#x}, protocol features "
                  f"{fe.conn.backend_protocol_features or 0:#x}")
            assert offered & VirtioFeature.LOG_ALL, f"{kind} does not offer LOG_ALL"
            assert fe.conn.has(ProtocolFeature.LOG_SHMFD), f"{kind} does not offer LOG_SHMFD"
            disk.write(0, b"\xa5" * 65536)
            with disk.start_logging() as log:
                ops = [BlkOp("read", offset=k * 131072, length=65536) for k in range(8)]
                audit = audit_blk_reads(disk, log, ops)
                print(f"{kind}: {audit.describe()}")
                assert all(op.ok for op in ops)
                assert ops[3].data == pattern[3 * 131072 : 3 * 131072 + 65536]
                assert not audit.missing, audit.describe()
                assert audit.changed & audit.rx_pages and audit.changed & audit.ring_pages
                bases = disk.migrate()
                assert bases == {0: 9}, bases
            assert disk.read(0, 65536) == b"\xa5" * 65536
            disk.write(65536, b"\x5a" * 4096)
            assert disk.read(65536, 4096) == b"\x5a" * 4096
