"""Stop a reactor cleanly on SIGINT/SIGTERM (shared by the long-running commands)."""

from __future__ import annotations

import contextlib
import signal
import socket
from collections.abc import Iterator
from types import FrameType

from ..io.reactor import Reactor


@contextlib.contextmanager
def stop_on_signals(reactor: Reactor) -> Iterator[list[int]]:
    """While inside, SIGINT and SIGTERM stop ``reactor``; yields the signals received.

    A Python signal handler alone cannot interrupt ``epoll_wait`` (PEP 475 retries it), so
    the C-level handler writes to a socketpair (``signal.set_wakeup_fd``) that the reactor
    watches. Handlers and the wakeup fd are restored on exit, after the caller's clean-up
    inside the block: a second signal during clean-up is absorbed, not fatal.
    """
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    got: list[int] = []

    def on_wake() -> None:
        with contextlib.suppress(BlockingIOError):
            wake_r.recv(64)

    def stop(signum: int, _frame: FrameType | None) -> None:
        got.append(signum)
        reactor.stop()

    old_fd = signal.set_wakeup_fd(wake_w.fileno())
    reactor.add_reader(wake_r.fileno(), on_wake)
    old_int = signal.signal(signal.SIGINT, stop)
    old_term = signal.signal(signal.SIGTERM, stop)
    try:
        yield got
    finally:
        if not reactor.closed:
            reactor.remove_reader(wake_r.fileno())
        signal.set_wakeup_fd(old_fd)
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
        wake_r.close()
        wake_w.close()
