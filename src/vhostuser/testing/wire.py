"""Raw vhost-user messages for the conformance checks, every operation bounded in time.

The library's :class:`~vhostuser.io.frontend.FrontendClient` refuses to send what the
protocol forbids; the checks must send exactly that. :class:`Wire` writes any bytes with
any fds on a connected socket and reads whatever comes back, message by message, each read
bounded by a deadline. :func:`judge` sends one message and says what the back-end made of
it (:class:`Verdict`): a NACK, a closed connection, an ack, or nothing at all.
"""

from __future__ import annotations

import array
import contextlib
import os
import select
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from ..errors import MessageTimeoutError, PeerClosedError
from ..protocol.enums import FrontendRequest

__all__ = [
    "FLAG_NEED_REPLY",
    "FLAG_REPLY",
    "FLAG_VERSION",
    "HEADER",
    "U64",
    "Msg",
    "Verdict",
    "Wire",
    "judge",
    "message",
    "verdict_text",
]

HEADER = struct.Struct("<III")
U64 = struct.Struct("<Q")
FLAG_VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
MAX_REPLY_PAYLOAD = 1 << 16
"""Replies larger than this are a violation (QEMU caps a payload at its union's size)."""
_FDS_ROOM = 32
_INT = array.array("i").itemsize


def message(request: int, payload: bytes = b"", *, flags: int = FLAG_VERSION,
            size: int | None = None) -> bytes:
    """Header and payload; ``size`` overrides the header's size field (to lie about it)."""
    return HEADER.pack(request, flags, len(payload) if size is None else size) + payload


@dataclass(frozen=True, slots=True)
class Msg:
    """One message from the back-end."""

    request: int
    flags: int
    payload: bytes
    nfds: int

    @property
    def u64(self) -> int | None:
        """The payload as a u64 when it is 8 bytes long."""
        return U64.unpack(self.payload)[0] if len(self.payload) == 8 else None

    def describe(self) -> str:
        """``GET_FEATURES reply flags 0x5, 8 bytes, 0 fds``."""
        try:
            name = FrontendRequest(self.request).name
        except ValueError:
            name = f"request {self.request}"
        return (f"{name} message, flags {self.flags:#x}, {len(self.payload)} payload bytes, "
                f"{self.nfds} fds")


class Wire:
    """Raw messages over a connected AF_UNIX stream socket (see the module docstring).

    The socket is made non-blocking; every wait is bounded by ``timeout`` seconds unless a
    call says otherwise. Fds that arrive are counted and closed at once.
    """

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.timeout = timeout

    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send ``data`` with ``fds`` (any number) attached to its first byte.

        Raises:
            PeerClosedError: the back-end closed the connection.
            MessageTimeoutError: it did not take the bytes within the timeout.
        """
        deadline = time.monotonic() + self.timeout
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] \
            if fds else []
        view = memoryview(data)
        sent = 0
        while sent < len(view):
            try:
                n = self.sock.sendmsg([view[sent:]], anc, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                if not self._wait(select.POLLOUT, deadline):
                    raise MessageTimeoutError(
                        f"the back-end took {sent} of {len(view)} bytes within "
                        f"{self.timeout:g} s") from None
                continue
            except (BrokenPipeError, ConnectionResetError) as e:
                raise PeerClosedError(f"the back-end closed the connection ({e.strerror})"
                                      ) from None
            anc = []
            sent += n

    def _wait(self, events: int, deadline: float) -> bool:
        poller = select.poll()
        poller.register(self.sock, events)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if poller.poll(max(1, int(left * 1000))):
                return True

    def _read(self, n: int, deadline: float) -> tuple[bytes, int]:
        """Exactly ``n`` bytes (and how many fds came with them).

        Raises:
            PeerClosedError: EOF or reset first (the message says after how many bytes).
            MessageTimeoutError: the deadline passed first.
        """
        buf = b""
        nfds = 0
        while len(buf) < n:
            if not self._wait(select.POLLIN, deadline):
                raise MessageTimeoutError(f"{len(buf)} of {n} bytes within the deadline")
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(
                    n - len(buf), socket.CMSG_SPACE(_FDS_ROOM * _INT), socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                continue
            except ConnectionResetError:
                raise PeerClosedError("the back-end reset the connection") from None
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    ints = array.array("i")
                    ints.frombytes(raw[: len(raw) - len(raw) % _INT])
                    for fd in ints:
                        nfds += 1
                        with contextlib.suppress(OSError):
                            os.close(fd)
            if not data:
                raise PeerClosedError(
                    "the back-end closed the connection" if not buf
                    else f"the back-end closed the connection after {len(buf)} of {n} bytes")
            buf += data
        return buf, nfds

    def recv(self, timeout: float | None = None) -> Msg:
        """The next whole message.

        Raises:
            PeerClosedError: the connection closed (before or inside a message).
            MessageTimeoutError: no whole message within ``timeout`` (default: the wire's).
            ValueError: a header announcing more than 64 KiB of payload.
        """
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        try:
            head, nfds = self._read(HEADER.size, deadline)
            request, flags, size = HEADER.unpack(head)
            if size > MAX_REPLY_PAYLOAD:
                raise ValueError(f"a reply header announces {size} payload bytes")
            payload, more = self._read(size, deadline) if size else (b"", 0)
        except MessageTimeoutError:
            raise MessageTimeoutError(f"no whole message within {limit:g} s") from None
        return Msg(request, flags, payload, nfds + more)

    def closed_within(self, timeout: float) -> bool:
        """Read and drop anything until the back-end closes the connection; True if it did
        within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            if not self._wait(select.POLLIN, deadline):
                return False
            try:
                data, anc, _f, _a = self.sock.recvmsg(4096, socket.CMSG_SPACE(_FDS_ROOM * _INT),
                                                      socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                continue
            except ConnectionResetError:
                return True
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    ints = array.array("i")
                    ints.frombytes(raw[: len(raw) - len(raw) % _INT])
                    for fd in ints:
                        with contextlib.suppress(OSError):
                            os.close(fd)
            if not data:
                return True

    def exchange(self, request: int, payload: bytes = b"", fds: Sequence[int] = (), *,
                 flags: int = FLAG_VERSION) -> Msg:
        """Send one request and return the next message.

        Raises:
            PeerClosedError, MessageTimeoutError: as :meth:`send` and :meth:`recv`.
        """
        self.send(message(request, payload, flags=flags), fds)
        return self.recv()

    def get_u64(self, request: int) -> int:
        """Send a request whose reply is one u64 and return it.

        Raises:
            PeerClosedError, MessageTimeoutError: as :meth:`recv`.
            ValueError: the reply is not a u64 reply to this request.
        """
        m = self.exchange(request)
        if m.request != request or m.flags != FLAG_VERSION | FLAG_REPLY or m.u64 is None:
            raise ValueError(f"expected a u64 reply to request {request}, got {m.describe()}")
        return m.u64

    def acked(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        """Send with NEED_REPLY and require a zero ack.

        Raises:
            PeerClosedError, MessageTimeoutError: as :meth:`recv`.
            ValueError: anything but a zero ack came back.
        """
        m = self.exchange(request, payload, fds, flags=FLAG_VERSION | FLAG_NEED_REPLY)
        if m.request != request or m.flags != FLAG_VERSION | FLAG_REPLY or m.u64 != 0:
            raise ValueError(f"expected a zero ack to request {request}, got {m.describe()}")


class Verdict(Enum):
    """What a back-end made of one message."""

    NACK = "NACKed (refused)"
    CLOSED = "closed the connection (refused)"
    ACK = "acked with 0 (accepted)"
    WENT_ON = "went on (the request after it was answered)"
    ANSWERED = "answered it"
    SILENT = "no answer and the connection stayed open"

    @property
    def refused(self) -> bool:
        """NACK or a closed connection."""
        return self in (Verdict.NACK, Verdict.CLOSED)


def judge(wire: Wire, data: bytes, fds: Sequence[int] = (), *,
          need_reply: bool | None = None, timeout: float | None = None,
          has_reply: bool = False) -> tuple[Verdict, str]:
    """Send one (usually bad) message and classify the back-end's reaction.

    A GET_FEATURES follows it as a barrier (as QEMU does without REPLY_ACK), so that a
    back-end that ignores the message is told apart at once from one that hangs. The first
    message back decides: for ``need_reply`` (default: the NEED_REPLY bit of the message's
    header) its ack or NACK; for ``has_reply`` (the request has a reply of its own) that
    reply (:attr:`Verdict.ANSWERED`); the barrier's reply means the back-end went on. The
    barrier's reply is read too, so the connection can be used afterwards.

    Returns the verdict and a detail for messages ("" when the verdict says it all).
    """
    request, flags, _size = HEADER.unpack_from(data.ljust(HEADER.size, b"\0"))
    if need_reply is None:
        need_reply = bool(flags & FLAG_NEED_REPLY)
    limit = wire.timeout if timeout is None else timeout
    try:
        wire.send(data, fds)
    except PeerClosedError:
        return Verdict.CLOSED, ""
    except MessageTimeoutError as e:
        return Verdict.SILENT, str(e)
    with contextlib.suppress(PeerClosedError, MessageTimeoutError):
        wire.send(message(FrontendRequest.GET_FEATURES))
    try:
        m = wire.recv(limit)
    except PeerClosedError:
        return Verdict.CLOSED, ""
    except MessageTimeoutError:
        return Verdict.SILENT, f"nothing within {limit:g} s"
    except ValueError as e:
        return Verdict.ANSWERED, str(e)
    if m.request == FrontendRequest.GET_FEATURES and request != FrontendRequest.GET_FEATURES:
        return Verdict.WENT_ON, "no ack although NEED_REPLY was set" if need_reply else ""
    if request == FrontendRequest.GET_FEATURES:
        _drain_one(wire, limit)
        return Verdict.WENT_ON if not has_reply else Verdict.ANSWERED, ""
    _drain_one(wire, limit)
    if m.request == request and m.flags & FLAG_REPLY:
        if not has_reply and m.u64 is not None:
            return (Verdict.NACK, f"{m.u64:#x}") if m.u64 else (Verdict.ACK, "")
        return Verdict.ANSWERED, m.describe()
    return Verdict.ANSWERED, f"with {m.describe()}"


def _drain_one(wire: Wire, limit: float) -> None:
    """Read the barrier's reply (if the connection is still there)."""
    with contextlib.suppress(PeerClosedError, MessageTimeoutError, ValueError):
        wire.recv(limit)


def verdict_text(verdict: Verdict, detail: str) -> str:
    """``closed the connection (refused)`` / ``NACKed (refused): 0x1``."""
    return f"{verdict.value}: {detail}" if detail else verdict.value
