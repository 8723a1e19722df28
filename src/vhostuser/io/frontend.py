"""The front-end's I/O shell: a blocking client that drives any vhost-user back-end.

:class:`FrontendClient` wraps a :class:`~vhostuser.connection.frontend.FrontendConnection`
around a socket (connecting to a listening back-end, or listening for one that connects,
like DPDK's ``client=1``), with guest RAM in a memfd (:class:`~vhostuser.io.guestram.GuestRam`)
and eventfds for kicks and calls. Each method sends one request and, where one is due,
waits for its reply with a deadline. It is what ``vhost-user probe`` and the device
front-ends are built on, and what a test in another project can script directly.

It speaks the current protocol or, with ``dialect=``, the 2014 draft in either numbering
(the draft's handshake starts with ECHO, memory goes in 24-byte regions). Liveness: a
back-end that hangs up is dead (socket HUP); in the draft, so is one that leaves an ECHO
unanswered past the timeout (:meth:`FrontendClient.alive`, :meth:`FrontendClient.watch`).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from ..connection import events as ev
from ..connection.frontend import (
    DEVICE_STATE_ERROR_MASK,
    DEVICE_STATE_NOFD,
    BackendChannel,
    FrontendConnection,
)
from ..errors import (
    LocalProtocolError,
    MessageTimeoutError,
    PeerClosedError,
    RemoteProtocolError,
)
from ..protocol import payloads as P
from ..protocol.enums import FrontendRequest, ProtocolFeature, VirtioFeature, draft_feature_mask
from ..protocol.payloads import MAX_MEM_TABLE_REGIONS
from ..protocol.table import Dialect, Reply, rule_for
from .dirtylog import FrontendDirtyLog
from .eventfd import EventFd
from .fdpass import (
    OwnedFd,
    close_all,
    connect_unix,
    listen_unix,
    recv_some,
    send_msg,
    socket_identity,
    unlink_socket,
)
from .guestram import GuestRam

log = logging.getLogger(__name__)

R = FrontendRequest
PF = ProtocolFeature
VF = VirtioFeature

#: Protocol features this front-end knows how to use.
SUPPORTED_PROTOCOL_FEATURES = (
    PF.MQ | PF.REPLY_ACK | PF.BACKEND_REQ | PF.CONFIG | PF.CONFIGURE_MEM_SLOTS | PF.STATUS
    | PF.MTU | PF.RARP | PF.RESET_DEVICE | PF.INFLIGHT_SHMFD | PF.LOG_SHMFD | PF.DEVICE_STATE
)
"""INBAND_NOTIFICATIONS is not in it: it changes how rings are notified, so it is asked
for explicitly (``negotiate(inband=True)``)."""

#: SET_DEVICE_STATE_FD directions and phase (vhost-user.rst "Migrating back-end state").
STATE_SAVE = 0
STATE_LOAD = 1
STATE_PHASE_STOPPED = 0


# virtio 1.2 §2.1 device status bits.
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8


@dataclass(slots=True)
class VringSetup:
    """What the front-end set up for one ring."""

    index: int
    size: int
    desc: int
    avail: int
    used: int
    kick: EventFd
    call: EventFd
    err: EventFd | None = None
    logged: bool = False
    """SET_VRING_ADDR carried VHOST_VRING_F_LOG (used-ring writes are logged)."""


@dataclass(slots=True)
class Negotiated:
    """The outcome of :meth:`FrontendClient.negotiate`."""

    backend_features: int
    features: int
    backend_protocol_features: int = 0
    protocol_features: int = 0
    queue_num: int | None = None
    max_mem_slots: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class FrontendClient:
    """A synchronous vhost-user front-end over one socket.

    Raises (from most methods):
        RemoteProtocolError: the back-end answered wrongly; the client is then unusable.
        MessageTimeoutError: no reply before ``timeout``.
        PeerClosedError: the back-end closed the connection.
    """

    def __init__(self, sock: socket.socket, *, timeout: float = 5.0, name: str = "frontend",
                 dialect: Dialect = Dialect.CURRENT):
        sock.setblocking(False)
        self.sock = sock
        self.timeout = timeout
        self.name = name
        self.dialect = dialect
        self.conn: FrontendConnection[OwnedFd] = FrontendConnection(name=name, dialect=dialect)
        self.ram: GuestRam | None = None
        self.vrings: dict[int, VringSetup] = {}
        self.backend_channel: BackendChannel[OwnedFd] | None = None
        self._channel_sock: socket.socket | None = None
        self.channel_events: list[ev.Event] = []
        self._channel_backlog: list[ev.Event] = []
        self.negotiated: Negotiated | None = None
        self.mem_regions: list[P.MemoryRegion] = []
        self.sent: list[FrontendRequest] = []
        """Every request sent, in order (for tests and tools; ECHOes are not in it)."""
        self.echoes = 0
        """ECHOes answered so far."""
        self._hung_up_waiting = False
        self.dirty_log: FrontendDirtyLog | None = None
        """The log given with SET_LOG_BASE (:meth:`start_logging`); ours to close."""
        self.logging = False
        """VHOST_F_LOG_ALL is acked: the back-end logs its writes."""
        self.inband = False
        """INBAND_NOTIFICATIONS is negotiated: kicks are VRING_KICK messages and calls
        arrive as BACKEND_VRING_CALL on the back-end channel (each then signals the
        ring's local call eventfd, so waiting works the same in both modes)."""
        self.vring_calls = 0
        """BACKEND_VRING_CALL messages received."""
        self.log_base_reply: bytes | None = None
        """The payload of the last SET_LOG_BASE reply (LOG_SHMFD), as it came."""
        self.dead: str | None = None
        """Why the back-end is considered dead (HUP, or no ECHO reply in time); the client
        is then closed."""
        self._closed = False

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def connect(cls, path: str, *, timeout: float = 5.0, connect_timeout: float = 5.0,
                dialect: Dialect = Dialect.CURRENT) -> FrontendClient:
        """Connect to a back-end listening at ``path`` (retrying until ``connect_timeout``)."""
        return cls(connect_unix(path, timeout=connect_timeout), timeout=timeout, name=path,
                   dialect=dialect)

    @classmethod
    def accept(cls, path: str, *, timeout: float = 5.0, accept_timeout: float = 10.0,
               dialect: Dialect = Dialect.CURRENT) -> FrontendClient:
        """Listen at ``path`` and wait for one back-end to connect (its ``client`` mode).

        Raises:
            MessageTimeoutError: nobody connected within ``accept_timeout``.
        """
        lsock = listen_unix(path)
        identity = socket_identity(path)
        try:
            r, _, _ = select.select([lsock], [], [], accept_timeout)
            if not r:
                raise MessageTimeoutError(
                    f"no back-end connected to {path} within {accept_timeout} s"
                )
            sock, _ = lsock.accept()
        finally:
            lsock.close()
            unlink_socket(path, identity)
        return cls(sock, timeout=timeout, name=path, dialect=dialect)

    def __enter__(self) -> FrontendClient:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- transport ----------------------------------------------------------------------------
    def send(self, req: FrontendRequest, payload: P.Payload | None = None,
             fds: list[int] | None = None, *, need_reply: bool | None = None
             ) -> ev.ReplyReceived | None:
        """Send one request; wait for and return its reply (or ack) if one is due.

        Raises:
            LocalProtocolError: the request breaks the protocol (not sent).
            RemoteProtocolError: a wrong reply, or a NACK (non-zero ack).
            MessageTimeoutError, PeerClosedError: transport failures (and after the
                back-end was found dead).
        """
        self._check_alive()
        fds = fds or []
        before = self.conn.waiting
        data = self.conn.request(req, payload, nfds=len(fds), need_reply=need_reply)
        log.debug("%s: -> %s size=%d fds=%d", self.name, req.name, len(data) - 12, len(fds))
        send_msg(self.sock, data, fds, timeout=self.timeout)
        self.sent.append(req)
        if self.conn.waiting == before:
            return None
        reply = self._wait_reply()
        if req is R.SET_LOG_BASE:
            # vhost-user.rst gives this reply no meaning and QEMU looks only at its id:
            # DPDK sends it empty, libvhost-user (qemu-storage-daemon) echoes the first
            # u64 of the request (mmap_size). Not a NACK either way; kept for the record.
            self.log_base_reply = bytes(reply.payload)
        elif self._is_ack(req):
            (value,) = P.U64.unpack(reply.payload)
            if value != 0:
                raise RemoteProtocolError(f"{req.name}: back-end NACKed with {value:#x}")
        return reply

    def _is_ack(self, req: FrontendRequest) -> bool:
        """True when the reply awaited for ``req`` is a REPLY_ACK u64, not its own reply."""
        return rule_for(self.dialect, req).reply is not Reply.ALWAYS

    def _check_alive(self) -> None:
        if self.dead is not None:
            raise PeerClosedError(f"{self.name}: back-end is dead: {self.dead}")

    def _wait_reply(self, timeout: float | None = None) -> ev.ReplyReceived:
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.conn.hint_no_reply()
                raise MessageTimeoutError(f"{self.name}: no reply within {limit:g} s")
            watched: list[socket.socket] = [self.sock]
            if self._channel_sock is not None:
                # A back-end that waits for our ack of a back-end request (REPLY_ACK) may
                # not answer us before it has it.
                watched.append(self._channel_sock)
            r, _, _ = select.select(watched, [], [], left)
            if not r:
                continue
            if self._channel_sock is not None and self._channel_sock in r:
                self._channel_backlog.extend(self._read_channel())
                if self.sock not in r:
                    continue
            try:
                data, fds = recv_some(self.sock, self.conn.wanted())
            except BlockingIOError:
                continue
            try:
                events = self.conn.receive_data(data, fds)
            except RemoteProtocolError:
                close_all(self.conn.take_fds())
                self._hung_up_waiting = not data
                raise
            if not data:
                raise PeerClosedError(f"{self.name}: back-end closed the connection")
            for e in events:
                if isinstance(e, ev.ReplyReceived):
                    if len(events) > 1:
                        raise RemoteProtocolError("back-end sent more replies than requested")
                    return e

    # -- negotiation -------------------------------------------------------------------------
    def get_u64(self, req: FrontendRequest) -> int:
        """Send a request whose reply is a u64 and return the value."""
        reply = self.send(req)
        if reply is None:
            raise RemoteProtocolError(f"{req.name}: no reply")
        return int(P.U64.unpack(reply.payload)[0])

    def negotiate(
        self,
        *,
        features: int | None = None,
        protocol_features: int = SUPPORTED_PROTOCOL_FEATURES,
        set_features: bool = True,
        backend_channel: bool = True,
        inband: bool = False,
    ) -> Negotiated:
        """Run the handshake QEMU runs before memory and rings.

        GET_FEATURES, GET/SET_PROTOCOL_FEATURES (when offered), GET_QUEUE_NUM (MQ),
        GET_MAX_MEM_SLOTS (CONFIGURE_MEM_SLOTS), SET_BACKEND_REQ_FD (BACKEND_REQ),
        SET_OWNER and, if ``set_features``, SET_FEATURES with ``features`` (default: every
        offered bit we can honour) masked by what the back-end offered.

        In the 2014 draft: ECHO first (as the draft's QEMU did on connecting), then
        GET_FEATURES, SET_OWNER and SET_FEATURES; the draft has nothing else.

        ``inband=True`` also asks for INBAND_NOTIFICATIONS (with the BACKEND_REQ and
        REPLY_ACK it requires): rings are then notified by messages (:attr:`inband`).
        VHOST_F_LOG_ALL is never acked here: :meth:`start_logging` acks it.

        Raises:
            RemoteProtocolError: ``inband`` and the back-end does not offer
                INBAND_NOTIFICATIONS with BACKEND_REQ and REPLY_ACK.
        """
        if self.dialect.is_draft:
            self.echo()
        offered = self.get_u64(R.GET_FEATURES)
        n = Negotiated(backend_features=offered, features=0)
        if offered & VF.PROTOCOL_FEATURES and not self.dialect.is_draft:
            n.backend_protocol_features = self.get_u64(R.GET_PROTOCOL_FEATURES)
            asked = int(protocol_features)
            if inband:
                asked |= int(PF.INBAND_NOTIFICATIONS | PF.BACKEND_REQ | PF.REPLY_ACK)
                need = int(PF.INBAND_NOTIFICATIONS | PF.BACKEND_REQ | PF.REPLY_ACK)
                if n.backend_protocol_features & need != need or not backend_channel:
                    raise RemoteProtocolError(
                        f"{self.name}: in-band notifications asked for, but the back-end "
                        f"offers protocol features {n.backend_protocol_features:#x} (needs "
                        "INBAND_NOTIFICATIONS, BACKEND_REQ and REPLY_ACK)"
                    )
            else:
                asked &= ~int(PF.INBAND_NOTIFICATIONS)
            n.protocol_features = n.backend_protocol_features & asked
            self.send(R.SET_PROTOCOL_FEATURES, P.U64Payload(value=n.protocol_features))
            if self.conn.has(PF.MQ):
                n.queue_num = self.get_u64(R.GET_QUEUE_NUM)
            if self.conn.has(PF.CONFIGURE_MEM_SLOTS):
                n.max_mem_slots = self.get_u64(R.GET_MAX_MEM_SLOTS)
            if backend_channel and self.conn.has(PF.BACKEND_REQ):
                self._open_backend_channel()
            self.inband = self.conn.has(PF.INBAND_NOTIFICATIONS)
        self.send(R.SET_OWNER)
        if set_features:
            want = offered if features is None else features & offered
            # We cannot honour dirty logging or an IOMMU yet.
            want &= ~int(VF.LOG_ALL | VF.ACCESS_PLATFORM)
            if self.dialect.is_draft:
                # A 2014 front-end acks only bits it knew, whatever is offered.
                want &= draft_feature_mask(None)
            self.send(R.SET_FEATURES, P.U64Payload(value=want))
            n.features = want
            self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        self.negotiated = n
        return n

    def set_status(self, status: int) -> bool:
        """SET_STATUS (virtio device status byte) when STATUS was negotiated.

        Returns False (and sends nothing) without the STATUS protocol feature.
        """
        if not self.conn.has(PF.STATUS):
            return False
        self.send(R.SET_STATUS, P.U64Payload(value=status))
        return True

    def driver_ok(self) -> bool:
        """Tell the back-end the driver is ready (DRIVER_OK), as a guest does after its rings
        are set up. DPDK's vhost, for one, does not start a device before this when STATUS
        is negotiated.

        The 2014 draft has no device status; there an ECHO round trip stands in, so that
        the back-end has read everything sent so far (and the kicks that came before)
        when this returns, as QEMU uses GET_FEATURES without REPLY_ACK. Returns whether
        SET_STATUS was sent.
        """
        if self.dialect.is_draft:
            self.echo()
            return False
        return self.set_status(
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK
        )

    def _open_backend_channel(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.send(R.SET_BACKEND_REQ_FD, fds=[theirs.fileno()])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self._channel_sock = ours
        self.backend_channel = BackendChannel("frontend", reply_ack=self.conn.has(PF.REPLY_ACK),
                                              protocol_features=self.conn.protocol_features)

    @property
    def channel_fd(self) -> int | None:
        """The back-end channel's socket (to watch for BACKEND_VRING_CALL), if open."""
        return None if self._channel_sock is None else self._channel_sock.fileno()

    def poll_backend_channel(self) -> list[ev.Event]:
        """Read and answer any back-end requests waiting on the channel (non-blocking);
        return them, with those taken while a reply was awaited (see :meth:`send`)."""
        out, self._channel_backlog = self._channel_backlog, []
        if self._channel_sock is None or self.backend_channel is None:
            return out
        out.extend(self._read_channel())
        return out

    def _read_channel(self) -> list[ev.Event]:
        assert self._channel_sock is not None and self.backend_channel is not None
        out: list[ev.Event] = []
        while True:
            try:
                data, fds = recv_some(self._channel_sock)
            except BlockingIOError:
                break
            events = self.backend_channel.receive_data(data, fds)
            for e in events:
                if isinstance(e, ev.BackendRequestReceived):
                    close_all(f for f in e.fds if isinstance(f, OwnedFd))
                elif isinstance(e, ev.VringCalled):
                    # vhost-user.rst BACKEND_VRING_CALL: in place of the call eventfd.
                    self.vring_calls += 1
                    v = self.vrings.get(e.index)
                    if v is not None:
                        v.call.notify()
            out.extend(events)
            for b in self.backend_channel.data_to_send():
                send_msg(self._channel_sock, b)
            if not data:
                self._channel_sock.close()
                self._channel_sock = None
                break
        self.channel_events.extend(out)
        return out

    def get_config(self, offset: int, size: int) -> bytes:
        """GET_CONFIG: read ``size`` bytes of device config space at ``offset``."""
        reply = self.send(R.GET_CONFIG, P.ConfigPayload(offset=offset, size=size, flags=0,
                                                        data=bytes(size)))
        if reply is None:
            raise RemoteProtocolError("GET_CONFIG: no reply")
        cfg = P.ConfigPayload.decode(reply.payload)
        if cfg.size != size or cfg.offset != offset:
            raise RemoteProtocolError(
                f"GET_CONFIG reply covers {cfg.offset}+{cfg.size}, asked {offset}+{size}"
            )
        return cfg.data

    # -- memory ------------------------------------------------------------------------------
    def set_memory(self, ram: GuestRam, *, gpa: int = 0) -> None:
        """Share guest RAM with the back-end: ADD_MEM_REG when CONFIGURE_MEM_SLOTS was
        negotiated (as QEMU does), SET_MEM_TABLE otherwise."""
        self.ram = ram
        region = P.MemoryRegion(guest_phys_addr=gpa, memory_size=ram.size,
                                userspace_addr=ram.uva, mmap_offset=0)
        self.mem_regions = [region]
        if self.conn.has(PF.CONFIGURE_MEM_SLOTS):
            self.send(R.ADD_MEM_REG, P.SingleRegion(region=region), [ram.fd])
        else:
            assert len(self.mem_regions) <= MAX_MEM_TABLE_REGIONS
            # The draft's regions are 24 bytes, without mmap_offset (ours is 0).
            table = P.DraftMemoryTable if self.dialect.is_draft else P.MemoryTable
            self.send(R.SET_MEM_TABLE, table(regions=(region,)), [ram.fd])

    def gpa_to_uva(self, gpa: int) -> int:
        """Translate a guest-physical address of our RAM into our virtual address."""
        for r in self.mem_regions:
            if r.guest_phys_addr <= gpa < r.guest_phys_addr + r.memory_size:
                return r.userspace_addr + gpa - r.guest_phys_addr
        raise ValueError(f"gpa {gpa:#x} is not in guest RAM")

    # -- rings -------------------------------------------------------------------------------
    def setup_vring(self, index: int, size: int, *, desc: int, avail: int, used: int,
                    base: int = 0, enable: bool = True) -> VringSetup:
        """Configure ring ``index`` at the given guest-physical addresses and start it.

        Sends SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR (front-end virtual addresses),
        SET_VRING_CALL, SET_VRING_KICK and, with PROTOCOL_FEATURES, SET_VRING_ENABLE.
        """
        kick, call = EventFd(), EventFd()
        vring_file: P.VringFile | P.DraftVringFile = (
            P.DraftVringFile(index=index) if self.dialect.is_draft else P.VringFile(index=index)
        )
        # vhost-user.rst: with INBAND_NOTIFICATIONS the invalid-fd flag (0x100) in
        # SET_VRING_KICK/CALL means "notify with VRING_KICK / BACKEND_VRING_CALL"; our
        # local eventfds then stand for the messages (see :attr:`inband`).
        nofd = P.VringFile(index=index, nofd=True)
        try:
            self.send(R.SET_VRING_NUM, P.VringState(index=index, num=size))
            self.send(R.SET_VRING_BASE, P.VringState(index=index, num=base))
            self._send_addr(index, desc, avail, used, log=self.logging)
            if self.inband:
                self.send(R.SET_VRING_CALL, nofd)
                self.send(R.SET_VRING_KICK, nofd)
            else:
                self.send(R.SET_VRING_CALL, vring_file, [call.fd])
                self.send(R.SET_VRING_KICK, vring_file, [kick.fd])
            if enable and (self.conn.features or 0) & VF.PROTOCOL_FEATURES:
                self.send(R.SET_VRING_ENABLE, P.VringState(index=index, num=1))
        except BaseException:
            kick.close()
            call.close()
            raise
        old = self.vrings.pop(index, None)
        if old is not None:
            old.kick.close()
            old.call.close()
        v = VringSetup(index, size, desc, avail, used, kick, call, logged=self.logging)
        self.vrings[index] = v
        return v

    def _send_addr(self, index: int, desc: int, avail: int, used: int, *, log: bool) -> None:
        """SET_VRING_ADDR with front-end virtual addresses; with ``log``, the
        VHOST_VRING_F_LOG flag and the used ring's guest-physical address as
        log_guest_addr (vhost-user.rst "Migration": used-ring writes are logged there).
        Acked (REPLY_ACK) or followed by a GET_FEATURES barrier while logging changes,
        as QEMU does, so the back-end logs from the moment this returns."""
        self.send(R.SET_VRING_ADDR, P.VringAddr(
            index=index, flags=P.VRING_F_LOG if log else 0, desc=self.gpa_to_uva(desc),
            used=self.gpa_to_uva(used), avail=self.gpa_to_uva(avail), log=used if log else 0),
            need_reply=True if log and self.conn.has(PF.REPLY_ACK) else None)

    def kick(self, index: int) -> None:
        """Notify the back-end that ring ``index`` has new buffers: write its kick eventfd
        or, with in-band notifications, send VRING_KICK (num 0, vhost-user.rst).

        Raises:
            KeyError: ring ``index`` was never set up.
        """
        v = self.vrings[index]
        if self.inband:
            self.send(R.VRING_KICK, P.VringState(index=index, num=0), need_reply=False)
        else:
            v.kick.notify()

    # -- dirty logging (live migration) --------------------------------------------------------
    def _sync(self) -> None:
        """Make sure the back-end handled everything sent: a GET_FEATURES round trip
        (QEMU's ``vhost_user_write_sync`` without REPLY_ACK)."""
        if not self.conn.has(PF.REPLY_ACK):
            self.get_u64(R.GET_FEATURES)

    def start_logging(self, log: FrontendDirtyLog) -> None:
        """Have the back-end log every guest page it writes into ``log``, as QEMU starts a
        migration (``vhost_migration_log``): SET_LOG_BASE with the memfd (answered with a
        u64 under LOG_SHMFD, or DPDK's empty ack), SET_FEATURES with VHOST_F_LOG_ALL,
        then SET_VRING_ADDR with VHOST_VRING_F_LOG for every ring set up (rings set up
        later get it too). When this returns the back-end logs. ``log`` stays the
        caller's to close (after :meth:`stop_logging`).

        Raises:
            LocalProtocolError: no memory was shared yet, the log does not cover it,
                logging is already on, the back-end did not offer VHOST_F_LOG_ALL, or
                LOG_SHMFD was not negotiated (we hand the log only as shared memory).
            RemoteProtocolError, MessageTimeoutError, PeerClosedError: as :meth:`send`.
        """
        if self.logging:
            raise LocalProtocolError(f"{self.name}: logging is already on")
        if not self.mem_regions:
            raise LocalProtocolError(f"{self.name}: share guest memory before logging it")
        end = max(r.guest_phys_addr + r.memory_size for r in self.mem_regions)
        if log.guest_end < end:
            raise LocalProtocolError(
                f"{self.name}: the dirty log covers guest memory up to {log.guest_end:#x}, "
                f"not to {end:#x}")
        offered = self.conn.backend_features or 0
        if not offered & VF.LOG_ALL:
            raise LocalProtocolError(
                f"{self.name}: the back-end offers features {offered:#x} without "
                "VHOST_F_LOG_ALL (bit 26): it cannot log for a migration")
        if not self.conn.has(PF.LOG_SHMFD):
            raise LocalProtocolError(
                f"{self.name}: LOG_SHMFD was not negotiated (the back-end offers protocol "
                f"features {self.conn.backend_protocol_features or 0:#x}); without it a "
                "log cannot be shared (QEMU refuses to migrate then too)")
        self.send(R.SET_LOG_BASE, P.LogBase(mmap_size=log.size, mmap_offset=0), [log.fd])
        self.dirty_log = log
        self._set_logging(True)

    def stop_logging(self) -> None:
        """Switch logging off: SET_FEATURES without VHOST_F_LOG_ALL, then SET_VRING_ADDR
        without the log flag for every ring (QEMU's order). The log stays mapped by the
        back-end until the next SET_LOG_BASE or the end of the session; read it with
        :meth:`FrontendDirtyLog.take` after this returns for the last pages.

        Raises:
            LocalProtocolError: logging is not on.
            RemoteProtocolError, MessageTimeoutError, PeerClosedError: as :meth:`send`.
        """
        if not self.logging:
            raise LocalProtocolError(f"{self.name}: logging is not on")
        self._set_logging(False)

    def _set_logging(self, on: bool) -> None:
        features = self.conn.features or 0
        features = features | int(VF.LOG_ALL) if on else features & ~int(VF.LOG_ALL)
        self.send(R.SET_FEATURES, P.U64Payload(value=features))
        if self.negotiated is not None:
            self.negotiated.features = features
        self.logging = on
        for v in self.vrings.values():
            self._send_addr(v.index, v.desc, v.avail, v.used, log=on)
            v.logged = on
        self._sync()

    # -- back-end state (DEVICE_STATE) ---------------------------------------------------------
    def set_device_state_fd(self, direction: int, fd: int, *,
                            phase: int = STATE_PHASE_STOPPED) -> tuple[int, OwnedFd | None]:
        """SET_DEVICE_STATE_FD: give the back-end ``fd`` to write its state into
        (``direction`` :data:`STATE_SAVE`) or read it from (:data:`STATE_LOAD`), in
        ``phase`` (only :data:`STATE_PHASE_STOPPED` exists: every ring stopped).

        Returns the reply's u64 and the back-end's own fd: vhost-user.rst lets it answer
        with an fd of its own (bit 8, the invalid-fd flag, clear), which the front-end
        then uses instead of ``fd``; None when it sets bit 8. The caller closes it.

        Raises:
            LocalProtocolError: DEVICE_STATE was not negotiated; bad direction or phase.
            RemoteProtocolError: the back-end refused (error code in bits 0-7), or its
                reply is malformed (an fd without bit 8 clear, or the reverse).
        """
        if direction not in (STATE_SAVE, STATE_LOAD):
            raise LocalProtocolError(f"device state direction {direction} is not 0 or 1")
        if phase != STATE_PHASE_STOPPED:
            raise LocalProtocolError(f"device state phase {phase} is not 0 (stopped)")
        reply = self.send(R.SET_DEVICE_STATE_FD,
                          P.DeviceStateParams(direction=direction, phase=phase), [fd])
        if reply is None:
            raise RemoteProtocolError("SET_DEVICE_STATE_FD: no reply")
        (value,) = P.U64.unpack(reply.payload)
        theirs = [f for f in reply.fds if isinstance(f, OwnedFd)]
        own = theirs[0] if theirs and not value & DEVICE_STATE_NOFD else None
        if value & DEVICE_STATE_ERROR_MASK:
            if own is not None:
                own.close()
            raise RemoteProtocolError(
                f"SET_DEVICE_STATE_FD ({'save' if direction == STATE_SAVE else 'load'}): "
                f"the back-end refused with error {value & DEVICE_STATE_ERROR_MASK:#x} "
                f"(reply {value:#x})")
        return value, own

    def check_device_state(self) -> int:
        """CHECK_DEVICE_STATE after a transfer; returns the back-end's u64 (0: success).

        Raises:
            LocalProtocolError: DEVICE_STATE was not negotiated.
        """
        return self.get_u64(R.CHECK_DEVICE_STATE)

    def stop_vring(self, index: int) -> int:
        """SET_VRING_ENABLE 0 (if negotiated) and GET_VRING_BASE; return the base."""
        if (self.conn.features or 0) & VF.PROTOCOL_FEATURES:
            self.send(R.SET_VRING_ENABLE, P.VringState(index=index, num=0))
        reply = self.send(R.GET_VRING_BASE, P.VringState(index=index, num=0))
        if reply is None:
            raise RemoteProtocolError("GET_VRING_BASE: no reply")
        st = P.VringState.decode(reply.payload)
        if st.index != index:
            raise RemoteProtocolError(f"GET_VRING_BASE reply for ring {st.index}, asked {index}")
        return st.num

    # -- liveness ----------------------------------------------------------------------------
    def echo(self, *, timeout: float | None = None) -> None:
        """Send the draft's ECHO and wait up to ``timeout`` (default: the client's) for the
        back-end to send it back.

        Raises:
            LocalProtocolError: we speak the current protocol (it has no ECHO).
            MessageTimeoutError: no answer in time: the back-end is declared dead
                (:attr:`dead` is set, the client closed), as the draft's front-end did.
            PeerClosedError: the back-end was already found dead.
            RemoteProtocolError: a wrong answer (or the back-end hung up on it).
        """
        self._check_alive()
        data = self.conn.echo()
        log.debug("%s: -> ECHO", self.name)
        send_msg(self.sock, data, [], timeout=self.timeout)
        try:
            self._wait_reply(timeout)
        except MessageTimeoutError as e:
            self._declare_dead(f"no ECHO reply within {self._limit(timeout):g} s")
            raise MessageTimeoutError(f"{e}; back-end declared dead") from None
        self.echoes += 1

    def _limit(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    def _hung_up(self) -> bool:
        """True when the back-end closed its end (HUP), checked without waiting.

        Raises:
            RemoteProtocolError: the back-end sent something nobody asked for.
        """
        poller = select.poll()
        poller.register(self.sock, select.POLLIN | select.POLLRDHUP)
        return self._hup_in(poller.poll(0))

    def _hup_in(self, events: list[tuple[int, int]]) -> bool:
        for _fd, mask in events:
            if mask & (select.POLLHUP | select.POLLRDHUP | select.POLLERR):
                return True
            if mask & select.POLLIN:
                try:
                    data, fds = recv_some(self.sock, self.conn.wanted())
                except BlockingIOError:
                    continue
                if not data:
                    return True
                try:
                    self.conn.receive_data(data, fds)  # nothing is waiting: a violation
                except RemoteProtocolError:
                    close_all(self.conn.take_fds())
                    raise
        return False

    def _declare_dead(self, why: str) -> None:
        # Told to the caller (a False, a reason, an exception); the log only records it.
        self.dead = why
        log.info("%s: back-end is dead: %s", self.name, why)
        self.close()

    def alive(self, *, timeout: float | None = None) -> bool:
        """Is the back-end still there? On demand, what :meth:`watch` does periodically.

        False when it hung up (socket HUP) or, in the 2014 draft, left an ECHO unanswered
        for ``timeout`` seconds (default: the client's): the back-end is then declared
        dead (:attr:`dead` says why) and the client closed. The current protocol has no
        ECHO, so there only HUP counts.

        Raises:
            RemoteProtocolError: the back-end sent something unasked or a wrong ECHO reply.
        """
        if self.dead is not None:
            return False
        if self._hung_up():
            self._declare_dead("the back-end closed the connection (HUP)")
            return False
        if self.dialect.is_draft:
            try:
                self.echo(timeout=timeout)
            except MessageTimeoutError:
                return False
            except PeerClosedError as e:  # the ECHO could not even be sent
                self._declare_dead(str(e))
                return False
            except RemoteProtocolError as e:
                if self._hung_up_waiting:  # HUP while the ECHO waited
                    self._declare_dead(str(e))
                    return False
                raise
        return True

    def watch(self, interval: float, *, timeout: float | None = None,
              rounds: int | None = None) -> str | None:
        """Check the back-end every ``interval`` seconds until it dies (or ``rounds``
        checks passed, then None): HUP wakes us at once; in the 2014 draft an ECHO goes out
        each round and must come back within ``timeout`` (the draft's QEMU probed every
        ``poll_time`` milliseconds).

        Returns why the back-end is dead (:attr:`dead`); the client is then closed.

        Raises:
            LocalProtocolError: ``interval`` is not positive.
            RemoteProtocolError: the back-end broke the protocol meanwhile.
        """
        if interval <= 0:
            raise LocalProtocolError(f"watch interval {interval} is not positive")
        done = 0
        while rounds is None or done < rounds:
            if self.dead is not None:
                return self.dead
            poller = select.poll()
            poller.register(self.sock, select.POLLIN | select.POLLRDHUP)
            if self._hup_in(poller.poll(int(interval * 1000))):
                self._declare_dead("the back-end closed the connection (HUP)")
                return self.dead
            if not self.alive(timeout=timeout):
                return self.dead
            done += 1
        return self.dead

    # -- teardown ----------------------------------------------------------------------------
    def close(self) -> None:
        """Close the socket, the channel and every eventfd. Guest RAM is the caller's."""
        if self._closed:
            return
        self._closed = True
        for v in self.vrings.values():
            v.kick.close()
            v.call.close()
            if v.err is not None:
                v.err.close()
        self.vrings.clear()
        if self._channel_sock is not None:
            self._channel_sock.close()
            self._channel_sock = None
        close_all(self.conn.take_fds())
        self.sock.close()


# -- migration helpers ----------------------------------------------------------------------------
def migrate_rings(src: FrontendClient, dst: FrontendClient | None = None) -> dict[int, int]:
    """Hand every ring of ``src`` over to ``dst`` (or to ``src`` itself, same socket):
    stop each on ``src`` (SET_VRING_ENABLE 0, GET_VRING_BASE) and set it up on the
    destination at the same addresses with SET_VRING_BASE = the index the source
    returned (vhost-user.rst "Starting and stopping rings": GET_VRING_BASE stops the ring
    and returns where the next back-end resumes). ``dst`` must have negotiated and been
    given the same guest memory (:meth:`FrontendClient.set_memory`). Returns the bases.

    Kick the rings afterwards (a ring starts on its first kick) and read the source's
    dirty log last: the used-ring writes a stop makes are logged too.

    Raises:
        LocalProtocolError: ``src`` has no rings, or ``dst`` has no memory yet.
        RemoteProtocolError, MessageTimeoutError, PeerClosedError: from either side.
    """
    target = src if dst is None else dst
    if not src.vrings:
        raise LocalProtocolError(f"{src.name}: no rings to hand over")
    if not target.mem_regions:
        raise LocalProtocolError(f"{target.name}: share guest memory before taking rings")
    rings = sorted(src.vrings.values(), key=lambda v: v.index)
    bases = {v.index: src.stop_vring(v.index) for v in rings}
    for v in rings:
        target.setup_vring(v.index, v.size, desc=v.desc, avail=v.avail, used=v.used,
                           base=bases[v.index])
    return bases


def _pipe_read_all(fd: int, deadline: float, what: str) -> bytes:
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise MessageTimeoutError(f"{what}: no end of state (EOF) in time")
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            continue
        data = os.read(fd, 65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def _pipe_write_all(fd: int, data: bytes, deadline: float, what: str) -> None:
    view = memoryview(data)
    while view:
        left = deadline - time.monotonic()
        if left <= 0:
            raise MessageTimeoutError(f"{what}: the back-end did not read its state in time")
        _, w, _ = select.select([], [fd], [], left)
        if not w:
            continue
        try:
            n = os.write(fd, view[:65536])
        except BlockingIOError:
            continue
        view = view[n:]


def save_device_state(src: FrontendClient, *, timeout: float | None = None) -> bytes:
    """Have the (stopped) back-end behind ``src`` write its state into a pipe and read it
    until EOF (SET_DEVICE_STATE_FD, direction save); then CHECK_DEVICE_STATE.

    Raises:
        LocalProtocolError: DEVICE_STATE was not negotiated.
        RemoteProtocolError: the back-end refused, or CHECK_DEVICE_STATE says it failed.
        MessageTimeoutError: the state did not end (EOF) within ``timeout``.
    """
    limit = src.timeout if timeout is None else timeout
    r, w = os.pipe2(os.O_CLOEXEC)
    read_fd = OwnedFd(r)
    try:
        try:
            _, own = src.set_device_state_fd(STATE_SAVE, w)
        finally:
            os.close(w)  # the back-end holds the write end: EOF once it closes it
        if own is not None:
            read_fd.close()
            read_fd = own
        state = _pipe_read_all(read_fd.fd, time.monotonic() + limit, f"{src.name}: save")
    finally:
        read_fd.close()
    result = src.check_device_state()
    if result:
        raise RemoteProtocolError(f"{src.name}: CHECK_DEVICE_STATE after saving: {result:#x}")
    return state


def load_device_state(dst: FrontendClient, state: bytes, *,
                      timeout: float | None = None) -> None:
    """Give the (stopped) back-end behind ``dst`` a pipe to read ``state`` from
    (SET_DEVICE_STATE_FD, direction load), write it and close (EOF ends it); then
    CHECK_DEVICE_STATE, which on the loading side also says whether the state was
    understood.

    Raises:
        LocalProtocolError: DEVICE_STATE was not negotiated.
        RemoteProtocolError: the back-end refused, or CHECK_DEVICE_STATE says it failed.
        MessageTimeoutError: the back-end did not read the state within ``timeout``.
    """
    limit = dst.timeout if timeout is None else timeout
    r, w = os.pipe2(os.O_CLOEXEC)
    write_fd = OwnedFd(w)
    try:
        try:
            _, own = dst.set_device_state_fd(STATE_LOAD, r)
        finally:
            os.close(r)
        if own is not None:
            write_fd.close()
            write_fd = own
        os.set_blocking(write_fd.fd, False)
        _pipe_write_all(write_fd.fd, state, time.monotonic() + limit, f"{dst.name}: load")
    finally:
        write_fd.close()
    result = dst.check_device_state()
    if result:
        raise RemoteProtocolError(f"{dst.name}: CHECK_DEVICE_STATE after loading: {result:#x}")


def transfer_device_state(src: FrontendClient, dst: FrontendClient, *,
                          timeout: float | None = None) -> int:
    """Move the back-end state of ``src`` to ``dst`` (both stopped: every ring's
    GET_VRING_BASE answered on the source, none started on the destination), as QEMU
    migrates a back-end's internal state (vhost-user.rst "Migrating back-end state"):
    :func:`save_device_state` then :func:`load_device_state`. Returns the state's size.

    Raises:
        LocalProtocolError, RemoteProtocolError, MessageTimeoutError: as those two.
    """
    state = save_device_state(src, timeout=timeout)
    load_device_state(dst, state, timeout=timeout)
    return len(state)
