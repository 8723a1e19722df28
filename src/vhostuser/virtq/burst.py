"""The burst loop: one function per queue that a compiled implementation can replace. No I/O.

:func:`run_burst` pops a batch of chains, hands it to the device handler, pushes what the
handler completed, and says whether to notify the driver (docs/architecture.md: read
``avail`` once, process up to a budget, publish ``used`` once, notify at most once).
Guest faults never escape: they come back as ``BurstResult.broken``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..errors import RingError
from .chain import Chain

__all__ = ["BurstResult", "DeviceRing", "Handler", "run_burst"]

#: A device handler: takes the popped chains, returns ``(head, written_len)`` for each chain
#: it completed now (chains it keeps are pushed later with ``ring.push``). It may raise
#: :class:`RingError` for a guest fault in a chain's contents (e.g. a short header).
Handler = Callable[[list[Chain]], Sequence[tuple[int, int]]]


class DeviceRing(Protocol):
    """What :func:`run_burst` needs: implemented by SplitDeviceRing and PackedDeviceRing."""

    @property
    def broken(self) -> str | None: ...

    def pop(self, budget: int) -> list[Chain]: ...

    def push(self, elems: Sequence[tuple[int, int]]) -> None: ...

    def should_notify(self) -> bool: ...

    def mark_broken(self, reason: str) -> None: ...


@dataclass(frozen=True, slots=True)
class BurstResult:
    """What one burst did.

    Attributes:
        popped: chains taken from the ring.
        pushed: chains returned as used.
        notify: the driver must be notified (write the call eventfd).
        broken: the ring's broken reason if it is (now) broken - signal the err eventfd and
            stop polling this queue; None otherwise.
    """

    popped: int
    pushed: int
    notify: bool
    broken: str | None


_IDLE = BurstResult(0, 0, False, None)


def run_burst(ring: DeviceRing, handler: Handler, budget: int = 256) -> BurstResult:
    """Pop up to ``budget`` chains, run ``handler`` on them, push the results, decide notify.

    Raises:
        ValueError: the handler returned a head that is not in flight or a bad length (a
            bug in the handler, not a guest fault).
        Exception: whatever else ``handler`` raises (its own bugs) propagates unchanged.
        Guest faults (:class:`RingError` from the ring or the handler) are never raised: the
        ring is marked broken and the result says so.
    """
    popped = pushed = 0
    try:
        chains = ring.pop(budget)
        if not chains:
            broken = ring.broken
            return _IDLE if broken is None else BurstResult(0, 0, False, broken)
        popped = len(chains)
        done = handler(chains)
        if done:
            ring.push(done)
            pushed = len(done)
        return BurstResult(popped, pushed, ring.should_notify(), ring.broken)
    except RingError as e:
        ring.mark_broken(str(e))
        return BurstResult(popped, pushed, False, ring.broken)
