"""One table per request: payload layout, fd count, feature gate, reply and legal states. No I/O.

Everything that enforces a per-request rule reads it from here, so a rule is stated once.
Sources: vhost-user.rst "Front-end message types" / "Back-end message types" and QEMU
hw/virtio/vhost-user.c.

The dialects live here too (:class:`Dialect`): the current protocol, and the January 2014
draft in the two numberings it had (its protocol text's and its code's), each a map from
wire ids to meanings and a rule per meaning. :func:`well_formed` and :func:`reply_fits`
tell whether a message is valid in a dialect, so a connection that meets a malformed
message can say that it is valid in another one (:func:`dialect_hint`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Any

from ..errors import RemoteProtocolError
from . import payloads as P
from .enums import (
    BackendRequest,
    DraftCodeRequest,
    DraftTextRequest,
    FrontendRequest,
    ProtocolFeature,
    VirtioFeature,
)
from .framing import FLAG_NEED_REPLY


class Fds(Enum):
    """How many file descriptors a message carries."""

    NONE = "none"
    ONE = "one"
    NOFD_BIT = "one unless the NOFD bit is set"
    PER_REGION = "one per memory region"
    OPTIONAL = "zero or one"


class Reply(Enum):
    """Whether a request has a reply of its own (besides a REPLY_ACK ack)."""

    NONE = "none"
    ALWAYS = "always"
    IF_LOG_SHMFD = "a u64 ack if LOG_SHMFD was negotiated"


@dataclass(frozen=True, slots=True)
class Rule:
    """Everything the protocol says about one request."""

    payload: type[P.Payload]
    fds: Fds = Fds.NONE
    gate: ProtocolFeature | VirtioFeature | None = None
    reply: Reply = Reply.NONE
    reply_payload: type[P.Payload] | None = None
    reply_fds: int = 0
    needs_owner: bool = True
    needs_features: bool = False
    ring_index: bool = False
    """The payload names a vring (checked against the number of queues)."""


R = FrontendRequest
PF = ProtocolFeature

FRONTEND_RULES: dict[FrontendRequest, Rule] = {
    R.GET_FEATURES: Rule(P.Empty, reply=Reply.ALWAYS, reply_payload=P.U64Payload,
                         needs_owner=False),
    R.SET_FEATURES: Rule(P.U64Payload, needs_owner=False),
    R.SET_OWNER: Rule(P.Empty, needs_owner=False),
    R.RESET_OWNER: Rule(P.Empty),
    R.SET_MEM_TABLE: Rule(P.MemoryTable, fds=Fds.PER_REGION, needs_features=True),
    R.SET_LOG_BASE: Rule(P.LogBase, fds=Fds.ONE, reply=Reply.IF_LOG_SHMFD,
                         reply_payload=P.U64Payload, needs_features=True),
    R.SET_LOG_FD: Rule(P.Empty, fds=Fds.ONE),
    R.SET_VRING_NUM: Rule(P.VringState, needs_features=True, ring_index=True),
    R.SET_VRING_ADDR: Rule(P.VringAddr, needs_features=True, ring_index=True),
    R.SET_VRING_BASE: Rule(P.VringState, needs_features=True, ring_index=True),
    R.GET_VRING_BASE: Rule(P.VringState, reply=Reply.ALWAYS, reply_payload=P.VringState,
                           needs_features=True, ring_index=True),
    R.SET_VRING_KICK: Rule(P.VringFile, fds=Fds.NOFD_BIT, ring_index=True),
    R.SET_VRING_CALL: Rule(P.VringFile, fds=Fds.NOFD_BIT, ring_index=True),
    R.SET_VRING_ERR: Rule(P.VringFile, fds=Fds.NOFD_BIT, ring_index=True),
    R.GET_PROTOCOL_FEATURES: Rule(P.Empty, gate=VirtioFeature.PROTOCOL_FEATURES,
                                  reply=Reply.ALWAYS, reply_payload=P.U64Payload,
                                  needs_owner=False),
    R.SET_PROTOCOL_FEATURES: Rule(P.U64Payload, gate=VirtioFeature.PROTOCOL_FEATURES,
                                  needs_owner=False),
    R.GET_QUEUE_NUM: Rule(P.Empty, gate=PF.MQ, reply=Reply.ALWAYS,
                          reply_payload=P.U64Payload, needs_owner=False),
    R.SET_VRING_ENABLE: Rule(P.VringState, gate=VirtioFeature.PROTOCOL_FEATURES,
                             ring_index=True),
    R.SEND_RARP: Rule(P.U64Payload, gate=PF.RARP),
    R.NET_SET_MTU: Rule(P.U64Payload, gate=PF.MTU),
    R.SET_BACKEND_REQ_FD: Rule(P.Empty, fds=Fds.ONE, gate=PF.BACKEND_REQ, needs_owner=False),
    R.IOTLB_MSG: Rule(P.IotlbMsg, gate=VirtioFeature.ACCESS_PLATFORM),
    R.SET_VRING_ENDIAN: Rule(P.VringState, gate=PF.CROSS_ENDIAN, ring_index=True),
    R.GET_CONFIG: Rule(P.ConfigPayload, gate=PF.CONFIG, reply=Reply.ALWAYS,
                       reply_payload=P.ConfigPayload, needs_owner=False),
    R.SET_CONFIG: Rule(P.ConfigPayload, gate=PF.CONFIG),
    R.CREATE_CRYPTO_SESSION: Rule(P.RawPayload, gate=PF.CRYPTO_SESSION, reply=Reply.ALWAYS,
                                  reply_payload=P.RawPayload),
    R.CLOSE_CRYPTO_SESSION: Rule(P.U64Payload, gate=PF.CRYPTO_SESSION),
    R.POSTCOPY_ADVISE: Rule(P.Empty, gate=PF.PAGEFAULT, reply=Reply.ALWAYS,
                            reply_payload=P.Empty, reply_fds=1),
    R.POSTCOPY_LISTEN: Rule(P.Empty, gate=PF.PAGEFAULT),
    R.POSTCOPY_END: Rule(P.Empty, gate=PF.PAGEFAULT, reply=Reply.ALWAYS,
                         reply_payload=P.U64Payload),
    R.GET_INFLIGHT_FD: Rule(P.InflightPayload, gate=PF.INFLIGHT_SHMFD, reply=Reply.ALWAYS,
                            reply_payload=P.InflightPayload, reply_fds=1,
                            needs_features=True),
    R.SET_INFLIGHT_FD: Rule(P.InflightPayload, fds=Fds.ONE, gate=PF.INFLIGHT_SHMFD,
                            needs_features=True),
    R.GPU_SET_SOCKET: Rule(P.Empty, fds=Fds.ONE),
    R.RESET_DEVICE: Rule(P.Empty, gate=PF.RESET_DEVICE),
    R.VRING_KICK: Rule(P.VringState, gate=PF.INBAND_NOTIFICATIONS, ring_index=True),
    R.GET_MAX_MEM_SLOTS: Rule(P.Empty, gate=PF.CONFIGURE_MEM_SLOTS, reply=Reply.ALWAYS,
                              reply_payload=P.U64Payload, needs_owner=False),
    R.ADD_MEM_REG: Rule(P.SingleRegion, fds=Fds.ONE, gate=PF.CONFIGURE_MEM_SLOTS,
                        needs_features=True),
    R.REM_MEM_REG: Rule(P.SingleRegion, fds=Fds.OPTIONAL, gate=PF.CONFIGURE_MEM_SLOTS,
                        needs_features=True),
    R.SET_STATUS: Rule(P.U64Payload, gate=PF.STATUS),
    R.GET_STATUS: Rule(P.Empty, gate=PF.STATUS, reply=Reply.ALWAYS,
                       reply_payload=P.U64Payload),
    R.GET_SHARED_OBJECT: Rule(P.SharedObject, gate=PF.SHARED_OBJECT, reply=Reply.ALWAYS,
                              reply_payload=P.U64Payload, reply_fds=1),
    R.SET_DEVICE_STATE_FD: Rule(P.DeviceStateParams, fds=Fds.ONE, gate=PF.DEVICE_STATE,
                                reply=Reply.ALWAYS, reply_payload=P.U64Payload),
    R.CHECK_DEVICE_STATE: Rule(P.Empty, gate=PF.DEVICE_STATE, reply=Reply.ALWAYS,
                               reply_payload=P.U64Payload),
    R.GET_SHMEM_CONFIG: Rule(P.Empty, gate=PF.SHMEM, reply=Reply.ALWAYS,
                             reply_payload=P.ShmemConfig),
    R.GET_VRING_BASE_SKIP_DRAIN: Rule(P.VringState, gate=PF.GET_VRING_BASE_SKIP_DRAIN,
                                      reply=Reply.ALWAYS, reply_payload=P.VringState,
                                      needs_features=True, ring_index=True),
}

B = BackendRequest

BACKEND_RULES: dict[BackendRequest, Rule] = {
    B.IOTLB_MSG: Rule(P.IotlbMsg, gate=VirtioFeature.ACCESS_PLATFORM, needs_owner=False),
    B.CONFIG_CHANGE_MSG: Rule(P.Empty, gate=PF.CONFIG, needs_owner=False),
    B.VRING_HOST_NOTIFIER_MSG: Rule(P.VringArea, fds=Fds.NOFD_BIT, gate=PF.HOST_NOTIFIER,
                                    needs_owner=False),
    B.VRING_CALL: Rule(P.VringState, gate=PF.INBAND_NOTIFICATIONS, needs_owner=False,
                       ring_index=True),
    B.VRING_ERR: Rule(P.VringState, gate=PF.INBAND_NOTIFICATIONS, needs_owner=False,
                      ring_index=True),
    B.SHARED_OBJECT_ADD: Rule(P.SharedObject, gate=PF.SHARED_OBJECT, needs_owner=False),
    B.SHARED_OBJECT_REMOVE: Rule(P.SharedObject, gate=PF.SHARED_OBJECT, needs_owner=False),
    B.SHARED_OBJECT_LOOKUP: Rule(P.SharedObject, gate=PF.SHARED_OBJECT, reply=Reply.ALWAYS,
                                 reply_payload=P.U64Payload, reply_fds=1, needs_owner=False),
    B.SHMEM_MAP: Rule(P.ShmemMap, fds=Fds.ONE, gate=PF.SHMEM, needs_owner=False),
    B.SHMEM_UNMAP: Rule(P.ShmemMap, gate=PF.SHMEM, needs_owner=False),
}


def fd_count_error(rule: Rule, payload: Any, nfds: int) -> str | None:
    """Why ``nfds`` fds do not fit ``rule`` for this decoded payload; None when they do."""
    if rule.fds is Fds.NONE and nfds:
        return f"{nfds} fds attached to a message that takes none"
    if rule.fds is Fds.ONE and nfds != 1:
        return f"{nfds} fds attached, expected exactly 1"
    if rule.fds is Fds.OPTIONAL and nfds > 1:
        return f"{nfds} fds attached, expected at most 1"
    if rule.fds is Fds.NOFD_BIT:
        if payload.nofd and nfds:
            return f"NOFD bit set but {nfds} fds attached"
        if not payload.nofd and nfds != 1:
            return f"NOFD bit clear but {nfds} fds attached, expected 1"
    if rule.fds is Fds.PER_REGION and nfds != len(payload.regions):
        return f"{len(payload.regions)} regions but {nfds} fds attached"
    return None


# -- dialects ----------------------------------------------------------------------------------


class Dialect(Enum):
    """Which numbering and layouts a peer speaks."""

    CURRENT = "current"
    """vhost-user as QEMU 2.1 shipped it and as it has grown since (vhost-user.rst)."""
    DRAFT_TEXT = "draft-text"
    """The January 2014 draft as its protocol text numbers it: ECHO = 1, GET_FEATURES = 2
    ... SET_VRING_ERR = 15."""
    DRAFT_CODE = "draft-code"
    """The same draft as its code numbered it: GET_FEATURES = 1 ... SET_VRING_ERR = 14,
    NET_SET_BACKEND = 15, ECHO = 16."""

    @property
    def is_draft(self) -> bool:
        """True for either numbering of the 2014 draft."""
        return self is not Dialect.CURRENT

    @property
    def request_names(self) -> type[IntEnum]:
        """The enum that names this dialect's wire ids (for messages and logs)."""
        return _NAMES[self]

    @property
    def description(self) -> str:
        """How a person would name the dialect."""
        return _DESCRIPTIONS[self]

    @property
    def how_to_speak(self) -> str:
        """How to make our side speak it (library and command line)."""
        return _HOW[self]


_NAMES: dict[Dialect, type[IntEnum]] = {
    Dialect.CURRENT: FrontendRequest,
    Dialect.DRAFT_TEXT: DraftTextRequest,
    Dialect.DRAFT_CODE: DraftCodeRequest,
}
_DESCRIPTIONS = {
    Dialect.CURRENT: "the current vhost-user protocol",
    Dialect.DRAFT_TEXT: "the 2014 draft numbered as its text (ECHO = 1, GET_FEATURES = 2)",
    Dialect.DRAFT_CODE: "the 2014 draft numbered as its code (GET_FEATURES = 1, ECHO = 16)",
}
_HOW = {
    Dialect.CURRENT: "Dialect.CURRENT (command line: no --draft)",
    Dialect.DRAFT_TEXT: "Dialect.DRAFT_TEXT (command line: --draft)",
    Dialect.DRAFT_CODE: "Dialect.DRAFT_CODE (command line: --draft-numbering code)",
}


class DraftMessage(Enum):
    """Draft requests with no counterpart in the current protocol."""

    ECHO = "ECHO"
    """Liveness probe: the back-end answers with the same message, REPLY set."""
    NET_SET_BACKEND = "NET_SET_BACKEND"
    """VHOST_NET_SET_BACKEND carried over: ring index, optionally a tap fd (code only)."""


Meaning = FrontendRequest | DraftMessage
"""What a wire id means in some dialect."""


def _draft_ids(names: type[IntEnum]) -> dict[int, Meaning]:
    out: dict[int, Meaning] = {}
    for m in names:
        meaning: Meaning = (DraftMessage[m.name] if m.name in DraftMessage.__members__
                            else FrontendRequest[m.name])
        out[int(m)] = meaning
    return out


WIRE_IDS: dict[Dialect, dict[int, Meaning]] = {
    Dialect.CURRENT: {int(r): r for r in FrontendRequest},
    Dialect.DRAFT_TEXT: _draft_ids(DraftTextRequest),
    Dialect.DRAFT_CODE: _draft_ids(DraftCodeRequest),
}
"""Wire id -> meaning, per dialect."""

_WIRE_OF: dict[Dialect, dict[Meaning, int]] = {
    d: {meaning: wire for wire, meaning in ids.items()} for d, ids in WIRE_IDS.items()
}

_VRING_FILE_DRAFT = Rule(P.DraftVringFile, fds=Fds.OPTIONAL, ring_index=True)

DRAFT_RULES: dict[Meaning, Rule] = {
    **{m: FRONTEND_RULES[m] for m in WIRE_IDS[Dialect.DRAFT_TEXT].values()
       if isinstance(m, FrontendRequest)},
    # The draft text: a region is guest address, size and user address (24 bytes).
    R.SET_MEM_TABLE: Rule(P.DraftMemoryTable, fds=Fds.PER_REGION, needs_features=True),
    # The draft text gives SET_LOG_BASE a u64 payload (the log's base address), no fd
    # and no reply.
    R.SET_LOG_BASE: Rule(P.U64Payload, needs_features=True),
    # The draft's code sends the ring index as a u64 and the fd only when it has one.
    R.SET_VRING_KICK: _VRING_FILE_DRAFT,
    R.SET_VRING_CALL: _VRING_FILE_DRAFT,
    R.SET_VRING_ERR: _VRING_FILE_DRAFT,
    # The draft text: ECHO has no payload and is answered with the same message, the
    # REPLY flag set; it is legal at any time (it probes the connection).
    DraftMessage.ECHO: Rule(P.Empty, reply=Reply.ALWAYS, reply_payload=P.Empty,
                            needs_owner=False),
    DraftMessage.NET_SET_BACKEND: _VRING_FILE_DRAFT,
}
"""The rule of every request of either draft numbering."""


def meaning_of(dialect: Dialect, request: int) -> Meaning | None:
    """What wire id ``request`` means in ``dialect`` (None: it does not exist there)."""
    return WIRE_IDS[dialect].get(request)


def wire_id(dialect: Dialect, meaning: Meaning) -> int | None:
    """The wire id of ``meaning`` in ``dialect`` (None: the dialect does not have it)."""
    return _WIRE_OF[dialect].get(meaning)


def rule_for(dialect: Dialect, meaning: Meaning) -> Rule:
    """The rule of ``meaning`` in ``dialect``.

    Raises:
        KeyError: the dialect does not have that request.
    """
    if dialect is Dialect.CURRENT:
        if not isinstance(meaning, FrontendRequest):
            raise KeyError(meaning)
        return FRONTEND_RULES[meaning]
    if wire_id(dialect, meaning) is None:
        raise KeyError(meaning)
    return DRAFT_RULES[meaning]


def well_formed(dialect: Dialect, request: int, flags: int, payload: bytes, nfds: int
                ) -> Meaning | None:
    """The meaning of a front-end request if it is well formed in ``dialect``, else None.

    Syntax only (the id exists, the flags are the dialect's, the payload decodes, the fd
    count fits); order, features and ranges are the connection's business.
    """
    meaning = meaning_of(dialect, request)
    if meaning is None:
        return None
    if dialect.is_draft and flags & FLAG_NEED_REPLY:
        return None  # NEED_REPLY came with REPLY_ACK in 2016
    rule = rule_for(dialect, meaning)
    try:
        decoded = rule.payload.decode(payload)
    except RemoteProtocolError:
        return None
    if fd_count_error(rule, decoded, nfds) is not None:
        return None
    return meaning


def reply_fits(dialect: Dialect, request: int, payload: bytes, nfds: int) -> Meaning | None:
    """The meaning of the request a reply answers, if the reply is well formed as that
    request's own reply in ``dialect``; else None."""
    meaning = meaning_of(dialect, request)
    if meaning is None:
        return None
    rule = rule_for(dialect, meaning)
    if rule.reply is not Reply.ALWAYS or rule.reply_payload is None:
        return None
    try:
        rule.reply_payload.decode(payload)
    except RemoteProtocolError:
        return None
    return meaning if nfds == rule.reply_fds else None


def other_dialects(ours: Dialect) -> list[Dialect]:
    """Every dialect but ``ours``, in declaration order."""
    return [d for d in Dialect if d is not ours]


def readings(theirs: Sequence[tuple[Dialect, Meaning]]) -> str:
    """``ECHO in <dialect>`` for each reading, joined with "and"."""
    return " and ".join(f"{m.name} in {d.description}" for d, m in theirs)


def dialect_hint(peer: str, theirs: Sequence[tuple[Dialect, Meaning]], evidence: str, *,
                 certain: bool = True) -> str:
    """One sentence: the peer looks like (or, not ``certain``, may) speak another dialect,
    why, and what to do.

    ``theirs``: each dialect the evidence fits, with what the message means there;
    ``evidence`` says what was seen (and how ``theirs`` reads it).
    """
    advice = " or ".join(d.how_to_speak for d, _m in theirs)
    verb = "looks like it speaks" if certain else "may speak"
    return f"{peer} {verb} another dialect: {evidence}; to talk to it use {advice}"


_SAID: set[tuple[str, str]] = set()
_SAID_MAX = 1024


def first_time(key: str, hint: str) -> bool:
    """True the first time ``hint`` is given for ``key`` (one listening socket, one
    back-end path) in this process, so a peer that reconnects in a loop (QEMU does, on a
    failed start) is told about once, not once per session. At most 1024 pairs are
    remembered; past that, memory starts over."""
    if (key, hint) in _SAID:
        return False
    if len(_SAID) >= _SAID_MAX:
        _SAID.clear()
    _SAID.add((key, hint))
    return True
