"""virtio-blk: config space (virtio 1.2 §5.2.4) and the block device (§5.2.6). No I/O.

:class:`BlkConfig` decodes config space for tools; :class:`BlkDevice` is the back-end
device: it parses requests out of descriptor chains, checks each against the disk and the
negotiated features, and hands the data views to a :class:`BlockBackend`
(``vhostuser.io.blkfile.BlkFile`` does the syscalls). With INFLIGHT_SHMFD every queue,
split or packed, is tracked in the shared inflight area so that a restarted back-end
resubmits what was in flight (:mod:`vhostuser.virtq.inflight`).
"""

from __future__ import annotations

import errno
import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

from ..connection.events import (
    DeviceReset,
    VringEnabled,
    VringStarted,
    VringStopped,
    VringStopping,
)
from ..errors import RingError
from ..memory import RegionTable
from ..protocol.enums import BlkFeature, DeviceType, ProtocolFeature
from ..virtio.blk import (  # the wire definitions live there; re-exported here
    BLK_CONFIG_HEAD as BLK_CONFIG_HEAD,
)
from ..virtio.blk import (
    BLK_CONFIG_SIZE as BLK_CONFIG_SIZE,
)
from ..virtio.blk import (
    BLK_DISCARD as BLK_DISCARD,
)
from ..virtio.blk import (
    BLK_WZ as BLK_WZ,
)
from ..virtio.blk import (
    DWZ_SEGMENT as DWZ_SEGMENT,
)
from ..virtio.blk import (
    REQ_HEADER as REQ_HEADER,
)
from ..virtio.blk import (
    SECTOR_SIZE as SECTOR_SIZE,
)
from ..virtio.blk import (
    STATUS_NAMES as STATUS_NAMES,
)
from ..virtio.blk import (
    VIRTIO_BLK_ID_BYTES as VIRTIO_BLK_ID_BYTES,
)
from ..virtio.blk import (
    VIRTIO_BLK_S_IOERR as VIRTIO_BLK_S_IOERR,
)
from ..virtio.blk import (
    VIRTIO_BLK_S_OK as VIRTIO_BLK_S_OK,
)
from ..virtio.blk import (
    VIRTIO_BLK_S_UNSUPP as VIRTIO_BLK_S_UNSUPP,
)
from ..virtio.blk import (
    VIRTIO_BLK_T_BARRIER as VIRTIO_BLK_T_BARRIER,
)
from ..virtio.blk import (
    VIRTIO_BLK_T_DISCARD as VIRTIO_BLK_T_DISCARD,
)
from ..virtio.blk import (
    VIRTIO_BLK_T_FLUSH as VIRTIO_BLK_T_FLUSH,
)
from ..virtio.blk import (
    VIRTIO_BLK_T_GET_ID as VIRTIO_BLK_T_GET_ID,
)
from ..virtio.blk import (
    VIRTIO_BLK_T_GET_LIFETIME as VIRTIO_BLK_T_GET_LIFETIME,
)
from ..virtio.blk import (
    VIRTIO_BLK_T_IN as VIRTIO_BLK_T_IN,
)
from ..virtio.blk import (
    VIRTIO_BLK_T_OUT as VIRTIO_BLK_T_OUT,
)
from ..virtio.blk import (
    VIRTIO_BLK_T_SECURE_ERASE as VIRTIO_BLK_T_SECURE_ERASE,
)
from ..virtio.blk import (
    VIRTIO_BLK_T_WRITE_ZEROES as VIRTIO_BLK_T_WRITE_ZEROES,
)
from ..virtio.blk import (
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP as VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
)
from ..virtio.blk import (
    BlkConfig as BlkConfig,
)
from ..virtio.blk import (
    blk_config_size as blk_config_size,
)
from ..virtq.burst import BurstResult
from ..virtq.inflight import (
    InflightError,
    PackedInflightTracker,
    SplitInflightTracker,
    check_packed_region,
    check_split_region,
    prepare_fresh_area,
    prepare_fresh_packed_area,
)
from ..virtq.packed import PackedDeviceRing
from ..virtq.split import SplitDeviceRing
from .base import Device, DeviceStateError

if TYPE_CHECKING:
    from ..connection.events import Event
    from ..virtq.inflight import InflightArea
    from .base import QueueAccess

log = logging.getLogger(__name__)


DEFAULT_MAX_DISCARD_SECTORS: Final = 32768
"""As qemu-storage-daemon (VIRTIO_BLK_MAX_DISCARD_SECTORS)."""
DEFAULT_MAX_WRITE_ZEROES_SECTORS: Final = 32768
"""As qemu-storage-daemon (VIRTIO_BLK_MAX_WRITE_ZEROES_SECTORS)."""
DEFAULT_SEG_MAX: Final = 126
"""As qemu-storage-daemon: a 128-entry queue less the header and status descriptors."""



class BlockBackend(Protocol):
    """The storage behind a :class:`BlkDevice` (``vhostuser.io.blkfile.BlkFile`` for files
    and block devices, :class:`MemoryBackend` in tests). Every method may raise
    ``OSError``; the device turns it into VIRTIO_BLK_S_IOERR."""

    @property
    def size(self) -> int:
        """Capacity in bytes."""
        ...

    @property
    def read_only(self) -> bool:
        """True if writes are impossible."""
        ...

    def readv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Fill ``bufs`` in order from byte ``offset``."""
        ...

    def writev(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Write ``bufs`` in order at byte ``offset``."""
        ...

    def flush(self) -> None:
        """Make completed writes durable."""
        ...

    def discard(self, offset: int, length: int) -> None:
        """Deallocate a range (advisory)."""
        ...

    def write_zeroes(self, offset: int, length: int, *, unmap: bool) -> None:
        """Make a range read back as zeroes (deallocating it if ``unmap`` and possible)."""
        ...


class MemoryBackend:
    """A :class:`BlockBackend` in a ``bytearray`` (tests, RAM disks). No I/O.

    ``fail`` makes the next operations of the named kinds (``"read"``, ``"write"``,
    ``"flush"``, ``"discard"``, ``"write_zeroes"``) raise ``OSError(EIO)``.
    """

    def __init__(self, size: int, *, read_only: bool = False) -> None:
        """Make a zeroed disk of ``size`` bytes.

        Raises:
            ValueError: ``size`` is negative or not a multiple of 512.
        """
        if size < 0 or size % SECTOR_SIZE:
            raise ValueError(f"disk size {size} is not a non-negative multiple of 512")
        self.data = bytearray(size)
        self._read_only = read_only
        self.fail: set[str] = set()
        self.flushes = 0
        self.discards: list[tuple[int, int]] = []

    @property
    def size(self) -> int:
        """Capacity in bytes."""
        return len(self.data)

    @property
    def read_only(self) -> bool:
        """True if writes are refused."""
        return self._read_only

    def _maybe_fail(self, kind: str) -> None:
        if kind in self.fail:
            raise OSError(errno.EIO, f"injected {kind} failure")

    def _range(self, offset: int, length: int) -> None:
        if offset < 0 or offset + length > len(self.data):
            raise OSError(errno.EIO, f"range {offset}+{length} is outside {len(self.data)}")

    def readv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Copy out of the disk. Raises OSError (injected, or out of range)."""
        self._maybe_fail("read")
        self._range(offset, sum(len(b) for b in bufs))
        for b in bufs:
            n = len(b)
            b[:] = self.data[offset : offset + n]
            offset += n

    def writev(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Copy into the disk. Raises OSError (injected, read-only or out of range)."""
        self._maybe_fail("write")
        if self._read_only:
            raise OSError(errno.EROFS, "read-only disk")
        self._range(offset, sum(len(b) for b in bufs))
        for b in bufs:
            n = len(b)
            self.data[offset : offset + n] = b
            offset += n

    def flush(self) -> None:
        """Count the flush. Raises OSError if injected."""
        self._maybe_fail("flush")
        self.flushes += 1

    def discard(self, offset: int, length: int) -> None:
        """Zero the range (as a punched hole reads). Raises OSError if injected."""
        self._maybe_fail("discard")
        self._range(offset, length)
        self.discards.append((offset, length))
        self.data[offset : offset + length] = bytes(length)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool) -> None:
        """Zero the range. Raises OSError if injected."""
        self._maybe_fail("write_zeroes")
        self._range(offset, length)
        self.data[offset : offset + length] = bytes(length)


def _gather(bufs: Sequence[memoryview], start: int, length: int) -> bytes:
    """``length`` bytes from byte ``start`` of a scattered buffer (fewer if it is shorter)."""
    out = bytearray()
    for b in bufs:
        n = len(b)
        if start >= n:
            start -= n
            continue
        take = min(n - start, length - len(out))
        out += b[start : start + take]
        start = 0
        if len(out) == length:
            break
    return bytes(out)


def _slice(bufs: Sequence[memoryview], start: int, length: int) -> list[memoryview]:
    """Views of ``length`` bytes from byte ``start`` of a scattered buffer (no copy)."""
    out: list[memoryview] = []
    for b in bufs:
        if length <= 0:
            break
        n = len(b)
        if start >= n:
            start -= n
            continue
        take = min(n - start, length)
        out.append(b[start : start + take])
        length -= take
        start = 0
    return out


class BlkRequest:
    """One parsed request, from pop to completion.

    Attributes:
        queue: the queue it came from.
        head: the chain's head (what the ring's ``push`` takes back).
        type: the request type (barrier bit cleared).
        sector: the header's sector field.
        chain: the descriptor chain (valid until completion).
        status: the status written at completion (None before).
    """

    __slots__ = ("chain", "head", "queue", "sector", "status", "type")

    def __init__(self, queue: int, chain: Any, rtype: int, sector: int) -> None:
        self.queue = queue
        self.chain = chain
        self.head: int = chain.head
        self.type = rtype
        self.sector = sector
        self.status: int | None = None

    def __repr__(self) -> str:
        return (f"BlkRequest(queue={self.queue}, head={self.head}, type={self.type}, "
                f"sector={self.sector}, status={self.status})")


STATE_FORMAT: Final = "vhostuser-blk-state"
STATE_VERSION: Final = 1
DEVICE_FEATURE_BITS: Final = (1 << 24) - 1
STATE_MAX_BYTES: Final = 64 * 1024
"""A blk state document is a few hundred bytes; a load larger than this fails."""


class BlkDevice(Device):
    """A virtio-blk back-end on a :class:`BlockBackend`. No I/O of its own.

    Requests IN, OUT, FLUSH, GET_ID, DISCARD and WRITE_ZEROES (virtio 1.2 §5.2.6); every
    check of a guest request ends in a status byte (IOERR or UNSUPP), never an exception.
    With an inflight area (INFLIGHT_SHMFD) every queue (split or packed) is tracked, and
    requests in flight when a previous back-end died are resubmitted, in their original
    order, when the ring starts.

    Completion is decoupled from pop: :meth:`submit` may keep a request and call
    :meth:`complete` later (from the same reactor thread); :meth:`flush_completions`
    publishes what completed, in completion order. The default :meth:`submit` does the I/O
    at once.

    Args:
        backend: the storage.
        num_queues: request queues (MQ); 1..256.
        read_only: refuse writes (offers VIRTIO_BLK_F_RO); default: the backend's.
        serial: the GET_ID string (ASCII, at most 20 bytes).
        blk_size: logical block size (BLK_SIZE), a power of two 512..65536.
        seg_max: the SEG_MAX config field.
        flush, discard, write_zeroes: offer VIRTIO_BLK_F_FLUSH / DISCARD / WRITE_ZEROES
            (the last two only when writable).
        max_discard_sectors, max_discard_seg, max_write_zeroes_sectors,
        max_write_zeroes_seg: the limits advertised in config space (and enforced).
        inflight: offer INFLIGHT_SHMFD.
        latency: seconds each request waits before it is carried out and completed (a slow
            disk, for testing a front-end: its timeouts, and reconnection with requests in
            flight). The requests stay popped, and tracked in the inflight area, meanwhile.
            0 (the default): at once, inside the burst.

    Kicks are re-armed by the shell after each burst and when a ring starts
    (``BackendSession._process``: ``avail_event`` / NO_NOTIFY), which also covers a ring
    that a killed back-end left with a stale ``avail_event``.

    Raises:
        ValueError: a parameter is out of range (named in the message).
    """

    device_type = DeviceType.BLK

    def __init__(
        self,
        backend: BlockBackend,
        *,
        num_queues: int = 1,
        read_only: bool | None = None,
        serial: str = "",
        blk_size: int = SECTOR_SIZE,
        seg_max: int = DEFAULT_SEG_MAX,
        flush: bool = True,
        discard: bool = True,
        write_zeroes: bool = True,
        max_discard_sectors: int = DEFAULT_MAX_DISCARD_SECTORS,
        max_discard_seg: int = 16,
        max_write_zeroes_sectors: int = DEFAULT_MAX_WRITE_ZEROES_SECTORS,
        max_write_zeroes_seg: int = 16,
        inflight: bool = True,
        latency: float = 0.0,
    ) -> None:
        if not 1 <= num_queues <= 256:
            raise ValueError(f"num_queues {num_queues} is outside 1..256")
        if blk_size < SECTOR_SIZE or blk_size > 65536 or blk_size & (blk_size - 1):
            raise ValueError(f"blk_size {blk_size} is not a power of two in 512..65536")
        try:
            serial_bytes = serial.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError(f"serial {serial!r} is not ASCII") from None
        if len(serial_bytes) > VIRTIO_BLK_ID_BYTES:
            raise ValueError(f"serial {serial!r} is longer than {VIRTIO_BLK_ID_BYTES} bytes")
        for what, value in (("seg_max", seg_max), ("max_discard_sectors", max_discard_sectors),
                            ("max_discard_seg", max_discard_seg),
                            ("max_write_zeroes_sectors", max_write_zeroes_sectors),
                            ("max_write_zeroes_seg", max_write_zeroes_seg)):
            if not 1 <= value <= 0xFFFF_FFFF:
                raise ValueError(f"{what} {value} is outside 1..2^32-1")
        if not 0.0 <= latency <= 3600.0:
            raise ValueError(f"latency {latency} s is outside 0..3600")
        if backend.size % SECTOR_SIZE:
            raise ValueError(f"disk size {backend.size} is not a multiple of 512")
        self.backend = backend
        self.num_queues = num_queues
        self.read_only = backend.read_only if read_only is None else (read_only
                                                                       or backend.read_only)
        self.serial = serial_bytes
        self.blk_size = blk_size
        self.seg_max = seg_max
        self.max_discard_sectors = max_discard_sectors
        self.max_discard_seg = max_discard_seg
        self.max_write_zeroes_sectors = max_write_zeroes_sectors
        self.max_write_zeroes_seg = max_write_zeroes_seg
        f = BlkFeature.BLK_SIZE | BlkFeature.SEG_MAX | BlkFeature.MQ
        if flush:
            f |= BlkFeature.FLUSH
        if self.read_only:
            f |= BlkFeature.RO
        else:
            if discard:
                f |= BlkFeature.DISCARD
            if write_zeroes:
                f |= BlkFeature.WRITE_ZEROES
        self.virtio_features = int(f)
        # vhost-user.rst: "Back-ends should always implement the VHOST_USER_PROTOCOL_F_MQ
        # protocol feature"; CONFIG is added by the connection (config space is non-empty).
        pf = ProtocolFeature.MQ
        if inflight:
            pf |= ProtocolFeature.INFLIGHT_SHMFD
        self.protocol_features = int(pf)
        self._acked = self.virtio_features
        self._queues: QueueAccess | None = None
        self._area: InflightArea | None = None
        self._trackers: dict[int, SplitInflightTracker | PackedInflightTracker] = {}
        # Per queue: how to put back what was in flight, applied to the ring that is live
        # when the queue is enabled (a memory-table change may have rebuilt it meanwhile).
        self._resubmit: dict[int, Callable[[Any], list[Any]]] = {}
        self._done: list[list[tuple[int, int]]] = [[] for _ in range(num_queues)]
        self._done_heads: list[list[int]] = [[] for _ in range(num_queues)]
        self.stats: Counter[str] = Counter()
        """Requests handled per type name and status (for tools and tests)."""
        self.resubmitted = 0
        """Requests resubmitted from an adopted inflight area."""
        self.latency = latency
        # Per queue: the timers of requests waiting out the latency (cancelled when the
        # ring stops: the requests then stay in flight in the inflight area).
        self._delayed: list[dict[Any, list[Any]]] = [{} for _ in range(num_queues)]
        self._mem: Any = None
        self.accelerator: Callable[..., tuple[Any, ...]] | None = None
        """The compiled engine's ``blk_serve`` (``vhostuser._fastpath``), set by whoever
        chose that engine (``vhost-user blk``); None: every request goes through the
        Python engine. It takes read and write requests straight between the backend's
        file descriptor and guest memory and leaves everything else here."""
        # A subclass that changes how requests are carried out keeps every request in
        # Python (the compiled engine would bypass its methods).
        self._own_requests = all(
            getattr(type(self), name) is getattr(BlkDevice, name)
            for name in ("submit", "execute", "complete", "_handle_chain", "_rw"))

    # -- what the device offers --------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Capacity in 512-byte sectors (virtio 1.2 §5.2.4)."""
        return self.backend.size // SECTOR_SIZE

    def config_space(self) -> bytes:
        """virtio_blk_config (virtio 1.2 §5.2.4), 60 bytes."""
        head = BLK_CONFIG_HEAD.pack(
            self.capacity, 0, self.seg_max, bytes(4), self.blk_size, bytes(8), 0, 0,
            self.num_queues,
        )
        discard = BLK_DISCARD.pack(self.max_discard_sectors, self.max_discard_seg,
                                   self.blk_size // SECTOR_SIZE)
        may_unmap = 1 if getattr(self.backend, "can_unmap", True) else 0
        wz = BLK_WZ.pack(self.max_write_zeroes_sectors, self.max_write_zeroes_seg, may_unmap)
        out = head + discard + wz
        return out + bytes(BLK_CONFIG_SIZE - len(out))

    def on_features(self, features: int) -> None:
        """Remember what the driver acked (requests of types it did not ack get UNSUPP)."""
        self._acked = features

    def attach(self, queues: QueueAccess) -> None:
        """The session's rings (completions are pushed through it)."""
        self._queues = queues

    def on_memory(self, mem: Any) -> None:
        """Remember the memory table (the compiled engine looks buffers up in it)."""
        self._mem = mem

    def consumes(self, index: int) -> bool:
        """Leave a disabled ring's requests on the ring until it is enabled.

        vhost-user.rst: a started but disabled ring is processed "without causing any side
        effects"; for a disk that means not touching the image, so requests wait.
        """
        return self._queues is None or self._queues.enabled(index)

    # -- migration (DEVICE_STATE) ---------------------------------------------------------
    max_state_size = STATE_MAX_BYTES

    def _state_fields(self) -> dict[str, Any]:
        """What a destination must agree on (geometry, identity, limits the driver read
        from config space, features) or carry over (counters)."""
        return {
            "capacity_sectors": self.capacity,
            "blk_size": self.blk_size,
            "read_only": self.read_only,
            "serial": self.serial.decode("ascii"),
            "num_queues": self.num_queues,
            # No VIRTIO_BLK_F_CONFIG_WCE: the cache mode is fixed by FLUSH (write-back
            # with FLUSH offered, else every write is stable when completed).
            "write_cache": "writeback" if self.virtio_features & BlkFeature.FLUSH
                           else "writethrough",
            "seg_max": self.seg_max,
            "max_discard_sectors": self.max_discard_sectors,
            "max_discard_seg": self.max_discard_seg,
            "max_write_zeroes_sectors": self.max_write_zeroes_sectors,
            "max_write_zeroes_seg": self.max_write_zeroes_seg,
            "offered_features": self.virtio_features,
            # Device-specific bits only (0-23, virtio 1.2 §6): the ring and transport bits
            # are negotiated afresh with the destination by the front-end.
            "acked_features": self._acked & DEVICE_FEATURE_BITS,
        }

    def save_state(self) -> bytes:
        """The device state for a destination back-end (vhost-user.rst "Migrating back-end
        state"): a versioned, self-describing JSON document (:data:`STATE_FORMAT`).

        Everything a request needs is in the rings or on the disk: the core calls this
        only while every ring is stopped, and GET_VRING_BASE completed every request a
        ring held (delayed ones included), so ``in_flight`` is 0 and nothing else of the
        device's is in flight. The disk image itself is shared storage (not copied).

        Raises:
            DeviceStateError: a request is still held (a bug: rings are stopped).
        """
        held = sum(len(chains) for timers in self._delayed for chains in timers.values())
        held += sum(len(d) for d in self._done)
        if held:
            raise DeviceStateError(f"{held} requests are still held by the device; the "
                                   "state is saved only after GET_VRING_BASE stopped every ring")
        doc = {"format": STATE_FORMAT, "version": STATE_VERSION, **self._state_fields(),
               "in_flight": 0, "resubmitted": self.resubmitted,
               "stats": dict(sorted(self.stats.items()))}
        return json.dumps(doc, separators=(",", ":")).encode()

    def load_state(self, data: bytes) -> None:
        """Take over from the source whose :meth:`save_state` produced ``data``.

        Geometry, identity, the limits the driver read and the features it acked must
        match (a destination offering every feature the driver acked is enough); counters
        are carried over.

        Raises:
            DeviceStateError: ``data`` is not such a document, or names a device this one
                cannot stand in for (the message names the field and both values).
        """
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise DeviceStateError(f"blk state is not a JSON document ({e})") from None
        if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
            raise DeviceStateError(f"blk state: format is not {STATE_FORMAT!r}")
        if doc.get("version") != STATE_VERSION:
            raise DeviceStateError(f"blk state: version {doc.get('version')!r} is not "
                                   f"{STATE_VERSION}, the one this back-end reads")
        ours = self._state_fields()
        for key, mine in ours.items():
            if key not in doc:
                raise DeviceStateError(f"blk state: field {key!r} is missing")
            theirs = doc[key]
            if type(theirs) is not type(mine):
                raise DeviceStateError(f"blk state: field {key!r} is {theirs!r}, not a "
                                       f"{type(mine).__name__}")
            if key == "offered_features":
                continue  # what matters is what the driver acked, checked next
            if key == "acked_features":
                missing = theirs & ~self.virtio_features
                if missing:
                    raise DeviceStateError(
                        f"blk state: acked_features {theirs:#x} include {missing:#x}, which "
                        f"this device does not offer ({self.virtio_features:#x})")
                continue
            if theirs != mine:
                raise DeviceStateError(f"blk state: {key} is {theirs!r} on the source but "
                                       f"{mine!r} here")
        if doc.get("in_flight") != 0:
            raise DeviceStateError(f"blk state: in_flight is {doc.get('in_flight')!r}; a "
                                   "source saves its state only with nothing in flight")
        stats, resubmitted = doc.get("stats", {}), doc.get("resubmitted", 0)
        if (not isinstance(stats, dict) or not isinstance(resubmitted, int)
                or not all(isinstance(k, str) and isinstance(v, int) for k, v in stats.items())):
            raise DeviceStateError("blk state: stats must map names to integers")
        self.stats.update(stats)
        self.resubmitted += resubmitted

    # -- inflight tracking -------------------------------------------------------------------
    def on_inflight(self, area: InflightArea, *, fresh: bool) -> None:
        """Adopt the inflight area (GET_INFLIGHT_FD: fresh; SET_INFLIGHT_FD: maybe not).

        A fresh area gets ``desc_num`` in each queue region (``version`` stays 0 until a
        ring starts). An adopted one is checked field by field against our queue size now
        (the ring-dependent checks come when each ring starts).

        Raises:
            InflightError: an adopted area is inconsistent (the core NACKs the request).
        """
        self._drop_trackers()
        self._area = None
        if fresh:
            if area.packed:
                prepare_fresh_packed_area(area)
            else:
                prepare_fresh_area(area)
        else:
            check = check_packed_region if area.packed else check_split_region
            for i in range(area.num_queues):
                region = area.queue(i)
                try:
                    n = check(region, area.queue_size, f"inflight queue {i}")
                finally:
                    region.release()
                if n:
                    log.info("inflight queue %d: %d requests were in flight", i, n)
        self._area = area

    def close(self) -> None:
        """The session ended: forget the inflight area and the trackers (they hold no
        view of it between calls, but must not outlive the session's rings)."""
        self._drop_trackers()
        self._area = None
        for q in range(self.num_queues):
            self._done[q].clear()
            self._done_heads[q].clear()
            self._cancel_delayed(q)

    def _cancel_delayed(self, index: int) -> None:
        timers = self._delayed[index]
        if timers:
            log.info("queue %d: %d delayed batches dropped (the requests stay in flight)",
                     index, len(timers))
        for t, chains in timers.items():
            t.cancel()
            chains.clear()  # no view of guest memory may outlive the session's mappings
        timers.clear()

    def _drain_delayed(self, index: int) -> None:
        """Carry out, now, every batch still waiting out the latency on queue ``index``
        and publish their completions (GET_VRING_BASE: vhost-user.rst "Migrating back-end
        state" hands the ring's index to a destination that will not see these requests
        again, so each is completed before the ring stops). The latency is only a
        simulated slowness: cutting it short changes no result."""
        timers = self._delayed[index]
        if not timers:
            return
        queues = self._queues
        batches = list(timers.items())
        timers.clear()
        n = 0
        for timer, chains in batches:
            timer.cancel()
            if queues is None or queues.ring(index) is None:
                chains.clear()
                continue
            for chain in chains:
                self._handle_chain(index, chain, True)
            n += len(chains)
            chains.clear()
        self.flush_completions(index, notify=True)
        self.stats["completed-at-stop"] += n
        log.info("queue %d: stopping; %d delayed requests completed first", index, n)

    def _drop_trackers(self) -> None:
        self._trackers.clear()
        self._resubmit.clear()

    def on_event(self, event: Event) -> None:
        """Start tracking (and resubmit) when a ring starts; complete every delayed
        request when it is about to stop (GET_VRING_BASE); stop tracking when it stopped."""
        if isinstance(event, VringStarted):
            self._ring_started(event.index)
        elif isinstance(event, VringStopping):
            if 0 <= event.index < self.num_queues:
                self._drain_delayed(event.index)
        elif isinstance(event, VringStopped):
            self._trackers.pop(event.index, None)
            self._resubmit.pop(event.index, None)
            if 0 <= event.index < self.num_queues:
                self._done[event.index].clear()
                self._done_heads[event.index].clear()
                self._cancel_delayed(event.index)
        elif isinstance(event, VringEnabled):
            if event.enabled:
                self._run_resubmits(event.index)
        elif isinstance(event, DeviceReset):
            self._drop_trackers()
            self._area = None
            for q in range(self.num_queues):
                self._cancel_delayed(q)

    def _ring_started(self, index: int) -> None:
        area = self._area
        queues = self._queues
        if area is None or queues is None or index >= area.num_queues:
            return
        ring = queues.ring(index)
        if ring is None:
            return
        name = f"inflight queue {index}"
        try:
            if isinstance(ring, PackedDeviceRing):
                resubmit = self._recover_packed(area, index, ring, name)
            elif isinstance(ring, SplitDeviceRing):
                resubmit = self._recover_split(area, index, ring, name)
            else:
                raise InflightError(f"{name}: {type(ring).__name__} rings are not tracked")
        except (RingError, ValueError) as e:
            log.warning("%s: %s", name, e)
            queues.ring_broken(index, str(e))
            return
        if resubmit is None:
            return
        # The requests are put back on the ring (and its position moved) only when the
        # ring is enabled: a disabled ring is not popped, and holding no chain until then
        # keeps no view of guest memory alive (and survives the ring being rebuilt).
        self._resubmit[index] = resubmit
        if queues.enabled(index):
            self._run_resubmits(index)

    def _recover_split(self, area: InflightArea, index: int, ring: SplitDeviceRing,
                       name: str) -> Callable[[Any], list[Any]] | None:
        tracker = SplitInflightTracker(area, index, ring.size, name=name)
        avail_idx = (ring.next_avail + ring.pending()) & 0xFFFF
        rec = tracker.recover(ring.used_idx, avail_idx)
        self._trackers[index] = tracker
        if rec.cleared:
            log.info("%s: %d requests of the last batch had completed before the crash",
                     name, rec.cleared)
        if rec.next_avail is None:
            return None
        if rec.next_avail != ring.next_avail:
            log.info("%s: resuming at avail index %d (used.idx %d + %d in flight), not the "
                     "base %d", name, rec.next_avail, ring.used_idx, len(rec.heads),
                     ring.next_avail)
        if rec.heads:
            log.info("%s: %d requests were in flight (heads %s)", name, len(rec.heads),
                     list(rec.heads))
        heads, next_avail = rec.heads, rec.next_avail
        return lambda live: live.resubmit(heads, next_avail)

    def _recover_packed(self, area: InflightArea, index: int, ring: PackedDeviceRing,
                        name: str) -> Callable[[Any], list[Any]] | None:
        tracker = PackedInflightTracker(area, index, ring.size, name=name)
        rec = tracker.recover(ring)
        self._trackers[index] = tracker
        if rec.initialized:
            return None
        if rec.committed:
            log.info("%s: the last batch had been published before the crash", name)
        if (rec.next_avail, rec.avail_wrap, rec.used_idx, rec.used_wrap) != (
                ring.next_avail, ring.avail_wrap, ring.used_idx, ring.used_wrap):
            log.info("%s: resuming at avail %d/%d, used %d/%d (from the inflight area), not "
                     "the base %d/%d, %d/%d", name, rec.next_avail, rec.avail_wrap,
                     rec.used_idx, rec.used_wrap, ring.next_avail, ring.avail_wrap,
                     ring.used_idx, ring.used_wrap)
        if rec.buffers:
            log.info("%s: %d requests were in flight (ids %s)", name, len(rec.buffers),
                     [b[-1][2] for b in rec.buffers])
        return lambda live: live.resubmit(rec.buffers, next_avail=rec.next_avail,
                                          avail_wrap=rec.avail_wrap, used_idx=rec.used_idx,
                                          used_wrap=rec.used_wrap)

    def _run_resubmits(self, index: int) -> None:
        """Resubmit what was in flight, in the original order, and resume popping at
        ``used.idx`` plus their number (vhost-user.rst: "Resubmit inflight DescStateSplit
        entries in order of their counter value")."""
        pending = self._resubmit.pop(index, None)
        queues = self._queues
        if pending is None or queues is None:
            return
        ring = queues.ring(index)
        if ring is None:
            return
        try:
            chains = pending(ring)
        except (RingError, ValueError) as e:
            log.warning("queue %d: resubmission failed: %s", index, e)
            queues.ring_broken(index, str(e))
            return
        if not chains:
            return
        log.info("queue %d: resubmitting %d requests", index, len(chains))
        self.resubmitted += len(chains)
        if self.latency > 0:
            self._delay(index, chains)
            return
        for chain in chains:
            self._handle_chain(index, chain, True)
        self.flush_completions(index, notify=True)

    # -- the data path -----------------------------------------------------------------------
    def run_queue(self, index: int, ring: Any, budget: int, enabled: bool) -> BurstResult:
        """One burst on request queue ``index`` (called by the queue's runner).

        With the compiled engine (:attr:`accelerator`) read and write requests on a split
        ring go straight between the image and guest memory; it stops before any request
        it does not take (another type, a range error, an unusual chain), and the Python
        engine (:meth:`Device.run_queue`) carries on from there in the same burst, so
        every check and message stays in one place. Guest faults come back in the result.

        Raises:
            ValueError: a handler bug (a head not in flight, a bad length).
        """
        taken = self._compiled_burst(index, ring, budget) if enabled else 0
        if taken <= 0:
            return super().run_queue(index, ring, budget, enabled)
        # The notification decision for what the compiled engine completed comes first:
        # the Python engine may break the ring at the next chain, and the driver must
        # still hear about these (as it would from one Python burst before the fault).
        notify = ring.should_notify()
        if taken < budget and ring.broken is None:
            rest = super().run_queue(index, ring, budget - taken, enabled)
            return BurstResult(taken + rest.popped, taken + rest.pushed,
                               notify or rest.notify, rest.broken)
        return BurstResult(taken, taken, notify, ring.broken)

    def _compiled_burst(self, index: int, ring: Any, budget: int) -> int:
        """Run the compiled engine on ``ring`` if it may; requests it completed (0: none,
        or it may not run here)."""
        fast = self.accelerator
        if (fast is None or type(ring) is not SplitDeviceRing or ring.broken is not None
                or self.latency
                or not self._own_requests or self._done[index] or index in self._resubmit
                or ring.in_flight):
            return 0
        mem = self._mem
        got = mem.engine_memory() if isinstance(mem, RegionTable) else None
        fd = self._fd()
        if got is None or fd < 0:
            return 0
        tracker = self._trackers.get(index)
        region: memoryview | None = None
        tstate = None
        if tracker is not None:
            if not isinstance(tracker, SplitInflightTracker):
                return 0
            region = tracker.region()
            tstate = tracker.state
        try:
            taken, reads, writes, rerr, werr, err, sector, _stop = fast(
                ring.engine_view, got[0], got[1], fd, self.capacity,
                self.blk_size, self.read_only, ring.indirect, budget, region, tstate)
        finally:
            if region is not None:
                region.release()
        stats = self.stats
        for key, count in (("IN OK", reads), ("OUT OK", writes), ("IN IOERR", rerr),
                           ("OUT IOERR", werr)):
            if count:
                stats[key] += count
        if rerr or werr:
            log.warning("queue %d: %d requests failed, the last at sector %d: %s", index,
                        rerr + werr, sector, errno.errorcode.get(err, f"errno {err}"))
        n: int = taken
        return n

    def _fd(self) -> int:
        """The backend's open file descriptor, or -1 (none, or closed)."""
        try:
            fd = getattr(self.backend, "fd", -1)
        except ValueError:  # closed
            return -1
        return fd if isinstance(fd, int) else -1

    def handle_burst(
        self, index: int, chains: Sequence[Any], enabled: bool
    ) -> list[tuple[int, int]]:
        """Track, parse and submit every chain; publish what completed. Returns ``[]``:
        completions are pushed by :meth:`flush_completions` (around the inflight
        tracker's bookkeeping), and the burst loop then decides on the notification."""
        self._handle_chains(index, chains, enabled)
        return []

    def _handle_chains(self, index: int, chains: Sequence[Any], enabled: bool) -> None:
        tracker = self._trackers.get(index)
        if tracker is not None:
            # Before any side effect (vhost-user.rst: tracked as soon as it is fetched).
            heads = [c.head for c in chains]
            if isinstance(tracker, SplitInflightTracker):
                tracker.popped(heads)
            else:
                ring = self._queues.ring(index) if self._queues is not None else None
                if ring is not None:  # (a ring broken meanwhile pushes nothing either)
                    tracker.popped(ring, heads)
        if self.latency > 0 and enabled and chains and self._queues is not None:
            self._delay(index, list(chains))
            return
        for chain in chains:
            self._handle_chain(index, chain, enabled)
        self.flush_completions(index, notify=False)

    def _delay(self, index: int, chains: list[Any]) -> None:
        """Carry the burst out after ``latency`` seconds, on the same ring."""
        queues = self._queues
        assert queues is not None
        timers = self._delayed[index]
        timer: Any = None

        def fire() -> None:
            # The chains hold views of guest memory: drop every reference when done (the
            # timer and this closure refer to each other).
            batch = timers.pop(timer, [])
            # A ring stopped meanwhile cancelled this timer; one rebuilt by a memory-table
            # change adopted the chains in flight; a broken one takes nothing back.
            if queues.ring(index) is None:
                log.warning("queue %d: ring broken during the latency; %d requests not "
                            "completed", index, len(batch))
                batch.clear()
                return
            for chain in batch:
                self._handle_chain(index, chain, True)
            batch.clear()
            self.flush_completions(index, notify=True)

        timer = queues.call_later(self.latency, fire)
        timers[timer] = chains

    def _handle_chain(self, index: int, chain: Any, enabled: bool) -> None:
        writable_len: int = chain.writable_len
        if writable_len == 0:
            # No byte to put a status in: nothing can be reported. qemu-storage-daemon
            # drops such a request (the driver never gets its descriptors back); we return
            # it with nothing written so the driver at least gets them back.
            log.warning("queue %d: request at head %d has no writable status byte",
                        index, chain.head)
            self.stats["no-status"] += 1
            self.complete_head(index, chain.head, 0)
            return
        if chain.readable_len < REQ_HEADER.size:
            self._finish(index, chain, VIRTIO_BLK_S_IOERR, "short-header")
            return
        rtype, _reserved, sector = REQ_HEADER.unpack(_gather(chain.readable, 0, REQ_HEADER.size))
        rtype &= ~VIRTIO_BLK_T_BARRIER
        req = BlkRequest(index, chain, rtype, sector)
        if not enabled:
            # Started but disabled (not reachable while consumes() holds the ring): no
            # side effect on the disk.
            self.complete(req, VIRTIO_BLK_S_IOERR)
            return
        try:
            self.submit(req)
        except Exception:  # a device bug must not take the queue down with it
            log.exception("queue %d: request %r failed unexpectedly", index, req)
            if req.status is None:
                self.complete(req, VIRTIO_BLK_S_IOERR)

    def submit(self, req: BlkRequest) -> None:
        """Carry out ``req`` and :meth:`complete` it (now, or later from the same thread).

        Override to defer completion; the default does the I/O synchronously.
        """
        self.complete(req, self.execute(req))

    def execute(self, req: BlkRequest) -> int:
        """Do the I/O of one request; return its status (never raises for guest input).

        Raises:
            Only what the backend raises other than ``OSError`` (a bug).
        """
        t = req.type
        chain = req.chain
        try:
            if t == VIRTIO_BLK_T_IN:
                return self._rw(req, chain, write=False)
            if t == VIRTIO_BLK_T_OUT:
                return self._rw(req, chain, write=True)
            if t == VIRTIO_BLK_T_FLUSH:
                self.backend.flush()
                return VIRTIO_BLK_S_OK
            if t == VIRTIO_BLK_T_GET_ID:
                return self._get_id(chain)
            if t in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
                return self._discard_write_zeroes(req, chain)
        except OSError as e:
            log.warning("queue %d: %s at sector %d failed: %s", req.queue,
                        _type_name(t), req.sector, e)
            return VIRTIO_BLK_S_IOERR
        # virtio 1.2 §5.2.6.1: unknown types (and GET_LIFETIME, SECURE_ERASE, which we do
        # not offer) get VIRTIO_BLK_S_UNSUPP.
        return VIRTIO_BLK_S_UNSUPP

    def _range_ok(self, sector: int, nbytes: int) -> bool:
        """As qemu-storage-daemon's virtio_blk_sect_range_ok: whole sectors, aligned to
        the logical block size, inside the capacity."""
        if nbytes % SECTOR_SIZE:
            return False
        if (sector * SECTOR_SIZE) % self.blk_size:
            return False
        cap = self.capacity
        return sector <= cap and nbytes // SECTOR_SIZE <= cap - sector

    def _rw(self, req: BlkRequest, chain: Any, *, write: bool) -> int:
        if write:
            if self.read_only:
                # virtio 1.2 §5.2.6.1: "MUST set the status byte to VIRTIO_BLK_S_IOERR for a
                # write request if the VIRTIO_BLK_F_RO feature if offered".
                return VIRTIO_BLK_S_IOERR
            nbytes = chain.readable_len - REQ_HEADER.size
            if not self._range_ok(req.sector, nbytes):
                return VIRTIO_BLK_S_IOERR
            if nbytes:
                self.backend.writev(req.sector * SECTOR_SIZE,
                                    _slice(chain.readable, REQ_HEADER.size, nbytes))
            return VIRTIO_BLK_S_OK
        nbytes = chain.writable_len - 1  # the last writable byte is the status
        if not self._range_ok(req.sector, nbytes):
            return VIRTIO_BLK_S_IOERR
        if nbytes:
            self.backend.readv(req.sector * SECTOR_SIZE, _slice(chain.writable, 0, nbytes))
        return VIRTIO_BLK_S_OK

    def _get_id(self, chain: Any) -> int:
        room = min(chain.writable_len - 1, VIRTIO_BLK_ID_BYTES)
        # virtio 1.2 §5.2.6: a NUL-padded string, unterminated if 20 bytes long.
        chain.write_bytes(self.serial[:room].ljust(room, b"\0"))
        return VIRTIO_BLK_S_OK

    def _discard_write_zeroes(self, req: BlkRequest, chain: Any) -> int:
        t = req.type
        if self.read_only:
            return VIRTIO_BLK_S_IOERR  # as qemu-storage-daemon
        wz = t == VIRTIO_BLK_T_WRITE_ZEROES
        feature = BlkFeature.WRITE_ZEROES if wz else BlkFeature.DISCARD
        if not self._acked & self.virtio_features & feature:
            return VIRTIO_BLK_S_UNSUPP
        nbytes = chain.readable_len - REQ_HEADER.size
        if nbytes <= 0 or nbytes % DWZ_SEGMENT.size:
            return VIRTIO_BLK_S_IOERR
        nseg = nbytes // DWZ_SEGMENT.size
        max_seg = self.max_write_zeroes_seg if wz else self.max_discard_seg
        max_sectors = self.max_write_zeroes_sectors if wz else self.max_discard_sectors
        if nseg > max_seg:
            return VIRTIO_BLK_S_UNSUPP
        raw = _gather(chain.readable, REQ_HEADER.size, nbytes)
        segments = list(DWZ_SEGMENT.iter_unpack(raw))
        # Validate every segment before touching the disk.
        for sector, num, flags in segments:
            # virtio 1.2 §5.2.6.1: UNSUPP "if any unknown flag is set", and for discard
            # "if the unmap flag is set".
            if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
                return VIRTIO_BLK_S_UNSUPP
            if not wz and flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
                return VIRTIO_BLK_S_UNSUPP
            if num > max_sectors or not self._range_ok(sector, num * SECTOR_SIZE):
                return VIRTIO_BLK_S_IOERR
        for sector, num, flags in segments:
            if wz:
                self.backend.write_zeroes(sector * SECTOR_SIZE, num * SECTOR_SIZE,
                                          unmap=bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))
            else:
                self.backend.discard(sector * SECTOR_SIZE, num * SECTOR_SIZE)
        return VIRTIO_BLK_S_OK

    # -- completion --------------------------------------------------------------------------
    def _finish(self, index: int, chain: Any, status: int, why: str) -> None:
        self.stats[why] += 1
        chain.writable[-1][-1] = status
        self.complete_head(index, chain.head, chain.writable_len)

    def complete(self, req: BlkRequest, status: int) -> None:
        """Write ``req``'s status byte and queue it for :meth:`flush_completions`.

        The used length is the whole writable part, as qemu-storage-daemon reports it (the
        status byte is its last byte, so it is covered by the dirty-page report).

        Raises:
            ValueError: ``req`` was already completed (a device bug).
        """
        if req.status is not None:
            raise ValueError(f"{req!r} completed twice")
        req.status = status
        chain = req.chain
        chain.writable[-1][-1] = status
        self.stats[f"{_type_name(req.type)} {STATUS_NAMES.get(status, status)}"] += 1
        self.complete_head(req.queue, req.head, chain.writable_len)

    def complete_head(self, index: int, head: int, written: int) -> None:
        """Queue ``(head, written)`` of queue ``index`` for the next publication."""
        self._done[index].append((head, written))
        self._done_heads[index].append(head)

    def flush_completions(self, index: int, *, notify: bool = True) -> int:
        """Publish the completions queued for queue ``index``; return how many.

        With a tracker, in the spec's order: link the batch (``completing``), push (one
        ``used.idx`` store), clear the in-flight flags (``completed``). With ``notify``
        the driver is signalled if the ring says so (pass False from inside a burst: the
        burst loop notifies). If the ring is gone (stopped, broken) the completions are
        dropped: the requests stay in flight in the inflight area.

        A head that was not in flight, or a length past its buffer (device bugs), breaks
        the queue (the ring and the inflight area could disagree from then on) instead of
        raising.
        """
        done = self._done[index]
        if not done:
            return 0
        heads = self._done_heads[index]
        self._done[index] = []
        self._done_heads[index] = []
        queues = self._queues
        ring = queues.ring(index) if queues is not None else None
        if ring is None:
            log.warning("queue %d: ring gone; %d completions not published", index, len(done))
            return 0
        tracker = self._trackers.get(index)
        try:
            if tracker is not None:
                tracker.completing(heads)
            ring.push(done)
            if isinstance(tracker, SplitInflightTracker):
                tracker.completed(heads, ring.used_idx)
            elif tracker is not None:
                tracker.completed(ring, heads)
        except (RingError, ValueError) as e:
            # A device bug (a head completed twice, a length past the buffer): the ring and
            # the inflight area may now disagree, so the queue cannot go on safely.
            log.error("queue %d: publishing %d completions failed: %s", index, len(done), e)
            self._trackers.pop(index, None)
            if queues is not None:
                queues.ring_broken(index, f"publishing completions failed: {e}")
            return 0
        if notify and queues is not None and ring.should_notify():
            queues.notify(index)
        return len(done)


def _type_name(t: int) -> str:
    return _TYPE_NAMES.get(t, f"type{t}")


_TYPE_NAMES: Final = {
    VIRTIO_BLK_T_IN: "IN", VIRTIO_BLK_T_OUT: "OUT", VIRTIO_BLK_T_FLUSH: "FLUSH",
    VIRTIO_BLK_T_GET_ID: "GET_ID", VIRTIO_BLK_T_GET_LIFETIME: "GET_LIFETIME",
    VIRTIO_BLK_T_DISCARD: "DISCARD", VIRTIO_BLK_T_WRITE_ZEROES: "WRITE_ZEROES",
    VIRTIO_BLK_T_SECURE_ERASE: "SECURE_ERASE",
}
