"""Guest memory that shrinks under our mappings: seal it, or guard it.

A front-end gives us guest RAM as file descriptors that we map MAP_SHARED. A front-end
that truncates such a file afterwards (by mistake or on purpose) turns our next access
to a lost page into SIGBUS, which kills the process: every other VM on a switch, every
other disk of a server (docs/security.md, hostile class "memory"). Two defences, in this order:

1. **Seal.** A memfd created with MFD_ALLOW_SEALING and not yet sealed with F_SEAL_SEAL
   gets F_SEAL_SHRINK added when we map it (:func:`seal_shrink`); the kernel then refuses
   the truncation itself. QEMU's memory-backend-memfd seals by default already.
2. **Guard.** Files that cannot be sealed (tmpfs and hugetlbfs files: QEMU's -mem-path and
   memory-backend-file, the seed's set-up) are registered with the compiled module
   ``vhostuser._memguard``: its SIGBUS handler maps zeros over the faulting page, counts
   the fault and wakes the reactor through an eventfd; :func:`dispatch` then calls the
   owner's callback (the back-end session closes the connection at fault, which unmaps
   the region, overlay and all). The process and every other connection carry on.

Without the compiled module (no C compiler at install time), unsealed regions are
unguarded; the log says so once.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import logging
import mmap
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

__all__ = [
    "Fault",
    "Guard",
    "available",
    "dispatch",
    "guard",
    "seal_shrink",
]

logger = logging.getLogger(__name__)

_F_ADD_SEALS: int = getattr(fcntl, "F_ADD_SEALS", 1033)
_F_GET_SEALS: int = getattr(fcntl, "F_GET_SEALS", 1034)
_F_SEAL_SEAL: int = getattr(fcntl, "F_SEAL_SEAL", 0x0001)
_F_SEAL_SHRINK: int = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)


class _Module(Protocol):
    """What ``vhostuser._memguard`` provides (see src/vhostuser/_memguard.c)."""

    def guard_add(self, buffer: mmap.mmap, align: int, /) -> int: ...
    def guard_remove(self, slot: int, /) -> None: ...
    def guard_faults(self, slot: int, /) -> tuple[int, int]: ...
    def guard_generation(self) -> int: ...
    def guard_notify(self, fd: int, /) -> None: ...


def _load() -> _Module | None:
    if os.environ.get("VHOSTUSER_NO_MEMGUARD"):  # tests: behave as without a compiler
        return None
    try:
        return cast(_Module, importlib.import_module("vhostuser._memguard"))
    except ImportError:
        return None


def _notifier() -> int | None:
    # One eventfd for the process's lifetime, made at import: the handler may write to it
    # at any moment, so it is never closed (a reused fd number would get its writes).
    if _module is None:
        return None
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    _module.guard_notify(fd)
    return fd


_module = _load()
_notify_fd = _notifier()
_guards: dict[int, Guard] = {}
_watchers: weakref.WeakKeyDictionary[_Reactor, int] = weakref.WeakKeyDictionary()
_warned = False


@dataclass(frozen=True)
class Fault:
    """Faults caught in one guarded range: how many, and the first one's offset in it."""

    count: int
    offset: int


def available() -> bool:
    """True when the compiled guard is built (unsealed regions can be guarded)."""
    return _module is not None


def seal_shrink(fd: int) -> bool:
    """Make sure the file behind ``fd`` can never shrink; return True if it cannot.

    True when it already carries F_SEAL_SHRINK or we could add it (a memfd created with
    MFD_ALLOW_SEALING, without F_SEAL_SEAL, opened for writing). False for files without
    seals (tmpfs and hugetlbfs files: EINVAL) and for memfds the front-end closed to
    sealing (F_SEAL_SEAL) or gave us read-only (EPERM). Never raises.
    """
    try:
        seals = fcntl.fcntl(fd, _F_GET_SEALS)
    except OSError:  # EINVAL: not a memfd
        return False
    if seals & _F_SEAL_SHRINK:
        return True
    if seals & _F_SEAL_SEAL:
        return False
    try:
        fcntl.fcntl(fd, _F_ADD_SEALS, _F_SEAL_SHRINK)
    except OSError as e:  # EPERM: read-only fd; EBUSY cannot happen for SHRINK
        logger.debug("memguard: cannot seal fd %d against shrinking: %s", fd, e)
        return False
    return True


class _Reactor(Protocol):
    def add_reader(self, fd: int, callback: Callable[[], object]) -> None: ...
    def remove_reader(self, fd: int) -> bool: ...


class Guard:
    """One guarded range (a mapping of an unsealed file); see :func:`guard`."""

    __slots__ = ("_reactor", "_reported", "on_fault", "slot")

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.on_fault: Callable[[Fault], None] | None = None
        """Called (from :func:`dispatch`, on the reactor) when new faults were caught."""
        self._reported = 0
        self._reactor: _Reactor | None = None

    def watch(self, reactor: _Reactor, on_fault: Callable[[Fault], None]) -> None:
        """Call ``on_fault`` from ``reactor`` when a fault is caught in this range.

        The reactor watches the guard's eventfd while any range watched through it is
        guarded (so an idle reactor still finds nothing to wait for).
        """
        self.on_fault = on_fault
        if self._reactor is reactor or self.slot < 0:
            return
        self._unwatch()
        self._reactor = reactor
        count = _watchers.get(reactor, 0)
        if count == 0 and _notify_fd is not None:
            reactor.add_reader(_notify_fd, dispatch)
        _watchers[reactor] = count + 1

    def _unwatch(self) -> None:
        reactor, self._reactor = self._reactor, None
        if reactor is None:
            return
        count = _watchers.get(reactor, 0) - 1
        if count <= 0:
            _watchers.pop(reactor, None)
            if _notify_fd is not None:
                with contextlib.suppress(ValueError, OSError):  # reactor already closed
                    reactor.remove_reader(_notify_fd)
        else:
            _watchers[reactor] = count

    def faults(self) -> Fault:
        """Faults caught so far in this range."""
        if _module is None or self.slot < 0:
            return Fault(0, 0)
        count, offset = _module.guard_faults(self.slot)
        return Fault(count, offset)

    def release(self) -> None:
        """Stop guarding (call only after the range is unmapped). Idempotent."""
        if self.slot >= 0 and _module is not None:
            _module.guard_remove(self.slot)
            _guards.pop(self.slot, None)
        self.slot = -1
        self._unwatch()
        self.on_fault = None


def guard(mm: mmap.mmap, align: int, what: str) -> Guard | None:
    """Guard the mapping ``mm`` (aligned to ``align``, its page size) against SIGBUS.

    Returns None, and says once in the log that unsealed memory is unguarded, when the
    compiled module is not built. ``what`` names the memory in that message.

    Raises:
        ValueError: ``mm`` is not aligned to ``align`` (a power of two).
        OSError: every guard slot is taken, or the handler could not be installed.
    """
    global _warned
    if _module is None:
        if not _warned:
            _warned = True
            logger.warning(
                "%s is not sealed against shrinking and the SIGBUS guard "
                "(vhostuser._memguard) is not built: a front-end that truncates guest "
                "memory files would kill this process. Build it with a C compiler "
                "(Debian: gcc python3-dev), or give guest memory as sealed memfds "
                "(QEMU: memory-backend-memfd).", what)
        return None
    g = Guard(_module.guard_add(mm, align))
    _guards[g.slot] = g
    return g


def dispatch() -> int:
    """Report new faults to their guards' ``on_fault``; return how many guards had some.

    Runs on the reactor when the eventfd fires; also safe to call any time.
    """
    if _notify_fd is not None:
        with contextlib.suppress(BlockingIOError):
            os.read(_notify_fd, 8)
    hit = 0
    for g in list(_guards.values()):
        fault = g.faults()
        if fault.count > g._reported:
            g._reported = fault.count
            hit += 1
            if g.on_fault is not None:
                g.on_fault(fault)
            else:
                logger.error("guarded memory (slot %d) lost a page at offset %#x; "
                             "nobody owns it", g.slot, fault.offset)
    return hit
