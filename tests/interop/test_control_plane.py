"""Issue "Foundation" acceptance: the control plane against unmodified QEMU and DPDK.

Our back-end (a null net device) is driven by DPDK virtio-user and QEMU 7.2 in both socket
directions; our front-end drives DPDK's net_vhost and qemu-storage-daemon. After each test
our process holds the same fds and mappings as before (the ``no_leaks`` fixture).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from vhostuser.connection import events as ev
from vhostuser.devices.net import NullNetDevice
from vhostuser.io.backend import BackendSession
from vhostuser.io.frontend import FrontendClient
from vhostuser.io.guestram import GuestRam
from vhostuser.io.thread import ServerThread
from vhostuser.protocol.enums import FrontendRequest, ProtocolFeature, VirtioFeature
from vhostuser.virtq import packed_layout, split_layout

from . import peers
from .peers import (
    QemuStorageDaemon,
    QemuVhostUserNet,
    TestpmdVhost,
    TestpmdVirtioUser,
    make_raw_image,
    require_peer,
)

pytestmark = pytest.mark.interop

T = TypeVar("T")

# What these exact peer versions offer (DPDK 22.11 net_vhost, QEMU 7.2 qemu-storage-daemon),
# as recorded in tests/data/traces/.
DPDK_VHOST_FEATURES = 0xD7C66E7CB
DPDK_VHOST_PROTOCOL_FEATURES = 0x10CBF
QSD_BLK_FEATURES = 0x175007E46
QSD_BLK_PROTOCOL_FEATURES = 0x8F2B

SRC = str(Path(__file__).resolve().parents[2] / "src")


def wait_until(fn: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll ``fn`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def session_state(srv: ServerThread) -> dict[str, Any] | None:
    """Snapshot of the newest session, taken on the reactor thread."""

    def snap() -> dict[str, Any] | None:
        if not srv.sessions_seen:
            return None
        s: BackendSession = srv.sessions_seen[-1]
        c = s.conn
        return {
            "closed": s.closed,
            "reason": s.close_reason,
            "error": c.error,
            "owner": c.owner,
            "features": c.features,
            "protocol_features": c.protocol_features,
            "started": [v.started for v in c.vrings],
            "enabled": [v.enabled for v in c.vrings],
            "broken": [v.broken for v in c.vrings],
            "regions": len(c.mem),
            "events": [type(e).__name__ for e in s.events],
        }

    return srv.call(snap)


def wait_state(
    srv: ServerThread, pred: Callable[[dict[str, Any]], bool], timeout: float, what: str
) -> dict[str, Any]:
    """Wait until the newest session's state satisfies ``pred``; return that state."""

    def probe() -> dict[str, Any] | None:
        st = session_state(srv)
        return st if st is not None and pred(st) else None

    return wait_until(probe, timeout, what)


# ----------------------------------------------------------------------- our back-end


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("server", [False, True], ids=["we-listen", "we-connect"])
def test_backend_with_dpdk_virtio_user(
    no_leaks: Any, sock_dir: Path, packed: bool, server: bool
) -> None:
    """DPDK virtio-user (txonly) completes the handshake with our null-net back-end: link
    up, every ring started, frames flow into our device."""
    require_peer("testpmd")
    sock = str(sock_dir / "be.sock")
    dev_factory = NullNetDevice
    if server:
        # virtio-user listens (server=1); we connect, as QEMU's back-ends do with server=on.
        with TestpmdVirtioUser(sock, packed=packed, server=True, forward_mode="txonly") as fe:
            peers.wait_for_socket(sock)
            with ServerThread(sock, dev_factory, connect=True) as srv:
                _check_dpdk_frontend(fe, srv, packed)
    else:
        with ServerThread(sock, dev_factory) as srv, TestpmdVirtioUser(
            sock, packed=packed, forward_mode="txonly"
        ) as fe:
            _check_dpdk_frontend(fe, srv, packed)
    assert not srv.errors, srv.errors


def _check_dpdk_frontend(fe: TestpmdVirtioUser, srv: ServerThread, packed: bool) -> None:
    fe.wait_link_up(timeout=20)
    st = wait_state(srv, lambda s: all(s["started"]), 20, "both rings started")
    assert st["error"] is None
    assert st["owner"]
    assert st["regions"] >= 1
    assert all(st["enabled"])
    assert st["features"] & VirtioFeature.RING_PACKED == (VirtioFeature.RING_PACKED if packed
                                                          else 0)
    dev = srv.devices[-1]
    assert isinstance(dev, NullNetDevice)
    wait_until(lambda: srv.call(lambda: dev.tx_frames) > 1000, 20, "frames from DPDK txonly")
    stats = fe.wait_stats(lambda s: s.tx_packets > 1000, timeout=20)
    assert stats.tx_packets > 1000
    assert not any(st["broken"])


@pytest.mark.parametrize("qemu_listens", [False, True], ids=["qemu-connects", "qemu-listens"])
def test_backend_with_qemu(no_leaks: Any, sock_dir: Path, qemu_listens: bool) -> None:
    """QEMU 7.2 -netdev vhost-user completes its start-up handshake with our back-end, in
    both socket directions, and quits cleanly."""
    require_peer("qemu")
    sock = str(sock_dir / "net.sock")
    if qemu_listens:
        with QemuVhostUserNet(sock, server=True) as q:
            peers.wait_for_socket(sock)
            with ServerThread(sock, NullNetDevice, connect=True) as srv:
                st = _check_qemu(srv)
                q.stop()
                wait_state(srv, lambda s: bool(s["closed"]), 20, "session closed after quit")
    else:
        with ServerThread(sock, NullNetDevice) as srv:
            with QemuVhostUserNet(sock) as q:
                st = _check_qemu(srv)
                q.stop()
            wait_state(srv, lambda s: bool(s["closed"]), 20, "session closed after quit")
    final = session_state(srv)
    assert final is not None
    assert final["error"] is None, final["error"]
    assert final["reason"] == "front-end closed the connection"
    assert st["owner"]
    assert not srv.errors, srv.errors


def _check_qemu(srv: ServerThread) -> dict[str, Any]:
    # QEMU 7.2 without a guest: features and protocol features negotiated, owner set,
    # call/err fds for both rings, and both rings enabled (vhost-user.rst, and what QEMU 7.2 does).
    st = wait_state(srv, lambda s: all(s["enabled"]), 30, "QEMU to enable both rings")
    assert st["protocol_features"] & ProtocolFeature.REPLY_ACK
    assert "BackendChannelSet" in st["events"]
    assert st["events"].count("VringFdSet") == 4  # call + err for rings 0 and 1
    assert st["error"] is None
    return st


def test_backend_draft_dialect_echo(no_leaks: Any, sock_dir: Path) -> None:
    """The 2014 draft dialect (text numbering): ECHO (id 1) comes back with the REPLY
    flag, GET_FEATURES is id 2 and offers only bits of 2014 (no VERSION_1)."""
    import socket as so
    import struct

    from vhostuser.connection.backend import Dialect

    sock = str(sock_dir / "draft.sock")
    with ServerThread(sock, NullNetDevice, dialect=Dialect.DRAFT_TEXT):
        c = so.socket(so.AF_UNIX, so.SOCK_STREAM)
        try:
            c.settimeout(5)
            c.connect(sock)
            c.sendall(struct.pack("<III", 1, 1, 0))
            assert c.recv(12) == struct.pack("<III", 1, 5, 0)
            c.sendall(struct.pack("<III", 2, 1, 0))
            hdr = c.recv(12)
            assert struct.unpack("<III", hdr)[:2] == (2, 5)
            (features,) = struct.unpack("<Q", c.recv(8))
            assert not features & (VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES)
            assert features & VirtioFeature.RING_EVENT_IDX
        finally:
            c.close()


# ----------------------------------------------------------------------- our front-end


def _probe_json(sock: str) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=SRC)
    out = subprocess.run(
        [sys.executable, "-m", "vhostuser.cli.main", "probe", "--json", sock],
        capture_output=True, text=True, timeout=60, env=env, check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_frontend_with_dpdk_net_vhost(no_leaks: Any, sock_dir: Path, packed: bool) -> None:
    """Our front-end drives DPDK's net_vhost until its debug log shows every ring ready;
    `vhost-user probe` prints the feature words DPDK sends."""
    require_peer("testpmd")
    sock = str(sock_dir / "vhost.sock")
    with TestpmdVhost(sock, forward_mode="io") as be:
        be.wait_listening()
        r = _probe_json(sock)
        assert r["features"] == DPDK_VHOST_FEATURES
        assert r["protocol_features"] == DPDK_VHOST_PROTOCOL_FEATURES
        assert r["device"] == "net"
        assert r["queue_num"] == 128  # DPDK reports its maximum, not the configured count
        want = int(VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES
                   | VirtioFeature.RING_EVENT_IDX | VirtioFeature.RING_INDIRECT_DESC)
        if packed:
            want |= int(VirtioFeature.RING_PACKED)
        with FrontendClient.connect(sock) as fe, GuestRam.memfd(32 << 20) as ram:
            n = fe.negotiate(features=want)
            assert n.features == want
            fe.set_memory(ram)
            layout = packed_layout if packed else split_layout
            for q in range(2):
                d, a, u, _end = layout(256, 0x100000 + q * 0x10000)
                fe.setup_vring(q, 256, desc=d, avail=a, used=u)
            assert fe.driver_ok()
            be.wait_ready(timeout=20)
            assert be.negotiated_features() == want
            assert be.negotiated_protocol_features() == n.protocol_features
            for q in range(2):
                fe.stop_vring(q)
    assert be.messages().count("SET_VRING_KICK") == 2


def test_frontend_with_qemu_storage_daemon(no_leaks: Any, sock_dir: Path) -> None:
    """Our front-end drives qemu-storage-daemon's vhost-user-blk export, using ADD_MEM_REG
    since it offers CONFIGURE_MEM_SLOTS; probe reports its words and the capacity equals
    the image size."""
    require_peer("qemu-storage-daemon")
    image = make_raw_image(sock_dir / "disk.raw", 48 << 20)
    sock = str(sock_dir / "blk.sock")
    with QemuStorageDaemon(sock, image) as qsd:
        qsd.wait_ready()
        r = _probe_json(sock)
        assert r["features"] == QSD_BLK_FEATURES
        assert r["protocol_features"] == QSD_BLK_PROTOCOL_FEATURES
        assert r["device"] == "blk"
        assert r["config"]["capacity_bytes"] == 48 << 20
        assert r["max_mem_slots"] >= 8
        with FrontendClient.connect(sock) as fe, GuestRam.memfd(16 << 20) as ram:
            fe.negotiate()
            assert fe.conn.has(ProtocolFeature.CONFIGURE_MEM_SLOTS)
            fe.set_memory(ram)
            assert FrontendRequest.ADD_MEM_REG in fe.sent
            assert FrontendRequest.SET_MEM_TABLE not in fe.sent
            d, a, u, _end = split_layout(128, 0x10000)
            fe.setup_vring(0, 128, desc=d, avail=a, used=u)
            assert fe.driver_ok() is False  # qsd does not offer STATUS
            assert fe.stop_vring(0) == 0
        assert qsd.running()


def test_frontend_sees_backend_channel_config_change(no_leaks: Any, sock_dir: Path) -> None:
    """Our back-end's BACKEND_CONFIG_CHANGE_MSG reaches our front-end over the
    SET_BACKEND_REQ_FD channel and is acked."""
    sock = str(sock_dir / "chan.sock")
    with ServerThread(sock, NullNetDevice) as srv, FrontendClient.connect(sock) as fe:
        fe.negotiate()
        assert fe.conn.has(ProtocolFeature.BACKEND_REQ)
        assert srv.call(lambda: srv.sessions_seen[-1].notify_config_change())
        got: list[ev.Event] = []

        def poll() -> list[ev.Event]:
            got.extend(fe.poll_backend_channel())
            return got

        wait_until(poll, 10, "CONFIG_CHANGE_MSG on the channel")
        assert isinstance(got[0], ev.ConfigChanged)
