"""A small single-threaded reactor: fd readiness (epoll via selectors), timers, busy-pollers.

One reactor thread serves all control sockets and kick
eventfds, so a SET_MEM_TABLE can never race a running ring; an optional busy-poll mode
spins over the queues instead of sleeping. docs/security.md rule 3: one bad peer must not take
down the rest, so an exception from one callback is logged, recorded and contained.
"""

from __future__ import annotations

import heapq
import logging
import selectors
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Self

__all__ = ["ErrorHook", "Reactor", "Timer"]

logger = logging.getLogger(__name__)

#: Callbacks take no arguments; whatever they return is ignored.
Callback = Callable[[], object]
#: Called as ``on_error(exc, callback)`` after a callback raised ``exc``.
ErrorHook = Callable[[Exception, Callable[[], object]], None]


class Timer:
    """A callback scheduled by :meth:`Reactor.call_later` or :meth:`Reactor.call_soon`."""

    __slots__ = ("_reactor", "callback", "cancelled", "when")

    def __init__(self, reactor: Reactor | None, when: float, callback: Callback) -> None:
        # Only heap timers keep a reactor reference: it counts their cancellations.
        self._reactor = reactor
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        """Stop the callback from running; harmless if it already ran or was cancelled."""
        if not self.cancelled:
            self.cancelled = True
            reactor, self._reactor = self._reactor, None
            if reactor is not None:
                reactor._timer_cancelled()

    def _fired(self) -> None:
        self._reactor = None

    def __repr__(self) -> str:
        state = " cancelled" if self.cancelled else ""
        return f"<Timer when={self.when:.6f} {self.callback!r}{state}>"


class _Reader:
    """The registration of one fd; identity tells a stale event from a fresh one."""

    __slots__ = ("callback", "fd")

    def __init__(self, fd: int, callback: Callback) -> None:
        self.fd = fd
        self.callback = callback


class Reactor:
    """Dispatch fd readiness, timers, soon-callbacks and busy-pollers on one thread.

    Callbacks take no arguments. One that raises is logged through
    ``logging.getLogger(__name__)``, appended to :attr:`errors` (the last ``max_errors``
    are kept) and passed to ``on_error``; the loop carries on. ``KeyboardInterrupt`` and
    other non-``Exception`` errors propagate.

    Reader callbacks must tolerate spurious wake-ups (use non-blocking fds) and must call
    :meth:`remove_reader` before closing their fd.
    """

    def __init__(self, *, on_error: ErrorHook | None = None, max_errors: int = 1000) -> None:
        """Create the reactor and its epoll selector.

        Raises:
            OSError: epoll_create failed (EMFILE).
        """
        self._selector = selectors.DefaultSelector()
        self._readers: dict[int, _Reader] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._cancelled_timers = 0
        self._seq = 0
        self._ready: deque[Timer] = deque()
        self._pollers: list[Callable[[], bool]] = []
        self._stopping = False
        self._closed = False
        self.on_error = on_error
        self.max_errors = max_errors
        #: Exceptions raised by callbacks, oldest first (for tests and diagnostics).
        self.errors: list[Exception] = []

    # -- registration ----------------------------------------------------------------------
    def add_reader(self, fd: int, callback: Callback) -> None:
        """Call ``callback()`` whenever ``fd`` is readable; replaces an earlier callback.

        Raises:
            ValueError: ``fd`` is negative, or the reactor is closed.
            OSError: epoll refused the fd (e.g. EPERM for a regular file, EBADF).
        """
        self._check_open()
        if fd < 0:
            raise ValueError(f"Reactor.add_reader: fd {fd} is negative")
        if fd in self._readers:
            # Unregister and register afresh rather than modify(): if the old fd was closed
            # without remove_reader, epoll already forgot it and modify() would fail.
            self._selector.unregister(fd)
            del self._readers[fd]
        entry = _Reader(fd, callback)
        self._selector.register(fd, selectors.EVENT_READ, entry)
        self._readers[fd] = entry

    def remove_reader(self, fd: int) -> bool:
        """Stop watching ``fd``; return False if it was not watched."""
        if self._readers.pop(fd, None) is None:
            return False
        # selectors ignores the OSError epoll raises for an already-closed fd.
        self._selector.unregister(fd)
        return True

    def has_reader(self, fd: int) -> bool:
        """True if ``fd`` is being watched."""
        return fd in self._readers

    def call_later(self, delay: float, callback: Callback) -> Timer:
        """Run ``callback()`` once, ``delay`` seconds from now (monotonic clock).

        Raises:
            ValueError: the reactor is closed.
        """
        self._check_open()
        timer = Timer(self, time.monotonic() + max(0.0, delay), callback)
        self._seq += 1
        heapq.heappush(self._timers, (timer.when, self._seq, timer))
        return timer

    def call_soon(self, callback: Callback) -> Timer:
        """Run ``callback()`` on the next loop iteration, in FIFO order; cancellable.

        Raises:
            ValueError: the reactor is closed.
        """
        self._check_open()
        timer = Timer(None, time.monotonic(), callback)
        self._ready.append(timer)
        return timer

    def add_poller(self, poller: Callable[[], bool]) -> None:
        """Call ``poller()`` on every iteration (busy-poll); it returns True if it did work.

        While any poller is registered the loop never sleeps.
        """
        self._pollers.append(poller)

    def remove_poller(self, poller: Callable[[], bool]) -> bool:
        """Unregister a poller; return False if it was not registered."""
        for i, p in enumerate(self._pollers):
            if p == poller:  # == so an equal bound method matches
                del self._pollers[i]
                return True
        return False

    # -- running ---------------------------------------------------------------------------
    def time(self) -> float:
        """The reactor's clock (``time.monotonic``)."""
        return time.monotonic()

    def stop(self) -> None:
        """Make :meth:`run` return after the current iteration."""
        self._stopping = True

    def _has_work_sources(self) -> bool:
        return bool(
            self._readers
            or self._ready
            or self._pollers
            or len(self._timers) > self._cancelled_timers
        )

    def run(self, until: Callable[[], bool] | None = None, timeout: float | None = None) -> bool:
        """Run iterations until ``until()`` is true, :meth:`stop` is called or ``timeout``
        seconds pass.

        Returns True when ``until()`` became true or :meth:`stop` was called, False when
        ``timeout`` expired first. Without a ``timeout``, once nothing is registered any
        more (no fd, timer, callback or poller) no event could ever arrive, so it returns
        at once: True without ``until``, False with one (``until()`` is still false).

        Raises:
            ValueError: the reactor is closed.
            BaseException: whatever non-``Exception`` a callback raised (KeyboardInterrupt);
                exceptions from ``until`` itself propagate too.
        """
        self._check_open()
        self._stopping = False
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                if until is not None and until():
                    return True
                if self._stopping:
                    return True
                if deadline is None:
                    if not self._has_work_sources():
                        # Nothing registered could ever make progress: blocking (or
                        # spinning on until()) would last forever.
                        return until is None
                    wait = None
                else:
                    wait = deadline - time.monotonic()
                    if wait <= 0:
                        return False
                self.run_once(wait)
        finally:
            self._stopping = False

    def run_once(self, timeout: float | None = None) -> bool:
        """Run one iteration: wait for events (at most ``timeout`` s, None = until one),
        then dispatch ready fds, due timers, soon-callbacks and pollers.

        Returns True if anything ran (a poller counts only if it returned True). With
        ``timeout=None`` and nothing registered it returns False at once.

        Raises:
            ValueError: the reactor is closed.
        """
        self._check_open()
        wait = timeout
        if self._ready or self._pollers:
            wait = 0.0
        elif self._timers:
            self._drop_cancelled_head()
            if self._timers:
                until_due = max(0.0, self._timers[0][0] - time.monotonic())
                wait = until_due if wait is None else min(wait, until_due)
        if wait is not None and wait < 0:
            wait = 0.0
        elif wait is None and not self._has_work_sources():
            return False  # nothing registered: blocking now would block forever
        did = False

        for key, _mask in self._selector.select(wait):
            entry: _Reader = key.data
            # A callback earlier in this batch may have removed or replaced this fd's
            # registration; only the registration the event was for may run.
            if self._readers.get(key.fd) is entry:
                did = True
                self._invoke(entry.callback)

        if self._timers:
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, _, timer = heapq.heappop(self._timers)
                if timer.cancelled:
                    self._cancelled_timers -= 1
                    continue
                timer._fired()
                did = True
                self._invoke(timer.callback)

        # Only what was queued before this point runs now; callbacks queued by these
        # run on the next iteration, so call_soon loops cannot starve the fds.
        for _ in range(len(self._ready)):
            timer = self._ready.popleft()
            if timer.cancelled:
                continue
            timer._fired()
            did = True
            self._invoke(timer.callback)

        for poller in tuple(self._pollers):
            try:
                if poller():
                    did = True
            except Exception as e:
                self._record_error(e, poller)
        return did

    # -- errors ----------------------------------------------------------------------------
    def _invoke(self, callback: Callback) -> None:
        try:
            callback()
        except Exception as e:
            self._record_error(e, callback)

    def _record_error(self, exc: Exception, callback: Callable[[], object]) -> None:
        logger.error("reactor: callback %r raised %r", callback, exc, exc_info=exc)
        self.errors.append(exc)
        if len(self.errors) > self.max_errors:
            del self.errors[: len(self.errors) - self.max_errors]
        hook = self.on_error
        if hook is not None:
            try:
                hook(exc, callback)
            except Exception:
                logger.exception("reactor: on_error hook raised")

    # -- timers bookkeeping ----------------------------------------------------------------
    def _timer_cancelled(self) -> None:
        self._cancelled_timers += 1
        # Compact when cancelled entries dominate, so cancelled reconnect/deadline timers
        # cannot pile up in the heap.
        if self._cancelled_timers > 64 and self._cancelled_timers * 2 > len(self._timers):
            self._timers = [t for t in self._timers if not t[2].cancelled]
            heapq.heapify(self._timers)
            self._cancelled_timers = 0

    def _drop_cancelled_head(self) -> None:
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
            self._cancelled_timers -= 1

    # -- lifetime --------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("Reactor: closed")

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def close(self) -> None:
        """Forget every registration and close the epoll fd. Idempotent.

        The watched fds themselves are not closed: their owners close them.
        """
        if self._closed:
            return
        self._closed = True
        self._readers.clear()
        self._timers.clear()
        self._ready.clear()
        self._pollers.clear()
        self._selector.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
