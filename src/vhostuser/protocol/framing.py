"""Message framing: the 12-byte header, encoding, and an incremental decoder. No I/O.

The decoder takes bytes and file descriptors in any chunking (as ``recvmsg`` returns them)
and yields whole messages. File descriptors are opaque tokens of any type: the I/O shell
passes owned fd objects, tests pass integers. On any input the only exception the decoder
raises is :class:`~vhostuser.errors.RemoteProtocolError`; after one, it is sticky and
:meth:`FrameDecoder.take_fds` returns every token it still holds so the caller can close
them.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeVar

from ..errors import RemoteProtocolError

HEADER = struct.Struct("<III")
HEADER_SIZE = HEADER.size

VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
KNOWN_FLAGS = VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY
REPLY_FLAGS = VERSION | FLAG_REPLY
"""QEMU (vhost_user_read_header) rejects any reply whose flags are not exactly 0x5."""

MAX_PAYLOAD = 0x1000
"""Largest payload accepted (rust-vmm's MAX_MSG_SIZE); the biggest layout is 2056 bytes."""

MAX_FDS = 8
"""Baseline fds per message (VHOST_MEMORY_BASELINE_NREGIONS, VHOST_USER_BACKEND_MAX_FDS)."""

FdT = TypeVar("FdT")


@dataclass(frozen=True, slots=True)
class Message(Generic[FdT]):
    """One framed message: header fields, raw payload and the fds that came with it."""

    request: int
    flags: int
    payload: bytes
    fds: tuple[FdT, ...] = ()

    @property
    def need_reply(self) -> bool:
        """True when the sender asked for an ack (NEED_REPLY, bit 3)."""
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        """True when the REPLY bit (bit 2) is set."""
        return bool(self.flags & FLAG_REPLY)


def encode_message(
    request: int, payload: bytes = b"", *, reply: bool = False, need_reply: bool = False
) -> bytes:
    """Frame one message: header (request, flags, size) followed by ``payload``.

    Raises:
        ValueError: the payload is larger than :data:`MAX_PAYLOAD`.
    """
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    flags = VERSION | (FLAG_REPLY if reply else 0) | (FLAG_NEED_REPLY if need_reply else 0)
    return HEADER.pack(request, flags, len(payload)) + payload


class Direction(Enum):
    """What a decoder expects to read."""

    REQUESTS = "requests"
    """Requests only: the REPLY bit is a violation."""
    REPLIES = "replies"
    """Replies only: flags must be exactly 0x5."""
    ANY = "any"
    """Both (a proxy or tracer)."""


class FrameDecoder(Generic[FdT]):
    """Incremental decoder of vhost-user messages from a byte stream with fds.

    Fds received with a chunk belong to the last message that *starts* in that chunk (the
    kernel delivers SCM_RIGHTS with the first byte of the ``sendmsg`` that carried them and
    ends the read after that message's data); if no message starts in the chunk they join
    the message in progress. Shells read at most :meth:`wanted` bytes, so in practice a
    chunk never holds more than one message.
    """

    def __init__(
        self,
        direction: Direction = Direction.REQUESTS,
        *,
        max_payload: int = MAX_PAYLOAD,
        max_fds: int = MAX_FDS,
        request_names: type[Enum] | None = None,
    ) -> None:
        self.direction = direction
        self.max_payload = max_payload
        self.max_fds = max_fds
        self._names = request_names
        self._buf = bytearray()
        self._cur_fds: list[FdT] = []
        self._error: str | None = None
        self._orphans: list[FdT] = []

    @property
    def bytes_pending(self) -> int:
        """Bytes of an incomplete message held so far."""
        return len(self._buf)

    @property
    def in_message(self) -> bool:
        """True while part of a message has arrived (a per-message deadline is running)."""
        return bool(self._buf) or bool(self._cur_fds)

    def take_fds(self) -> list[FdT]:
        """Return (and forget) every fd the decoder holds, for the caller to close."""
        out = self._orphans + self._cur_fds
        self._orphans, self._cur_fds = [], []
        return out

    def _name(self, request: int) -> str:
        if self._names is not None:
            try:
                return str(self._names(request).name)
            except ValueError:
                pass
        return f"request {request}"

    def _fail(self, why: str) -> RemoteProtocolError:
        self._error = why
        return RemoteProtocolError(why)

    def _check_header(self, request: int, flags: int, size: int) -> None:
        name = self._name(request)
        if flags & VERSION_MASK != VERSION:
            raise self._fail(f"{name}: flags {flags:#x} has version {flags & 3}, expected 1")
        if flags & ~KNOWN_FLAGS:
            raise self._fail(f"{name}: flags {flags:#x} has reserved bits set")
        if self.direction is Direction.REQUESTS and flags & FLAG_REPLY:
            raise self._fail(f"{name}: flags {flags:#x} sets REPLY on a request")
        if self.direction is Direction.REPLIES and flags != REPLY_FLAGS:
            raise self._fail(f"{name}: reply flags {flags:#x} are not exactly {REPLY_FLAGS:#x}")
        if size > self.max_payload:
            raise self._fail(f"{name}: payload size {size} exceeds {self.max_payload}")

    def wanted(self) -> int:
        """Bytes that complete the header or message in progress (12 when idle).

        A shell that reads at most this much never receives two messages in one
        ``recvmsg``, as QEMU and libvhost-user read, so fds are never ambiguous.
        """
        n = len(self._buf)
        if n < HEADER_SIZE:
            return HEADER_SIZE - n
        size: int = HEADER.unpack_from(self._buf)[2]
        return max(1, HEADER_SIZE + min(size, self.max_payload) - n)

    def _starts(self, upto: int) -> list[int]:
        """Offsets of message starts within the buffered bytes (headers checked)."""
        starts: list[int] = []
        pos = 0
        while pos < upto:
            starts.append(pos)
            if pos + HEADER_SIZE > upto:
                break
            request, flags, size = HEADER.unpack_from(self._buf, pos)
            self._check_header(request, flags, size)
            pos += HEADER_SIZE + size
        return starts

    def feed(self, data: bytes | bytearray | memoryview, fds: Sequence[FdT] = ()) -> list[
        Message[FdT]
    ]:
        """Add received bytes (and the fds that came with them); return complete messages.

        Raises:
            RemoteProtocolError: the stream is malformed (and stays so: every later call
                raises too). Call :meth:`take_fds` to recover every fd for closing.
        """
        if self._error is not None:
            self._orphans.extend(fds)
            raise RemoteProtocolError(self._error)
        chunk_start = len(self._buf)
        self._buf += data
        out: list[Message[FdT]] = []
        new_fds: list[FdT] = list(fds)
        try:
            # Linux delivers SCM_RIGHTS with the skb of the sendmsg that carried them and
            # ends a read right after it, so a chunk's fds belong to the *last* message that
            # starts in the chunk (or to the message in progress if none starts in it).
            target = 0
            if new_fds:
                starts = self._starts(len(self._buf))
                inside = [i for i, st in enumerate(starts) if st >= chunk_start]
                target = inside[-1] if inside else 0
            k = 0
            if new_fds and target == 0:
                self._cur_fds.extend(new_fds)
                new_fds = []
            while len(self._buf) >= HEADER_SIZE:
                request, flags, size = HEADER.unpack_from(self._buf)
                self._check_header(request, flags, size)
                total = HEADER_SIZE + size
                if len(self._buf) < total:
                    break
                msg_fds = self._cur_fds
                if len(msg_fds) > self.max_fds:
                    raise self._fail(
                        f"{self._name(request)}: {len(msg_fds)} fds exceed {self.max_fds}"
                    )
                payload = bytes(self._buf[HEADER_SIZE:total])
                del self._buf[:total]
                self._cur_fds = []
                out.append(Message(request, flags, payload, tuple(msg_fds)))
                k += 1
                if new_fds and k == target:
                    self._cur_fds = new_fds
                    new_fds = []
            if len(self._cur_fds) > self.max_fds:
                raise self._fail(f"{len(self._cur_fds)} fds arrived for one message")
        except RemoteProtocolError:
            self._orphans.extend(new_fds)
            for m in out:
                self._orphans.extend(m.fds)
            raise
        return out

    def eof_check(self) -> None:
        """Call when the peer closed the stream.

        Raises:
            RemoteProtocolError: a message was cut short (partial header or payload).
        """
        if self._buf:
            if len(self._buf) < HEADER_SIZE:
                raise self._fail(
                    f"connection closed after {len(self._buf)} bytes of a 12-byte header"
                )
            request, _flags, size = HEADER.unpack_from(self._buf)
            raise self._fail(
                f"{self._name(request)}: connection closed after "
                f"{len(self._buf) - HEADER_SIZE} of {size} payload bytes"
            )
