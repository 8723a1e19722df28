"""Shared fakes for the sans-IO core tests: a fake shell host, stub rings, test devices.

Loaded by ``tests/unit/conftest.py`` (by file path, so no ``sys.path`` or package
``__init__`` is needed) and imported by the test modules as ``fakes``. No real I/O: region
"mappings" are bytearrays (or lazily allocated anonymous memory for the 256 MiB regions
of the real traces), fds are plain integers.
"""

from __future__ import annotations

import itertools
import mmap
import struct
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from vhostuser.connection import events as ev
from vhostuser.connection.backend import BackendConnection, Dialect
from vhostuser.connection.vring import VringControl
from vhostuser.devices.base import Device
from vhostuser.errors import GuestMemoryError, RemoteProtocolError
from vhostuser.memory import RegionTable
from vhostuser.protocol import payloads as P
from vhostuser.protocol.enums import FrontendRequest, ProtocolFeature, VirtioFeature
from vhostuser.protocol.framing import HEADER

PF = ProtocolFeature
VF = VirtioFeature

#: Above this size a fake region is backed by lazily allocated anonymous memory.
BIG_REGION = 16 << 20


class FakeMapping:
    """What ``BackendHost.map_region`` returns: ``.buf`` over a buffer and ``.close()``."""

    def __init__(self, fd: int, length: int) -> None:
        self.fd = fd
        self.length = length
        self._mm: mmap.mmap | None = None
        if length > BIG_REGION:
            self._mm = mmap.mmap(-1, length)
            self._buf = memoryview(self._mm)
        else:
            self._buf = memoryview(bytearray(length))
        self.closes = 0

    @property
    def buf(self) -> memoryview:
        return self._buf

    def close(self) -> None:
        self.closes += 1
        self._buf.release()
        if self._mm is not None:
            self._mm.close()


class FakeHost:
    """A :class:`~vhostuser.connection.backend.BackendHost` that records everything.

    ``released`` counts every fd token the core gave back, through ``release_fd`` or by
    handing it to ``map_region`` (which consumes its fd, like the real shell's). Set
    ``fd_sizes[fd]`` to make ``map_region`` refuse a too-small fd, or put an fd in
    ``unmappable`` to make it refuse the fd altogether (a pipe or an eventfd).
    """

    def __init__(self) -> None:
        self.released: Counter[int] = Counter()
        self.release_calls: list[int] = []
        self.mapped: list[FakeMapping] = []
        self.fd_sizes: dict[int, int] = {}
        self.unmappable: set[int] = set()
        self.not_notify_fds: set[int] = set()
        self._next_shared = 0

    # BackendHost protocol
    def map_region(self, fd: int, *, mmap_offset: int, size: int) -> FakeMapping:
        self.released[fd] += 1  # map_region consumes its fd on success and on failure
        if fd in self.unmappable:
            raise GuestMemoryError(f"memory region fd {fd} is a pipe; it cannot be mapped")
        length = mmap_offset + size
        have = self.fd_sizes.get(fd)
        if have is not None and have < length:
            raise GuestMemoryError(
                f"memory region fd {fd}: {length:#x} bytes, but the fd is only {have:#x} bytes"
            )
        m = FakeMapping(fd, length)
        self.mapped.append(m)
        return m

    def release_fd(self, fd: int) -> None:
        self.released[fd] += 1
        self.release_calls.append(fd)

    def alloc_shared(self, size: int) -> tuple[int, FakeMapping]:
        """Shared memory for GET_INFLIGHT_FD: a fresh token (negative, so it never
        collides with test tokens) and a mapping of ``size`` bytes."""
        self._next_shared -= 1
        m = FakeMapping(self._next_shared, size)
        self.mapped.append(m)
        return self._next_shared, m

    def check_notify_fd(self, fd: int, what: str) -> None:
        """The optional check the real shell makes on kick/call/err fds."""
        if fd in self.not_notify_fds:
            raise RemoteProtocolError(f"{what} is socket:[{fd}], not an eventfd or a pipe")

    # checks
    def live_mappings(self) -> list[FakeMapping]:
        return [m for m in self.mapped if m.closes == 0]

    def assert_all_released(self, given: Iterable[int]) -> None:
        """Every token given was released exactly once; every mapping closed exactly once."""
        want = Counter(given)
        assert self.released == want, (
            f"released {sorted(self.released.elements())} != given {sorted(want.elements())}"
        )
        for m in self.mapped:
            assert m.closes == 1, f"mapping of fd {m.fd} closed {m.closes} times"


class FdSource:
    """Hands out unique integer fd tokens and remembers every one given."""

    def __init__(self, start: int = 100) -> None:
        self._next = itertools.count(start)
        self.given: list[int] = []

    def take(self, n: int = 1) -> list[int]:
        out = [next(self._next) for _ in range(n)]
        self.given.extend(out)
        return out

    def one(self) -> int:
        return self.take(1)[0]


class StubRing:
    """A ring engine stand-in: reports the base it started from, is never broken."""

    def __init__(self, vring: VringControl[Any]) -> None:
        self.index = vring.index
        self.start_base = vring.base
        self.next_base = vring.base
        self.broken: str | None = None

    def base(self) -> int:
        return self.next_base


class StubRingFactory:
    """A ``ring_factory`` that builds :class:`StubRing` objects and records them."""

    def __init__(self) -> None:
        self.built: list[StubRing] = []

    def __call__(self, mem: RegionTable, vring: VringControl[Any], features: int) -> StubRing:
        ring = StubRing(vring)
        self.built.append(ring)
        return ring


class FakeDevice(Device):
    """A configurable device recording every event and callback."""

    def __init__(
        self,
        *,
        virtio_features: int = 0,
        protocol_features: int = 0,
        num_queues: int = 2,
        config: bytes = b"",
    ) -> None:
        self.virtio_features = virtio_features
        self.protocol_features = protocol_features
        self.num_queues = num_queues
        self._config = config
        self.events: list[ev.Event] = []
        self.features_seen: list[int] = []
        self.memory_changes = 0

    def config_space(self) -> bytes:
        return self._config

    def on_features(self, features: int) -> None:
        self.features_seen.append(features)

    def on_memory(self, mem: Any) -> None:
        self.memory_changes += 1

    def on_event(self, event: ev.Event) -> None:
        self.events.append(event)


# -- message helpers -------------------------------------------------------------------------


def raw(request: int, payload: bytes = b"", flags: int = 0x1, size: int | None = None) -> bytes:
    """One message with arbitrary header fields (the header is not validated)."""
    return HEADER.pack(request, flags, len(payload) if size is None else size) + payload


def req(request: int, payload: P.Payload | bytes | None = None, *, need_reply: bool = False
        ) -> bytes:
    """A well-formed request (flags 0x1, or 0x9 with ``need_reply``)."""
    if payload is None:
        data = b""
    elif isinstance(payload, bytes):
        data = payload
    else:
        data = payload.encode()
    return raw(request, data, 0x9 if need_reply else 0x1)


def split_messages(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split concatenated messages into (request, flags, payload)."""
    out: list[tuple[int, int, bytes]] = []
    off = 0
    while off < len(data):
        request, flags, size = HEADER.unpack_from(data, off)
        out.append((request, flags, data[off + 12 : off + 12 + size]))
        off += 12 + size
    return out


def replies(conn: BackendConnection[int]) -> list[tuple[int, int, bytes]]:
    """Take every queued reply of the back-end core, as (request, flags, payload)."""
    out: list[tuple[int, int, bytes]] = []
    for data, fds in conn.data_to_send():
        assert fds == [], "no reply of these tests carries fds"
        out.extend(split_messages(data))
    return out


def u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def make_backend(
    device: Device | None = None,
    *,
    dialect: Dialect = Dialect.CURRENT,
    max_mem_slots: int = 32,
) -> tuple[BackendConnection[int], FakeHost, StubRingFactory, FdSource]:
    """A back-end core over a fake host and a stub ring factory."""
    host = FakeHost()
    factory = StubRingFactory()
    conn: BackendConnection[int] = BackendConnection(
        device if device is not None else FakeDevice(),
        host,
        max_mem_slots=max_mem_slots,
        dialect=dialect,
        ring_factory=factory,
    )
    return conn, host, factory, FdSource()


def feed(conn: BackendConnection[int], data: bytes, fds: Sequence[int] = ()) -> list[ev.Event]:
    return conn.receive_data(data, list(fds))


R = FrontendRequest

#: Region geometry used by the handshake helpers: 1 MiB of guest RAM at GPA 0.
RAM_SIZE = 1 << 20
RAM_UVA = 0x7F00_0000_0000


def ram_region(gpa: int = 0, size: int = RAM_SIZE, uva: int = RAM_UVA, off: int = 0
               ) -> P.MemoryRegion:
    return P.MemoryRegion(guest_phys_addr=gpa, memory_size=size, userspace_addr=uva,
                          mmap_offset=off)


def handshake(
    conn: BackendConnection[int],
    fds: FdSource,
    *,
    protocol_features: int | None = None,
    features: int | None = None,
    memory: bool = True,
) -> None:
    """Drive a QEMU-style handshake: GET_FEATURES, protocol features, SET_OWNER, SET_FEATURES,
    and (with ``memory``) SET_MEM_TABLE with one 1 MiB region. Replies are discarded."""
    feed(conn, req(R.GET_FEATURES))
    feed(conn, req(R.GET_PROTOCOL_FEATURES))
    pf = conn.offered_protocol_features if protocol_features is None else protocol_features
    feed(conn, req(R.SET_PROTOCOL_FEATURES, P.U64Payload(value=pf)))
    feed(conn, req(R.SET_OWNER))
    # Split rings unless a test asks otherwise.
    f = conn.offered_features & ~int(VF.RING_PACKED) if features is None else features
    feed(conn, req(R.SET_FEATURES, P.U64Payload(value=f)))
    if memory:
        feed(conn, req(R.SET_MEM_TABLE, P.MemoryTable(regions=(ram_region(),))), fds.take(1))
    conn.data_to_send()


def ring_addr(index: int, num: int = 256, *, base_uva: int = RAM_UVA) -> P.VringAddr:
    """Ring areas inside the 1 MiB region, 64 KiB apart per ring."""
    desc = base_uva + index * 0x10000
    avail = desc + 16 * num
    used = (avail + 6 + 2 * num + 3) & ~3
    return P.VringAddr(index=index, flags=0, desc=desc, used=used, avail=avail, log=0)


def configure_ring(conn: BackendConnection[int], fds: FdSource, index: int, num: int = 256,
                   base: int = 0, *, kick: bool = True) -> None:
    """SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_CALL and SET_VRING_KICK."""
    feed(conn, req(R.SET_VRING_NUM, P.VringState(index=index, num=num)))
    feed(conn, req(R.SET_VRING_BASE, P.VringState(index=index, num=base)))
    feed(conn, req(R.SET_VRING_ADDR, ring_addr(index, num)))
    feed(conn, req(R.SET_VRING_CALL, P.VringFile(index=index)), fds.take(1))
    if kick:
        feed(conn, req(R.SET_VRING_KICK, P.VringFile(index=index)), fds.take(1))
    conn.data_to_send()


class ManualTimers:
    """``QueueAccess.call_later`` for rigs without a reactor: callbacks run when the test
    calls :meth:`advance` past their due time, in due order."""

    class Handle:
        def __init__(self, due: float, seq: int, callback: Any) -> None:
            self.due = due
            self.seq = seq
            self.callback = callback
            self.cancelled = False

        def cancel(self) -> None:
            self.cancelled = True

    def __init__(self) -> None:
        self.now = 0.0
        self.pending: list[ManualTimers.Handle] = []
        self._seq = itertools.count()

    def call_later(self, delay: float, callback: Any) -> ManualTimers.Handle:
        h = ManualTimers.Handle(self.now + delay, next(self._seq), callback)
        self.pending.append(h)
        return h

    def advance(self, seconds: float) -> int:
        """Move the clock on; run what falls due; return how many ran."""
        self.now += seconds
        ran = 0
        while True:
            due = [h for h in self.pending if h.due <= self.now and not h.cancelled]
            if not due:
                break
            h = min(due, key=lambda x: (x.due, x.seq))
            self.pending.remove(h)
            h.callback()
            ran += 1
        self.pending = [h for h in self.pending if not h.cancelled]
        return ran
