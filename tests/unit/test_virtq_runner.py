"""The queue runner (the one scheduler of a queue) and deferred publication of used buffers,
over our driver rings in a bytearray: split and packed, with and without EVENT_IDX."""

from __future__ import annotations

from typing import Any

import pytest

from vhostuser.memory import FlatMemory
from vhostuser.virtq import (
    PackedDeviceRing,
    PackedDriverRing,
    SplitDeviceRing,
    SplitDriverRing,
    packed_layout,
    run_burst,
    split_layout,
)
from vhostuser.virtq.burst import BurstResult
from vhostuser.virtq.runner import QueueRunner

SIZE = 16
DATA = 0x8000
KINDS = [("split", False), ("split", True), ("packed", False), ("packed", True)]
IDS = [f"{k}-{'evidx' if e else 'plain'}" for k, e in KINDS]


class Pair:
    """A driver ring and the device ring over the same bytearray."""

    def __init__(self, kind: str, event_idx: bool) -> None:
        self.buf = bytearray(1 << 16)
        self.mem = FlatMemory(self.buf)
        self.dev: Any
        self.drv: Any
        if kind == "split":
            d, a, u, _ = split_layout(SIZE, 0)
            self.drv = SplitDriverRing(self.mem, SIZE, d, a, u, event_idx=event_idx)
            self.dev = SplitDeviceRing(self.mem, SIZE, d, a, u, event_idx=event_idx,
                                       indirect=False)
        else:
            d, a, u, _ = packed_layout(SIZE, 0)
            self.drv = PackedDriverRing(self.mem, SIZE, d, a, u, event_idx=event_idx)
            self.dev = PackedDeviceRing(self.mem, SIZE, d, a, u, event_idx=event_idx,
                                        indirect=False)
        self.tok = 0

    def offer(self, n: int, writable: bool = True) -> None:
        for _ in range(n):
            assert self.drv.add([(DATA + 64 * (self.tok % 64), 64, writable)], self.tok)
            self.tok += 1
        self.drv.publish()


# -- deferred publication ---------------------------------------------------------------


@pytest.mark.parametrize(("kind", "evidx"), KINDS, ids=IDS)
def test_held_used_buffers_are_invisible_until_published(kind: str, evidx: bool) -> None:
    p = Pair(kind, evidx)
    p.offer(6)
    chains = p.dev.pop(6)
    p.dev.push([(c.head, 10) for c in chains[:2]], publish=False)
    p.dev.push([(c.head, 20) for c in chains[2:4]], publish=False)
    assert p.dev.held
    assert not p.dev.should_notify()  # nothing visible, nothing to signal
    assert list(p.drv.reap()) == []
    p.dev.publish()
    assert not p.dev.held
    assert p.dev.should_notify()
    assert list(p.drv.reap()) == [(0, 10), (1, 10), (2, 20), (3, 20)]
    # A held push followed by a published one: both become visible, in order.
    p.dev.push([(chains[4].head, 5)], publish=False)
    p.dev.push([(chains[5].head, 6)])
    assert not p.dev.held
    assert list(p.drv.reap()) == [(4, 5), (5, 6)]
    p.dev.publish()  # nothing held: a no-op
    assert list(p.drv.reap()) == []


def test_split_complete_in_place_can_hold_back() -> None:
    p = Pair("split", False)
    p.offer(3)
    heads = p.dev.peek_heads(3)
    assert heads == [0, 1, 2]
    p.dev.complete_in_place([0, 7, 1, 8], 2, publish=False)
    assert list(p.drv.reap()) == []
    assert p.dev.next_avail == 2  # taken, only not published
    p.dev.publish()
    assert list(p.drv.reap()) == [(0, 7), (1, 8)]


@pytest.mark.parametrize("kind", ["split", "packed"])
def test_publish_on_a_broken_ring_does_nothing(kind: str) -> None:
    p = Pair(kind, False)
    p.offer(1)
    (c,) = p.dev.pop(1)
    p.dev.push([(c.head, 1)], publish=False)
    p.dev.mark_broken("test")
    p.dev.publish()
    assert list(p.drv.reap()) == []


# -- the runner -------------------------------------------------------------------------


def consume(ring: Any, budget: int) -> BurstResult:
    return run_burst(ring, lambda chains: [(c.head, 0) for c in chains], budget)


@pytest.mark.parametrize(("kind", "evidx"), KINDS, ids=IDS)
def test_runner_drains_then_rearms(kind: str, evidx: bool) -> None:
    p = Pair(kind, evidx)
    r = QueueRunner(1, consume, budget=4)
    p.offer(10)
    assert p.drv.should_kick()
    assert r.kicked()
    assert not r.kicked()  # a step is pending: a second kick schedules nothing
    steps = []
    again = True
    while again:
        res, again = r.step(p.dev)
        steps.append(res.popped)
        if len(steps) == 2:
            p.offer(1)  # published while draining: found without a kick
            assert not p.drv.should_kick()
    # The third burst takes fewer than the budget: the ring was drained, so kicks are
    # re-armed at once (no extra empty burst).
    assert steps == [4, 4, 3]
    assert r.chains == 11 and r.rearms == 1
    p.offer(1)
    assert p.drv.should_kick()  # drained and re-armed: kicks are wanted again


@pytest.mark.parametrize(("kind", "evidx"), KINDS, ids=IDS)
def test_runner_rechecks_after_rearming(kind: str, evidx: bool) -> None:
    """The lost wake-up: a buffer published between the last empty look and the re-arm
    must be found by the re-check, with no kick."""
    p = Pair(kind, evidx)
    calls = 0

    def burst(ring: Any, budget: int) -> BurstResult:
        nonlocal calls
        calls += 1
        res = consume(ring, budget)
        if calls == 1:
            assert res.popped == 1
            p.offer(1)  # the driver publishes right after our pop read the ring
            assert not p.drv.should_kick()  # kicks are still off: it will not kick
        return res

    r = QueueRunner(1, burst)
    p.offer(1)
    assert p.drv.should_kick()
    assert r.kicked()
    res, again = r.step(p.dev)
    assert res.popped == 1 and again  # the re-check after re-arming found the second
    assert r.rearms == 1
    res, again = r.step(p.dev)
    assert res.popped == 1 and not again
    assert r.rearms == 2
    p.offer(1)
    assert p.drv.should_kick()


@pytest.mark.parametrize(("kind", "evidx"), KINDS, ids=IDS)
def test_runner_full_burst_comes_back_without_rearming(kind: str, evidx: bool) -> None:
    """A burst that used its whole budget may have left work: the runner asks to run
    again with kicks still off, and re-arms only once a burst comes back short."""
    p = Pair(kind, evidx)
    r = QueueRunner(1, consume, budget=2)
    p.offer(2)
    assert r.kicked()
    res, again = r.step(p.dev)
    assert res.popped == 2 and again and r.rearms == 0
    p.offer(1)
    res, again = r.step(p.dev)
    assert res.popped == 1 and not again and r.rearms == 1


@pytest.mark.parametrize("kind", ["split", "packed"])
def test_runner_poll_mode_keeps_kicks_off(kind: str) -> None:
    p = Pair(kind, False)
    r = QueueRunner(1, consume, poll=True)
    assert not r.kicked()  # the poller drives it
    p.offer(2)
    res, again = r.step(p.dev)
    assert res.popped == 2 and not again
    res, again = r.step(p.dev)
    assert res.popped == 0 and not again
    p.offer(1)
    assert not p.drv.should_kick()


def test_runner_rearms_when_the_burst_raises() -> None:
    """A device bug must not leave the queue with kicks off and nobody polling."""
    p = Pair("split", False)

    def bad(ring: Any, budget: int) -> BurstResult:
        raise ValueError("handler bug")

    r = QueueRunner(1, bad)
    r.kicked()
    p.offer(1)
    with pytest.raises(ValueError, match="handler bug"):
        r.step(p.dev)
    assert not r.scheduled
    p.offer(1)
    assert p.drv.should_kick()


def test_runner_suppresses_again_on_a_new_ring_object() -> None:
    p = Pair("split", False)
    r = QueueRunner(1, consume, budget=1)
    p.offer(1)
    r.kicked()
    r.step(p.dev)
    d, a, u, _ = split_layout(SIZE, 0)
    rebuilt = SplitDeviceRing(p.mem, SIZE, d, a, u, event_idx=False, indirect=False,
                              next_avail=p.dev.next_avail)
    p.dev.enable_notifications()  # the guest memory says kicks are on
    p.offer(1)
    res, again = r.step(rebuilt)
    assert res.popped == 1 and again
    p.offer(1)
    assert not p.drv.should_kick()  # the new ring object got kicks turned off


def test_runner_rejects_a_zero_budget() -> None:
    with pytest.raises(ValueError, match="budget 0"):
        QueueRunner(1, consume, budget=0)
