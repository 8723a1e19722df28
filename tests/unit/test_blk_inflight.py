"""Inflight tracking (vhost-user.rst "Inflight I/O tracking", split rings): the tracker's
stores at hand-written offsets, recovery from a crash between any two of them, resubmission
in the original order exactly once, and hostile areas refused with clear errors."""

from __future__ import annotations

import random
import struct
from typing import Any

import pytest

from vhostuser.devices.blk import BlkDevice, BlkRequest, MemoryBackend
from vhostuser.frontends.blk import BlkOp
from vhostuser.memory import FlatMemory
from vhostuser.virtq import SplitDeviceRing, SplitDriverRing, split_layout
from vhostuser.virtq.inflight import (
    InflightArea,
    InflightError,
    SplitInflightTracker,
    check_split_region,
    inflight_area_bytes,
    inflight_queue_bytes,
    prepare_fresh_area,
)

from .blk_rig import Rig

SIZE = 8


# Hand-written layout (vhost-user.rst QueueRegionSplit / DescStateSplit).
def hdr(area: bytes | bytearray, q: int = 0, size: int = SIZE) -> tuple[int, ...]:
    """(features, version, desc_num, last_batch_head, used_idx) of queue ``q``."""
    base = q * inflight_queue_bytes(size, False)
    return struct.unpack_from("<QHHHH", area, base)


def desc(area: bytes | bytearray, i: int, q: int = 0, size: int = SIZE) -> tuple[int, int, int]:
    """(inflight, next, counter) of descriptor ``i``."""
    base = q * inflight_queue_bytes(size, False) + 16 + 16 * i
    inflight = area[base]
    (nxt,) = struct.unpack_from("<H", area, base + 6)
    (counter,) = struct.unpack_from("<Q", area, base + 8)
    return inflight, nxt, counter


def put_hdr(area: bytearray, *, features: int = 0, version: int = 1, desc_num: int = SIZE,
            lbh: int = 0, used: int = 0, q: int = 0) -> None:
    struct.pack_into("<QHHHH", area, q * inflight_queue_bytes(SIZE, False), features, version,
                     desc_num, lbh, used)


def put_desc(area: bytearray, i: int, inflight: int, nxt: int = 0, counter: int = 0) -> None:
    struct.pack_into("<B5xHQ", area, 16 + 16 * i, inflight, nxt, counter)


class Ring:
    """Guest memory with a split ring: a driver and a device side, and an inflight area."""

    def __init__(self, size: int = SIZE) -> None:
        self.size = size
        self.buf = bytearray(1 << 16)
        self.mem = FlatMemory(self.buf)
        self.desc, self.avail, self.used, _ = split_layout(size, 0)
        self.drv: SplitDriverRing[int] = SplitDriverRing(self.mem, size, self.desc, self.avail,
                                                         self.used, event_idx=False)
        self.area_buf = bytearray(inflight_area_bytes(1, size, False))
        self.area = InflightArea(memoryview(self.area_buf), 1, size, False)

    def offer(self, n: int) -> list[int]:
        """Make ``n`` one-descriptor chains available; return their tokens."""
        toks: list[int] = []
        for _ in range(n):
            tok = len(toks) + 1000 * self.drv.in_flight
            assert self.drv.add([(0x8000, 16, False)], tok)
            toks.append(tok)
        self.drv.publish()
        return toks

    def device(self, next_avail: int = 0) -> SplitDeviceRing:
        return SplitDeviceRing(self.mem, self.size, self.desc, self.avail, self.used,
                               event_idx=False, indirect=False, next_avail=next_avail)

    def avail_idx(self) -> int:
        return int(struct.unpack_from("<H", self.buf, self.avail + 2)[0])

    def used_idx(self) -> int:
        return int(struct.unpack_from("<H", self.buf, self.used + 2)[0])

    def copy(self) -> Ring:
        """The state a crash leaves: the same bytes, no process state."""
        c = Ring.__new__(Ring)
        c.size = self.size
        c.buf = bytearray(self.buf)
        c.mem = FlatMemory(c.buf)
        c.desc, c.avail, c.used = self.desc, self.avail, self.used
        c.area_buf = bytearray(self.area_buf)
        c.area = InflightArea(memoryview(c.area_buf), 1, self.size, False)
        return c

    def recover(self) -> tuple[SplitDeviceRing, SplitInflightTracker, Any]:
        """What a restarted back-end does at ring start (QEMU sends base = used.idx)."""
        ring = self.device(next_avail=self.used_idx())
        tr = SplitInflightTracker(self.area, 0, self.size)
        rec = tr.recover(ring.used_idx, self.avail_idx())
        return ring, tr, rec


def started(r: Ring) -> tuple[SplitDeviceRing, SplitInflightTracker]:
    """A ring started on a fresh area (version 0 -> initialized)."""
    prepare_fresh_area(r.area)
    ring = r.device()
    tr = SplitInflightTracker(r.area, 0, r.size)
    rec = tr.recover(ring.used_idx, r.avail_idx())
    assert rec.initialized and rec.heads == () and rec.next_avail is None
    return ring, tr


# -- the stores, at the spec's offsets ---------------------------------------------------------


def test_fresh_area_and_initialization() -> None:
    r = Ring()
    prepare_fresh_area(r.area)
    # libvhost-user stamps desc_num on GET_INFLIGHT_FD and leaves version 0.
    assert hdr(r.area_buf) == (0, 0, SIZE, 0, 0)
    assert check_split_region(r.area.queue(0), SIZE) == 0
    started(r)
    assert hdr(r.area_buf) == (0, 1, SIZE, 0, 0)


def test_tracker_stores_follow_the_spec() -> None:
    r = Ring()
    ring, tr = started(r)
    r.offer(4)
    chains = ring.pop(8)
    heads = [c.head for c in chains]
    tr.popped(heads)
    for k, h in enumerate(heads):
        assert desc(r.area_buf, h) == (1, 0, k)
    assert tr.counter == 4 and tr.in_flight == 4
    batch = [heads[2], heads[0]]
    tr.completing(batch)
    # desc[i].next = last_batch_head; last_batch_head = i (a stack from the last one).
    assert desc(r.area_buf, heads[0])[1] == heads[2]
    assert hdr(r.area_buf)[3] == heads[0]
    ring.push([(h, 0) for h in batch])
    tr.completed(batch, ring.used_idx)
    assert desc(r.area_buf, heads[2])[0] == 0 and desc(r.area_buf, heads[0])[0] == 0
    assert desc(r.area_buf, heads[1])[0] == 1
    assert hdr(r.area_buf)[4] == 2  # used_idx
    assert tr.in_flight == 2


# -- crash at every point ---------------------------------------------------------------------


def _scenario() -> tuple[Ring, SplitDeviceRing, SplitInflightTracker, list[int], list[Ring]]:
    """Pop 5, complete heads 2 and 0 out of order, snapshotting after every step."""
    r = Ring()
    ring, tr = started(r)
    r.offer(5)
    heads = [c.head for c in ring.pop(8)]
    snaps = [r.copy()]  # 0: popped, nothing tracked (the pop itself stores nothing)
    tr.popped(heads)
    snaps.append(r.copy())  # 1: tracked
    batch = [heads[2], heads[0]]
    tr.completing(batch)
    snaps.append(r.copy())  # 2: batch linked, not published
    ring.push([(h, 0) for h in batch])
    snaps.append(r.copy())  # 3: published (used.idx moved), flags still set
    mid = r.copy()
    mid.area_buf[16 + 16 * batch[0]] = 0
    snaps.append(mid)  # 4: one flag of the batch cleared
    tr.completed(batch, ring.used_idx)
    snaps.append(r.copy())  # 5: done
    return r, ring, tr, heads, snaps


@pytest.mark.parametrize(
    ("point", "expect"),
    [
        (0, None),  # nothing recorded: re-popped from the avail ring
        (1, [0, 1, 2, 3, 4]),
        (2, [0, 1, 2, 3, 4]),
        (3, [1, 3, 4]),
        (4, [1, 3, 4]),
        (5, [1, 3, 4]),
    ],
)
def test_crash_at_every_point_resubmits_exactly_the_unpublished(point: int,
                                                              expect: list[int] | None) -> None:
    _r, _ring, _tr, heads, snaps = _scenario()
    c = snaps[point]
    ring, tr, rec = c.recover()
    if expect is None:
        # Popped but untracked: the area says nothing is in flight, the ring resumes at
        # used.idx and pops the same chains again.
        assert rec.heads == () and rec.next_avail == 0
        assert [ch.head for ch in ring.pop(8)] == heads
        return
    want = [heads[i] for i in expect]
    assert list(rec.heads) == want  # in pop (counter) order
    assert rec.next_avail == c.used_idx() + len(want)
    assert rec.cleared == (2 if point == 3 else 1 if point == 4 else 0)
    # The region is repaired: used_idx follows used.idx, only the unpublished are flagged.
    assert hdr(c.area_buf)[4] == c.used_idx()
    assert [i for i in range(SIZE) if desc(c.area_buf, i)[0]] == sorted(want)
    chains = ring.resubmit(rec.heads, rec.next_avail)
    assert [ch.head for ch in chains] == want
    assert ring.pop(8) == []  # nothing else is pending
    # Completing them all returns every token exactly once on the driver side.
    tr.completing(list(rec.heads))
    ring.push([(h, 0) for h in rec.heads])
    tr.completed(list(rec.heads), ring.used_idx)
    assert [i for i in range(SIZE) if desc(c.area_buf, i)[0]] == []
    # A second recovery (crash right after) finds nothing to do.
    again = SplitInflightTracker(c.area, 0, SIZE).recover(ring.used_idx, c.avail_idx())
    assert again.heads == () and again.cleared == 0


def test_counter_continues_after_recovery() -> None:
    _r, _ring, _tr, _heads, snaps = _scenario()
    c = snaps[5]
    ring, tr, rec = c.recover()
    ring.resubmit(rec.heads, rec.next_avail)
    assert tr.counter == 5  # max counter (4) + 1
    drv = _HandDriver(c)
    drv.add([(0x8000, 16, False)], 99)
    drv.publish()
    (chain,) = ring.pop(8)
    tr.popped([chain.head])
    assert desc(c.area_buf, chain.head)[2] == 5


class _HandDriver:
    """Adds a one-descriptor chain at a free head by hand (the copy has no driver state)."""

    def __init__(self, c: Ring) -> None:
        self.c = c

    def add(self, bufs: list[tuple[int, int, bool]], token: int) -> bool:
        c = self.c
        head = SIZE - 1
        struct.pack_into("<QIHH", c.buf, c.desc + 16 * head, bufs[0][0], bufs[0][1], 0, 0)
        idx = c.avail_idx()
        struct.pack_into("<H", c.buf, c.avail + 4 + 2 * (idx % SIZE), head)
        self._idx = (idx + 1) & 0xFFFF
        return True

    def publish(self) -> None:
        struct.pack_into("<H", self.c.buf, self.c.avail + 2, self._idx)


def test_batch_of_one_area_as_libvhost_user_writes_it() -> None:
    """libvhost-user completes one head at a time: last_batch_head = head, a stale next."""
    r = Ring()
    ring, tr = started(r)
    r.offer(3)
    heads = [c.head for c in ring.pop(8)]
    tr.popped(heads)
    for h in (heads[1],):
        tr.completing([h])
        ring.push([(h, 0)])  # crash before completed()
    c = r.copy()
    _ring, _tr, rec = c.recover()
    assert list(rec.heads) == [heads[0], heads[2]] and rec.cleared == 1


def test_ring_recreated_with_nothing_in_flight_resyncs_used_idx() -> None:
    """A driver reset re-creates the ring at used.idx 0 while the area says 300."""
    r = Ring()
    prepare_fresh_area(r.area)
    put_hdr(r.area_buf, used=300)
    ring = r.device()
    tr = SplitInflightTracker(r.area, 0, SIZE)
    rec = tr.recover(ring.used_idx, r.avail_idx())
    assert rec.heads == () and rec.next_avail == 0
    assert hdr(r.area_buf)[4] == 0


def test_stop_and_restart_without_crash_resubmits_nothing() -> None:
    r = Rig(lambda d: BlkDevice(d), inflight=True)
    for i in range(20):
        assert r.one(BlkOp("write", 512 * i, data=bytes([i]) * 512)).ok
    r.restart()  # a clean stop/start looks the same to the area
    assert r.dev.resubmitted == 0
    assert r.one(BlkOp("read", 0, 512)).data == b"\x00" * 512


# -- the device: resubmission after a crash, exactly once, in order ----------------------------


class Holding(BlkDevice):
    """Keeps requests in flight (a slow disk) until told to complete them."""

    def __init__(self, disk: MemoryBackend, **kw: Any) -> None:
        super().__init__(disk, **kw)
        self.held: list[BlkRequest] = []

    def submit(self, req: BlkRequest) -> None:
        self.held.append(req)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_device_resubmits_in_original_order_after_a_crash(packed: bool) -> None:
    r = Rig(Holding, inflight=True, queue_size=32, depth=8, packed=packed)
    ops = [BlkOp("write", 512 * i, data=bytes([i + 1]) * 512) for i in range(6)]
    r.submit(*ops)
    r.process()
    dev: Holding = r.dev
    assert len(dev.held) == 6
    # Complete two out of order, then the back-end dies with four in flight.
    for req in (dev.held[4], dev.held[1]):
        dev.complete(req, dev.execute(req))
    dev.flush_completions(0)
    done = r.driver.reap()
    assert {id(o) for o in done} == {id(ops[4]), id(ops[1])}
    order: list[int] = []

    class Recording(BlkDevice):
        def execute(self, req: BlkRequest) -> int:
            order.append(req.sector)
            return super().execute(req)

    r.restart(lambda d: Recording(d))
    assert r.dev.resubmitted == 4
    assert order == [0, 2, 3, 5]  # original submission order, completed ones skipped
    rest = r.driver.reap()
    assert {id(o) for o in rest} == {id(ops[i]) for i in (0, 2, 3, 5)}
    assert all(o.ok for o in ops)
    assert r.disk.data[: 6 * 512] == b"".join(bytes([i + 1]) * 512 for i in range(6))
    # New requests go on normally; nothing is completed twice.
    assert r.one(BlkOp("read", 512, 512)).data == b"\x02" * 512
    assert r.driver.reap() == []


def test_resubmission_waits_for_the_ring_to_be_enabled() -> None:
    r = Rig(Holding, inflight=True)
    r.submit(BlkOp("write", 0, data=b"w" * 512))
    r.process()
    r.dev = BlkDevice(r.disk)
    r.queues.rings.clear()
    r.dev.attach(r.queues)
    r.give_inflight(fresh=False, area_buf=r.area_buf)
    r.queues.enabled_set.clear()
    r.start_ring(0, r.driver.used_idx(), enable=False)
    assert r.dev.resubmitted == 0 and r.disk.data[:512] == bytes(512)
    r.enable(0)
    assert r.dev.resubmitted == 1 and r.disk.data[:512] == b"w" * 512
    (op,) = r.driver.reap()
    assert op.ok


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_randomized_crashes_complete_every_request_exactly_once(packed: bool) -> None:
    rnd = random.Random(5)
    resubmitted = 0
    for _trial in range(30):
        r = Rig(Holding, inflight=True, queue_size=32, depth=8, disk=64 * 512, packed=packed)
        model = bytearray(64 * 512)
        completed: dict[int, int] = {}
        submitted = 0
        busy: set[int] = set()
        for _step in range(40):
            dev: Holding = r.dev
            act = rnd.random()
            if act < 0.45 and r.driver.free_slots:
                blk = rnd.choice([b for b in range(64) if b not in busy])
                data = rnd.randbytes(512)
                op = BlkOp("write", blk * 512, data=data, token=submitted)
                submitted += 1
                busy.add(blk)
                model[blk * 512 : blk * 512 + 512] = data
                r.submit(op)
                r.process()
            elif act < 0.85 and dev.held:
                k = rnd.randrange(1, len(dev.held) + 1)
                picked = rnd.sample(dev.held, k)
                for req in picked:
                    dev.held.remove(req)
                    dev.complete(req, dev.execute(req))
                dev.flush_completions(0)
            else:
                r.restart()
                resubmitted += r.dev.resubmitted
            for op in r.driver.reap():
                assert op.ok
                assert op.token not in completed, "completed twice"
                completed[op.token] = 1
                busy.discard(op.offset // 512)
        # Drain: a back-end that completes everything.
        r.restart(lambda d: BlkDevice(d))
        r.process()
        for op in r.driver.reap():
            assert op.token not in completed
            completed[op.token] = 1
        assert len(completed) == submitted
        assert r.disk.data == model
    assert resubmitted > 50  # the crashes did leave requests in flight


# -- hostile areas ---------------------------------------------------------------------------


def hostile(mutate: Any) -> tuple[Ring, bytearray]:
    r = Ring()
    ring, tr = started(r)
    r.offer(3)
    heads = [c.head for c in ring.pop(8)]
    tr.popped(heads)
    mutate(r.area_buf)
    return r, bytes(r.area_buf)  # type: ignore[return-value]


def _same_counter(a: bytearray) -> None:
    put_desc(a, 0, 1, 0, 9)
    put_desc(a, 1, 1, 0, 9)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda a: put_hdr(a, desc_num=SIZE * 2), "desc_num 16 is not the queue size 8"),
        (lambda a: put_hdr(a, desc_num=4), "desc_num 4 is not the queue size 8"),
        (lambda a: put_hdr(a, version=2), "version 2 is not 1"),
        (lambda a: put_hdr(a, features=4), "features 0x4 are unknown"),
        (lambda a: put_hdr(a, lbh=SIZE), "last_batch_head 8 is outside"),
        (lambda a: put_hdr(a, lbh=0xFFFF), "last_batch_head 65535 is outside"),
        (lambda a: put_desc(a, 5, 7), r"desc\[5\].inflight is 7"),
        (lambda a: _same_counter(a), "both in flight"),
        (lambda a: put_desc(a, 0, 1, 0, 1 << 63), "counter 0x8000000000000000"),
    ],
)
def test_hostile_static_fields(mutate: Any, match: str) -> None:
    r, _ = hostile(mutate)
    with pytest.raises(InflightError, match=match):
        check_split_region(r.area.queue(0), SIZE, "inflight queue 0")
    ring = r.device()
    before = bytes(r.area_buf)
    with pytest.raises(InflightError, match=match):
        SplitInflightTracker(r.area, 0, SIZE).recover(ring.used_idx, r.avail_idx())
    assert bytes(r.area_buf) == before  # nothing written on refusal


def test_hostile_counts_that_disagree_with_the_ring() -> None:
    # More in flight than the driver ever made available beyond used.idx (3).
    def all_in_flight(a: bytearray) -> None:
        for i in range(SIZE):
            put_desc(a, i, 1, 0, 100 + i)

    r, _ = hostile(all_in_flight)
    with pytest.raises(InflightError, match="8 heads are in flight but the driver has only 3"):
        r.recover()
    # used.idx far past the region's used_idx with heads in flight.
    r, _ = hostile(lambda a: put_hdr(a, used=65535 - 20))
    struct.pack_into("<H", r.buf, r.used + 2, 0)
    with pytest.raises(InflightError, match="more than the queue size 8"):
        r.recover()


def test_hostile_last_batch_list() -> None:
    # used.idx is 3 ahead of used_idx: walk 3 entries from last_batch_head.
    def loop(a: bytearray) -> None:
        put_hdr(a, lbh=1, used=0)
        put_desc(a, 1, 1, 2, 1)
        put_desc(a, 2, 1, 1, 2)  # 1 -> 2 -> 1: a loop

    r, _ = hostile(loop)
    struct.pack_into("<H", r.buf, r.used + 2, 3)
    with pytest.raises(InflightError, match="loops back"):
        r.recover()

    def far(a: bytearray) -> None:
        put_hdr(a, lbh=1, used=0)
        put_desc(a, 1, 1, 4000, 1)

    r, _ = hostile(far)
    struct.pack_into("<H", r.buf, r.used + 2, 2)
    with pytest.raises(InflightError, match=r"desc\[1\].next 4000 of the last batch"):
        r.recover()


def test_mapping_too_small_and_wrong_geometry() -> None:
    need = inflight_area_bytes(2, SIZE, False)
    with pytest.raises(ValueError, match=f"smaller than the {need} bytes"):
        InflightArea(memoryview(bytearray(need - 1)), 2, SIZE, False)
    area = InflightArea(memoryview(bytearray(need)), 2, SIZE, False)
    with pytest.raises(InflightError, match="queue 2 is not in the area"):
        SplitInflightTracker(area, 2, SIZE)
    with pytest.raises(InflightError, match="made for queue size 8, the ring has 16"):
        SplitInflightTracker(area, 0, 16)
    with pytest.raises(InflightError, match="smaller than the 144 bytes"):
        check_split_region(b"\x01\x00" * 20, SIZE)
    packed = InflightArea(memoryview(bytearray(inflight_area_bytes(1, SIZE, True))), 1, SIZE,
                          True)
    with pytest.raises(InflightError, match="packed layout"):
        SplitInflightTracker(packed, 0, SIZE)


def test_device_refuses_a_hostile_area_on_set_inflight_fd() -> None:
    r = Rig(lambda d: BlkDevice(d), inflight=True)
    put_hdr(r.area_buf, desc_num=1000 & 0xFFFF, version=1)
    with pytest.raises(InflightError, match="desc_num 1000 is not the queue size 32"):
        r.dev.on_inflight(r.area, fresh=False)


def test_area_changed_after_adoption_breaks_the_ring_not_the_process() -> None:
    """The front-end scribbles on the area between SET_INFLIGHT_FD and the ring start:
    the ring start reads it once more, refuses it and marks the queue broken."""
    r = Rig(Holding, inflight=True)
    r.submit(BlkOp("write", 0, data=b"w" * 512))
    r.process()
    r.dev = BlkDevice(r.disk)
    r.queues.rings.clear()
    r.dev.attach(r.queues)
    r.give_inflight(fresh=False, area_buf=r.area_buf)  # passes the checks
    struct.pack_into("<H", r.area_buf, 12, 0xFFF0)  # last_batch_head out of range
    struct.pack_into("<H", r.buf, r.layouts[0].used + 2, 1)
    r.start_ring(0, 0)
    assert "last_batch_head 65520" in r.queues.broken[0]
    assert r.dev.resubmitted == 0


def test_fuzzed_areas_never_escape_as_other_errors() -> None:
    rnd = random.Random(7)
    for _ in range(400):
        r = Ring()
        ring, tr = started(r)
        r.offer(rnd.randrange(0, SIZE + 1))
        chains = ring.pop(rnd.randrange(0, SIZE + 1))
        tr.popped([c.head for c in chains])
        # Flip random bytes of the header and entries.
        for _ in range(rnd.randrange(1, 8)):
            pos = rnd.randrange(len(r.area_buf))
            r.area_buf[pos] = rnd.choice([0, 1, 2, 0xFF, rnd.randrange(256)])
        if rnd.random() < 0.3:
            struct.pack_into("<H", r.buf, r.used + 2, rnd.randrange(0x10000))
        c = r.copy()
        try:
            ring2, _tr2, rec = c.recover()
        except InflightError:
            continue
        if rec.next_avail is None:
            continue
        assert all(0 <= h < SIZE for h in rec.heads)
        assert len(set(rec.heads)) == len(rec.heads)
        try:
            ring2.resubmit(rec.heads, rec.next_avail)
        except Exception as e:  # a garbage head's chain may be invalid: a RingError
            from vhostuser.errors import RingError

            assert isinstance(e, RingError), e


def test_each_queue_has_its_own_region() -> None:
    r = Rig(lambda d: Holding(d, num_queues=2), inflight=True, num_queues=2)
    a = r.submit(BlkOp("write", 0, data=b"a" * 512), index=0)
    b = r.submit(BlkOp("write", 512, data=b"b" * 512), BlkOp("write", 1024, data=b"c" * 512),
                 index=1)
    r.process(0)
    r.process(1)
    # Queue 1's region starts one aligned queue region after queue 0's.
    assert desc(r.area_buf, 0, q=0, size=32)[0] == 1
    assert [desc(r.area_buf, h, q=1, size=32)[0] for h in (0, 3)] == [1, 1]
    r.restart(lambda d: BlkDevice(d, num_queues=2))
    assert r.dev.resubmitted == 3
    assert [o.ok for o in r.drivers[0].reap()] == [True]
    assert len(r.drivers[1].reap()) == 2
    assert all(o.ok for o in a + b)
    assert r.disk.data[:1536] == b"a" * 512 + b"b" * 512 + b"c" * 512


# -- latency (a slow disk): requests stay in flight, then complete; a crash meanwhile ----------


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_latency_holds_requests_in_flight_then_completes_them(packed: bool) -> None:
    r = Rig(lambda d: BlkDevice(d, latency=0.5), inflight=True, packed=packed)
    ops = r.submit(*[BlkOp("write", 512 * i, data=bytes([i + 1]) * 512) for i in range(4)])
    r.process()
    assert r.driver.reap() == [] and r.disk.data[:512] == bytes(512)  # nothing carried out
    assert r.queues.timers.advance(0.4) == 0
    assert r.queues.timers.advance(0.2) == 1  # one burst, one timer
    assert {id(o) for o in r.driver.reap()} == {id(o) for o in ops}
    assert all(o.ok for o in ops) and r.queues.notified
    assert r.disk.data[: 4 * 512] == b"".join(bytes([i + 1]) * 512 for i in range(4))


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_crash_during_latency_resubmits_each_request_once(packed: bool) -> None:
    r = Rig(lambda d: BlkDevice(d, latency=2.0), inflight=True, packed=packed)
    ops = r.submit(*[BlkOp("write", 512 * i, data=bytes([9 - i]) * 512) for i in range(3)])
    r.process()
    old = r.queues
    r.restart(lambda d: BlkDevice(d))  # the slow back-end dies; a new one takes over
    assert r.dev.resubmitted == 3
    assert {id(o) for o in r.driver.reap()} == {id(o) for o in ops}
    assert old.timers.pending  # the dead one's timers never fire (its process is gone)
    assert r.driver.reap() == []


def test_delayed_requests_across_ring_stop_rebuild_and_breakage() -> None:
    from vhostuser.connection import events as ev

    # Stopped: the batch is cancelled; the requests stay in flight in the inflight area.
    r = Rig(lambda d: BlkDevice(d, latency=1.0), inflight=True)
    r.submit(BlkOp("write", 0, data=b"a" * 512))
    r.process()
    r.dev.on_event(ev.VringStopped(0, 0))
    assert r.queues.timers.advance(2.0) == 0  # cancelled
    assert r.disk.data[:512] == bytes(512)
    # Rebuilt on a new memory table (the core's _rebuild_engine): the new ring adopts the
    # chains in flight and the batch completes on it.
    r2 = Rig(lambda d: BlkDevice(d, latency=1.0))
    (op,) = r2.submit(BlkOp("write", 0, data=b"b" * 512))
    r2.process()
    old = r2.queues.rings[0]
    new = r2.device_ring(0, old.next_avail)
    new.adopt_in_flight(old)
    r2.queues.rings[0] = new
    assert r2.queues.timers.advance(2.0) == 1
    assert r2.disk.data[:512] == b"b" * 512 and r2.driver.reap() == [op] and op.ok
    # Broken meanwhile: nothing is carried out.
    r3 = Rig(lambda d: BlkDevice(d, latency=1.0))
    r3.submit(BlkOp("write", 0, data=b"c" * 512))
    r3.process()
    r3.queues.ring_broken(0, "test")
    assert r3.queues.timers.advance(2.0) == 1
    assert r3.disk.data[:512] == bytes(512)


def test_latency_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match=r"latency -1 s is outside 0\.\.3600"):
        BlkDevice(MemoryBackend(4096), latency=-1)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_resubmission_goes_to_the_ring_live_at_enable(packed: bool) -> None:
    """The ring is rebuilt (memory-table change) between its start and SET_VRING_ENABLE:
    the requests in flight are resubmitted on the ring that is live then."""
    from .blk_rig import FakeQueues

    r = Rig(Holding, inflight=True, packed=packed, queue_size=16, depth=8)
    ops = r.submit(*[BlkOp("write", 512 * i, data=bytes([i + 1]) * 512) for i in range(3)])
    r.process()
    r.dev = BlkDevice(r.disk)
    r.queues = FakeQueues()
    r.dev.attach(r.queues)
    r.give_inflight(fresh=False, area_buf=r.area_buf)
    r.start_ring(0, 0 if packed else r.driver.used_idx(), enable=False)
    old = r.queues.rings[0]
    new = r.device_ring(0, old.next_avail)
    new.adopt_in_flight(old)
    r.queues.rings[0] = new
    r.enable(0)
    assert r.dev.resubmitted == 3 and old.in_flight == 0
    assert {id(o) for o in r.driver.reap()} == {id(o) for o in ops}
    assert all(o.ok for o in ops) and not r.queues.broken


def test_a_device_bug_at_publication_breaks_the_queue_not_the_session() -> None:
    r = Rig(Holding, inflight=True)
    r.submit(BlkOp("write", 0, data=b"x" * 512))
    r.process()
    dev: Holding = r.dev
    dev.complete_head(0, 5, 0)  # head 5 was never popped
    assert dev.flush_completions(0) == 0
    assert "publishing completions failed" in r.queues.broken[0]
