"""File-descriptor ownership and SCM_RIGHTS passing over AF_UNIX stream sockets.

vhost-user carries file descriptors (memory regions, kick/call/err eventfds, the back-end
request socket, inflight memfds) as SCM_RIGHTS ancillary data on the ``sendmsg`` that
carries a message's header (vhost-user.rst "Communication"). Every fd has exactly one
owner: received fds are wrapped at once and closed on every error path (docs/security.md
rule 7), so every fd this module receives comes back wrapped in an :class:`OwnedFd`, and
every error path closes them.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import select
import socket
import stat
import time
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Self

from ..errors import MessageTimeoutError, PeerClosedError, RemoteProtocolError

__all__ = [
    "MAX_FDS",
    "OwnedFd",
    "close_all",
    "connect_unix",
    "listen_unix",
    "recv_some",
    "send_msg",
]

logger = logging.getLogger(__name__)

#: Fds per message: VHOST_MEMORY_BASELINE_NREGIONS 8,
#: VHOST_USER_BACKEND_MAX_FDS 8; libvhost-user's recv buffer is CMSG_SPACE(8*sizeof(int)).
MAX_FDS = 8

_INT_SIZE = array.array("i").itemsize

# sun_path is 108 bytes on Linux and must hold the terminating NUL for a filesystem path.
_SUN_PATH_MAX = 107


class OwnedFd:
    """Sole owner of one open file descriptor.

    The descriptor is closed by :meth:`close`, by leaving a ``with`` block, or — as a last
    resort — when the object is garbage-collected (silently: no ResourceWarning, because
    the test suite runs with ``-W error``). :meth:`detach` hands ownership to someone else.
    """

    __slots__ = ("__weakref__", "_fd")

    def __init__(self, fd: int) -> None:
        """Take ownership of ``fd``.

        Raises:
            ValueError: ``fd`` is negative.
        """
        if fd < 0:
            raise ValueError(f"OwnedFd: fd {fd} is negative")
        self._fd = fd

    @property
    def fd(self) -> int:
        """The descriptor number.

        Raises:
            ValueError: the descriptor was closed or detached.
        """
        fd = self._fd
        if fd < 0:
            raise ValueError("OwnedFd: file descriptor is closed or detached")
        return fd

    @property
    def closed(self) -> bool:
        """True once closed or detached."""
        return self._fd < 0

    def fileno(self) -> int:
        """Same as :attr:`fd`; lets ``selectors`` and ``select`` accept the object.

        Raises:
            ValueError: the descriptor was closed or detached.
        """
        return self.fd

    def detach(self) -> int:
        """Give up ownership and return the descriptor; the caller must close it.

        Raises:
            ValueError: the descriptor was already closed or detached.
        """
        fd = self.fd
        self._fd = -1
        return fd

    def close(self) -> None:
        """Close the descriptor. Calling it again does nothing.

        Raises:
            OSError: the kernel reported an error from ``close`` (EBADF means some other
                code closed our descriptor behind our back — a bug). The descriptor is
                forgotten either way, so it is never closed twice.
        """
        fd = self._fd
        if fd >= 0:
            # Forget the number before closing: if close() raises, retrying could close
            # an unrelated descriptor that reused the number.
            self._fd = -1
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self, _close: Callable[[int], None] = os.close) -> None:
        # Last-resort cleanup. ``os.close`` is bound as a default so it is still reachable
        # during interpreter shutdown; errors are swallowed because __del__ must not raise
        # and must not warn (the suite runs with -W error).
        fd = getattr(self, "_fd", -1)
        if fd >= 0:
            self._fd = -1
            # Not contextlib.suppress: module globals may already be gone at shutdown.
            try:  # noqa: SIM105
                _close(fd)
            except OSError:
                pass

    def __repr__(self) -> str:
        fd = self._fd
        state = f"fd={fd}" if fd >= 0 else "closed"
        return f"<{type(self).__name__} {state}>"


def close_all(fds: Iterable[OwnedFd]) -> None:
    """Close every descriptor in ``fds``, even if closing one of them fails.

    Raises:
        OSError: the first error from ``close``, re-raised after all were closed.
    """
    first: OSError | None = None
    for owned in fds:
        try:
            owned.close()
        except OSError as e:
            if first is None:
                first = e
    if first is not None:
        raise first


def _wait_writable(sock: socket.socket, deadline: float) -> bool:
    """Wait until ``sock`` is writable or ``deadline`` (monotonic) passes; True if writable."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLOUT)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        # poll() takes milliseconds; round up so we never spin with a 0 ms timeout.
        if poller.poll(max(1, int(remaining * 1000 + 0.999))):
            # POLLERR/POLLHUP also end the wait: the next send reports the real error.
            return True


def send_msg(
    sock: socket.socket,
    data: bytes | bytearray | memoryview,
    fds: Sequence[int] = (),
    *,
    timeout: float = 5.0,
) -> None:
    """Send all of ``data``, with ``fds`` attached as SCM_RIGHTS to the first byte(s).

    One ``sendmsg`` carries the descriptors and as much of ``data`` as the socket accepts;
    the remainder is sent by further ``sendmsg`` calls without ancillary data. On a
    non-blocking socket a full send buffer is waited out with ``poll`` until ``timeout``
    seconds after the call started. The descriptors stay owned by the caller (the kernel
    duplicates them into the message).

    Raises:
        ValueError: more than :data:`MAX_FDS` descriptors, or descriptors with empty
            ``data`` (a zero-byte stream send cannot carry ancillary data on Linux: the
            descriptors would be silently dropped).
        MessageTimeoutError: the peer did not accept the whole message before the deadline.
        PeerClosedError: the peer has closed the connection (EPIPE / ECONNRESET).
        OSError: any other socket error.
    """
    if len(fds) > MAX_FDS:
        raise ValueError(f"send_msg: {len(fds)} fds exceed the limit of {MAX_FDS} per message")
    view = memoryview(data).cast("B")
    total = len(view)
    if fds and total == 0:
        raise ValueError(f"send_msg: {len(fds)} fds cannot be sent with an empty message")
    ancdata: list[tuple[int, int, bytes]] = []
    if fds:
        ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    deadline = time.monotonic() + timeout
    sent = 0
    try:
        while sent < total:
            try:
                # MSG_NOSIGNAL: report EPIPE instead of raising SIGPIPE, for embedders that
                # have not ignored SIGPIPE the way the Python runtime does.
                n = sock.sendmsg([view[sent:]], ancdata, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                if not _wait_writable(sock, deadline):
                    raise MessageTimeoutError(
                        f"send_msg: peer accepted only {sent} of {total} bytes within the "
                        f"{timeout} s deadline"
                    ) from None
                continue
            except TimeoutError as e:
                # A socket with a Python-level timeout reports the deadline itself.
                raise MessageTimeoutError(
                    f"send_msg: peer accepted only {sent} of {total} bytes before the socket "
                    f"timeout ({sock.gettimeout()} s)"
                ) from e
            if n > 0:
                # The fds travelled with these bytes; never attach them twice.
                ancdata = []
            sent += n
    except (BrokenPipeError, ConnectionResetError) as e:
        raise PeerClosedError(
            f"send_msg: peer closed the connection after {sent} of {total} bytes ({e.strerror})"
        ) from e
    finally:
        view.release()


def recv_some(
    sock: socket.socket, bufsize: int = 65536, max_fds: int = MAX_FDS
) -> tuple[bytes, list[OwnedFd]]:
    """Receive up to ``bufsize`` bytes and any descriptors attached to them (one ``recvmsg``).

    Every received descriptor is wrapped in an :class:`OwnedFd` before anything else can
    fail, and is close-on-exec (MSG_CMSG_CLOEXEC). A return of ``(b"", [])`` means the peer
    closed the connection (EOF).

    Raises:
        ValueError: ``bufsize`` < 1 or ``max_fds`` < 1.
        RemoteProtocolError: the control data was truncated (MSG_CTRUNC) — the peer sent
            more than ``max_fds`` descriptors with one message; every received descriptor
            has been closed.
        BlockingIOError: nothing to read on a non-blocking socket (the caller polls).
        PeerClosedError: the connection was reset.
        MessageTimeoutError: a socket with a Python-level timeout timed out.
        OSError: any other socket error.
    """
    if bufsize < 1:
        raise ValueError(f"recv_some: bufsize {bufsize} must be at least 1")
    if max_fds < 1:
        raise ValueError(f"recv_some: max_fds {max_fds} must be at least 1")
    try:
        data, ancdata, flags, _addr = sock.recvmsg(
            bufsize, socket.CMSG_SPACE(max_fds * _INT_SIZE), socket.MSG_CMSG_CLOEXEC
        )
    except ConnectionResetError as e:
        raise PeerClosedError(f"recv_some: connection reset by peer ({e.strerror})") from e
    except TimeoutError as e:
        raise MessageTimeoutError(
            f"recv_some: nothing received before the socket timeout ({sock.gettimeout()} s)"
        ) from e
    owned: list[OwnedFd] = []
    try:
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                # A truncated control buffer can end in a partial int array: only whole
                # ints are descriptors the kernel installed (it closes the rest itself).
                whole = len(payload) - len(payload) % _INT_SIZE
                ints = array.array("i")
                ints.frombytes(payload[:whole])
                owned.extend(OwnedFd(fd) for fd in ints)
        if flags & socket.MSG_CTRUNC:
            raise RemoteProtocolError(
                f"recvmsg: MSG_CTRUNC: more than {max_fds} fds (or other control data) "
                f"arrived with one message; the {len(owned)} received were closed"
            )
        if not data and owned:
            # Linux never attaches fds to a zero-byte stream read, but if it ever did, EOF
            # wins and the fds must not leak.
            close_all(owned)
            owned = []
    except BaseException:
        close_all(owned)
        raise
    return data, owned


def _describe_path_kind(mode: int) -> str:
    """Name a file type from ``st_mode`` for error messages."""
    for test, name in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return f"a file of type {stat.S_IFMT(mode):#o}"


def _check_sun_path(path: str, who: str) -> None:
    encoded = os.fsencode(path)
    if not encoded or len(encoded) > _SUN_PATH_MAX:
        raise ValueError(
            f"socket path {path!r} is {len(encoded)} bytes; AF_UNIX allows 1 to "
            f"{_SUN_PATH_MAX} (choose a shorter path)"
        )


def listen_unix(path: str, *, mode: int = 0o600, backlog: int = 16) -> socket.socket:
    """Create a listening AF_UNIX stream socket at ``path``, non-blocking and close-on-exec.

    A socket file already at ``path`` is probed with a connection first: if nobody
    accepts it (ECONNREFUSED: left by a run that died) it is removed and replaced; if a
    process listens there it is left alone and this fails (two servers on one path would
    strand each other; with a disk, two processes would write one image). Anything else at
    ``path`` is never touched. The socket file gets permission bits ``mode``: the process
    umask is narrowed around ``bind`` so the file is never more open than ``mode``, then
    ``chmod`` sets it exactly. The umask is process-wide, so do not create files from
    other threads while this runs. Remove the file afterwards with :func:`unlink_socket`,
    which leaves it alone if it is no longer ours.

    Raises:
        ValueError: the path is empty or too long for AF_UNIX, or ``mode`` has bits
            outside 0o777.
        FileExistsError: ``path`` exists and is not a socket (it is never deleted), or a
            live server listens on it (errno EADDRINUSE).
        OSError: bind/listen failed (e.g. EACCES, ENOENT for a missing directory).
    """
    _check_sun_path(path, "listen_unix")
    if mode & ~0o777:
        raise ValueError(f"listen_unix: mode {mode:#o} has bits outside 0o777")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(
                errno.EEXIST,
                f"refusing to replace {_describe_path_kind(st.st_mode)} that is not a "
                "socket",
                path,
            )
        if _socket_is_live(path):
            raise FileExistsError(
                errno.EADDRINUSE,
                "a server is listening on this socket already (another vhost-user "
                "process?); stop it or choose another path",
                path,
            )
        logger.debug("listen_unix: removing stale socket %s", path)
        # FileNotFoundError: someone else removed it meanwhile, which is what we wanted.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    # Python sockets are close-on-exec already (PEP 446); SOCK_CLOEXEC states it.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    bound = False
    try:
        old_umask = os.umask(0o777 & ~mode)
        try:
            sock.bind(path)
            bound = True
        except OSError as e:
            parent = os.path.dirname(path) or "."
            if e.errno == errno.ENOENT and not os.path.isdir(parent):
                raise FileNotFoundError(
                    errno.ENOENT, f"the directory {parent} does not exist", path) from None
            raise OSError(e.errno, e.strerror, path) from None
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        if bound:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise
    return sock


def _socket_is_live(path: str) -> bool:
    """True if a process accepts connections on the socket file ``path`` (a connect that
    does not fail with ECONNREFUSED or ENOENT; a full backlog counts as live)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.setblocking(False)
        probe.connect(path)
    except OSError as e:
        return e.errno not in (errno.ECONNREFUSED, errno.ENOENT)
    finally:
        probe.close()
    return True


def socket_identity(path: str) -> tuple[int, int, int] | None:
    """``(st_dev, st_ino, st_ctime_ns)`` of the socket file at ``path`` (the change time
    tells a new file apart from an old one whose inode number was reused), or None if
    there is no socket there."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_ctime_ns) if stat.S_ISSOCK(st.st_mode) else None


def unlink_socket(path: str, identity: tuple[int, int, int] | None) -> bool:
    """Remove the socket file at ``path`` if it is still the one with ``identity`` (see
    :func:`socket_identity`, taken right after :func:`listen_unix`); a file another
    process has put there since is left alone. True if removed."""
    if identity is None or socket_identity(path) != identity:
        return False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
        return True
    return False


# Errors that mean "nobody is listening yet" (or the backlog is momentarily full).
_RETRY_CONNECT = frozenset({errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN})


def connect_unix(path: str, *, timeout: float = 5.0, retry_interval: float = 0.1) -> socket.socket:
    """Connect to the AF_UNIX stream socket at ``path``; return it non-blocking.

    While the peer has not started listening (ENOENT, ECONNREFUSED) or its backlog is full
    (EAGAIN) the connection is retried every ``retry_interval`` seconds until ``timeout``
    seconds have passed (``timeout=0`` tries once).

    Raises:
        ValueError: the path is empty or too long for AF_UNIX, or a negative interval.
        MessageTimeoutError: nobody accepted a connection at ``path`` before the deadline
            (the last OSError is chained as ``__cause__``).
        OSError: a non-retryable error (e.g. EACCES, ENOTSOCK), with ``path`` as filename.
    """
    _check_sun_path(path, "connect_unix")
    if retry_interval < 0 or timeout < 0:
        raise ValueError(
            f"connect_unix: timeout {timeout} and retry_interval {retry_interval} must be >= 0"
        )
    deadline = time.monotonic() + timeout
    attempts = 0
    while True:
        attempts += 1
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            # Non-blocking connect: an AF_UNIX connect either completes at once or fails
            # with EAGAIN when the listener's backlog is full; it never waits.
            sock.setblocking(False)
            sock.connect(path)
        except OSError as e:
            sock.close()
            if e.errno not in _RETRY_CONNECT:
                raise OSError(e.errno, e.strerror, path) from e
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MessageTimeoutError(
                    f"connect_unix: no listener accepted at {path!r} within {timeout} s "
                    f"({attempts} attempts, last error: {e.strerror})"
                ) from e
            time.sleep(min(retry_interval, remaining))
            continue
        except BaseException:
            sock.close()
            raise
        return sock
