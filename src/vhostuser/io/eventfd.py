"""Notification descriptors: eventfds (Linux) and pipes (other POSIX front-ends).

vhost-user.rst: notifications are eventfds, or pipes on POSIX hosts without eventfd; each
one is an 8-byte write or read whose value means nothing. Kick, call, err and
log fds all go through :class:`EventFd`, whether we created them or the peer sent them.
"""

from __future__ import annotations

import os
import stat
import struct

from ..errors import RemoteProtocolError
from .fdpass import OwnedFd

__all__ = ["EventFd"]

_U64 = struct.Struct("=Q")  # host-native, as the eventfd ABI and the pipe convention use
_ONE = _U64.pack(1)
_PIPE_READ_CHUNK = 4096


def _fd_kind(fd: int) -> str:
    """Return "eventfd", "pipe" or a description of what else ``fd`` is."""
    st = os.fstat(fd)
    if stat.S_ISFIFO(st.st_mode):
        return "pipe"
    try:
        # Anonymous-inode files (eventfd, timerfd, signalfd, epoll) have no file type
        # bits; /proc names them, e.g. "anon_inode:[eventfd]".
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        target = ""
    if target == "anon_inode:[eventfd]":
        return "eventfd"
    if stat.S_ISSOCK(st.st_mode):
        return "a socket"
    if stat.S_ISREG(st.st_mode):
        return "a regular file"
    if stat.S_ISCHR(st.st_mode):
        return "a character device"
    if stat.S_ISDIR(st.st_mode):
        return "a directory"
    return target or f"a file of type {stat.S_IFMT(st.st_mode):#o}"


class EventFd(OwnedFd):
    """An owned, non-blocking notification descriptor: an eventfd, or a pipe end.

    ``EventFd()`` creates a fresh eventfd (``EFD_NONBLOCK | EFD_CLOEXEC``);
    :meth:`from_owned` adopts a descriptor received from the peer.
    """

    __slots__ = ("_is_eventfd",)

    def __init__(self, initval: int = 0) -> None:
        """Create a new non-blocking, close-on-exec eventfd with counter ``initval``.

        Raises:
            OSError: the kernel refused (EMFILE, ENFILE, ENOMEM).
        """
        super().__init__(os.eventfd(initval, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
        self._is_eventfd = True

    @classmethod
    def from_owned(cls, owned: OwnedFd, *, what: str = "notification fd") -> EventFd:
        """Adopt a received descriptor (a kick/call/err fd from the peer).

        The descriptor must be an eventfd or a pipe end; it is switched to non-blocking
        mode. Note that O_NONBLOCK lives in the open file description, which an eventfd
        passed by SCM_RIGHTS shares with the sender (QEMU and DPDK create theirs
        non-blocking already). On success ``owned`` is detached (it no longer owns the
        descriptor); on failure ``owned`` still owns it and the caller closes it.

        Raises:
            RemoteProtocolError: the descriptor is neither an eventfd nor a pipe (a
                regular file or socket would be readable forever and spin the reactor);
                ``what`` names it in the message.
            ValueError: ``owned`` is already closed.
            OSError: fstat or fcntl failed.
        """
        fd = owned.fd
        kind = _fd_kind(fd)
        if kind not in ("eventfd", "pipe"):
            raise RemoteProtocolError(f"{what}: fd {fd} is {kind}, not an eventfd or a pipe")
        os.set_blocking(fd, False)
        adopted = cls.__new__(cls)
        adopted._is_eventfd = kind == "eventfd"
        OwnedFd.__init__(adopted, owned.detach())
        return adopted

    @property
    def is_eventfd(self) -> bool:
        """True for an eventfd, False for a pipe end."""
        return self._is_eventfd

    def notify(self) -> None:
        """Signal the descriptor: write the 8-byte value 1.

        A saturated eventfd counter (or a full pipe) already guarantees a pending wake-up,
        so EAGAIN is ignored.

        Raises:
            ValueError: the descriptor is closed.
            OSError: the write failed otherwise (EBADF, EPIPE for a pipe whose reader left).
        """
        # Plain try/except rather than contextlib.suppress: this runs once per burst on
        # the data path, and suppress() allocates a context manager per call.
        try:  # noqa: SIM105
            os.write(self.fd, _ONE)
        except BlockingIOError:
            pass

    def drain(self) -> int:
        """Consume pending notifications; return how many (0 if none were pending).

        For an eventfd this is the counter value (one read resets it). For a pipe it is the
        sum of the complete 8-byte values read until the pipe is empty, and at least 1 if
        any bytes were read (values mean nothing).

        Raises:
            ValueError: the descriptor is closed.
            OSError: the read failed otherwise.
        """
        fd = self.fd
        if self._is_eventfd:
            try:
                data = os.read(fd, 8)
            except BlockingIOError:
                return 0
            return int(_U64.unpack(data)[0])
        total = 0
        nbytes = 0
        pending = b""
        while True:
            try:
                chunk = os.read(fd, _PIPE_READ_CHUNK)
            except BlockingIOError:
                break
            if not chunk:  # every writer closed the pipe
                break
            nbytes += len(chunk)
            pending += chunk
            whole = len(pending) - len(pending) % 8
            total += sum(v for (v,) in _U64.iter_unpack(pending[:whole]))
            pending = pending[whole:]
        if nbytes and total == 0:
            total = 1
        return total
