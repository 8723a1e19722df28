"""Random interleavings of our driver and device over a bytearray: every buffer exactly once.

Hypothesis chooses, step by step, which side acts: the driver adds buffers (direct or
indirect, random shapes), publishes and kicks when told to; the device sleeps until kicked,
polls with kicks suppressed, completes chains in any order (holding some for later, as an
asynchronous device does), notifies when told to; the driver's reaper sleeps until
notified, polls with interrupts suppressed, and re-enables them as real drivers do. Then
both sides run to completion driven only by notifications: if both ever sleep with work
outstanding, a wake-up was lost.

Split and packed rings, with and without EVENT_IDX and indirect descriptors, starting near
the 16-bit index wrap (split) or near the end of the ring with either wrap counter (packed).
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhostuser.memory import FlatMemory
from vhostuser.virtq import (
    Chain,
    PackedDeviceRing,
    PackedDriverRing,
    SplitDeviceRing,
    SplitDriverRing,
    encode_base,
    packed_layout,
    split_layout,
)

MEM = 1 << 16
IND = 0x2000  # indirect area
DATA = 0x4000  # data slots, one per buffer in flight
SLOT = 256
NSLOTS = 32  # more than any ring here can hold in flight
MAX_ELEMS = 4
MAX_LEN = 40

Driver = SplitDriverRing[int] | PackedDriverRing[int]
Device = SplitDeviceRing | PackedDeviceRing
Shape = list[tuple[int, bool]]  # (length, device-writable), readable first


def readable_pattern(token: int, n: int) -> bytes:
    """Bytes the driver puts in a buffer's readable part: the token (LE16), then a pattern."""
    head = (token & 0xFFFF).to_bytes(2, "little")[:n]
    return head + bytes((token * 151 + j * 7) & 0xFF for j in range(len(head), n))


def device_reply(rbytes: bytes, rlen: int, wlen: int) -> tuple[int, bytes]:
    """What the device writes for a chain: a length in 0..wlen and content from the input."""
    written = (rlen + wlen) % (wlen + 1)
    rsum = sum(rbytes) & 0xFF
    return written, bytes((rsum + k) & 0xFF for k in range(written))


class Sim:
    def __init__(
        self,
        packed: bool,
        size: int,
        event_idx: bool,
        indirect: bool,
        start: int,
        start_wrap: bool,
        shapes: list[Shape],
    ) -> None:
        self.buf = bytearray(MEM)
        self.mem = FlatMemory(self.buf)
        area = (IND, MAX_ELEMS * 16 * size) if indirect else None
        self.driver: Driver
        self.device: Device
        if packed:
            d, a, u, _ = packed_layout(size, 0)
            self.driver = PackedDriverRing(
                self.mem,
                size,
                d,
                a,
                u,
                event_idx=event_idx,
                indirect_area=area,
                start_idx=start,
                start_wrap=start_wrap,
            )
            self.device = PackedDeviceRing(
                self.mem,
                size,
                d,
                a,
                u,
                event_idx=event_idx,
                indirect=indirect,
                base=encode_base(start, start_wrap, start, start_wrap),
            )
        else:
            d, a, u, _ = split_layout(size, 0)
            self.driver = SplitDriverRing(
                self.mem, size, d, a, u, event_idx=event_idx, indirect_area=area, start_idx=start
            )
            self.device = SplitDeviceRing(
                self.mem, size, d, a, u, event_idx=event_idx, indirect=indirect, next_avail=start
            )
        self.shapes = shapes
        self.next_token = 0
        self.kick_pending = False
        self.call_pending = False
        # "asleep" (waiting on the eventfd, notifications enabled), "polling"
        # (notifications suppressed), "idle" (found nothing: re-enable and re-check next)
        self.dev_state = "asleep"
        self.reaper_state = "asleep"
        self.held: list[Chain] = []
        self.popped = 0  # the device pops in the order the driver added
        self.reaped: dict[int, int] = {}
        self.free_slots = list(range(NSLOTS))
        self.slot_of: dict[int, int] = {}

    # -- driver ------------------------------------------------------------------------
    def add(self, indirect: bool | None) -> bool:
        t = self.next_token
        if t >= len(self.shapes):
            return False
        shape = self.shapes[t]
        if not self.free_slots:
            return False
        slot = self.free_slots[-1]
        base = DATA + slot * SLOT
        bufs: list[tuple[int, int, bool]] = []
        off = 0
        for ln, w in shape:
            bufs.append((base + off, ln, w))
            off += ln
        if indirect and len(bufs) > self.driver.max_indirect:
            indirect = None
        rlen = sum(ln for ln, w in shape if not w)
        self.buf[base : base + rlen] = readable_pattern(t, rlen)
        if not self.driver.add(bufs, t, indirect=indirect):
            return False
        self.free_slots.pop()
        self.slot_of[t] = slot
        self.next_token += 1
        return True

    def publish(self) -> None:
        self.driver.publish()
        if self.driver.should_kick():
            self.kick_pending = True

    def reaper_step(self) -> bool:
        """One step of the driver's interrupt handler; True if anything happened."""
        if self.reaper_state == "asleep":
            if not self.call_pending:
                return False
            self.call_pending = False
            self.reaper_state = "polling"
            self.driver.disable_interrupts()
        elif self.reaper_state == "polling":
            got = self.driver.reap()
            for t, written in got:
                self.check_reaped(t, written)
            if not got:
                self.reaper_state = "idle"
        elif self.driver.enable_interrupts():
            self.driver.disable_interrupts()
            self.reaper_state = "polling"
        else:
            self.reaper_state = "asleep"
        return True

    def check_reaped(self, t: int, written: int) -> None:
        assert 0 <= t < self.next_token
        assert t not in self.reaped, f"token {t} reaped twice"
        self.reaped[t] = written
        shape = self.shapes[t]
        rlen = sum(ln for ln, w in shape if not w)
        wlen = sum(ln for ln, w in shape if w)
        exp_len, exp = device_reply(readable_pattern(t, rlen), rlen, wlen)
        assert written == exp_len, (t, written, exp_len)
        slot = self.slot_of.pop(t)
        base = DATA + slot * SLOT + rlen
        assert bytes(self.buf[base : base + written]) == exp
        self.free_slots.append(slot)

    # -- device ------------------------------------------------------------------------
    def device_step(self, budget: int, hold: list[bool]) -> bool:
        """One step of the device's kick handler / poll loop; True if anything happened."""
        dev = self.device
        if self.dev_state == "asleep":
            if not self.kick_pending:
                return False
            self.kick_pending = False
            self.dev_state = "polling"
            dev.disable_notifications()
            return True
        if self.dev_state == "idle":
            if dev.enable_notifications():
                dev.disable_notifications()
                self.dev_state = "polling"
            else:
                self.dev_state = "asleep"
            return True
        chains = dev.pop(budget)
        assert dev.broken is None, dev.broken
        if not chains:
            self.dev_state = "idle"
            return True
        done = []
        for k, c in enumerate(chains):
            self.check_chain(c)
            if k < len(hold) and hold[k]:
                self.held.append(c)
            else:
                done.append(c)
        self.complete(done)
        return True

    def check_chain(self, c: Chain) -> None:
        t = self.popped
        self.popped += 1
        assert t < self.next_token, f"popped {t + 1} buffers, only {self.next_token} added"
        shape = self.shapes[t]
        assert c.readable_len == sum(ln for ln, w in shape if not w)
        assert c.writable_len == sum(ln for ln, w in shape if w)
        assert c.read_bytes() == readable_pattern(t, c.readable_len)

    def complete(self, chains: list[Chain]) -> None:
        if not chains:
            return
        elems = []
        for c in chains:
            written, data = device_reply(c.read_bytes(), c.readable_len, c.writable_len)
            assert c.write_bytes(data) == written
            elems.append((c.head, written))
        self.device.push(elems)
        if self.device.should_notify():
            self.call_pending = True

    def check_no_lost_wakeup(self) -> None:
        """A sleeper with nothing pending must have nothing to do (it asked for the next)."""
        if self.dev_state == "asleep" and not self.kick_pending:
            assert self.device.pending() == 0, "lost kick: device asleep with work published"
        if self.reaper_state == "asleep" and not self.call_pending:
            assert not self.driver.has_used(), "lost call: driver asleep with buffers used"

    # -- the end: run on notifications only ----------------------------------------------
    def drain(self) -> None:
        self.publish()
        total = len(self.shapes)
        for _ in range(100_000):
            if len(self.reaped) == total:
                return
            self.check_no_lost_wakeup()
            moved = False
            if self.held:
                held, self.held = self.held, []
                self.complete(held)
                moved = True
            while self.device_step(16, []):
                moved = True
                if self.dev_state == "asleep":
                    break
            while self.reaper_step():
                moved = True
                if self.reaper_state == "asleep":
                    break
            added = False
            while self.add(None):
                added = True
            if added:
                self.publish()
                moved = True
            assert moved, (
                f"lost wake-up: {total - len(self.reaped)} buffers outstanding, device and "
                f"driver both asleep (kick_pending={self.kick_pending}, "
                f"call_pending={self.call_pending}, sent={self.next_token})"
            )
        raise AssertionError("no completion after 100000 rounds")


shape_st = st.lists(
    st.tuples(st.integers(0, MAX_LEN), st.booleans()), min_size=1, max_size=MAX_ELEMS
).map(lambda s: sorted(s, key=lambda e: e[1]))  # readable first


def run(data: st.DataObject, sim: Sim) -> None:
    actions = data.draw(
        st.lists(
            st.sampled_from(["add", "publish", "device", "complete", "reap"]),
            min_size=30,
            max_size=300,
        )
    )
    for act in actions:
        if act == "add":
            sim.add(data.draw(st.sampled_from([None, False, True])))
        elif act == "publish":
            sim.publish()
        elif act == "device":
            budget = data.draw(st.integers(1, 8))
            sim.device_step(budget, data.draw(st.lists(st.booleans(), max_size=8)))
        elif act == "complete" and sim.held:
            k = data.draw(st.integers(1, len(sim.held)))
            idx = data.draw(st.permutations(range(len(sim.held))))[:k]
            chosen = [sim.held[i] for i in idx]
            sim.held = [c for i, c in enumerate(sim.held) if i not in set(idx)]
            sim.complete(chosen)
        elif act == "reap":
            sim.reaper_step()
        sim.check_no_lost_wakeup()
    sim.drain()
    assert sorted(sim.reaped) == list(range(len(sim.shapes)))
    assert sim.popped == len(sim.shapes)
    assert sim.device.in_flight == 0 and sim.driver.in_flight == 0
    assert sim.device.broken is None and sim.driver.broken is None


COMMON = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@COMMON
@given(
    data=st.data(),
    size=st.sampled_from([1, 2, 4, 8, 16]),
    event_idx=st.booleans(),
    indirect=st.booleans(),
    start=st.one_of(st.integers(65520, 65535), st.integers(0, 65535)),
    n=st.integers(1, 50),
)
def test_split_every_buffer_exactly_once(
    data: st.DataObject, size: int, event_idx: bool, indirect: bool, start: int, n: int
) -> None:
    # virtio 1.2 2.7.5.3.1: no chain longer than the queue size, indirect or not.
    shapes = [s[:size] for s in data.draw(st.lists(shape_st, min_size=n, max_size=n))]
    run(data, Sim(False, size, event_idx, indirect, start, True, shapes))


@COMMON
@given(
    data=st.data(),
    size=st.integers(1, 17),
    event_idx=st.booleans(),
    indirect=st.booleans(),
    start_frac=st.floats(0, 1),
    start_wrap=st.booleans(),
    n=st.integers(1, 50),
)
def test_packed_every_buffer_exactly_once(
    data: st.DataObject,
    size: int,
    event_idx: bool,
    indirect: bool,
    start_frac: float,
    start_wrap: bool,
    n: int,
) -> None:
    start = min(size - 1, int(start_frac * size))
    shapes = data.draw(st.lists(shape_st, min_size=n, max_size=n))
    shapes = [s[:size] for s in shapes]
    run(data, Sim(True, size, event_idx, indirect, start, start_wrap, shapes))


def test_split_full_lap_of_16_bit_indices() -> None:
    """More than 65536 buffers through a small ring: indices wrap, nothing is lost."""
    sim = Sim(False, 4, True, False, 65530, True, [[(4, False), (2, True)]] * 70_000)
    sim.drain()
    assert len(sim.reaped) == 70_000 and sim.popped == 70_000


def test_packed_many_laps() -> None:
    sim = Sim(True, 5, True, True, 3, False, [[(3, False), (2, True)]] * 5_000)
    sim.drain()
    assert len(sim.reaped) == 5_000 and sim.popped == 5_000
