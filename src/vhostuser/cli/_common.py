"""What the long-running commands share: socket-mode and verbosity options, logging set-up,
and a clean stop on SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import Iterator
from types import FrameType
from typing import Any

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


def seconds(text: str) -> float:
    """An argparse type: a number of seconds >= 0.

    Raises:
        argparse.ArgumentTypeError: not a number, negative, or not finite.
    """
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= v < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} seconds: must be 0 or more")
    return v


def positive(kind: type[int] | type[float]) -> Any:
    """An argparse type: a number of ``kind`` greater than 0."""

    def parse(text: str) -> int | float:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not 0 < v < float("inf"):
            raise argparse.ArgumentTypeError(f"{text}: must be greater than 0")
        return v

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def add_wait(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--wait SECONDS``: how long to wait for a back-end to listen (default: not at all)."""
    p.add_argument("--wait", type=seconds, default=0.0, metavar="SECONDS",
                   help="wait up to SECONDS for a back-end to listen on SOCKET (default 0: "
                        "fail at once, saying what is at the path)")


def announce_wait(cmd: str, path: str, wait: float) -> None:
    """Say on stderr that ``cmd`` waits for ``path`` (when it does)."""
    if wait > 0:
        print(f"vhost-user {cmd}: waiting up to {wait:g} s for a back-end on {path}",
              file=sys.stderr, flush=True)


def connect_error(path: str, e: BaseException) -> str:
    """Why connecting to the socket ``path`` failed, in words a user can act on: nothing
    there, not a socket (and what it is), a socket nobody listens on, or the error."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return (f"{path}: no such socket (is the back-end running? --wait SECONDS waits "
                "for it)")
    except OSError as e2:
        return f"{path}: {e2.strerror}"
    if stat.S_ISDIR(st.st_mode):
        return f"{path}: is a directory, not a socket"
    if not stat.S_ISSOCK(st.st_mode):
        kind = "a regular file" if stat.S_ISREG(st.st_mode) else "not a socket file"
        return f"{path}: is {kind}, not a socket"
    cause: BaseException | None = e
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__
    if isinstance(cause, OSError) and cause.errno == errno.ECONNREFUSED:
        return (f"{path}: nothing listens on this socket (a stale socket left by a back-end "
                "that stopped?)")
    return path_error(path, e)


#: Library parameter names and the command-line flags that set them, so that an error
#: raised by a constructor names what the user typed.
FLAGS = {
    "num_queues": "--queues", "blk_size": "--blk-size", "serial": "--serial",
    "queue_pairs": "--queue-pairs", "mtu": "--mtu", "aging": "--aging",
    "max_macs": "--max-macs", "latency": "--latency",
}


def flag_text(e: BaseException) -> str:
    """:func:`error_text`, with a leading library parameter name replaced by its flag."""
    text = error_text(e)
    for name, flag in FLAGS.items():
        if text.startswith(name + " "):
            return flag + text[len(name):]
    return text
