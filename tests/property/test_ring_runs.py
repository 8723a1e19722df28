"""The burst API of the rings' in-place fast path (``peek_run``/``complete_run``) behaves
exactly like the per-chain one (``peek_simple``/``complete_in_place``).

Two identical guest memories hold one device ring each (split or packed); a driver written
by hand here makes buffers available in any order - consecutive heads or ids (wrapping at
the ring's end), any permutation, heads or ids outside the queue or repeated, chains of
several descriptors, receive and transmit flags mixed - and the device side of one memory
uses the per-chain calls, the other the burst calls. What they return, every byte of guest
memory, the ring state and the dirty log must stay equal.
"""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from vhostuser.errors import RingError
from vhostuser.memory import DirtyLog, FlatMemory
from vhostuser.virtq import (
    INITIAL_BASE,
    PackedDeviceRing,
    SplitDeviceRing,
    packed_layout,
    split_layout,
)
from vhostuser.virtq.chain import DESC_F_NEXT, DESC_F_WRITE

MEM = 1 << 20
RING = 0x1000
DATA = 0x40000
AVAIL_BIT = 1 << 7
USED_BIT = 1 << 15


class World:
    """One guest memory with a device ring and a hand-written driver for it."""

    def __init__(self, packed: bool, size: int, logged: bool) -> None:
        self.buf = bytearray(MEM)
        self.mem = FlatMemory(self.buf)
        if logged:
            self.mem.log = DirtyLog(bytearray(MEM // 4096 // 8))
        self.packed = packed
        self.size = size
        self.next = 0  # driver: next avail index (split) or slot (packed)
        self.wrap = 1  # driver: packed avail wrap counter
        self.outstanding = 0
        self.ring: Any
        if packed:
            # The descriptor ring ends at a page boundary: a dirty mark past its end
            # would set another bit.
            d, drv, dev, _ = packed_layout(size, 2 * RING - 16 * size)
            self.desc = d
            self.ring = PackedDeviceRing(self.mem, size, d, drv, dev, base=INITIAL_BASE,
                                         event_idx=False, indirect=False, name="ring")
        else:
            d, a, u, _ = split_layout(size, RING)
            self.desc, self.avail = d, a
            self.ring = SplitDeviceRing(self.mem, size, d, a, u, event_idx=False,
                                        indirect=False, name="ring")

    def offer(self, bufs: list[tuple[int, int, int, int]]) -> None:
        """Make ``(head or id, addr, len, flags)`` available, one descriptor each."""
        room = self.size - self.outstanding
        bufs = bufs[:room]
        if self.packed:
            slots = []
            for bid, addr, ln, flags in bufs:
                slot = self.next
                pat = AVAIL_BIT if self.wrap else USED_BIT
                struct.pack_into("<QIH", self.buf, self.desc + 16 * slot, addr, ln, bid)
                slots.append((slot, pat | flags))
                self.next += 1
                if self.next == self.size:
                    self.next = 0
                    self.wrap ^= 1
            # Flags last, the first buffer's very last (virtio 1.2 2.8.6 for the driver).
            for slot, f in slots[1:] + slots[:1]:
                struct.pack_into("<H", self.buf, self.desc + 16 * slot + 14, f)
        else:
            for head, addr, ln, flags in bufs:
                h = head % self.size
                struct.pack_into("<QIHH", self.buf, self.desc + 16 * h, addr, ln, flags,
                                 (h + 1) % self.size)
                struct.pack_into("<H", self.buf, self.avail + 4 + 2 * (self.next % self.size),
                                 head)
                self.next = (self.next + 1) & 0xFFFF
            struct.pack_into("<H", self.buf, self.avail + 2, self.next)
        self.outstanding += len(bufs)

    def snapshot(self) -> tuple[Any, ...]:
        log = self.mem.log
        return (bytes(self.buf), list(self.ring.state), None if log is None else bytes(log.buf))


buf_st = st.tuples(
    st.sampled_from(["next"] * 12 + ["random", "outside"]),  # which head / id
    st.integers(0, 1 << 16),
    st.sampled_from([64, 64, 1500, 0]),  # length
    st.sampled_from([None] * 20 + [0, DESC_F_WRITE, DESC_F_NEXT]),  # None: the offer's
)
offer_st = st.tuples(st.sampled_from([0, DESC_F_WRITE]),
                     st.lists(buf_st, min_size=0, max_size=40))
take_st = st.tuples(
    st.integers(1, 70),  # limit
    st.sampled_from([True] * 5 + [False]),  # the flags of the offer (else the others)
    st.one_of(st.just(70), st.integers(0, 70)),  # how many of them to complete
    st.sampled_from(["zero", "lens", "some-zero"]),
    st.booleans(),  # publish
)
# Each step: buffers made available, then the device side takes some; sometimes the ring
# engine takes the chain in front first (one the fast path leaves to it), or held used
# buffers are published.
step_st = st.tuples(offer_st, st.sampled_from(["take"] * 6 + ["pop", "publish"]), take_st)


@settings(max_examples=300, deadline=None)
@given(packed=st.booleans(), size=st.sampled_from([8, 16, 64]), logged=st.booleans(),
       script=st.lists(step_st, min_size=1, max_size=30))
def test_runs_match_the_per_chain_calls(packed: bool, size: int, logged: bool,
                                        script: list[tuple[Any, str, Any]]) -> None:
    a, b = World(packed, size, logged), World(packed, size, logged)
    counter = 0
    for step, (offer, kind, arg) in enumerate(script):
        common, items = offer
        bufs = []
        for which, r, ln, odd in items:
            if which == "next":
                head = counter % size
                counter += 1
            elif which == "random":
                head = r % size
            else:
                head = size + r % 1000
            addr = DATA + 2048 * (r % 200)
            bufs.append((head, addr, ln, common if odd is None else odd))
        bufs = bufs[: size - a.outstanding]
        counter -= len(items) - len(bufs)  # heads and ids of buffers not offered: again
        a.offer(bufs)
        b.offer(bufs)
        if kind == "publish":
            a.ring.publish()
            b.ring.publish()
        elif kind == "pop":
            for w in (a, b):
                try:
                    chains = w.ring.pop(1)
                except RingError:
                    continue
                w.ring.push([(c.head, 0) for c in chains])
                w.outstanding -= len(chains)
        else:
            limit, same, take, how, publish = arg
            flags = common if same else common ^ DESC_F_WRITE
            ents = a.ring.peek_simple(limit, flags)
            run = b.ring.peek_run(limit, flags)
            if ents is None:
                assert run is None
                continue
            assert run is not None
            assert [list(x) for x in zip(*ents, strict=True)] == (
                [list(x) for x in run] if ents else [])
            ids, addrs, lens = run
            n = min(take, len(ids))
            if how == "zero":
                written = [0] * n
            elif how == "lens":
                written = [ln + 1 for ln in lens[:n]]
            else:
                written = [(ln if k % 3 else 0) for k, ln in enumerate(lens[:n])]
            used = [x for k in range(n) for x in (ids[k], written[k])]
            a.ring.complete_in_place(used, n, publish=publish)
            b.ring.complete_run(ids, addrs, None if how == "zero" else written, n,
                                publish=publish)
            a.outstanding -= n
            b.outstanding -= n
        assert a.snapshot() == b.snapshot(), f"step {step}"
