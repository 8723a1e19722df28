"""Split ring device side: every docs/security.md "Rings" case, notifications, resume, base."""

from __future__ import annotations

import struct
from collections.abc import Sequence

import pytest

from vhostuser.errors import GuestMemoryError, RingError
from vhostuser.memory import FlatMemory, Region, RegionTable
from vhostuser.virtq import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    Chain,
    SplitDeviceRing,
    SplitDriverRing,
    run_burst,
    split_layout,
    vring_need_event,
)
from vhostuser.virtq.split import AVAIL_F_NO_INTERRUPT, USED_F_NO_NOTIFY

SIZE = 8
MEM = 1 << 16
DATA = 0x4000
TABLE = 0x8000  # indirect tables built by hand
DESC, AVAIL, USED, _TOTAL = split_layout(SIZE, 0)
N, W, IND = DESC_F_NEXT, DESC_F_WRITE, DESC_F_INDIRECT


class Ring:
    """A split ring in a bytearray, written by hand like a hostile guest would."""

    def __init__(self, size: int = SIZE, *, event_idx: bool = False, start: int = 0) -> None:
        self.size = size
        self.buf = bytearray(MEM)
        self.mem = FlatMemory(self.buf)
        self.desc, self.avail, self.used, _ = split_layout(size, 0)
        self.avail_idx = start
        struct.pack_into("<H", self.buf, self.avail + 2, start)
        struct.pack_into("<H", self.buf, self.used + 2, start)
        self.event_idx = event_idx
        self.start = start

    def device(self, *, indirect: bool = True) -> SplitDeviceRing:
        return SplitDeviceRing(
            self.mem,
            self.size,
            self.desc,
            self.avail,
            self.used,
            event_idx=self.event_idx,
            indirect=indirect,
            next_avail=self.start,
        )

    def d(self, i: int, addr: int, ln: int, flags: int = 0, nxt: int = 0) -> None:
        struct.pack_into("<QIHH", self.buf, self.desc + 16 * i, addr, ln, flags, nxt)

    def table(self, gpa: int, entries: Sequence[tuple[int, int, int, int]]) -> None:
        for k, e in enumerate(entries):
            struct.pack_into("<QIHH", self.buf, gpa + 16 * k, *e)

    def offer(self, *heads: int) -> None:
        for h in heads:
            struct.pack_into("<H", self.buf, self.avail + 4 + 2 * (self.avail_idx % self.size), h)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        struct.pack_into("<H", self.buf, self.avail + 2, self.avail_idx)

    def set_avail_idx(self, v: int) -> None:
        struct.pack_into("<H", self.buf, self.avail + 2, v)

    def u16(self, gpa: int) -> int:
        return int(struct.unpack_from("<H", self.buf, gpa)[0])

    def used_elem(self, slot: int) -> tuple[int, int]:
        a, b = struct.unpack_from("<II", self.buf, self.used + 4 + 8 * slot)
        return int(a), int(b)


def broken(dev: SplitDeviceRing, *fragments: str) -> str:
    """Pop, expect RingError, and check the ring stays broken with that reason."""
    with pytest.raises(RingError) as ei:
        dev.pop(64)
    msg = str(ei.value)
    assert dev.broken == msg
    for f in fragments:
        assert f in msg, (f, msg)
    assert dev.pop(64) == []
    assert not dev.should_notify()
    assert not dev.enable_notifications()
    # run_burst never raises for guest faults and reports the reason
    res = run_burst(dev, lambda cs: [], 64)
    assert res.broken == msg and res.popped == 0
    return msg


# -- construction ------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 3, 1000, 32769, 65536])
def test_bad_queue_size(size: int) -> None:
    mem = FlatMemory(bytearray(MEM))
    with pytest.raises(RingError, match=str(size)):
        SplitDeviceRing(mem, size, 0, 0x1000, 0x2000, event_idx=False, indirect=False)


@pytest.mark.parametrize(
    ("desc", "avail", "used", "what"),
    [
        (8, 0x1000, 0x2000, "descriptor table address 0x8 is not 16-byte"),
        (0, 0x1001, 0x2000, "available ring address 0x1001 is not 2-byte"),
        (0, 0x1000, 0x2002, "used ring address 0x2002 is not 4-byte"),
        (MEM - 64, 0x1000, 0x2000, "descriptor table at gpa 0xffc0"),
        (0, MEM - 4, 0x2000, "available ring at gpa 0xfffc"),
        (0, 0x1000, MEM - 8, "used ring at gpa 0xfff8"),
        (0, 0x1000, 1 << 40, "not inside one memory region"),
    ],
)
def test_bad_ring_areas(desc: int, avail: int, used: int, what: str) -> None:
    mem = FlatMemory(bytearray(MEM))
    with pytest.raises(RingError, match=what):
        SplitDeviceRing(mem, SIZE, desc, avail, used, event_idx=True, indirect=False)


def test_ring_before_any_memory_table() -> None:
    with pytest.raises(RingError, match="not inside one memory region"):
        SplitDeviceRing(RegionTable(), SIZE, 0, 0x1000, 0x2000, event_idx=False, indirect=False)


def test_bad_next_avail() -> None:
    r = Ring()
    with pytest.raises(RingError, match="65536"):
        SplitDeviceRing(
            r.mem, SIZE, r.desc, r.avail, r.used, event_idx=False, indirect=False, next_avail=65536
        )


def test_layout() -> None:
    d, a, u, total = split_layout(256, 0x1000)
    assert (d, a) == (0x1000, 0x1000 + 4096)
    assert u % 4 == 0 and u >= a + 6 + 512
    assert total == u + 6 + 8 * 256 - 0x1000
    with pytest.raises(ValueError):
        split_layout(3)
    with pytest.raises(ValueError):
        split_layout(8, 8)


# -- a good chain ------------------------------------------------------------------------
def test_pop_push_basic_chain_and_dirty_log() -> None:
    r = Ring()
    log: list[tuple[int, int]] = []
    r.mem.set_dirty_hook(lambda g, n: log.append((g, n)))
    r.buf[DATA : DATA + 5] = b"hello"
    r.d(3, DATA, 5, N, 6)
    r.d(6, DATA + 0x100, 4, W | N, 1)
    r.d(1, DATA + 0x200, 8, W)
    r.offer(3)
    dev = r.device()
    (c,) = dev.pop(8)
    assert (c.head, c.readable_len, c.writable_len, c.ring_descs) == (3, 5, 12, 3)
    assert c.read_bytes() == b"hello"
    assert c.writable_gpas == [(DATA + 0x100, 4), (DATA + 0x200, 8)]
    assert dev.in_flight == 1 and dev.next_avail == 1 and dev.base() == 1
    assert c.write_bytes(b"0123456") == 7
    dev.push([(3, 7)])
    assert r.used_elem(0) == (3, 7)
    assert r.u16(r.used + 2) == 1
    assert dev.in_flight == 0 and dev.used_idx == 1
    assert r.buf[DATA + 0x100 : DATA + 0x104] == b"0123"
    assert r.buf[DATA + 0x200 : DATA + 0x203] == b"456"
    # exactly the written bytes, the used element and used.idx are reported
    assert log == [(DATA + 0x100, 4), (DATA + 0x200, 3), (r.used + 4, 8), (r.used + 2, 2)]


def test_chain_write_bytes_offset_and_overflow() -> None:
    bufs = [memoryview(bytearray(3)), memoryview(bytearray(4))]
    c = Chain(0, [], bufs, 0, 7, [(0, 3), (8, 4)], 2)
    assert c.write_bytes(b"abcdefgh", 2) == 5
    assert bytes(bufs[0]) == b"\0\0a" and bytes(bufs[1]) == b"bcde"
    with pytest.raises(ValueError):
        c.write_bytes(b"x", -1)
    assert "head=0" in repr(c)


def test_buffer_split_across_two_regions() -> None:
    mem = RegionTable()
    lo, hi = bytearray(0x8000), bytearray(0x8000)
    mem.add(
        Region(guest_phys_addr=0, size=0x8000, userspace_addr=0, mmap_offset=0, buf=memoryview(lo))
    )
    mem.add(
        Region(
            guest_phys_addr=0x8000,
            size=0x8000,
            userspace_addr=0x8000,
            mmap_offset=0,
            buf=memoryview(hi),
        )
    )
    lo[0x7FFE:] = b"ab"
    hi[:2] = b"cd"
    d, a, u, _ = split_layout(SIZE, 0)
    struct.pack_into("<QIHH", lo, d, 0x7FFE, 4, 0, 0)
    struct.pack_into("<HH", lo, a + 2, 1, 0)
    dev = SplitDeviceRing(mem, SIZE, d, a, u, event_idx=False, indirect=False)
    (c,) = dev.pop(1)
    assert len(c.readable) == 2 and c.read_bytes() == b"abcd"


def test_indirect_chain_and_mixed_direct_then_indirect() -> None:
    r = Ring()
    r.buf[DATA : DATA + 2] = b"hi"
    r.table(TABLE, [(DATA, 2, N, 1), (DATA + 0x10, 6, W, 0)])
    r.d(0, DATA + 0x40, 1, N, 2)  # virtio 1.2 2.7.5.3.2: direct descriptors, then indirect
    r.d(2, TABLE, 32, IND | W)  # the WRITE bit of an indirect descriptor is ignored
    r.buf[DATA + 0x40] = ord("!")
    r.offer(0)
    (c,) = r.device().pop(4)
    assert c.read_bytes() == b"!hi" and c.writable_len == 6 and c.ring_descs == 4


def test_zero_length_descriptors_are_fine() -> None:
    r = Ring()
    r.d(0, 0xFFFF_FFFF_0000, 0, N, 1)  # unmapped but empty: never translated
    r.d(1, DATA, 0, W)
    r.offer(0)
    (c,) = r.device().pop(1)
    assert c.readable == [] and c.writable == [] and c.writable_gpas == [(DATA, 0)]


def test_chain_of_exactly_queue_size_descriptors() -> None:
    r = Ring()
    for i in range(SIZE):
        r.d(i, DATA + i, 1, N if i < SIZE - 1 else 0, i + 1)
    r.offer(0)
    (c,) = r.device().pop(1)
    assert c.ring_descs == SIZE and c.readable_len == SIZE


# -- docs/security.md "Rings": each gives a broken queue whose reason names the value ----------
def test_descriptor_loop() -> None:
    r = Ring()
    r.d(0, DATA, 16, N, 1)
    r.d(1, DATA, 16, N, 0)
    r.offer(0)
    broken(r.device(), "head 0", "more than 8 descriptors", "loop")


def test_zero_length_descriptor_loop() -> None:
    r = Ring()
    r.d(5, DATA, 0, N, 5)
    r.offer(5)
    broken(r.device(), "head 5", "loop")


def test_next_out_of_range() -> None:
    r = Ring()
    r.d(0, DATA, 1, N, 8)
    r.offer(0)
    broken(r.device(), "next 8 >= queue size 8")


@pytest.mark.parametrize("head", [8, 0xFFFF])
def test_avail_entry_out_of_range(head: int) -> None:
    r = Ring()
    r.offer(head)
    broken(r.device(), f"head {head} >= queue size 8")


@pytest.mark.parametrize("ln", [24, 1, 0])
def test_indirect_length_not_multiple_of_16_or_zero(ln: int) -> None:
    r = Ring()
    r.d(0, TABLE, ln, IND)
    r.offer(0)
    broken(r.device(), f"indirect table length {ln} is not a nonzero multiple of 16")


def test_indirect_more_entries_than_queue_size() -> None:
    r = Ring()
    r.d(0, TABLE, 16 * 9, IND)
    r.offer(0)
    broken(r.device(), "9 entries", "queue size 8")


def test_indirect_huge_length() -> None:
    r = Ring()
    r.d(0, TABLE, 0xFFFF_FFF0, IND)
    r.offer(0)
    broken(r.device(), "268435455 entries")


def test_nested_indirect() -> None:
    r = Ring()
    r.table(TABLE, [(DATA, 4, N, 1), (TABLE + 0x100, 16, IND, 0)])
    r.d(0, TABLE, 32, IND)
    r.offer(0)
    broken(r.device(), "nested")


def test_indirect_with_next() -> None:
    r = Ring()
    r.table(TABLE, [(DATA, 4, 0, 0)])
    r.d(0, TABLE, 16, IND | N, 1)
    r.d(1, DATA, 4, 0)
    r.offer(0)
    broken(r.device(), "both INDIRECT and NEXT", "0x5")


def test_indirect_without_feature() -> None:
    r = Ring()
    r.table(TABLE, [(DATA, 4, 0, 0)])
    r.d(0, TABLE, 16, IND)
    r.offer(0)
    broken(r.device(indirect=False), "VIRTIO_F_INDIRECT_DESC is off")


def test_indirect_table_loop_and_next_out_of_table() -> None:
    r = Ring()
    r.table(TABLE, [(DATA, 0, N, 1), (DATA, 0, N, 0)])
    r.d(0, TABLE, 32, IND)
    r.offer(0)
    broken(r.device(), "more than 2 descriptors of its indirect table")
    r = Ring()
    r.table(TABLE, [(DATA, 4, N, 5), (DATA, 4, 0, 0)])
    r.d(0, TABLE, 32, IND)
    r.offer(0)
    broken(r.device(), "next 5 >= indirect table entries 2")


def test_indirect_table_unmapped_or_crossing_region_end() -> None:
    r = Ring()
    r.d(0, MEM - 16, 32, IND)
    r.offer(0)
    broken(r.device(), f"indirect table at gpa {MEM - 16:#x} length 32", "not inside one")


def test_write_then_read() -> None:
    r = Ring()
    r.d(0, DATA, 4, W | N, 1)
    r.d(1, DATA + 8, 4, 0)
    r.offer(0)
    broken(r.device(), "descriptor 1 is device-readable after a device-writable one")


def test_write_then_read_inside_indirect() -> None:
    r = Ring()
    r.table(TABLE, [(DATA, 4, W | N, 1), (DATA, 4, 0, 0)])
    r.d(0, TABLE, 32, IND)
    r.offer(0)
    broken(r.device(), "device-readable after a device-writable")


class AlwaysMapped(FlatMemory):
    """Every buffer "maps" (to an empty view), so length sums can pass 2**32."""

    def segments(self, gpa: int, length: int) -> list[memoryview]:
        return [memoryview(b"")]


def test_length_sum_past_2_to_32() -> None:
    buf = bytearray(MEM)
    mem = AlwaysMapped(buf)
    struct.pack_into("<QIHH", buf, DESC, 0x1000_0000, 0xFFFF_FFFF, N, 1)
    struct.pack_into("<QIHH", buf, DESC + 16, 0x2000_0000, 1, W, 0)
    struct.pack_into("<HH", buf, AVAIL + 2, 1, 0)
    dev = SplitDeviceRing(mem, SIZE, DESC, AVAIL, USED, event_idx=False, indirect=False)
    broken(dev, "sum to 4294967296", "past 2^32")


def test_buffer_past_region_end() -> None:
    r = Ring()
    r.d(0, MEM - 4, 16, 0)
    r.offer(0)
    broken(r.device(), f"buffer {MEM - 4:#x}+0x10", "not in any memory region")


def test_avail_idx_jump_more_than_size() -> None:
    r = Ring()
    r.set_avail_idx(9)
    broken(r.device(), "avail.idx 9 is 9 entries past next avail 0", "queue size 8")


def test_avail_idx_jump_across_wrap() -> None:
    r = Ring(start=65530)
    r.set_avail_idx(3)  # 9 entries ahead of 65530, modulo 2**16
    broken(r.device(), "avail.idx 3 is 9 entries past next avail 65530")


def test_same_head_twice_in_one_batch() -> None:
    """The first is handed over; the call stops in front of the second, which the next
    call meets first: still in flight, it breaks the ring."""
    r = Ring()
    r.d(2, DATA, 4)
    r.offer(2, 2)
    dev = r.device()
    assert [c.head for c in dev.pop(4)] == [2]
    assert dev.broken is None and dev.next_avail == 1
    broken(dev, "head 2, which is already in flight")


def test_fault_behind_good_chains_stops_the_call_in_front_of_it() -> None:
    r = Ring()
    r.d(0, DATA, 4)
    r.d(1, DATA, 4)
    r.offer(0, 1, 100)  # the third names a head outside the queue
    dev = r.device()
    assert [c.head for c in dev.pop(8)] == [0, 1]
    assert dev.broken is None
    broken(dev, "holds head 100 >= queue size")


def test_same_head_again_while_in_flight() -> None:
    r = Ring()
    r.d(2, DATA, 4)
    r.offer(2)
    dev = r.device()
    assert [c.head for c in dev.pop(4)] == [2]
    r.offer(2)
    broken(dev, "avail ring entry 1 holds head 2, which is already in flight")


def test_head_may_come_back_after_push() -> None:
    r = Ring()
    r.d(2, DATA, 4)
    r.offer(2)
    dev = r.device()
    dev.push([(c.head, 0) for c in dev.pop(4)])
    r.offer(2)
    assert [c.head for c in dev.pop(4)] == [2]


def test_broken_ring_ignores_push_and_burst_catches() -> None:
    r = Ring()
    r.d(0, DATA, 4, W)
    r.offer(0)
    dev = r.device()
    (c,) = dev.pop(4)
    dev.mark_broken("ring 0: bad net header")
    dev.push([(c.head, 4)])
    assert r.u16(r.used + 2) == 0


def test_run_burst_handler_ring_error_breaks_ring() -> None:
    r = Ring()
    r.d(0, DATA, 4)
    r.offer(0)
    dev = r.device()

    def handler(chains: list[Chain]) -> list[tuple[int, int]]:
        raise RingError("net: chain shorter than the virtio-net header")

    res = run_burst(dev, handler, 8)
    assert res.popped == 1 and res.broken == "net: chain shorter than the virtio-net header"
    assert dev.broken == res.broken


def test_run_burst_normal() -> None:
    r = Ring()
    for i in range(3):
        r.d(i, DATA + 16 * i, 8, W)
    r.offer(0, 1, 2)
    dev = r.device()
    res = run_burst(dev, lambda cs: [(c.head, 8) for c in cs], 2)
    assert (res.popped, res.pushed, res.notify, res.broken) == (2, 2, True, None)
    res = run_burst(dev, lambda cs: [], 8)  # the handler keeps the chain for later
    assert (res.popped, res.pushed, res.notify) == (1, 0, False)
    assert dev.in_flight == 1
    assert run_burst(dev, lambda cs: [], 8).popped == 0


def test_push_rejects_handler_bugs_but_publishes_prefix() -> None:
    r = Ring()
    r.d(0, DATA, 4, W)
    r.d(1, DATA + 16, 4, W)
    r.offer(0, 1)
    dev = r.device()
    dev.pop(2)
    with pytest.raises(ValueError, match="head 5 is not in flight"):
        dev.push([(0, 4), (5, 0)])
    assert r.u16(r.used + 2) == 1 and r.used_elem(0) == (0, 4)
    with pytest.raises(ValueError, match=r"written length 5 is outside 0\.\.4"):
        dev.push([(1, 5)])
    with pytest.raises(ValueError, match="head 0 is not in flight"):
        dev.push([(0, 0)])
    dev.push([(1, 4)])
    assert dev.in_flight == 0


# -- resume and base ---------------------------------------------------------------------
def test_used_idx_resumed_from_memory() -> None:
    r = Ring()
    struct.pack_into("<H", r.buf, r.used + 2, 1234)
    r.set_avail_idx(1234)
    r.avail_idx = 1234
    r.d(0, DATA, 4, W)
    r.offer(0)
    dev = SplitDeviceRing(
        r.mem, SIZE, r.desc, r.avail, r.used, event_idx=False, indirect=False, next_avail=1234
    )
    assert dev.used_idx == 1234 and dev.base() == 1234
    dev.push([(c.head, 2) for c in dev.pop(8)])
    assert r.u16(r.used + 2) == 1235
    assert r.used_elem(1234 % SIZE) == (0, 2)
    assert dev.base() == 1235


def test_used_idx_wraps_at_65536() -> None:
    r = Ring(start=65535)
    for i in range(3):
        r.d(i, DATA, 1, W)
    r.offer(0, 1, 2)
    dev = r.device()
    chains = dev.pop(8)
    assert [c.head for c in chains] == [0, 1, 2]
    dev.push([(c.head, 1) for c in chains])
    assert r.u16(r.used + 2) == 2 and dev.used_idx == 2 and dev.base() == 2
    assert [r.used_elem(s) for s in (7, 0, 1)] == [(0, 1), (1, 1), (2, 1)]


# -- notifications -----------------------------------------------------------------------
def test_need_event_arithmetic() -> None:
    assert vring_need_event(0, 1, 0)
    assert not vring_need_event(1, 1, 0)
    assert vring_need_event(65535, 2, 65534)
    assert not vring_need_event(3, 2, 0)
    assert vring_need_event(3, 4, 2)


def test_notify_without_event_idx() -> None:
    r = Ring()
    for i in range(2):
        r.d(i, DATA, 1, W)
    r.offer(0)
    dev = r.device()
    assert not dev.should_notify()  # nothing pushed yet
    dev.push([(c.head, 0) for c in dev.pop(8)])
    assert dev.should_notify()
    assert not dev.should_notify()  # nothing new
    struct.pack_into("<H", r.buf, r.avail, AVAIL_F_NO_INTERRUPT)
    r.offer(1)
    dev.push([(c.head, 0) for c in dev.pop(8)])
    assert not dev.should_notify()


def test_notify_with_event_idx() -> None:
    r = Ring(event_idx=True)
    for i in range(8):
        r.d(i, DATA, 1, W)
    dev = r.device()
    used_event = r.avail + 4 + 2 * SIZE

    def step(*heads: int) -> bool:
        r.offer(*heads)
        dev.push([(c.head, 0) for c in dev.pop(8)])
        return dev.should_notify()

    assert step(0)  # first push after (re)start: always (signalled state unknown)
    struct.pack_into("<H", r.buf, used_event, 3)  # "tell me when entry 3 is used"
    assert not step(1)  # used.idx 1 -> 2: entry 1 only
    assert step(2, 3)  # entries 2, 3: passes 3
    assert not step(4)
    struct.pack_into("<H", r.buf, r.avail, AVAIL_F_NO_INTERRUPT)  # ignored with EVENT_IDX
    struct.pack_into("<H", r.buf, used_event, 5)
    assert step(5)


def test_notify_with_event_idx_across_wrap() -> None:
    r = Ring(event_idx=True, start=65534)
    for i in range(8):
        r.d(i, DATA, 1, W)
    dev = r.device()
    used_event = r.avail + 4 + 2 * SIZE
    r.offer(0)
    dev.push([(c.head, 0) for c in dev.pop(8)])
    assert dev.should_notify()
    struct.pack_into("<H", r.buf, used_event, 0)  # entry 0 is after the wrap
    r.offer(1)  # entry 65535
    dev.push([(c.head, 0) for c in dev.pop(8)])
    assert not dev.should_notify()
    r.offer(2, 3)  # entries 0 and 1
    dev.push([(c.head, 0) for c in dev.pop(8)])
    assert dev.should_notify()


def test_device_notification_suppression_flags() -> None:
    r = Ring()
    r.d(0, DATA, 1)
    dev = r.device()
    dev.disable_notifications()
    assert r.u16(r.used) == USED_F_NO_NOTIFY
    assert not dev.enable_notifications()
    assert r.u16(r.used) == 0
    r.offer(0)
    dev.disable_notifications()
    assert dev.enable_notifications()  # work arrived while disabled


def test_device_notification_suppression_event_idx() -> None:
    r = Ring(event_idx=True)
    r.d(0, DATA, 1)
    dev = r.device()
    avail_event = r.used + 4 + 8 * SIZE
    dev.disable_notifications()
    assert r.u16(r.used) == 0  # EVENT_IDX: flags stay 0
    r.offer(0)
    assert dev.enable_notifications()
    assert r.u16(avail_event) == 0
    dev.pop(1)
    assert not dev.enable_notifications()
    assert r.u16(avail_event) == 1


# -- the driver side, against the device --------------------------------------------------
@pytest.mark.parametrize("event_idx", [False, True])
def test_driver_kick_and_interrupt_suppression(event_idx: bool) -> None:
    mem = FlatMemory(bytearray(MEM))
    drv: SplitDriverRing[str] = SplitDriverRing(mem, SIZE, DESC, AVAIL, USED, event_idx=event_idx)
    dev = SplitDeviceRing(mem, SIZE, DESC, AVAIL, USED, event_idx=event_idx, indirect=False)

    def complete() -> None:
        dev.push([(c.head, 0) for c in dev.pop(8)])

    assert drv.add([(DATA, 4, False), (DATA + 8, 4, True)], "a")
    assert not drv.should_kick()  # nothing published yet
    drv.publish()
    assert drv.should_kick()
    dev.disable_notifications()  # woken: poll without kicks
    chains = dev.pop(8)
    assert drv.add([(DATA, 4, False)], "b")
    drv.publish()
    assert not drv.should_kick()  # the device is polling
    dev.push([(c.head, 0) for c in chains])
    assert dev.should_notify()  # interrupts are enabled
    assert drv.reap() == [("a", 0)]
    drv.disable_interrupts()
    complete()
    assert not dev.should_notify()  # the driver is polling
    assert not dev.enable_notifications()  # nothing new: sleep
    assert drv.enable_interrupts()  # "b" is already used: reap again
    assert drv.reap() == [("b", 0)]
    assert not drv.enable_interrupts()
    assert drv.add([(DATA, 4, False)], "c")
    drv.publish()
    assert drv.should_kick()  # the device re-enabled kicks
    complete()
    assert dev.should_notify()  # and we re-enabled interrupts
    assert drv.reap() == [("c", 0)]
    assert drv.in_flight == 0 and drv.num_free == SIZE


def test_driver_reap_rejects_bad_used_entries() -> None:
    mem = FlatMemory(bytearray(MEM))
    buf = mem.regions[0].buf
    drv: SplitDriverRing[int] = SplitDriverRing(mem, SIZE, DESC, AVAIL, USED, event_idx=False)
    assert drv.add([(DATA, 4, True)], 7)
    drv.publish()
    struct.pack_into("<II", buf, USED + 4, 5, 0)
    struct.pack_into("<H", buf, USED + 2, 1)
    with pytest.raises(RingError, match="id 5, which is not in flight"):
        drv.reap()
    assert drv.broken is not None and drv.reap() == []


def test_driver_rejects_own_mistakes() -> None:
    mem = FlatMemory(bytearray(MEM))
    drv: SplitDriverRing[int] = SplitDriverRing(
        mem, SIZE, DESC, AVAIL, USED, event_idx=False, indirect_area=(TABLE, 2 * 16 * SIZE)
    )
    assert drv.max_indirect == 2
    with pytest.raises(ValueError, match="readable buffer after a writable"):
        drv.add([(DATA, 1, True), (DATA, 1, False)], 0)
    with pytest.raises(ValueError, match="empty"):
        drv.add([], 0)
    with pytest.raises(ValueError, match="do not fit an indirect table"):
        drv.add([(DATA, 1, False)] * 3, 0, indirect=True)
    with pytest.raises(ValueError, match="not 16-byte aligned"):
        SplitDriverRing(mem, SIZE, 8, AVAIL, USED, event_idx=False)
    with pytest.raises(ValueError, match="start index"):
        SplitDriverRing(mem, SIZE, DESC, AVAIL, USED, event_idx=False, start_idx=-1)
    for _ in range(SIZE):
        assert drv.add([(DATA, 1, False)], 0)
    assert not drv.add([(DATA, 1, False)], 0)  # full: False, nothing changed
    assert drv.num_free == 0


def test_guest_memory_error_is_not_leaked() -> None:
    # Ring faults surface as RingError, never GuestMemoryError.
    r = Ring()
    r.d(0, 1 << 50, 4)
    r.offer(0)
    dev = r.device()
    with pytest.raises(RingError) as ei:
        dev.pop(1)
    assert not isinstance(ei.value, GuestMemoryError)


def test_resubmit_puts_heads_back_in_flight() -> None:
    r = Ring()
    r.d(4, DATA, 4, W)
    r.d(6, DATA + 8, 2)
    r.d(7, DATA, 0, N, 7)
    dev = r.device()
    chains = dev.resubmit([4, 6], 10)
    assert [c.head for c in chains] == [4, 6] and dev.in_flight == 2 and dev.next_avail == 10
    with pytest.raises(ValueError, match="head 4 is outside the queue or already in flight"):
        dev.resubmit([4], 10)
    with pytest.raises(ValueError, match="16-bit"):
        dev.resubmit([], 65536)
    dev.push([(4, 4), (6, 0)])
    with pytest.raises(RingError, match="loop"):
        dev.resubmit([7], 10)
    assert dev.broken is not None


def test_pop_descriptor_budget_bounds_a_burst() -> None:
    """Long chains sharing descriptors: one pop reads about 16 x budget descriptors."""
    size = 64
    r = Ring(size)
    for i in range(size):
        r.d(i, DATA, 0, N if i < size - 1 else 0, i + 1)
    r.offer(*range(8))  # heads 0..7: chains of 64, 63, 62, ... descriptors
    dev = r.device()
    # budget 8 -> 128 descriptors: 64 + 63 < 128, the third chain crosses it and ends the pop
    assert [c.ring_descs for c in dev.pop(8)] == [64, 63, 62]
    assert dev.broken is None
    assert [c.ring_descs for c in dev.pop(8)] == [61, 60, 59]
    assert [c.ring_descs for c in dev.pop(100)] == [58, 57]


# -- in-place fast path (peek_heads / complete_in_place) -------------------------------------


def test_peek_heads_and_complete_in_place_wrap_and_report_dirty() -> None:
    r = Ring(start=0xFFFE)  # used and avail indices wrap 16 bits during the test
    log: list[tuple[int, int]] = []
    r.mem.set_dirty_hook(lambda g, n: log.append((g, n)))
    dev = r.device()
    assert dev.peek_heads(8) == []
    r.offer(5, 2, 7)
    assert dev.peek_heads(2) == [5, 2] and dev.peek_heads(8) == [5, 2, 7]
    assert dev.next_avail == 0xFFFE  # peeking takes nothing
    assert bytes(dev.descriptor_table[:16]) == bytes(r.buf[r.desc : r.desc + 16])
    dev.complete_in_place([5, 10, 2, 20], 2)  # slots 6 and 7 of the used ring
    assert (r.used_elem(6), r.used_elem(7)) == ((5, 10), (2, 20))
    assert r.u16(r.used + 2) == 0 and dev.used_idx == 0 and dev.next_avail == 0
    assert log == [(r.used + 4 + 8 * 6, 16), (r.used + 2, 2)]
    assert dev.peek_heads(8) == [7]
    dev.complete_in_place([7, 0], 1)
    assert r.used_elem(0) == (7, 0) and dev.used_idx == 1 and dev.should_notify()


def test_peek_heads_leaves_faults_to_pop() -> None:
    r = Ring()
    dev = r.device()
    r.set_avail_idx(SIZE + 1)  # more than the queue size ahead
    assert dev.peek_heads(4) is None
    r2 = Ring()
    r2.offer(1, 1)  # the same head twice
    assert r2.device().peek_heads(4) is None
    r3 = Ring()
    r3.offer(SIZE)  # outside the queue
    assert r3.device().peek_heads(4) is None
    r4 = Ring()
    r4.d(1, DATA, 4)
    r4.offer(1)
    d4 = r4.device()
    assert len(d4.pop(1)) == 1
    struct.pack_into("<H", r4.buf, r4.avail + 2 + 2 * 2, 1)  # head 1 offered again
    r4.set_avail_idx(2)
    assert d4.peek_heads(4) is None  # head 1 is still in flight
