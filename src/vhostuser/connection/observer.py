"""A passive observer of one vhost-user session: decodes what two peers exchange. No I/O.

``vhost-user trace`` sits between a front-end and a back-end and feeds every whole message
it forwards to :meth:`SessionObserver.observe`, which returns a :class:`Record`: the
request's name, flags, decoded payload fields (feature words with their bits named), fd
count, the request a reply answers and how long it took, and every rule of the protocol
table the message breaks. The observer never refuses anything (the proxy forwards
regardless); it reports.

Two channels are watched: ``main`` (front-end requests, back-end replies) and ``backend``
(the socket passed with SET_BACKEND_REQ_FD: back-end requests, front-end replies). Reply
pairing is :class:`~vhostuser.connection.pairing.ReplyPairing`, the same the front-end core
uses. Times are passed in (``now``), so records can be compared across runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ..errors import RemoteProtocolError
from ..protocol import payloads as P
from ..protocol.enums import (
    BackendRequest,
    DeviceType,
    FrontendRequest,
    ProtocolFeature,
    VirtioFeature,
    feature_names,
    protocol_feature_names,
)
from ..protocol.framing import FLAG_NEED_REPLY, FLAG_REPLY, KNOWN_FLAGS, VERSION, VERSION_MASK
from ..protocol.framing import Message as Frame
from ..protocol.table import BACKEND_RULES, FRONTEND_RULES, Reply, Rule, fd_count_error
from .pairing import Answer, PairingError, ReplyPairing, expected_answer

__all__ = ["Channel", "Record", "SessionObserver"]

R = FrontendRequest


class Channel(Enum):
    """Which socket of the session a message travelled on."""

    MAIN = "main"
    BACKEND = "backend"


_FEATURE_WORDS = {R.GET_FEATURES, R.SET_FEATURES}
_PROTOCOL_WORDS = {R.GET_PROTOCOL_FEATURES, R.SET_PROTOCOL_FEATURES}


@dataclass
class Record:
    """One observed message."""

    seq: int
    time: float
    channel: Channel
    from_frontend: bool
    request: int
    name: str
    flags: int
    size: int
    nfds: int
    fields: dict[str, Any] = field(default_factory=dict)
    answers: int | None = None
    """For a reply: the ``seq`` of the request it answers."""
    latency: float | None = None
    """For a reply: seconds since its request."""
    problems: list[str] = field(default_factory=list)
    """Rules of the protocol this message breaks (empty when it is fine)."""

    @property
    def is_reply(self) -> bool:
        """True when the REPLY flag is set."""
        return bool(self.flags & FLAG_REPLY)

    @property
    def direction(self) -> str:
        """``FE->BE`` or ``BE->FE``."""
        return "FE->BE" if self.from_frontend else "BE->FE"

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready dict (one object per message for ``--json``)."""
        out: dict[str, Any] = {
            "seq": self.seq, "time": round(self.time, 6), "channel": self.channel.value,
            "direction": self.direction, "request": self.request, "name": self.name,
            "reply": self.is_reply, "need_reply": bool(self.flags & FLAG_NEED_REPLY),
            "flags": self.flags, "size": self.size, "fds": self.nfds, "fields": self.fields,
        }
        if self.answers is not None:
            out["answers"] = self.answers
        if self.latency is not None:
            out["latency_ms"] = round(self.latency * 1000.0, 3)
        if self.problems:
            out["problems"] = self.problems
        return out

    def text(self) -> str:
        """One line for people: time, direction, name, fields, fds, latency, problems."""
        chan = "" if self.channel is Channel.MAIN else " [backend channel]"
        kind = " reply" if self.is_reply else ""
        extra = " NEED_REPLY" if self.flags & FLAG_NEED_REPLY and not self.is_reply else ""
        parts = [f"{self.time:10.6f} {self.direction}{chan} {self.name}{kind}{extra}"]
        body = _fields_text(self.fields)
        if body:
            parts.append(body)
        if self.nfds:
            parts.append(f"fds={self.nfds}")
        if self.latency is not None:
            parts.append(f"({self.latency * 1000.0:.3f} ms)")
        line = "  ".join(parts)
        for p in self.problems:
            line += f"\n{'':11}!! {p}"
        return line


def _fields_text(fields: dict[str, Any]) -> str:
    out = []
    for k, v in fields.items():
        if k.endswith("_names"):
            continue
        if isinstance(v, int) and not isinstance(v, bool):
            text = f"{k}={v:#x}" if v > 9 else f"{k}={v}"
            names = fields.get(f"{k}_names")
            if names is not None:
                text += " (" + ("|".join(names) or "none") + ")"
            out.append(text)
        elif isinstance(v, list):
            out.append(f"{k}=[" + "; ".join(_fields_text(x) if isinstance(x, dict) else str(x)
                                             for x in v) + "]")
        elif isinstance(v, dict):
            out.append(f"{k}=(" + _fields_text(v) + ")")
        else:
            out.append(f"{k}={v}")
    return " ".join(out)


def _payload_fields(payload: Any) -> dict[str, Any]:
    if not dataclasses.is_dataclass(payload):
        return {}
    out: dict[str, Any] = {}
    for f in dataclasses.fields(payload):
        v = getattr(payload, f.name)
        if isinstance(v, bytes):
            out[f.name] = v.hex() if len(v) <= 64 else v[:64].hex() + "..."
        elif isinstance(v, tuple):
            out[f.name] = [_payload_fields(x) if dataclasses.is_dataclass(x) else x for x in v]
        elif isinstance(v, Enum):
            out[f.name] = v.name
        elif dataclasses.is_dataclass(v):
            out[f.name] = _payload_fields(v)
        else:
            out[f.name] = v
    return out


class _ChannelState:
    def __init__(self) -> None:
        self.pairing = ReplyPairing()


class SessionObserver:
    """Decode and check the messages of one front-end <-> back-end session.

    Args:
        device: names device-specific feature bits when known (net, blk).
        guess: when ``device`` is None, called with the back-end's offered features (its
            GET_FEATURES reply) to guess the device (vhost-user carries no device id).
    """

    def __init__(self, device: DeviceType | None = None,
                 guess: Callable[[int], DeviceType | None] | None = None) -> None:
        self.device = device
        self.guess = guess
        self.records = 0
        self.problems = 0
        self.offered_features: int | None = None
        self.features: int | None = None
        self.offered_protocol_features: int | None = None
        self.protocol_features = 0
        self._channels = {c: _ChannelState() for c in Channel}

    def observe(self, channel: Channel, from_frontend: bool, msg: Frame[Any],
                now: float) -> Record:
        """Decode one whole message that travelled on ``channel``; never raises for its
        contents (what is wrong with it is in :attr:`Record.problems`)."""
        requests_from_frontend = channel is Channel.MAIN
        is_request = not msg.flags & FLAG_REPLY
        names: type[FrontendRequest] | type[BackendRequest] = (
            FrontendRequest if requests_from_frontend else BackendRequest)
        try:
            name = names(msg.request).name
        except ValueError:
            name = f"request {msg.request}"
        rec = Record(seq=self.records, time=now, channel=channel, from_frontend=from_frontend,
                     request=msg.request, name=name, flags=msg.flags, size=len(msg.payload),
                     nfds=len(msg.fds))
        self.records += 1
        if msg.flags & VERSION_MASK != VERSION:
            rec.problems.append(f"header version {msg.flags & VERSION_MASK}, not {VERSION}")
        if msg.flags & ~KNOWN_FLAGS:
            rec.problems.append(f"unknown flag bits {msg.flags & ~KNOWN_FLAGS:#x}")
        if is_request and from_frontend != requests_from_frontend:
            rec.problems.append(f"a request from the {'front' if from_frontend else 'back'}"
                                f"-end on the {channel.value} channel")
        rules: dict[Any, Rule] = FRONTEND_RULES if requests_from_frontend else BACKEND_RULES
        try:
            rule: Rule | None = rules[names(msg.request)]
        except (ValueError, KeyError):
            rule = None
            rec.problems.append(f"request id {msg.request} is not in the protocol")
        state = self._channels[channel]
        if is_request:
            if rule is not None:
                self._request(rec, msg, rule, state)
        else:
            self._reply(rec, msg, state)
        self.problems += bool(rec.problems)
        return rec

    # -- requests ---------------------------------------------------------------------------
    def _request(self, rec: Record, msg: Frame[Any], rule: Rule, state: _ChannelState) -> None:
        try:
            payload = rule.payload.decode(msg.payload)
        except RemoteProtocolError as e:
            rec.problems.append(f"payload: {e}")
            payload = None
        if payload is not None:
            rec.fields = _payload_fields(payload)
            why = fd_count_error(rule, payload, len(msg.fds))
            if why is not None:
                rec.problems.append(why)
            self._name_features(rec, msg.request, payload)
        gate = rule.gate
        if isinstance(gate, ProtocolFeature) and not self.protocol_features & gate:
            rec.problems.append(f"needs protocol feature {gate.name}, not negotiated")
        elif (isinstance(gate, VirtioFeature) and self.features is not None
              and not self.features & gate):
            rec.problems.append(f"needs feature {gate.name}, not negotiated")
        if (msg.flags & FLAG_NEED_REPLY and rule.reply is Reply.NONE
                and not self.protocol_features & ProtocolFeature.REPLY_ACK):
            rec.problems.append("NEED_REPLY without REPLY_ACK negotiated")
        answer = expected_answer(rule, msg.flags, self.protocol_features)
        if answer is not None:
            state.pairing.expect(msg.request, rec.name, answer, rule, tag=rec)
        if rec.channel is Channel.MAIN and isinstance(payload, P.U64Payload):
            if msg.request == R.SET_FEATURES:
                self.features = payload.value
            elif msg.request == R.SET_PROTOCOL_FEATURES:
                self.protocol_features = payload.value

    def _name_features(self, rec: Record, request: int, payload: Any) -> None:
        if rec.channel is not Channel.MAIN or not isinstance(payload, P.U64Payload):
            return
        if request in _FEATURE_WORDS:
            rec.fields["value_names"] = feature_names(payload.value, self.device)
        elif request in _PROTOCOL_WORDS:
            rec.fields["value_names"] = protocol_feature_names(payload.value)

    # -- replies ----------------------------------------------------------------------------
    def _reply(self, rec: Record, msg: Frame[Any], state: _ChannelState) -> None:
        try:
            want = state.pairing.match(msg.request)
        except PairingError as e:
            rec.problems.append(str(e))
            return
        asked: Record = want.tag
        rec.answers = asked.seq
        rec.latency = rec.time - asked.time
        cls = want.payload_type
        if cls is not None:
            try:
                payload = cls.decode(msg.payload)
            except RemoteProtocolError as e:
                rec.problems.append(f"reply payload: {e}")
            else:
                rec.fields = _payload_fields(payload)
                if want.answer is Answer.ACK and isinstance(payload, P.U64Payload):
                    if payload.value != 0:
                        rec.problems.append(f"NACK ({payload.value:#x}): the request failed")
                elif rec.channel is Channel.MAIN and isinstance(payload, P.U64Payload):
                    if msg.request == R.GET_FEATURES:
                        self.offered_features = payload.value
                        if self.device is None and self.guess is not None:
                            self.device = self.guess(payload.value)
                    elif msg.request == R.GET_PROTOCOL_FEATURES:
                        self.offered_protocol_features = payload.value
                    self._name_features(rec, msg.request, payload)
        if len(msg.fds) != want.fds:
            rec.problems.append(f"reply carries {len(msg.fds)} fds, expected {want.fds}")

    def waiting(self, channel: Channel = Channel.MAIN) -> list[str]:
        """Names of the requests on ``channel`` still waiting for a reply."""
        return [e.name for e in self._channels[channel].pairing]
