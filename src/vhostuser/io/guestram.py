"""Guest RAM for the front-end role: shareable memory a back-end can map.

The front-end owns guest memory and passes one fd per region to the back-end, so the
memory must live in a file that both processes can map MAP_SHARED — the same choice
QEMU's memory backends offer:

* :meth:`GuestRam.memfd` — ``memory-backend-memfd,share=on`` (QEMU ≥ 2.12): an anonymous
  memfd, sealed against resizing so a back-end that checked its size can trust it;
* :meth:`GuestRam.file` — ``memory-backend-file,mem-path=DIR,share=on`` and the seed's
  ``-mem-path`` options: a file created in ``DIR`` (tmpfs, or hugetlbfs for huge pages),
  optionally preallocated and unlinked once mapped.

vhost-user needs ``share=on``: a MAP_PRIVATE mapping's pages are invisible to the back-end,
so :attr:`GuestRam.fd` refuses to hand out the fd of a private mapping.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import mmap
import os
import tempfile
from types import TracebackType
from typing import Self

from .fdpass import OwnedFd

__all__ = ["GuestRam"]

logger = logging.getLogger(__name__)

# fcntl exposes the sealing constants from Python 3.8 on Linux (3.11 is our floor); the
# fallbacks are the values from <linux/fcntl.h> (F_LINUX_SPECIFIC_BASE 1024 + 9, and the
# F_SEAL_* bits) for a libc whose headers lacked them when Python was built.
F_ADD_SEALS: int = getattr(fcntl, "F_ADD_SEALS", 1033)
F_GET_SEALS: int = getattr(fcntl, "F_GET_SEALS", 1034)
F_SEAL_SEAL: int = getattr(fcntl, "F_SEAL_SEAL", 0x0001)
F_SEAL_SHRINK: int = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)
F_SEAL_GROW: int = getattr(fcntl, "F_SEAL_GROW", 0x0004)

_HUGETLBFS = "hugetlbfs"


def _address_of(mm: mmap.mmap) -> int:
    """Return the address of ``mm``'s first byte in this process.

    ``c_char.from_buffer`` exports the mmap's buffer for as long as the ctypes object
    lives; it is dropped before returning so that ``mm.close()`` is not refused with
    BufferError later.
    """
    anchor = ctypes.c_char.from_buffer(mm)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


def _unescape_mount_path(field: str) -> str:
    """Undo /proc/self/mounts escaping: space, tab, newline and backslash appear as \\ooo."""
    out = []
    i = 0
    n = len(field)
    while i < n:
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and all(c in "01234567" for c in code):
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _fs_type(directory: str) -> str:
    """Return the filesystem type of the mount holding ``directory`` ("" if unknown)."""
    real = os.path.realpath(directory)
    best, best_type = "", ""
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mnt = _unescape_mount_path(fields[1])
                prefix = mnt.rstrip("/") + "/"
                if (real == mnt or real.startswith(prefix) or mnt == "/") and len(mnt) >= len(best):
                    # Later lines win on ties: they are mounted over the earlier ones.
                    best, best_type = mnt, fields[2]
    except OSError:
        return ""
    return best_type


def _check_size(size: int, page_size: int, what: str) -> None:
    if not isinstance(size, int) or isinstance(size, bool):
        raise TypeError(f"{what}: size must be an int, not {type(size).__name__}")
    if size <= 0:
        raise ValueError(f"{what}: size {size} must be positive")
    if size % page_size:
        raise ValueError(
            f"{what}: size {size:#x} is not a multiple of the page size {page_size:#x}"
        )


def _touch_pages(mm: mmap.mmap, page_size: int) -> None:
    """Fault in every page by reading and rewriting one byte per page (QEMU's prealloc)."""
    # An extended-slice read then write touches each page once, in C, without changing
    # the content; on a MAP_PRIVATE mapping the write also allocates the private copy.
    mm[::page_size] = mm[::page_size]


class GuestRam:
    """A shareable guest-RAM mapping owned by the front-end.

    Build it with :meth:`memfd` or :meth:`file`. Attributes: :attr:`fd` (to send to
    back-ends), :attr:`size`, :attr:`mmap`, :attr:`buf`, :attr:`uva` (the mapping's
    address in this process, what the front-end reports as ``userspace_addr``),
    :attr:`page_size`, :attr:`share`, :attr:`hugetlb`, :attr:`sealed`, :attr:`path`.
    """

    __slots__ = (
        "_buf",
        "_fd",
        "_mm",
        "hugetlb",
        "page_size",
        "path",
        "sealed",
        "share",
        "size",
        "uva",
    )

    def __init__(
        self,
        *,
        fd: OwnedFd,
        mm: mmap.mmap,
        size: int,
        page_size: int,
        share: bool,
        hugetlb: bool,
        sealed: bool,
        path: str | None,
    ) -> None:
        """Assemble from parts; use :meth:`memfd` or :meth:`file` instead."""
        self._fd = fd
        self._mm: mmap.mmap | None = mm
        self._buf: memoryview | None = memoryview(mm)
        self.size = size
        self.page_size = page_size
        self.share = share
        self.hugetlb = hugetlb
        self.sealed = sealed
        #: The backing file while it exists in the filesystem (None for memfd/unlinked).
        self.path = path
        self.uva = _address_of(mm)

    # -- constructors ----------------------------------------------------------------------
    @classmethod
    def memfd(
        cls,
        size: int,
        *,
        hugetlb: bool = False,
        name: str = "vhostuser-guest",
        prealloc: bool = False,
    ) -> GuestRam:
        """Allocate ``size`` bytes of guest RAM in a sealed memfd, mapped MAP_SHARED.

        The memfd is sealed with F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL where the kernel
        allows it (``sealed`` says whether it did), so a back-end can trust the size it
        checked with fstat: the file can never shrink under its mapping (SIGBUS).

        Raises:
            TypeError: ``size`` is not an int.
            ValueError: ``size`` is not positive or not a multiple of the page size (the
                huge page size with ``hugetlb``).
            OSError: memfd_create, ftruncate or mmap failed — e.g. EINVAL when the kernel
                has no MFD_HUGETLB, ENOMEM when no huge pages are reserved.
        """
        flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
        if hugetlb:
            flags |= os.MFD_HUGETLB
        if not hugetlb:
            # Check before creating anything; a huge page size is known only from the fd.
            _check_size(size, mmap.PAGESIZE, "GuestRam.memfd")
        fd = OwnedFd(os.memfd_create(name, flags))
        mm: mmap.mmap | None = None
        try:
            # f_bsize of a memfd's (internal) filesystem is its page size: PAGE_SIZE for
            # shmem, the huge page size for hugetlbfs.
            page_size = os.fstatvfs(fd.fd).f_bsize if hugetlb else mmap.PAGESIZE
            _check_size(size, page_size, "GuestRam.memfd")
            os.ftruncate(fd.fd, size)
            sealed = True
            try:
                fcntl.fcntl(fd.fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)
            except OSError as e:
                # Sealing hugetlb memfds needs Linux >= 4.16; older kernels say EINVAL.
                logger.debug("GuestRam.memfd: sealing %s failed: %s", name, e)
                sealed = False
            mm = mmap.mmap(
                fd.fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
            if prealloc:
                _touch_pages(mm, page_size)
            return cls(
                fd=fd,
                mm=mm,
                size=size,
                page_size=page_size,
                share=True,
                hugetlb=hugetlb,
                sealed=sealed,
                path=None,
            )
        except BaseException:
            if mm is not None:
                mm.close()
            fd.close()
            raise

    @classmethod
    def file(
        cls,
        directory: str,
        size: int,
        *,
        share: bool = True,
        prealloc: bool = False,
        unlink: bool = True,
    ) -> GuestRam:
        """Allocate ``size`` bytes of guest RAM in a new file under ``directory``.

        This mirrors ``-mem-path DIR`` / ``memory-backend-file``: the file is created with
        ``mkstemp`` (mode 0600, close-on-exec), sized with ftruncate and mapped MAP_SHARED
        (``share=True``) or MAP_PRIVATE. With ``prealloc`` the file's blocks are reserved
        with posix_fallocate where the filesystem supports it, then every page is touched
        (QEMU's ``-mem-prealloc``), so a shortage of (huge) pages shows up now rather than
        as SIGBUS later. With ``unlink`` the file is removed once mapped (the mapping and
        the fd keep the memory alive); otherwise it stays after :meth:`close` too.
        On hugetlbfs the page size is the mount's huge page size (statvfs ``f_bsize``).

        Raises:
            TypeError: ``size`` is not an int.
            ValueError: ``size`` is not positive or not a multiple of the page size.
            OSError: the directory is missing or not writable, or ftruncate/mmap failed
                (ENOMEM on hugetlbfs without enough free huge pages).
        """
        hugetlb = _fs_type(directory) == _HUGETLBFS
        page_size = os.statvfs(directory).f_bsize if hugetlb else mmap.PAGESIZE
        _check_size(size, page_size, f"GuestRam.file({directory!r})")
        raw_fd, path = tempfile.mkstemp(prefix="vhostuser-guest.", dir=directory)
        fd = OwnedFd(raw_fd)
        mm: mmap.mmap | None = None
        try:
            os.ftruncate(fd.fd, size)
            if prealloc and share:
                try:
                    os.posix_fallocate(fd.fd, 0, size)
                except OSError as e:
                    # Not every filesystem allocates this way; touching the pages below
                    # still allocates them.
                    logger.debug("GuestRam.file: posix_fallocate on %s failed: %s", path, e)
            mm = mmap.mmap(
                fd.fd,
                size,
                flags=mmap.MAP_SHARED if share else mmap.MAP_PRIVATE,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
            )
            if prealloc:
                _touch_pages(mm, page_size)
            kept_path: str | None = path
            if unlink:
                os.unlink(path)
                kept_path = None
            return cls(
                fd=fd,
                mm=mm,
                size=size,
                page_size=page_size,
                share=share,
                hugetlb=hugetlb,
                sealed=False,
                path=kept_path,
            )
        except BaseException:
            if mm is not None:
                mm.close()
            fd.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            raise

    # -- accessors -------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """True once :meth:`close` has unmapped the memory."""
        return self._mm is None

    @property
    def fd(self) -> int:
        """The descriptor to send to back-ends (they map it from offset 0).

        Raises:
            ValueError: the memory is closed, or it is a private mapping (``share=False``)
                whose pages a back-end could never see.
        """
        if not self.share:
            raise ValueError(
                "GuestRam: a MAP_PRIVATE mapping (share=False) cannot be shared with a "
                "back-end; vhost-user needs share=True"
            )
        if self._mm is None:
            raise ValueError("GuestRam: closed")
        return self._fd.fd

    @property
    def mmap(self) -> mmap.mmap:
        """The mmap object.

        Raises:
            ValueError: the memory is closed.
        """
        if self._mm is None:
            raise ValueError("GuestRam: closed")
        return self._mm

    @property
    def buf(self) -> memoryview:
        """A writable byte view of the whole mapping.

        Raises:
            ValueError: the memory is closed.
        """
        if self._buf is None:
            raise ValueError("GuestRam: closed")
        return self._buf

    # -- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        """Release :attr:`buf`, unmap the memory and close the fd. Idempotent.

        Raises:
            BufferError: other buffer exports of the mapping still exist (memoryview
                slices of :attr:`buf`, a ``memoryview(ram.mmap)``, a ``FlatMemory`` or
                ``RegionTable`` holding views, a ctypes/numpy object over it). Nothing is
                unmapped; :attr:`buf` has been released. Drop those references and call
                ``close()`` again.
        """
        mm = self._mm
        if mm is None:
            return
        if self._buf is not None:
            try:
                self._buf.release()
            except BufferError as e:
                raise BufferError(
                    f"GuestRam.close: cannot release the view of {self.size:#x} bytes at "
                    f"{self.uva:#x}: something re-exported GuestRam.buf "
                    f"(e.g. memoryview(ram.buf)); release it first ({e})"
                ) from e
            self._buf = None
        try:
            mm.close()
        except BufferError as e:
            raise BufferError(
                f"GuestRam.close: cannot unmap {self.size:#x} bytes at {self.uva:#x}: "
                "memoryviews of it are still alive (slices of GuestRam.buf or of the mmap, "
                "e.g. held by a FlatMemory/RegionTable); release them and call close() again"
            ) from e
        self._mm = None
        self._fd.close()

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
        state = "closed" if self._mm is None else f"uva={self.uva:#x}"
        kind = "hugetlb " if self.hugetlb else ""
        share = "shared" if self.share else "private"
        return f"<GuestRam {kind}{share} size={self.size:#x} {state}>"
