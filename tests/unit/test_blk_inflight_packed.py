"""Inflight tracking of packed rings (vhost-user.rst "Inflight I/O tracking", packed
virtqueue): the tracker's stores at hand-written offsets of ``QueueRegionPacked`` /
``DescStatePacked``, recovery from a crash at every step (commit or roll back), resubmission
from the descriptor copies exactly once, and hostile areas refused with clear errors and
nothing written."""

from __future__ import annotations

import contextlib
import random
import struct
from typing import Any

import pytest

from vhostuser.devices.blk import BlkDevice
from vhostuser.errors import RingError
from vhostuser.frontends.blk import BlkOp
from vhostuser.memory import FlatMemory
from vhostuser.virtq import (
    INITIAL_BASE,
    PackedDeviceRing,
    PackedDriverRing,
    encode_base,
    packed_layout,
)
from vhostuser.virtq.inflight import (
    InflightArea,
    InflightError,
    PackedInflightTracker,
    check_packed_region,
    inflight_area_bytes,
    prepare_fresh_packed_area,
)

from .blk_rig import Rig

SIZE = 8
DATA = 0x4000  # buffers start here in guest memory


# Hand-written layout (vhost-user.rst QueueRegionPacked / DescStatePacked).
def hdr(area: bytes | bytearray) -> dict[str, int]:
    names = ("features", "version", "desc_num", "free_head", "old_free_head", "used_idx",
             "old_used_idx", "used_wrap", "old_used_wrap")
    return dict(zip(names, struct.unpack_from("<QHHHHHHBB", area, 0), strict=True))


def ent(area: bytes | bytearray, i: int) -> dict[str, int]:
    names = ("inflight", "next", "last", "num", "counter", "id", "flags", "len", "addr")
    base = 32 + 32 * i
    return dict(zip(names, struct.unpack_from("<BxHHHQHHIQ", area, base), strict=True))


def put_hdr(area: bytearray, **kw: int) -> None:
    h = hdr(area)
    h.update(kw)
    struct.pack_into("<QHHHHHHBB", area, 0, *h.values())


def put_ent(area: bytearray, i: int, **kw: int) -> None:
    e = ent(area, i)
    e.update(kw)
    struct.pack_into("<BxHHHQHHIQ", area, 32 + 32 * i, *e.values())


class Ring:
    """Guest memory with a packed ring (driver and device sides) and an inflight area."""

    def __init__(self, size: int = SIZE) -> None:
        self.size = size
        self.buf = bytearray(1 << 16)
        self.mem = FlatMemory(self.buf)
        self.desc, self.drv_ev, self.dev_ev, _ = packed_layout(size, 0)
        self.area_buf = bytearray(inflight_area_bytes(1, size, True))
        self.area = InflightArea(memoryview(self.area_buf), 1, size, True)
        self.drv: PackedDriverRing[int] = PackedDriverRing(
            self.mem, size, self.desc, self.drv_ev, self.dev_ev, event_idx=False)
        prepare_fresh_packed_area(self.area)

    def offer(self, ndesc: list[int], first_token: int = 0) -> list[int]:
        """Make buffers of ``ndesc[k]`` descriptors available; return their tokens."""
        toks = []
        for k, n in enumerate(ndesc):
            tok = first_token + k
            bufs = [(DATA + 0x100 * tok + 16 * j, 16, j == n - 1) for j in range(n)]
            assert self.drv.add(bufs, tok, indirect=False)
            toks.append(tok)
        self.drv.publish()
        return toks

    def device(self, base: int = INITIAL_BASE) -> PackedDeviceRing:
        return PackedDeviceRing(self.mem, self.size, self.desc, self.drv_ev, self.dev_ev,
                                event_idx=False, indirect=False, base=base)

    def recover(self) -> tuple[PackedDeviceRing, PackedInflightTracker, Any]:
        """A restarted back-end at ring start, with QEMU's stale base (the initial one)."""
        ring = self.device()
        tr = PackedInflightTracker(self.area, 0, self.size)
        return ring, tr, tr.recover(ring)


def started(r: Ring) -> tuple[PackedDeviceRing, PackedInflightTracker]:
    ring = r.device()
    tr = PackedInflightTracker(r.area, 0, r.size)
    rec = tr.recover(ring)
    assert rec.initialized and rec.buffers == ()
    return ring, tr


# -- the stores, at the spec's offsets ---------------------------------------------------------


def test_fresh_area_and_initialization() -> None:
    r = Ring()
    h = hdr(r.area_buf)
    assert (h["version"], h["desc_num"], h["used_wrap"], h["old_used_wrap"]) == (0, SIZE, 1, 1)
    assert [ent(r.area_buf, i)["next"] for i in range(SIZE)] == list(range(1, SIZE + 1))
    started(r)
    h = hdr(r.area_buf)
    assert (h["version"], h["free_head"], h["old_free_head"], h["used_idx"]) == (1, 0, 0, 0)


def test_tracker_stores_follow_the_spec() -> None:
    r = Ring()
    ring, tr = started(r)
    r.offer([2, 1])
    chains = ring.pop(8)
    tr.popped(ring, [c.head for c in chains])
    h = hdr(r.area_buf)
    assert (h["free_head"], h["old_free_head"]) == (3, 3)
    e0, e1, e2 = (ent(r.area_buf, i) for i in range(3))
    # Buffer 0: head entry 0 (two descriptors, the last in entry 1), counter 0.
    assert (e0["inflight"], e0["num"], e0["last"], e0["counter"]) == (1, 2, 1, 0)
    assert (e0["addr"], e0["len"]) == (DATA, 16)
    assert (e1["addr"], e1["id"], e1["inflight"]) == (DATA + 16, chains[0].head, 0)
    assert e0["flags"] & 1 and not e1["flags"] & 1  # NEXT on the first only
    assert (e2["inflight"], e2["num"], e2["last"], e2["counter"]) == (1, 1, 2, 1)
    assert e2["id"] == chains[1].head
    # Complete the second buffer first: its entry goes back on the free list.
    tr.completing([chains[1].head])
    assert (hdr(r.area_buf)["free_head"], ent(r.area_buf, 2)["next"]) == (2, 3)
    assert (hdr(r.area_buf)["used_idx"], hdr(r.area_buf)["old_used_idx"]) == (1, 0)
    ring.push([(chains[1].head, 0)])
    tr.completed(ring, [chains[1].head])
    h = hdr(r.area_buf)
    assert (h["old_free_head"], h["old_used_idx"], ent(r.area_buf, 2)["inflight"]) == (2, 1, 0)
    assert [tok for tok, _ in r.drv.reap()] == [1]


# -- crash at every step ------------------------------------------------------------------------


def _scenario(point: int) -> tuple[Ring, list[int], list[int]]:
    """Pop four buffers (1, 3, 1, 2 descriptors), complete buffers 2 and 0 out of order;
    stop ("crash") at ``point``, some points in the middle of a step."""
    r = Ring()
    ring, tr = started(r)
    toks = r.offer([1, 3, 1, 2])
    ids = [c.head for c in ring.pop(8)]
    if point == 0:
        return r, toks, ids  # popped, untracked
    tr.popped(ring, ids[:2])
    if point == 1:
        # The third buffer half-recorded: head entry flagged, free_head moved, not committed.
        put_ent(r.area_buf, 4, inflight=1, counter=2, num=0)
        put_hdr(r.area_buf, free_head=5)
        return r, toks, ids
    tr.popped(ring, ids[2:])
    if point == 2:
        return r, toks, ids  # all tracked
    batch = [ids[2], ids[0]]
    tr.completing(batch)
    if point == 3:
        return r, toks, ids  # entries linked back, used_idx moved, not published
    ring.push([(i, 0) for i in batch])
    if point == 4:
        return r, toks, ids  # published, flags still set, old_* stale
    if point == 5:
        put_ent(r.area_buf, 4, inflight=0)  # one flag of the batch cleared
        return r, toks, ids
    tr.completed(ring, batch)
    return r, toks, ids  # done


@pytest.mark.parametrize(
    ("point", "expect", "committed"),
    [
        (0, None, False),  # nothing recorded: popped again from the ring
        (1, [0, 1], False),  # the half-recorded third buffer is popped again
        (2, [0, 1, 2, 3], False),
        (3, [0, 1, 2, 3], False),  # rolled back: the batch was not published
        (4, [1, 3], True),  # committed: the ring shows the batch
        (5, [1, 3], True),
        (6, [1, 3], False),
    ],
)
def test_crash_at_every_step_resubmits_exactly_the_unpublished(
        point: int, expect: list[int] | None, committed: bool) -> None:
    c, toks, ids = _scenario(point)
    reaped_before = [t for t, _ in c.drv.reap()]
    ring, tr, rec = c.recover()
    assert rec.committed == committed
    if expect is None:
        assert rec.buffers == () and (rec.next_avail, rec.used_idx) == (0, 0)
        assert [ch.head for ch in ring.pop(8)] == ids
        return
    assert [b[-1][2] for b in rec.buffers] == [ids[i] for i in expect]  # counter order
    chains = ring.resubmit(rec.buffers, next_avail=rec.next_avail, avail_wrap=rec.avail_wrap,
                           used_idx=rec.used_idx, used_wrap=rec.used_wrap)
    assert [ch.head for ch in chains] == [ids[i] for i in expect]
    # The copies rebuild the same buffers: the writable (last) descriptor of each.
    ndesc = [1, 3, 1, 2]
    for i, ch in zip(expect, chains, strict=True):
        assert ch.writable_gpas == [(DATA + 0x100 * toks[i] + 16 * (ndesc[i] - 1), 16)]
        assert ch.ring_descs == ndesc[i]
    rest = ring.pop(8)  # buffers popped but never recorded come again from the ring
    for ch in rest:
        tr.popped(ring, [ch.head])
    all_ids = [ch.head for ch in chains] + [ch.head for ch in rest]
    tr.completing(all_ids)
    ring.push([(i, 0) for i in all_ids])
    tr.completed(ring, all_ids)
    after = [t for t, _ in c.drv.reap()]
    assert sorted(reaped_before + after) == toks  # every request exactly once
    assert not any(ent(c.area_buf, i)["inflight"] for i in range(SIZE))
    again = PackedInflightTracker(c.area, 0, SIZE).recover(c.device())
    assert again.buffers == () and (again.used_idx, again.next_avail) == (7, 7)


@pytest.mark.parametrize("start", [0, SIZE - 2], ids=["no-wrap", "wrap"])
def test_crash_inside_push_rolls_back_and_unmarks_the_half_written_batch(start: int) -> None:
    """SIGKILL inside ``push``: every store of a two-buffer batch but the first used
    descriptor's flags (stored last). The driver has seen nothing; recovery rolls the batch
    back, makes its later used descriptor available again, and a different completion
    order afterwards shows the driver exactly what was completed."""
    r = Ring()
    ring, tr = started(r)
    if start:  # move both sides to slot ``start`` so the batch wraps the ring
        r.offer([1] * start, 100)
        pre = [c.head for c in ring.pop(8)]
        tr.popped(ring, pre)
        tr.completing(pre)
        ring.push([(i, 0) for i in pre])
        tr.completed(ring, pre)
        assert len(r.drv.reap()) == start
    toks = r.offer([1, 2, 1])  # A one slot, B two slots, C one slot
    ids = [c.head for c in ring.pop(8)]
    tr.popped(ring, ids)
    tr.completing(ids[:2])
    off = ring.used_idx * 16 + 14
    saved = bytes(r.buf[off : off + 2])
    ring.push([(i, 0) for i in ids[:2]])
    r.buf[off : off + 2] = saved  # the crash: the commit store never happened
    assert r.drv.reap() == []
    ring2, tr2, rec = r.recover()
    assert not rec.committed and [b[-1][2] for b in rec.buffers] == ids
    ring2.resubmit(rec.buffers, next_avail=rec.next_avail, avail_wrap=rec.avail_wrap,
                   used_idx=rec.used_idx, used_wrap=rec.used_wrap)
    for bid, tok in ((ids[2], toks[2]), (ids[0], toks[0]), (ids[1], toks[1])):
        tr2.completing([bid])
        ring2.push([(bid, 0)])
        tr2.completed(ring2, [bid])
        assert [t for t, _ in r.drv.reap()] == [tok]  # exactly this one, nothing stale


def test_wrap_around_many_laps() -> None:
    """Buffers of 1..3 descriptors completed out of order over many laps of a size-8 ring,
    a crash (a fresh tracker and ring on the same bytes) after every step."""
    rnd = random.Random(3)
    r = Ring()
    ring, tr = started(r)
    inflight: set[int] = set()
    done: list[int] = []
    tok = 0
    resubmitted = 0
    for _step in range(300):
        if rnd.random() < 0.5 and r.drv.num_free >= 3:
            r.offer([rnd.randint(1, 3)], tok)
            inflight.add(tok)
            tok += 1
            got = ring.pop(8)
            tr.popped(ring, [ch.head for ch in got])
        elif ring.in_flight:
            ids = [i for i in range(SIZE) if ring._ids[i] is not None]
            batch = rnd.sample(ids, rnd.randint(1, len(ids)))
            tr.completing(batch)
            ring.push([(i, 0) for i in batch])
            tr.completed(ring, batch)
            for t, _ in r.drv.reap():
                inflight.remove(t)
                done.append(t)
        if rnd.random() < 0.2:
            ring = r.device(encode_base(0, True, 0, True))  # stale base
            tr = PackedInflightTracker(r.area, 0, SIZE)
            rec = tr.recover(ring)
            ring.resubmit(rec.buffers, next_avail=rec.next_avail, avail_wrap=rec.avail_wrap,
                          used_idx=rec.used_idx, used_wrap=rec.used_wrap)
            resubmitted += len(rec.buffers)
            assert ring.in_flight == len(inflight)
    assert tok > 100 and resubmitted > 20
    assert len(done) == len(set(done))


# -- the device ---------------------------------------------------------------------------------


def test_device_on_a_packed_area_resubmits_after_a_crash() -> None:
    class Holding(BlkDevice):
        def submit(self, req: Any) -> None:
            self.stats["held"] += 1

    r = Rig(Holding, inflight=True, packed=True, queue_size=16, depth=8)
    ops = [BlkOp("write", 512 * i, data=bytes([i + 1]) * 512) for i in range(5)]
    r.submit(*ops)
    r.process()
    r.restart(lambda d: BlkDevice(d))
    assert r.dev.resubmitted == 5
    assert {id(o) for o in r.driver.reap()} == {id(o) for o in ops}
    assert r.disk.data[: 5 * 512] == b"".join(bytes([i + 1]) * 512 for i in range(5))
    assert r.one(BlkOp("read", 0, 512)).data == b"\x01" * 512


def test_device_refuses_a_hostile_packed_area_on_set_inflight_fd() -> None:
    r = Rig(lambda d: BlkDevice(d), inflight=True, packed=True)
    put_hdr(r.area_buf, version=1, free_head=40)
    with pytest.raises(InflightError, match=r"free_head 40 is outside 0\.\.32"):
        r.dev.on_inflight(r.area, fresh=False)


# -- hostile areas ------------------------------------------------------------------------------


def _same_id(a: bytearray) -> None:
    put_ent(a, 2, id=0)
    put_ent(a, 1, id=0)


def hostile() -> Ring:
    """Two buffers in flight (2 and 1 descriptors): entries 0-1 and 2, free list 3..7."""
    r = Ring()
    ring, tr = started(r)
    r.offer([2, 1])
    tr.popped(ring, [c.head for c in ring.pop(8)])
    return r


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda a: put_hdr(a, version=2), "version 2 is not 1"),
        (lambda a: put_hdr(a, features=1), "features 0x1 are unknown"),
        (lambda a: put_hdr(a, desc_num=16), "desc_num 16 is not the queue size 8"),
        (lambda a: put_hdr(a, free_head=9, old_free_head=9), "free_head 9 is outside 0..8"),
        (lambda a: put_hdr(a, used_idx=8), "used_idx 8 is outside 0..7"),
        (lambda a: put_hdr(a, old_used_wrap=2), "old_used_wrap_counter 2 is outside 0..1"),
        (lambda a: put_ent(a, 5, next=4), "loops back"),
        (lambda a: put_ent(a, 4, next=300), "leaves the pool"),
        (lambda a: put_ent(a, 0, num=0), r"desc\[0\].num 0 is outside 1..8"),
        (lambda a: put_ent(a, 0, num=9), r"desc\[0\].num 9 is outside 1..8"),
        (lambda a: put_ent(a, 0, last=2), "ends at entry 1 after 2 entries, but its last is 2"),
        (lambda a: put_ent(a, 0, next=3, last=3), "entry 3 of the buffer at desc.0. is also on the "
                                          "free list"),
        (lambda a: put_ent(a, 2, counter=0), "both in flight with counter 0"),
        (lambda a: _same_id(a), "both have id 0"),
        (lambda a: put_ent(a, 2, id=8), "has id 8, not below the queue size 8"),
        (lambda a: put_ent(a, 2, inflight=3), r"desc\[2\].inflight is 3"),
        (lambda a: put_ent(a, 2, counter=1 << 63), "counter 0x8000000000000000 is not sane"),
        (lambda a: put_ent(a, 2, inflight=0), "do not add up to desc_num 8"),
    ],
)
def test_hostile_fields(mutate: Any, match: str) -> None:
    r = hostile()
    mutate(r.area_buf)
    before = bytes(r.area_buf)
    with pytest.raises(InflightError, match=match):
        r.recover()
    assert bytes(r.area_buf) == before  # nothing written on refusal
    with pytest.raises(InflightError, match=match):
        check_packed_region(r.area.queue(0), SIZE)


def test_hostile_position_that_disagrees_with_the_ring() -> None:
    """The area claims buffers in flight where the ring has no available descriptors."""
    r = hostile()
    put_hdr(r.area_buf, used_idx=5, old_used_idx=5)
    with pytest.raises(InflightError, match=r"slot 5 .descriptor 0. has flags 0x0, not "
                                            "available"):
        r.recover()


def test_mapping_too_small_and_wrong_layout() -> None:
    with pytest.raises(InflightError, match="smaller than the 288 bytes"):
        check_packed_region(b"\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00" + bytes(100), SIZE)
    split = InflightArea(memoryview(bytearray(inflight_area_bytes(1, SIZE, False))), 1, SIZE,
                         False)
    with pytest.raises(InflightError, match="split layout"):
        PackedInflightTracker(split, 0, SIZE)
    r = Ring()
    with pytest.raises(InflightError, match="made for queue size 8, the ring has 16"):
        PackedInflightTracker(r.area, 0, 16)


def test_resubmit_refuses_copies_whose_next_flags_do_not_end_the_list() -> None:
    r = hostile()
    put_ent(r.area_buf, 1, flags=ent(r.area_buf, 1)["flags"] | 1)  # NEXT on the last
    ring, _tr, rec = r.recover()
    with pytest.raises(RingError, match="NEXT must be set on all but the last"):
        ring.resubmit(rec.buffers, next_avail=rec.next_avail, avail_wrap=rec.avail_wrap,
                      used_idx=rec.used_idx, used_wrap=rec.used_wrap)
    assert ring.broken is not None


def test_fuzzed_areas_never_escape_as_other_errors() -> None:
    rnd = random.Random(11)
    accepted = 0
    for _ in range(400):
        r = Ring()
        ring, tr = started(r)
        r.offer([rnd.randint(1, 2) for _ in range(rnd.randint(0, 4))])
        tr.popped(ring, [c.head for c in ring.pop(8)])
        for _ in range(rnd.randrange(1, 6)):
            pos = rnd.randrange(len(r.area_buf))
            r.area_buf[pos] = rnd.choice([0, 1, 2, 7, 8, 0xFF, rnd.randrange(256)])
        c = r
        with contextlib.suppress(InflightError):
            check_packed_region(c.area.queue(0), SIZE)
        try:
            ring2, _tr2, rec = c.recover()
        except InflightError:
            continue
        accepted += 1
        with contextlib.suppress(RingError):
            ring2.resubmit(rec.buffers, next_avail=rec.next_avail, avail_wrap=rec.avail_wrap,
                           used_idx=rec.used_idx, used_wrap=rec.used_wrap)
    assert accepted > 50  # harmless flips (padding, copies) are accepted
