"""Which reply answers which request: one rule for every role. No I/O.

vhost-user replies carry no sequence number: a reply is matched to the oldest request
still waiting on the same channel, and must name the same request id (vhost-user.rst
"Communication"). A request waits for a reply when

- its rule says it always has one (GET_FEATURES, GET_VRING_BASE, ...), or
- it is SET_LOG_BASE and LOG_SHMFD was negotiated (vhost-user.rst SET_LOG_BASE: "the
  back-end must reply with a u64 ack"), or
- it carries NEED_REPLY (REPLY_ACK: a u64, 0 for success).

The front-end and back-end-channel cores use :class:`ReplyPairing` to check what their
peer answers; the passive observer behind ``vhost-user trace`` uses the same class to
pair what two peers exchange, reporting instead of failing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

from ..protocol import payloads as P
from ..protocol.enums import ProtocolFeature
from ..protocol.framing import FLAG_NEED_REPLY
from ..protocol.table import Reply, Rule

__all__ = ["Answer", "Expected", "PairingError", "ReplyPairing", "expected_answer"]


class Answer(Enum):
    """What kind of reply a request waits for."""

    OWN = "own"
    """The request's own reply (its rule's ``reply_payload`` and ``reply_fds``)."""
    ACK = "ack"
    """A u64 ack: REPLY_ACK, or SET_LOG_BASE's with LOG_SHMFD."""


def expected_answer(rule: Rule, flags: int, protocol_features: int) -> Answer | None:
    """What reply a request sent with ``flags`` under ``rule`` waits for (None: none)."""
    if rule.reply is Reply.ALWAYS:
        return Answer.OWN
    if rule.reply is Reply.IF_LOG_SHMFD and protocol_features & ProtocolFeature.LOG_SHMFD:
        return Answer.ACK
    if flags & FLAG_NEED_REPLY:
        return Answer.ACK
    return None


@dataclass(frozen=True, slots=True)
class Expected:
    """A request waiting for its reply."""

    request: int
    name: str
    answer: Answer
    rule: Rule
    tag: Any = None
    """Whatever the caller attached (the observer: the request's record)."""

    @property
    def payload_type(self) -> type[P.Payload] | None:
        """The payload class the reply must decode as."""
        return P.U64Payload if self.answer is Answer.ACK else self.rule.reply_payload

    @property
    def fds(self) -> int:
        """How many fds the reply must carry."""
        return 0 if self.answer is Answer.ACK else self.rule.reply_fds


class PairingError(ValueError):
    """A reply that answers no waiting request (the message says which and why)."""


class ReplyPairing:
    """The requests of one channel still waiting for replies, oldest first."""

    __slots__ = ("_waiting",)

    def __init__(self) -> None:
        self._waiting: deque[Expected] = deque()

    def __len__(self) -> int:
        return len(self._waiting)

    def __iter__(self) -> Iterator[Expected]:
        return iter(self._waiting)

    def expect(self, request: int, name: str, answer: Answer, rule: Rule,
               tag: Any = None) -> Expected:
        """Remember that ``request`` waits for a reply of kind ``answer``."""
        e = Expected(request, name, answer, rule, tag)
        self._waiting.append(e)
        return e

    def oldest(self) -> Expected | None:
        """The request the next reply must answer, or None."""
        return self._waiting[0] if self._waiting else None

    def match(self, request: int) -> Expected:
        """Take the waiting request a reply naming ``request`` answers.

        Raises:
            PairingError: nothing waits, or the oldest waiting request has another id
                (it stays waiting).
        """
        if not self._waiting:
            raise PairingError(f"unexpected reply for request {request}: no request is waiting")
        want = self._waiting[0]
        if want.request != request:
            raise PairingError(
                f"reply for request {request} while {want.name} ({want.request}) waits")
        return self._waiting.popleft()

    def clear(self) -> list[Expected]:
        """Forget every waiting request (the channel closed); return them."""
        out = list(self._waiting)
        self._waiting.clear()
        return out
