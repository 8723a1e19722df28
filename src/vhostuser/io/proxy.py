"""A decoding proxy between a vhost-user front-end and back-end (``vhost-user trace``).

:class:`TraceSession` forwards every whole message, with its fds, from each peer to the
other on a :class:`~vhostuser.io.reactor.Reactor`, and shows each one to a
:class:`~vhostuser.connection.observer.SessionObserver` first. Messages are forwarded as
they came (the same bytes, the same fds: the kernel duplicates them on the way), one
message per ``sendmsg``. The one exception is the back-end channel: the socket the
front-end passes with SET_BACKEND_REQ_FD is replaced by one end of a socketpair of ours,
so that the back-end's requests on it are seen too and forwarded to the front-end's
socket.

A peer that breaks a rule is reported, not corrected. A stream that cannot be framed at all
(a header announcing more than :data:`MAX_FRAME` bytes) is passed through raw from then on,
with a note. When either peer closes, the other connection is closed too (each peer then
sees what it would see had its partner gone away).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..connection.observer import Channel, Record, SessionObserver
from ..errors import MessageTimeoutError, PeerClosedError, RemoteProtocolError
from ..protocol.enums import FrontendRequest
from ..protocol.framing import FLAG_REPLY, HEADER, HEADER_SIZE
from ..protocol.framing import Message as Frame
from .fdpass import OwnedFd, recv_some, send_msg
from .reactor import Reactor

__all__ = ["MAX_FRAME", "TraceSession", "TraceStats"]

log = logging.getLogger(__name__)

MAX_FRAME = 1 << 20
"""Largest payload the proxy frames; a header announcing more switches that direction to
raw pass-through (no real message comes near: the biggest layout is about 2 KiB)."""

_U32 = struct.Struct("<I")


@dataclass
class TraceStats:
    """Counts of one proxied session."""

    messages: int = 0
    fds: int = 0
    problems: int = 0
    raw_bytes: int = 0
    ended: str | None = None
    waiting: list[str] = field(default_factory=list)


class _Pipe:
    """One direction of one channel: frames what ``src`` sends and forwards it to ``dst``."""

    def __init__(self, session: TraceSession, channel: Channel, from_frontend: bool,
                 src: socket.socket, dst: socket.socket) -> None:
        self.session = session
        self.channel = channel
        self.from_frontend = from_frontend
        self.src = src
        self.dst = dst
        self.buf = bytearray()
        self.fds: list[OwnedFd] = []  # received with bytes of the message being framed
        self.raw = False

    @property
    def who(self) -> str:
        return "front-end" if self.from_frontend else "back-end"

    def readable(self) -> None:
        s = self.session
        if s.closed:
            return
        try:
            data, fds = recv_some(self.src, self.wanted())
        except BlockingIOError:
            return
        except (PeerClosedError, RemoteProtocolError, OSError) as e:
            s.end(f"{self.who} ({self.channel.value} channel): {e}")
            return
        if not data:
            for f in fds:
                f.close()
            if self.channel is Channel.MAIN:
                s.end(f"the {self.who} closed the connection")
            else:
                s.close_channel(f"the {self.who} closed the back-end channel")
            return
        if self.raw:
            s.stats.raw_bytes += len(data)
            self.forward(data, fds)
            return
        self.buf += data
        self.fds.extend(fds)
        self.drain()

    def wanted(self) -> int:
        """Bytes to read next: the rest of the current header or message, never more.

        A read that crossed into the next message could return that message's fds with
        this one's bytes (the kernel ends a read after a chunk that carries fds), so, like
        the back-end core, the proxy reads one message at a time.
        """
        if self.raw:
            return 65536
        if len(self.buf) < HEADER_SIZE:
            return HEADER_SIZE - len(self.buf)
        size: int = _U32.unpack_from(self.buf, 8)[0]
        return max(1, min(HEADER_SIZE + size - len(self.buf), 65536))

    def drain(self) -> None:
        while len(self.buf) >= HEADER_SIZE:
            request, flags, size = HEADER.unpack_from(self.buf)
            if size > MAX_FRAME:
                self.session.note(
                    f"{self.who} ({self.channel.value} channel) announced a {size}-byte "
                    "payload: no longer decoding this direction, passing bytes through")
                self.raw = True
                data, self.buf = bytes(self.buf), bytearray()
                fds, self.fds = self.fds, []
                self.forward(data, fds)
                return
            if len(self.buf) < HEADER_SIZE + size:
                return
            data = bytes(self.buf[:HEADER_SIZE + size])
            del self.buf[:HEADER_SIZE + size]
            fds, self.fds = self.fds, []
            msg: Frame[OwnedFd] = Frame(request, flags, data[HEADER_SIZE:], tuple(fds))
            self.session.message(self, msg, data)
            if self.session.closed:
                return

    def forward(self, data: bytes, fds: list[OwnedFd], dst: socket.socket | None = None
                ) -> None:
        try:
            send_msg(dst or self.dst, data, [f.fd for f in fds])
        except (PeerClosedError, MessageTimeoutError, OSError, ValueError) as e:
            other = "back-end" if self.from_frontend else "front-end"
            self.session.end(f"forwarding to the {other} failed: {e}")
        finally:
            for f in fds:
                f.close()

    def close(self) -> None:
        for f in self.fds:
            f.close()
        self.fds = []


class TraceSession:
    """One front-end connection proxied to one back-end connection (see the module doc).

    Args:
        reactor: where the sockets are watched.
        front: the connected front-end socket (ours to close).
        back: the connected back-end socket (ours to close).
        emit: called with every record, in order.
        observer: decodes and checks (a fresh one by default).
        on_end: called once with the session when it ends.
    """

    def __init__(self, reactor: Reactor, front: socket.socket, back: socket.socket, *,
                 emit: Callable[[Record], None], observer: SessionObserver | None = None,
                 on_end: Callable[[TraceSession], None] | None = None,
                 on_note: Callable[[str], None] | None = None) -> None:
        self.reactor = reactor
        self.emit = emit
        self.on_end = on_end
        self.on_note = on_note
        self.observer = observer or SessionObserver()
        self.stats = TraceStats()
        self.closed = False
        self._t0 = time.monotonic()
        front.setblocking(False)
        back.setblocking(False)
        self._socks: list[socket.socket] = [front, back]
        self._pipes = [_Pipe(self, Channel.MAIN, True, front, back),
                       _Pipe(self, Channel.MAIN, False, back, front)]
        self._channel_pipes: list[_Pipe] = []
        for p in self._pipes:
            reactor.add_reader(p.src.fileno(), p.readable)

    def now(self) -> float:
        """Seconds since the session started."""
        return time.monotonic() - self._t0

    def note(self, text: str) -> None:
        """Report something about the session that is not a message."""
        if self.on_note is not None:
            self.on_note(text)
        else:
            log.warning("%s", text)

    def message(self, pipe: _Pipe, msg: Frame[OwnedFd], data: bytes) -> None:
        """Observe one framed message, then forward it (interposing the back-end channel)."""
        rec = self.observer.observe(pipe.channel, pipe.from_frontend, msg, self.now())
        self.stats.messages += 1
        self.stats.fds += len(msg.fds)
        self.stats.problems += bool(rec.problems)
        self.emit(rec)
        fds = list(msg.fds)
        if (pipe.channel is Channel.MAIN and pipe.from_frontend
                and msg.request == FrontendRequest.SET_BACKEND_REQ_FD
                and not msg.flags & FLAG_REPLY and len(fds) == 1):
            fds = self._interpose(fds)
        pipe.forward(data, fds)

    def _interpose(self, fds: list[OwnedFd]) -> list[OwnedFd]:
        """Keep the front-end's channel socket; give the back-end one end of our pair."""
        self.close_channel(None)
        theirs = fds[0]
        try:
            front = socket.socket(fileno=os.dup(theirs.fd))
            ours, for_backend = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as e:
            self.note(f"cannot interpose the back-end channel ({e}); passing it as is")
            return fds
        theirs.close()
        front.setblocking(False)
        ours.setblocking(False)
        self._socks += [front, ours]
        self._channel_pipes = [_Pipe(self, Channel.BACKEND, False, ours, front),
                               _Pipe(self, Channel.BACKEND, True, front, ours)]
        for p in self._channel_pipes:
            self.reactor.add_reader(p.src.fileno(), p.readable)
        handed = OwnedFd(os.dup(for_backend.fileno()))
        for_backend.close()
        return [handed]

    def close_channel(self, why: str | None) -> None:
        """Stop proxying the back-end channel (its sockets are closed)."""
        if why is not None:
            self.note(why)
        for p in self._channel_pipes:
            with contextlib.suppress(ValueError, OSError):
                self.reactor.remove_reader(p.src.fileno())
            p.close()
            if p.src in self._socks:
                self._socks.remove(p.src)
            p.src.close()
        self._channel_pipes = []

    def end(self, why: str) -> None:
        """End the session: close both connections (and the channel). Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.stats.ended = why
        self.stats.waiting = self.observer.waiting()
        self.close_channel(None)
        for p in self._pipes:
            with contextlib.suppress(ValueError, OSError):
                self.reactor.remove_reader(p.src.fileno())
            p.close()
        for s in self._socks:
            s.close()
        self._socks = []
        if self.on_end is not None:
            self.on_end(self)
