"""The back-end's in-band notifications and DEVICE_STATE through real sockets and pipes
(the back-ends on reactor threads, ``ServerThread``).

DEVICE_STATE: a blk device's state saved from one back-end session into a pipe and loaded
into another, then checked; a destination that differs is reported by
CHECK_DEVICE_STATE (naming the field) and its session goes on; a front-end that never
reads a save, or writes too much on a load, stalls nothing else. In-band: our blk
front-end with ``inband=True`` against our blk back-end, every kick a VRING_KICK and every
completion a BACKEND_VRING_CALL.
"""

from __future__ import annotations

import os
import select
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vhostuser.connection import events as ev
from vhostuser.connection.backend import STATE_REPLY_NOFD
from vhostuser.devices.base import Device
from vhostuser.devices.blk import BlkDevice, MemoryBackend
from vhostuser.errors import RemoteProtocolError
from vhostuser.frontends import VirtioBlkFrontend
from vhostuser.io.backend import BackendSession
from vhostuser.io.frontend import (
    FrontendClient,
    load_device_state,
    save_device_state,
    transfer_device_state,
)
from vhostuser.io.thread import ServerThread
from vhostuser.protocol import payloads as P
from vhostuser.protocol.enums import FrontendRequest, ProtocolFeature

R = FrontendRequest
PF = ProtocolFeature
MiB = 1 << 20


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short directory under /tmp (AF_UNIX paths must fit 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="vhu-st-", dir="/tmp"))
    try:
        yield d
    finally:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


def serve_blk(path: str, size: int = MiB, **kw: Any) -> ServerThread:
    return ServerThread(path, lambda: BlkDevice(MemoryBackend(size), serial="disk-1", **kw))


def session_of(srv: ServerThread) -> BackendSession:
    s = srv.call(lambda: srv.sessions_seen[-1])
    assert isinstance(s, BackendSession)
    return s


def checked(srv: ServerThread) -> list[ev.DeviceStateChecked]:
    s = session_of(srv)
    return srv.call(lambda: [e for e in s.events if isinstance(e, ev.DeviceStateChecked)])


def test_blk_state_moves_between_two_back_ends(no_leaks: Any, workdir: Path) -> None:
    a, b = str(workdir / "a.sock"), str(workdir / "b.sock")
    with serve_blk(a) as src, serve_blk(b) as dst, FrontendClient.connect(a) as fa, \
            FrontendClient.connect(b) as fb:
        assert fa.negotiate().protocol_features & PF.DEVICE_STATE
        fb.negotiate()
        dev_a = src.call(lambda: src.devices[-1])
        assert isinstance(dev_a, BlkDevice)
        src.call(lambda: dev_a.stats.update({"in ok": 7, "out ok": 2}))
        size = transfer_device_state(fa, fb)
        assert 100 < size < 4096
        dev_b = dst.call(lambda: dst.devices[-1])
        assert isinstance(dev_b, BlkDevice)
        assert dst.call(lambda: dict(dev_b.stats)) == {"in ok": 7, "out ok": 2}
        assert checked(src) == [ev.DeviceStateChecked(0, True, None)]
        assert checked(dst) == [ev.DeviceStateChecked(1, True, None)]
        assert src.errors == [] and dst.errors == []


@pytest.mark.parametrize(("kw", "field"), [
    ({"size": 2 * MiB}, "capacity_sectors"),
    ({"read_only": True}, "read_only"),
])
def test_a_destination_that_differs_is_reported(no_leaks: Any, workdir: Path,
                                                kw: dict[str, Any], field: str) -> None:
    a, b = str(workdir / "a.sock"), str(workdir / "b.sock")
    with serve_blk(a) as src, serve_blk(b, **kw) as dst, FrontendClient.connect(a) as fa, \
            FrontendClient.connect(b) as fb:
        fa.negotiate()
        fb.negotiate()
        state = save_device_state(fa)
        with pytest.raises(RemoteProtocolError, match="CHECK_DEVICE_STATE after loading"):
            load_device_state(fb, state)
        (done,) = checked(dst)
        assert not done.ok and done.error is not None and field in done.error
        # The session goes on: a failed load is an answer, not a broken connection.
        assert fb.get_u64(R.GET_FEATURES)
        assert not session_of(dst).closed
        assert src.errors == []


def test_raw_save_through_a_pipe(no_leaks: Any, workdir: Path) -> None:
    """The wire without the client's helpers: reply NOFD (we use the front-end's pipe),
    the state until EOF, CHECK_DEVICE_STATE 0."""
    a = str(workdir / "a.sock")
    with serve_blk(a), FrontendClient.connect(a) as fa:
        fa.negotiate()
        r, w = os.pipe()
        try:
            reply = fa.send(R.SET_DEVICE_STATE_FD, P.DeviceStateParams(direction=0, phase=0),
                            [w])
            os.close(w)
            assert reply is not None and reply.fds == ()
            assert P.U64.unpack(reply.payload)[0] == STATE_REPLY_NOFD
            data = b""
            while chunk := os.read(r, 65536):
                data += chunk
        finally:
            os.close(r)
        assert data.startswith(b"{") and b'"capacity_sectors":2048' in data
        assert fa.get_u64(R.CHECK_DEVICE_STATE) == 0


class BigState(Device):
    """A device whose state is larger than a pipe holds, and that loads at most 1000 bytes."""

    num_queues = 1
    max_state_size = 1000

    def save_state(self) -> bytes:
        return bytes(4 * MiB)

    def load_state(self, data: bytes) -> None:
        pass


def test_a_save_nobody_reads_stalls_nothing_else(no_leaks: Any, workdir: Path) -> None:
    a = str(workdir / "a.sock")
    with ServerThread(a, BigState) as srv, FrontendClient.connect(a) as f1, \
            FrontendClient.connect(a) as f2:
        f1.negotiate()
        r, w = os.pipe()
        try:
            f1.send(R.SET_DEVICE_STATE_FD, P.DeviceStateParams(direction=0, phase=0), [w])
            os.close(w)
            # Nobody reads r: the back-end's writes would block. Another session is served.
            f2.negotiate()
            assert f2.get_u64(R.GET_FEATURES)
            # CHECK before reading it all: failure, and the back-end closes its end.
            assert f1.get_u64(R.CHECK_DEVICE_STATE) != 0
            got = 0
            while True:
                assert select.select([r], [], [], 5)[0], "no end of file from the back-end"
                chunk = os.read(r, MiB)
                if not chunk:
                    break
                got += len(chunk)
            assert 0 < got < 4 * MiB
        finally:
            os.close(r)
        (done,) = srv.call(lambda: [e for e in srv.sessions_seen[0].events
                                    if isinstance(e, ev.DeviceStateChecked)])
        assert not done.ok and "of 4194304 state bytes" in (done.error or "")
        assert srv.errors == []


def test_a_load_too_large_fails_without_growing(no_leaks: Any, workdir: Path) -> None:
    a = str(workdir / "a.sock")
    with ServerThread(a, BigState) as srv, FrontendClient.connect(a) as f1:
        f1.negotiate()
        r, w = os.pipe()
        try:
            f1.send(R.SET_DEVICE_STATE_FD, P.DeviceStateParams(direction=1, phase=0), [r])
            os.close(r)
            os.set_blocking(w, False)
            sent, deadline = 0, time.monotonic() + 10
            while sent < 4 * MiB and time.monotonic() < deadline:
                select.select([], [w], [], 1)
                try:
                    sent += os.write(w, bytes(65536))
                except BlockingIOError:
                    continue
                except BrokenPipeError:
                    break  # the back-end gave up past its limit and closed its end
        finally:
            os.close(w)
        assert sent < 4 * MiB, "the back-end kept reading past its limit"
        assert f1.get_u64(R.CHECK_DEVICE_STATE) != 0
        (done,) = srv.call(lambda: [e for e in srv.sessions_seen[0].events
                                    if isinstance(e, ev.DeviceStateChecked)])
        assert "1000 bytes" in (done.error or "")
        assert f1.get_u64(R.GET_FEATURES)  # the session goes on
        assert srv.errors == []


# -- in-band notifications ---------------------------------------------------------------


def test_inband_blk_io(no_leaks: Any, workdir: Path) -> None:
    sock = str(workdir / "blk.sock")
    with ServerThread(sock, lambda: BlkDevice(MemoryBackend(4 * MiB)),
                      inband_notifications=True) as srv, \
            VirtioBlkFrontend(sock, inband=True, reconnect=False) as disk:
        assert disk.protocol_features & PF.INBAND_NOTIFICATIONS
        data = os.urandom(256 * 1024)
        disk.write(4096, data)
        disk.flush()
        assert disk.read(4096, len(data)) == data
        s = session_of(srv)
        calls, drops, fds = srv.call(lambda: (s.inband_calls, s.channel_drops,
                                              [v.call for v in s.conn.vrings]))
        assert calls > 0 and drops == 0 and fds == [None]
        kicks = srv.call(lambda: sum(isinstance(e, ev.VringKicked) for e in s.events))
        assert kicks > 0
        assert srv.errors == []


def test_inband_is_not_offered_unless_asked(no_leaks: Any, workdir: Path) -> None:
    sock = str(workdir / "blk.sock")
    with serve_blk(sock), FrontendClient.connect(sock) as fe, \
            pytest.raises(RemoteProtocolError, match="in-band"):
        fe.negotiate(inband=True)


# -- the back-end channel never blocks the reactor -------------------------------------------


def _config_changes(fe: FrontendClient) -> int:
    return sum(isinstance(e, ev.ConfigChanged) for e in fe.channel_events)


def test_a_channel_nobody_reads_bounds_what_waits(no_leaks: Any, workdir: Path) -> None:
    """REPLY_ACK negotiated: 32 requests go out unacked, 64 more wait, the rest are dropped
    and counted; the reactor answers meanwhile. Once the front-end reads (and acks) the
    channel, everything that waited goes out."""
    from vhostuser.io.backend import CHANNEL_QUEUE, CHANNEL_UNACKED

    sock = str(workdir / "blk.sock")
    with serve_blk(sock) as srv, FrontendClient.connect(sock) as fe:
        fe.negotiate()
        assert fe.conn.has(PF.REPLY_ACK) and fe.channel_fd is not None
        s = session_of(srv)
        sent = srv.call(lambda: [s.notify_config_change() for _ in range(200)])
        assert sent.count(True) == CHANNEL_UNACKED + CHANNEL_QUEUE
        assert srv.call(lambda: s.channel_drops) == 200 - CHANNEL_UNACKED - CHANNEL_QUEUE
        assert fe.get_u64(R.GET_FEATURES)  # the reactor was never blocked
        deadline = time.monotonic() + 10
        while (_config_changes(fe) < CHANNEL_UNACKED + CHANNEL_QUEUE
               and time.monotonic() < deadline):
            select.select([fe.channel_fd], [], [], 0.5)
            fe.poll_backend_channel()
        assert _config_changes(fe) == CHANNEL_UNACKED + CHANNEL_QUEUE
        assert srv.errors == []


def test_a_full_channel_without_acks_never_blocks(no_leaks: Any, workdir: Path) -> None:
    """Without REPLY_ACK nothing paces the sender but the socket buffer: when it is full,
    64 requests wait and the rest are dropped; the reactor answers meanwhile."""
    from vhostuser.io.backend import CHANNEL_QUEUE
    from vhostuser.io.frontend import SUPPORTED_PROTOCOL_FEATURES

    sock = str(workdir / "blk.sock")
    with serve_blk(sock) as srv, FrontendClient.connect(sock) as fe:
        fe.negotiate(protocol_features=int(SUPPORTED_PROTOCOL_FEATURES) & ~int(PF.REPLY_ACK))
        assert not fe.conn.has(PF.REPLY_ACK) and fe.channel_fd is not None
        s = session_of(srv)
        n = 200_000  # 12 bytes each: far more than an AF_UNIX socket buffer holds
        sent = srv.call(lambda: sum(s.notify_config_change() for _ in range(n)))
        drops = srv.call(lambda: s.channel_drops)
        assert drops > 0 and sent + drops == n
        assert fe.get_u64(R.GET_FEATURES)
        deadline = time.monotonic() + 20
        while _config_changes(fe) < sent and time.monotonic() < deadline:
            select.select([fe.channel_fd], [], [], 0.5)
            fe.poll_backend_channel()
        assert _config_changes(fe) == sent
        assert sent >= CHANNEL_QUEUE
        assert srv.errors == []


class NullDevice(Device):
    """Consumes every chain of its one queue."""

    num_queues = 1


def test_inband_error_of_a_broken_ring(no_leaks: Any, workdir: Path) -> None:
    """A ring the guest breaks (an avail entry naming descriptor 999 of 64) is reported
    as BACKEND_VRING_ERR when the ring has no err fd and notifications are in-band."""
    import struct

    from vhostuser.io.guestram import GuestRam

    sock = str(workdir / "null.sock")
    with ServerThread(sock, NullDevice, inband_notifications=True) as srv, \
            GuestRam.memfd(MiB) as ram, FrontendClient.connect(sock) as fe:
        from vhostuser.protocol.enums import VirtioFeature as VF

        fe.negotiate(inband=True, features=int(VF.VERSION_1 | VF.PROTOCOL_FEATURES))  # split
        fe.set_memory(ram)
        fe.setup_vring(0, 64, desc=0x1000, avail=0x1400, used=0x2000)
        struct.pack_into("<HHH", ram.buf, 0x1400, 0, 1, 999)  # flags, idx 1, ring[0] 999
        fe.kick(0)
        chan = fe.channel_fd
        assert chan is not None
        deadline = time.monotonic() + 10
        while (not any(isinstance(e, ev.VringErrored) for e in fe.channel_events)
               and time.monotonic() < deadline):
            select.select([chan], [], [], 0.5)
            fe.poll_backend_channel()
        assert ev.VringErrored(0) in fe.channel_events
        s = session_of(srv)
        assert srv.call(lambda: s.conn.vrings[0].broken) is not None
        assert srv.errors == []


def test_inband_calls_coalesce_and_stop_with_the_ring(no_leaks: Any, workdir: Path) -> None:
    """While the ack window is full, many calls of one ring wait as one; a ring that stops
    (GET_VRING_BASE) takes its waiting call with it, and a stopped ring sends none
    (vhost-user.rst "Suspended device state")."""
    from vhostuser.io.backend import CHANNEL_UNACKED
    from vhostuser.io.guestram import GuestRam
    from vhostuser.protocol.enums import VirtioFeature as VF

    sock = str(workdir / "null.sock")
    with ServerThread(sock, NullDevice, inband_notifications=True) as srv, \
            GuestRam.memfd(MiB) as ram, FrontendClient.connect(sock) as fe:
        fe.negotiate(inband=True, features=int(VF.VERSION_1 | VF.PROTOCOL_FEATURES))
        fe.set_memory(ram)
        fe.setup_vring(0, 64, desc=0x1000, avail=0x1400, used=0x2000)
        fe.kick(0)
        fe.get_u64(R.GET_FEATURES)  # the kick was handled: ring 0 runs
        s = session_of(srv)

        def window_full_then_notify() -> tuple[int, int, int]:
            s._chan_unacked = CHANNEL_UNACKED  # as if 32 calls were still unacked
            for _ in range(50):
                s.notify(0)
            return s.inband_calls, len(s._chan_queue), s.channel_drops

        assert srv.call(window_full_then_notify) == (0, 1, 0)  # 50 calls wait as one
        assert fe.stop_vring(0) == 0
        assert srv.call(lambda: (s.inband_calls, len(s._chan_queue), s.channel_drops)) \
            == (0, 0, 1)

        def notify_stopped() -> tuple[int, int]:
            s._chan_unacked = 0
            s.notify(0)
            return s.inband_calls, len(s._chan_queue)

        assert srv.call(notify_stopped) == (0, 0)
        assert not any(isinstance(e, ev.VringCalled) for e in fe.channel_events)
        assert srv.errors == []
