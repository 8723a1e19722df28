"""Our front-end drives a migration of our own net back-end (the switch's echo port):
dirty logging audited against a shadow copy of guest memory, then the rings handed over
to a second connection (or re-based on the same one) at the index GET_VRING_BASE returned,
and traffic goes on exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vhostuser.connection import events as ev
from vhostuser.devices.blk import BlkDevice
from vhostuser.devices.net import EchoSink, VirtioNetDevice
from vhostuser.errors import LocalProtocolError, PeerClosedError
from vhostuser.frontends.blk import BlkOp, VirtioBlkFrontend
from vhostuser.frontends.net import VirtioNetFrontend
from vhostuser.io.blkfile import BlkFile
from vhostuser.io.dirtylog import FrontendDirtyLog
from vhostuser.io.frontend import FrontendClient
from vhostuser.io.thread import ServerThread
from vhostuser.protocol.enums import ProtocolFeature as PF
from vhostuser.switch import SwitchThread
from vhostuser.testing.migration import audit_blk_reads, audit_net_echo

from .test_net_switch import (
    MAC_A,
    MAC_B,
    frames_seq,
    port_info,
    receive_n,
    sock_dir,
    wait_until,
)

__all__ = ["sock_dir"]  # the fixture


def echo(path: str) -> SwitchThread:
    return SwitchThread(lambda sw: sw.add_echo_port(path))


@pytest.mark.parametrize("same", [False, True], ids=["new-connection", "same-connection"])
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_logged_echo_then_rings_move(no_leaks: Any, sock_dir: Path, packed: bool,
                                     same: bool) -> None:
    e = str(sock_dir / "e.sock")
    with echo(e) as st, VirtioNetFrontend.connect(e, packed=packed, reconnect=False) as nic:
        first = frames_seq(40, 300, MAC_A, MAC_B)
        assert nic.send_all(first) == 40 and receive_n(nic, 40) == first
        with nic.start_logging() as log:
            assert nic.client.logging and all(v.logged for v in nic.client.vrings.values())
            audit, back = audit_net_echo(nic, log, frames_seq(64, 1000, MAC_A, MAC_B, 0x77))
            assert len(back) == 64
            assert not audit.missing, audit.describe()
            # The echo wrote receive buffers and ring state: both were seen and marked.
            assert audit.changed & audit.rx_pages and audit.changed & audit.ring_pages
            queued = frames_seq(10, 200, MAC_A, MAC_B, 0x99)
            bases = nic.migrate(None if same else (lambda: FrontendClient.connect(e)))
            assert set(bases) == {0, 1}
            if not packed:
                # Every buffer offered was taken: the index is the driver's avail index.
                assert bases[1] == 40 + 64
            assert nic.client.logging is same  # a new connection starts without a log
            if same:
                nic.stop_logging()
            log.take()
        assert not nic.client.logging
        assert nic.send_all(queued) == 10 and receive_n(nic, 10) == queued
        more = frames_seq(300, 500, MAC_A, MAC_B, 0x55)
        got: list[bytes] = []
        for i in range(0, 300, 100):
            assert nic.send_all(more[i : i + 100]) == 100
            got += receive_n(nic, 100)
        assert got == more
        info = port_info(st, "echo")
        assert not st.errors, st.errors
    assert info["rx_frames"] == info["tx_frames"] == 40 + 64 + 10 + 300


def test_logging_needs_what_it_needs(no_leaks: Any, sock_dir: Path) -> None:
    """A log too small for guest memory, and logging twice, are refused before anything
    is sent; stop_logging without logging too."""
    e = str(sock_dir / "e.sock")
    with echo(e), VirtioNetFrontend.connect(e, reconnect=False) as nic:
        assert nic.ram is not None
        with FrontendDirtyLog(nic.ram.size // 2) as small, \
                pytest.raises(LocalProtocolError, match="covers guest memory"):
            nic.start_logging(small)
        with pytest.raises(LocalProtocolError, match="not on"):
            nic.stop_logging()
        with nic.start_logging() as log:
            with pytest.raises(LocalProtocolError, match="already on"):
                nic.start_logging(log)
            nic.stop_logging()
            assert not nic.client.logging


def test_audit_catches_writes_missing_from_the_log(no_leaks: Any, sock_dir: Path) -> None:
    """The audit has teeth: with a log the back-end was never given, every page the echo
    wrote is reported missing."""
    e = str(sock_dir / "e.sock")
    with echo(e), VirtioNetFrontend.connect(e, reconnect=False) as nic:
        assert nic.ram is not None
        with FrontendDirtyLog(nic.ram.size) as unused:
            audit, back = audit_net_echo(nic, unused, frames_seq(16, 800, MAC_A, MAC_B))
        assert len(back) == 16
        assert audit.changed and audit.missing == audit.changed and not audit.marked


# -- blk: our back-end ---------------------------------------------------------------------------


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_blk_logged_reads_then_rings_move(no_leaks: Any, sock_dir: Path, packed: bool) -> None:
    """Our blk back-end logs the data it reads into guest memory, the status bytes and
    the used ring; the rings then move to a new connection at GET_VRING_BASE's index and
    requests go on."""
    size = 8 << 20
    img = sock_dir / "disk.raw"
    pattern = bytes(range(256)) * (size // 256)
    img.write_bytes(pattern)
    sock = str(sock_dir / "blk.sock")
    with BlkFile.open(str(img)) as image, \
            ServerThread(sock, lambda: BlkDevice(image)) as srv, \
            VirtioBlkFrontend(sock, packed=packed, reconnect=False) as disk:
        disk.write(0, b"\xa5" * 65536)
        with disk.start_logging() as log:
            ops = [BlkOp("read", offset=k * 131072, length=65536) for k in range(8)]
            audit = audit_blk_reads(disk, log, ops)
            assert all(op.ok for op in ops)
            assert ops[1].data == pattern[131072 : 131072 + 65536]
            assert not audit.missing, audit.describe()
            assert audit.changed & audit.rx_pages and audit.changed & audit.ring_pages
            bases = disk.migrate()
            if not packed:
                assert bases == {0: 1 + 8}
        assert disk.read(0, 65536) == b"\xa5" * 65536
        disk.write(65536, b"\x5a" * 4096)
        assert disk.read(65536, 4096) == b"\x5a" * 4096
        assert srv.errors == []


# -- in-band notifications and DEVICE_STATE, our front-end with our back-end ---------------------


def test_net_inband_echo_then_migrate(no_leaks: Any, sock_dir: Path) -> None:
    """A net session with in-band notifications (VRING_KICK in, BACKEND_VRING_CALL out,
    no kick or call eventfd on the wire), logged and moved to a new connection at
    GET_VRING_BASE's index, in-band again there."""
    e = str(sock_dir / "e.sock")
    with ServerThread(e, lambda: VirtioNetDevice(EchoSink()), inband_notifications=True) as srv, \
            VirtioNetFrontend.connect(e, inband=True, reconnect=False) as nic:
        assert nic.protocol_features & PF.INBAND_NOTIFICATIONS and nic.client.inband
        first = frames_seq(50, 300, MAC_A, MAC_B)
        assert nic.send_all(first) == 50 and receive_n(nic, 50) == first
        with nic.start_logging() as log:
            audit, back = audit_net_echo(nic, log, frames_seq(32, 900, MAC_A, MAC_B, 0x31))
            assert len(back) == 32 and not audit.missing, audit.describe()
            nic.migrate(lambda: FrontendClient.connect(e))
        assert nic.client.inband and nic.client.vring_calls == 0
        more = frames_seq(100, 400, MAC_A, MAC_B, 0x32)
        assert nic.send_all(more) == 100 and receive_n(nic, 100) == more
        nic.wait(0.3)  # runs the reactor: calls waiting on the channel are taken
        sessions = srv.call(lambda: list(srv.sessions_seen))
        kicks = srv.call(lambda: [sum(isinstance(x, ev.VringKicked) for x in s.events)
                                  for s in sessions])
        calls = srv.call(lambda: [s.inband_calls for s in sessions])
        fds = srv.call(lambda: [[v.call for v in s.conn.vrings[:2]] for s in sessions])
        assert len(sessions) == 2 and all(k > 0 for k in kicks) and all(c > 0 for c in calls)
        assert fds == [[None, None], [None, None]]
        # Every call the second session sent reaches the client's ring eventfds.
        def all_taken() -> bool:
            nic.wait(0.05)
            return nic.client.vring_calls == srv.call(lambda: sessions[1].inband_calls)

        wait_until(all_taken, 10, "the client to take every in-band call")
        assert srv.errors == []


def test_blk_migration_moves_the_back_end_state(no_leaks: Any, sock_dir: Path) -> None:
    """Source and destination are two back-ends on one image: the rings stop on the
    source, its state goes through a pipe into the destination (CHECK_DEVICE_STATE on
    both), the rings resume there at GET_VRING_BASE's index and I/O goes on."""
    size = 8 << 20
    img = sock_dir / "disk.raw"
    img.write_bytes(bytes(size))
    a, b = str(sock_dir / "a.sock"), str(sock_dir / "b.sock")
    with BlkFile.open(str(img)) as image, \
            ServerThread(a, lambda: BlkDevice(image)) as src, \
            ServerThread(b, lambda: BlkDevice(image)) as dst, \
            VirtioBlkFrontend(a, reconnect=False, inflight=False) as disk:
        assert disk.protocol_features & PF.DEVICE_STATE
        disk.write(0, b"\x11" * 8192)
        bases = disk.migrate(b, state=True)
        assert bases == {0: 1}
        assert disk.path == b and disk.read(0, 8192) == b"\x11" * 8192
        disk.write(8192, b"\x22" * 4096)
        assert disk.read(8192, 4096) == b"\x22" * 4096
        checked = dst.call(lambda: [e for s in dst.sessions_seen for e in s.events
                                    if isinstance(e, ev.DeviceStateChecked)])
        assert checked and all(c.error is None for c in checked), checked
        assert src.errors == [] and dst.errors == []


def test_inband_kick_to_a_back_end_gone_is_an_outage(no_leaks: Any, sock_dir: Path) -> None:
    """In-band, a kick is a message: when the back-end is gone, sending is where the
    front-end notices, as an outage (not an exception out of send)."""
    e = str(sock_dir / "e.sock")
    srv = ServerThread(e, lambda: VirtioNetDevice(EchoSink()), inband_notifications=True)
    srv.start()
    try:
        with VirtioNetFrontend.connect(e, inband=True, reconnect=False) as nic:
            fr = frames_seq(8, 100, MAC_A, MAC_B)
            assert nic.send_all(fr) == 8 and receive_n(nic, 8) == fr
            srv.stop()
            for _ in range(50):  # the first sends may still fit the socket buffer
                nic.send(fr[:1])
                if not nic.connected:
                    break
            assert not nic.connected and nic.last_disconnect_reason
            with pytest.raises(PeerClosedError):
                nic.wait(0.1)
    finally:
        srv.stop()
