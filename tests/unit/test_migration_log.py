"""Back-end role of live migration in the core (vhost-user.rst "Live migration"): the
features offered, SET_LOG_BASE (LOG_SHMFD) mapped through the host, checked before
anything is mapped, answered with a u64; logging on exactly while VHOST_F_LOG_ALL is acked
(whatever the order, with rings built before it and regions changing meanwhile);
VHOST_VRING_F_LOG's log_guest_addr; the atomic marking; GET_VRING_BASE telling the device
first so that a slow disk completes its delayed requests before the index is handed over.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhostuser.connection import events as ev
from vhostuser.connection.backend import (
    MAX_LOG_BYTES,
    BackendConnection,
    Dialect,
    default_ring_factory,
)
from vhostuser.connection.vring import VringControl
from vhostuser.devices.blk import BlkDevice
from vhostuser.errors import RemoteProtocolError
from vhostuser.frontends.blk import BlkOp
from vhostuser.memory import DirtyLog
from vhostuser.protocol import payloads as P
from vhostuser.protocol.enums import FrontendRequest, NetFeature, ProtocolFeature, VirtioFeature

from .blk_rig import Rig as BlkRig
from .fakes import (
    RAM_SIZE,
    RAM_UVA,
    FakeDevice,
    FakeHost,
    FdSource,
    StubRingFactory,
    feed,
    handshake,
    ram_region,
    replies,
    req,
    ring_addr,
    u64,
)

R = FrontendRequest
PF = ProtocolFeature
VF = VirtioFeature

Setup = tuple[BackendConnection[int], FakeHost, FdSource]


def net_device() -> FakeDevice:
    return FakeDevice(virtio_features=int(NetFeature.MAC | NetFeature.MRG_RXBUF),
                      protocol_features=int(PF.RARP), num_queues=2)


def session(*, log_all: bool = False, ring_factory: Any = None) -> Setup:
    """A back-end after a QEMU-style handshake (LOG_ALL acked or not) with 1 MiB of RAM."""
    host = FakeHost()
    conn: BackendConnection[int] = BackendConnection(
        net_device(), host, ring_factory=ring_factory or StubRingFactory(), name="t")
    fds = FdSource()
    f = conn.offered_features & ~int(VF.RING_PACKED) & ~int(VF.RING_EVENT_IDX)
    handshake(conn, fds, features=f if log_all else f & ~int(VF.LOG_ALL))
    return conn, host, fds


def set_features(conn: BackendConnection[int], log_all: bool) -> list[ev.Event]:
    f = conn.acked_features & ~int(VF.LOG_ALL)
    return feed(conn, req(R.SET_FEATURES, P.U64Payload(value=f | (VF.LOG_ALL if log_all
                                                                   else 0))))


def set_log_base(conn: BackendConnection[int], fds: FdSource, size: int, offset: int = 0,
                 *, need_reply: bool = False) -> list[ev.Event]:
    return feed(conn, req(R.SET_LOG_BASE, P.LogBase(mmap_size=size, mmap_offset=offset),
                          need_reply=need_reply), fds.take(1))


# -- what is offered -----------------------------------------------------------------------


def test_log_all_and_log_shmfd_are_offered_in_the_current_protocol_only() -> None:
    cur = BackendConnection(net_device(), FakeHost())
    assert cur.offered_features & VF.LOG_ALL
    assert cur.offered_protocol_features & PF.LOG_SHMFD
    draft = BackendConnection(net_device(), FakeHost(), dialect=Dialect.DRAFT_TEXT)
    assert not draft.offered_features & VF.LOG_ALL
    assert draft.offered_protocol_features == 0


# -- SET_LOG_BASE and LOG_ALL ----------------------------------------------------------------


def test_set_log_base_maps_the_log_and_replies_with_a_u64() -> None:
    conn, host, fds = session()
    ram = host.mapped[0]
    assert set_log_base(conn, fds, 64, 32) == []
    # vhost-user.rst SET_LOG_BASE: with LOG_SHMFD the front-end waits for a u64 reply.
    assert replies(conn) == [(int(R.SET_LOG_BASE), 0x5, u64(0))]
    (logmap,) = [m for m in host.mapped if m is not ram]
    assert logmap.length == 96  # the host maps from offset 0 for offset + size bytes
    assert conn.dirty_log is not None and len(conn.dirty_log.buf) == 64
    # Not logging yet: LOG_ALL is not acked.
    assert conn.mem.log is None
    conn.mem.mark_dirty(0x5000, 1)
    assert bytes(logmap.buf) == bytes(96)


def test_logging_is_on_exactly_while_log_all_is_acked() -> None:
    conn, host, fds = session()
    dev = conn.device
    assert isinstance(dev, FakeDevice)
    set_log_base(conn, fds, 32)
    logmap = host.mapped[-1]
    got = set_features(conn, True)
    assert ev.LogChanged(True, 32) in got and ev.LogChanged(True, 32) in dev.events
    assert conn.mem.log is conn.dirty_log
    conn.mem.mark_dirty(9 * 4096 + 10, 4096)  # pages 9 and 10
    assert bytes(logmap.buf[:2]) == bytes([0, 0b110])
    got = set_features(conn, False)  # migration over (or cancelled)
    assert ev.LogChanged(False, 32) in got and conn.mem.log is None
    conn.mem.mark_dirty(0, 1)
    assert bytes(logmap.buf[:2]) == bytes([0, 0b110])
    assert logmap.closes == 0  # still mapped: the front-end may turn logging on again
    set_features(conn, True)
    conn.mem.mark_dirty(0, 1)
    assert bytes(logmap.buf[:2]) == bytes([1, 0b110])


def test_log_all_first_then_set_log_base() -> None:
    """The order QEMU uses when a device starts while migration runs (features first)."""
    conn, _host, fds = session(log_all=True)
    assert conn.mem.log is None  # LOG_ALL alone: no log to write into
    got = set_log_base(conn, fds, 16)
    assert ev.LogChanged(True, 16) in got and conn.mem.log is conn.dirty_log


def test_a_resized_log_replaces_the_old_one_at_once() -> None:
    conn, host, fds = session(log_all=True)
    set_log_base(conn, fds, 16)
    first = host.mapped[-1]
    set_log_base(conn, fds, 64)
    second = host.mapped[-1]
    assert first.closes == 1 and second.closes == 0
    assert conn.mem.log is not None and conn.mem.log is conn.dirty_log
    assert len(conn.mem.log.buf) == 64
    conn.mem.mark_dirty(200 * 4096, 1)  # only the bigger log covers page 200
    assert second.buf[25] == 1


def test_reset_and_close_unmap_the_log() -> None:
    conn, host, fds = session(log_all=True)
    set_log_base(conn, fds, 16)
    logmap = host.mapped[-1]
    feed(conn, req(R.RESET_DEVICE))
    assert logmap.closes == 1 and conn.mem.log is None and conn.dirty_log is None
    set_features(conn, True)
    set_log_base(conn, fds, 16)
    conn.close()
    assert host.mapped[-1].closes == 1 and host.live_mappings() == []
    host.assert_all_released(fds.given)


def test_logging_switched_on_after_the_rings_were_built_sees_their_writes() -> None:
    """No write path captured "logging off" when it was built: a ring running since
    before SET_LOG_BASE / LOG_ALL logs its very next write, and keeps logging across
    regions added and removed (the ring is rebuilt on the new table, the log stays)."""
    conn, host, fds = session(ring_factory=default_ring_factory)
    ram = host.mapped[0]
    for msg in (req(R.SET_VRING_NUM, P.VringState(index=0, num=256)),
                req(R.SET_VRING_BASE, P.VringState(index=0, num=0)),
                req(R.SET_VRING_ADDR, ring_addr(0))):
        feed(conn, msg)
    feed(conn, req(R.SET_VRING_KICK, P.VringFile(index=0)), fds.take(1))
    conn.kick(0)
    ring = conn.vrings[0].engine
    assert ring is not None
    used_page = ring.used_gpa // 4096
    ring.disable_notifications()  # a used-ring write while nothing logs
    set_log_base(conn, fds, 64)  # 512 pages: both regions
    logmap = host.mapped[-1]
    assert bytes(logmap.buf) == bytes(64)
    set_features(conn, True)
    ring.enable_notifications()  # the same ring object, built long before
    assert conn.mem.log is not None and conn.mem.log.dirty_pages() == [used_page]
    # A second region added and the first's ring rebuilt on the new table: still logging.
    feed(conn, req(R.ADD_MEM_REG, P.SingleRegion(region=ram_region(
        gpa=RAM_SIZE, uva=RAM_UVA + RAM_SIZE))), fds.take(1))
    rebuilt = conn.vrings[0].engine
    assert rebuilt is not None and rebuilt is not ring
    assert conn.mem.log is conn.dirty_log
    conn.mem.mark_dirty(RAM_SIZE + 3 * 4096, 1)  # a write into the new region
    rebuilt.disable_notifications()
    assert conn.mem.log.dirty_pages() == [used_page, RAM_SIZE // 4096 + 3]
    feed(conn, req(R.REM_MEM_REG, P.SingleRegion(region=ram_region(
        gpa=RAM_SIZE, uva=RAM_UVA + RAM_SIZE))))
    assert conn.mem.log is conn.dirty_log and len(conn.mem) == 1
    assert ram.closes == 0


# -- hostile logs ------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "offset", "fd_size", "words"), [
    (0, 0, None, "mmap_size is 0"),
    (MAX_LOG_BYTES + 1, 0, None, "larger than"),
    ((1 << 64) - 1, 0, None, "larger than"),
    (4096, MAX_LOG_BYTES + 1, None, "mmap_offset"),
    (4096, (1 << 64) - 8, None, "mmap_offset"),
    (4096, 0, 1024, "only"),  # the fd is smaller than the log it claims
    (4096, 4096, 6000, "only"),
], ids=["size-0", "size-huge", "size-u64-max", "offset-huge", "offset-wraps",
        "fd-too-small", "fd-too-small-for-offset"])
def test_a_hostile_log_is_nacked_with_nothing_mapped(size: int, offset: int,
                                                      fd_size: int | None,
                                                      words: str) -> None:
    conn, host, fds = session(log_all=True)
    before = list(host.mapped)
    (fd,) = fds.take(1)
    if fd_size is not None:
        host.fd_sizes[fd] = fd_size
    with pytest.raises(RemoteProtocolError, match=words):
        feed(conn, req(R.SET_LOG_BASE, P.LogBase(mmap_size=size, mmap_offset=offset),
                       need_reply=True), [fd])
    # REPLY_ACK: the failure is answered (u64 non-zero) before the connection closes.
    assert replies(conn) == [(int(R.SET_LOG_BASE), 0x5, u64(1))]
    assert host.mapped[len(before):] == [] or fd_size is not None  # nothing new mapped...
    assert host.live_mappings() == []  # ...and nothing left mapped (the session closed)
    assert conn.mem.log is None and conn.dirty_log is None
    host.assert_all_released(fds.given)


def test_a_log_fd_without_log_shmfd_is_refused() -> None:
    host = FakeHost()
    conn: BackendConnection[int] = BackendConnection(net_device(), host)
    fds = FdSource()
    handshake(conn, fds, protocol_features=conn.offered_protocol_features & ~int(PF.LOG_SHMFD))
    with pytest.raises(RemoteProtocolError, match="LOG_SHMFD"):
        set_log_base(conn, fds, 64, need_reply=True)
    assert replies(conn) == [(int(R.SET_LOG_BASE), 0x5, u64(1))]
    assert host.live_mappings() == []
    host.assert_all_released(fds.given)


def test_a_read_only_log_is_refused_and_unmapped() -> None:
    class ReadOnlyHost(FakeHost):
        def map_region(self, fd: int, *, mmap_offset: int, size: int) -> Any:
            m = super().map_region(fd, mmap_offset=mmap_offset, size=size)
            if size == 64:
                m._buf = m._buf.toreadonly()
            return m

    host = ReadOnlyHost()
    conn: BackendConnection[int] = BackendConnection(net_device(), host)
    fds = FdSource()
    handshake(conn, fds)
    with pytest.raises(RemoteProtocolError, match="writable"):
        set_log_base(conn, fds, 64)
    assert host.live_mappings() == []
    host.assert_all_released(fds.given)


# -- VHOST_VRING_F_LOG ------------------------------------------------------------------------


def _vring(addr: P.VringAddr) -> VringControl[Any]:
    v: VringControl[Any] = VringControl(0)
    v.num = 256
    v.addr = addr
    return v


def test_used_ring_writes_are_logged_at_log_guest_addr() -> None:
    conn, _host, fds = session(log_all=True)
    set_log_base(conn, fds, 64)
    plain = ring_addr(0)
    used_gpa = conn.mem.va_to_gpa(plain.used, 4)
    ring = default_ring_factory(conn.mem, _vring(plain), conn.acked_features)
    assert ring.engine_view[-1] == used_gpa  # no F_LOG: logged where it is
    other = 0x80000  # a log_guest_addr elsewhere (page 128)
    flagged = P.VringAddr(index=0, flags=P.VRING_F_LOG, desc=plain.desc, used=plain.used,
                          avail=plain.avail, log=other)
    ring = default_ring_factory(conn.mem, _vring(flagged), conn.acked_features)
    assert ring.engine_view[-1] == other  # where the compiled engine logs too
    ring.disable_notifications()
    assert conn.mem.log is not None and conn.mem.log.dirty_pages() == [other // 4096]
    # and the core accepts the flag in SET_VRING_ADDR
    feed(conn, req(R.SET_VRING_NUM, P.VringState(index=0, num=256)))
    feed(conn, req(R.SET_VRING_ADDR, flagged))


# -- the marking itself ------------------------------------------------------------------------


_marks = st.lists(st.tuples(st.integers(0, 300 * 4096), st.integers(0, 5 * 4096)),
                  max_size=30)


@settings(max_examples=200, deadline=None)
@given(marks=_marks, cleared=st.lists(st.integers(0, 31), max_size=5))
def test_atomic_and_fallback_marking_agree(marks: list[tuple[int, int]],
                                           cleared: list[int]) -> None:
    """The compiled atomic OR sets exactly the bits the Python fallback sets (and counts
    the same writes past the end), with the front-end clearing bytes in between."""
    a, b = DirtyLog(bytearray(32)), DirtyLog(bytearray(32), atomic=False)
    for i, (gpa, n) in enumerate(marks):
        a.mark(gpa, n)
        b.mark(gpa, n)
        if i < len(cleared):
            a.buf[cleared[i]] = 0
            b.buf[cleared[i]] = 0
    assert bytes(a.buf) == bytes(b.buf) and a.beyond == b.beyond


def test_marking_never_clears_a_bit_another_writer_set() -> None:
    """A bit set by another writer between our reads is kept (an OR, not a store)."""
    buf = bytearray(4)
    log = DirtyLog(buf)
    buf[0] = 0b1000_0000  # another back-end of the same guest
    log.mark(0, 4096 * 3)
    assert buf[0] == 0b1000_0111


# -- GET_VRING_BASE with requests in flight ----------------------------------------------------


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_stopping_a_slow_disk_completes_its_delayed_requests_first(packed: bool) -> None:
    """vhost-user.rst "Migrating back-end state": the index GET_VRING_BASE returns is where
    the destination resumes, so every request popped before it is completed first (the
    latency is cut short), written to disk and in the used ring; nothing fires later."""
    r = BlkRig(lambda d: BlkDevice(d, latency=5.0), inflight=True, packed=packed)
    r.disk.data[1024:1536] = b"r" * 512
    ops = r.submit(*[BlkOp("write", 0, data=b"w" * 512), BlkOp("read", 1024, length=512),
                     BlkOp("write", 512, data=b"x" * 512)])
    r.process()
    assert r.driver.reap() == []  # all three wait out the latency
    ring = r.queues.rings[0]
    r.dev.on_event(ev.VringStopping(0))  # what the core sends before reading the base
    assert {id(o) for o in r.driver.reap()} == {id(o) for o in ops}
    assert all(o.ok for o in ops) and ops[1].data == b"r" * 512
    assert r.disk.data[:1024] == b"w" * 512 + b"x" * 512
    assert r.queues.notified
    if not packed:
        assert ring.next_avail == ring.used_idx == 3  # a consistent base: nothing in flight
    tracker = r.dev._trackers[0]
    assert tracker.in_flight == 0  # nothing left in flight in the inflight area either
    r.dev.on_event(ev.VringStopped(0, 3))
    assert r.queues.timers.advance(10.0) == 0  # the cancelled timer never fires


def test_get_vring_base_tells_the_device_before_reading_the_base() -> None:
    """The core's order: VringStopping is delivered (the device completes what it holds)
    while the engine still stands, then the base is read, then VringStopped."""
    seen: list[tuple[str, int | None]] = []
    conn, _host, fds = session(ring_factory=default_ring_factory)

    def watch(e: ev.Event) -> None:
        if isinstance(e, ev.VringStopping | ev.VringStopped):
            v = conn.vrings[e.index]
            seen.append((type(e).__name__, None if v.engine is None else v.engine.base()))

    conn.dispatcher.subscribe(watch)
    feed(conn, req(R.SET_VRING_NUM, P.VringState(index=0, num=256)))
    feed(conn, req(R.SET_VRING_BASE, P.VringState(index=0, num=5)))
    feed(conn, req(R.SET_VRING_ADDR, ring_addr(0)))
    feed(conn, req(R.SET_VRING_KICK, P.VringFile(index=0)), fds.take(1))
    conn.kick(0)
    feed(conn, req(R.GET_VRING_BASE, P.VringState(index=0, num=0)))
    assert seen == [("VringStopping", 5), ("VringStopped", None)]
    (r,) = replies(conn)
    assert struct.unpack("<II", r[2]) == (0, 5)
