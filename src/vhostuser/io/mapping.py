"""Back-end side of guest memory: map a region fd received from the front-end, and unmap it.

vhost-user.rst "Memory regions": map each region's fd from offset 0 with length
``mmap_offset + memory_size`` (mmap offsets must be page/huge-page aligned; libvhost-user
and vhost-user-bridge do the same). docs/security.md rule 5: "Every mapping is checked against
the fd's real size (fstat) before mmap".

Unmapping has one Python-specific hazard: ``mmap.close()`` raises BufferError while any
memoryview of the mapping is alive (a RegionTable's region, a ring's cached view). A
:class:`Mapping` that cannot be unmapped yet is parked in a module-level deferred list and
retried on every later :meth:`Mapping.close` and by :func:`reap_deferred`, so a view held
a little too long delays the unmap but never leaks the mapping.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import stat
import sys
from types import TracebackType
from typing import Any, Self

from ..errors import GuestMemoryError
from . import memguard
from .fdpass import OwnedFd

__all__ = ["Mapping", "deferred_count", "map_region_fd", "reap_deferred"]

logger = logging.getLogger(__name__)

_U64_MAX = (1 << 64) - 1

# Python < 3.13 keeps a dup() of the fd inside every mmap object; 3.13 can be told not to.
_MMAP_EXTRA: dict[str, Any] = {"trackfd": False} if sys.version_info >= (3, 13) else {}

# Mappings whose close() was refused with BufferError, retried later (see module doc).
_deferred: list[Mapping] = []


def _describe_fd(fd: int, st: os.stat_result) -> str:
    """Name what kind of file ``fd`` is, for error messages."""
    mode = st.st_mode
    if stat.S_ISFIFO(mode):
        return "a pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    try:
        # eventfd, timerfd, epoll... are anonymous inodes with no file type bits.
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"a file of type {stat.S_IFMT(mode):#o}"


class Mapping:
    """One region fd mapped MAP_SHARED from file offset 0 for ``mmap_offset + size`` bytes.

    Attributes: :attr:`mm` (the mmap), :attr:`buf` (a byte memoryview of all of it, what
    :class:`vhostuser.memory.Region` takes as ``buf``), :attr:`length`,
    :attr:`mmap_offset`, :attr:`size`, :attr:`fd_size` (the file's size at map time),
    :attr:`readonly`, :attr:`shrink_sealed` (the file is sealed against shrinking, by the
    front-end or by us, so it cannot SIGBUS us by truncating it) and :attr:`guard` (for an
    unsealed file, its SIGBUS guard, see :mod:`vhostuser.io.memguard`; None when sealed or
    when the guard is not built).
    """

    __slots__ = (
        "_buf",
        "_close_requested",
        "_mm",
        "fd_size",
        "guard",
        "length",
        "mmap_offset",
        "readonly",
        "shrink_sealed",
        "size",
    )

    def __init__(
        self,
        mm: mmap.mmap,
        *,
        mmap_offset: int,
        size: int,
        fd_size: int,
        readonly: bool,
        shrink_sealed: bool,
    ) -> None:
        """Wrap an existing mapping; use :func:`map_region_fd` instead."""
        self._mm: mmap.mmap | None = mm
        self._buf: memoryview | None = memoryview(mm)
        self._close_requested = False
        self.length = len(mm)
        self.mmap_offset = mmap_offset
        self.size = size
        self.fd_size = fd_size
        self.readonly = readonly
        self.shrink_sealed = shrink_sealed
        self.guard: memguard.Guard | None = None

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called (even if the unmap is still deferred)."""
        return self._close_requested

    @property
    def unmapped(self) -> bool:
        """True once the memory is really unmapped."""
        return self._mm is None

    @property
    def mm(self) -> mmap.mmap:
        """The mmap object.

        Raises:
            ValueError: :meth:`close` was called.
        """
        if self._close_requested or self._mm is None:
            raise ValueError("Mapping: closed")
        return self._mm

    @property
    def buf(self) -> memoryview:
        """A byte view of the whole mapping (read-only if mapped ``readonly``).

        Raises:
            ValueError: :meth:`close` was called.
        """
        if self._close_requested or self._buf is None:
            raise ValueError("Mapping: closed")
        return self._buf

    def _try_unmap(self) -> bool:
        """Release our view and unmap; False if live exports still prevent it."""
        mm = self._mm
        if mm is None:
            return True
        buf = self._buf
        if buf is not None:
            try:
                buf.release()
            except BufferError:
                # Someone re-exported .buf itself (memoryview(m.buf), ctypes.from_buffer).
                return False
            self._buf = None
        try:
            mm.close()
        except BufferError:
            # Slices of .buf (or other views of the mmap) are still alive.
            return False
        self._mm = None
        if self.guard is not None:  # only now: the range is gone, overlays included
            self.guard.release()
            self.guard = None
        return True

    def close(self) -> bool:
        """Unmap the memory now if possible; otherwise defer it. Never raises BufferError.

        Also retries every deferred mapping (:func:`reap_deferred`). Calling it again is
        harmless.

        Returns:
            True if this mapping is unmapped, False if the unmap was deferred because
            memoryviews of it are still alive.
        """
        self._close_requested = True
        done = self._try_unmap()
        if not done and not any(m is self for m in _deferred):
            logger.debug(
                "Mapping.close: %#x bytes still have live views; unmap deferred", self.length
            )
            _deferred.append(self)
        reap_deferred()
        return done

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._mm is None:
            state = "unmapped"
        elif self._close_requested:
            state = "unmap deferred"
        else:
            state = "mapped"
        return (
            f"<Mapping length={self.length:#x} mmap_offset={self.mmap_offset:#x} "
            f"size={self.size:#x} {state}>"
        )


def _page_size(fd: int, length: int) -> int:
    """The page size of a mapping of ``fd``: the huge page size on hugetlbfs, else PAGESIZE.

    The file system's block size is the huge page size on hugetlbfs (PAGESIZE on tmpfs);
    it is used only when the mapping is a whole number of it, so the guard never maps
    over a neighbour (the guard also refuses a mapping not aligned to it).
    """
    page = mmap.PAGESIZE
    try:
        bsize = os.fstatvfs(fd).f_bsize
    except OSError:
        return page
    if bsize > page and bsize & (bsize - 1) == 0 and length % bsize == 0:
        return bsize
    return page


def reap_deferred() -> int:
    """Retry every deferred unmap; return how many are still pending."""
    if _deferred:
        _deferred[:] = [m for m in _deferred if not m._try_unmap()]
    return len(_deferred)


def deferred_count() -> int:
    """Return how many mappings wait for their views to die before they can be unmapped."""
    return len(_deferred)


def map_region_fd(fd: OwnedFd, *, mmap_offset: int, size: int, readonly: bool = False) -> Mapping:
    """Map a memory-region fd from offset 0 for ``mmap_offset + size`` bytes, MAP_SHARED.

    Takes ownership of ``fd`` and always closes it before returning or raising (the
    mapping does not need it; docs/security.md: every fd released on every error path).

    The fd must be a regular file (memfd, tmpfs and hugetlbfs files are); it is checked
    with fstat to be at least ``mmap_offset + size`` bytes long. The check alone cannot
    stop a front-end from truncating the file afterwards (touching the lost pages would
    raise SIGBUS), so a memfd that allows it is sealed against shrinking
    (:func:`memguard.seal_shrink`; QEMU's memory-backend-memfd seals by default), and any
    other file is guarded (:attr:`Mapping.guard`, :func:`memguard.guard`).

    Raises:
        ValueError: ``fd`` is already closed.
        GuestMemoryError: size 0, a negative offset, ``mmap_offset + size`` overflowing
            64 bits or the address space; an fd that is not a regular file (pipe, eventfd,
            socket — the message names it); a file smaller than ``mmap_offset + size``; a
            read-only fd asked for a writable mapping; or mmap failing (the errno is
            chained).
    """
    fdnum = fd.fd
    try:
        if size <= 0:
            raise GuestMemoryError(f"memory region fd {fdnum}: size {size:#x} must be positive")
        if mmap_offset < 0:
            raise GuestMemoryError(
                f"memory region fd {fdnum}: mmap_offset {mmap_offset:#x} is negative"
            )
        length = mmap_offset + size
        if length > _U64_MAX:
            raise GuestMemoryError(
                f"memory region fd {fdnum}: mmap_offset {mmap_offset:#x} + size {size:#x} "
                "wraps past 2**64"
            )
        if length > sys.maxsize:
            raise GuestMemoryError(
                f"memory region fd {fdnum}: mmap_offset {mmap_offset:#x} + size {size:#x} "
                f"exceeds the address space ({sys.maxsize:#x})"
            )
        st = os.fstat(fdnum)
        if not stat.S_ISREG(st.st_mode):
            raise GuestMemoryError(
                f"memory region fd {fdnum} is {_describe_fd(fdnum, st)}, not a regular "
                "file or memfd; it cannot be mapped"
            )
        if length > st.st_size:
            raise GuestMemoryError(
                f"memory region fd {fdnum}: mmap_offset {mmap_offset:#x} + size {size:#x} = "
                f"{length:#x} bytes, but the fd is only {st.st_size:#x} bytes"
            )
        access = fcntl.fcntl(fdnum, fcntl.F_GETFL) & os.O_ACCMODE
        if access == os.O_WRONLY or (access == os.O_RDONLY and not readonly):
            mode = "write-only" if access == os.O_WRONLY else "read-only"
            want = "read-only" if readonly else "writable"
            raise GuestMemoryError(
                f"memory region fd {fdnum} was opened {mode}; it cannot be mapped {want}"
            )
        prot = mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE
        try:
            mm = mmap.mmap(fdnum, length, flags=mmap.MAP_SHARED, prot=prot, offset=0, **_MMAP_EXTRA)
        except (OSError, ValueError) as e:
            # PermissionError: write-sealed memfd or a read-only fd; ENOMEM/ENODEV others;
            # ValueError: Python's own size check if the file shrank since fstat.
            raise GuestMemoryError(
                f"memory region fd {fdnum}: mmap of {length:#x} bytes "
                f"({'read-only' if readonly else 'read-write'}) failed: {e}"
            ) from e
        sealed = memguard.seal_shrink(fdnum)
        mapping = Mapping(
            mm,
            mmap_offset=mmap_offset,
            size=size,
            fd_size=st.st_size,
            readonly=readonly,
            shrink_sealed=sealed,
        )
        if not sealed:
            try:
                mapping.guard = memguard.guard(
                    mm, _page_size(fdnum, length),
                    f"guest memory {_describe_fd(fdnum, st)} ({length:#x} bytes)")
            except (OSError, ValueError) as e:
                mapping.close()
                raise GuestMemoryError(
                    f"memory region fd {fdnum}: cannot guard the unsealed mapping: {e}"
                ) from e
        return mapping
    finally:
        fd.close()
