"""A virtio-net driver in Python: send and receive Ethernet frames through any net back-end.

:class:`VirtioNetFrontend` plays the guest and QEMU at once, without a VM: it allocates
guest RAM (a sealed memfd), negotiates with a vhost-user net back-end (ours, DPDK's
``net_vhost``, anything that serves virtio-net), lays out the virtqueues (split or packed)
and their buffers, fills the receive queues and then sends and receives whole frames::

    from vhostuser.frontends.net import VirtioNetFrontend

    with VirtioNetFrontend.connect("/tmp/switch-port0.sock") as nic:
        nic.send([frame])
        frames = nic.recv(timeout=1.0)

It is meant for tests (of this project and of others) and tools such as ``vhost-user
pktgen``. The driver side follows virtio 1.2 §5.1.6: every frame is preceded by the
virtio-net header (12 bytes with VERSION_1 or MRG_RXBUF, else 10), transmitted frames use
one descriptor each, receive buffers are one device-writable descriptor each and, with
MRG_RXBUF, frames spanning ``num_buffers`` buffers are reassembled.

Reconnection (on by default for :meth:`~VirtioNetFrontend.connect` and
:meth:`~VirtioNetFrontend.accept`), as QEMU does with ``reconnect=1`` and as
:class:`~vhostuser.frontends.blk.VirtioBlkFrontend` does: when the back-end closes the
control socket (it crashed, or was restarted), the front-end keeps its guest RAM and
rings, and :meth:`~VirtioNetFrontend.wait` (and so :meth:`~VirtioNetFrontend.recv` with a
timeout) dials again until ``reconnect_timeout`` passes. On a new back-end it negotiates
the same features (a bit gone ends the session at once, see
:mod:`vhostuser.frontends.resume`), shares the same memory and resumes every ring:

* split rings resume at ``used.idx`` (QEMU's ``virtio_queue_restore_last_avail_idx``):
  frames queued for transmission that the old back-end had not completed are sent by the
  new one, receive buffers it had not used are offered again;
* packed rings restart empty: a back-end that dies between writing used descriptors and
  publishing the first one leaves descriptors the new one cannot tell from used ones, so
  what was queued is dropped (counted in ``stats.tx_outage_dropped``) and fresh receive
  buffers are posted.

Frames the old back-end had taken and not delivered are lost with it: they belong to the
outage, whose start and end are kept in :attr:`~VirtioNetFrontend.outages`. While the
back-end is away, :meth:`~VirtioNetFrontend.send` still queues frames (they go out after
the reconnect) and :attr:`~VirtioNetFrontend.connected` is False.

Migration, as QEMU drives one for a vhost-user NIC: :meth:`~VirtioNetFrontend.start_logging`
hands the back-end a dirty log (:class:`~vhostuser.io.dirtylog.FrontendDirtyLog`) and
acks VHOST_F_LOG_ALL; the back-end then marks every guest page it writes (receive buffers,
used rings). :meth:`~VirtioNetFrontend.migrate` stops every ring on the back-end
(GET_VRING_BASE) and resumes it at the returned index on another connection (or the same
one): no frame is lost or delivered twice across the hand-over. With ``inband=True`` the
session uses in-band notifications (VRING_KICK, BACKEND_VRING_CALL) instead of eventfds.

Errors: negotiation failures raise :class:`~vhostuser.errors.VhostUserError` subclasses
from :class:`~vhostuser.io.frontend.FrontendClient`; a back-end that returns bad used
entries breaks the ring (:class:`~vhostuser.errors.RingError`); a back-end that stays away
raises :class:`~vhostuser.errors.PeerClosedError`; our own caller's mistakes (a frame
larger than a transmit slot) raise ValueError.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

from ..errors import MessageTimeoutError, PeerClosedError, RemoteProtocolError, VhostUserError
from ..io.dirtylog import FrontendDirtyLog
from ..io.fdpass import listen_unix, socket_identity, unlink_socket
from ..io.frontend import FrontendClient, Negotiated, migrate_rings
from ..io.guestram import GuestRam
from ..io.reactor import Reactor
from ..memory import FlatMemory
from ..protocol import payloads as P
from ..protocol.enums import (
    DeviceType,
    FrontendRequest,
    NetFeature,
    ProtocolFeature,
    VirtioFeature,
)
from ..virtio.net import (
    DEFAULT_MTU,
    ETH_HLEN,
    NET_CONFIG,
    NET_HDR_MRG,
    VIRTIO_NET_S_LINK_UP,
    VLAN_HLEN,
    net_header_len,
)
from ..virtq import (
    INITIAL_BASE,
    PackedDriverRing,
    SplitDriverRing,
    packed_layout,
    split_layout,
)
from .resume import BackendChangedError, check_offer

__all__ = [
    "PROBE",
    "NetFrontendStats",
    "ProbeLedger",
    "RingArea",
    "VirtioNetFrontend",
    "probe_template",
    "read_probe",
    "stamp_probe",
]

log = logging.getLogger(__name__)

VF = VirtioFeature
NF = NetFeature
PF = ProtocolFeature

_PAGE = 4096
RETRY_INTERVAL = 0.05
"""Seconds between connection attempts while the back-end is away."""


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(slots=True)
class NetFrontendStats:
    """What the front-end sent and received."""

    tx_frames: int = 0
    tx_bytes: int = 0
    tx_ring_full: int = 0
    """Frames :meth:`VirtioNetFrontend.send` could not queue (no free transmit slot)."""
    rx_frames: int = 0
    rx_bytes: int = 0
    rx_errors: int = 0
    """Used receive buffers that were malformed (shorter than a header, bad num_buffers)."""
    kicks: int = 0
    rx_per_pair: list[int] = field(default_factory=list)
    """Frames received on each queue pair."""
    reconnects: int = 0
    """Times the back-end went away and a new one took the session over."""
    outage_seconds: float = 0.0
    """Time without a back-end, summed over the outages that ended."""
    tx_outage_dropped: int = 0
    """Queued frames dropped when a packed ring restarted empty after an outage."""
    rx_outage_dropped: int = 0
    """Mergeable frames cut short by an outage (their first buffers came before it)."""

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return {k: getattr(self, k) for k in self.__slots__}


@dataclass(frozen=True, slots=True)
class RingArea:
    """One queue's place in guest memory (guest-physical addresses)."""

    index: int
    rx: bool
    desc: int
    avail: int
    used: int
    """The used ring (split); for packed rings the device writes the descriptor ring."""
    data: int
    """First buffer slot."""
    data_size: int
    """Bytes of buffer slots."""


@dataclass(slots=True)
class _Queue:
    index: int
    ring: Any  # SplitDriverRing[int] | PackedDriverRing[int]
    slot_size: int
    slot_base: int  # GPA (= offset in guest RAM) of slot 0
    desc: int  # GPAs of the ring areas
    avail: int
    used: int
    free: list[int] = field(default_factory=list)
    # receive side: a mergeable frame being reassembled
    partial: bytearray | None = None
    partial_left: int = 0
    partial_hdr: bytes = b""


class _Dialer(Protocol):
    """How a front-end finds its back-end again after an outage."""

    def arm(self) -> None:
        """The back-end went away: get ready to take the next one (listen, if we do)."""

    def attempt(self) -> FrontendClient | None:
        """One try, without waiting: a connected client, or None (nobody there yet).

        Raises:
            OSError: an error that retrying cannot cure (a path that is not a socket).
        """

    def fileno(self) -> int | None:
        """An fd that becomes readable when an attempt may succeed (a listener), or None."""

    def close(self) -> None:
        """Release what :meth:`arm` took. Idempotent."""


class _ConnectDialer:
    """Dial a listening back-end at ``path`` (the usual case)."""

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout

    def arm(self) -> None:
        """Nothing to prepare: the back-end will listen again."""

    def attempt(self) -> FrontendClient | None:
        """Connect once (no listener yet: None)."""
        try:
            return FrontendClient.connect(self.path, timeout=self.timeout, connect_timeout=0)
        except MessageTimeoutError:  # ENOENT / ECONNREFUSED: not listening (yet)
            return None

    def fileno(self) -> int | None:
        """Nothing to wait on: attempts are paced by the caller."""
        return None

    def close(self) -> None:
        """Nothing held."""


class _AcceptDialer:
    """Listen at ``path`` for a back-end in client mode (DPDK ``client=1``) to come back."""

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self._lsock: socket.socket | None = None
        self._identity: tuple[int, int, int] | None = None

    def arm(self) -> None:
        """Listen at the path again (the first accept removed the socket file).

        Raises:
            OSError, ValueError: the path cannot be bound (from ``listen_unix``).
        """
        if self._lsock is None:
            self._lsock = listen_unix(self.path)
            self._identity = socket_identity(self.path)

    def attempt(self) -> FrontendClient | None:
        """Accept a waiting back-end, if there is one."""
        if self._lsock is None:
            self.arm()
        assert self._lsock is not None
        try:
            sock, _ = self._lsock.accept()
        except BlockingIOError:
            return None
        self.close()  # one back-end at a time: the path is free again
        return FrontendClient(sock, timeout=self.timeout, name=self.path)

    def fileno(self) -> int | None:
        """The listener (readable when a back-end connects)."""
        return None if self._lsock is None else self._lsock.fileno()

    def close(self) -> None:
        """Stop listening and remove the socket file if it is still ours."""
        if self._lsock is not None:
            self._lsock.close()
            self._lsock = None
            unlink_socket(self.path, self._identity)
            self._identity = None


class VirtioNetFrontend:
    """A virtio-net driver over a :class:`FrontendClient` (see the module docstring).

    Args:
        client: a connected client (see :meth:`connect` / :meth:`accept`).
        queue_pairs: queue pairs to use (MQ is negotiated when more than one).
        packed: use packed virtqueues (VIRTIO_F_RING_PACKED must be offered).
        mrg_rxbuf: negotiate mergeable receive buffers when offered.
        event_idx: negotiate VIRTIO_F_EVENT_IDX when offered.
        queue_size: descriptors per virtqueue.
        rx_buffer_size: bytes per receive buffer, header included (default: 2048 with
            mergeable buffers, else enough for a header and an MTU-sized frame).
        mtu: the largest frame payload we send and expect (frames up to MTU + 18 bytes).
        mac: our MAC address (informational; frames carry whatever the caller puts in).
        set_mtu: send NET_SET_MTU when the back-end offers the MTU protocol feature.
        version_1: negotiate VIRTIO_F_VERSION_1 (False: a legacy driver, 10-byte header
            without mergeable buffers).
        name: used in messages.
        reconnect: take up a new back-end when this one goes away (needs ``dialer``;
            :meth:`connect` and :meth:`accept` give one).
        reconnect_timeout: seconds without a back-end before :meth:`wait` gives up.
        inband: negotiate INBAND_NOTIFICATIONS: kick with VRING_KICK messages and take
            calls as BACKEND_VRING_CALL (the back-end must offer it, with BACKEND_REQ and
            REPLY_ACK, or :meth:`start` raises RemoteProtocolError).
        dialer: how to find the back-end again (internal; see :meth:`connect`).

    Raises:
        ValueError: a parameter out of range (the message names it).
    """

    def __init__(
        self,
        client: FrontendClient,
        *,
        queue_pairs: int = 1,
        packed: bool = False,
        mrg_rxbuf: bool = True,
        event_idx: bool = True,
        queue_size: int = 256,
        rx_buffer_size: int | None = None,
        mtu: int = DEFAULT_MTU,
        mac: str = "02:00:00:00:00:01",
        set_mtu: bool = False,
        version_1: bool = True,
        name: str = "net-frontend",
        reconnect: bool = True,
        reconnect_timeout: float = 30.0,
        inband: bool = False,
        dialer: _Dialer | None = None,
    ) -> None:
        if not 1 <= queue_pairs <= 128:
            raise ValueError(f"queue_pairs {queue_pairs} is outside 1..128")
        if not 68 <= mtu <= 65535:
            raise ValueError(f"mtu {mtu} is outside 68..65535")
        if not packed and (queue_size < 2 or queue_size & (queue_size - 1)):
            raise ValueError(f"split queue size {queue_size} is not a power of two >= 2")
        if not 2 <= queue_size <= 32768:
            raise ValueError(f"queue size {queue_size} is outside 2..32768")
        if not reconnect_timeout >= 0:
            raise ValueError(f"reconnect_timeout {reconnect_timeout} is negative")
        self.client = client
        self.queue_pairs = queue_pairs
        self.packed = packed
        self.want_mrg = mrg_rxbuf
        self.want_event_idx = event_idx
        self.queue_size = queue_size
        self.rx_buffer_size = rx_buffer_size
        self.mtu = mtu
        self.mac = mac
        self.set_mtu = set_mtu
        self.version_1 = version_1
        self.name = name
        self.reconnect_enabled = reconnect and dialer is not None
        self.reconnect_timeout = reconnect_timeout
        self.inband = inband
        self._dialer = dialer
        self.stats = NetFrontendStats(rx_per_pair=[0] * queue_pairs)
        self.features = 0
        self.protocol_features = 0
        self.hdr_len = 12
        self.mergeable = False
        self.config: bytes | None = None
        self.ram: GuestRam | None = None
        self.outages: list[tuple[float, float | None]] = []
        """``(start, end)`` of every time without a back-end (``time.monotonic()``; end
        None while it lasts)."""
        self.last_disconnect_reason: str | None = None
        self._mem: FlatMemory | None = None
        self._buf: memoryview | None = None
        self._rx: list[_Queue] = []
        self._tx: list[_Queue] = []
        self._backlog: list[tuple[bytes, bytes]] = []  # received, not yet returned
        self._reactor = Reactor()
        self._watched: list[int] = []
        self._down_since: float | None = None
        self._started = False
        self._closed = False

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def connect(cls, path: str, *, timeout: float = 5.0, connect_timeout: float = 5.0,
                **kw: Any) -> VirtioNetFrontend:
        """Connect to a back-end listening at ``path`` and start (see :meth:`start`);
        after an outage, dial ``path`` again (``reconnect``, on by default).

        Raises:
            VhostUserError, OSError: connecting or negotiating failed (nothing leaks).
        """
        client = FrontendClient.connect(path, timeout=timeout, connect_timeout=connect_timeout)
        fe = cls(client, name=path, dialer=_ConnectDialer(path, timeout), **kw)
        try:
            fe.start()
        except BaseException:
            fe.close()
            raise
        return fe

    @classmethod
    def accept(cls, path: str, *, timeout: float = 5.0, accept_timeout: float = 10.0,
               **kw: Any) -> VirtioNetFrontend:
        """Listen at ``path`` for a back-end in client mode (DPDK ``client=1``), then start;
        after an outage, listen there again for it to come back (``reconnect``).

        Raises:
            MessageTimeoutError: nobody connected in time; VhostUserError, OSError otherwise.
        """
        client = FrontendClient.accept(path, timeout=timeout, accept_timeout=accept_timeout)
        fe = cls(client, name=path, dialer=_AcceptDialer(path, timeout), **kw)
        try:
            fe.start()
        except BaseException:
            fe.close()
            raise
        return fe

    def __enter__(self) -> VirtioNetFrontend:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- start-up -------------------------------------------------------------------------
    def wanted_features(self) -> int:
        """The virtio feature bits we ask for (masked by the offer in :meth:`start`)."""
        want = int(VF.PROTOCOL_FEATURES | NF.MAC | NF.STATUS | NF.MTU)
        if self.version_1:
            want |= int(VF.VERSION_1)
        if self.want_mrg:
            want |= int(NF.MRG_RXBUF)
        if self.want_event_idx:
            want |= int(VF.RING_EVENT_IDX)
        if self.packed:
            want |= int(VF.RING_PACKED)
        if self.queue_pairs > 1:
            want |= int(NF.MQ)
        return want

    def _needed_protocol_features(self) -> int:
        """Protocol features the session cannot do without on a new back-end."""
        return int(PF.MQ) if self.queue_pairs > 1 else 0

    def _negotiate(self, c: FrontendClient, *, first: bool) -> Negotiated:
        """Run the handshake up to SET_FEATURES and check what the back-end offers.

        Raises:
            BackendChangedError: (not ``first``) a bit negotiated before is gone.
            RemoteProtocolError: packed rings or queue pairs asked for are not offered.
        """
        n = c.negotiate(features=self.wanted_features() if first else self.features,
                        inband=self.inband)
        if not first:
            check_offer(self.name, features=self.features, offered_features=n.backend_features,
                        protocol_features=self._needed_protocol_features(),
                        offered_protocol_features=n.backend_protocol_features,
                        device=DeviceType.NET)
        feats = n.features
        if self.packed and not feats & VF.RING_PACKED:
            raise RemoteProtocolError(
                f"{self.name}: packed rings asked for, but the back-end offers "
                f"{n.backend_features:#x} without VIRTIO_F_RING_PACKED"
            )
        if self.queue_pairs > 1:
            if not feats & NF.MQ:
                raise RemoteProtocolError(
                    f"{self.name}: {self.queue_pairs} queue pairs asked for, but the back-end "
                    "does not offer VIRTIO_NET_F_MQ"
                )
            if n.queue_num is not None and n.queue_num < 2 * self.queue_pairs:
                error = RemoteProtocolError if first else BackendChangedError
                raise error(
                    f"{self.name}: {self.queue_pairs} queue pairs asked for, but the back-end "
                    f"has {n.queue_num} queues"
                )
        return n

    def start(self) -> None:
        """Negotiate, share memory, set up every queue, post receive buffers, DRIVER_OK.

        Raises:
            RemoteProtocolError: the back-end lacks something asked for (packed rings,
                enough queues for ``queue_pairs``).
            VhostUserError, OSError: the handshake failed.
        """
        if self._started:
            return
        c = self.client
        n = self._negotiate(c, first=True)
        feats = n.features
        self.features = feats
        self.protocol_features = n.protocol_features
        self.hdr_len = net_header_len(feats)
        self.mergeable = bool(feats & NF.MRG_RXBUF)
        self._read_config(c)

        hl = self.hdr_len
        size = self.queue_size
        frame_max = self.mtu + ETH_HLEN + VLAN_HLEN
        tx_slot = _align(hl + frame_max, 64)
        rx_slot = self.rx_buffer_size or (2048 if self.mergeable else _align(hl + frame_max, 64))
        if rx_slot < hl + (1 if self.mergeable else frame_max):
            raise ValueError(f"{self.name}: receive buffers of {rx_slot} bytes are too small")
        layout = packed_layout if self.packed else split_layout
        ring_bytes = _align(layout(size, 0)[3], _PAGE)
        nq = 2 * self.queue_pairs
        rings_end = nq * ring_bytes
        tx_area = _align(size * tx_slot, _PAGE)
        rx_area = _align(size * rx_slot, _PAGE)
        total = _align(rings_end + self.queue_pairs * (tx_area + rx_area), 2 << 20)
        ram = GuestRam.memfd(total, name="vhostuser-net-frontend")
        self.ram = ram
        self._buf = ram.buf
        mem = FlatMemory(ram.buf, va_base=ram.uva)
        self._mem = mem
        c.set_memory(ram)
        data = rings_end
        for q in range(nq):
            d, a, u, _ = layout(size, q * ring_bytes)
            slot = rx_slot if q % 2 == 0 else tx_slot
            area = rx_area if q % 2 == 0 else tx_area
            queue = _Queue(q, None, slot, data, d, a, u)
            self._new_ring(queue)
            data += area
            (self._rx if q % 2 == 0 else self._tx).append(queue)
            c.setup_vring(q, size, desc=d, avail=a, used=u,
                          base=INITIAL_BASE if self.packed else 0)
        for rq in self._rx:
            self._refill(rq)
        self._watch(c)
        c.driver_ok()
        self._started = True

    def _read_config(self, c: FrontendClient) -> None:
        if c.conn.has(PF.CONFIG):
            with contextlib.suppress(VhostUserError):
                self.config = c.get_config(0, NET_CONFIG.size)
        if self.set_mtu and c.conn.has(PF.MTU):
            c.send(FrontendRequest.NET_SET_MTU, P.U64Payload(value=self.mtu))

    def _new_ring(self, q: _Queue) -> None:
        """A fresh driver ring for ``q`` (zeroed ring areas), every slot free."""
        assert self._mem is not None
        if q.ring is not None:
            q.ring.close()
        event_idx = bool(self.features & VF.RING_EVENT_IDX)
        cls: Any = PackedDriverRing if self.packed else SplitDriverRing
        q.ring = cls(self._mem, self.queue_size, q.desc, q.avail, q.used, event_idx=event_idx,
                     name=f"{self.name} ring {q.index}")
        q.free = list(range(self.queue_size - 1, -1, -1))
        q.partial = None

    def _watch(self, c: FrontendClient) -> None:
        r = self._reactor
        for v in c.vrings.values():
            r.add_reader(v.call.fd, self._on_call)
            self._watched.append(v.call.fd)
        chan = c.channel_fd if c.inband else None
        if chan is not None:
            r.add_reader(chan, self._on_channel)
            self._watched.append(chan)
        # Nothing may arrive on the control socket while no request waits for a reply:
        # readable means the back-end closed it (or broke the protocol).
        fd = c.sock.fileno()
        r.add_reader(fd, self._on_control_readable)
        self._watched.append(fd)

    def _unwatch(self) -> None:
        for fd in self._watched:
            self._reactor.remove_reader(fd)
        self._watched = []

    def _on_call(self) -> None:
        for v in self.client.vrings.values():
            v.call.drain()

    def _on_channel(self) -> None:
        # In-band calls: each BACKEND_VRING_CALL signals the ring's local call eventfd
        # (FrontendClient.poll_backend_channel), so waiting is the same in both modes.
        try:
            self.client.poll_backend_channel()
        except (VhostUserError, OSError) as e:
            self._went_away(f"the back-end channel failed: {e}")

    def _on_control_readable(self) -> None:
        self._went_away("the back-end closed the connection")

    # -- reconnection ---------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """False from the moment the back-end went away until one took the session over."""
        return self._down_since is None

    @property
    def reconnects(self) -> int:
        """Times a new back-end took the session over."""
        return self.stats.reconnects

    def _went_away(self, reason: str) -> None:
        """The back-end is gone: stop watching its fds, close the connection, keep RAM and
        rings (the next back-end resumes them)."""
        if self._down_since is not None or self._closed:
            return
        self._down_since = time.monotonic()
        self.outages.append((self._down_since, None))
        self.last_disconnect_reason = reason
        self._unwatch()
        self.client.close()
        log.info("%s: %s", self.name, reason)
        if self._dialer is not None and self.reconnect_enabled:
            try:
                self._dialer.arm()
            except (OSError, ValueError) as e:
                log.warning("%s: cannot wait for the back-end to come back: %s", self.name, e)

    def _check_up(self, timeout: float) -> bool:
        """If the back-end is away, try to take up a new one for up to ``timeout`` seconds;
        True when one is there.

        Raises:
            PeerClosedError: reconnecting is off, or nobody came back within
                ``reconnect_timeout``.
            BackendChangedError: a back-end came back without a bit the session needs.
        """
        if self._down_since is None:
            return True
        if not self.reconnect_enabled or self._dialer is None:
            raise PeerClosedError(f"{self.name}: {self.last_disconnect_reason}")
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            if self._try_reconnect():
                return True
            now = time.monotonic()
            if now - self._down_since > self.reconnect_timeout:
                raise PeerClosedError(
                    f"{self.name}: {self.last_disconnect_reason}, and no back-end took the "
                    f"session over within {self.reconnect_timeout:g} s")
            left = deadline - now
            if left <= 0:
                return False
            fd = self._dialer.fileno()
            if fd is None:
                time.sleep(min(left, RETRY_INTERVAL))
            else:
                self._reactor.add_reader(fd, lambda: None)
                try:
                    self._reactor.run_once(min(left, RETRY_INTERVAL))
                finally:
                    self._reactor.remove_reader(fd)

    def _try_reconnect(self) -> bool:
        """One attempt; True when a new back-end took the session over.

        Raises:
            BackendChangedError: it lacks a bit the session depends on (not retried).
        """
        assert self._dialer is not None and self._down_since is not None
        try:
            c = self._dialer.attempt()
        except (OSError, ValueError) as e:
            log.debug("%s: reconnect attempt: %s", self.name, e)
            return False
        if c is None:
            return False
        try:
            self._resume(c)
        except BackendChangedError:
            self._unwatch()
            c.close()
            raise
        except (VhostUserError, OSError) as e:
            # A back-end that died again mid-handshake, or one still starting up.
            self._unwatch()
            c.close()
            log.info("%s: reconnect failed (%s); retrying", self.name, e)
            if self._dialer is not None:
                with contextlib.suppress(OSError, ValueError):
                    self._dialer.arm()
            return False
        now = time.monotonic()
        start = self._down_since
        self._down_since = None
        self.outages[-1] = (start, now)
        self.stats.reconnects += 1
        self.stats.outage_seconds += now - start
        log.info("%s: reconnected after %.3f s", self.name, now - start)
        return True

    def _resume(self, c: FrontendClient, bases: dict[int, int] | None = None) -> None:
        """Hand the session to the back-end behind ``c``: same features, same memory, every
        ring resumed (split) or restarted (packed), then DRIVER_OK and a kick per queue.
        With ``bases`` (a migration: the old back-end stopped every ring and said where
        it stopped) every ring, split or packed, resumes at its base instead.

        Raises:
            BackendChangedError: a bit the session depends on is gone.
            VhostUserError, OSError: the handshake failed.
        """
        # What the old back-end published is ours: take it before re-basing the rings.
        for tq in self._tx:
            self._reap_tx(tq)
        for rq in self._rx:
            self._reap_rx(rq, self._backlog)
            if rq.partial is not None and bases is None:
                # The rest of this frame went down with the old back-end.
                self.stats.rx_outage_dropped += 1
                rq.partial = None
        n = self._negotiate(c, first=False)
        self.protocol_features = n.protocol_features
        self._read_config(c)
        assert self.ram is not None
        c.set_memory(self.ram)
        for q in (*self._rx, *self._tx):
            if bases is not None:
                # A frame split across buffers stays valid: the ring goes on where it was.
                c.setup_vring(q.index, self.queue_size, desc=q.desc, avail=q.avail,
                              used=q.used, base=bases[q.index])
                continue
            q.partial = None
            if self.packed:
                # A packed ring cannot be resumed without inflight tracking: a back-end
                # killed between writing a burst's used descriptors and the first one's
                # flags leaves descriptors that look used to the next one (virtio 1.2
                # §2.8.6 makes the flags of the first the publication). Start it afresh.
                if q.index % 2 == 1:
                    self.stats.tx_outage_dropped += self.queue_size - len(q.free)
                self._new_ring(q)
                base = INITIAL_BASE  # both wrap counters set (virtio 1.2 §2.8.1)
            else:
                # QEMU after a back-end crash: last_avail_idx = used.idx
                # (virtio_queue_restore_last_avail_idx); what was not used is taken again.
                base = int(struct.unpack_from("<H", self._mem_view(q.used + 2, 2))[0])
            c.setup_vring(q.index, self.queue_size, desc=q.desc, avail=q.avail, used=q.used,
                          base=base)
        self.client = c
        self._watch(c)
        if self.packed and bases is None:
            for rq in self._rx:
                self._refill(rq)
        c.driver_ok()
        for q in (*self._rx, *self._tx):
            # vhost-user.rst: a ring starts on its first kick; this also has the new
            # back-end look at what is already waiting in the ring.
            c.kick(q.index)
            self.stats.kicks += 1

    # -- migration ------------------------------------------------------------------------------
    def start_logging(self, dirty_log: FrontendDirtyLog | None = None) -> FrontendDirtyLog:
        """Have the back-end log every guest page it writes (see the module docstring);
        returns the log (a new one covering our guest RAM unless given; the caller closes
        it after :meth:`stop_logging` or :meth:`migrate`).

        Raises:
            LocalProtocolError: the back-end cannot log (no VHOST_F_LOG_ALL offered, no
                LOG_SHMFD), or logging is on already.
            PeerClosedError: the back-end is away.
        """
        self._check_open()
        if self._down_since is not None:
            raise PeerClosedError(f"{self.name}: no back-end to log for us")
        assert self.ram is not None
        own = dirty_log is None
        log_ = FrontendDirtyLog(self.ram.size) if dirty_log is None else dirty_log
        try:
            self.client.start_logging(log_)
        except BaseException:
            if own:
                log_.close()
            raise
        return log_

    def stop_logging(self) -> None:
        """Switch the back-end's logging off (SET_FEATURES without LOG_ALL).

        Raises:
            LocalProtocolError: logging is not on.
        """
        self.client.stop_logging()

    def migrate(self, client: FrontendClient | Callable[[], FrontendClient] | None = None
                ) -> dict[int, int]:
        """Move the session to the back-end behind ``client`` (negotiated here with the
        same features), as QEMU hands rings to the destination of a migration: every ring
        is stopped here (GET_VRING_BASE; what the back-end completed until then is taken
        first) and set up there at the returned index, same guest memory; then DRIVER_OK
        and a kick per ring. Returns the bases.

        ``client`` is a connected client, or a function that connects one: it is called
        once the old connection is closed (a back-end that serves one front-end at a
        time, such as DPDK's net_vhost port, is then free for it); None keeps the
        session on this connection (the rings are stopped and set up again on it). The
        old connection is closed after its last ring stopped; if logging was on, the log
        then holds every page written until the stop: read it after this returns.

        Raises:
            PeerClosedError: the back-end is away.
            BackendChangedError: the new back-end lacks a bit the session uses.
            VhostUserError, OSError: stopping or setting up failed (``client`` is then
                closed; the session is not usable).
        """
        self._check_open()
        if self._down_since is not None:
            raise PeerClosedError(f"{self.name}: no back-end to migrate from")
        old = self.client
        self._unwatch()
        if client is None or client is old:
            for tq in self._tx:
                self._reap_tx(tq)
            bases = migrate_rings(old)
            self._watch(old)
            old.driver_ok()
        else:
            try:
                bases = {q.index: old.stop_vring(q.index)
                         for q in sorted((*self._rx, *self._tx), key=lambda q: q.index)}
            except BaseException:
                old.close()
                if isinstance(client, FrontendClient):
                    client.close()
                raise
            if not isinstance(client, FrontendClient):
                old.close()
                client = client()
            try:
                self._resume(client, bases)
            except BaseException:
                client.close()
                raise
            finally:
                old.close()
            return bases
        for q in (*self._rx, *self._tx):
            old.kick(q.index)
            self.stats.kicks += 1
        return bases

    def ring_areas(self) -> list[RingArea]:
        """Where each queue lives in guest memory (GPAs), receive queues first: for
        tests that look at what the back-end wrote (e.g. a dirty-log audit)."""
        out = []
        for q in sorted((*self._rx, *self._tx), key=lambda q: q.index):
            rx = q.index % 2 == 0
            out.append(RingArea(q.index, rx, q.desc, q.avail, q.used, q.slot_base,
                                q.slot_size * self.queue_size))
        return sorted(out, key=lambda a: (not a.rx, a.index))

    def _check_open(self) -> None:
        if self._closed or not self._started:
            raise PeerClosedError(f"{self.name}: the front-end is not running")

    def _mem_view(self, gpa: int, n: int) -> memoryview:
        buf = self._buf
        assert buf is not None
        return buf[gpa : gpa + n]

    def reconnect(self, timeout: float | None = None) -> bool:
        """Wait until a new back-end took the session over; True when one did (at once
        while one is there).

        Args:
            timeout: seconds to wait (default: what is left of ``reconnect_timeout``).

        Raises:
            PeerClosedError: reconnecting is off, or nobody came back within
                ``reconnect_timeout``.
            BackendChangedError: the back-end came back without a bit the session needs.
        """
        if self._down_since is None:
            return True
        left = self.reconnect_timeout - (time.monotonic() - self._down_since)
        if self._check_up(max(0.0, left if timeout is None else min(timeout, left))):
            return True
        if timeout is None:
            raise PeerClosedError(
                f"{self.name}: {self.last_disconnect_reason}, and no back-end took the "
                f"session over within {self.reconnect_timeout:g} s")
        return False

    # -- properties ---------------------------------------------------------------------------
    @property
    def link_up(self) -> bool:
        """The link status from config space (True when the back-end has none)."""
        if self.config is None or not self.features & NF.STATUS:
            return True
        status = NET_CONFIG.unpack(self.config)[1]
        return bool(status & VIRTIO_NET_S_LINK_UP)

    @property
    def device_mac(self) -> str | None:
        """The MAC in the back-end's config space, if it has one."""
        if self.config is None or not self.features & NF.MAC:
            return None
        return ":".join(f"{b:02x}" for b in NET_CONFIG.unpack(self.config)[0])

    @property
    def max_frame(self) -> int:
        """The largest frame :meth:`send` accepts (MTU + 18)."""
        return self.mtu + ETH_HLEN + VLAN_HLEN

    # -- transmit -------------------------------------------------------------------------------
    def _kick(self, index: int) -> None:
        """Notify the back-end (none while it is away: the reconnect kicks every queue)."""
        if self._down_since is None:
            try:
                self.client.kick(index)
            except (VhostUserError, OSError) as e:
                # In-band, a kick is a message: a back-end gone is noticed here.
                self._went_away(f"kicking ring {index} failed: {e}")
                return
            self.stats.kicks += 1

    def _reap_tx(self, q: _Queue) -> None:
        free = q.free
        for token, _ in q.ring.reap():
            free.append(token)

    def send(self, frames: Iterable[bytes | bytearray | memoryview], pair: int = 0) -> int:
        """Queue frames on transmit queue ``pair`` and kick once; return how many fit.

        Frames that find no free slot are not sent (counted in ``stats.tx_ring_full``);
        call again later (after the back-end used some). While the back-end is away the
        frames are queued all the same; they go out once a new one took over.

        Raises:
            ValueError: a frame is larger than :attr:`max_frame` or shorter than 14 bytes.
            RingError: the back-end published a bad used entry.
        """
        q = self._tx[pair]
        self._reap_tx(q)
        buf = self._buf
        if buf is None:
            raise ValueError(f"{self.name}: not started")
        ring = q.ring
        hl = self.hdr_len
        zero = bytes(hl)
        free = q.free
        slot_size = q.slot_size
        base = q.slot_base
        sent = 0
        nbytes = 0
        refused = 0
        for f in frames:
            n = len(f)
            if n > slot_size - hl or n < ETH_HLEN:
                raise ValueError(
                    f"{self.name}: frame of {n} bytes is outside {ETH_HLEN}..{slot_size - hl}"
                )
            if not free:
                refused += 1
                continue
            slot = free.pop()
            gpa = base + slot * slot_size
            buf[gpa : gpa + hl] = zero
            buf[gpa + hl : gpa + hl + n] = f
            if not ring.add(((gpa, hl + n, False),), slot):
                free.append(slot)
                refused += 1
                continue
            sent += 1
            nbytes += n
        if sent:
            ring.publish()
            if ring.should_kick():
                self._kick(q.index)
        self.stats.tx_frames += sent
        self.stats.tx_bytes += nbytes
        self.stats.tx_ring_full += refused
        return sent

    def send_all(self, frames: Sequence[bytes | bytearray | memoryview], pair: int = 0,
                 timeout: float = 10.0) -> int:
        """Send every frame, waiting for free slots as needed; return how many were sent
        (fewer only when ``timeout`` passed).

        Raises:
            ValueError, RingError: as :meth:`send`.
            PeerClosedError, BackendChangedError: as :meth:`wait`.
        """
        deadline = time.monotonic() + timeout
        done = 0
        while done < len(frames):
            before = self.stats.tx_ring_full
            done += self.send(frames[done:], pair)
            self.stats.tx_ring_full = before
            if done < len(frames):
                if time.monotonic() > deadline:
                    break
                self.wait(0.01)
        return done

    def tx_pending(self) -> int:
        """Frames queued but not yet used by the back-end (all transmit queues)."""
        for q in self._tx:
            self._reap_tx(q)
        return sum(self.queue_size - len(q.free) for q in self._tx)

    # -- receive ------------------------------------------------------------------------------
    def _refill(self, q: _Queue) -> None:
        ring = q.ring
        free = q.free
        size = q.slot_size
        base = q.slot_base
        while free:
            slot = free[-1]
            if not ring.add(((base + slot * size, size, True),), slot):
                break
            free.pop()
        ring.publish()
        if ring.should_kick():
            self._kick(q.index)

    def _reap_rx(self, q: _Queue, out: list[tuple[bytes, bytes]]) -> None:
        buf = self._buf
        assert buf is not None
        hl = self.hdr_len
        size = q.slot_size
        base = q.slot_base
        used = q.ring.reap()
        if not used:
            return
        free = q.free
        st = self.stats
        for slot, written in used:
            free.append(slot)
            off = base + slot * size
            if q.partial is not None:
                # A later buffer of a mergeable frame: data only, no header.
                q.partial += buf[off : off + written]
                q.partial_left -= 1
                if q.partial_left == 0:
                    frame = bytes(q.partial)
                    out.append((q.partial_hdr, frame))
                    st.rx_per_pair[q.index // 2] += 1
                    st.rx_frames += 1
                    st.rx_bytes += len(frame)
                    q.partial = None
                continue
            if written < hl:
                st.rx_errors += 1
                continue
            nbuf = 1
            if self.mergeable:
                nbuf = NET_HDR_MRG.unpack_from(buf, off)[6]
                if nbuf < 1 or nbuf > self.queue_size:
                    st.rx_errors += 1
                    continue
            if nbuf > 1:
                q.partial_hdr = bytes(buf[off : off + hl])
                q.partial = bytearray(buf[off + hl : off + written])
                q.partial_left = nbuf - 1
                continue
            frame = bytes(buf[off + hl : off + written])
            out.append((bytes(buf[off : off + hl]), frame))
            st.rx_per_pair[q.index // 2] += 1
            st.rx_frames += 1
            st.rx_bytes += len(frame)
        self._refill(q)

    def recv_packets(self, timeout: float = 0.0, max_frames: int | None = None
                     ) -> list[tuple[bytes, bytes]]:
        """Like :meth:`recv` but each item is ``(virtio_net_hdr, frame)``.

        Raises:
            RingError: the back-end published a bad used entry.
            PeerClosedError, BackendChangedError: as :meth:`wait`.
        """
        out = self._backlog
        deadline = time.monotonic() + timeout
        while True:
            for q in self._rx:
                self._reap_rx(q, out)
            if out or timeout <= 0:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.wait(left)
        if max_frames is None or len(out) <= max_frames:
            self._backlog = []
            return out
        self._backlog = out[max_frames:]
        return out[:max_frames]

    def recv(self, timeout: float = 0.0, max_frames: int | None = None) -> list[bytes]:
        """Frames received so far on every receive queue (waiting up to ``timeout``
        seconds for the first one; at most ``max_frames``, the rest kept for the next
        call); receive buffers are reposted at once.

        Raises:
            RingError: the back-end published a bad used entry.
            PeerClosedError, BackendChangedError: as :meth:`wait`.
        """
        return [f for _, f in self.recv_packets(timeout, max_frames)]

    def wait(self, timeout: float) -> None:
        """Sleep until the back-end notifies any queue (or ``timeout`` seconds pass).

        Notifications are requested first (and if buffers are already used, this returns
        at once). While the back-end is away this is where a new one is taken up: the time
        is spent dialing (see the module docstring).

        Raises:
            PeerClosedError: the back-end went away and reconnecting is off, or none came
                back within ``reconnect_timeout``.
            BackendChangedError: a back-end came back without a bit the session needs.
        """
        if self._down_since is not None:
            self._check_up(timeout)
            return
        for q in self._tx:
            self._reap_tx(q)  # used transmit buffers are no reason to return at once
        for q in (*self._rx, *self._tx):
            if q.ring.enable_interrupts():
                # Something to take already; still look at the control socket, so that a
                # caller that is never idle notices an outage too.
                self._reactor.run_once(0)
                return
        self._reactor.run_once(max(0.0, timeout))

    # -- other requests -------------------------------------------------------------------------
    def announce(self, mac: str | bytes | None = None) -> None:
        """SEND_RARP: ask the back-end to announce ``mac`` (default: ours), as QEMU does after
        a migration.

        Raises:
            LocalProtocolError: the back-end did not offer the RARP protocol feature.
            PeerClosedError: the back-end is away.
        """
        if mac is None:
            mac = self.mac
        raw = bytes.fromhex(mac.replace(":", "")) if isinstance(mac, str) else bytes(mac)
        if len(raw) != 6:
            raise ValueError(f"MAC {raw.hex()} is not 6 bytes")
        if self._down_since is not None:
            raise PeerClosedError(f"{self.name}: no back-end to announce {raw.hex(':')} to")
        value = int.from_bytes(raw + b"\0\0", "little")
        self.client.send(FrontendRequest.SEND_RARP, P.U64Payload(value=value))

    # -- teardown -----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop every ring (GET_VRING_BASE) if the back-end is there, close the connection
        and free guest RAM.

        Idempotent; never raises for a back-end that already went away.
        """
        if self._closed:
            return
        self._closed = True
        c = self.client
        if self._started and self._down_since is None:
            for index in range(2 * self.queue_pairs):
                try:
                    c.stop_vring(index)
                except (VhostUserError, OSError):
                    break
        self._unwatch()
        self._reactor.close()
        if self._dialer is not None:
            self._dialer.close()
        for q in (*self._rx, *self._tx):
            if q.ring is not None:
                q.ring.close()
        self._rx.clear()
        self._tx.clear()
        c.close()
        if self._mem is not None:
            self._mem.clear()
            self._mem = None
        if self._buf is not None:
            self._buf = None
        if self.ram is not None:
            self.ram.close()
            self.ram = None

    def __repr__(self) -> str:
        kind = "packed" if self.packed else "split"
        return (f"<VirtioNetFrontend {self.name} {kind} pairs={self.queue_pairs} "
                f"hdr={self.hdr_len} mrg={self.mergeable}>")


# -- probe frames (vhost-user pktgen, tests) -----------------------------------------------

PROBE_MAGIC = 0x5648  # "VH"
PROBE_OFFSET = 42  # after Ethernet (14), IPv4 (20) and UDP (8) headers
PROBE = struct.Struct("!HQQ")
"""magic u16, sequence number u64, send time u64 (monotonic ns), big-endian."""
PROBE_MIN_FRAME = 60  # the Ethernet minimum without FCS; holds headers + probe
PROBE_UDP_DPORT = 9  # discard (RFC 863)


def probe_template(size: int, *, src_mac: bytes, dst_mac: bytes, flow: int = 0,
                   src_ip: bytes = bytes((10, 0, 0, 1)), dst_ip: bytes = bytes((10, 0, 0, 2)),
                   magic: int = PROBE_MAGIC) -> bytearray:
    """An Ethernet/IPv4/UDP frame of ``size`` bytes (no FCS) for probe ``flow``.

    Flow ``k`` differs in its IPv4 source (last two bytes plus k) and UDP source port
    (1024 + k), so receivers hashing on addresses spread flows over queues. The IPv4 header
    checksum is valid; the UDP checksum is 0 (none, RFC 768). The probe fields (magic,
    sequence, time) follow the UDP header; fill them with :func:`stamp_probe`.

    Raises:
        ValueError: ``size`` is outside 60..65535 or ``flow`` outside 0..65535.
    """
    if not PROBE_MIN_FRAME <= size <= 65535:
        raise ValueError(f"probe frame size {size} is outside {PROBE_MIN_FRAME}..65535")
    if not 0 <= flow <= 0xFFFF:
        raise ValueError(f"flow {flow} is outside 0..65535")
    ip_len = size - ETH_HLEN
    src = bytearray(src_ip)
    v = int.from_bytes(src[2:4], "big") + flow
    src[2:4] = (v & 0xFFFF).to_bytes(2, "big")
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, ip_len, 0, 0x4000, 64, 17, 0,
                               bytes(src), dst_ip))
    csum = ~_inet_sum16(ip) & 0xFFFF
    struct.pack_into("!H", ip, 10, csum)
    udp = struct.pack("!HHHH", 1024 + (flow & 0x7FFF), PROBE_UDP_DPORT, ip_len - 20, 0)
    frame = bytearray(size)
    frame[0:14] = dst_mac + src_mac + b"\x08\x00"
    frame[14:34] = ip
    frame[34:42] = udp
    PROBE.pack_into(frame, PROBE_OFFSET, magic, 0, 0)
    return frame


def _inet_sum16(data: bytes | bytearray) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(total)


def stamp_probe(frame: bytearray, seq: int, t_ns: int, magic: int = PROBE_MAGIC) -> None:
    """Write the probe fields of a frame made by :func:`probe_template`."""
    PROBE.pack_into(frame, PROBE_OFFSET, magic, seq, t_ns)


def read_probe(frame: bytes | bytearray | memoryview, magic: int = PROBE_MAGIC
               ) -> tuple[int, int] | None:
    """``(sequence, send time ns)`` of a probe frame carrying ``magic``, else None."""
    if len(frame) < PROBE_OFFSET + PROBE.size:
        return None
    m, seq, t = PROBE.unpack_from(frame, PROBE_OFFSET)
    if m != magic:
        return None
    return seq, t


class ProbeLedger:
    """Which probe sequence numbers came back, and which were lost to outages. No I/O.

    A sender numbers its probes 0, 1, 2 ...; :meth:`see` records each arrival (a second
    arrival of a number is a duplicate). When the back-end goes away, the frames in flight
    are lost with it: :meth:`close_window` writes off every number of an outage window
    that has not come back by then, so that they neither count as loss outside the outage
    nor hold a place in the sender's window of frames on their way. A written-off number
    that does come back afterwards (a split ring resumed, the frame was still queued) is
    taken back off the books.

    Attributes:
        received: distinct numbers seen.
        duplicates: arrivals of a number already seen.
        lost_in_windows: numbers in outage windows that have not come back.
        windows: the ``[lo, hi)`` ranges written off, in order.
    """

    __slots__ = ("_off", "_seen", "duplicates", "lost_in_windows", "received", "windows")

    def __init__(self) -> None:
        self._seen = bytearray()
        self._off = bytearray()
        self.received = 0
        self.duplicates = 0
        self.lost_in_windows = 0
        self.windows: list[tuple[int, int]] = []

    def _grow(self, n: int) -> None:
        if n > len(self._seen):
            extra = n - len(self._seen) + 4096
            self._seen.extend(bytes(extra))
            self._off.extend(bytes(extra))

    def see(self, seq: int) -> bool:
        """Record an arrival of ``seq``; True if it is the first one.

        Raises:
            ValueError: ``seq`` is negative.
        """
        if seq < 0:
            raise ValueError(f"probe sequence number {seq} is negative")
        if seq >= len(self._seen):
            self._grow(seq + 1)
        if self._seen[seq]:
            self.duplicates += 1
            return False
        self._seen[seq] = 1
        self.received += 1
        if self._off[seq]:
            self.lost_in_windows -= 1
        return True

    def close_window(self, lo: int, hi: int) -> int:
        """Write off the numbers in ``[lo, hi)`` not seen yet (an outage window); return
        how many were written off now (numbers of earlier windows are not counted twice).

        Raises:
            ValueError: ``lo`` is negative or above ``hi``.
        """
        if not 0 <= lo <= hi:
            raise ValueError(f"outage window {lo}..{hi} is not a range of sequence numbers")
        self._grow(hi)
        seen, off = self._seen, self._off
        n = 0
        for s in range(lo, hi):
            if not seen[s] and not off[s]:
                off[s] = 1
                n += 1
        self.lost_in_windows += n
        self.windows.append((lo, hi))
        return n

    def in_window(self, seq: int) -> bool:
        """True if ``seq`` was written off by an outage window (and has not come back)."""
        return 0 <= seq < len(self._off) and bool(self._off[seq]) and not self._seen[seq]

    def lost_outside(self, sent: int) -> int:
        """Numbers below ``sent`` that never came back and belong to no outage window."""
        return max(0, sent - self.received - self.lost_in_windows)

    def first_lost_outside(self, sent: int, limit: int = 10) -> list[int]:
        """Up to ``limit`` of those numbers, lowest first (for messages)."""
        self._grow(sent)
        out: list[int] = []
        seen, off = self._seen, self._off
        for s in range(sent):
            if not seen[s] and not off[s]:
                out.append(s)
                if len(out) >= limit:
                    break
        return out
