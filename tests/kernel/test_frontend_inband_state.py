"""FrontendClient's side of dirty logging, in-band notifications and DEVICE_STATE, against
a scripted back-end over a real socket pair: every request it sends is recorded (id,
flags, payload, fds) and answered as the script says, so the exact wire is checked
(vhost-user.rst: SET_LOG_BASE, VHOST_VRING_F_LOG, VRING_KICK, BACKEND_VRING_CALL,
SET_DEVICE_STATE_FD, CHECK_DEVICE_STATE).
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from vhostuser.connection import events as ev
from vhostuser.errors import LocalProtocolError, RemoteProtocolError
from vhostuser.io.dirtylog import FrontendDirtyLog
from vhostuser.io.frontend import (
    STATE_LOAD,
    STATE_SAVE,
    FrontendClient,
    load_device_state,
    migrate_rings,
    save_device_state,
    transfer_device_state,
)
from vhostuser.io.guestram import GuestRam
from vhostuser.protocol.enums import (
    BackendRequest,
    FrontendRequest,
    ProtocolFeature,
    VirtioFeature,
)

R = FrontendRequest
PF = ProtocolFeature
VF = VirtioFeature
HDR = struct.Struct("<III")
U64 = struct.Struct("<Q")

FEATURES = int(VF.PROTOCOL_FEATURES | VF.VERSION_1 | VF.LOG_ALL)
PROTOCOL = int(PF.REPLY_ACK | PF.BACKEND_REQ | PF.LOG_SHMFD | PF.INBAND_NOTIFICATIONS
               | PF.DEVICE_STATE)


@dataclass
class Seen:
    request: int
    flags: int
    payload: bytes
    nfds: int

    @property
    def u64(self) -> int:
        return int(U64.unpack_from(self.payload)[0])


Handler = Callable[["Scripted", Seen, list[int]], tuple[bytes, list[int]] | None]


@dataclass
class Scripted:
    """A back-end that answers GET_(PROTOCOL_)FEATURES with ``features``/``protocol``,
    acks NEED_REPLY with 0, and runs ``handlers[request]`` where one is given (its result
    is the reply payload and fds; None: the default). Keeps the back-end channel socket
    it is given (SET_BACKEND_REQ_FD)."""

    features: int = FEATURES
    protocol: int = PROTOCOL
    handlers: dict[int, Handler] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    channel: socket.socket | None = None
    errors: list[BaseException] = field(default_factory=list)

    def start(self) -> FrontendClient:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock = theirs
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return FrontendClient(ours, timeout=5.0, name="scripted")

    def _recv_exact(self, n: int, fds: list[int]) -> bytes | None:
        buf = b""
        while len(buf) < n:
            data, got, _flags, _addr = socket.recv_fds(self.sock, n - len(buf), 8)
            fds.extend(got)
            if not data:
                return None
            buf += data
        return buf

    def _run(self) -> None:
        try:
            while True:
                fds: list[int] = []
                head = self._recv_exact(12, fds)
                if head is None:
                    return
                request, flags, size = HDR.unpack(head)
                payload = self._recv_exact(size, fds) if size else b""
                assert payload is not None
                seen = Seen(request, flags, payload, len(fds))
                self.seen.append(seen)
                self._answer(seen, fds)
        except BaseException as e:  # reported by the test through .errors
            self.errors.append(e)
        finally:
            self.sock.close()

    def _answer(self, seen: Seen, fds: list[int]) -> None:
        r = seen.request
        out: tuple[bytes, list[int]] | None = None
        if r in self.handlers:
            out = self.handlers[r](self, seen, fds)
        elif r == R.SET_BACKEND_REQ_FD:
            self.channel = socket.socket(fileno=fds.pop())
        for fd in fds:
            os.close(fd)
        if out is None:
            if r == R.GET_FEATURES:
                out = (U64.pack(self.features), [])
            elif r == R.GET_PROTOCOL_FEATURES:
                out = (U64.pack(self.protocol), [])
            elif r == R.SET_LOG_BASE:  # LOG_SHMFD: answered with a u64
                out = (U64.pack(0), [])
            elif r == R.GET_VRING_BASE:
                out = (seen.payload[:4] + U64.pack(7)[:4], [])
            elif seen.flags & 0x8:
                out = (U64.pack(0), [])
        if out is not None:
            payload, rfds = out
            socket.send_fds(self.sock, [HDR.pack(r, 0x5, len(payload)) + payload], rfds)
            for fd in rfds:
                os.close(fd)

    def requests(self) -> list[int]:
        return [s.request for s in self.seen]

    def close(self) -> None:
        self.thread.join(5)
        if self.channel is not None:
            self.channel.close()
        assert not self.errors, self.errors


def ring(fe: FrontendClient, index: int = 0) -> None:
    fe.setup_vring(index, 64, desc=0x1000, avail=0x1400, used=0x2000)


# -- dirty logging ------------------------------------------------------------------------------


def test_start_and_stop_logging_on_the_wire(no_leaks: Any) -> None:
    be = Scripted()
    fe = be.start()
    with GuestRam.memfd(4 << 20) as ram, FrontendDirtyLog(ram.size) as log, fe:
        fe.negotiate()
        fe.set_memory(ram)
        ring(fe, 0)
        ring(fe, 1)
        mark = len(be.seen)
        fe.start_logging(log)
        got = be.seen[mark:]
        assert [s.request for s in got] == [R.SET_LOG_BASE, R.SET_FEATURES,
                                            R.SET_VRING_ADDR, R.SET_VRING_ADDR]
        base = got[0]
        # 4 MiB of guest: 16 chunks of 256 KiB, one u64 each (QEMU vhost_get_log_size).
        assert log.size == 128 and base.payload == struct.pack("<QQ", 128, 0)
        assert base.nfds == 1 and base.flags == 0x1  # its reply is its own (LOG_SHMFD)
        assert got[1].u64 & VF.LOG_ALL and got[1].flags == 0x9
        for s in got[2:]:
            _i, flags, _d, _u, _a, log_addr = struct.unpack("<IIQQQQ", s.payload)
            assert flags == 1 and log_addr == 0x2000 and s.flags == 0x9
        assert fe.logging and fe.dirty_log is log
        # A ring set up while logging is on is logged from the start.
        ring(fe, 2)
        addr = [s for s in be.seen if s.request == R.SET_VRING_ADDR][-1]
        assert struct.unpack("<IIQQQQ", addr.payload)[1] == 1
        mark = len(be.seen)
        fe.stop_logging()
        fe.get_u64(R.GET_FEATURES)  # unlogged SET_VRING_ADDR has no ack (as QEMU's)
        got = be.seen[mark:-1]
        assert [s.request for s in got] == [R.SET_FEATURES] + [R.SET_VRING_ADDR] * 3
        assert not got[0].u64 & VF.LOG_ALL
        assert all(struct.unpack("<IIQQQQ", s.payload)[1] == 0 for s in got[1:])
        with pytest.raises(LocalProtocolError, match="not on"):
            fe.stop_logging()
    be.close()


def test_logging_is_refused_without_log_all_or_log_shmfd(no_leaks: Any) -> None:
    for features, protocol, match in [
        (FEATURES & ~int(VF.LOG_ALL), PROTOCOL, "without VHOST_F_LOG_ALL"),
        (FEATURES, PROTOCOL & ~int(PF.LOG_SHMFD), "LOG_SHMFD was not negotiated"),
    ]:
        be = Scripted(features=features, protocol=protocol)
        fe = be.start()
        with GuestRam.memfd(1 << 20) as ram, FrontendDirtyLog(ram.size) as log, fe:
            fe.negotiate()
            with pytest.raises(LocalProtocolError, match="share guest memory"):
                fe.start_logging(log)
            fe.set_memory(ram)
            n = len(be.seen)
            with pytest.raises(LocalProtocolError, match=match):
                fe.start_logging(log)
            assert len(be.seen) == n  # nothing sent
        be.close()


def test_log_base_reply_values_are_not_nacks(no_leaks: Any) -> None:
    """DPDK answers SET_LOG_BASE empty, libvhost-user with the request's mmap_size."""
    for answer in (b"", U64.pack(128)):

        def log_base(be: Scripted, m: Seen, fds: list[int], a: bytes = answer
                     ) -> tuple[bytes, list[int]]:
            return a, []

        be = Scripted(handlers={R.SET_LOG_BASE: log_base})
        fe = be.start()
        with GuestRam.memfd(4 << 20) as ram, FrontendDirtyLog(ram.size) as log, fe:
            fe.negotiate()
            fe.set_memory(ram)
            fe.start_logging(log)
            assert fe.log_base_reply == answer and fe.logging
        be.close()


def test_migrate_rings_hands_each_base_to_the_destination(no_leaks: Any) -> None:
    src, dst = Scripted(), Scripted()
    a, b = src.start(), dst.start()
    with GuestRam.memfd(1 << 20) as ram, a, b:
        for fe in (a, b):
            fe.negotiate()
            fe.set_memory(ram)
        ring(a, 0)
        ring(a, 1)
        with pytest.raises(LocalProtocolError, match="no rings"):
            migrate_rings(b, a)
        bases = migrate_rings(a, b)
        assert bases == {0: 7, 1: 7}
        assert src.requests()[-4:] == [R.SET_VRING_ENABLE, R.GET_VRING_BASE] * 2
        sets = [s for s in dst.seen if s.request == R.SET_VRING_BASE]
        assert [struct.unpack("<II", s.payload) for s in sets] == [(0, 7), (1, 7)]
        assert sorted(b.vrings) == [0, 1] and b.vrings[1].used == 0x2000
    src.close()
    dst.close()


# -- in-band notifications -----------------------------------------------------------------------


def test_inband_kick_and_call(no_leaks: Any) -> None:
    be = Scripted()
    fe = be.start()
    with GuestRam.memfd(1 << 20) as ram, fe:
        n = fe.negotiate(inband=True)
        assert n.protocol_features & PF.INBAND_NOTIFICATIONS and fe.inband
        fe.set_memory(ram)
        ring(fe, 0)
        for req in (R.SET_VRING_CALL, R.SET_VRING_KICK):
            s = [m for m in be.seen if m.request == req][-1]
            # vhost-user.rst: the invalid-fd flag, no fd: notify by message.
            assert s.u64 == 0x100 and s.nfds == 0
        fe.kick(0)
        fe.get_u64(R.GET_FEATURES)  # the scripted back-end has read the kick by now
        kick = [m for m in be.seen if m.request == R.VRING_KICK]
        assert len(kick) == 1 and kick[0].payload == struct.pack("<II", 0, 0)
        assert kick[0].flags == 0x1
        # BACKEND_VRING_CALL with NEED_REPLY (REPLY_ACK): acked, the call eventfd fires.
        assert be.channel is not None
        be.channel.sendall(HDR.pack(BackendRequest.VRING_CALL, 0x9, 8)
                           + struct.pack("<II", 0, 0))
        select.select([be.channel], [], [], 5)  # nothing yet: we have not polled
        assert fe.channel_fd is not None
        r, _, _ = select.select([fe.channel_fd], [], [], 5)
        assert r
        fe.poll_backend_channel()
        assert fe.vring_calls == 1
        assert select.select([fe.vrings[0].call.fd], [], [], 0)[0]
        ack = be.channel.recv(64)
        assert ack == HDR.pack(BackendRequest.VRING_CALL, 0x5, 8) + U64.pack(0)
    be.close()


def test_a_call_while_a_reply_is_awaited_is_acked_meanwhile(no_leaks: Any) -> None:
    """A back-end that sends BACKEND_VRING_CALL with NEED_REPLY and waits for the ack
    before answering our request: the client services the channel while it waits."""
    def call_then_answer(be: Scripted, m: Seen, fds: list[int]) -> tuple[bytes, list[int]]:
        assert be.channel is not None
        be.channel.sendall(HDR.pack(BackendRequest.VRING_CALL, 0x9, 8)
                           + struct.pack("<II", 0, 0))
        be.channel.settimeout(5)
        assert len(be.channel.recv(64)) == 20  # our ack, before the reply
        return struct.pack("<II", 0, 3), []

    be = Scripted(handlers={R.GET_VRING_BASE: call_then_answer})
    fe = be.start()
    with GuestRam.memfd(1 << 20) as ram, fe:
        fe.negotiate(inband=True)
        fe.set_memory(ram)
        ring(fe, 0)
        assert fe.stop_vring(0) == 3 and fe.vring_calls == 1
        # Taken while the reply was awaited, handed out by the next poll.
        assert fe.poll_backend_channel() == [ev.VringCalled(0)]
        assert fe.poll_backend_channel() == []
    be.close()


def test_inband_needs_what_it_needs(no_leaks: Any) -> None:
    be = Scripted(protocol=PROTOCOL & ~int(PF.REPLY_ACK))
    fe = be.start()
    with fe, pytest.raises(RemoteProtocolError, match="in-band notifications"):
        fe.negotiate(inband=True)
    be.close()
    # Without inband=True the bit is never acked, even when offered.
    be = Scripted()
    fe = be.start()
    with fe:
        n = fe.negotiate()
        assert not n.protocol_features & PF.INBAND_NOTIFICATIONS and not fe.inband
    be.close()


def test_a_vring_call_without_inband_is_a_violation(no_leaks: Any) -> None:
    be = Scripted()
    fe = be.start()
    with fe:
        fe.negotiate()
        assert be.channel is not None
        be.channel.sendall(HDR.pack(BackendRequest.VRING_CALL, 0x1, 8) + bytes(8))
        assert fe.channel_fd is not None
        select.select([fe.channel_fd], [], [], 5)
        with pytest.raises(RemoteProtocolError, match="INBAND_NOTIFICATIONS"):
            fe.poll_backend_channel()
    be.close()


# -- DEVICE_STATE ---------------------------------------------------------------------------------


def saver(state: bytes, *, own: bool = False, error: int = 0) -> Handler:
    def handle(be: Scripted, m: Seen, fds: list[int]) -> tuple[bytes, list[int]]:
        direction, phase = struct.unpack("<II", m.payload)
        assert (direction, phase, len(fds)) == (STATE_SAVE, 0, 1)
        if error:
            return U64.pack(error | 0x100), []
        if own:
            r, w = os.pipe()
            threading.Thread(target=_write_all, args=(w, state), daemon=True).start()
            return U64.pack(0), [r]
        # Written after the reply, as a back-end does: more than a pipe holds.
        threading.Thread(target=_write_all, args=(os.dup(fds[0]), state), daemon=True).start()
        return U64.pack(0x100), []
    return handle


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.close(fd)  # EOF ends the state


def loader(into: list[bytes], *, own: bool = False) -> Handler:
    def handle(be: Scripted, m: Seen, fds: list[int]) -> tuple[bytes, list[int]]:
        direction, phase = struct.unpack("<II", m.payload)
        assert (direction, phase, len(fds)) == (STATE_LOAD, 0, 1)
        if own:
            r, w = os.pipe()
            threading.Thread(target=lambda: into.append(_read_all(r)), daemon=True).start()
            return U64.pack(0), [w]
        fd = os.dup(fds[0])
        threading.Thread(target=lambda: into.append(_read_all(fd)), daemon=True).start()
        return U64.pack(0x100), []
    return handle


def _read_all(fd: int) -> bytes:
    out = b""
    while chunk := os.read(fd, 65536):
        out += chunk
    os.close(fd)
    return out


def checker(value: int) -> Handler:
    return lambda be, m, fds: (U64.pack(value), [])


@pytest.mark.parametrize("own", [False, True], ids=["our-pipe", "their-fd"])
def test_state_moves_from_source_to_destination(no_leaks: Any, own: bool) -> None:
    state = os.urandom(200_000)  # more than a pipe holds: both ends stream
    loaded: list[bytes] = []
    src = Scripted(handlers={R.SET_DEVICE_STATE_FD: saver(state, own=own),
                             R.CHECK_DEVICE_STATE: checker(0)})
    dst = Scripted(handlers={R.SET_DEVICE_STATE_FD: loader(loaded, own=own),
                             R.CHECK_DEVICE_STATE: checker(0)})
    a, b = src.start(), dst.start()
    with a, b:
        a.negotiate()
        b.negotiate()
        assert transfer_device_state(a, b) == len(state)
        assert src.requests()[-2:] == [R.SET_DEVICE_STATE_FD, R.CHECK_DEVICE_STATE]
        assert dst.requests()[-2:] == [R.SET_DEVICE_STATE_FD, R.CHECK_DEVICE_STATE]
    src.close()
    dst.close()
    assert loaded == [state]


def test_state_errors_are_reported(no_leaks: Any) -> None:
    be = Scripted(handlers={R.SET_DEVICE_STATE_FD: saver(b"", error=0x16)})
    fe = be.start()
    with fe:
        fe.negotiate()
        with pytest.raises(RemoteProtocolError, match="refused with error 0x16"):
            save_device_state(fe)
    be.close()
    loaded: list[bytes] = []
    be = Scripted(handlers={R.SET_DEVICE_STATE_FD: loader(loaded),
                            R.CHECK_DEVICE_STATE: checker(1)})
    fe = be.start()
    with fe:
        fe.negotiate()
        with pytest.raises(RemoteProtocolError, match="CHECK_DEVICE_STATE after loading"):
            load_device_state(fe, b"state")
    be.close()
    # Not negotiated: refused before anything is sent.
    be = Scripted(protocol=PROTOCOL & ~int(PF.DEVICE_STATE))
    fe = be.start()
    with fe:
        fe.negotiate()
        with pytest.raises(LocalProtocolError, match="DEVICE_STATE"):
            fe.check_device_state()
    be.close()


def test_a_reply_fd_must_match_bit_8(no_leaks: Any) -> None:
    """Bit 8 clear promises an fd (QEMU reads one then); set, none may come."""
    def no_fd_but_bit_clear(be: Scripted, m: Seen, fds: list[int]) -> tuple[bytes, list[int]]:
        return U64.pack(0), []

    be = Scripted(handlers={R.SET_DEVICE_STATE_FD: no_fd_but_bit_clear})
    fe = be.start()
    r, w = os.pipe()
    try:
        with fe:
            fe.negotiate()
            with pytest.raises(RemoteProtocolError, match="carries 0 fds, not 1"):
                fe.set_device_state_fd(STATE_SAVE, w)
    finally:
        os.close(r)
        os.close(w)
    be.close()
