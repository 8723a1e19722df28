"""Packed ring device side: docs/security.md "Rings" cases, wrap counters, base, notifications."""

from __future__ import annotations

import struct
from collections.abc import Sequence

import pytest

from vhostuser.errors import RingError
from vhostuser.memory import FlatMemory
from vhostuser.virtq import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    INITIAL_BASE,
    Chain,
    PackedBase,
    PackedDeviceRing,
    PackedDriverRing,
    decode_base,
    encode_base,
    packed_layout,
    run_burst,
)
from vhostuser.virtq.packed import (
    PACKED_DESC_F_AVAIL,
    PACKED_DESC_F_USED,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
)

SIZE = 8
MEM = 1 << 16
DATA = 0x4000
TABLE = 0x8000
N, W, IND = DESC_F_NEXT, DESC_F_WRITE, DESC_F_INDIRECT
A, U = PACKED_DESC_F_AVAIL, PACKED_DESC_F_USED


class PRing:
    """A packed ring in a bytearray, written by hand like a hostile guest would."""

    def __init__(
        self, size: int = SIZE, *, event_idx: bool = False, mem_cls: type[FlatMemory] = FlatMemory
    ) -> None:
        self.size = size
        self.buf = bytearray(MEM)
        self.mem = mem_cls(self.buf)
        self.desc, self.drv, self.dev, _ = packed_layout(size, 0)
        self.event_idx = event_idx

    def device(self, *, indirect: bool = True, base: int = INITIAL_BASE) -> PackedDeviceRing:
        return PackedDeviceRing(
            self.mem,
            self.size,
            self.desc,
            self.drv,
            self.dev,
            event_idx=self.event_idx,
            indirect=indirect,
            base=base,
        )

    def d(self, slot: int, addr: int, ln: int, bid: int, flags: int = 0, wrap: int = 1) -> None:
        """An available descriptor for a lap with driver wrap counter ``wrap``."""
        self.raw(slot, addr, ln, bid, flags | (A if wrap else U))

    def raw(self, slot: int, addr: int, ln: int, bid: int, flags: int) -> None:
        struct.pack_into("<QIHH", self.buf, self.desc + 16 * slot, addr, ln, bid, flags)

    def table(self, gpa: int, entries: Sequence[tuple[int, int, int]]) -> None:
        for k, (addr, ln, flags) in enumerate(entries):
            struct.pack_into("<QIHH", self.buf, gpa + 16 * k, addr, ln, 0, flags)

    def used(self, slot: int) -> tuple[int, int, int]:
        _a, ln, bid, flags = struct.unpack_from("<QIHH", self.buf, self.desc + 16 * slot)
        return int(bid), int(ln), int(flags)

    def event(self, gpa: int) -> tuple[int, int]:
        off_wrap, flags = struct.unpack_from("<HH", self.buf, gpa)
        return int(off_wrap), int(flags)

    def set_driver_event(self, flags: int, off_wrap: int = 0) -> None:
        struct.pack_into("<HH", self.buf, self.drv, off_wrap, flags)


def broken(dev: PackedDeviceRing, *fragments: str) -> str:
    with pytest.raises(RingError) as ei:
        dev.pop(64)
    msg = str(ei.value)
    assert dev.broken == msg
    for f in fragments:
        assert f in msg, (f, msg)
    assert dev.pop(64) == []
    assert not dev.should_notify()
    assert not dev.enable_notifications()
    assert dev.pending() == 0
    res = run_burst(dev, lambda cs: [], 64)
    assert res.broken == msg
    return msg


# -- base encoding -------------------------------------------------------------------------
def test_base_encode_decode() -> None:
    assert encode_base(0, True, 0, True) == INITIAL_BASE == 0x8000_8000
    num = encode_base(5, True, 7, False)
    assert num == 5 | 0x8000 | 7 << 16
    assert decode_base(num) == PackedBase(5, True, 7, False)
    assert decode_base(0xFFFF_FFFF) == PackedBase(0x7FFF, True, 0x7FFF, True)
    for bad in (0x8000, -1):
        with pytest.raises(ValueError):
            encode_base(bad, False, 0, False)
    with pytest.raises(ValueError):
        decode_base(1 << 32)


def test_base_beyond_queue_size_rejected() -> None:
    r = PRing()
    with pytest.raises(RingError, match="avail index 9"):
        r.device(base=encode_base(9, True, 0, True))
    with pytest.raises(RingError, match="used index 8"):
        r.device(base=encode_base(0, True, 8, True))
    with pytest.raises(RingError, match="does not fit 32 bits"):
        r.device(base=1 << 32)


@pytest.mark.parametrize("size", [0, 32769, 65536])
def test_bad_queue_size(size: int) -> None:
    with pytest.raises(RingError, match=str(size)):
        PackedDeviceRing(
            FlatMemory(bytearray(MEM)), size, 0, 0x1000, 0x1004, event_idx=False, indirect=False
        )


def test_non_power_of_two_size_is_fine_and_areas_checked() -> None:
    mem = FlatMemory(bytearray(MEM))
    PackedDeviceRing(mem, 1000, 0, 16000, 16004, event_idx=False, indirect=False)
    with pytest.raises(RingError, match="driver event suppression area address 0x3e82"):
        PackedDeviceRing(mem, 1000, 0, 16002, 16004, event_idx=False, indirect=False)
    with pytest.raises(RingError, match="descriptor ring at gpa 0x8000"):
        PackedDeviceRing(mem, 4096, 0x8000, 0, 4, event_idx=False, indirect=False)


def test_base_follows_progress_and_wrap() -> None:
    r = PRing()
    dev = r.device(base=encode_base(6, True, 6, True))
    r.d(6, DATA, 4, 3, W | N)
    r.d(7, DATA, 4, 3, W | N)
    r.d(0, DATA, 4, 3, W, wrap=0)  # the chain wraps: slot 0 belongs to the next lap
    (c,) = dev.pop(8)
    assert (c.head, c.ring_descs, c.writable_len) == (3, 3, 12)
    assert dev.base() == encode_base(1, False, 6, True)
    dev.push([(3, 12)])
    assert r.used(6) == (3, 12, A | U | W)
    assert dev.base() == encode_base(1, False, 1, False)
    assert (dev.next_avail, dev.avail_wrap, dev.used_idx, dev.used_wrap) == (1, False, 1, False)


# -- good buffers --------------------------------------------------------------------------
def test_pop_push_chain_dirty_log_and_flags_last() -> None:
    r = PRing()
    log: list[tuple[int, int]] = []
    r.mem.set_dirty_hook(lambda g, n: log.append((g, n)))
    r.buf[DATA : DATA + 3] = b"abc"
    r.d(1, DATA + 0x100, 8, 5, W)  # only slot 0 is polled first; written out of order
    r.d(0, DATA, 3, 4, 0)
    dev = r.device()
    chains = dev.pop(8)
    assert [(c.head, c.read_bytes(), c.writable_len) for c in chains] == [
        (4, b"abc", 0),
        (5, b"", 8),
    ]
    chains[1].write_bytes(b"xyz")
    dev.push([(5, 3), (4, 0)])  # completed out of order: used slots in completion order
    assert r.used(0) == (5, 3, A | U | W)
    assert r.used(1) == (4, 0, A | U)
    # The written buffer bytes and both used descriptors (id, len, flags), each once.
    assert sorted(log) == sorted([(r.desc + 8, 8), (DATA + 0x100, 3), (r.desc + 16 + 8, 8)])
    assert dev.in_flight == 0


def test_indirect_buffer() -> None:
    r = PRing()
    r.buf[DATA : DATA + 2] = b"hi"
    r.table(TABLE, [(DATA, 2, 0), (DATA + 0x10, 6, W | N)])  # NEXT in a table is ignored
    r.d(0, TABLE, 32, 2, IND | W)  # WRITE of an indirect descriptor is ignored
    (c,) = r.device().pop(2)
    assert (c.head, c.read_bytes(), c.writable_len, c.ring_descs) == (2, b"hi", 6, 1)


@pytest.mark.parametrize(
    "flags",
    [A | U, 0, U, W | N],  # used-looking, zero, previous-lap available, no avail bits
)
def test_flags_inconsistent_with_wrap_counter_means_not_available(flags: int) -> None:
    r = PRing()
    r.raw(0, DATA, 4, 0, flags)
    dev = r.device()
    assert dev.pop(8) == [] and dev.broken is None and dev.pending() == 0


def test_wrap_zero_lap_pattern() -> None:
    r = PRing()
    dev = r.device(base=encode_base(0, False, 0, False))
    r.d(0, DATA, 4, 0, 0, wrap=1)  # pattern of the wrong lap
    assert dev.pop(8) == []
    r.d(0, DATA, 4, 0, 0, wrap=0)
    assert dev.pending() == 1
    assert [c.head for c in dev.pop(8)] == [0]


# -- docs/security.md "Rings" ---------------------------------------------------------------------
def test_id_out_of_range() -> None:
    r = PRing()
    r.d(0, DATA, 4, 9)
    broken(r.device(), "id 9 >= queue size 8")


def test_chain_that_never_ends() -> None:
    r = PRing()
    for s in range(SIZE):
        r.d(s, DATA, 4, 0, N)
    broken(r.device(), "chain of 8 descriptors (the queue size) still has NEXT")


def test_zero_length_chain_that_never_ends() -> None:
    r = PRing(size=1)
    r.d(0, DATA, 0, 0, N)
    broken(r.device(), "chain of 1 descriptors")


def test_chain_running_into_unavailable_descriptor() -> None:
    r = PRing()
    r.d(0, DATA, 4, 0, N)
    broken(r.device(), "descriptor 1 of its chain, at slot 1, is not available")


def test_chain_running_into_in_flight_descriptors() -> None:
    r = PRing(size=4)
    for s in range(3):
        r.d(s, DATA, 4, 0, N if s < 2 else 0)
    dev = r.device()
    assert [c.ring_descs for c in dev.pop(8)] == [3]
    # A hostile driver re-marks in-flight slot 0 available for the next lap.
    r.d(3, DATA, 4, 1, N)
    r.d(0, DATA, 4, 1, 0, wrap=0)
    broken(dev, "2 descriptors with 3 in flight exceed the queue size 4")


def test_same_id_twice() -> None:
    """The first buffer is handed over; the next call meets the second first: its id is
    still in flight, which breaks the ring."""
    r = PRing()
    r.d(0, DATA, 4, 3)
    r.d(1, DATA, 4, 3)
    dev = r.device()
    assert [c.head for c in dev.pop(8)] == [3]
    assert dev.broken is None
    broken(dev, "id 3, which is already in flight")


@pytest.mark.parametrize("ln", [24, 0])
def test_indirect_length(ln: int) -> None:
    r = PRing()
    r.d(0, TABLE, ln, 0, IND)
    broken(r.device(), f"indirect table length {ln} is not a nonzero multiple of 16")


def test_indirect_too_many_entries() -> None:
    r = PRing()
    r.d(0, TABLE, 16 * 9, 0, IND)
    broken(r.device(), "9 entries, more than the queue size 8")


def test_nested_indirect() -> None:
    r = PRing()
    r.table(TABLE, [(DATA, 4, 0), (TABLE + 0x100, 16, IND)])
    r.d(0, TABLE, 32, 0, IND)
    broken(r.device(), "entry 1 is itself indirect (nested)")


def test_indirect_with_next() -> None:
    r = PRing()
    r.table(TABLE, [(DATA, 4, 0)])
    r.d(0, TABLE, 16, 0, IND | N)
    r.d(1, DATA, 4, 0, 0)
    broken(r.device(), "both INDIRECT and NEXT")


def test_indirect_inside_next_chain() -> None:
    r = PRing()
    r.table(TABLE, [(DATA, 4, 0)])
    r.d(0, DATA, 4, 0, N)
    r.d(1, TABLE, 16, 0, IND)
    broken(r.device(), "indirect inside a NEXT chain")


def test_indirect_without_feature() -> None:
    r = PRing()
    r.table(TABLE, [(DATA, 4, 0)])
    r.d(0, TABLE, 16, 0, IND)
    broken(r.device(indirect=False), "VIRTIO_F_INDIRECT_DESC is off")


def test_indirect_table_off_the_region() -> None:
    r = PRing()
    r.d(0, MEM - 16, 32, 0, IND)
    broken(r.device(), "not inside one memory region")


def test_write_then_read() -> None:
    r = PRing()
    r.d(0, DATA, 4, 0, W | N)
    r.d(1, DATA, 4, 0, 0)
    broken(r.device(), "device-readable after a device-writable")


def test_write_then_read_in_indirect_table() -> None:
    r = PRing()
    r.table(TABLE, [(DATA, 4, W), (DATA, 4, 0)])
    r.d(0, TABLE, 32, 0, IND)
    broken(r.device(), "indirect entry 1 is device-readable after a device-writable")


class AlwaysMapped(FlatMemory):
    """Every buffer "maps" (to an empty view), so length sums can pass 2**32."""

    def segments(self, gpa: int, length: int) -> list[memoryview]:
        return [memoryview(b"")]


def test_length_sum_past_2_to_32() -> None:
    r = PRing(mem_cls=AlwaysMapped)
    r.d(0, 0x1000_0000, 0xFFFF_FFFF, 0, N)
    r.d(1, 0x2000_0000, 2, 0, W)
    broken(r.device(), "sum to 4294967297")


def test_length_sum_past_2_to_32_in_indirect() -> None:
    r = PRing(mem_cls=AlwaysMapped)
    r.table(TABLE, [(0x1000_0000, 0xFFFF_FFFF, 0), (0x2000_0000, 1, W)])
    r.d(0, TABLE, 32, 0, IND)
    broken(r.device(), "sum to 4294967296")


def test_buffer_past_region_end() -> None:
    r = PRing()
    r.d(0, MEM - 2, 8, 0, 0)
    broken(r.device(), f"{MEM - 2:#x}+0x8", "not in any memory region")


def test_push_rejects_handler_bugs() -> None:
    r = PRing()
    r.d(0, DATA, 4, 2, W)
    dev = r.device()
    dev.pop(1)
    with pytest.raises(ValueError, match="buffer id 3 is not in flight"):
        dev.push([(3, 0)])
    with pytest.raises(ValueError, match="written length 9"):
        dev.push([(2, 9)])
    assert dev.in_flight == 1


def test_run_burst_handler_fault_breaks_ring() -> None:
    r = PRing()
    r.d(0, DATA, 4, 2)
    dev = r.device()

    def handler(chains: list[Chain]) -> list[tuple[int, int]]:
        raise RingError("blk: request header too short")

    res = run_burst(dev, handler, 8)
    assert res.broken == "blk: request header too short" and dev.pop(8) == []


# -- notifications -------------------------------------------------------------------------
def _one_round(r: PRing, dev: PackedDeviceRing, slot: int, bid: int, wrap: int = 1) -> bool:
    r.d(slot, DATA, 4, bid, 0, wrap=wrap)
    dev.push([(c.head, 0) for c in dev.pop(8)])
    return dev.should_notify()


def test_should_notify_enable_disable() -> None:
    r = PRing()
    dev = r.device()
    assert not dev.should_notify()  # nothing pushed
    assert _one_round(r, dev, 0, 0)  # ENABLE (zeroed area)
    r.set_driver_event(RING_EVENT_FLAGS_DISABLE)
    assert not _one_round(r, dev, 1, 0)
    r.set_driver_event(RING_EVENT_FLAGS_DESC, 0x8005)  # DESC without EVENT_IDX: enable
    assert _one_round(r, dev, 2, 0)


def test_should_notify_desc_event() -> None:
    r = PRing(event_idx=True)
    dev = r.device()
    assert _one_round(r, dev, 0, 0)  # first after start: always
    r.set_driver_event(RING_EVENT_FLAGS_DESC, 3 | 0x8000)  # "slot 3, wrap 1"
    assert not _one_round(r, dev, 1, 0)
    assert not _one_round(r, dev, 2, 0)
    assert _one_round(r, dev, 3, 0)
    r.set_driver_event(RING_EVENT_FLAGS_DESC, 1)  # "slot 1, wrap 0": the next lap
    for s in range(4, 8):
        assert not _one_round(r, dev, s, 0)
    assert not _one_round(r, dev, 0, 0, wrap=0)
    assert _one_round(r, dev, 1, 0, wrap=0)


def test_should_notify_desc_event_in_previous_lap() -> None:
    r = PRing(event_idx=True)
    dev = r.device(base=encode_base(6, True, 6, True))
    assert _one_round(r, dev, 6, 0)
    r.set_driver_event(RING_EVENT_FLAGS_DESC, 7 | 0x8000)  # slot 7 of this lap
    # one burst using slots 7, 0, 1: crosses the ring end and the event
    r.d(7, DATA, 4, 1)
    r.d(0, DATA, 4, 2, wrap=0)
    r.d(1, DATA, 4, 3, wrap=0)
    dev.push([(c.head, 0) for c in dev.pop(8)])
    assert dev.used_idx == 2 and not dev.used_wrap
    assert dev.should_notify()


def test_device_suppression_structure() -> None:
    for event_idx in (False, True):
        r = PRing(event_idx=event_idx)
        dev = r.device(base=encode_base(5, False, 5, False))
        dev.disable_notifications()
        assert r.event(r.dev) == (0, RING_EVENT_FLAGS_DISABLE)
        assert not dev.enable_notifications()
        if event_idx:
            assert r.event(r.dev) == (5, RING_EVENT_FLAGS_DESC)
        else:
            assert r.event(r.dev) == (0, RING_EVENT_FLAGS_ENABLE)
        r.d(5, DATA, 4, 0, 0, wrap=0)
        assert dev.enable_notifications()


# -- the driver side -------------------------------------------------------------------------
@pytest.mark.parametrize("event_idx", [False, True])
def test_driver_kick_and_interrupt_suppression(event_idx: bool) -> None:
    mem = FlatMemory(bytearray(MEM))
    d, drv_a, dev_a, _ = packed_layout(SIZE, 0)
    drv: PackedDriverRing[str] = PackedDriverRing(mem, SIZE, d, drv_a, dev_a, event_idx=event_idx)
    dev = PackedDeviceRing(mem, SIZE, d, drv_a, dev_a, event_idx=event_idx, indirect=False)

    def complete() -> None:
        dev.push([(c.head, 0) for c in dev.pop(8)])

    assert drv.add([(DATA, 4, False), (DATA + 8, 4, True)], "a")
    assert dev.pop(8) == []  # not published: the head's flags are not written yet
    assert not drv.should_kick()
    drv.publish()
    assert drv.should_kick()
    dev.disable_notifications()
    chains = dev.pop(8)
    assert [c.ring_descs for c in chains] == [2]
    assert drv.add([(DATA, 4, False)], "b")
    drv.publish()
    assert not drv.should_kick()
    dev.push([(c.head, 0) for c in chains])
    assert dev.should_notify()
    assert drv.reap() == [("a", 0)]
    drv.disable_interrupts()
    complete()
    assert not dev.should_notify()
    assert not dev.enable_notifications()
    assert drv.enable_interrupts()
    assert drv.reap() == [("b", 0)]
    assert not drv.enable_interrupts()
    assert drv.add([(DATA, 4, False)], "c")
    drv.publish()
    assert drv.should_kick()
    complete()
    assert dev.should_notify()
    assert drv.reap() == [("c", 0)]
    assert drv.in_flight == 0 and drv.num_free == SIZE


def test_driver_rejects_bad_used_descriptor() -> None:
    mem = FlatMemory(bytearray(MEM))
    buf = mem.regions[0].buf
    d, drv_a, dev_a, _ = packed_layout(SIZE, 0)
    drv: PackedDriverRing[int] = PackedDriverRing(mem, SIZE, d, drv_a, dev_a, event_idx=False)
    assert drv.add([(DATA, 4, True)], 1)
    drv.publish()
    struct.pack_into("<QIHH", buf, d, 0, 4, 6, A | U | W)
    with pytest.raises(RingError, match="id 6, which is not in flight"):
        drv.reap()
    assert drv.reap() == []


def test_driver_own_mistakes() -> None:
    mem = FlatMemory(bytearray(MEM))
    d, drv_a, dev_a, _ = packed_layout(SIZE, 0)
    with pytest.raises(ValueError, match="start index 8"):
        PackedDriverRing(mem, SIZE, d, drv_a, dev_a, event_idx=False, start_idx=8)
    with pytest.raises(ValueError, match="less than one descriptor"):
        PackedDriverRing(mem, SIZE, d, drv_a, dev_a, event_idx=False, indirect_area=(TABLE, 64))
    drv: PackedDriverRing[int] = PackedDriverRing(mem, SIZE, d, drv_a, dev_a, event_idx=False)
    with pytest.raises(ValueError, match="readable element after a writable"):
        drv.add([(DATA, 1, True), (DATA, 1, False)], 0)
    assert drv.add([(DATA, 1, False)] * SIZE, 0)
    assert not drv.add([(DATA, 1, False)], 1)


def test_pop_descriptor_budget_bounds_a_burst() -> None:
    r = PRing(size=64)
    for s in range(64):
        r.d(s, DATA, 0, s, N if s % 32 != 31 else 0)  # two chains of 32 descriptors
    dev = r.device()
    assert [c.ring_descs for c in dev.pop(1)] == [32]  # budget 1 -> 16 descriptors
    assert [c.ring_descs for c in dev.pop(1)] == [32]


def test_pop_descriptor_budget_counts_indirect_entries() -> None:
    r = PRing(size=32)
    r.table(TABLE, [(DATA, 0, 0)] * 32)
    for s in range(4):
        r.d(s, TABLE, 16 * 32, s, IND)
    dev = r.device()
    # budget 3 -> 48 descriptors; each buffer reads 1 + 32: the second one crosses it
    assert [c.head for c in dev.pop(3)] == [0, 1]
    assert [c.head for c in dev.pop(3)] == [2, 3]
