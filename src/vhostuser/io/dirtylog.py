"""The front-end's dirty log for live migration: a sealed memfd bitmap a back-end marks.

vhost-user.rst "Migration": while VHOST_F_LOG_ALL is acked, the back-end sets bit ``n``
(byte ``n // 8``, bit ``n % 8``) of the log for every 4 KiB guest page ``n`` it writes,
with atomic operations, and the front-end collects and clears bits concurrently. QEMU
(``vhost_get_log_size``) sizes the log in 64-bit chunks, each covering 64 pages
(256 KiB of guest memory), up to the last byte of guest memory: :func:`log_size` does the
same. :class:`FrontendDirtyLog` owns the memfd (given to the back-end with
SET_LOG_BASE) and our mapping of it; :meth:`FrontendDirtyLog.take` swaps each 64-bit
word with zero atomically (``__atomic_exchange_8`` from libatomic), so a bit the back-end
sets while we read is never lost: it is in this read or the next.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import logging
import mmap
import os
import struct
from collections.abc import Callable
from types import TracebackType

from .fdpass import OwnedFd
from .guestram import F_ADD_SEALS, F_SEAL_GROW, F_SEAL_SEAL, F_SEAL_SHRINK, _address_of

log = logging.getLogger(__name__)

LOG_PAGE = 4096
"""Guest bytes per log bit (VHOST_LOG_PAGE)."""
LOG_CHUNK_PAGES = 64
"""Pages per 64-bit log word (QEMU's ``vhost_log_chunk_t``)."""
LOG_CHUNK = LOG_PAGE * LOG_CHUNK_PAGES
"""Guest bytes covered by one 64-bit log word (VHOST_LOG_CHUNK, 256 KiB)."""

_WORD = struct.Struct("<Q")


def log_size(guest_end: int) -> int:
    """Bytes of dirty log for guest memory ending at ``guest_end`` (exclusive), as QEMU
    sizes it: one 64-bit word per started 256 KiB chunk, up to the last byte.

    Raises:
        ValueError: ``guest_end`` is not positive.
    """
    if guest_end <= 0:
        raise ValueError(f"guest memory end {guest_end} is not positive")
    return ((guest_end - 1) // LOG_CHUNK + 1) * 8


def _exchanger() -> Callable[[int, int, int], int] | None:
    """libatomic's ``__atomic_exchange_8`` (a locked exchange on x86-64), or None."""
    name = ctypes.util.find_library("atomic")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
        fn = lib.__atomic_exchange_8
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int]
    fn.restype = ctypes.c_uint64
    return fn


_EXCHANGE = _exchanger()
_SEQ_CST = 5  # __ATOMIC_SEQ_CST


class FrontendDirtyLog:
    """A dirty log the front-end allocates, hands to back-ends and reads.

    Args:
        guest_end: end (exclusive) of the guest-physical memory to cover; the log's size
            is :func:`log_size` of it.
        name: the memfd's name (seen in /proc/PID/fd of both processes).
        atomic: clear words with atomic exchanges (default: when libatomic is there).
            Without, :meth:`take` reads a word then zeroes it, and a bit the back-end sets
            in between is lost: only safe once the back-end stopped writing.

    Raises:
        ValueError: ``guest_end`` is not positive; ``atomic=True`` without libatomic.
        OSError: memfd_create, ftruncate or mmap failed.
    """

    def __init__(self, guest_end: int, *, name: str = "vhostuser-dirty-log",
                 atomic: bool | None = None) -> None:
        self.size = log_size(guest_end)
        self.guest_end = guest_end
        if atomic is None:
            atomic = _EXCHANGE is not None
        if atomic and _EXCHANGE is None:
            raise ValueError("atomic log clearing needs libatomic (__atomic_exchange_8)")
        self.atomic = atomic
        fd = OwnedFd(os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING))
        try:
            os.ftruncate(fd.fd, self.size)
            try:
                # As QEMU's log memfd: the back-end can trust the size it checked.
                fcntl.fcntl(fd.fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)
            except OSError as e:
                log.debug("dirty log: sealing failed: %s", e)
            self._mm: mmap.mmap | None = mmap.mmap(
                fd.fd, self.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            fd.close()
            raise
        self._fd: OwnedFd | None = fd
        self._addr = _address_of(self._mm)

    # -- what the back-end is given -----------------------------------------------------------
    @property
    def fd(self) -> int:
        """The memfd to send with SET_LOG_BASE.

        Raises:
            ValueError: the log is closed.
        """
        if self._fd is None:
            raise ValueError("the dirty log is closed")
        return self._fd.fd

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._mm is None

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            raise ValueError("the dirty log is closed")
        return self._mm

    # -- reading ------------------------------------------------------------------------------
    def pages(self) -> set[int]:
        """The page numbers (``gpa // 4096``) marked now, without clearing them.

        Raises:
            ValueError: the log is closed.
        """
        mm = self._map()
        out: set[int] = set()
        for w in range(self.size // 8):
            (word,) = _WORD.unpack_from(mm, 8 * w)
            if word:
                out.update(_bits(word, 64 * w))
        return out

    def take(self) -> set[int]:
        """Collect and clear the marked pages, one 64-bit word at a time.

        Each non-zero word is swapped with zero by an atomic exchange (see the class), so
        a page the back-end marks meanwhile is reported now or by the next call.

        Raises:
            ValueError: the log is closed.
        """
        mm = self._map()
        out: set[int] = set()
        exchange = _EXCHANGE if self.atomic else None
        for w in range(self.size // 8):
            (word,) = _WORD.unpack_from(mm, 8 * w)
            if not word:
                continue
            if exchange is not None:
                word = exchange(self._addr + 8 * w, 0, _SEQ_CST)
            else:
                _WORD.pack_into(mm, 8 * w, 0)
            out.update(_bits(word, 64 * w))
        return out

    def clear(self) -> None:
        """Clear every bit (before handing the log out, or to start a new round)."""
        self.take()

    # -- teardown -----------------------------------------------------------------------------
    def close(self) -> None:
        """Unmap and close the memfd (a back-end keeps its own mapping until it drops it).

        Idempotent.
        """
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        if self._fd is not None:
            self._fd.close()
            self._fd = None

    def __enter__(self) -> FrontendDirtyLog:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd {self._fd.fd if self._fd else -1}"
        return f"FrontendDirtyLog({self.size} bytes for {self.guest_end:#x} of guest, {state})"


def _bits(word: int, first_page: int) -> list[int]:
    out = []
    while word:
        low = word & -word
        out.append(first_page + low.bit_length() - 1)
        word ^= low
    return out


def changed_pages(before: bytes | bytearray | memoryview, after: bytes | bytearray | memoryview,
                  *, base: int = 0) -> set[int]:
    """Pages (numbered from guest-physical ``base``) whose bytes differ between two
    copies of the same guest memory: the shadow-copy check of a dirty log (every page
    here must be marked; a page marked but unchanged is allowed, the back-end may have
    written the same bytes).

    Raises:
        ValueError: the copies differ in length, or ``base`` is not page aligned.
    """
    if len(before) != len(after):
        raise ValueError(f"copies of {len(before)} and {len(after)} bytes do not compare")
    if base % LOG_PAGE:
        raise ValueError(f"base {base:#x} is not 4 KiB aligned")
    b, a = memoryview(before), memoryview(after)
    out: set[int] = set()
    for off in range(0, len(b), LOG_PAGE):
        if b[off : off + LOG_PAGE] != a[off : off + LOG_PAGE]:
            out.add((base + off) // LOG_PAGE)
    return out
