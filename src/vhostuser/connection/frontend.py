"""The front-end's connection state machine (the role QEMU plays). No I/O.

:class:`FrontendConnection` builds requests (checking them against the rule table and what
was negotiated, so our caller cannot send something the spec forbids) and matches replies
the way QEMU does (``vhost_user_read_header``/``process_message_reply``): flags exactly 0x5,
the same request id as the request waiting for it, the exact payload size.

:class:`BackendChannel` is the back-end → front-end channel (SET_BACKEND_REQ_FD) seen from
either end: the front-end decodes and acks the back-end's requests, the back-end encodes
them and matches acks.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ..errors import LocalProtocolError, RemoteProtocolError
from ..protocol import payloads as P
from ..protocol.enums import BackendRequest, FrontendRequest, ProtocolFeature, VirtioFeature
from ..protocol.framing import Direction, FrameDecoder, Message, encode_message
from ..protocol.table import BACKEND_RULES, FRONTEND_RULES, Fds, Reply, Rule
from . import events as ev

log = logging.getLogger(__name__)

FdT = TypeVar("FdT")

PF = ProtocolFeature
VF = VirtioFeature

#: Requests QEMU sends with NEED_REPLY once REPLY_ACK is negotiated (PROTOCOL.md §7).
ACKED_REQUESTS = frozenset(
    {
        FrontendRequest.SET_MEM_TABLE,
        FrontendRequest.ADD_MEM_REG,
        FrontendRequest.REM_MEM_REG,
        FrontendRequest.SET_VRING_KICK,
        FrontendRequest.SET_VRING_CALL,
        FrontendRequest.SET_VRING_ERR,
        FrontendRequest.NET_SET_MTU,
        FrontendRequest.IOTLB_MSG,
        FrontendRequest.SET_VRING_ENABLE,
        FrontendRequest.SET_BACKEND_REQ_FD,
        FrontendRequest.SET_STATUS,
        FrontendRequest.SET_FEATURES,
        FrontendRequest.SET_PROTOCOL_FEATURES,
    }
)


@dataclass(frozen=True, slots=True)
class _Pending:
    request: int
    rule: Rule
    ack: bool  # waiting for a REPLY_ACK u64 rather than the request's own reply


def _check_reply_size(name: str, cls: type[P.Payload] | None, payload: bytes) -> Any:
    if cls is None:
        return None
    try:
        return cls.decode(payload)
    except RemoteProtocolError as e:
        raise RemoteProtocolError(f"{name} reply: {e}") from None


class FrontendConnection(Generic[FdT]):
    """One session with a back-end, front-end role.

    Use :meth:`request` to produce bytes to send, :meth:`receive_data` with what arrives.
    """

    def __init__(self, *, name: str = "vhost-user") -> None:
        self.name = name
        self._decoder: FrameDecoder[FdT] = FrameDecoder(
            Direction.REPLIES, request_names=FrontendRequest
        )
        self._pending: deque[_Pending] = deque()
        self.error: str | None = None
        self.backend_features: int | None = None
        self.features: int | None = None
        self.backend_protocol_features: int | None = None
        self.protocol_features = 0

    # -- negotiated facts ------------------------------------------------------------------
    def has(self, feature: ProtocolFeature) -> bool:
        """True if ``feature`` was negotiated."""
        return bool(self.protocol_features & feature)

    @property
    def waiting(self) -> int:
        """How many replies are outstanding."""
        return len(self._pending)

    # -- requests --------------------------------------------------------------------------
    def request(
        self,
        req: FrontendRequest,
        payload: P.Payload | None = None,
        *,
        nfds: int = 0,
        need_reply: bool | None = None,
    ) -> bytes:
        """Encode a request; remember the reply it expects.

        ``need_reply`` defaults to QEMU's policy: set for :data:`ACKED_REQUESTS` when
        REPLY_ACK is negotiated and the request has no reply of its own.

        Raises:
            LocalProtocolError: the request breaks the protocol (payload type, fd count,
                feature not negotiated, features never offered, connection in error).
        """
        if self.error is not None:
            raise LocalProtocolError(f"connection is in error: {self.error}")
        rule = FRONTEND_RULES[req]
        if payload is None:
            payload = P.Empty()
        if not isinstance(payload, rule.payload):
            raise LocalProtocolError(
                f"{req.name} takes {rule.payload.__name__}, not {type(payload).__name__}"
            )
        self._check_fds(req, rule, payload, nfds)
        self._check_gate(req, rule)
        self._check_semantics(req, payload)
        if need_reply is None:
            need_reply = (
                self.has(PF.REPLY_ACK) and req in ACKED_REQUESTS and rule.reply is Reply.NONE
            )
        if need_reply and rule.reply is Reply.NONE and not self.has(PF.REPLY_ACK):
            raise LocalProtocolError(f"{req.name}: NEED_REPLY without REPLY_ACK negotiated")
        data = encode_message(req, payload.encode(), need_reply=need_reply)
        if rule.reply is Reply.ALWAYS:
            self._pending.append(_Pending(req, rule, ack=False))
        elif (rule.reply is Reply.IF_LOG_SHMFD and self.has(PF.LOG_SHMFD)) or need_reply:
            self._pending.append(_Pending(req, rule, ack=True))
        if req is FrontendRequest.SET_FEATURES and isinstance(payload, P.U64Payload):
            self.features = payload.value
        elif req is FrontendRequest.SET_PROTOCOL_FEATURES and isinstance(payload, P.U64Payload):
            self.protocol_features = payload.value
        return data

    def _check_fds(self, req: FrontendRequest, rule: Rule, payload: Any, nfds: int) -> None:
        want: int | None
        if rule.fds is Fds.NONE:
            want = 0
        elif rule.fds is Fds.ONE:
            want = 1
        elif rule.fds is Fds.NOFD_BIT:
            want = 0 if payload.nofd else 1
        elif rule.fds is Fds.PER_REGION:
            want = len(payload.regions)
        else:
            want = None
        if want is not None and nfds != want:
            raise LocalProtocolError(f"{req.name} carries {want} fds, not {nfds}")

    def _check_gate(self, req: FrontendRequest, rule: Rule) -> None:
        gate = rule.gate
        if isinstance(gate, ProtocolFeature):
            if not self.has(gate):
                raise LocalProtocolError(
                    f"{req.name} needs protocol feature {gate.name}, not negotiated"
                )
        elif gate is VF.PROTOCOL_FEATURES:
            if self.backend_features is None or not self.backend_features & VF.PROTOCOL_FEATURES:
                raise LocalProtocolError(
                    f"{req.name} needs VHOST_USER_F_PROTOCOL_FEATURES, not offered by the back-end"
                )
            if req is FrontendRequest.SET_VRING_ENABLE and self.features is not None and not (
                self.features & VF.PROTOCOL_FEATURES
            ):
                raise LocalProtocolError(
                    "SET_VRING_ENABLE is illegal when PROTOCOL_FEATURES was not acked"
                )

    def _check_semantics(self, req: FrontendRequest, payload: Any) -> None:
        if req is FrontendRequest.SET_FEATURES:
            offered = self.backend_features
            if offered is None:
                raise LocalProtocolError("SET_FEATURES before GET_FEATURES")
            extra = payload.value & ~offered
            if extra:
                raise LocalProtocolError(
                    f"SET_FEATURES {payload.value:#x} acks bits the back-end never offered "
                    f"({extra:#x})"
                )
        elif req is FrontendRequest.SET_PROTOCOL_FEATURES:
            offered = self.backend_protocol_features
            if offered is None:
                raise LocalProtocolError("SET_PROTOCOL_FEATURES before GET_PROTOCOL_FEATURES")
            extra = payload.value & ~offered
            if extra:
                raise LocalProtocolError(
                    f"SET_PROTOCOL_FEATURES {payload.value:#x} acks bits never offered "
                    f"({extra:#x})"
                )

    # -- replies ---------------------------------------------------------------------------
    def receive_data(self, data: bytes, fds: Sequence[FdT] = ()) -> list[ev.Event]:
        """Feed bytes from the back-end; return :class:`ReplyReceived` events in order.

        Raises:
            RemoteProtocolError: an unexpected or malformed reply; the connection is then
                in a sticky error state. Fds of the bad message are returned by
                :meth:`take_fds`.
        """
        if self.error is not None:
            raise RemoteProtocolError(self.error)
        out: list[ev.Event] = []
        try:
            if not data:
                self._decoder.eof_check()
                if self._pending:
                    raise RemoteProtocolError(
                        f"back-end closed the connection while "
                        f"{FrontendRequest(self._pending[0].request).name} waited for a reply"
                    )
                return out
            for msg in self._decoder.feed(data, fds):
                out.append(self._match(msg))
        except RemoteProtocolError as e:
            self.error = str(e)
            raise
        return out

    def wanted(self) -> int:
        """How many bytes to read next so one read never spans two messages."""
        return self._decoder.wanted()

    def take_fds(self) -> list[FdT]:
        """Every fd the decoder still holds (after an error), for the caller to close."""
        return self._decoder.take_fds()

    def _match(self, msg: Message[FdT]) -> ev.ReplyReceived:
        if not self._pending:
            self._decoder_orphan(msg)
            raise RemoteProtocolError(
                f"unexpected reply for request {msg.request}: no request is waiting"
            )
        want = self._pending[0]
        name = FrontendRequest(want.request).name
        if msg.request != want.request:
            self._decoder_orphan(msg)
            raise RemoteProtocolError(
                f"reply for request {msg.request} while {name} ({want.request}) waits"
            )
        self._pending.popleft()
        if want.ack:
            _check_reply_size(name, P.U64Payload, msg.payload)
            want_fds = 0
        else:
            cls = want.rule.reply_payload
            if cls is P.ConfigPayload and len(msg.payload) == 0:
                # vhost-user.rst GET_CONFIG: "a reply with size 0 means an error".
                self._decoder_orphan(msg)
                raise RemoteProtocolError(f"{name}: back-end refused (empty reply)")
            _check_reply_size(name, cls, msg.payload)
            want_fds = want.rule.reply_fds
        if len(msg.fds) != want_fds:
            self._decoder_orphan(msg)
            raise RemoteProtocolError(f"{name} reply carries {len(msg.fds)} fds, not {want_fds}")
        if not want.ack:
            self._learn(want.request, msg.payload)
        return ev.ReplyReceived(msg.request, msg.payload, tuple(msg.fds))

    def _decoder_orphan(self, msg: Message[FdT]) -> None:
        self._decoder._orphans.extend(msg.fds)

    def _learn(self, request: int, payload: bytes) -> None:
        if request == FrontendRequest.GET_FEATURES:
            self.backend_features = P.U64.unpack(payload)[0]
        elif request == FrontendRequest.GET_PROTOCOL_FEATURES:
            self.backend_protocol_features = P.U64.unpack(payload)[0]


class BackendChannel(Generic[FdT]):
    """The SET_BACKEND_REQ_FD channel, seen from one end.

    ``role="frontend"``: decode the back-end's requests into events and queue acks.
    ``role="backend"``: encode requests (:meth:`request`) and match their acks.
    Replies go only where REPLY_ACK was negotiated and NEED_REPLY set (PROTOCOL.md §5).
    """

    def __init__(self, role: str, *, reply_ack: bool, name: str = "backend-channel") -> None:
        if role not in ("frontend", "backend"):
            raise ValueError(f"role {role!r} is not 'frontend' or 'backend'")
        self.role = role
        self.reply_ack = reply_ack
        self.name = name
        self._decoder: FrameDecoder[FdT] = FrameDecoder(
            Direction.REQUESTS if role == "frontend" else Direction.REPLIES,
            request_names=BackendRequest,
        )
        self._out: list[bytes] = []
        self._pending: deque[int] = deque()
        self.error: str | None = None

    def data_to_send(self) -> list[bytes]:
        """Take queued bytes (acks on the front-end side)."""
        out, self._out = self._out, []
        return out

    def take_fds(self) -> list[FdT]:
        """Every fd held after an error."""
        return self._decoder.take_fds()

    # back-end side
    def request(self, req: BackendRequest, payload: P.Payload | None = None) -> bytes:
        """Encode a back-end request (back-end side); NEED_REPLY when REPLY_ACK is on.

        Raises:
            LocalProtocolError: wrong role or payload type.
        """
        if self.role != "backend":
            raise LocalProtocolError("only the back-end sends back-end requests")
        rule = BACKEND_RULES[req]
        payload = payload if payload is not None else P.Empty()
        if not isinstance(payload, rule.payload):
            raise LocalProtocolError(f"{req.name} takes {rule.payload.__name__}")
        need = self.reply_ack or rule.reply is Reply.ALWAYS
        if need:
            self._pending.append(req)
        return encode_message(req, payload.encode(), need_reply=self.reply_ack)

    def receive_data(self, data: bytes, fds: Sequence[FdT] = ()) -> list[ev.Event]:
        """Feed bytes from the peer.

        Raises:
            RemoteProtocolError: malformed or unexpected message; sticky.
        """
        if self.error is not None:
            raise RemoteProtocolError(self.error)
        out: list[ev.Event] = []
        try:
            if not data:
                self._decoder.eof_check()
                return out
            for msg in self._decoder.feed(data, fds):
                out.extend(self._on_message(msg))
        except RemoteProtocolError as e:
            self.error = str(e)
            raise
        return out

    def _on_message(self, msg: Message[FdT]) -> list[ev.Event]:
        if self.role == "backend":
            if not self._pending or self._pending[0] != msg.request:
                self._decoder._orphans.extend(msg.fds)
                raise RemoteProtocolError(f"unexpected ack for back-end request {msg.request}")
            self._pending.popleft()
            P.U64Payload.decode(msg.payload)
            return [ev.ReplyReceived(msg.request, msg.payload, tuple(msg.fds))]
        try:
            req = BackendRequest(msg.request)
        except ValueError:
            self._decoder._orphans.extend(msg.fds)
            raise RemoteProtocolError(f"back-end request code {msg.request} is unknown") from None
        rule = BACKEND_RULES[req]
        try:
            payload: Any = rule.payload.decode(msg.payload)
        except RemoteProtocolError as e:
            self._decoder._orphans.extend(msg.fds)
            raise RemoteProtocolError(f"{req.name}: {e}") from None
        n = len(msg.fds)
        want = {Fds.NONE: 0, Fds.ONE: 1}.get(rule.fds)
        if rule.fds is Fds.NOFD_BIT:
            want = 0 if payload.nofd else 1
        if want is not None and n != want:
            self._decoder._orphans.extend(msg.fds)
            raise RemoteProtocolError(f"{req.name}: {n} fds attached, expected {want}")
        events: list[ev.Event]
        if req is BackendRequest.CONFIG_CHANGE_MSG:
            events = [ev.ConfigChanged()]
        elif req is BackendRequest.VRING_CALL:
            events = [ev.VringCalled(payload.index)]
        elif req is BackendRequest.VRING_ERR:
            events = [ev.VringErrored(payload.index)]
        else:
            events = [ev.BackendRequestReceived(msg.request, msg.payload, tuple(msg.fds))]
        if msg.need_reply:
            self._out.append(encode_message(msg.request, P.U64.pack(0), reply=True))
        return events
