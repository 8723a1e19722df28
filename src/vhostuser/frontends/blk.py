"""A virtio-blk driver as a Python object: drive any vhost-user-blk back-end without a VM.

:class:`VirtioBlkFrontend` owns guest RAM (a memfd), split driver rings and eventfds, and
talks to the back-end through :class:`~vhostuser.io.frontend.FrontendClient`. It reads,
writes, flushes, discards and zeroes ranges of the disk, synchronously
(:meth:`~VirtioBlkFrontend.read`...) or with many requests in flight
(:meth:`~VirtioBlkFrontend.submit` / :meth:`~VirtioBlkFrontend.wait`). With
INFLIGHT_SHMFD it survives a back-end crash the way QEMU's vhost-user-blk does: it keeps
the inflight fd, and on reconnect re-negotiates, hands the fd back (SET_INFLIGHT_FD),
re-shares memory, re-sets the rings at ``used.idx`` and waits for the back-end to finish
the requests that were in flight.

From another project's pytest::

    from vhostuser.frontends import VirtioBlkFrontend

    def test_disk(blk_socket):
        with VirtioBlkFrontend(blk_socket) as disk:
            disk.write(0, b"x" * 4096)
            disk.flush()
            assert disk.read(0, 4096) == b"x" * 4096

:class:`BlkQueue` is the pure part (request layout in guest memory, slots, completion
parsing; no I/O) and runs over any :class:`~vhostuser.memory.GuestMemory`, which is how
the unit tests drive the back-end device without sockets.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final

from ..errors import (
    LocalProtocolError,
    MessageTimeoutError,
    PeerClosedError,
    RemoteProtocolError,
    VhostUserError,
)
from ..io.dirtylog import FrontendDirtyLog
from ..memory import FlatMemory, GuestMemory
from ..protocol import payloads as P
from ..protocol.enums import (
    BlkFeature,
    DeviceType,
    FrontendRequest,
    ProtocolFeature,
    VirtioFeature,
)
from ..virtio.blk import (
    DWZ_SEGMENT,
    REQ_HEADER,
    SECTOR_SIZE,
    STATUS_NAMES,
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    BlkConfig,
    blk_config_size,
)
from ..virtq import (
    INITIAL_BASE,
    PackedDriverRing,
    SplitDriverRing,
    encode_base,
    packed_layout,
    split_layout,
)
from .resume import BackendChangedError, check_offer

log = logging.getLogger(__name__)

__all__ = [
    "BlkError",
    "BlkOp",
    "BlkQueue",
    "VirtioBlkFrontend",
]

VF = VirtioFeature
BF = BlkFeature
PF = ProtocolFeature

#: Virtio feature bits this driver understands and acks when offered. RING_PACKED is left
#: out (the driver rings are split); VERSION_1 is required.
WANTED_FEATURES: Final = int(
    VF.VERSION_1 | VF.RING_INDIRECT_DESC | VF.RING_EVENT_IDX | VF.PROTOCOL_FEATURES
    | BF.SIZE_MAX | BF.SEG_MAX | BF.BLK_SIZE | BF.FLUSH | BF.MQ | BF.DISCARD
    | BF.WRITE_ZEROES | BF.RO | BF.TOPOLOGY
)

PAGE: Final = 4096
META_STRIDE: Final = 128
"""Per-slot bytes for the request header (0), a discard/write-zeroes segment (16), the
GET_ID buffer (32) and the status byte (64)."""
_HDR_OFF, _SEG_OFF, _ID_OFF, _STATUS_OFF = 0, 16, 32, 64
_NO_STATUS: Final = 0xFF
"""Written into the status byte before submission: still there means none was written."""
INDIRECT_ENTRIES: Final = 4
"""Descriptors per indirect table: every request here has at most three."""

_KIND_TYPES: Final = {
    "read": VIRTIO_BLK_T_IN,
    "write": VIRTIO_BLK_T_OUT,
    "flush": VIRTIO_BLK_T_FLUSH,
    "get_id": VIRTIO_BLK_T_GET_ID,
    "discard": VIRTIO_BLK_T_DISCARD,
    "write_zeroes": VIRTIO_BLK_T_WRITE_ZEROES,
}


def _align(n: int, a: int = PAGE) -> int:
    return (n + a - 1) // a * a


class BlkError(VhostUserError):
    """A request completed with a status other than OK (or none at all).

    Attributes:
        op: the request.
        status: the status byte (None if the back-end wrote none).
    """

    def __init__(self, op: BlkOp) -> None:
        self.op = op
        self.status = op.status
        what = "no status" if op.status is None else (
            f"status {STATUS_NAMES.get(op.status, op.status)}")
        super().__init__(f"{op.kind} of {op.length} bytes at offset {op.offset}: {what}")


@dataclass(eq=False, slots=True)
class BlkOp:
    """One virtio-blk request, from :meth:`VirtioBlkFrontend.submit` to its completion.

    Attributes:
        kind: ``read``, ``write``, ``flush``, ``discard``, ``write_zeroes`` or ``get_id``.
        offset: byte offset on the disk (a multiple of 512).
        length: bytes to read/discard/zero (for writes: ``len(data)``).
        data: the bytes to write; after a read or get_id completes, the bytes read.
        unmap: write_zeroes may deallocate (VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP).
        token: anything the caller wants to find again at completion.
        status: the status byte once completed (None while in flight, or if none came).
        done: True once completed.
        submitted_ns, completed_ns: ``time.perf_counter_ns()`` at submit and at reap.
    """

    kind: str
    offset: int = 0
    length: int = 0
    data: bytes | None = None
    unmap: bool = False
    token: Any = None
    status: int | None = None
    done: bool = False
    submitted_ns: int = 0
    completed_ns: int = 0
    used_len: int = 0
    _slot: int = field(default=-1, repr=False)

    @property
    def ok(self) -> bool:
        """Completed with VIRTIO_BLK_S_OK."""
        return self.done and self.status == VIRTIO_BLK_S_OK

    @property
    def latency_ns(self) -> int:
        """Nanoseconds from submit to reap (0 before completion)."""
        return self.completed_ns - self.submitted_ns if self.done else 0


@dataclass(frozen=True, slots=True)
class QueueLayout:
    """Where one queue's ring, indirect tables, slot metadata and slot data live (GPAs)."""

    base: int
    size: int
    depth: int
    max_io: int
    desc: int
    avail: int
    used: int
    indirect: int
    indirect_len: int
    meta: int
    data: int
    end: int

    @classmethod
    def plan(cls, base: int, size: int, depth: int, max_io: int, *,
             packed: bool = False) -> QueueLayout:
        """Lay a queue out from ``base`` (page aligned). For a packed ring ``avail`` and
        ``used`` are the driver and device event suppression areas.

        Raises:
            ValueError: ``size`` is not a power of two in 1..32768 (any size up to 32768
                for packed), or ``depth`` or ``max_io`` is out of range.
        """
        if not 1 <= depth <= size:
            raise ValueError(f"queue depth {depth} is outside 1..{size} (the queue size)")
        if max_io <= 0 or max_io % SECTOR_SIZE:
            raise ValueError(f"max_io {max_io} is not a positive multiple of 512")
        layout = packed_layout if packed else split_layout
        desc, avail, used, ring_bytes = layout(size, base)
        ind = base + _align(ring_bytes)
        ind_len = 16 * INDIRECT_ENTRIES * size
        meta = ind + _align(ind_len)
        data = meta + _align(META_STRIDE * depth)
        end = data + _align(max_io) * depth
        return cls(base, size, depth, max_io, desc, avail, used, ind, ind_len, meta, data, end)

    def slot_data(self, slot: int) -> int:
        """GPA of slot ``slot``'s data buffer."""
        return self.data + _align(self.max_io) * slot

    def slot_meta(self, slot: int) -> int:
        """GPA of slot ``slot``'s header/segment/id/status area."""
        return self.meta + META_STRIDE * slot


class BlkQueue:
    """The driver side of one virtio-blk request queue over guest memory. No I/O.

    Each in-flight request owns a slot: a metadata area (header, segment, id, status) and a
    data buffer of ``max_io`` bytes. :meth:`add` lays a request out and queues it on the
    ring, :meth:`publish` makes what was added visible (and says whether to kick), and
    :meth:`reap` collects completions and copies read data out.

    Raises:
        ValueError: a bad layout (from :class:`QueueLayout` or the ring).
    """

    def __init__(self, mem: GuestMemory, layout: QueueLayout, *, event_idx: bool,
                 indirect: bool, index: int = 0, packed: bool = False) -> None:
        self.mem = mem
        self.layout = layout
        self.index = index
        self.packed = packed
        ring_class = PackedDriverRing if packed else SplitDriverRing
        self.ring: SplitDriverRing[BlkOp] | PackedDriverRing[BlkOp] = ring_class(
            mem, layout.size, layout.desc, layout.avail, layout.used, event_idx=event_idx,
            indirect_area=(layout.indirect, layout.indirect_len) if indirect else None,
            name=f"blk queue {index}",
        )
        self._free = list(range(layout.depth - 1, -1, -1))
        self.in_flight: dict[int, BlkOp] = {}

    @property
    def free_slots(self) -> int:
        """Requests that can still be added."""
        return len(self._free)

    def used_idx(self) -> int:
        """``used.idx`` as it is in guest memory (the base to resume a split ring at).

        Raises:
            ValueError: the ring is packed (it has no used index in memory).
        """
        if self.packed:
            raise ValueError(f"blk queue {self.index}: a packed ring has no used.idx")
        return int(struct.unpack("<H", self.mem.view(self.layout.used + 2, 2))[0])

    def add(self, op: BlkOp) -> bool:
        """Lay ``op`` out in a free slot and add it to the ring (not yet published).

        Returns False (nothing changed) when no slot or descriptor is free.

        Raises:
            ValueError: ``op`` is malformed (kind, alignment, a length above ``max_io``).
        """
        rtype = _KIND_TYPES.get(op.kind)
        if rtype is None:
            raise ValueError(f"unknown request kind {op.kind!r}")
        lay = self.layout
        if op.kind == "write":
            if op.data is None:
                raise ValueError("a write needs data")
            op.length = len(op.data)
        if op.kind in ("read", "write") and not 0 <= op.length <= lay.max_io:
            raise ValueError(f"{op.kind} of {op.length} bytes is outside 0..{lay.max_io}")
        if op.offset % SECTOR_SIZE or op.length % SECTOR_SIZE or op.offset < 0:
            raise ValueError(
                f"{op.kind} at offset {op.offset} length {op.length}: not whole 512-byte "
                "sectors"
            )
        if op.kind in ("discard", "write_zeroes") and op.length // SECTOR_SIZE > 0xFFFF_FFFF:
            raise ValueError(f"{op.kind} of {op.length} bytes: more sectors than a segment's "
                             "u32 num_sectors holds")
        if not self._free:
            return False
        slot = self._free[-1]
        meta = lay.slot_meta(slot)
        data = lay.slot_data(slot)
        mem = self.mem
        sector = op.offset // SECTOR_SIZE
        hdr = mem.view(meta + _HDR_OFF, REQ_HEADER.size)
        REQ_HEADER.pack_into(hdr, 0, rtype, 0, sector if op.kind in ("read", "write") else 0)
        mem.view(meta + _STATUS_OFF, 1)[0] = _NO_STATUS
        bufs: list[tuple[int, int, bool]] = [(meta + _HDR_OFF, REQ_HEADER.size, False)]
        if op.kind == "read":
            if op.length:
                bufs.append((data, op.length, True))
        elif op.kind == "write":
            if op.length and op.data is not None:
                mem.view(data, op.length)[:] = op.data
                bufs.append((data, op.length, False))
        elif op.kind == "get_id":
            bufs.append((meta + _ID_OFF, VIRTIO_BLK_ID_BYTES, True))
        elif op.kind in ("discard", "write_zeroes"):
            flags = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP if op.unmap else 0
            DWZ_SEGMENT.pack_into(mem.view(meta + _SEG_OFF, DWZ_SEGMENT.size), 0, sector,
                                  op.length // SECTOR_SIZE, flags)
            bufs.append((meta + _SEG_OFF, DWZ_SEGMENT.size, False))
        bufs.append((meta + _STATUS_OFF, 1, True))
        if not self.ring.add(bufs, op):
            return False
        self._free.pop()
        op._slot = slot
        op.done = False
        op.status = None
        self.in_flight[slot] = op
        return True

    def publish(self) -> bool:
        """Publish the requests added so far; True if the device must be kicked."""
        self.ring.publish()
        return self.ring.should_kick()

    def reap(self) -> list[BlkOp]:
        """Collect completed requests (status set, read data copied out), oldest first.

        Raises:
            RingError: the device published a bad used entry (the ring is then broken).
        """
        out: list[BlkOp] = []
        lay = self.layout
        mem = self.mem
        for op, used_len in self.ring.reap():
            slot = op._slot
            meta = lay.slot_meta(slot)
            status = mem.view(meta + _STATUS_OFF, 1)[0]
            op.status = None if status == _NO_STATUS else int(status)
            op.used_len = used_len
            if op.status == VIRTIO_BLK_S_OK:
                if op.kind == "read":
                    op.data = bytes(mem.view(lay.slot_data(slot), op.length)) if op.length \
                        else b""
                elif op.kind == "get_id":
                    op.data = bytes(mem.view(meta + _ID_OFF, VIRTIO_BLK_ID_BYTES))
            op.done = True
            op._slot = -1
            del self.in_flight[slot]
            self._free.append(slot)
            out.append(op)
        return out

    def enable_interrupts(self) -> bool:
        """Ask for a call at the next completion; True if some are already there."""
        return self.ring.enable_interrupts()

    def close(self) -> None:
        """Drop the ring's views of guest memory."""
        self.ring.close()


@dataclass(slots=True)
class _Session:
    """What one connection to the back-end holds."""

    fe: Any  # FrontendClient
    features: int
    protocol_features: int


class VirtioBlkFrontend:
    """A virtio-blk driver on a vhost-user-blk back-end at ``path`` (see the module doc).

    Args:
        path: the back-end's socket.
        queue_size: ring size (a power of two).
        depth: requests in flight per queue (at most ``queue_size``).
        num_queues: request queues wanted (capped by what the back-end offers).
        max_io: largest read/write per request; bigger ones are split.
        timeout: seconds to wait for a reply or a completion.
        connect_timeout: seconds to wait for the back-end's socket on the first connect.
        reconnect: reconnect when the back-end goes away (needs INFLIGHT_SHMFD to keep
            requests that were in flight; without it they are resubmitted from ``used.idx``
            as QEMU does, which is only right for a back-end that completes in order).
        reconnect_timeout: how long to keep trying to reconnect (a back-end that answers
            without a bit the session depends on ends it at once, see :meth:`reconnect`).
        inflight: negotiate INFLIGHT_SHMFD when offered.
        packed: use packed rings (VIRTIO_F_RING_PACKED; the back-end must offer it).
        inband: negotiate INBAND_NOTIFICATIONS (with BACKEND_REQ and REPLY_ACK): kicks go
            as VRING_KICK messages, completions are signalled by BACKEND_VRING_CALL.

    Raises:
        VhostUserError: the handshake failed (``RemoteProtocolError``,
            ``MessageTimeoutError``, ``PeerClosedError``), or the back-end lacks VERSION_1
            or CONFIG.
        OSError: guest RAM or eventfds could not be created.
    """

    def __init__(
        self,
        path: str,
        *,
        queue_size: int = 128,
        depth: int = 32,
        num_queues: int = 1,
        max_io: int = 1 << 20,
        timeout: float = 10.0,
        connect_timeout: float = 10.0,
        reconnect: bool = True,
        reconnect_timeout: float = 30.0,
        inflight: bool = True,
        packed: bool = False,
        inband: bool = False,
    ) -> None:
        from ..io.guestram import GuestRam
        from ..io.reactor import Reactor

        self.path = path
        self.queue_size = queue_size
        self.depth = depth
        self.max_io = max_io
        self.timeout = timeout
        self.packed = packed
        self.reconnect_enabled = reconnect
        self.reconnect_timeout = reconnect_timeout
        self.want_inflight = inflight
        self.want_queues = num_queues
        self.inband = inband
        self._moving_state: bytes | None = None
        if not 1 <= num_queues <= 256:
            raise ValueError(f"num_queues {num_queues} is outside 1..256")
        self.reconnects = 0
        """How many times the back-end went away and we reconnected."""
        self.outage_seconds = 0.0
        """Time without a back-end, from noticing it went away to the next one taking the
        session over, summed over the outages that ended."""
        self._down_since: float | None = None
        self._closed = False
        self._disconnected = False
        self._session: _Session | None = None
        self._inflight_fd: Any = None  # OwnedFd from GET_INFLIGHT_FD
        self._inflight_msg: P.InflightPayload | None = None
        self._ready: list[BlkOp] = []
        self._rr = 0
        self._watched: list[int] = []
        self.config: BlkConfig
        self.features = 0
        self.protocol_features = 0
        self.queues: list[BlkQueue] = []
        self._layouts = [QueueLayout.plan(0, queue_size, depth, max_io, packed=packed)]
        for _ in range(1, num_queues):
            self._layouts.append(QueueLayout.plan(self._layouts[-1].end, queue_size, depth,
                                                  max_io, packed=packed))
        self._reactor = Reactor()
        self._ram: Any = None
        self._mem: FlatMemory | None = None
        try:
            self._ram = GuestRam.memfd(_align(self._layouts[-1].end), name="vhostuser-blk-fe")
            self._mem = FlatMemory(self._ram.buf)
            self._connect(first=True, connect_timeout=connect_timeout)
        except BaseException:
            self._release()
            raise

    # -- properties ------------------------------------------------------------------------
    @property
    def ram(self) -> Any:
        """Our guest RAM (a :class:`~vhostuser.io.guestram.GuestRam`; None once closed)."""
        return self._ram

    @property
    def capacity(self) -> int:
        """Disk size in bytes (capacity * 512)."""
        return self.config.capacity_bytes

    @property
    def read_only(self) -> bool:
        """The back-end offered (and we acked) VIRTIO_BLK_F_RO."""
        return bool(self.features & BF.RO)

    @property
    def has_inflight(self) -> bool:
        """INFLIGHT_SHMFD was negotiated: in-flight requests survive a back-end crash."""
        return self._inflight_fd is not None

    @property
    def inflight_fd(self) -> int | None:
        """The inflight area's fd from GET_INFLIGHT_FD (kept across reconnects), or None.

        Still owned by the front-end; a test may map it read-only to watch the back-end.
        """
        return None if self._inflight_fd is None else int(self._inflight_fd.fd)

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet returned by :meth:`wait`/:meth:`poll`."""
        return sum(len(q.in_flight) for q in self.queues) + len(self._ready)

    @property
    def free_slots(self) -> int:
        """Requests that can be submitted now."""
        return sum(q.free_slots for q in self.queues)

    # -- connection --------------------------------------------------------------------------
    def _connect(self, *, first: bool, connect_timeout: float,
                 bases: dict[int, int] | None = None) -> None:
        from ..io.frontend import FrontendClient

        fe = FrontendClient.connect(self.path, timeout=self.timeout,
                                    connect_timeout=connect_timeout)
        try:
            self._handshake(fe, first=first, bases=bases)
        except BaseException:
            self._unwatch()
            fe.close()
            raise

    def _handshake(self, fe: Any, *, first: bool, bases: dict[int, int] | None = None
                   ) -> None:
        pf = _protocol_features(self.want_inflight)
        want = WANTED_FEATURES | (int(VF.RING_PACKED) if self.packed else 0)
        if not first:
            # The rings, the slots and the inflight area were built for what was negotiated
            # with the first back-end: ask for exactly that again (a newer back-end's extra
            # bits are not acked), and give up at once when a bit is gone.
            want = self.features
        n = fe.negotiate(features=want, protocol_features=pf, backend_channel=self.inband,
                         inband=self.inband)
        if not first:
            needed_pf = int(PF.CONFIG)
            if self._inflight_fd is not None:
                needed_pf |= int(PF.INFLIGHT_SHMFD)
            check_offer(self.path, features=self.features, offered_features=n.backend_features,
                        protocol_features=needed_pf,
                        offered_protocol_features=n.backend_protocol_features,
                        device=DeviceType.BLK)
        if not n.features & VF.VERSION_1:
            raise RemoteProtocolError(
                f"back-end features {n.backend_features:#x} lack VIRTIO_F_VERSION_1")
        if self.packed and not n.features & VF.RING_PACKED:
            raise RemoteProtocolError(
                f"back-end features {n.backend_features:#x} lack VIRTIO_F_RING_PACKED")
        if not fe.conn.has(PF.CONFIG):
            raise RemoteProtocolError("the back-end does not offer CONFIG: no capacity")
        config = BlkConfig.decode(fe.get_config(0, blk_config_size(n.features)))
        nq = 1
        if n.features & BF.MQ:
            nq = max(1, min(self.want_queues, config.num_queues or 1,
                            n.queue_num or self.want_queues))
        if not first and nq != len(self.queues):
            raise BackendChangedError(
                f"{self.path}: after reconnecting, the back-end has {nq} queues, not "
                f"{len(self.queues)} as before; not retrying")
        if fe.conn.has(PF.INFLIGHT_SHMFD):
            if first or self._inflight_fd is None:
                msg = P.InflightPayload(mmap_size=0, mmap_offset=0, num_queues=nq,
                                        queue_size=self.queue_size)
                reply = fe.send(FrontendRequest.GET_INFLIGHT_FD, msg)
                if reply is None or len(reply.fds) != 1:
                    raise RemoteProtocolError("GET_INFLIGHT_FD: no fd in the reply")
                self._close_inflight()
                self._inflight_fd = reply.fds[0]
                self._inflight_msg = P.InflightPayload.decode(reply.payload)
            assert self._inflight_msg is not None
            # QEMU's vhost_user_blk_start: SET_INFLIGHT_FD on every start, the same fd.
            fe.send(FrontendRequest.SET_INFLIGHT_FD, self._inflight_msg,
                    [self._inflight_fd.fd])
        elif not first and self._inflight_fd is not None:
            raise RemoteProtocolError("after reconnecting the back-end lacks INFLIGHT_SHMFD")
        assert self._ram is not None and self._mem is not None
        fe.set_memory(self._ram)
        if self._moving_state is not None:
            from ..io.frontend import load_device_state

            # The destination is stopped (no ring set up yet), as the load phase requires.
            load_device_state(fe, self._moving_state)
        event_idx = bool(n.features & VF.RING_EVENT_IDX)
        indirect = bool(n.features & VF.RING_INDIRECT_DESC)
        if first:
            self.queues = [
                BlkQueue(self._mem, self._layouts[i], event_idx=event_idx, indirect=indirect,
                         index=i, packed=self.packed)
                for i in range(nq)
            ]
        for q in self.queues:
            lay = q.layout
            # QEMU after a back-end crash: last_avail_idx = used.idx
            # (virtio_queue_restore_last_avail_idx); the back-end adds what is in flight.
            # For a packed ring QEMU restores nothing; we send the used position the
            # driver has reaped up to (reconnect() reaps first) as both positions, which
            # is right for a back-end without inflight tracking that completes in order,
            # and a tracking back-end takes its position from the inflight area.
            if bases is not None:
                base = bases[q.index]  # a migration: where the old back-end stopped
            elif self.packed:
                base = INITIAL_BASE  # both wrap counters set (virtio 1.2 §2.8.1)
                if not first:
                    assert isinstance(q.ring, PackedDriverRing)
                    idx, wrap = q.ring.used_position
                    base = encode_base(idx, wrap, idx, wrap)
            else:
                base = 0 if first else q.used_idx()
            fe.setup_vring(q.index, lay.size, desc=lay.desc, avail=lay.avail, used=lay.used,
                           base=base)
        fe.driver_ok()
        self.config = config
        self.features = n.features
        self.protocol_features = n.protocol_features
        self._session = _Session(fe, n.features, n.protocol_features)
        self._disconnected = False
        self._watch(fe)
        for q in self.queues:
            # vhost-user.rst: a ring starts on its first kick (QEMU kicks after
            # SET_VRING_KICK); this also restarts whatever was left in the avail ring.
            fe.kick(q.index)

    def _watch(self, fe: Any) -> None:
        r = self._reactor
        for q in self.queues:
            call = fe.vrings[q.index].call
            r.add_reader(call.fd, call.drain)
            self._watched.append(call.fd)
        chan = fe.channel_fd if fe.inband else None
        if chan is not None:
            # In-band calls: poll_backend_channel signals the ring's local call eventfd.
            r.add_reader(chan, fe.poll_backend_channel)
            self._watched.append(chan)
        # Nothing may arrive on the control socket while no request waits for a reply:
        # readable means the back-end closed it (or broke the protocol).
        sock_fd = fe.sock.fileno()
        r.add_reader(sock_fd, self._on_control_readable)
        self._watched.append(sock_fd)

    def _unwatch(self) -> None:
        for fd in self._watched:
            self._reactor.remove_reader(fd)
        self._watched = []

    def _on_control_readable(self) -> None:
        self._disconnected = True
        if self._down_since is None:
            self._down_since = time.monotonic()
        self._unwatch()

    def _kick(self, index: int) -> None:
        """Kick ring ``index``; in-band (a message) a back-end gone is noticed here and
        handled as one that closed the connection (see :meth:`reconnect`)."""
        assert self._session is not None
        try:
            self._session.fe.kick(index)
        except (VhostUserError, OSError) as e:
            log.info("%s: kicking ring %d failed: %s", self.path, index, e)
            self._on_control_readable()

    def _drop_session(self) -> None:
        self._unwatch()
        if self._session is not None:
            self._session.fe.close()
            self._session = None

    def reconnect(self) -> None:
        """Reconnect to the back-end (after it went away) and resume.

        Re-negotiates the features of the first session, hands the inflight fd back,
        re-shares guest RAM, re-sets every ring at its ``used.idx`` and kicks; the
        back-end then finishes the requests that were in flight. Until a back-end answers
        it retries every 50 ms for ``reconnect_timeout`` seconds; a back-end that answers
        but no longer offers a bit the session depends on ends it at once.

        Raises:
            BackendChangedError: the back-end no longer offers a negotiated feature bit,
                CONFIG or INFLIGHT_SHMFD (when in use), or has fewer queues (the message
                names them); not retried.
            VhostUserError, OSError: no working back-end within ``reconnect_timeout``.
        """
        self._drop_session()
        # Whatever the old back-end published is ours: take it before re-basing the rings.
        self._ready.extend(self.poll())
        if self._down_since is None:
            self._down_since = time.monotonic()
        deadline = time.monotonic() + self.reconnect_timeout
        while True:
            left = deadline - time.monotonic()
            try:
                self._connect(first=False, connect_timeout=max(0.0, left))
                break
            except BackendChangedError:
                raise  # the next attempt would meet the same back-end
            except (VhostUserError, OSError) as e:
                if time.monotonic() >= deadline:
                    raise
                log.info("%s: reconnect failed (%s); retrying", self.path, e)
                time.sleep(0.05)
        self.reconnects += 1
        self.outage_seconds += time.monotonic() - self._down_since
        self._down_since = None
        log.info("%s: reconnected (%d in flight)", self.path, self.in_flight)

    # -- migration ---------------------------------------------------------------------------
    def start_logging(self, dirty_log: FrontendDirtyLog | None = None) -> FrontendDirtyLog:
        """Have the back-end log every guest page it writes (read data, status bytes,
        used rings) into a dirty log: ``dirty_log``, or a new one covering our guest RAM.
        The caller closes it (after :meth:`stop_logging` or :meth:`migrate`).

        Raises:
            LocalProtocolError: the back-end cannot log (no VHOST_F_LOG_ALL, no
                LOG_SHMFD), logging is on already, or the front-end is closed.
            PeerClosedError: the back-end is away.
        """
        fe = self._live_session().fe
        own = dirty_log is None
        log_ = FrontendDirtyLog(self._ram.size) if dirty_log is None else dirty_log
        try:
            fe.start_logging(log_)
        except BaseException:
            if own:
                log_.close()
            raise
        return log_

    def stop_logging(self) -> None:
        """Switch the back-end's logging off.

        Raises:
            LocalProtocolError: logging is not on.
            PeerClosedError: the back-end is away.
        """
        self._live_session().fe.stop_logging()

    def migrate(self, path: str | None = None, *, state: bool = False) -> dict[int, int]:
        """Hand the disk's rings to the back-end at ``path`` (default: the same socket, a
        new connection), as QEMU does at the end of a migration: every ring is stopped
        (GET_VRING_BASE; a blk back-end completes what it holds first, and those
        completions are taken), the connection closed, and the new one negotiates the
        same features, shares the same memory and resumes each ring at the returned
        index. Returns the bases. If logging was on, the log holds every page written
        until the stop.

        ``state``: also move the back-end's own state (DEVICE_STATE, vhost-user.rst
        "Migrating back-end state"): saved from the stopped source before its connection
        closes, loaded into the destination before its rings are set up, each side
        confirmed with CHECK_DEVICE_STATE. Both must have negotiated DEVICE_STATE.

        Raises:
            PeerClosedError: the back-end is away.
            BackendChangedError: the new back-end lacks a bit the session uses.
            VhostUserError, OSError: stopping or the new handshake failed.
        """
        from ..io.frontend import save_device_state

        fe = self._live_session().fe
        try:
            bases = {q.index: fe.stop_vring(q.index) for q in self.queues}
            if state:
                self._moving_state = save_device_state(fe)
        finally:
            self._drop_session()
        self._ready.extend(self.poll())
        if path is not None:
            self.path = path
        try:
            self._connect(first=False, connect_timeout=self.timeout, bases=bases)
        finally:
            self._moving_state = None
        return bases

    def _live_session(self) -> _Session:
        self._check_open()
        if self._session is None or self._disconnected:
            raise PeerClosedError(f"{self.path}: the back-end is away")
        return self._session

    # -- asynchronous interface --------------------------------------------------------------
    def submit(self, op: BlkOp) -> BlkOp:
        """Queue one request and kick the back-end if needed; returns ``op``.

        Raises:
            ValueError: ``op`` is malformed or too large (see :meth:`BlkQueue.add`).
            LocalProtocolError: no slot is free (wait for completions first), or the
                front-end is closed.
        """
        self._check_open()
        n = len(self.queues)
        for k in range(n):
            q = self.queues[(self._rr + k) % n]
            op.submitted_ns = time.perf_counter_ns()
            if q.add(op):
                self._rr = (self._rr + k + 1) % n
                if q.publish() and self._session is not None and not self._disconnected:
                    self._kick(q.index)
                return op
        raise LocalProtocolError(
            f"all {self.depth * n} request slots are in flight; wait for completions")

    def submit_many(self, ops: Iterable[BlkOp], *,
                    before_publish: Callable[[], None] | None = None) -> None:
        """Add several requests, then publish and kick each queue once.

        ``before_publish`` is called once every request is laid out in guest memory and
        none is visible to the back-end yet (a dirty-log audit copies memory there).

        Raises:
            As :meth:`submit`.
        """
        self._check_open()
        n = len(self.queues)
        touched: set[int] = set()
        for op in ops:
            for k in range(n):
                q = self.queues[(self._rr + k) % n]
                op.submitted_ns = time.perf_counter_ns()
                if q.add(op):
                    self._rr = (self._rr + k + 1) % n
                    touched.add(q.index)
                    break
            else:
                raise LocalProtocolError(
                    f"all {self.depth * n} request slots are in flight; wait for completions")
        if before_publish is not None:
            before_publish()
        for i in sorted(touched):
            if self.queues[i].publish() and self._session is not None \
                    and not self._disconnected:
                self._kick(i)

    def poll(self) -> list[BlkOp]:
        """Completed requests, without waiting.

        Raises:
            RingError: the back-end published a bad used entry.
        """
        out, self._ready = self._ready, []
        now = 0
        for q in self.queues:
            got = q.reap()
            if got:
                now = now or time.perf_counter_ns()
                for op in got:
                    op.completed_ns = now
                out.extend(got)
        return out

    def wait(self, timeout: float | None = None, *, min_ops: int = 1) -> list[BlkOp]:
        """Wait until at least ``min_ops`` requests complete (or ``timeout`` passes).

        When the back-end goes away meanwhile and ``reconnect`` is on, reconnects and keeps
        waiting (for the requests the new back-end resubmits).

        Raises:
            PeerClosedError: the back-end went away and reconnecting is off.
            VhostUserError, OSError: reconnecting failed.
            RingError: the back-end published a bad used entry.
        """
        self._check_open()
        deadline = None if timeout is None else time.monotonic() + timeout
        out = self.poll()
        while len(out) < min_ops and self.in_flight:
            if self._disconnected:
                if not self.reconnect_enabled:
                    raise PeerClosedError(f"{self.path}: the back-end closed the connection")
                self.reconnect()
                out.extend(self.poll())
                continue
            if any(q.enable_interrupts() for q in self.queues):
                out.extend(self.poll())
                continue
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            self._reactor.run_once(left if left is not None else 1.0)
            out.extend(self.poll())
        return out

    def wait_for(self, ops: Iterable[BlkOp]) -> None:
        """Wait until every op in ``ops`` completed (others completing meanwhile are kept
        for :meth:`wait`/:meth:`poll`).

        Raises:
            MessageTimeoutError: nothing completed for ``timeout`` seconds.
            BlkError: one of ``ops`` failed.
        """
        self._wait_all(list(ops))

    def _wait_all(self, ops: list[BlkOp]) -> None:
        """Wait for every op in ``ops``; completions of other ops are kept for later.

        Raises:
            MessageTimeoutError: nothing completed for ``timeout`` seconds.
            BlkError: one of ``ops`` failed.
        """
        pending = {id(o) for o in ops if not o.done}
        others: list[BlkOp] = []
        while pending:
            got = self.wait(self.timeout)
            if not got:
                self._ready = others + self._ready
                raise MessageTimeoutError(
                    f"{self.path}: {len(pending)} requests did not complete within "
                    f"{self.timeout} s")
            for op in got:
                if id(op) in pending:
                    pending.discard(id(op))
                else:
                    others.append(op)
        self._ready = others + self._ready
        for op in ops:
            if not op.ok:
                raise BlkError(op)

    def _run(self, ops: list[BlkOp]) -> list[BlkOp]:
        """Submit ``ops`` as slots allow and wait for all of them."""
        i = 0
        running: list[BlkOp] = []
        while i < len(ops):
            while i < len(ops) and self.free_slots:
                self.submit(ops[i])
                running.append(ops[i])
                i += 1
            if i < len(ops):
                self._wait_all(running[:1])
                running = running[1:]
        self._wait_all(running)
        return ops

    # -- synchronous interface ---------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` (both multiples of 512).

        Raises:
            ValueError: not whole sectors, or beyond the capacity.
            BlkError: the back-end failed a request.
            MessageTimeoutError: the back-end did not answer in time.
        """
        self._check_range(offset, length)
        ops = [BlkOp("read", off, n) for off, n in _chunks(offset, length, self.max_io)]
        self._run(ops)
        return b"".join(op.data or b"" for op in ops)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset`` (both whole sectors). Raises as :meth:`read`."""
        mv = memoryview(data).cast("B")
        self._check_range(offset, len(mv))
        ops = [BlkOp("write", off, n, bytes(mv[off - offset : off - offset + n]))
               for off, n in _chunks(offset, len(mv), self.max_io)]
        self._run(ops)

    def flush(self) -> None:
        """Make completed writes durable (VIRTIO_BLK_T_FLUSH).

        Raises:
            BlkError: the back-end failed it (UNSUPP without VIRTIO_BLK_F_FLUSH).
        """
        self._run([BlkOp("flush")])

    def discard(self, offset: int, length: int) -> None:
        """Discard a range (split at the back-end's ``max_discard_sectors``).

        Raises as :meth:`read`; BlkError (UNSUPP) without VIRTIO_BLK_F_DISCARD.
        """
        self._check_range(offset, length)
        limit = (self.config.max_discard_sectors or 1) * SECTOR_SIZE
        self._run([BlkOp("discard", off, n) for off, n in _chunks(offset, length, limit)])

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Zero a range (split at ``max_write_zeroes_sectors``); ``unmap`` lets the
        back-end deallocate it. Raises as :meth:`discard`."""
        self._check_range(offset, length)
        limit = (self.config.max_write_zeroes_sectors or 1) * SECTOR_SIZE
        self._run([BlkOp("write_zeroes", off, n, unmap=unmap)
                   for off, n in _chunks(offset, length, limit)])

    def get_id(self) -> str:
        """The device's serial (GET_ID), NULs stripped.

        Raises:
            BlkError: the back-end failed it.
        """
        (op,) = self._run([BlkOp("get_id")])
        return (op.data or b"").split(b"\0", 1)[0].decode("ascii", "replace")

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset % SECTOR_SIZE or length % SECTOR_SIZE:
            raise ValueError(
                f"offset {offset} and length {length} must be whole 512-byte sectors")
        if offset + length > self.capacity:
            raise ValueError(
                f"range {offset}+{length} is beyond the capacity of {self.capacity} bytes")

    # -- lifetime ----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise LocalProtocolError(f"{self.path}: front-end closed")

    def close(self) -> None:
        """Stop the rings (GET_VRING_BASE) if the back-end is still there, disconnect, free
        guest RAM, eventfds and the inflight fd. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._session is not None and not self._disconnected:
            fe = self._session.fe
            for q in self.queues:
                try:
                    fe.stop_vring(q.index)
                except (VhostUserError, OSError) as e:
                    log.debug("%s: stopping ring %d: %s", self.path, q.index, e)
                    break
        self._release()

    def _release(self) -> None:
        self._drop_session()
        for q in self.queues:
            q.close()
        self.queues = []
        self._close_inflight()
        if self._mem is not None:
            for r in self._mem.clear():
                r.buf.release()
            self._mem = None
        if self._ram is not None:
            self._ram.close()
            self._ram = None
        self._reactor.close()

    def _close_inflight(self) -> None:
        if self._inflight_fd is not None:
            self._inflight_fd.close()
            self._inflight_fd = None

    def __enter__(self) -> VirtioBlkFrontend:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self.queues)} queue(s)"
        return f"<VirtioBlkFrontend {self.path} {state}>"


def _protocol_features(inflight: bool) -> int:
    from ..io.frontend import SUPPORTED_PROTOCOL_FEATURES

    pf = int(SUPPORTED_PROTOCOL_FEATURES)
    if not inflight:
        pf &= ~int(PF.INFLIGHT_SHMFD)
    return pf


def _chunks(offset: int, length: int, limit: int) -> list[tuple[int, int]]:
    """Split ``offset``/``length`` into pieces of at most ``limit`` bytes."""
    out = []
    end = offset + length
    while offset < end:
        n = min(limit, end - offset)
        out.append((offset, n))
        offset += n
    return out


#: Statuses, for callers that check ``op.status`` themselves.
STATUS_OK: Final = VIRTIO_BLK_S_OK
STATUS_IOERR: Final = VIRTIO_BLK_S_IOERR
STATUS_UNSUPP: Final = VIRTIO_BLK_S_UNSUPP
