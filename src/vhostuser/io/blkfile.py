"""The block back-end's file I/O: a raw image file or a block device, read and written with
``preadv``/``pwritev`` straight into guest-memory views.

:class:`BlkFile` implements :class:`vhostuser.devices.blk.BlockBackend`, the only thing the
pure virtio-blk device knows about storage. Writes go through the page cache (like
qemu-storage-daemon with ``cache.direct=off``): a completed write survives our process
being killed, and FLUSH (``fdatasync``) makes it survive the host.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import stat
from collections.abc import Sequence
from types import TracebackType
from typing import Self

log = logging.getLogger(__name__)

__all__ = ["BlkFile"]

# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_ZERO_CHUNK = 1 << 20

try:
    IOV_MAX = int(os.sysconf("SC_IOV_MAX"))
except (ValueError, OSError):
    IOV_MAX = 1024
if IOV_MAX <= 0:
    IOV_MAX = 1024

_libc: ctypes.CDLL | None = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (``os.posix_fallocate`` has none).

    Raises:
        OSError: the call failed (EOPNOTSUPP when the file system cannot do ``mode``).
    """
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        _libc.fallocate.restype = ctypes.c_int
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"fallocate(mode={mode:#x}, offset={offset}, length={length}): "
                         f"{os.strerror(e)}")


def _unsupported(e: OSError) -> bool:
    return e.errno in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL)


class BlkFile:
    """An open raw image or block device.

    Build it with :meth:`open`. Attributes: :attr:`path`, :attr:`fd`, :attr:`size` (bytes),
    :attr:`read_only`, :attr:`is_block_device`.
    """

    def __init__(self, fd: int, path: str, size: int, *, read_only: bool,
                 is_block_device: bool) -> None:
        """Wrap an open fd (owned from now on); use :meth:`open` instead."""
        self._fd: int | None = fd
        self.path = path
        self.size = size
        self.read_only = read_only
        self.is_block_device = is_block_device
        self._can_punch = True
        self._can_zero_range = True

    @classmethod
    def open(cls, path: str, *, read_only: bool = False) -> BlkFile:
        """Open ``path`` (a regular file or a block device) for the back-end.

        The image is locked (``flock``): exclusively, or shared with ``read_only``; the
        lock lasts until :meth:`close`.

        Raises:
            FileNotFoundError, PermissionError, OSError: the open failed; EBUSY: another
                process holds a conflicting lock on the image.
            ValueError: ``path`` is neither a regular file nor a block device, is empty,
                or its size is not a multiple of 512 bytes (capacity is counted in
                512-byte sectors).
        """
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        fd = os.open(path, flags)
        try:
            st = os.fstat(fd)
            if stat.S_ISBLK(st.st_mode):
                size = os.lseek(fd, 0, os.SEEK_END)
                is_blk = True
            elif stat.S_ISREG(st.st_mode):
                size = st.st_size
                is_blk = False
            else:
                raise ValueError(f"{path!r} is neither a regular file nor a block device")
            if size == 0:
                raise ValueError(f"{path!r} is empty: a disk needs at least one sector")
            if size % 512:
                raise ValueError(
                    f"{path!r} is {size} bytes, not a multiple of the 512-byte sector"
                )
            # One writer per image: an exclusive lock (shared for read-only use), so a
            # second back-end started on the same image by mistake fails here instead of
            # both writing it. The lock goes with the descriptor.
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if read_only else fcntl.LOCK_EX)
                            | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OSError(
                    errno.EBUSY,
                    "the image is in use by another process (it holds a lock on it"
                    + ("" if read_only else "; a writer needs it alone") + ")",
                    path,
                ) from None
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, path, size, read_only=read_only, is_block_device=is_blk)

    @property
    def fd(self) -> int:
        """The open descriptor.

        Raises:
            ValueError: the file is closed.
        """
        if self._fd is None:
            raise ValueError(f"{self.path}: closed")
        return self._fd

    @property
    def can_unmap(self) -> bool:
        """True while hole punching has not been found unsupported."""
        return self._can_punch

    # -- data -------------------------------------------------------------------------------
    def readv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Fill ``bufs`` from ``offset``, in order.

        Raises:
            OSError: the read failed, or ended early (EIO: the file shrank under us).
        """
        fd = self.fd
        pending = [b for b in bufs if len(b)]
        while pending:
            batch = pending[:IOV_MAX]
            want = sum(len(b) for b in batch)
            got = os.preadv(fd, batch, offset)
            if got <= 0:
                raise OSError(errno.EIO, f"{self.path}: read at {offset} returned {got} "
                                         f"of {want} bytes (end of file)")
            offset += got
            pending = _advance(pending, got)

    def writev(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Write ``bufs`` at ``offset``, in order.

        Raises:
            OSError: the write failed (EBADF on a read-only file, ENOSPC...).
        """
        fd = self.fd
        pending = [b for b in bufs if len(b)]
        while pending:
            batch = pending[:IOV_MAX]
            got = os.pwritev(fd, batch, offset)
            if got <= 0:
                raise OSError(errno.EIO, f"{self.path}: write at {offset} wrote {got} bytes")
            offset += got
            pending = _advance(pending, got)

    def flush(self) -> None:
        """Make completed writes durable (fdatasync).

        Raises:
            OSError: the sync failed.
        """
        os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        """Deallocate a range (punch a hole); a no-op where the file system cannot.

        virtio 1.2 §5.2.6.2: for discard "the device MAY deallocate the specified range".

        Raises:
            OSError: the call failed for another reason than lack of support.
        """
        if length <= 0 or not self._can_punch:
            return
        try:
            _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if not _unsupported(e):
                raise
            log.info("%s: hole punching unsupported (%s); discard is a no-op", self.path, e)
            self._can_punch = False

    def write_zeroes(self, offset: int, length: int, *, unmap: bool) -> None:
        """Make a range read back as zeroes: punch a hole if ``unmap`` allows, else
        FALLOC_FL_ZERO_RANGE, else write zeroes.

        Raises:
            OSError: the write failed.
        """
        if length <= 0:
            return
        fd = self.fd
        if unmap and self._can_punch:
            try:
                _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as e:
                if not _unsupported(e):
                    raise
                self._can_punch = False
        if self._can_zero_range:
            try:
                _fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as e:
                if not _unsupported(e):
                    raise
                self._can_zero_range = False
        zeros = memoryview(bytes(min(length, _ZERO_CHUNK)))
        end = offset + length
        while offset < end:
            n = min(len(zeros), end - offset)
            self.writev(offset, [zeros[:n]])
            offset += n

    # -- lifetime ---------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._fd is None

    def close(self) -> None:
        """Close the descriptor. Idempotent."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = "block device" if self.is_block_device else "file"
        ro = " read-only" if self.read_only else ""
        return f"<BlkFile {kind} {self.path!r} {self.size} bytes{ro}>"


def _advance(bufs: list[memoryview], n: int) -> list[memoryview]:
    """Drop the first ``n`` bytes of a buffer list (after a partial transfer)."""
    i = 0
    while i < len(bufs) and n >= len(bufs[i]):
        n -= len(bufs[i])
        i += 1
    rest = bufs[i:]
    if rest and n:
        rest[0] = rest[0][n:]
    return rest
