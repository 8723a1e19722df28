"""Self-checks of the interop harness (peers.py): real peers against each other.

These pin down the log strings the harness relies on (DPDK 22.11.11, QEMU 7.2.22 on
Debian 12) before any test of our own code relies on them.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import struct
import sys
from pathlib import Path

import pytest

from . import peers
from .peers import (
    PeerError,
    PeerExited,
    PeerTimeout,
    QemuStorageDaemon,
    QemuVhostUserNet,
    TestpmdVhost,
    TestpmdVirtioUser,
    make_raw_image,
    require_peer,
)

VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_F_RING_PACKED = 1 << 34
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30

# What QEMU 7.2 sends to a net back-end when no guest driver ever starts the device
# (realize-time vhost_dev_init for one queue pair, then the link comes up with both
# rings enabled). No memory table, no ring addresses.
QEMU_NET_NO_GUEST = [
    "GET_FEATURES",
    "GET_PROTOCOL_FEATURES",
    "SET_PROTOCOL_FEATURES",
    "GET_QUEUE_NUM",
    "SET_SLAVE_REQ_FD",
    "SET_OWNER",
    "GET_FEATURES",
    "SET_VRING_CALL",
    "SET_VRING_ERR",
    "SET_VRING_CALL",
    "SET_VRING_ERR",
    "SET_VRING_ENABLE",
    "SET_VRING_ENABLE",
]


# --------------------------------------------------------------------------- no peers needed


class _ShellPeer(peers.Peer):
    name = "sh"

    def __init__(self, script: str) -> None:
        super().__init__()
        self.script = script

    def argv(self) -> list[str]:
        return ["/bin/sh", "-c", self.script]


def test_peer_lifecycle_cleans_up(no_leaks: object) -> None:
    with _ShellPeer("echo started; exec sleep 60") as p:
        p.wait_for(r"^started$", timeout=5)
        workdir = p.workdir
        assert workdir is not None and workdir.is_dir()
        proc = p.proc
    assert proc is not None and proc.returncode is not None  # reaped
    assert p.returncode == -15  # SIGTERM
    assert not workdir.exists()
    assert "started" in p.log_text()  # still readable after the directory is gone


def test_wait_for_reports_exit_with_log(capsys: pytest.CaptureFixture[str]) -> None:
    with _ShellPeer("echo some diagnostics; exit 3") as p, pytest.raises(PeerExited) as info:
        p.wait_for("never printed", timeout=5)
    assert "exited with 3" in str(info.value)
    assert "some diagnostics" in str(info.value)
    assert "some diagnostics" in capsys.readouterr().err


def test_wait_for_timeout_and_since() -> None:
    with _ShellPeer("echo one; exec sleep 60") as p:
        p.wait_for("one", timeout=5)
        with pytest.raises(PeerTimeout):
            p.wait_for("one", timeout=0.3, since=p.mark())


def test_stubborn_peer_is_killed() -> None:
    class Stubborn(_ShellPeer):
        stop_timeout = 0.5

    with Stubborn("trap '' TERM; echo ready; while :; do sleep 0.1; done") as p:
        p.wait_for("ready", timeout=5)
    assert p.returncode == -9


def test_peer_available_names_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown peer"):
        peers.peer_available("no-such-peer")
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    message = peers.peer_available("qsd")
    assert message is not None
    assert "scripts/install-peers.sh" in message
    assert "apt-get install" in message and "qemu-system-common" in message


def test_require_peer_fails_in_ci_and_skips_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="install-peers"):
        require_peer("testpmd")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="install-peers"):
        require_peer("testpmd")


# --------------------------------------------------------------------------- DPDK <-> DPDK


@pytest.mark.interop
@pytest.mark.parametrize(
    ("packed", "frontend_server"),
    [(False, False), (True, False), (False, True), (True, True)],
    ids=["split-vhost-server", "packed-vhost-server", "split-vhost-client", "packed-vhost-client"],
)
def test_virtio_user_to_vhost_passes_packets(
    no_leaks: object, sock_dir: Path, packed: bool, frontend_server: bool
) -> None:
    require_peer("testpmd")
    sock = sock_dir / "net.sock"
    backend = TestpmdVhost(sock, client=frontend_server, forward_mode="rxonly")
    frontend = TestpmdVirtioUser(sock, server=frontend_server, packed=packed, forward_mode="txonly")
    # The listening side goes first. A virtio-user server blocks in its probe until the
    # back-end connects; a virtio-user client fails its probe if nobody listens yet.
    first, second = (frontend, backend) if frontend_server else (backend, frontend)
    with first:
        if first is backend:
            backend.wait_listening()
        else:
            frontend.wait_for(r"waiting for client connection", timeout=15)
        with second:
            backend.wait_ready(timeout=20)
            frontend.wait_link_up(timeout=20)
            assert backend.link_up()
            rx = backend.wait_stats(lambda s: s.rx_packets > 0, timeout=10)
            assert rx.rx_packets > 0
            tx = frontend.wait_stats(lambda s: s.tx_packets > 0, timeout=10)
            assert tx.tx_packets > 0

            msgs = backend.messages()
            for needed in (
                "GET_FEATURES",
                "SET_FEATURES",
                "SET_MEM_TABLE",
                "SET_VRING_NUM",
                "SET_VRING_ADDR",
                "SET_VRING_KICK",
                "SET_VRING_ENABLE",
            ):
                assert needed in msgs, (needed, msgs)
            assert msgs.index("SET_MEM_TABLE") < msgs.index("SET_VRING_KICK")
            features = backend.negotiated_features()
            assert features is not None
            assert features & VIRTIO_F_VERSION_1
            assert bool(features & VIRTIO_F_RING_PACKED) == packed
            assert backend.negotiated_protocol_features() is not None
            assert backend.ring_enabled() == {0: True, 1: True}

        if first is backend:  # the front-end is gone: the back-end sees the device go down
            backend.wait_until(lambda: not backend.ready(), 10, "device down after close")
        frontend_prefix = frontend.file_prefix
    assert backend.returncode == 0 and frontend.returncode == 0
    assert not sock.exists()
    for p in (backend, frontend):
        assert p.workdir is not None and not p.workdir.exists()
    assert not peers._dpdk_runtime_dir(frontend_prefix).exists()
    assert not peers._dpdk_runtime_dir(backend.file_prefix).exists()


# --------------------------------------------------------------------------- QEMU -> DPDK


@pytest.mark.interop
def test_qemu_without_guest_handshakes_with_vhost(no_leaks: object, sock_dir: Path) -> None:
    require_peer("testpmd")
    require_peer("qemu")
    sock = sock_dir / "net.sock"
    with TestpmdVhost(sock) as backend:
        backend.wait_listening()
        with QemuVhostUserNet(sock) as qemu:
            backend.wait_for(r"(?s)(read message VHOST_USER_SET_VRING_ENABLE.*){2}", 20)
            assert qemu.qmp().execute("query-status")["status"] == "running"
            assert backend.messages() == QEMU_NET_NO_GUEST
            assert backend.ring_enabled() == {0: True, 1: True}
            assert backend.negotiated_features() is None  # no driver, no SET_FEATURES
            assert not backend.ready()
        assert qemu.returncode == 0  # QMP quit
        backend.wait_for(r"vhost peer closed", 10)
    assert not sock.exists()


@pytest.mark.interop
def test_qemu_listens_and_vhost_client_connects(sock_dir: Path) -> None:
    require_peer("testpmd")
    require_peer("qemu")
    sock = sock_dir / "net.sock"
    with QemuVhostUserNet(sock, server=True) as qemu:
        peers.wait_for_socket(sock, 15)
        with TestpmdVhost(sock, client=True) as backend:
            backend.wait_for(r"(?s)(read message VHOST_USER_SET_VRING_ENABLE.*){2}", 20)
            assert backend.messages() == QEMU_NET_NO_GUEST
            assert qemu.qmp().execute("query-status")["status"] == "running"
    assert qemu.returncode == 0
    assert not sock.exists()


# --------------------------------------------------------------------------- qsd


@pytest.mark.interop
def test_qsd_serves_vhost_user_blk(no_leaks: object, sock_dir: Path) -> None:
    require_peer("qemu-storage-daemon")
    image = make_raw_image(sock_dir / "disk.raw", 64 << 20)
    assert image.stat().st_size == 64 << 20
    sock = sock_dir / "blk.sock"
    with QemuStorageDaemon(sock, image) as qsd:
        qsd.wait_ready(timeout=10)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(os.fspath(sock))
            s.sendall(struct.pack("<III", 1, 0x1, 0))  # GET_FEATURES, version 1
            reply = _recv_exact(s, 12 + 8)
        request, flags, size = struct.unpack_from("<III", reply)
        (features,) = struct.unpack_from("<Q", reply, 12)
        assert (request, flags & 0x3, flags & 0x4, size) == (1, 0x1, 0x4, 8)
        assert features & VIRTIO_F_VERSION_1
        assert features & VHOST_USER_F_PROTOCOL_FEATURES
    assert qsd.returncode == 0
    assert not sock.exists()


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"peer closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


@pytest.mark.interop
def test_failed_virtio_user_probe_fails_fast(sock_dir: Path) -> None:
    require_peer("testpmd")
    # A virtio-user client with nobody listening keeps running with no port: catch it.
    with TestpmdVirtioUser(sock_dir / "absent.sock") as frontend:
        with pytest.raises(PeerError, match=re.escape("failed to initialize net_virtio_user0")):
            frontend.wait_link_up(timeout=20)
        assert frontend.running()
    print(f"frontend stopped with {frontend.returncode}", file=sys.stderr)
