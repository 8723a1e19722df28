"""virtio-net device logic: header, config space, RX/TX data path, RARP. No I/O.

:class:`VirtioNetDevice` is the back-end of one virtio-net NIC. It consumes the guest's
transmit queues (virtio 1.2 §5.1.6.2), validates each frame and hands the frames of a burst
to a :class:`FrameSink` (the switch, or an echo), and delivers frames into the guest's
receive queues (§5.1.6.3/§5.1.6.4) with :meth:`VirtioNetDevice.deliver`. It speaks:

* the 12-byte ``virtio_net_hdr_mrg_rxbuf`` with VIRTIO_F_VERSION_1 or VIRTIO_NET_F_MRG_RXBUF
  and the 10-byte legacy ``virtio_net_hdr`` otherwise (§5.1.6);
* mergeable receive buffers (MRG_RXBUF: one frame over ``num_buffers`` chains, every chain
  but the last filled completely, §5.1.6.4);
* multiqueue (MQ: receiveqN = 2(N-1), transmitqN = 2(N-1)+1; as many pairs as the driver
  enables), MTU (config ``mtu`` and NET_SET_MTU), the config space (mac, status LINK_UP,
  max_virtqueue_pairs, mtu) and SEND_RARP.

Offloads (``offloads=True`` only; off by default). The device then offers CSUM, GUEST_CSUM,
HOST_TSO4/6, HOST_ECN, GUEST_TSO4/6 and GUEST_ECN. A frame's csum/gso fields travel
unchanged to a port that negotiated the matching GUEST_* bit. To a port that did not:

* a partial checksum (NEEDS_CSUM) is completed in software (the frame is then ordinary);
* a GSO frame is dropped and counted (``offload``): we never segment, and never deliver a
  frame the receiver did not agree to take; DATA_VALID is cleared.

So no port ever sees a header it did not negotiate, and nothing is silently corrupted.

Malformed traffic never raises: runt chains (shorter than the header plus an Ethernet
header), oversized frames (longer than MTU + 18 without GSO), offload fields the port did
not negotiate or that point outside the frame, and receive buffers smaller than a header
are dropped and counted in :class:`NetCounters` by reason. A header split over many
descriptors is legal (virtio 1.2 §2.6.4: "The device MUST NOT make assumptions about the
particular arrangement of descriptors") and is gathered; the ring engine bounds the number
of descriptors. A ring the guest broke is reported with ``QueueAccess.ring_broken``.

Frames handed to a sink are ``memoryview`` slices of guest memory, valid only during the
call: the sink copies them (one slice assignment per frame and destination) before the
device returns the transmit buffers to the guest.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from itertools import repeat
from operator import add
from typing import Any, Final, Protocol

from ..connection import events as ev
from ..errors import RingError
from ..protocol.enums import DeviceType, NetFeature, ProtocolFeature
from ..virtio.net import (
    DEFAULT_MTU as DEFAULT_MTU,
)
from ..virtio.net import (
    ETH_HLEN as ETH_HLEN,
)
from ..virtio.net import (
    ETH_MIN_MTU as ETH_MIN_MTU,
)
from ..virtio.net import (
    GSO_ECN as GSO_ECN,
)
from ..virtio.net import (
    GSO_NONE as GSO_NONE,
)
from ..virtio.net import (
    GSO_TCPV4 as GSO_TCPV4,
)
from ..virtio.net import (
    GSO_TCPV6 as GSO_TCPV6,
)
from ..virtio.net import (
    GSO_UDP as GSO_UDP,
)
from ..virtio.net import (
    HDR_F_DATA_VALID as HDR_F_DATA_VALID,
)
from ..virtio.net import (
    HDR_F_NEEDS_CSUM as HDR_F_NEEDS_CSUM,
)
from ..virtio.net import (
    HDR_F_RSC_INFO as HDR_F_RSC_INFO,
)
from ..virtio.net import (
    MAX_GSO_FRAME as MAX_GSO_FRAME,
)
from ..virtio.net import (  # the wire definitions live there; re-exported here
    NET_CONFIG as NET_CONFIG,
)
from ..virtio.net import (
    NET_HDR as NET_HDR,
)
from ..virtio.net import (
    NET_HDR_LEGACY_LEN as NET_HDR_LEGACY_LEN,
)
from ..virtio.net import (
    NET_HDR_LEN as NET_HDR_LEN,
)
from ..virtio.net import (
    NET_HDR_MRG as NET_HDR_MRG,
)
from ..virtio.net import (
    VIRTIO_NET_S_LINK_UP as VIRTIO_NET_S_LINK_UP,
)
from ..virtio.net import (
    VLAN_HLEN as VLAN_HLEN,
)
from ..virtio.net import (
    NetConfig as NetConfig,
)
from ..virtio.net import (
    format_mac as format_mac,
)
from ..virtio.net import (
    net_header_len as net_header_len,
)
from ..virtio.net import (
    parse_mac as parse_mac,
)
from ..virtq.burst import BurstResult
from ..virtq.chain import DESC_F_WRITE, Chain
from ..virtq.packed import PackedDeviceRing
from ..virtq.split import SplitDeviceRing
from .base import Device, QueueAccess

#: Device features offered with ``offloads=True`` (virtio 1.2 §5.1.3; the GUEST_* bits
#: require GUEST_CSUM and the HOST_* ones CSUM, §5.1.3.1).
OFFLOAD_FEATURES: Final = int(
    NetFeature.CSUM | NetFeature.GUEST_CSUM
    | NetFeature.HOST_TSO4 | NetFeature.HOST_TSO6 | NetFeature.HOST_ECN
    | NetFeature.GUEST_TSO4 | NetFeature.GUEST_TSO6 | NetFeature.GUEST_ECN
)

#: Why frames are dropped; every counter starts at zero so scripts see every key.
DROP_REASONS: Final = (
    "runt",             # TX chain shorter than the net header + an Ethernet header
    "oversize",         # TX frame longer than MTU + 18 (or 64 KiB + 18 with GSO)
    "bad_header",       # offload fields not negotiated, unknown or outside the frame
    "queue_disabled",   # TX on a started but disabled queue (vhost-user.rst: no effects)
    "no_rx_buffer",     # the receiving queue had no free buffers (receiver too slow)
    "rx_down",          # no receiving queue started and enabled on the destination
    "rx_buffer_small",  # frame larger than the buffers a non-mergeable receiver posts
    "offload",          # GSO frame to a port that did not negotiate that offload
    "tap_full",         # the kernel tap queue was full (EAGAIN)
    "ring_broken",      # frames lost because the guest broke a ring mid-burst
)


# -- frames ------------------------------------------------------------------------------


def build_rarp(mac: bytes) -> bytes:
    """The RARP announcement QEMU sends for a migrated NIC (``announce_self_create``).

    Broadcast, EtherType 0x8035, hardware type Ethernet, protocol IPv4, opcode 3 (reverse
    request), sender and target hardware address ``mac``, IP addresses zero, padded to the
    60-byte Ethernet minimum.

    Raises:
        ValueError: ``mac`` is not 6 bytes.
    """
    if len(mac) != 6:
        raise ValueError(f"RARP: MAC {mac.hex()} is not 6 bytes")
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 3, mac, bytes(4), mac, bytes(4))
    frame = b"\xff" * 6 + mac + b"\x80\x35" + body
    return frame.ljust(60, b"\0")


def inet_sum(data: memoryview | bytes | bytearray) -> int:
    """The 16-bit ones' complement sum of ``data`` as big-endian words (RFC 1071)."""
    mv = memoryview(data).cast("B")
    n = len(mv)
    total = 0
    if n & 1:
        total = mv[n - 1]  # the odd byte is the high byte of a big-endian word: low in LE
        mv = mv[: n - 1]
    if mv:
        # Summing little-endian words and swapping the folded result gives the big-endian
        # sum (RFC 1071 §2(B): the sum is byte-order independent).
        total += sum(mv.cast("H"))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ((total & 0xFF) << 8) | (total >> 8)


def complete_checksum(frame: bytearray | memoryview, csum_start: int, csum_offset: int) -> None:
    """Finish a partial checksum in place (VIRTIO_NET_HDR_F_NEEDS_CSUM, virtio 1.2 §5.1.6.2).

    The sender left the pseudo-header sum in the checksum field; the checksum is the
    complement of the ones' complement sum from ``csum_start`` to the end, stored at
    ``csum_start + csum_offset`` (a zero result is sent as 0xFFFF, valid for TCP and
    required for UDP).

    Raises:
        ValueError: the checksum field is not inside the frame.
    """
    pos = csum_start + csum_offset
    if csum_start < 0 or csum_offset < 0 or pos + 2 > len(frame):
        raise ValueError(
            f"checksum at {csum_start}+{csum_offset} is outside the {len(frame)}-byte frame"
        )
    mv = memoryview(frame).cast("B")
    c = ~inet_sum(mv[csum_start:]) & 0xFFFF
    struct.pack_into("!H", mv, pos, c or 0xFFFF)


def flow_hash(frame: memoryview | bytes | bytearray) -> int:
    """A hash of a frame's flow, for picking its receive queue: the IPv4 or IPv6 source
    and destination addresses (else the MAC addresses) XOR-folded to 16 bits.

    Symmetric (both directions of a conversation hash alike) and spreading neighbouring
    addresses evenly, so ``hash % queues`` uses every queue; a CRC's low bits would not
    (CRCs are linear: flows differing in one byte often share the low bit). Never reads
    past the frame.
    """
    mv = memoryview(frame)
    n = len(mv)
    et = mv[12:14].tobytes() if n >= 14 else b""
    if et == b"\x08\x00" and n >= 34:
        x = int.from_bytes(mv[26:30], "big") ^ int.from_bytes(mv[30:34], "big")
    elif et == b"\x86\xdd" and n >= 54:
        x = int.from_bytes(mv[22:38], "big") ^ int.from_bytes(mv[38:54], "big")
        x ^= x >> 64
        x ^= x >> 32
    else:
        x = int.from_bytes(mv[0:6], "big") ^ int.from_bytes(mv[6:12], "big")
        x ^= x >> 32
    x ^= x >> 16
    return (x ^ (x >> 8)) & 0xFFFF


# -- counters ------------------------------------------------------------------------------


class NetCounters:
    """Per-port counters, from the port's point of view.

    ``rx_*``: frames the attached driver transmitted and the switch accepted; ``tx_*``:
    frames delivered to the attached driver; ``drops``: frames lost, by reason (see
    :data:`DROP_REASONS`); ``ring_errors``: rings the guest broke; ``last_error``: the
    newest reason.
    """

    __slots__ = ("drops", "last_error", "ring_errors", "rx_bytes", "rx_frames", "tx_bytes",
                 "tx_frames")

    def __init__(self) -> None:
        self.rx_frames = 0
        self.rx_bytes = 0
        self.tx_frames = 0
        self.tx_bytes = 0
        self.drops: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self.ring_errors = 0
        self.last_error: str | None = None

    def drop(self, reason: str, n: int = 1) -> None:
        """Count ``n`` frames dropped for ``reason``."""
        self.drops[reason] = self.drops.get(reason, 0) + n

    @property
    def dropped(self) -> int:
        """All drops together."""
        return sum(self.drops.values())

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready snapshot."""
        return {
            "rx_frames": self.rx_frames,
            "rx_bytes": self.rx_bytes,
            "tx_frames": self.tx_frames,
            "tx_bytes": self.tx_bytes,
            "drops": dict(self.drops),
            "dropped": self.dropped,
            "ring_errors": self.ring_errors,
            "last_error": self.last_error,
        }


# -- the device -----------------------------------------------------------------------------


class FrameSink(Protocol):
    """Where a :class:`VirtioNetDevice` sends what its driver transmits."""

    def on_frames(
        self,
        dev: VirtioNetDevice,
        pair: int,
        frames: list[memoryview],
        hdrs: list[bytes | None] | None,
    ) -> None:
        """Frames transmitted on queue pair ``pair``; copy them before returning.

        ``hdrs`` is None when no frame carries offload fields; else one entry per frame:
        None, or the 10-byte virtio_net_hdr (without num_buffers) to pass on.
        """
        ...

    def on_rarp(self, dev: VirtioNetDevice, mac: bytes) -> None:
        """SEND_RARP: announce ``mac`` on behalf of the driver."""
        ...

    def commit(self, dev: VirtioNetDevice) -> None:
        """The transmit buffers of the frames handed over since the last commit have been
        returned to ``dev``'s driver: publish what was delivered with ``defer=True``.

        Publishing a copy only after its source buffer is back is what keeps a loop of
        frames (A -> switch -> B -> A) from losing them at a full transmit ring: a frame
        never reaches its receiver while its sender still counts the buffer as busy.
        """
        ...


class EchoSink:
    """A :class:`FrameSink` that sends every frame back to its sender, unchanged, on the
    same queue pair (the seed's test server)."""

    def on_frames(
        self,
        dev: VirtioNetDevice,
        pair: int,
        frames: list[memoryview],
        hdrs: list[bytes | None] | None,
    ) -> None:
        """Reflect the frames (see :class:`FrameSink`); published at :meth:`commit`."""
        dev.deliver(frames, hdrs, pair, defer=True)

    def on_rarp(self, dev: VirtioNetDevice, mac: bytes) -> None:
        """Reflect the announcement too."""
        dev.deliver([memoryview(build_rarp(mac))], None, 0)

    def commit(self, dev: VirtioNetDevice) -> None:
        """Publish the reflected frames (after the transmit buffers went back)."""
        dev.publish_rx()


class DropSink:
    """A :class:`FrameSink` that discards everything (frames are still counted as rx)."""

    def on_frames(
        self,
        dev: VirtioNetDevice,
        pair: int,
        frames: list[memoryview],
        hdrs: list[bytes | None] | None,
    ) -> None:
        """Discard."""

    def on_rarp(self, dev: VirtioNetDevice, mac: bytes) -> None:
        """Discard."""

    def commit(self, dev: VirtioNetDevice) -> None:
        """Nothing was delivered."""


_HDR_UNPACK = NET_HDR.unpack_from
_DESC_UNPACK = struct.Struct("<QIHH").unpack_from  # virtio 1.2 2.7.5 struct virtq_desc
_NO_REGION: tuple[int, int, memoryview, int] = (1, 0, memoryview(b""), 0)  # matches nothing
#: The rings the compiled engine takes (their ``engine_view``).
_ENGINE_RINGS: Final = (SplitDeviceRing, PackedDeviceRing)
_MRG_PACK = NET_HDR_MRG.pack_into
_LEGACY_PACK = NET_HDR.pack_into
_NUM_BUFFERS = struct.Struct("<H")
_GSO_FEATURE = {
    GSO_TCPV4: (NetFeature.HOST_TSO4, NetFeature.GUEST_TSO4),
    GSO_TCPV6: (NetFeature.HOST_TSO6, NetFeature.GUEST_TSO6),
}
_MAX_QUEUE_SIZE = 32768


#: See ``VirtioNetDevice.accelerator``.
Accelerator = Callable[["VirtioNetDevice", int, Any, int], tuple[int, bool]]


class VirtioNetDevice(Device):
    """The back-end of one virtio-net NIC (see the module docstring).

    Args:
        sink: where transmitted frames go (default: discard them).
        mac: the config-space MAC address.
        mtu: the config-space MTU (VIRTIO_NET_F_MTU); NET_SET_MTU may change it.
        queue_pairs: the most queue pairs a driver may use (MQ when more than one).
        offloads: offer checksum/TSO offloads (see the module docstring).
        offer_config: offer the CONFIG protocol feature so front-ends can GET_CONFIG
            (our :class:`~vhostuser.frontends.net.VirtioNetFrontend` reads the MAC and
            link status through it; QEMU's net front-end does not use it, so it is off by
            default).
        counters: the port counters to add to (shared across sessions of one port).
        name: used in log and error messages.

    Raises:
        ValueError: a bad MAC, MTU or queue pair count (the message names it).
    """

    device_type = DeviceType.NET

    def __init__(
        self,
        sink: FrameSink | None = None,
        *,
        mac: str | bytes = "52:54:00:00:00:01",
        mtu: int = DEFAULT_MTU,
        queue_pairs: int = 1,
        offloads: bool = False,
        offer_config: bool = False,
        counters: NetCounters | None = None,
        name: str = "net",
    ) -> None:
        if not 1 <= queue_pairs <= 128:
            raise ValueError(f"queue_pairs {queue_pairs} is outside 1..128")
        if not ETH_MIN_MTU <= mtu <= 65535:
            raise ValueError(f"mtu {mtu} is outside {ETH_MIN_MTU}..65535")
        self.mac = parse_mac(mac) if isinstance(mac, str) else bytes(mac)
        if len(self.mac) != 6:
            raise ValueError(f"MAC {self.mac.hex()} is not 6 bytes")
        self.sink: FrameSink = sink if sink is not None else DropSink()
        self.name = name
        self.queue_pairs = queue_pairs
        self.num_queues = 2 * queue_pairs
        self.offer_config = offer_config
        self.offloads = offloads
        self.virtio_features = int(
            NetFeature.MAC | NetFeature.STATUS | NetFeature.MRG_RXBUF | NetFeature.MTU
            | (NetFeature.MQ if queue_pairs > 1 else 0)
            | (OFFLOAD_FEATURES if offloads else 0)
        )
        self.protocol_features = int(ProtocolFeature.RARP | ProtocolFeature.MTU
                                     | ProtocolFeature.MQ)
        self.counters = counters if counters is not None else NetCounters()
        self.mtu = mtu
        self.access: QueueAccess | None = None
        self.features = 0
        self.hdr_len = NET_HDR_LEGACY_LEN
        self.mergeable = False
        self._set_features(0)
        # Receive side: per pair, the chains popped but not used yet and the ring object
        # they came from (a new engine after a restart means they are gone).
        self._carry: list[list[Chain]] = [[] for _ in range(queue_pairs)]
        self._carry_ring: list[Any] = [None] * queue_pairs
        self._rx_pairs: list[int] = []  # started and enabled receive pairs, ascending
        self._started: set[int] = set()
        self._enabled: set[int] = set()
        self._unpublished: list[int] = []  # receive queues holding deferred used buffers
        self._frames: list[memoryview] = []
        self._hdrs: list[bytes | None] = []
        self._with_hdr = False
        self._nbytes = 0
        self.fast_path = True
        """Use the fast paths (False: always the ring engine; for tests)."""
        self._regions: list[tuple[int, int, memoryview, int]] = []
        self._last_region: tuple[int, int, memoryview, int] = _NO_REGION
        self._mem: Any = None  # the GuestMemory of the current table
        self._zero_done = [(h, 0) for h in range(256)]
        self.accelerator: Accelerator | None = None
        """A compiled transmit burst (set by the switch when the compiled engine runs):
        ``accelerator(dev, index, ring, budget)`` returns ``(taken, complete)``: the
        chains it took, and False when it stopped before a chain the Python engine must
        take (which then carries on in the same burst)."""

    # -- negotiation --------------------------------------------------------------------
    def _set_features(self, features: int) -> None:
        self.features = features
        self.hdr_len = net_header_len(features)
        self.mergeable = bool(features & NetFeature.MRG_RXBUF)
        self.guest_csum = bool(features & NetFeature.GUEST_CSUM)
        self.host_csum = bool(features & NetFeature.CSUM)
        # The header a plain frame gets on receive: zeros, num_buffers = 1 (virtio 1.2
        # §5.1.6.4: "the device MUST set num_buffers to 1" without MRG_RXBUF, and a frame
        # in one buffer has num_buffers 1 with it).
        self._plain_hdr = bytes(10) + b"\x01\x00" if self.hdr_len == NET_HDR_LEN else bytes(10)
        self._max_frame = self.mtu + ETH_HLEN + VLAN_HLEN

    def on_features(self, features: int) -> None:
        """SET_FEATURES: header size, mergeable buffers, offloads."""
        self._set_features(features)

    def config_space(self) -> bytes:
        """mac, status (LINK_UP), max_virtqueue_pairs, mtu (virtio 1.2 §5.1.4)."""
        return NET_CONFIG.pack(self.mac, VIRTIO_NET_S_LINK_UP, self.queue_pairs, self.mtu)

    def consumes(self, index: int) -> bool:
        """Transmit queues (odd indices) are consumed by bursts; receive queues never are:
        their buffers wait for frames (:meth:`deliver`)."""
        return index % 2 == 1

    def attach(self, queues: QueueAccess) -> None:
        """Remember the session's rings."""
        self.access = queues

    def on_memory(self, mem: Any) -> None:
        """The memory table changes: give back receive chains we hold (their engines are
        about to be rebuilt past them) as zero-length used buffers, and note the regions
        for the fast paths."""
        self._release_carry()
        spans = getattr(mem, "spans", None)
        if spans is None:
            spans = [(r.guest_phys_addr, r.gpa_end, r.buf, r.mmap_offset)
                     for r in getattr(mem, "regions", ())]
        self._regions = list(spans)
        self._last_region = self._regions[0] if self._regions else _NO_REGION
        # Whether writes are logged is looked up at every burst (_marker), never
        # captured here: logging may be switched on at any time.
        self._mem = mem

    def _marker(self) -> Callable[[int, int], None] | None:
        """``mem.mark_dirty`` while writes must be reported (dirty log or observer on)."""
        mem = self._mem
        if mem is None or not getattr(mem, "logging", True):
            return None
        mark: Callable[[int, int], None] = mem.mark_dirty
        return mark

    def _compiled_log(self) -> tuple[bool, Any]:
        """For the compiled engine: (usable, the dirty log bitmap or None). Not usable
        while an observer hook is installed (it must see every write, from Python)."""
        mem = self._mem
        if mem is None:
            return True, None
        engine_memory = getattr(mem, "engine_memory", None)
        got = engine_memory() if engine_memory is not None else None
        if got is None:
            return False, None
        return True, got[1]

    def on_event(self, event: ev.Event) -> None:
        """Track ring states (for receive-queue selection), MTU and SEND_RARP."""
        if isinstance(event, ev.VringStarted):
            self._started.add(event.index)
            self._ring_changed(event.index)
        elif isinstance(event, ev.VringStopped):
            self._started.discard(event.index)
            self._ring_changed(event.index)
        elif isinstance(event, ev.VringEnabled):
            if event.enabled:
                self._enabled.add(event.index)
            else:
                self._enabled.discard(event.index)
            self._ring_changed(event.index)
        elif isinstance(event, ev.VringBroken):
            self.counters.ring_errors += 1
            self.counters.last_error = f"ring {event.index}: {event.reason}"
            self._started.discard(event.index)
            self._ring_changed(event.index)
        elif isinstance(event, ev.MtuSet):
            # vhost-user.rst NET_SET_MTU: the front-end tells the back-end the MTU the
            # guest was given; the core checked 68..65535.
            self.mtu = event.mtu
            self._set_features(self.features)
        elif isinstance(event, ev.RarpRequested):
            self.sink.on_rarp(self, bytes(event.mac))
        elif isinstance(event, ev.DeviceReset):
            self._started.clear()
            self._enabled.clear()
            self._rx_pairs = []
            for c in self._carry:
                c.clear()
            self._set_features(0)

    def _ring_changed(self, index: int) -> None:
        if index % 2 == 0:
            pair = index // 2
            self._carry[pair].clear()  # their engine is gone (or going)
            self._carry_ring[pair] = None
            self._rx_pairs = [
                p for p in range(self.queue_pairs)
                if 2 * p in self._started and 2 * p in self._enabled
            ]

    @property
    def rx_pairs(self) -> list[int]:
        """Receive queue pairs now started and enabled."""
        return list(self._rx_pairs)

    @property
    def link_up(self) -> bool:
        """True when some receive queue can take frames."""
        return bool(self._rx_pairs)

    # -- transmit (guest -> us) ---------------------------------------------------------
    def handle_burst(
        self, index: int, chains: Sequence[Any], enabled: bool
    ) -> list[tuple[int, int]]:
        """Take a burst of transmitted chains from queue ``index``; forward their frames.

        Every chain is completed with length 0 (the device writes nothing into transmit
        buffers). Frames of a disabled queue are dropped (vhost-user.rst: "process the ring
        without side effects"). Never raises for guest data (the ring engine validated the
        chains; frames are validated here and dropped with a counted reason).
        """
        try:
            done = [self._zero_done[c.head] for c in chains]
        except IndexError:  # a queue larger than 256: widen the table once
            self._zero_done = [(h, 0) for h in range(_MAX_QUEUE_SIZE)]
            done = [self._zero_done[c.head] for c in chains]
        if index & 1 == 0 or not chains:
            return done
        if not enabled:
            self.counters.drop("queue_disabled", len(chains))
            return done
        hl = self.hdr_len
        take = self._take_frame
        for c in chains:
            r = c.readable
            nr = len(r)
            if nr == 1:
                take(r[0], None)
            elif nr == 2 and len(r[0]) == hl:
                # The header alone in its own descriptor (legacy drivers without
                # ANY_LAYOUT, virtio 1.2 §5.1.6.2 "Legacy Interface: Message Framing").
                take(r[0], r[1])
            elif c.readable_len < hl + ETH_HLEN:
                self.counters.drop("runt")
            else:
                # Any other layout: gather (virtio 1.2 §2.6.4: no layout may be assumed).
                take(memoryview(c.read_bytes()), None)
        self._flush_frames(index)
        return done

    def _take_frame(self, seg: memoryview, frame: memoryview | None) -> None:
        """Validate one transmitted frame and stage it for the sink (or count a drop).

        ``seg`` starts with the header; the frame follows in ``seg`` or, if given, is
        ``frame``.
        """
        hl = self.hdr_len
        counters = self.counters
        if frame is None:
            ln = len(seg)
            if ln < hl + ETH_HLEN:
                counters.drop("runt")
                return
            flen = ln - hl
        else:
            flen = len(frame)
            if flen < ETH_HLEN:
                counters.drop("runt")
                return
        if (seg[0] & HDR_F_NEEDS_CSUM) | seg[1]:
            hdr = self._check_tx_header(seg, flen) if self.offloads else None
            if hdr is None:
                counters.drop("bad_header")
                return
            if (hdr[1] == GSO_NONE and flen > self._max_frame) or flen > MAX_GSO_FRAME:
                counters.drop("oversize")
                return
            if not self._with_hdr:
                self._with_hdr = True
                self._hdrs.extend([None] * len(self._frames))
            self._hdrs.append(hdr)
        else:
            if flen > self._max_frame:
                counters.drop("oversize")
                return
            if self._with_hdr:
                self._hdrs.append(None)
        self._frames.append(seg[hl:] if frame is None else frame)
        self._nbytes += flen

    def _flush_frames(self, index: int) -> None:
        """Hand the staged frames to the sink (which copies them) and reset the stage."""
        frames = self._frames
        if not frames:
            return
        counters = self.counters
        counters.rx_frames += len(frames)
        counters.rx_bytes += self._nbytes
        try:
            self.sink.on_frames(self, index >> 1, frames,
                                self._hdrs if self._with_hdr else None)
        finally:
            frames.clear()
            self._hdrs.clear()
            self._with_hdr = False
            self._nbytes = 0

    def _check_tx_header(self, seg: memoryview, flen: int) -> bytes | None:
        """Validate a transmitted header with offload fields; the 10 bytes to pass on, or
        None to drop the frame.

        virtio 1.2 §5.1.6.2.1: NEEDS_CSUM only with CSUM and with csum_start + csum_offset
        + 2 inside the frame; gso_type only with the matching HOST_* feature (ECN with
        HOST_ECN), a non-zero gso_size and NEEDS_CSUM. DATA_VALID and RSC_INFO mean
        nothing on transmit and are cleared.
        """
        flags, gso, hlen, gso_size, cstart, coff = _HDR_UNPACK(seg, 0)
        feats = self.features
        flags &= HDR_F_NEEDS_CSUM
        if flags and (not feats & NetFeature.CSUM or cstart + coff + 2 > flen):
            return None
        if gso != GSO_NONE:
            need = _GSO_FEATURE.get(gso & ~GSO_ECN)
            if need is None or not feats & need[0]:
                return None
            if gso & GSO_ECN and not feats & NetFeature.HOST_ECN:
                return None
            if gso_size == 0 or not flags:
                return None
        return NET_HDR.pack(flags, gso, hlen, gso_size, cstart, coff)

    # -- the transmit burst -----------------------------------------------------------------
    def run_queue(self, index: int, ring: Any, budget: int, enabled: bool) -> BurstResult:
        """One transmit burst (called by the queue's runner, which decides when): take up
        to ``budget`` chains, forward their frames, complete them, then let the sink
        publish what it delivered (:meth:`FrameSink.commit`).

        With an :attr:`accelerator` (the compiled engine, set by the switch) split and
        packed rings go through it first; split rings then go through :meth:`_tx_fast`
        (one-descriptor chains in one memory region, the layout QEMU, Linux and DPDK use);
        everything else goes through the ring engine (:meth:`Device.run_queue`), which
        validates every case of docs/security.md.
        Guest faults come back in the result; nothing is raised for guest data.
        """
        try:
            taken = 0
            complete = False
            if (self.fast_path and enabled and index & 1 and type(ring) in _ENGINE_RINGS
                    and ring.broken is None):
                accel = self.accelerator
                if accel is not None:
                    taken, complete = accel(self, index, ring, budget)
                if not complete and ring.broken is None:
                    n = self._tx_fast(index, ring, budget - taken)
                    if n >= 0:
                        taken += n
                        complete = taken >= budget or not ring.pending()
            if complete or ring.broken is not None:
                return BurstResult(taken, taken, bool(taken) and ring.should_notify(),
                                   ring.broken)
            if not taken:
                return super().run_queue(index, ring, budget, enabled)
            # A fast path stopped before a chain it leaves to the ring engine: carry on in
            # the same burst (one notification decision for the whole burst, whichever
            # engine took which chain).
            notify = ring.should_notify()  # before the ring engine may break the ring
            rest = super().run_queue(index, ring, budget - taken, enabled)
            return BurstResult(taken + rest.popped, taken + rest.pushed,
                               notify or rest.notify, rest.broken)
        finally:
            # The transmit buffers are back with the driver: now the copies may appear.
            self.sink.commit(self)

    # -- fast paths (split and packed rings) -------------------------------------------
    #
    # These use the rings' in-place API (peek_simple, complete_in_place). They handle only
    # the common layout - a buffer of ONE descriptor with no NEXT/INDIRECT flag (and WRITE
    # only on receive), lying inside one memory region - and stop at the first buffer that
    # is anything else, leaving it (and everything after) to the ring engine, which
    # validates every docs/security.md case and breaks the ring where needed. Guarantees kept:
    # the avail side is read once per burst and never trusted beyond the queue size; each
    # descriptor is read once into locals, checked, then used; the ring publishes the used
    # entries last; the bytes written into buffers are reported with mark_dirty.

    def _region(self, addr: int, ln: int) -> tuple[int, int, memoryview, int] | None:
        """The region holding ``addr``..``addr+ln`` (remembered for the next lookup)."""
        for r in self._regions:
            if r[0] <= addr and addr + ln <= r[1]:
                self._last_region = r
                return r
        return None

    def _tx_fast(self, index: int, ring: SplitDeviceRing | PackedDeviceRing,
                 budget: int) -> int:
        """Transmit fast path; chains completed, or -1 when the engine must take the next
        chain (see the comment above)."""
        run = ring.peek_run(budget, 0)
        if run is None:
            return -1
        ids, addrs, lens = run
        n = len(ids)
        if not n:
            return 0
        g0, g1, rbuf, mo = self._last_region
        hl = self.hdr_len
        minlen = hl + ETH_HLEN
        maxlen = hl + self._max_frame
        frames = self._frames
        taken = 0
        try:
            longest = max(lens)
            if (minlen <= min(lens) and longest <= maxlen and g0 <= min(addrs)
                    and max(addrs) + longest <= g1 and not self._with_hdr):
                # The whole burst lies in the last region and every length is plausible
                # (checked once for the burst): per frame only the header's offload bits
                # are left to look at. The first frame with any goes the general way.
                start = len(frames)
                append = frames.append
                d = mo - g0
                for addr, ln in zip(addrs, lens, strict=True):
                    o = addr + d
                    if rbuf[o] & HDR_F_NEEDS_CSUM or rbuf[o + 1]:
                        break
                    append(rbuf[o + hl : o + ln])
                taken = len(frames) - start
                self._nbytes += (sum(lens) if taken == n else sum(lens[:taken])) - taken * hl
            if taken < n:
                taken = self._tx_each(ids, addrs, lens, taken)
            if taken:
                self._flush_frames(index)
        finally:
            if taken:
                ring.complete_run(ids, addrs, None, taken)
        return taken if taken else -1

    def _tx_each(self, ids: list[int], addrs: list[int], lens: list[int], k: int) -> int:
        """The transmit fast path frame by frame from ``k`` on (region lookups, offload
        fields, runts, oversize frames); how many chains are taken in all."""
        g0, g1, rbuf, mo = self._last_region
        hl = self.hdr_len
        minlen = hl + ETH_HLEN
        maxlen = hl + self._max_frame
        frames = self._frames
        hdrs = self._hdrs
        slow = self._take_frame
        nbytes = 0
        n = len(ids)
        while k < n:
            addr = addrs[k]
            ln = lens[k]
            if not (g0 <= addr and addr + ln <= g1):
                r = self._region(addr, ln)
                if r is None:
                    break  # unmapped or across regions: the engine decides
                g0, g1, rbuf, mo = r
            o = mo + addr - g0
            k += 1
            if minlen <= ln <= maxlen and not rbuf[o] & HDR_F_NEEDS_CSUM and not rbuf[o + 1]:
                frames.append(rbuf[o + hl : o + ln])
                nbytes += ln - hl
                if self._with_hdr:
                    hdrs.append(None)
            else:  # runt, oversize or offload fields: validated (and counted) there
                slow(rbuf[o : o + ln], None)
        self._nbytes += nbytes
        return k

    # -- receive (us -> guest) --------------------------------------------------------------
    def deliver(
        self,
        frames: Sequence[memoryview | bytes | bytearray],
        hdrs: Sequence[bytes | None] | None = None,
        pair: int = 0,
        *,
        defer: bool = False,
    ) -> int:
        """Copy ``frames`` into the driver's receive buffers; return how many were delivered.

        With ``defer`` the used buffers are written but not published (nor notified)
        until :meth:`publish_rx`: a switch publishes them once the frames' transmit
        buffers are back with their sender (see :meth:`FrameSink.commit`).

        ``hdrs`` (optional, one per frame) carries offload fields from the sending port:
        None or a 10-byte virtio_net_hdr. With several receive pairs in use, each frame
        goes to a pair chosen by a hash of its addresses (so flows keep their order);
        ``pair`` is the hint used with one. Used buffers are published and the driver is
        notified once per call. Frames that cannot be delivered are counted as drops;
        nothing is raised for guest data (a broken receive ring is reported to the
        session).
        """
        pairs = self._rx_pairs
        if not pairs:
            if frames:
                self.counters.drop("rx_down", len(frames))
            return 0
        if len(pairs) == 1:
            return self._deliver_pair(pairs[0], frames, hdrs, defer)
        # Several pairs: spread flows over them by a hash of their addresses, keeping each
        # flow on one queue (so its frames stay in order).
        n = len(pairs)
        buckets: list[list[int]] = [[] for _ in range(n)]
        for i, f in enumerate(frames):
            buckets[flow_hash(f) % n].append(i)
        total = 0
        for k, idxs in enumerate(buckets):
            if idxs:
                sub_f = [frames[i] for i in idxs]
                sub_h = None if hdrs is None else [hdrs[i] for i in idxs]
                total += self._deliver_pair(pairs[k], sub_f, sub_h, defer)
        return total

    # -- what the compiled engine needs ------------------------------------------------------
    def compiled_tx_source(self, ring: SplitDeviceRing | PackedDeviceRing
                           ) -> tuple[Any, ...] | None:
        """The transmit side of ``vhostuser._fastpath.forward``: the ring's engine view,
        the regions, the header and frame length limits and the dirty log; None while the
        compiled engine may not run here."""
        usable, log = self._compiled_log()
        if not usable:
            return None
        hl = self.hdr_len
        return (ring.engine_view, self._regions, hl, hl + ETH_HLEN, hl + self._max_frame, log)

    def compiled_rx_target(self) -> tuple[Any, ...] | None:
        """The receive side of ``forward`` for this NIC, or None when the compiled engine
        cannot deliver here (the Python engine then does): not exactly one receive pair
        up, receive chains held back, or an observer of writes."""
        pairs = self._rx_pairs
        usable, log = self._compiled_log()
        if len(pairs) != 1 or not usable:
            return None
        pair = pairs[0]
        ring = self._rx_ring(pair)
        if type(ring) not in _ENGINE_RINGS or self._carry[pair]:
            return None
        return (ring.engine_view, self._regions, self._plain_hdr, log)

    def compiled_delivered(self, frames: int, nbytes: int, no_buffer: int) -> None:
        """Count what ``forward`` delivered here and queue its publication."""
        counters = self.counters
        counters.tx_frames += frames
        counters.tx_bytes += nbytes
        if no_buffer:
            counters.drop("no_rx_buffer", no_buffer)
        if frames:
            idx = 2 * self._rx_pairs[0]
            if idx not in self._unpublished:
                self._unpublished.append(idx)

    def publish_rx(self) -> None:
        """Publish every receive queue's used buffers held back by ``deliver(defer=True)``
        and notify the driver where its suppression allows (once per queue)."""
        pending = self._unpublished
        access = self.access
        if not pending:
            return
        try:
            if access is None:
                return
            for idx in pending:
                ring = access.ring(idx)
                if ring is None:
                    continue
                ring.publish()
                if ring.should_notify():
                    access.notify(idx)
        finally:
            pending.clear()

    def _rx_ring(self, pair: int) -> Any:
        access = self.access
        if access is None:
            return None
        idx = 2 * pair
        ring = access.ring(idx)
        if ring is None or not access.enabled(idx):
            return None
        if ring is not self._carry_ring[pair]:
            self._carry[pair].clear()
            self._carry_ring[pair] = ring
        return ring

    def _deliver_pair(
        self,
        pair: int,
        frames: Sequence[memoryview | bytes | bytearray],
        hdrs: Sequence[bytes | None] | None,
        defer: bool = False,
    ) -> int:
        counters = self.counters
        nframes = len(frames)
        ring = self._rx_ring(pair)
        if ring is None:
            counters.drop("rx_down", nframes)
            return 0
        access = self.access
        assert access is not None  # _rx_ring returned a ring
        idx = 2 * pair
        carry = self._carry[pair]
        hl = self.hdr_len
        plain = self._plain_hdr
        mergeable = self.mergeable
        used: list[tuple[int, int]] = []
        delivered = 0
        nbytes = 0
        pos = 0  # next unused chain in carry
        i = 0
        if self.fast_path and not carry and type(ring) in _ENGINE_RINGS:
            i, nbytes = self._rx_fast(ring, frames, hdrs, defer)
            delivered = i
        try:
            while i < nframes:
                frame = frames[i]
                hdr = hdrs[i] if hdrs is not None else None
                if hdr is not None:
                    prepared = self._prepare_offload(frame, hdr)
                    if prepared is None:
                        i += 1
                        continue
                    frame, hdr = prepared
                n = len(frame)
                need = hl + n
                if pos == len(carry):
                    if pos:
                        carry.clear()
                        pos = 0
                    carry.extend(ring.pop(nframes - i))
                    if not carry:
                        counters.drop("no_rx_buffer", nframes - i)
                        break
                chain = carry[pos]
                wl = chain.writable_len
                if wl >= need:
                    pos += 1
                    w0 = chain.writable[0]
                    if hdr is None and len(w0) >= need:
                        # The common case: one slice copy of the frame.
                        w0[:hl] = plain
                        w0[hl:need] = frame
                    else:
                        self._write_frame(chain, frame, hdr)
                    used.append((chain.head, need))
                elif wl < hl:
                    # virtio 1.2 §5.1.6.3.1: every receive buffer holds at least a header.
                    # This one never can: give it back empty and try the next.
                    counters.last_error = (
                        f"{self.name}: receive buffer {chain.head} of {wl} bytes is smaller "
                        f"than the {hl}-byte header"
                    )
                    pos += 1
                    used.append((chain.head, 0))
                    continue
                elif not mergeable:
                    # Larger than this receiver's buffers; the chain stays for the next one.
                    counters.drop("rx_buffer_small")
                    i += 1
                    continue
                else:
                    # Mergeable: as many chains as the frame needs, every one but the last
                    # filled completely (virtio 1.2 §5.1.6.4).
                    got = self._gather_chains(ring, carry, pos, need)
                    if got == 0:
                        # Not enough buffers for this frame: drop it; the chains stay
                        # for the next (smaller) frames.
                        counters.drop("no_rx_buffer")
                        i += 1
                        continue
                    self._write_merged(carry, pos, got, frame, hdr, used)
                    pos += got
                delivered += 1
                nbytes += n
                i += 1
        except RingError as e:
            # The guest broke its receive ring while we popped: stop this queue.
            counters.drop("ring_broken", nframes - i)
            carry.clear()
            pos = 0
            access.ring_broken(idx, str(e))
            return delivered
        finally:
            if pos:
                del carry[:pos]
        if used:
            ring.push(used, publish=not defer)
        if defer:
            if (used or delivered) and idx not in self._unpublished:
                self._unpublished.append(idx)
        elif (used or delivered) and ring.should_notify():
            access.notify(idx)
        counters.tx_frames += delivered
        counters.tx_bytes += nbytes
        return delivered

    def _rx_fast(
        self,
        ring: SplitDeviceRing | PackedDeviceRing,
        frames: Sequence[memoryview | bytes | bytearray],
        hdrs: Sequence[bytes | None] | None,
        defer: bool = False,
    ) -> tuple[int, int]:
        """Receive fast path (see the comment on the fast paths): deliver a prefix of
        ``frames`` into one-descriptor buffers; returns (frames delivered, bytes)."""
        run = ring.peek_run(len(frames), DESC_F_WRITE)
        if run is None:
            return 0, 0
        ids, addrs, lens = run
        n = len(ids)
        if not n:
            return 0, 0
        hl = self.hdr_len
        plain = self._plain_hdr
        mark = self._marker()
        g0, g1, buf, mo = self._last_region
        flens = list(map(len, frames if n == len(frames) else frames[:n]))
        needs = list(map(add, flens, repeat(hl)))
        longest = max(needs)
        if (hdrs is None and longest <= min(lens) and g0 <= min(addrs)
                and max(addrs) + longest <= g1):
            # The whole burst fits its buffers, in the last region (checked once for the
            # burst): per frame, the header and the one copy of the frame.
            d = mo - g0
            for addr, frame, need in zip(addrs, frames, needs, strict=False):
                o = addr + d
                buf[o : o + hl] = plain
                buf[o + hl : o + need] = frame
            if mark is not None:
                for addr, need in zip(addrs, needs, strict=True):
                    mark(addr, need)
            ring.complete_run(ids, addrs, needs, n, publish=not defer)
            return n, sum(flens)
        k = 0
        nbytes = 0
        for addr, ln, need in zip(addrs, lens, needs, strict=True):
            if hdrs is not None and hdrs[k] is not None:
                break  # offload fields: the general path adapts them
            if ln < need:
                break  # a short buffer: the engine walks it
            if not (g0 <= addr and addr + need <= g1):
                r = self._region(addr, need)
                if r is None:
                    break
                g0, g1, buf, mo = r
            o = mo + addr - g0
            buf[o : o + hl] = plain
            buf[o + hl : o + need] = frames[k]  # the one copy of the frame
            if mark is not None:
                mark(addr, need)
            nbytes += need - hl
            k += 1
        if k:
            ring.complete_run(ids, addrs, needs, k, publish=not defer)
        return k, nbytes

    def _gather_chains(self, ring: Any, carry: list[Chain], pos: int, need: int) -> int:
        """Make sure ``carry[pos:]`` holds enough chains for ``need`` bytes; how many."""
        total = 0
        k = pos
        while True:
            while k < len(carry):
                c = carry[k]
                k += 1
                total += c.writable_len
                if total >= need:
                    return k - pos
            more = ring.pop(1)
            if not more:
                return 0
            carry.extend(more)

    def _write_merged(
        self,
        carry: list[Chain],
        pos: int,
        count: int,
        frame: memoryview | bytes | bytearray,
        hdr: bytes | None,
        used: list[tuple[int, int]],
    ) -> None:
        """Scatter header + frame over ``count`` chains from ``carry[pos]``."""
        hl = self.hdr_len
        head = bytearray(hl)
        if hdr is not None:
            head[:10] = hdr
        _NUM_BUFFERS.pack_into(head, 10, count)
        fmv = memoryview(frame).cast("B")
        first = carry[pos]
        # The header goes first, then the frame from where the header ended.
        first.write_bytes(head)
        off = 0
        for k in range(count):
            c = carry[pos + k]
            start = hl if k == 0 else 0
            room = c.writable_len - start
            take = min(room, len(fmv) - off)
            if take > 0:
                c.write_bytes(fmv[off : off + take], start)
            off += take
            used.append((c.head, start + take))

    def _write_frame(
        self, chain: Chain, frame: memoryview | bytes | bytearray, hdr: bytes | None
    ) -> None:
        """Write header + frame into one chain, whatever its layout."""
        hl = self.hdr_len
        head = bytearray(self._plain_hdr)
        if hdr is not None:
            head[:10] = hdr
        chain.write_bytes(head)
        chain.write_bytes(frame, hl)

    def _prepare_offload(
        self, frame: memoryview | bytes | bytearray, hdr: bytes
    ) -> tuple[memoryview | bytes | bytearray, bytes | None] | None:
        """Adapt a frame with offload fields to what this receiver negotiated.

        Returns the frame and header to write, or None if it must be dropped (counted).
        """
        flags, gso, _hlen, _gsz, cstart, coff = NET_HDR.unpack(hdr)
        feats = self.features
        if gso != GSO_NONE:
            pair = _GSO_FEATURE.get(gso & ~GSO_ECN)
            ok = pair is not None and feats & pair[1]
            if gso & GSO_ECN and not feats & NetFeature.GUEST_ECN:
                ok = False
            if not ok or not feats & NetFeature.GUEST_CSUM:
                self.counters.drop("offload")
                return None
            return frame, hdr
        if flags & HDR_F_NEEDS_CSUM:
            if feats & NetFeature.GUEST_CSUM:
                return frame, hdr
            fixed = bytearray(frame)
            try:
                complete_checksum(fixed, cstart, coff)
            except ValueError:
                self.counters.drop("bad_header")
                return None
            return fixed, None
        return frame, None

    def _release_carry(self) -> None:
        """Return every held receive chain as a zero-length used buffer."""
        access = self.access
        for pair, carry in enumerate(self._carry):
            ring = self._carry_ring[pair]
            if carry and ring is not None and access is not None:
                try:
                    ring.push([(c.head, 0) for c in carry])
                    if ring.should_notify():
                        access.notify(2 * pair)
                except (ValueError, RingError):
                    pass
            carry.clear()
            self._carry_ring[pair] = None

    def close(self) -> None:
        """The session is gone: drop every view of its guest memory (so the shell can
        unmap it at once) and every reference to the session. Idempotent."""
        for c in self._carry:
            c.clear()
        self._carry_ring = [None] * self.queue_pairs
        self._frames.clear()
        self._hdrs.clear()
        self._regions = []
        self._last_region = _NO_REGION
        self._mem = None
        self._rx_pairs = []
        self._started.clear()
        self._enabled.clear()
        self._unpublished.clear()
        self.access = None

    @property
    def held_rx_chains(self) -> int:
        """Receive chains popped but not used yet (waiting for a frame that fits)."""
        return sum(len(c) for c in self._carry)


class NullNetDevice(VirtioNetDevice):
    """A virtio-net back-end that sinks TX frames and offers no RX traffic.

    Kept for tools and tests: ``tx_frames``/``tx_bytes`` count what the driver sent
    (header included in the bytes).
    """

    def __init__(self, *, queue_pairs: int = 1, mac: str = "52:54:00:00:00:01",
                 mtu: int = 1500, offer_config: bool = False) -> None:
        super().__init__(DropSink(), mac=mac, mtu=mtu, queue_pairs=queue_pairs,
                         offer_config=offer_config)
        self.tx_frames = 0
        self.tx_bytes = 0

    def run_queue(self, index: int, ring: Any, budget: int, enabled: bool) -> BurstResult:
        """Every burst through :meth:`handle_burst` (no fast path: it only counts)."""
        return Device.run_queue(self, index, ring, budget, enabled)

    def handle_burst(
        self, index: int, chains: Sequence[Any], enabled: bool
    ) -> list[tuple[int, int]]:
        """Count and drop transmitted frames (header included)."""
        if enabled and index % 2 == 1:
            for c in chains:
                self.tx_frames += 1
                self.tx_bytes += c.readable_len
        return [(c.head, 0) for c in chains]
