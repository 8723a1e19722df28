"""The back-end's connection state machine (what QEMU or DPDK virtio-user talk to). No I/O.

:class:`BackendConnection` takes framed bytes and fds in, checks every request against the
rule table (:mod:`vhostuser.protocol.table`), updates per-session state and queues replies
as bytes out. It never touches a socket or mmap itself: mapping a memory region and
releasing an fd are delegated to a :class:`BackendHost` the I/O shell provides, so the core
runs unchanged over fakes in tests.

On a peer violation it queues a NACK if a reply was requested, releases every fd and
mapping the session held, enters a sticky ERROR state and raises
:class:`~vhostuser.errors.RemoteProtocolError`; the shell then closes the socket.

It speaks one :class:`~vhostuser.protocol.table.Dialect`: the current protocol, or the
January 2014 draft in either numbering (ECHO answered, 24-byte memory regions, a u64
SET_LOG_BASE, only the feature bits of the time offered). When a front-end sends a
message that is malformed in ours but well formed in another dialect, it logs once that
the front-end looks like it speaks that one (:attr:`BackendConnection.dialect_hint`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

from ..devices.base import Device, DeviceStateError
from ..errors import GuestMemoryError, LocalProtocolError, RemoteProtocolError, RingError
from ..memory import U64_MAX, DirtyLog, Region, RegionTable
from ..protocol import payloads as P
from ..protocol.enums import (
    FrontendRequest,
    ProtocolFeature,
    VirtioFeature,
    draft_feature_mask,
)
from ..protocol.framing import FLAG_NEED_REPLY, Direction, FrameDecoder, Message, encode_message
from ..protocol.table import (
    FRONTEND_RULES,
    DraftMessage,
    Meaning,
    Reply,
    Rule,
    dialect_hint,
    fd_count_error,
    first_time,
    meaning_of,
    other_dialects,
    readings,
    rule_for,
    well_formed,
)
from ..protocol.table import Dialect as Dialect  # re-exported: callers import it from here
from ..virtq.inflight import InflightArea, inflight_area_bytes
from . import events as ev
from .dispatch import Dispatcher, device_subscriber
from .vring import RingEvent, VringControl

log = logging.getLogger(__name__)

FdT = TypeVar("FdT")

PF = ProtocolFeature
VF = VirtioFeature

#: Virtio bits every back-end offers on top of the device's own: the ring layouts the
#: engine in ``vhostuser.virtq`` implements, VERSION_1 and VHOST_USER_F_PROTOCOL_FEATURES.
BASE_VIRTIO_FEATURES = (
    VF.VERSION_1
    | VF.RING_INDIRECT_DESC
    | VF.RING_EVENT_IDX
    | VF.RING_PACKED
    | VF.PROTOCOL_FEATURES
    | VF.NOTIFY_ON_EMPTY
)

#: Protocol features every back-end offers; devices add theirs (MQ, RARP, MTU, INFLIGHT...).
#: LOG_SHMFD (with VHOST_F_LOG_ALL, see :data:`LOGGING_VIRTIO_FEATURES`): every write the
#: data path makes to guest memory goes through ``GuestMemory.mark_dirty``, so live
#: migration can use the dirty log (vhost-user.rst "Live migration").
BASE_PROTOCOL_FEATURES = (
    PF.REPLY_ACK | PF.BACKEND_REQ | PF.CONFIGURE_MEM_SLOTS | PF.STATUS | PF.RESET_DEVICE
    | PF.LOG_SHMFD
)

#: VHOST_F_LOG_ALL: offered by every back-end of the current protocol (not the draft's,
#: whose SET_LOG_BASE is an address we cannot log into).
LOGGING_VIRTIO_FEATURES = VF.LOG_ALL

MAX_LOG_BYTES = 1 << 32
"""The largest dirty log SET_LOG_BASE may map (and the largest offset into its fd): 4 GiB
of bitmap covers 128 TiB of guest-physical memory, one bit per 4 KiB page."""

MAX_QUEUES = 256
"""Ring indices travel in 8 bits in KICK/CALL/ERR payloads."""

MAX_SPLIT_RING = 32768
"""virtio 1.2 §2.7: queue size is at most 32768 (and a power of two for split rings)."""

STATE_SAVE = 0
STATE_LOAD = 1
"""SET_DEVICE_STATE_FD directions (vhost-user.rst "Migrating back-end state")."""

STATE_PHASE_STOPPED = 0
"""The only transfer phase defined: after memory was transferred, device suspended."""

STATE_REPLY_NOFD = 0x100
"""SET_DEVICE_STATE_FD reply bit 8: no fd returned, the front-end keeps its own end."""


class StateTransfer(Generic[FdT]):
    """One device-state transfer (SET_DEVICE_STATE_FD ... CHECK_DEVICE_STATE). No I/O.

    The shell moves the bytes: on save it writes :meth:`pending` into :attr:`fd` and
    reports :meth:`wrote`; on load it hands what it reads to :meth:`received` and says
    :meth:`eof`, which loads the blob into the device. Either way it then asks the
    connection to release the fd (``BackendConnection.release_state_fd``), which is how
    the reading end sees the end of the data. :attr:`error` records why it failed.
    """

    def __init__(self, direction: int, fd: FdT, *, outgoing: bytes = b"", limit: int,
                 load: Callable[[bytes], None] | None = None) -> None:
        self.direction = direction
        self.fd: FdT | None = fd
        self.outgoing = outgoing
        self.sent = 0
        self.incoming = bytearray()
        self.limit = limit
        self._load = load
        self.done = direction == STATE_SAVE and not outgoing
        self.error: str | None = None

    @property
    def finished(self) -> bool:
        """True once nothing more moves through the fd (done or failed)."""
        return self.done or self.error is not None

    def pending(self) -> memoryview:
        """Save: the bytes still to write."""
        return memoryview(self.outgoing)[self.sent:]

    def wrote(self, n: int) -> None:
        """Save: ``n`` more bytes went into the pipe."""
        self.sent += n
        if self.sent >= len(self.outgoing):
            self.done = True

    def received(self, data: bytes) -> None:
        """Load: bytes read from the pipe. More than :attr:`limit` in all fails the
        transfer (a front-end must not make the back-end grow without bound)."""
        if self.finished:
            return
        if len(self.incoming) + len(data) > self.limit:
            self.fail(f"the state is larger than the {self.limit} bytes this device accepts")
            self.incoming = bytearray()
            return
        self.incoming += data

    def eof(self) -> None:
        """Load: the front-end closed its end; hand the blob to the device."""
        if self.finished:
            return
        blob = bytes(self.incoming)
        self.incoming = bytearray()
        try:
            if self._load is not None:
                self._load(blob)
        except DeviceStateError as e:
            self.fail(str(e))
            return
        self.done = True

    def fail(self, reason: str) -> None:
        """The transfer failed (CHECK_DEVICE_STATE will say so)."""
        if self.error is None:
            self.error = reason
            log.warning("device state %s failed: %s",
                        "save" if self.direction == STATE_SAVE else "load", reason)




class MappedBuffer(Protocol):
    """A mapping the shell made for one region: its bytes and how to unmap it."""

    @property
    def buf(self) -> memoryview: ...

    def close(self) -> object: ...


class BackendHost(Protocol[FdT]):
    """What the core needs from the I/O shell. Implemented by ``vhostuser.io.backend``."""

    def map_region(self, fd: FdT, *, mmap_offset: int, size: int) -> MappedBuffer:
        """Map ``fd`` from offset 0 for ``mmap_offset + size`` bytes; consumes ``fd``.

        Raises:
            GuestMemoryError: the fd cannot be mapped or is smaller than asked.
        """
        ...

    def release_fd(self, fd: FdT) -> None:
        """Close an fd the core owns."""
        ...

    def alloc_shared(self, size: int) -> tuple[FdT, MappedBuffer]:
        """Create ``size`` bytes of zeroed shareable memory (GET_INFLIGHT_FD).

        Returns an fd to send to the front-end (the core gives it away with the reply)
        and the back-end's own mapping.

        Raises:
            OSError: the memory could not be created.
        """
        ...


RingFactory = Callable[[RegionTable, VringControl[Any], int], Any]
"""Builds the data-path engine of a ring: ``(memory, vring, acked_features) -> engine``."""


def default_ring_factory(mem: RegionTable, vring: VringControl[Any], features: int) -> Any:
    """Build a split or packed device ring from the vring's negotiated state.

    Raises:
        RingError: the ring's addresses are invalid for the current memory table.
    """
    from ..virtq import PackedDeviceRing, SplitDeviceRing

    addr = vring.addr
    if addr is None:
        raise RingError(f"ring {vring.index}: no addresses set")
    try:
        desc = mem.va_to_gpa(addr.desc, 16 * vring.num)
        avail = mem.va_to_gpa(addr.avail, 4)
        used = mem.va_to_gpa(addr.used, 4)
    except GuestMemoryError as e:
        raise RingError(f"ring {vring.index}: {e}") from None
    event_idx = bool(features & VF.RING_EVENT_IDX)
    indirect = bool(features & VF.RING_INDIRECT_DESC)
    if features & VF.RING_PACKED:
        base = vring.base
        if base >> 16 == 0:
            # DPDK virtio-user and QEMU before the used-index extension send only the
            # avail index and wrap counter (bits 0-15) and mean "used = avail", as DPDK's
            # vhost_user_set_vring_base reads it. Nothing is in flight at SET_VRING_BASE
            # (GET_VRING_BASE drained it), so used = avail is the only consistent reading.
            base |= (base & 0xFFFF) << 16
        return PackedDeviceRing(
            mem, vring.num, desc, avail, used,
            event_idx=event_idx, indirect=indirect, base=base, name=f"ring {vring.index}",
        )
    # vhost-user.rst "Live migration": with VHOST_VRING_F_LOG the used ring's writes are
    # logged at log_guest_addr (QEMU passes the used ring's guest-physical address, which
    # is what ``used`` translates to; a packed ring logs its writes at their own GPAs).
    used_log = addr.log if addr.flags & P.VRING_F_LOG else None
    return SplitDeviceRing(
        mem, vring.num, desc, avail, used,
        event_idx=event_idx, indirect=indirect, next_avail=vring.base & 0xFFFF,
        name=f"ring {vring.index}", used_log_gpa=used_log,
    )


class BackendConnection(Generic[FdT]):
    """One front-end session, back-end role. Feed it with :meth:`receive_data`.

    ``inband_notifications``: offer INBAND_NOTIFICATIONS (off by default: QEMU acks it
    without using it, and vhost-user.rst advises it only "when absolutely necessary").
    DEVICE_STATE is offered when the device has a state (``Device.supports_state``).

    Raises (from :meth:`receive_data`):
        RemoteProtocolError: the front-end broke the protocol; the connection is now in
            ERROR, every resource is released, and queued bytes (a NACK) should still be
            sent before closing.
    """

    def __init__(
        self,
        device: Device,
        host: BackendHost[FdT],
        *,
        max_mem_slots: int = 32,
        dialect: Dialect = Dialect.CURRENT,
        ring_factory: RingFactory = default_ring_factory,
        name: str = "vhost-user",
        inband_notifications: bool = False,
    ) -> None:
        if not 1 <= device.num_queues <= MAX_QUEUES:
            raise LocalProtocolError(f"device num_queues {device.num_queues} not in 1..256")
        self.device = device
        self.dispatcher = Dispatcher(device_subscriber(device))
        """Every event goes to the device through here (subscribe to see them too)."""
        self._early: list[ev.Event] = []  # delivered mid-message (see _notify)
        self.host = host
        self.name = name
        self.dialect = dialect
        self.ring_factory = ring_factory
        self.max_mem_slots = max_mem_slots
        # Plain ints: ``~`` on an IntFlag only flips the bits the enum names.
        self.offered_features = (
            int(BASE_VIRTIO_FEATURES) | int(LOGGING_VIRTIO_FEATURES) | int(device.virtio_features)
        )
        pf = BASE_PROTOCOL_FEATURES | device.protocol_features
        if device.num_queues > 1:
            pf |= PF.MQ
        if device.offer_config and device.config_space():
            pf |= PF.CONFIG
        if inband_notifications:
            # Opt-in: vhost-user.rst "In-band notifications" advises against it "unless
            # absolutely necessary", and QEMU neither sends VRING_KICK nor handles
            # BACKEND_VRING_CALL. Used only on rings whose kick/call fd is absent.
            pf |= PF.INBAND_NOTIFICATIONS
        if device.supports_state():
            pf |= PF.DEVICE_STATE
        self.offered_protocol_features = int(pf)  # plain int, see above
        if dialect.is_draft:
            # A 2014 front-end knows 32 feature bits and no protocol features; offer only
            # what existed then (no VERSION_1, packed rings, PROTOCOL_FEATURES, MTU...).
            self.offered_features &= draft_feature_mask(device.device_type)
            self.offered_features &= ~int(VF.LOG_ALL)  # its SET_LOG_BASE is an address
            self.offered_protocol_features = 0
        self._decoder: FrameDecoder[FdT] = FrameDecoder(
            Direction.REQUESTS, request_names=dialect.request_names
        )
        self._out: list[tuple[bytes, list[FdT]]] = []
        self.error: str | None = None
        self.closed = False
        self.dialect_hint: str | None = None
        """Set when the front-end looks like it speaks another dialect; logged as a warning
        once per :attr:`hint_key`, at debug level after that."""
        self.hint_key = name.partition("#")[0]
        """Sessions sharing it say a hint once (default: the name up to "#", which is how
        BackendServer names the sessions of one socket)."""
        self._requests_seen = 0
        self._first_request: Meaning | None = None
        self._reset_session()

    # -- session state -------------------------------------------------------------------
    def _reset_session(self) -> None:
        """Per-session state, rebuilt from nothing on connect, RESET_OWNER or RESET_DEVICE."""
        self.owner = False
        self.features: int | None = None
        self.protocol_features = 0
        self.protocol_features_set = False
        self.status = 0
        self.mem = RegionTable(self.max_mem_slots)
        self._mappings: dict[int, MappedBuffer] = {}  # id(Region) -> mapping
        # id(Region) -> how many ADD_MEM_REG added it: QEMU sends ADD_MEM_REG once per
        # vhost_dev, and a multiqueue net device has one vhost_dev per queue pair.
        self._region_refs: dict[int, int] = {}
        self.vrings: list[VringControl[FdT]] = [
            VringControl(i) for i in range(self.device.num_queues)
        ]
        self.backend_channel: FdT | None = None
        self.log_fd: FdT | None = None
        self.extra_fds: list[FdT] = []
        self.inflight: InflightArea | None = None
        self._inflight_map: MappedBuffer | None = None
        self.log_base: int | None = None
        """The draft's SET_LOG_BASE address (a front-end address; logging is never on)."""
        self.dirty_log: DirtyLog | None = None
        """The log SET_LOG_BASE mapped (LOG_SHMFD), whether or not logging is on: it is
        on (``mem.log`` is this log) only while VHOST_F_LOG_ALL is acked too."""
        self._log_map: MappedBuffer | None = None
        self.state_transfer: StateTransfer[FdT] | None = None
        """The device-state transfer set up by SET_DEVICE_STATE_FD, until checked."""
        self._state_refused: str | None = None

    def _release_session(self) -> None:
        for v in self.vrings:
            v.engine = None
            for fd in v.take_fds():
                self.host.release_fd(fd)
        for maybe in (self.backend_channel, self.log_fd, *self.extra_fds):
            if maybe is not None:
                self.host.release_fd(maybe)
        self.backend_channel = None
        self.log_fd = None
        self.extra_fds = []
        self.release_state_fd()
        self._drop_inflight()
        self._drop_log()
        self._unmap(self.mem.clear())

    def _drop_log(self) -> None:
        """Unmap the dirty log (logging stops: nothing may write into it any more)."""
        self.mem.log = None
        if self.dirty_log is not None:
            self.dirty_log.buf.release()
            self.dirty_log = None
        if self._log_map is not None:
            self._log_map.close()
            self._log_map = None

    def _update_logging(self) -> None:
        """Switch logging on or off after SET_LOG_BASE or SET_FEATURES.

        vhost-user.rst "Live migration": the back-end logs its writes to guest memory
        while VHOST_F_LOG_ALL is set, into the log SET_LOG_BASE supplied. Writes look the
        log up at every write (``RegionTable.mark_dirty``) and every burst (the compiled
        engine), so the change applies to the very next write, on every ring.
        """
        want = self.dirty_log if self.acked_features & VF.LOG_ALL else None
        if self.mem.log is want:
            return
        self.mem.log = want
        size = len(self.dirty_log.buf) if self.dirty_log is not None else 0
        log.info("%s: dirty logging %s (log of %d bytes)", self.name,
                 "on" if want is not None else "off", size)
        self._notify(ev.LogChanged(want is not None, size))

    def _drop_inflight(self) -> None:
        if self.inflight is not None:
            self.inflight.buf.release()
            self.inflight = None
        if self._inflight_map is not None:
            self._inflight_map.close()
            self._inflight_map = None

    def _unmap(self, regions: Sequence[Region]) -> None:
        for r in regions:
            m = self._mappings.pop(id(r), None)
            self._region_refs.pop(id(r), None)
            r.buf.release()
            if m is not None:
                m.close()

    def close(self) -> None:
        """Release every fd and mapping (the peer went away or we close). Idempotent.

        Replies already queued stay queued (without their fds) so that a NACK can still be
        flushed before the socket closes.
        """
        if self.closed:
            return
        self.closed = True
        self._release_session()
        for fd in self._decoder.take_fds():
            self.host.release_fd(fd)
        kept: list[tuple[bytes, list[FdT]]] = []
        for data, fds in self._out:
            for fd in fds:
                self.host.release_fd(fd)
            if not fds:
                kept.append((data, []))
        self._out = kept

    # -- negotiated facts ------------------------------------------------------------------
    def has(self, feature: ProtocolFeature) -> bool:
        """True if ``feature`` was negotiated with SET_PROTOCOL_FEATURES."""
        return bool(self.protocol_features & feature)

    @property
    def suspended(self) -> bool:
        """True while every ring is stopped (vhost-user.rst "Suspended device state": no
        guest-memory writes, no notifications, no back-end requests)."""
        return not any(v.started for v in self.vrings)

    def call_inband(self, index: int) -> bool:
        """True if used-buffer notifications of ring ``index`` go as BACKEND_VRING_CALL
        messages: INBAND_NOTIFICATIONS negotiated, a back-end channel set, and no call fd
        (never set, or set with the invalid-fd flag; like libvhost-user, an fd is always
        preferred)."""
        return (bool(self.protocol_features & PF.INBAND_NOTIFICATIONS)
                and self.backend_channel is not None
                and 0 <= index < len(self.vrings) and self.vrings[index].call is None)

    def err_inband(self, index: int) -> bool:
        """True if an error of ring ``index`` is reported as BACKEND_VRING_ERR: as
        :meth:`call_inband`, for the err fd (vhost-user.rst SET_VRING_ERR: an fd "will be
        preferred over the message")."""
        return (bool(self.protocol_features & PF.INBAND_NOTIFICATIONS)
                and self.backend_channel is not None
                and 0 <= index < len(self.vrings) and self.vrings[index].err is None)

    @property
    def acked_features(self) -> int:
        """Virtio features acked by SET_FEATURES (0 before it)."""
        return self.features or 0

    @property
    def packed(self) -> bool:
        """True if the rings use the packed layout."""
        return bool(self.acked_features & VF.RING_PACKED)

    # -- I/O seam ----------------------------------------------------------------------------
    def data_to_send(self) -> list[tuple[bytes, list[FdT]]]:
        """Take the replies queued so far (bytes and fds to send with them)."""
        out, self._out = self._out, []
        return out

    def wanted(self) -> int:
        """How many bytes to read next so one read never spans two messages."""
        return self._decoder.wanted()

    @property
    def in_message(self) -> bool:
        """True while a message is partly received (the shell runs a deadline then)."""
        return self._decoder.in_message

    def receive_data(self, data: bytes, fds: Sequence[FdT] = ()) -> list[ev.Event]:
        """Feed received bytes and fds; handle every complete message.

        An empty ``data`` means the peer closed the socket.

        Raises:
            RemoteProtocolError: see the class docstring.
        """
        if self.error is not None:
            for fd in fds:
                self.host.release_fd(fd)
            raise RemoteProtocolError(self.error)
        events: list[ev.Event] = []
        try:
            if not data:
                self._decoder.eof_check()
                self._hint_on_close()
                self.close()
                return events
            msgs = self._decoder.feed(data, fds)
            for i, msg in enumerate(msgs):
                try:
                    events.extend(self._handle(msg))
                except RemoteProtocolError:
                    # The messages behind the bad one in this chunk are never handled:
                    # their fds are ours to close too.
                    for later in msgs[i + 1 :]:
                        for fd in later.fds:
                            self.host.release_fd(fd)
                    raise
        except RemoteProtocolError as e:
            self._enter_error(str(e))
            raise
        return events

    def _enter_error(self, why: str) -> None:
        self.error = why
        log.warning("%s: protocol violation: %s", self.name, why)
        self.close()

    # -- dispatch --------------------------------------------------------------------------
    def _reply(self, request: int, payload: bytes, fds: Sequence[FdT] = ()) -> None:
        """Queue a reply; ``request`` is the id as it came on the wire (either dialect)."""
        self._out.append((encode_message(request, payload, reply=True), list(fds)))

    def _ack(self, request: int, ok: bool) -> None:
        # vhost-user.rst, REPLY_ACK: "a zero payload indicates success, non-zero failure".
        self._reply(request, P.U64.pack(0 if ok else 1))

    def _translate_request(self, msg: Message[FdT]) -> Meaning:
        meaning = meaning_of(self.dialect, msg.request)
        if meaning is None:
            where = " in the 2014 draft" if self.dialect.is_draft else ""
            raise RemoteProtocolError(f"request code {msg.request} is unknown{where}")
        return meaning

    def _handle(self, msg: Message[FdT]) -> list[ev.Event]:
        fds = list(msg.fds)
        nfds = len(fds)
        if log.isEnabledFor(logging.DEBUG):
            known = meaning_of(self.dialect, msg.request)
            log.debug(
                "%s: <- %s flags=%#x size=%d fds=%d", self.name,
                known.name if known is not None else f"request {msg.request}", msg.flags,
                len(msg.payload), nfds,
            )
        req: Meaning | None = None
        parsed = False
        self._early = []
        self._requests_seen += 1
        try:
            req = self._translate_request(msg)
            if self._requests_seen == 1:
                self._first_request = req
            rule = rule_for(self.dialect, req)
            payload = self._decode(req, rule, msg, fds)
            parsed = True
            self._check_state(req, rule, payload)
            if req is DraftMessage.ECHO:
                # The draft text: the back-end sends the ECHO back with the REPLY flag set
                # (the request has no payload, so neither has the answer).
                self._reply(msg.request, b"")
                events: list[ev.Event] = []
            else:
                events = self._dispatch(req, rule, payload, msg, fds)
        except (RemoteProtocolError, GuestMemoryError, RingError, ValueError, OSError) as e:
            self._release_all(fds)
            name = req.name if req is not None else f"request {msg.request}"
            text = str(e) if str(e).startswith(name) else f"{name}: {e}"
            if not parsed:
                self._hint_malformed(msg, nfds, name, text)
            if msg.need_reply and not self.dialect.is_draft:
                self._nack(msg.request, req)
            raise RemoteProtocolError(text) from None
        if msg.need_reply and rule.reply is Reply.NONE:
            # REPLY_ACK: ack requests that have no reply of their own. Like libvhost-user
            # we ack whenever NEED_REPLY is set, so a front-end never waits forever.
            # (The draft has no NEED_REPLY: _decode refuses it there.)
            self._ack(msg.request, True)
        self.dispatcher.deliver(events)
        return [*self._early, *events]

    def _notify(self, event: ev.Event) -> None:
        """Deliver ``event`` now, in the middle of handling a message, because what the
        handler does next depends on the device knowing it (e.g. the new memory table
        before rings are rebuilt on it); it is returned with the message's other events."""
        self.dispatcher.deliver((event,))
        self._early.append(event)

    # -- the other dialect -----------------------------------------------------------------
    def _say_hint(self, hint: str) -> None:
        if self.dialect_hint is None:
            self.dialect_hint = hint
            level = logging.WARNING if first_time(self.hint_key, hint) else logging.DEBUG
            log.log(level, "%s: %s", self.name, hint)

    def _hint_malformed(self, msg: Message[FdT], nfds: int, name: str, text: str) -> None:
        """A request malformed in our dialect: say so if it is well formed in another.

        Only syntax counts (id, flags, payload layout, fd count), never order or state, so
        a front-end that speaks our dialect correctly can never trigger it.
        """
        theirs: list[tuple[Dialect, Meaning]] = []
        for d in other_dialects(self.dialect):
            meaning = well_formed(d, msg.request, msg.flags, msg.payload, nfds)
            if meaning is not None:
                theirs.append((d, meaning))
        if theirs:
            self._say_hint(dialect_hint(
                "the front-end", theirs,
                f"request id {msg.request} ({len(msg.payload)} payload bytes, {nfds} fds) is "
                f"malformed in {self.dialect.description}, which we speak ({text}), but is "
                f"well formed as {readings(theirs)}",
            ))

    def _hint_on_close(self) -> None:
        """The front-end closed the connection: say so if that is how a peer speaking the
        current protocol ends a session with a draft back-end.

        With the draft text's numbering a current front-end's first request, GET_FEATURES
        (id 1, no payload), is the draft's ECHO; it gets an empty answer where it wants a
        u64 and gives up (QEMU: "Received bad msg size"), so the session was that one
        request. A draft front-end goes on after its first ECHO.
        """
        if (self.dialect is Dialect.DRAFT_TEXT and self._requests_seen == 1
                and self._first_request is DraftMessage.ECHO):
            self._say_hint(dialect_hint(
                "the front-end", [(Dialect.CURRENT, FrontendRequest.GET_FEATURES)],
                "it closed the connection right after its first request, id 1 without payload, "
                f"which {self.dialect.description} makes an ECHO, answered with an empty reply; "
                "a front-end speaking the current protocol sends GET_FEATURES as id 1 and "
                "gives up on an empty reply",
                certain=False,  # a draft front-end could also send one ECHO and leave
            ))

    def _nack(self, wire_request: int, req: Meaning | None) -> None:
        if isinstance(req, FrontendRequest):
            rule = FRONTEND_RULES[req]
            if rule.reply is Reply.ALWAYS and rule.reply_payload is P.ConfigPayload:
                # vhost-user.rst GET_CONFIG: a reply with size 0 means an error.
                self._reply(wire_request, b"")
                return
            if rule.reply is Reply.ALWAYS:
                # Its own reply layout has no error code; closing the connection is the
                # only answer (the front-end sees EOF instead of a reply).
                return
        self._ack(wire_request, False)

    def _release_all(self, fds: list[FdT]) -> None:
        while fds:
            self.host.release_fd(fds.pop())

    def _decode(self, req: Meaning, rule: Rule, msg: Message[FdT], fds: list[FdT]) -> Any:
        """Apply the rule table's syntax: flags, payload layout, fd count.

        Raises:
            RemoteProtocolError: the message is malformed in our dialect.
        """
        if self.dialect.is_draft and msg.flags & FLAG_NEED_REPLY:
            # The draft's flags are the version (bits 0-1) and REPLY (bit 2); NEED_REPLY
            # came with REPLY_ACK in 2016.
            raise RemoteProtocolError(
                f"flags {msg.flags:#x} set NEED_REPLY (bit 3), which the 2014 draft does not have"
            )
        payload: Any = rule.payload.decode(msg.payload)
        why = fd_count_error(rule, payload, len(fds))
        if why is not None:
            raise RemoteProtocolError(why)
        if isinstance(payload, P.DraftVringFile) and req is not DraftMessage.NET_SET_BACKEND:
            # The draft sends no fd when it has none (its code attaches only valid ones); like
            # the current protocol's NOFD bit, the ring is then polled.
            payload = P.VringFile(index=payload.index, nofd=not fds)
        return payload

    def _check_state(self, req: Meaning, rule: Rule, payload: Any) -> None:
        """Apply the rule table's meaning: feature gate, legal state, ring index.

        Raises:
            RemoteProtocolError: the request is well formed but not allowed now.
        """
        gate = rule.gate
        if isinstance(gate, ProtocolFeature):
            if not self.has(gate):
                raise RemoteProtocolError(f"protocol feature {gate.name} was not negotiated")
        elif gate is VF.PROTOCOL_FEATURES:
            self._check_protocol_features_allowed(req)
        elif gate is not None and not self.acked_features & gate:
            raise RemoteProtocolError(f"virtio feature {gate.name} was not negotiated")
        # state
        if rule.needs_owner and not self.owner:
            raise RemoteProtocolError("received before SET_OWNER")
        if rule.needs_features and self.features is None:
            raise RemoteProtocolError("received before SET_FEATURES")
        if rule.ring_index:
            index = payload.index
            if index >= len(self.vrings):
                raise RemoteProtocolError(
                    f"ring index {index} is out of range (device has {len(self.vrings)} queues)"
                )

    def _check_protocol_features_allowed(self, req: Meaning) -> None:
        if not self.offered_features & VF.PROTOCOL_FEATURES:
            raise RemoteProtocolError("VHOST_USER_F_PROTOCOL_FEATURES was never offered")
        if self.features is not None and not self.features & VF.PROTOCOL_FEATURES:
            raise RemoteProtocolError(
                "VHOST_USER_F_PROTOCOL_FEATURES was not acked in SET_FEATURES"
            )
        if req is FrontendRequest.SET_VRING_ENABLE and not self.protocol_features_set:
            # QEMU sends SET_VRING_ENABLE before SET_FEATURES, but always after
            # SET_PROTOCOL_FEATURES; without it the ring cannot be disabled.
            raise RemoteProtocolError("received before SET_PROTOCOL_FEATURES")

    def _dispatch(
        self, req: Meaning, rule: Rule, payload: Any, msg: Message[FdT], fds: list[FdT]
    ) -> list[ev.Event]:
        handler = _HANDLERS.get(req)
        if handler is None:
            raise RemoteProtocolError(
                f"{req.name} is not supported by this back-end (feature never offered)"
            )
        return handler(self, payload, msg, fds)

    # -- handlers ----------------------------------------------------------------------------
    def _get_features(self, p: Any, msg: Message[FdT], fds: list[FdT]) -> list[ev.Event]:
        self._reply(msg.request, P.U64.pack(self.offered_features))
        return []

    def _set_features(self, p: P.U64Payload, msg: Message[FdT], fds: list[FdT]) -> list[ev.Event]:
        extra = p.value & ~self.offered_features
        if extra:
            raise RemoteProtocolError(f"features {p.value:#x} include bits never offered "
                                      f"({extra:#x})")
        if self.features is not None and self.any_ring_started() and (
            (p.value ^ self.features) & ~int(VF.LOG_ALL)
        ):
            raise RemoteProtocolError(
                f"features changed from {self.features:#x} to {p.value:#x} while rings run"
            )
        if not p.value & VF.RING_PACKED:
            for v in self.vrings:
                if v.num & (v.num - 1):
                    raise RemoteProtocolError(
                        f"split rings need a power-of-two size, ring {v.index} has num {v.num}"
                    )
                if v.base > 0xFFFF:
                    raise RemoteProtocolError(
                        f"split ring {v.index} has base {v.base:#x}, wider than 16 bits"
                    )
        self.features = p.value
        self._notify(ev.FeaturesAcked(p.value))
        self._update_logging()
        out: list[ev.Event] = []
        if not p.value & VF.PROTOCOL_FEATURES:
            # vhost-user.rst: "If VHOST_USER_F_PROTOCOL_FEATURES has not been negotiated,
            # the ring starts directly in the enabled state."
            for v in self.vrings:
                if not v.enabled:
                    v.apply(RingEvent.ENABLE)
                    out.append(ev.VringEnabled(v.index, True))
        return out

    def any_ring_started(self) -> bool:
        """True if any ring is started."""
        return any(v.started for v in self.vrings)

    def _set_owner(self, p: Any, msg: Message[FdT], fds: list[FdT]) -> list[ev.Event]:
        self.owner = True
        return [ev.OwnerSet()]

    def _reset(self, p: Any, msg: Message[FdT], fds: list[FdT]) -> list[ev.Event]:
        # RESET_OWNER is deprecated; like RESET_DEVICE we drop per-session state but keep
        # the owner and negotiated protocol features (the connection itself stays).
        owner, pf, pfs = self.owner, self.protocol_features, self.protocol_features_set
        self._release_session()
        self._reset_session()
        self.owner, self.protocol_features, self.protocol_features_set = owner, pf, pfs
        return [ev.DeviceReset()]

    def _get_protocol_features(self, p: Any, msg: Message[FdT], fds: list[FdT]) -> list[ev.Event]:
        self._reply(msg.request, P.U64.pack(self.offered_protocol_features))
        return []

    def _set_protocol_features(
        self, p: P.U64Payload, msg: Message[FdT], fds: list[FdT]
    ) -> list[ev.Event]:
        extra = p.value & ~self.offered_protocol_features
        if extra:
            raise RemoteProtocolError(
                f"protocol features {p.value:#x} include bits never offered ({extra:#x})"
            )
        if p.value & PF.INBAND_NOTIFICATIONS and (
            p.value & (PF.BACKEND_REQ | PF.REPLY_ACK) != PF.BACKEND_REQ | PF.REPLY_ACK
        ):
            raise RemoteProtocolError(
                "INBAND_NOTIFICATIONS requires BACKEND_REQ and REPLY_ACK"
            )
        self.protocol_features = p.value
        self.protocol_features_set = True
        return [ev.ProtocolFeaturesAcked(p.value)]

    def _get_queue_num(self, p: Any, msg: Message[FdT], fds: list[FdT]) -> list[ev.Event]:
        self._reply(msg.request, P.U64.pack(len(self.vrings)))
        return []

    def _get_max_mem_slots(self, p: Any, msg: Message[FdT], fds: list[FdT]) -> list[ev.Event]:
        self._reply(msg.request, P.U64.pack(self.max_mem_slots))
        return []

    def _map(self, r: P.MemoryRegion, fd: FdT) -> Region:
        """Map one region (consumes ``fd``)."""
        from ..memory import check_region_geometry

        try:
            check_region_geometry(r.guest_phys_addr, r.memory_size, r.userspace_addr,
                                  r.mmap_offset)
        except GuestMemoryError:
            self.host.release_fd(fd)
            raise
        mapping = self.host.map_region(fd, mmap_offset=r.mmap_offset, size=r.memory_size)
        region = Region(
            guest_phys_addr=r.guest_phys_addr,
            size=r.memory_size,
            userspace_addr=r.userspace_addr,
            mmap_offset=r.mmap_offset,
            buf=mapping.buf,
        )
        self._mappings[id(region)] = mapping
        return region

    def _set_mem_table(
        self, p: P.MemoryTable, msg: Message[FdT], fds: list[FdT]
    ) -> list[ev.Event]:
        new: list[Region] = []
        try:
            for r in p.regions:
                new.append(self._map(r, fds.pop(0)))
            old = self.mem.replace(new)
        except Exception:
            self._unmap(new)
            raise
        self._memory_changed()
        self._unmap(old)
        return []

    def _add_mem_reg(self, p: P.SingleRegion, msg: Message[FdT], fds: list[FdT]) -> list[ev.Event]:
        r = p.region
        same = self.mem.find_exact(r.guest_phys_addr, r.memory_size, r.userspace_addr)
        if same is not None and same.mmap_offset == r.mmap_offset:
            # QEMU 7.2 adds every region once per vhost_dev: a net device with N queue
            # pairs sends the same ADD_MEM_REG N times. Count it; keep our mapping.
            self._release_all(fds)
            self._region_refs[id(same)] = self._region_refs.get(id(same), 1) + 1
            return []
        if len(self.mem) >= self.max_mem_slots:
            raise RemoteProtocolError(
                f"all {self.max_mem_slots} memory slots (GET_MAX_MEM_SLOTS) are in use"
            )
        region = self._map(p.region, fds.pop())
        try:
            self.mem.add(region)
        except GuestMemoryError:
            self._unmap([region])
            raise
        self._memory_changed()
        return []

    def _rem_mem_reg(self, p: P.SingleRegion, msg: Message[FdT], fds: list[FdT]) -> list[ev.Event]:
        # QEMU up to 7.0 sends the region's fd with REM_MEM_REG; like libvhost-user we
        # accept it and close it.
        self._release_all(fds)
        r = p.region
        found = self.mem.find_exact(r.guest_phys_addr, r.memory_size, r.userspace_addr)
        if found is None:
            raise RemoteProtocolError(
                f"no region gpa {r.guest_phys_addr:#x} size {r.memory_size:#x} "
                f"uva {r.userspace_addr:#x} to remove"
            )
        refs = self._region_refs.pop(id(found), 1)
        if refs > 1:  # added more than once (see _add_mem_reg): still in use
            self._region_refs[id(found)] = refs - 1
            return []
        self.mem.remove(found)
        self._memory_changed()
        self._unmap([found])
        return []

    def _memory_changed(self) -> None:
        """Re-point running rings at the new table (vhost-user.rst: the table may change
        while rings run; the reactor is single-threaded, so no ring runs meanwhile). The
        device hears of it first (MemTableSet), while the old engines still stand."""
        self._notify(ev.MemTableSet(len(self.mem), memory=self.mem))
        for v in self.vrings:
            if v.engine is not None:
                self._rebuild_engine(v)

    def _rebuild_engine(self, v: VringControl[FdT]) -> None:
        """Rebuild a running ring's engine at its current position, keeping what it has
        in flight (a device may complete those later)."""
        old = v.engine
        v.engine = None
        v.base = old.base() if hasattr(old, "base") else v.base
        self._build_engine(v)
        new = v.engine
        if new is not None and type(new) is type(old) and hasattr(new, "adopt_in_flight"):
            new.adopt_in_flight(old)

    def _build_engine(self, v: VringControl[FdT]) -> None:
        try:
            v.engine = self.ring_factory(self.mem, v, self.acked_features)
        except (RingError, GuestMemoryError) as e:
            v.broken = str(e)
            v.engine = None
            log.warning("%s: ring %d broken: %s", self.name, v.index, e)

    def _set_log_base(
        self, p: P.LogBase | P.U64Payload, msg: Message[FdT], fds: list[FdT]
    ) -> list[ev.Event]:
        if isinstance(p, P.U64Payload):
            # The draft text: SET_LOG_BASE carries a u64, the logging base address. We
            # keep it; logging itself never starts, as LOG_ALL is not offered.
            self.log_base = p.value
            log.info("%s: draft SET_LOG_BASE %#x", self.name, p.value)
            return []
        # vhost-user.rst SET_LOG_BASE: "When the back-end has VHOST_USER_PROTOCOL_F_LOG_SHMFD
        # protocol feature, the log memory fd is provided in the ancillary data", with the
        # area's size and offset in the payload. Without it there is no fd we could log
        # into (the kernel's form is an address in the front-end's process).
        if not self.has(PF.LOG_SHMFD):
            raise RemoteProtocolError(
                "a log fd without the LOG_SHMFD protocol feature negotiated"
            )
        size, offset = p.mmap_size, p.mmap_offset
        # Everything is checked before anything is mapped (docs/security.md: a hostile size
        # must neither exhaust our address space nor wrap).
        if size == 0:
            raise RemoteProtocolError("log mmap_size is 0")
        if size > MAX_LOG_BYTES:
            raise RemoteProtocolError(
                f"log mmap_size {size:#x} is larger than {MAX_LOG_BYTES:#x} bytes "
                "(128 TiB of guest memory)"
            )
        if offset > MAX_LOG_BYTES or offset + size - 1 > U64_MAX:
            raise RemoteProtocolError(
                f"log mmap_offset {offset:#x} is larger than {MAX_LOG_BYTES:#x}"
            )
        # The host maps the fd from offset 0 for offset + size bytes (consumes the fd;
        # GuestMemoryError, a NACK, if the file is smaller or cannot be mapped).
        mapping = self.host.map_region(fds.pop(), mmap_offset=offset, size=size)
        try:
            dirty = DirtyLog(mapping.buf[offset : offset + size])
        except ValueError as e:  # a read-only mapping: bits cannot be set in it
            mapping.close()
            raise RemoteProtocolError(f"log: {e}") from None
        old_active = self.mem.log is not None
        self._drop_log()
        self.dirty_log, self._log_map = dirty, mapping
        if old_active:
            self.mem.log = dirty  # a resized log (more memory) replaces the old one at once
        self._update_logging()
        log.info("%s: dirty log of %d bytes mapped (offset %d)", self.name, size, offset)
        # With LOG_SHMFD the front-end waits for a reply to SET_LOG_BASE (QEMU's
        # vhost_user_set_log_base reads one and checks only its request id; vhost-user.rst
        # names no reply payload). Like libvhost-user we answer with a u64, 0 = success
        # (the rule table's Reply.IF_LOG_SHMFD), which also serves as the REPLY_ACK ack.
        self._reply(msg.request, P.U64.pack(0))
        return []

    def _net_set_backend(
        self, p: P.DraftVringFile, msg: Message[FdT], fds: list[FdT]
    ) -> list[ev.Event]:
        # The draft's code carries VHOST_NET_SET_BACKEND over as is: ring index and,
        # optionally, the tap fd a kernel vhost-net would read. A vhost-user back-end is
        # the network itself, so there is nothing to attach: the fd is closed.
        log.info("%s: draft NET_SET_BACKEND ring %d (%s fd)", self.name, p.index,
                 "one" if fds else "no")
        self._release_all(fds)
        return []

    def _set_log_fd(self, p: Any, msg: Message[FdT], fds: list[FdT]) -> list[ev.Event]:
        if self.log_fd is not None:
            self.host.release_fd(self.log_fd)
        self.log_fd = fds.pop()
        return []

    def _set_vring_num(self, p: P.VringState, msg: Message[FdT], fds: list[FdT]) -> list[ev.Event]:
        v = self.vrings[p.index]
        num = p.num
        if num == 0 or num > MAX_SPLIT_RING:
            raise RemoteProtocolError(
                f"num {num} is outside 1..{MAX_SPLIT_RING} (ring {p.index})"
            )
        if not self.packed and num & (num - 1):
            raise RemoteProtocolError(f"num {num} is not a power of two (ring {p.index})")
        if v.started:
            raise RemoteProtocolError(f"ring {p.index} is started; size cannot change")
        inf = self.inflight
        if inf is not None and p.index < inf.num_queues and num != inf.queue_size:
            raise RemoteProtocolError(
                f"num {num} disagrees with the inflight area's queue_size {inf.queue_size} "
                f"(ring {p.index})"
            )
        v.num = num
        return [ev.VringConfigured(p.index)]

    def _set_vring_addr(self, p: P.VringAddr, msg: Message[FdT], fds: list[FdT]) -> list[ev.Event]:
        v = self.vrings[p.index]
        if p.flags & P.VRING_F_LOG:
            # vhost-user.rst "Live migration": with VHOST_VRING_F_LOG the ring's used-ring
            # writes are logged at log_guest_addr (a guest-physical address), which must
            # hold a whole used ring. LOG_ALL is offered in the current protocol only.
            if not self.offered_features & VF.LOG_ALL:
                raise RemoteProtocolError(
                    f"ring {p.index}: VHOST_VRING_F_LOG, but VHOST_F_LOG_ALL was never offered"
                )
            if p.log % 4 or p.log + 6 + 8 * MAX_SPLIT_RING > U64_MAX:
                raise RemoteProtocolError(
                    f"ring {p.index}: log_guest_addr {p.log:#x} is not a 4-aligned "
                    "used ring address"
                )
        # virtio 1.2 §2.7: descriptor table 16-aligned, driver area 2, device area 4
        # (split); packed areas are 16 and 4.
        for what, addr, align in (("desc", p.desc, 16), ("avail", p.avail, 2 if not self.packed
                                  else 4), ("used", p.used, 4)):
            if addr % align:
                raise RemoteProtocolError(
                    f"ring {p.index}: {what} address {addr:#x} is not {align}-byte aligned"
                )
        if len(self.mem) == 0:
            raise RemoteProtocolError(
                f"ring {p.index}: addresses set before any memory table (a front-end whose "
                "guest RAM cannot be shared sends none; QEMU needs -object "
                "memory-backend-memfd,id=mem,size=SIZE,share=on -numa node,memdev=mem)")
        n = v.num or 1
        for what, addr, length in (("desc", p.desc, 16 * n), ("avail", p.avail, 4),
                                   ("used", p.used, 4)):
            try:
                self.mem.va_to_gpa(addr, length)
            except GuestMemoryError:
                raise RemoteProtocolError(
                    f"ring {p.index}: {what} address {addr:#x}+{length:#x} is not mapped"
                ) from None
        v.addr = p
        if v.engine is not None:  # address change on a running ring: rebuild
            self._rebuild_engine(v)
        return [ev.VringConfigured(p.index)]

    def _set_vring_base(self, p: P.VringState, msg: Message[FdT], fds: list[FdT]) -> list[ev.Event]:
        v = self.vrings[p.index]
        if v.started:
            raise RemoteProtocolError(f"ring {p.index} is started; base cannot change")
        if not self.packed and p.num > 0xFFFF:
            raise RemoteProtocolError(
                f"base {p.num:#x} does not fit 16 bits (split ring {p.index})"
            )
        v.base = p.num
        return [ev.VringConfigured(p.index)]

    def _get_vring_base(self, p: P.VringState, msg: Message[FdT], fds: list[FdT]) -> list[ev.Event]:
        v = self.vrings[p.index]
        if not v.configured:
            raise RemoteProtocolError(f"ring {p.index} was never configured (or already stopped)")
        if v.engine is not None:
            # vhost-user.rst "Migrating back-end state" / GET_VRING_BASE: the ring stops
            # and its index is handed over; the device first completes what it still holds
            # (e.g. a disk's delayed requests), so that no popped request is left without
            # its used entry when the destination resumes at this index.
            self._notify(ev.VringStopping(p.index))
        base = v.engine.base() if v.engine is not None else v.base
        v.apply(RingEvent.GET_BASE)
        v.engine = None
        v.base = base
        # Like libvhost-user and rust-vmm: a stopped ring forgets its addresses and kick
        # fd; the front-end sends them again before the next start.
        v.addr = None
        if v.kick is not None:
            self.host.release_fd(v.kick)
            v.kick = None
        v.broken = None
        self._reply(msg.request, P.VringState(index=p.index, num=base).encode())
        return [ev.VringStopped(p.index, base)]

    def _set_vring_fd(self, kind: str, p: P.VringFile, fds: list[FdT]) -> list[ev.Event]:
        v = self.vrings[p.index]
        fd = None if p.nofd else fds.pop()
        check = getattr(self.host, "check_notify_fd", None)
        if fd is not None and check is not None:
            try:
                check(fd, f"ring {p.index} {kind} fd")
            except (RemoteProtocolError, OSError):
                self.host.release_fd(fd)
                raise
        old = getattr(v, kind)
        if old is not None:
            self.host.release_fd(old)
        setattr(v, kind, fd)
        # vhost-user.rst SET_VRING_KICK/CALL: the invalid-fd flag means polling. With
        # INBAND_NOTIFICATIONS negotiated it means the notifications travel as messages
        # instead (VRING_KICK, BACKEND_VRING_CALL), as libvhost-user and the UML
        # front-end read it: the ring is then not polled.
        inband = p.nofd and self.has(PF.INBAND_NOTIFICATIONS)
        if kind == "kick":
            v.kick_polled = p.nofd and not inband
            v.kick_inband = inband
        elif kind == "call":
            v.call_polled = p.nofd and not inband
        out: list[ev.Event] = [ev.VringFdSet(p.index, kind, fd)]
        if kind == "kick" and v.kick_polled:
            # vhost-user.rst: with NOFD the ring is polled, so it starts now.
            out.extend(self._start_on_kick(p.index))
        return out

    def _set_vring_kick(self, p: P.VringFile, msg: Message[FdT], fds: list[FdT]) -> list[ev.Event]:
        return self._set_vring_fd("kick", p, fds)

    def _set_vring_call(self, p: P.VringFile, msg: Message[FdT], fds: list[FdT]) -> list[ev.Event]:
        return self._set_vring_fd("call", p, fds)

    def _set_vring_err(self, p: P.VringFile, msg: Message[FdT], fds: list[FdT]) -> list[ev.Event]:
        return self._set_vring_fd("err", p, fds)

    def _set_vring_enable(
        self, p: P.VringState, msg: Message[FdT], fds: list[FdT]
    ) -> list[ev.Event]:
        if p.num > 1:
            raise RemoteProtocolError(f"enable value {p.num} is not 0 or 1 (ring {p.index})")
        v = self.vrings[p.index]
        v.apply(RingEvent.ENABLE if p.num else RingEvent.DISABLE)
        return [ev.VringEnabled(p.index, bool(p.num))]

    def _vring_kick_inband(
        self, p: P.VringState, msg: Message[FdT], fds: list[FdT]
    ) -> list[ev.Event]:
        # vhost-user.rst VRING_KICK: "state.num field is currently reserved and must be
        # set to 0"; the ring starts on it like on a kick fd ("Ring states"). Unlike a
        # kick fd's courtesy kick (QEMU writes one before the ring exists), a message
        # naming a ring that cannot run is the front-end's mistake.
        if p.num != 0:
            raise RemoteProtocolError(f"ring {p.index}: num {p.num:#x} is reserved (must be 0)")
        v = self.vrings[p.index]
        if not v.configured:
            raise RemoteProtocolError(
                f"ring {p.index} is not configured (size {v.num}, addresses "
                f"{'set' if v.addr is not None else 'not set'})")
        if len(self.mem) == 0:
            raise RemoteProtocolError(f"ring {p.index} kicked before any memory table")
        out = self._start_on_kick(p.index)
        out.append(ev.VringKicked(p.index))
        return out

    # -- device state (DEVICE_STATE) ------------------------------------------------------
    def _refuse_state(self, msg: Message[FdT], fd: FdT, why: str) -> list[ev.Event]:
        # vhost-user.rst SET_DEVICE_STATE_FD: bits 0-7 non-zero is an error; bit 8 set: no
        # fd returned ("must not both indicate an error and return a file descriptor").
        # The session goes on: the source simply stays where it is.
        self.host.release_fd(fd)
        self._state_refused = why
        log.warning("%s: SET_DEVICE_STATE_FD refused: %s", self.name, why)
        self._reply(msg.request, P.U64.pack(STATE_REPLY_NOFD | 1))
        return []

    def _set_device_state_fd(
        self, p: P.DeviceStateParams, msg: Message[FdT], fds: list[FdT]
    ) -> list[ev.Event]:
        fd = fds.pop()
        self.release_state_fd()
        self.state_transfer = None
        self._state_refused = None
        if p.direction not in (STATE_SAVE, STATE_LOAD):
            return self._refuse_state(msg, fd, f"direction {p.direction} is not 0 (save) "
                                      "or 1 (load)")
        if p.phase != STATE_PHASE_STOPPED:
            return self._refuse_state(msg, fd, f"phase {p.phase} is not 0 (stopped), the "
                                      "only phase defined")
        running = [v.index for v in self.vrings if v.started]
        if running:
            # vhost-user.rst "Migrating back-end state": the transfer happens while the
            # device is suspended, i.e. after GET_VRING_BASE stopped every ring.
            return self._refuse_state(
                msg, fd, f"ring(s) {', '.join(map(str, running))} still run; the state "
                "moves only while every ring is stopped (GET_VRING_BASE)")
        check = getattr(self.host, "check_state_fd", None)
        if check is not None:
            try:
                check(fd, "SET_DEVICE_STATE_FD fd")
            except (RemoteProtocolError, OSError) as e:
                return self._refuse_state(msg, fd, str(e))
        limit = self.device.max_state_size
        if p.direction == STATE_SAVE:
            try:
                blob = self.device.save_state()
            except DeviceStateError as e:
                return self._refuse_state(msg, fd, str(e))
            t: StateTransfer[FdT] = StateTransfer(STATE_SAVE, fd, outgoing=blob, limit=limit)
        else:
            t = StateTransfer(STATE_LOAD, fd, limit=limit, load=self.device.load_state)
        self.state_transfer = t
        self._reply(msg.request, P.U64.pack(STATE_REPLY_NOFD))
        return [ev.DeviceStateTransfer(p.direction, fd, t)]

    def release_state_fd(self) -> None:
        """Close the device-state transfer fd (the shell calls it once the data moved;
        closing is how the reading end sees the end of the data). Idempotent."""
        t = self.state_transfer
        if t is not None and t.fd is not None:
            fd, t.fd = t.fd, None
            self.host.release_fd(fd)

    def _check_device_state(self, p: Any, msg: Message[FdT], fds: list[FdT]) -> list[ev.Event]:
        # vhost-user.rst CHECK_DEVICE_STATE: 0 if the back-end fully processed the state,
        # non-zero otherwise; the shell first finishes what it can without blocking.
        if self.state_transfer is not None:
            self._notify(ev.DeviceStateChecking())
        t = self.state_transfer
        error: str | None
        if t is None:
            error = self._state_refused or "no SET_DEVICE_STATE_FD was accepted before"
        elif t.error is not None:
            error = t.error
        elif not t.done:
            if t.direction == STATE_SAVE:
                error = (f"only {t.sent} of {len(t.outgoing)} state bytes were read from "
                         "the pipe")
            else:
                error = "the front-end did not close its end of the pipe (no end of file)"
        else:
            error = None
        direction = t.direction if t is not None else None
        self.release_state_fd()
        self.state_transfer = None
        self._state_refused = None
        if error is not None:
            log.warning("%s: CHECK_DEVICE_STATE: failure: %s", self.name, error)
        self._reply(msg.request, P.U64.pack(0 if error is None else 1))
        return [ev.DeviceStateChecked(direction, error is None, error)]

    def _get_config(self, p: P.ConfigPayload, msg: Message[FdT], fds: list[FdT]) -> list[ev.Event]:
        data = self.device.get_config(p.offset, p.size)
        self._reply(msg.request, P.ConfigPayload(offset=p.offset, size=len(data), flags=p.flags,
                                                  data=data).encode())
        return []

    def _set_config(self, p: P.ConfigPayload, msg: Message[FdT], fds: list[FdT]) -> list[ev.Event]:
        self.device.set_config(p.offset, p.data, p.flags)
        return [ev.ConfigWritten(p.offset, p.data, p.flags)]

    def _set_backend_req_fd(self, p: Any, msg: Message[FdT], fds: list[FdT]) -> list[ev.Event]:
        fd = fds.pop()
        check = getattr(self.host, "check_socket_fd", None)
        if check is not None:
            try:
                check(fd, "SET_BACKEND_REQ_FD fd")
            except (RemoteProtocolError, OSError):
                self.host.release_fd(fd)
                raise
        if self.backend_channel is not None:
            self.host.release_fd(self.backend_channel)
        self.backend_channel = fd
        return [ev.BackendChannelSet(self.backend_channel)]

    def _set_status(self, p: P.U64Payload, msg: Message[FdT], fds: list[FdT]) -> list[ev.Event]:
        if p.value > 0xFF:
            raise RemoteProtocolError(f"status {p.value:#x} does not fit 8 bits")
        self.status = p.value
        return [ev.StatusSet(p.value)]

    def _get_status(self, p: Any, msg: Message[FdT], fds: list[FdT]) -> list[ev.Event]:
        self._reply(msg.request, P.U64.pack(self.status))
        return []

    def _send_rarp(self, p: P.U64Payload, msg: Message[FdT], fds: list[FdT]) -> list[ev.Event]:
        return [ev.RarpRequested(P.U64.pack(p.value)[:6])]

    def _net_set_mtu(self, p: P.U64Payload, msg: Message[FdT], fds: list[FdT]) -> list[ev.Event]:
        # virtio 1.2 §5.1.4.1: mtu is a u16 and at least 68.
        if not 68 <= p.value <= 65535:
            raise RemoteProtocolError(f"mtu {p.value} is outside 68..65535")
        return [ev.MtuSet(p.value)]

    def _inflight_geometry(self, p: P.InflightPayload) -> int:
        if not 1 <= p.num_queues <= len(self.vrings):
            raise RemoteProtocolError(
                f"num_queues {p.num_queues} is outside 1..{len(self.vrings)}"
            )
        if not 1 <= p.queue_size <= MAX_SPLIT_RING:
            raise RemoteProtocolError(f"queue_size {p.queue_size} is outside 1..{MAX_SPLIT_RING}")
        return inflight_area_bytes(p.num_queues, p.queue_size, self.packed)

    def _get_inflight_fd(
        self, p: P.InflightPayload, msg: Message[FdT], fds: list[FdT]
    ) -> list[ev.Event]:
        # vhost-user.rst GET_INFLIGHT_FD: the back-end allocates the area for the
        # front-end's num_queues x queue_size and returns it with its size; a repeat
        # replaces the previous area (nothing accumulates).
        size = self._inflight_geometry(p)
        fd, mapping = self.host.alloc_shared(size)
        try:
            area = InflightArea(mapping.buf[:size], p.num_queues, p.queue_size, self.packed)
        except ValueError:
            self.host.release_fd(fd)
            mapping.close()
            raise
        self._drop_inflight()
        self.inflight, self._inflight_map = area, mapping
        self._notify(ev.InflightSet(fresh=True, area=area))
        reply = P.InflightPayload(mmap_size=size, mmap_offset=0, num_queues=p.num_queues,
                                  queue_size=p.queue_size)
        self._reply(msg.request, reply.encode(), [fd])
        return []

    def _set_inflight_fd(
        self, p: P.InflightPayload, msg: Message[FdT], fds: list[FdT]
    ) -> list[ev.Event]:
        # vhost-user.rst SET_INFLIGHT_FD: adopt the area after a reconnect. Every field
        # is checked against what our own queues can hold before anything is mapped.
        need = self._inflight_geometry(p)
        if p.mmap_size < need:
            raise RemoteProtocolError(
                f"mmap_size {p.mmap_size} is smaller than the {need} bytes {p.num_queues} "
                f"queues of size {p.queue_size} need"
            )
        for v in self.vrings[: p.num_queues]:
            if v.num and v.num != p.queue_size:
                raise RemoteProtocolError(
                    f"queue_size {p.queue_size} disagrees with SET_VRING_NUM {v.num} "
                    f"(ring {v.index})"
                )
        mapping = self.host.map_region(fds.pop(), mmap_offset=p.mmap_offset, size=p.mmap_size)
        try:
            view = mapping.buf[p.mmap_offset : p.mmap_offset + p.mmap_size]
            area = InflightArea(view, p.num_queues, p.queue_size, self.packed)
        except ValueError as e:
            mapping.close()
            raise RemoteProtocolError(str(e)) from None
        self._drop_inflight()
        self.inflight, self._inflight_map = area, mapping
        self._notify(ev.InflightSet(fresh=False, area=area))
        return []

    # -- data-path entry points (called by the shell) --------------------------------------
    def kick(self, index: int) -> list[ev.Event]:
        """A kick arrived for ring ``index`` (its kick fd became readable, or it is polled).

        Starts the ring on its first kick (vhost-user.rst: "the back-end must start a ring
        upon receiving a kick"). Returns the events this caused (already delivered).
        """
        out = self._start_on_kick(index)
        self.dispatcher.deliver(out)
        return out

    def _start_on_kick(self, index: int) -> list[ev.Event]:
        """Start ring ``index`` if it is stopped and can run; the events, undelivered."""
        v = self.vrings[index]
        out: list[ev.Event] = []
        if not v.started:
            if not v.configured or len(self.mem) == 0:
                return out  # a kick before the ring exists (QEMU's courtesy kick): ignore
            v.apply(RingEvent.KICK)
            self._build_engine(v)
            out.append(ev.VringStarted(index))
            if v.broken is not None:
                out.append(ev.VringBroken(index, v.broken))
        return out

    def ring_broken(self, index: int, reason: str) -> ev.VringBroken:
        """Mark ring ``index`` broken (the guest broke it); returns the event."""
        v = self.vrings[index]
        v.broken = reason
        e = ev.VringBroken(index, reason)
        self.dispatcher.deliver((e,))
        return e


_Handler = Callable[[BackendConnection[Any], Any, Message[Any], list[Any]], list[ev.Event]]

_HANDLERS: dict[Meaning, _Handler] = {
    DraftMessage.NET_SET_BACKEND: BackendConnection._net_set_backend,
    FrontendRequest.GET_FEATURES: BackendConnection._get_features,
    FrontendRequest.SET_FEATURES: BackendConnection._set_features,
    FrontendRequest.SET_OWNER: BackendConnection._set_owner,
    FrontendRequest.RESET_OWNER: BackendConnection._reset,
    FrontendRequest.RESET_DEVICE: BackendConnection._reset,
    FrontendRequest.SET_MEM_TABLE: BackendConnection._set_mem_table,
    FrontendRequest.SET_LOG_BASE: BackendConnection._set_log_base,
    FrontendRequest.SET_LOG_FD: BackendConnection._set_log_fd,
    FrontendRequest.SET_VRING_NUM: BackendConnection._set_vring_num,
    FrontendRequest.SET_VRING_ADDR: BackendConnection._set_vring_addr,
    FrontendRequest.SET_VRING_BASE: BackendConnection._set_vring_base,
    FrontendRequest.GET_VRING_BASE: BackendConnection._get_vring_base,
    FrontendRequest.SET_VRING_KICK: BackendConnection._set_vring_kick,
    FrontendRequest.SET_VRING_CALL: BackendConnection._set_vring_call,
    FrontendRequest.SET_VRING_ERR: BackendConnection._set_vring_err,
    FrontendRequest.GET_PROTOCOL_FEATURES: BackendConnection._get_protocol_features,
    FrontendRequest.SET_PROTOCOL_FEATURES: BackendConnection._set_protocol_features,
    FrontendRequest.GET_QUEUE_NUM: BackendConnection._get_queue_num,
    FrontendRequest.SET_VRING_ENABLE: BackendConnection._set_vring_enable,
    FrontendRequest.SEND_RARP: BackendConnection._send_rarp,
    FrontendRequest.NET_SET_MTU: BackendConnection._net_set_mtu,
    FrontendRequest.SET_BACKEND_REQ_FD: BackendConnection._set_backend_req_fd,
    FrontendRequest.GET_CONFIG: BackendConnection._get_config,
    FrontendRequest.SET_CONFIG: BackendConnection._set_config,
    FrontendRequest.VRING_KICK: BackendConnection._vring_kick_inband,
    FrontendRequest.GET_MAX_MEM_SLOTS: BackendConnection._get_max_mem_slots,
    FrontendRequest.ADD_MEM_REG: BackendConnection._add_mem_reg,
    FrontendRequest.REM_MEM_REG: BackendConnection._rem_mem_reg,
    FrontendRequest.SET_STATUS: BackendConnection._set_status,
    FrontendRequest.GET_STATUS: BackendConnection._get_status,
    FrontendRequest.GET_INFLIGHT_FD: BackendConnection._get_inflight_fd,
    FrontendRequest.SET_INFLIGHT_FD: BackendConnection._set_inflight_fd,
    FrontendRequest.SET_DEVICE_STATE_FD: BackendConnection._set_device_state_fd,
    FrontendRequest.CHECK_DEVICE_STATE: BackendConnection._check_device_state,
}
