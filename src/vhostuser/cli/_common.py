"""What the long-running commands share: socket-mode and verbosity options, logging set-up,
and a clean stop on SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
from collections.abc import Iterator
from types import FrameType

from ..io.reactor import Reactor


def octal_mode(text: str) -> int:
    """argparse type for a socket file mode such as ``600`` or ``0o660``.

    Raises:
        argparse.ArgumentTypeError: not an octal number in 0..0o777 (names the value).
    """
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"mode {text!r} is not an octal number") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"mode {text!r} is outside 0..777")
    return mode


def add_verbose(p: argparse.ArgumentParser | argparse._ArgumentGroup, what: str) -> None:
    """Add ``-v/--verbose`` (counted): ``-v`` logs ``what``, ``-vv`` every message too."""
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help=f"log {what} (-v) and every vhost-user message (-vv)")


def setup_logging(verbose: int) -> None:
    """Log at WARNING, INFO (-v) or DEBUG (-vv) with timestamps."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s")


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


def error_text(e: BaseException) -> str:
    """One line for a user: an OSError as ``PATH: what happened`` (no errno number, no
    internal function name), anything else as its message."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return str(e)


def path_error(path: str, e: BaseException) -> str:
    """:func:`error_text` of an error about ``path``, naming the path once."""
    if isinstance(e, OSError) and e.strerror and e.filename:
        return error_text(e)
    return f"{path}: {error_text(e)}"
