"""The one scheduler of a device queue: when to run bursts, when to ask for kicks. No I/O.

Every device queue a back-end consumes has one :class:`QueueRunner`. It owns the queue's
available-buffer notification state (virtio 1.2 2.7.10 / 2.8.10) and decides after each
burst whether another one must follow; the shell only supplies "run this again soon" (a
reactor ``call_soon``) and, in busy-poll mode, a poller that calls :meth:`QueueRunner.step`
over and over. Devices never schedule anything: they say what a burst does
(:meth:`vhostuser.devices.Device.run_queue`).

Event mode (the default) works like Linux NAPI:

1. a kick arrives; the runner turns kicks off (``VRING_USED_F_NO_NOTIFY``, or an
   ``avail_event`` the driver has passed) and asks to be run;
2. it runs bursts while they find work, yielding to the reactor between them (so a flood
   on one queue never starves the others);
3. a burst that finds nothing re-arms kicks, issues a full barrier and re-reads the ring
   (``enable_notifications``): a buffer published in between is found there and drained,
   never left waiting for a kick that the driver will not send. Skipping this re-check is
   the classic lost wake-up.

Busy-poll mode (Snabb's model): kicks stay off for good and the poller runs a burst on
every queue in turn.

Two schedulers for one queue is how wake-ups get lost, so this is the only one: the kick
handler, the drain and the poller all end in :meth:`QueueRunner.step`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from .burst import BurstResult

__all__ = ["BurstFn", "QueueRunner"]

#: One burst on a ring: ``burst(ring, budget)`` pops at most ``budget`` chains, does the
#: device's work, pushes, and reports (never raises for guest faults).
BurstFn = Callable[[Any, int], BurstResult]


class QueueRunner:
    """The scheduling state of one device queue (see the module docstring).

    Args:
        index: the queue index (for messages).
        burst: what one burst does.
        budget: most chains per burst.
        poll: busy-poll mode: kicks stay off and the caller steps the queue forever.

    Attributes:
        scheduled: a step is pending (event mode); kicks meanwhile need no new step.
        bursts, chains, rearms: counters (bursts run, chains taken, times kicks were
            re-armed), for statistics and tests.
    """

    __slots__ = ("_ring", "_suppressed", "budget", "burst", "bursts", "chains", "index",
                 "poll", "rearms", "scheduled")

    def __init__(self, index: int, burst: BurstFn, *, budget: int = 256,
                 poll: bool = False) -> None:
        if budget < 1:
            raise ValueError(f"burst budget {budget} must be at least 1")
        self.index = index
        self.burst = burst
        self.budget = budget
        self.poll = poll
        self.scheduled = False
        self.bursts = 0
        self.chains = 0
        self.rearms = 0
        # The ring kicks were last turned off on, held weakly: a runner must not keep a
        # replaced ring (and through it a mapping of guest memory) alive.
        self._ring: weakref.ref[Any] | None = None
        self._suppressed = False

    def kicked(self) -> bool:
        """A kick (or a start) arrived. True if the caller must schedule :meth:`step`;
        False when a step is already pending or the poller drives the queue."""
        if self.poll or self.scheduled:
            return False
        self.scheduled = True
        return True

    def step(self, ring: Any) -> tuple[BurstResult, bool]:
        """Run one burst on ``ring``; return its result and whether to run again soon.

        In event mode, ``again`` False means the queue is drained and kicks are armed (or
        the ring is broken); the caller then waits for a kick. In poll mode ``again`` is
        always False (the poller calls again anyway).

        Raises:
            Exception: whatever the burst function raises for its own bugs (guest faults
                come back in the result). The runner is then idle with kicks on, so the
                queue is not silently stranded.
        """
        self.scheduled = False
        if self._ring is None or self._ring() is not ring:
            # A new ring object (started, or rebuilt on a memory-table change): its
            # suppression state is whatever the guest memory holds; set it again.
            self._ring = weakref.ref(ring)
            self._suppressed = False
        if not self._suppressed:
            ring.disable_notifications()
            self._suppressed = True
        try:
            res: BurstResult = self.burst(ring, self.budget)
        except BaseException:
            # Leave kicks on, so whatever the caller does next the queue is not stranded
            # with kicks off and nobody scheduled.
            self._suppressed = False
            ring.enable_notifications()
            raise
        self.bursts += 1
        self.chains += res.popped
        if res.broken is not None:
            self._suppressed = False
            return res, False
        if self.poll:
            return res, False
        if res.popped >= self.budget:
            # A full burst: more is probably waiting; come back after the other queues.
            self.scheduled = True
            return res, True
        # Fewer than the budget: the ring was drained when the burst read it (NAPI's
        # "work < budget"); ask for kicks again instead of an extra empty burst. The ring
        # re-reads its avail side after a full barrier, so nothing made available
        # meanwhile is missed.
        if self._rearm(ring):
            self.scheduled = True
            return res, True
        return res, False

    def _rearm(self, ring: Any) -> bool:
        """Re-enable kicks; True if work arrived meanwhile (kicks are then off again)."""
        self.rearms += 1
        self._suppressed = False
        if ring.enable_notifications():
            ring.disable_notifications()
            self._suppressed = True
            return True
        return False

    def hold(self, ring: Any) -> None:
        """The device does not take from the queue now (``Device.consumes`` is False: a
        disabled blk queue): nothing is scheduled, and kicks are left on, so the driver's
        buffers stay on the ring until the queue is woken again (enabled)."""
        self.scheduled = False
        if self._suppressed:
            self._suppressed = False
            ring.enable_notifications()

    def forget(self) -> None:
        """The ring stopped or was replaced: drop the reference to it (its views of guest
        memory must not outlive the mapping) and cancel the pending step's meaning."""
        self._ring = None
        self._suppressed = False
        self.scheduled = False
