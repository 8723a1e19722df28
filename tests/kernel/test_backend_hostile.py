"""A real BackendServer under hostile control-plane input (docs/security.md "Cases").

The server (a NullNetDevice on a Reactor run in a background thread) is driven with raw
bytes and real fds (``socket.send_fds``) over AF_UNIX. For every case: a NACK when
NEED_REPLY was set, the connection closed by the server, the server still serving a good
front-end afterwards, and the counts of fds and mappings in /proc/self flat.

``VHOSTUSER_CTRUNC_REPEAT`` scales the 10^4-times MSG_CTRUNC case (default 10000) and
``VHOSTUSER_CHURN_REPEAT`` the 1000 connect-handshake-die case.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from vhostuser.devices.net import NullNetDevice
from vhostuser.io import backend as io_backend
from vhostuser.io import fdcount
from vhostuser.io.backend import BackendServer
from vhostuser.io.frontend import FrontendClient
from vhostuser.io.guestram import GuestRam
from vhostuser.io.reactor import Reactor
from vhostuser.protocol import payloads as P
from vhostuser.protocol.enums import FrontendRequest, ProtocolFeature, VirtioFeature

R = FrontendRequest
PF = ProtocolFeature
VF = VirtioFeature
HEADER = struct.Struct("<III")
U64 = struct.Struct("<Q")

#: Private (heap) mappings may come and go between two snapshots; shared ones may not.
MAPS_SLACK = 2

UVA = 0x7F00_0000_0000
RAM = 1 << 20


# -- the server ---------------------------------------------------------------------------------


class Served:
    """A BackendServer on a Reactor stepped by a background thread."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="vuh-", dir="/tmp")
        self.path = os.path.join(self.dir, "s")
        self.reactor = Reactor()
        self.server = BackendServer(self.reactor, self.path, NullNetDevice)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="reactor", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.reactor.run_once(0.01)

    def idle(self, timeout: float = 10.0) -> None:
        """Wait until every session the server had is closed."""
        wait_until(lambda: not self.server.sessions, timeout, "sessions to close")

    def close(self) -> None:
        self._stop.set()
        self.thread.join(10)
        self.server.close()
        self.reactor.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


@pytest.fixture
def served() -> Iterator[Served]:
    s = Served()
    try:
        yield s
    finally:
        errors = list(s.reactor.errors)
        s.close()
    assert errors == [], f"exceptions escaped into the reactor: {errors!r}"


def probe(served: Served) -> None:
    """A good front-end still gets served; it then goes away."""
    with FrontendClient.connect(served.path, timeout=5.0) as client:
        n = client.negotiate()
        assert n.features & VF.VERSION_1
        assert n.queue_num == 2
    served.idle()


def snap() -> fdcount.Snapshot:
    gc.collect()
    return fdcount.snapshot()


@contextlib.contextmanager
def nothing_leaks(served: Served) -> Iterator[None]:
    probe(served)  # warm up whatever is created lazily
    before = snap()
    yield
    served.idle()
    after = snap()
    diff = after.diff(before, maps_slack=MAPS_SLACK)
    assert not diff, diff


# -- a raw front-end ------------------------------------------------------------------------------


def msg(request: int, payload: bytes = b"", flags: int = 0x1, size: int | None = None) -> bytes:
    return HEADER.pack(request, flags, len(payload) if size is None else size) + payload


class Raw:
    """A raw AF_UNIX peer: sends bytes with fds, reads replies, sees the close."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5.0)
        self.sock.connect(path)

    def send(self, data: bytes, fds: list[int] | None = None) -> None:
        if fds:
            socket.send_fds(self.sock, [data], fds)
        else:
            self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise AssertionError(f"connection closed after {len(buf)} of {n} bytes")
            buf += chunk
        return buf

    def reply(self) -> tuple[int, int, bytes]:
        request, flags, size = HEADER.unpack(self.recv_exact(12))
        return request, flags, self.recv_exact(size)

    def u64(self, request: int) -> int:
        self.send(msg(request))
        got = self.reply()
        assert got[:2] == (request, 0x5), got
        return int(U64.unpack(got[2])[0])

    def acked(self, request: int, payload: bytes = b"", fds: list[int] | None = None) -> None:
        self.send(msg(request, payload, 0x9), fds)
        assert self.reply() == (request, 0x5, U64.pack(0))

    def until_closed(self) -> list[tuple[int, int, bytes]]:
        """Read every remaining message until the server closes the connection."""
        data = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
        out = []
        off = 0
        while off + 12 <= len(data):
            request, flags, size = HEADER.unpack_from(data, off)
            out.append((request, flags, data[off + 12 : off + 12 + size]))
            off += 12 + size
        assert off == len(data), f"trailing bytes {data[off:]!r}"
        return out

    def close(self) -> None:
        self.sock.close()


@dataclass
class Fds:
    """Fds a case creates; closed by the test after sending (the kernel copied them)."""

    opened: list[int] = field(default_factory=list)

    def eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.opened.append(fd)
        return fd

    def memfd(self, size: int = RAM) -> int:
        fd = os.memfd_create("hostile", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        self.opened.append(fd)
        return fd

    def pipe(self) -> int:
        r, w = os.pipe()
        self.opened += [r, w]
        return r

    def readonly_file(self, directory: str) -> int:
        path = os.path.join(directory, "ro")
        with open(path, "wb") as f:
            f.write(bytes(RAM))
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.opened.append(fd)
        return fd

    def socket(self) -> int:
        a, b = socket.socketpair()
        fd = a.detach()
        self.opened.append(fd)
        b.close()
        return fd

    def close(self) -> None:
        for fd in self.opened:
            os.close(fd)
        self.opened = []


def handshake(peer: Raw, level: str, fds: Fds) -> None:
    """Bring the session to ``level``: none, owner, features, memory (QEMU's order)."""
    if level == "none":
        return
    offered = peer.u64(R.GET_FEATURES)
    pf = peer.u64(R.GET_PROTOCOL_FEATURES)
    peer.send(msg(R.SET_PROTOCOL_FEATURES, U64.pack(pf)))
    peer.send(msg(R.SET_OWNER))
    if level == "owner":
        return
    peer.acked(R.SET_FEATURES, U64.pack(offered & ~int(VF.RING_PACKED)))
    if level == "features":
        return
    table = P.MemoryTable(regions=(P.MemoryRegion(guest_phys_addr=0, memory_size=RAM,
                                                  userspace_addr=UVA, mmap_offset=0),))
    peer.acked(R.SET_MEM_TABLE, table.encode(), [fds.memfd()])


# -- the cases ------------------------------------------------------------------------------------


Build = Callable[[Fds], tuple[bytes, list[int]]]
"""Makes a case's hostile message and the fds to send with it."""


@dataclass(frozen=True)
class Case:
    name: str
    level: str
    data: Build
    nack: bool | None  # None: a NACK is welcome but not required
    eof: bool = False  # half-close after sending (a cut-short message)


def _fixed(data: bytes) -> Build:
    return lambda fds: (data, [])


def _with(data: bytes, make: Callable[[Fds], list[int]]) -> Build:
    return lambda fds: (data, make(fds))


def _region(gpa: int = 0, size: int = RAM, uva: int = UVA, off: int = 0) -> P.MemoryRegion:
    return P.MemoryRegion(guest_phys_addr=gpa, memory_size=size, userspace_addr=uva,
                          mmap_offset=off)


def _table(*regions: P.MemoryRegion) -> bytes:
    return P.MemoryTable(regions=regions).encode()


def _state(index: int, num: int) -> bytes:
    return struct.pack("<II", index, num)


def _nine_regions() -> bytes:
    return struct.pack("<II", 9, 0) + b"".join(
        _region(gpa=i * RAM, uva=UVA + i * RAM).encode() for i in range(9))


CASES = [
    # framing and fds
    Case("short-header-eof", "none", _fixed(b"\x01\x00\x00\x00\x09"), False, eof=True),
    Case("short-payload-eof", "owner", _fixed(msg(R.SET_FEATURES, b"\0" * 3, 0x9, size=8)),
         False, eof=True),
    Case("size-0xffffffff", "none", _fixed(msg(R.GET_FEATURES, b"", 0x9, size=0xFFFFFFFF)),
         False),
    Case("version-0", "none", _fixed(msg(R.SET_OWNER, b"", 0x8)), False),
    Case("version-2", "none", _fixed(msg(R.SET_OWNER, b"", 0xA)), False),
    Case("version-3", "none", _fixed(msg(R.SET_OWNER, b"", 0xB)), False),
    Case("reserved-flag-bits", "none", _fixed(msg(R.SET_OWNER, b"", 0x19)), False),
    Case("reply-flag-on-request", "none", _fixed(msg(R.SET_OWNER, b"", 0x5)), False),
    Case("request-code-0", "none", _fixed(msg(0, b"", 0x9)), True),
    Case("request-code-unknown", "none", _fixed(msg(99, b"", 0x9)), True),
    Case("set-features-4-bytes", "owner", _fixed(msg(R.SET_FEATURES, bytes(4), 0x9)), True),
    Case("set-vring-num-4-bytes", "features", _fixed(msg(R.SET_VRING_NUM, bytes(4), 0x9)),
         True),
    Case("fd-on-set-owner", "none", _with(msg(R.SET_OWNER, b"", 0x9),
                                          lambda f: [f.eventfd()]), True),
    Case("two-fds-on-kick", "features",
         _with(msg(R.SET_VRING_KICK, U64.pack(0), 0x9), lambda f: [f.eventfd(), f.eventfd()]),
         True),
    Case("fewer-fds-than-regions", "features",
         _with(msg(R.SET_MEM_TABLE, _table(_region(), _region(gpa=RAM, uva=UVA + RAM)), 0x9),
               lambda f: [f.memfd()]), True),
    Case("msg-ctrunc", "none",
         _with(msg(R.GET_FEATURES, b"", 0x9), lambda f: [f.eventfd() for _ in range(9)]),
         False),
    # order and indices
    *[
        Case(f"vring-num-index-{index:#x}", "features",
             _fixed(msg(R.SET_VRING_NUM, _state(index, 256), 0x9)), True)
        for index in (2, 0x100, 0x10000, 0xFFFFFFFF)
    ],
    *[
        Case(f"vring-call-index-{value:#x}", "features",
             _with(msg(R.SET_VRING_CALL, U64.pack(value), 0x9), lambda f: [f.eventfd()]), True)
        for value in (2, 0x100, 0x10000, 0xFFFFFFFF)
    ],
    Case("kick-nofd-with-fd", "features",
         _with(msg(R.SET_VRING_KICK, U64.pack(0x100), 0x9), lambda f: [f.eventfd()]), True),
    Case("call-no-nofd-no-fd", "features", _fixed(msg(R.SET_VRING_CALL, U64.pack(1), 0x9)),
         True),
    Case("kick-fd-regular-file", "features",
         _with(msg(R.SET_VRING_KICK, U64.pack(0), 0x9), lambda f: [f.memfd(4096)]), True),
    Case("call-fd-socket", "features",
         _with(msg(R.SET_VRING_CALL, U64.pack(0), 0x9), lambda f: [f.socket()]), True),
    Case("call-before-set-owner", "none",
         _with(msg(R.SET_VRING_CALL, U64.pack(0), 0x9), lambda f: [f.eventfd()]), True),
    Case("vring-num-before-features", "owner",
         _fixed(msg(R.SET_VRING_NUM, _state(0, 256), 0x9)), True),
    Case("features-never-offered", "owner",
         _fixed(msg(R.SET_FEATURES, U64.pack(int(VF.VERSION_1 | VF.ACCESS_PLATFORM)), 0x9)),
         True),
    Case("get-vring-base-never-configured", "memory",
         _fixed(msg(R.GET_VRING_BASE, _state(0, 0), 0x9)), False),
    Case("get-inflight-fd-not-negotiated", "features",
         _fixed(msg(R.GET_INFLIGHT_FD, bytes(24), 0x9)), False),
    Case("set-inflight-fd-not-negotiated", "features",
         _with(msg(R.SET_INFLIGHT_FD, P.InflightPayload(mmap_size=4096, mmap_offset=0,
                                                         num_queues=0, queue_size=256).encode(),
                   0x9), lambda f: [f.memfd(4096)]), True),
    Case("backend-req-fd-not-a-socket", "owner",
         _with(msg(R.SET_BACKEND_REQ_FD, b"", 0x9), lambda f: [f.eventfd()]), None),
    Case("backend-req-fd-two-fds", "owner",
         _with(msg(R.SET_BACKEND_REQ_FD, b"", 0x9), lambda f: [f.socket(), f.socket()]), True),
    Case("gpu-set-socket-unsupported", "features",
         _with(msg(R.GPU_SET_SOCKET, b"", 0x9), lambda f: [f.socket()]), True),
    # memory table
    Case("mem-table-0-regions", "features",
         _fixed(msg(R.SET_MEM_TABLE, struct.pack("<II", 0, 0), 0x9)), True),
    Case("mem-table-9-regions", "features",
         _with(msg(R.SET_MEM_TABLE, _nine_regions(), 0x9),
               lambda f: [f.memfd() for _ in range(8)]), True),
    Case("mem-table-0xffffffff-regions", "features",
         _fixed(msg(R.SET_MEM_TABLE, struct.pack("<II", 0xFFFFFFFF, 0), 0x9)), True),
    Case("region-size-0", "features",
         _with(msg(R.SET_MEM_TABLE, _table(_region(size=0)), 0x9), lambda f: [f.memfd()]),
         True),
    Case("region-wraps-2**64", "features",
         _with(msg(R.SET_MEM_TABLE, _table(_region(gpa=2**64 - 4096, size=8192)), 0x9),
               lambda f: [f.memfd()]), True),
    Case("region-offset-wraps-2**64", "features",
         _with(msg(R.SET_MEM_TABLE, _table(_region(off=2**64 - 4096, size=8192)), 0x9),
               lambda f: [f.memfd()]), True),
    Case("region-beyond-fd-size", "features",
         _with(msg(R.SET_MEM_TABLE, _table(_region(size=8192, off=4096)), 0x9),
               lambda f: [f.memfd(8192)]), True),
    Case("region-fd-pipe", "features",
         _with(msg(R.SET_MEM_TABLE, _table(_region(size=4096)), 0x9), lambda f: [f.pipe()]),
         True),
    Case("region-fd-eventfd", "features",
         _with(msg(R.SET_MEM_TABLE, _table(_region(size=4096)), 0x9),
               lambda f: [f.eventfd()]), True),
    Case("rem-mem-reg-missing", "memory",
         _fixed(msg(R.REM_MEM_REG, P.SingleRegion(region=_region(gpa=1 << 40)).encode(), 0x9)),
         True),
    Case("set-log-base-size-0", "memory",
         _with(msg(R.SET_LOG_BASE, P.LogBase(mmap_size=0, mmap_offset=0).encode(), 0x9),
               lambda f: [f.memfd(4096)]), True),
    Case("set-log-base-offset-overflow", "memory",
         _with(msg(R.SET_LOG_BASE, P.LogBase(mmap_size=4096, mmap_offset=2**64 - 1).encode(),
                   0x9), lambda f: [f.memfd(4096)]), True),
]


def run_case(served: Served, case: Case, fds: Fds) -> tuple[int, list[tuple[int, int, bytes]]]:
    """Run one case; return the hostile message's request id and what came back."""
    peer = Raw(served.path)
    try:
        handshake(peer, case.level, fds)
        data, given = case.data(fds)
        request = HEADER.unpack_from(data.ljust(12, b"\0"))[0]
        peer.send(data, given)
        if case.eof:
            peer.sock.shutdown(socket.SHUT_WR)
        got = peer.until_closed()
    finally:
        peer.close()
        fds.close()
    return request, got


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_control_message(served: Served, case: Case) -> None:
    fds = Fds()
    with nothing_leaks(served):
        request, got = run_case(served, case, fds)
        if case.nack:
            assert got, "no NACK before the close"
            last = got[-1]
            assert last[0] == request and last[1] == 0x5 and len(last[2]) == 8, got
            assert U64.unpack(last[2])[0] != 0
        elif case.nack is False:
            assert all(len(p) != 8 or U64.unpack(p)[0] == 0 for _r, _f, p in got), got
        wait_until(lambda: served.server.closed_sessions >= 2, 5, "the session to close")
        reason = served.server.last_close_reason or ""
        assert "protocol violation" in reason or "receive failed" in reason, reason
        probe(served)


def test_hostile_fds_read_only_file(served: Served, tmp_path: os.PathLike[str]) -> None:
    fds = Fds()
    directory = os.fspath(tmp_path)
    case = Case("region-fd-read-only", "features",
                lambda f: (msg(R.SET_MEM_TABLE, _table(_region()), 0x9),
                           [f.readonly_file(directory)]), True)
    with nothing_leaks(served):
        _request, got = run_case(served, case, fds)
        assert got and got[-1][:2] == (R.SET_MEM_TABLE, 0x5)
        assert U64.unpack(got[-1][2])[0] != 0
        probe(served)


def test_get_vring_base_twice(served: Served) -> None:
    fds = Fds()
    with nothing_leaks(served):
        peer = Raw(served.path)
        try:
            handshake(peer, "memory", fds)
            peer.send(msg(R.SET_VRING_NUM, _state(0, 256)))
            peer.send(msg(R.SET_VRING_BASE, _state(0, 5)))
            addr = P.VringAddr(index=0, flags=0, desc=UVA, avail=UVA + 0x1000,
                               used=UVA + 0x2000, log=0)
            peer.acked(R.SET_VRING_ADDR, addr.encode())
            peer.send(msg(R.GET_VRING_BASE, _state(0, 0)))
            assert peer.reply() == (R.GET_VRING_BASE, 0x5, _state(0, 5))
            peer.send(msg(R.GET_VRING_BASE, _state(0, 0)))
            assert peer.until_closed() == []
        finally:
            peer.close()
            fds.close()
        probe(served)


def test_add_mem_reg_past_max_slots(served: Served) -> None:
    fds = Fds()
    with nothing_leaks(served):
        peer = Raw(served.path)
        try:
            handshake(peer, "features", fds)
            slots = peer.u64(R.GET_MAX_MEM_SLOTS)
            assert 1 <= slots <= 512
            for i in range(slots + 1):
                region = P.SingleRegion(region=_region(gpa=i * 4096, size=4096,
                                                       uva=UVA + i * 4096))
                fd = fds.memfd(4096)
                if i < slots:
                    peer.acked(R.ADD_MEM_REG, region.encode(), [fd])
                else:
                    peer.send(msg(R.ADD_MEM_REG, region.encode(), 0x9), [fd])
                os.close(fds.opened.pop())
            got = peer.until_closed()
            assert got and got[-1][:2] == (R.ADD_MEM_REG, 0x5)
            assert U64.unpack(got[-1][2])[0] != 0
        finally:
            peer.close()
            fds.close()
        probe(served)


def test_message_that_never_completes_is_timed_out(served: Served,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(io_backend, "MESSAGE_DEADLINE", 0.2)
    with nothing_leaks(served):
        peer = Raw(served.path)
        try:
            peer.send(msg(R.SET_FEATURES, bytes(3), size=8))  # 5 bytes short, never sent
            start = time.monotonic()
            assert peer.until_closed() == []
            assert time.monotonic() - start < 4.0
        finally:
            peer.close()
        assert "did not arrive whole" in (served.server.last_close_reason or "")
        probe(served)


def test_other_sessions_survive_a_violation(served: Served) -> None:
    fds = Fds()
    with FrontendClient.connect(served.path) as good:
        good.negotiate()
        run_case(served, CASES[0], fds)
        # the good session still answers
        assert good.get_u64(R.GET_QUEUE_NUM) == 2
        assert len(served.server.sessions) == 1
    served.idle()


# -- repeated abuse ------------------------------------------------------------------------


def _repeat(env: str, default: int) -> int:
    return max(1, int(os.environ.get(env, default)))


def test_msg_ctrunc_repeated_with_a_flat_fd_count(served: Served) -> None:
    """More fds than the control buffer holds, 10^4 times: every received fd is closed."""
    n = _repeat("VHOSTUSER_CTRUNC_REPEAT", 10_000)
    evs = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(9)]
    try:
        with nothing_leaks(served):
            start = time.monotonic()
            for _ in range(n):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(5.0)
                    s.connect(served.path)
                    socket.send_fds(s, [msg(R.GET_FEATURES)], evs)
                    while True:
                        try:
                            chunk = s.recv(4096)
                        except ConnectionResetError:
                            break
                        if not chunk:
                            break
                        # GET_FEATURES is never answered: the read lost the fds
                        raise AssertionError(f"unexpected reply {chunk!r}")
            elapsed = time.monotonic() - start
            assert "MSG_CTRUNC" in (served.server.last_close_reason or "")
            probe(served)
    finally:
        for fd in evs:
            os.close(fd)
    assert served.server.closed_sessions >= n
    print(f"{n} MSG_CTRUNC connections in {elapsed:.1f} s")


def test_handshake_and_die_a_thousand_times(served: Served) -> None:
    """A peer that connects, handshakes and dies, a thousand times: nothing accumulates."""
    n = _repeat("VHOSTUSER_CHURN_REPEAT", 1000)
    ram = GuestRam.memfd(RAM)
    try:
        with nothing_leaks(served):
            for i in range(n):
                client = FrontendClient.connect(served.path, timeout=5.0)
                try:
                    client.negotiate()
                    client.set_memory(ram)
                    if i % 2:
                        # die mid-message: a header and half a payload
                        client.sock.send(msg(R.SET_VRING_NUM, bytes(4), size=8))
                finally:
                    client.close()
            served.idle()
            assert served.server.closed_sessions >= n
    finally:
        ram.close()
