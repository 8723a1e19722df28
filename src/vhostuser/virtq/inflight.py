"""Layout of the INFLIGHT_SHMFD shared area (vhost-user.rst "Inflight I/O tracking"). No I/O.

The back-end allocates one region per queue in a memfd it hands the front-end with
GET_INFLIGHT_FD; after a back-end crash the front-end hands it back with SET_INFLIGHT_FD and
the back-end resubmits what was in flight. Split queues:

``QueueRegionSplit``: features u64, version u16, desc_num u16, last_batch_head u16,
used_idx u16, then ``DescStateSplit[desc_num]`` of 16 bytes (inflight u8, padding[5],
next u16, counter u64).

Packed queues: a 32-byte ``QueueRegionPacked`` header then 32-byte ``DescStatePacked``
entries, a pool linked into a free list that holds a copy of every ring descriptor in
flight (a packed ring overwrites its slots with used descriptors, so the copies are what a
successor resubmits). Each queue's region is rounded up to 64 bytes, as libvhost-user does.

:class:`SplitInflightTracker` keeps one split queue's region in step with its ring,
following the spec's algorithm step by step so that a crash between any two stores is
recoverable, and :meth:`SplitInflightTracker.recover` repairs the region and lists what to
resubmit when the ring starts again. Every field it reads from the area (which the
front-end can write) is checked against our own queue size and ring first. Resubmission
goes through ``SplitDeviceRing.resubmit``, which walks each chain exactly as a pop does.
:class:`PackedInflightTracker` does the same for packed queues, with
``PackedDeviceRing.resubmit`` walking the copied descriptors.
"""

from __future__ import annotations

import logging
import struct
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from ..errors import RingError
from .state import StateField

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

INFLIGHT_ALIGNMENT = 64
#: The fields of :attr:`SplitInflightTracker.state`, in order.
TRACKER_STATE_FIELDS: Final = ("counter", "last_batch_head", "in_flight")
SPLIT_HEADER = 16
SPLIT_DESC = 16
PACKED_HEADER = 32
PACKED_DESC = 32
INFLIGHT_VERSION = 1


def _align(n: int, a: int = INFLIGHT_ALIGNMENT) -> int:
    return (n + a - 1) & ~(a - 1)


def inflight_queue_bytes(queue_size: int, packed: bool) -> int:
    """Bytes of one queue's region in the inflight area (64-byte aligned).

    Raises:
        ValueError: queue_size outside 1..32768.
    """
    if not 1 <= queue_size <= 32768:
        raise ValueError(f"inflight queue_size {queue_size} is outside 1..32768")
    if packed:
        return _align(PACKED_HEADER + PACKED_DESC * queue_size)
    return _align(SPLIT_HEADER + SPLIT_DESC * queue_size)


def inflight_area_bytes(num_queues: int, queue_size: int, packed: bool) -> int:
    """Bytes of the whole inflight area for ``num_queues`` queues.

    Raises:
        ValueError: num_queues outside 1..256 or a bad queue_size.
    """
    if not 1 <= num_queues <= 256:
        raise ValueError(f"inflight num_queues {num_queues} is outside 1..256")
    return num_queues * inflight_queue_bytes(queue_size, packed)


class InflightArea:
    """The whole inflight area as mapped by the shell, split into per-queue views."""

    __slots__ = ("buf", "num_queues", "packed", "queue_bytes", "queue_size")

    def __init__(self, buf: memoryview, num_queues: int, queue_size: int, packed: bool):
        """Wrap ``buf`` (at least :func:`inflight_area_bytes` long).

        Raises:
            ValueError: ``buf`` is too small for the queues it must hold.
        """
        need = inflight_area_bytes(num_queues, queue_size, packed)
        if len(buf) < need:
            raise ValueError(
                f"inflight area of {len(buf)} bytes is smaller than the {need} bytes "
                f"{num_queues} queues of size {queue_size} need"
            )
        self.buf = buf
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.packed = packed
        self.queue_bytes = inflight_queue_bytes(queue_size, packed)

    def queue(self, index: int) -> memoryview:
        """The region of queue ``index``.

        Raises:
            ValueError: index outside 0..num_queues-1.
        """
        if not 0 <= index < self.num_queues:
            raise ValueError(f"inflight queue {index} is outside 0..{self.num_queues - 1}")
        off = index * self.queue_bytes
        return self.buf[off : off + self.queue_bytes]


# ---------------------------------------------------------------------------------------
# Split-ring tracking (vhost-user.rst "Inflight I/O tracking", split virtqueue algorithm)
# ---------------------------------------------------------------------------------------

#: ``QueueRegionSplit`` header: features u64, version u16, desc_num u16, last_batch_head u16,
#: used_idx u16.
SPLIT_HEADER_STRUCT: Final = struct.Struct("<QHHHH")
#: ``DescStateSplit``: inflight u8, padding[5], next u16, counter u64.
SPLIT_DESC_STRUCT: Final = struct.Struct("<B5xHQ")

# Positions of the header fields in 16-bit units, and of a descriptor's fields relative to
# its entry (entry i starts at byte SPLIT_HEADER + SPLIT_DESC * i).
_H_VERSION: Final = 4
_H_DESC_NUM: Final = 5
_H_LAST_BATCH: Final = 6
_H_USED_IDX: Final = 7

#: Largest counter we accept from an area: a counter that starts at 0 and grows by one per
#: request cannot get near 2**63 (292 years at 10**9 requests a second); anything larger is
#: garbage, and taking ``max + 1`` from it could overflow the u64.
MAX_SANE_COUNTER: Final = 1 << 63


class InflightError(RingError, ValueError):
    """An inflight area (shared with, and writable by, the front-end) is inconsistent.

    A :class:`~vhostuser.errors.RingError` (the queue cannot be resumed: mark it broken) and
    a ``ValueError`` (the connection core NACKs a SET_INFLIGHT_FD that carries it).
    """


def _check_geometry(area: InflightArea, index: int, queue_size: int, name: str, *,
                    packed: bool) -> None:
    """A tracker for queue ``index`` of ``queue_size`` fits ``area``.

    Raises:
        InflightError: the queue is not in the area, the layouts differ, or the area was
            made for another queue size.
    """
    if not 0 <= index < area.num_queues:
        raise InflightError(f"{name}: queue {index} is not in the area ({area.num_queues} queues)")
    if area.packed != packed:
        have, ring = ("packed", "split") if area.packed else ("split", "packed")
        raise InflightError(f"{name}: the area has the {have} layout, the ring is {ring}")
    if queue_size != area.queue_size:
        raise InflightError(
            f"{name}: the area was made for queue size {area.queue_size}, the ring has "
            f"{queue_size}"
        )


@dataclass(frozen=True, slots=True)
class SplitRecovery:
    """What :meth:`SplitInflightTracker.recover` found.

    Attributes:
        heads: head descriptors still in flight, in the order they were first popped
            (ascending counter): resubmit them in this order.
        next_avail: the avail index to resume popping from (``used.idx + len(heads)``),
            or None when the region was uninitialized (the ring's own base stands).
        cleared: in-flight flags of the last, interrupted batch that were cleared because
            ``used.idx`` shows that batch was published.
        initialized: the region was uninitialized (version 0) and has now been set up.
    """

    heads: tuple[int, ...]
    next_avail: int | None
    cleared: int = 0
    initialized: bool = False


def _check_common_header(size: int, name: str, features: int, version: int,
                         desc_num: int) -> None:
    """The fields both region layouts start with, for an initialized region.

    Raises:
        InflightError: a field disagrees with the spec or with our queue size.
    """
    if version != INFLIGHT_VERSION:
        raise InflightError(f"{name}: version {version} is not {INFLIGHT_VERSION}")
    if features != 0:
        # vhost-user.rst: "The feature flags of this region. Now it's initialized to 0."
        raise InflightError(f"{name}: features {features:#x} are unknown (expected 0)")
    if desc_num != size:
        # vhost-user.rst: desc_num "is equal to the virtqueue size".
        raise InflightError(f"{name}: desc_num {desc_num} is not the queue size {size}")


def _read_split(
    snap: bytes, queue_size: int, name: str
) -> tuple[int, int, int, list[tuple[int, int, int]]]:
    """Decode and check one snapshot of a split queue region (not yet initialized: None).

    Returns ``(version, last_batch_head, used_idx, entries)`` where entries are
    ``(inflight, next, counter)``; for version 0 ``entries`` is empty.

    Raises:
        InflightError: a field disagrees with our queue size or is out of range.
    """
    need = SPLIT_HEADER + SPLIT_DESC * queue_size
    if len(snap) < need:
        raise InflightError(
            f"{name}: region of {len(snap)} bytes is smaller than the {need} bytes a queue of "
            f"size {queue_size} needs"
        )
    features, version, desc_num, lbh, used = SPLIT_HEADER_STRUCT.unpack_from(snap, 0)
    if version == 0:
        # vhost-user.rst QueueRegionSplit.version: "Zero value indicates an uninitialized
        # buffer"; its other fields mean nothing yet.
        return 0, 0, 0, []
    _check_common_header(queue_size, name, features, version, desc_num)
    if lbh >= queue_size:
        raise InflightError(
            f"{name}: last_batch_head {lbh} is outside the queue (size {queue_size})"
        )
    entries = list(SPLIT_DESC_STRUCT.iter_unpack(snap[SPLIT_HEADER:need]))
    seen: dict[int, int] = {}
    for i, (flag, _nxt, counter) in enumerate(entries):
        if flag > 1:
            raise InflightError(f"{name}: desc[{i}].inflight is {flag}, not 0 or 1")
        if flag:
            if counter >= MAX_SANE_COUNTER:
                raise InflightError(f"{name}: desc[{i}].counter {counter:#x} is not sane")
            other = seen.get(counter)
            if other is not None:
                raise InflightError(
                    f"{name}: desc[{other}] and desc[{i}] are both in flight with counter "
                    f"{counter}: their order is unknown"
                )
            seen[counter] = i
    return version, lbh, used, entries


def check_split_region(region: memoryview | bytes, queue_size: int, name: str = "inflight") -> int:
    """Validate what can be validated of a split queue region without its ring.

    Used when SET_INFLIGHT_FD adopts an area: every field is checked against our own queue
    size. Returns how many heads are marked in flight (0 for an uninitialized region).

    Raises:
        InflightError: the region is too small, or a field is out of range or inconsistent.
    """
    _v, _lbh, _used, entries = _read_split(bytes(region), queue_size, name)
    return sum(1 for e in entries if e[0])


class SplitInflightTracker:
    """Keeps one split queue's region of the inflight area (vhost-user.rst "Inflight I/O
    tracking") in step with the ring, so a restarted back-end can resubmit what was in
    flight.

    The device calls, in this order per request:

    1. :meth:`popped` right after the chain is taken from the avail ring, before any side
       effect (spec: set ``counter``, then ``inflight = 1``);
    2. :meth:`completing` with a batch of heads before ``used.idx`` is published (spec:
       ``desc[i].next = last_batch_head; last_batch_head = i``);
    3. the ring's ``push`` (publishes the used elements and ``used.idx`` in one store);
    4. :meth:`completed` with the same batch and the new ``used.idx`` (spec: clear
       ``inflight``, then ``used_idx``).

    A crash between any two stores leaves a region :meth:`recover` can repair. The tracker
    only writes the area during normal operation; it reads it once, in :meth:`recover`,
    from a snapshot whose every field is checked against our own queue size and ring.

    The tracker keeps no view of the area between calls (each call takes one and releases
    it), so the connection can unmap the area whenever it is replaced or the session ends.
    Indices are stored as single aligned 16-bit stores (``memoryview.cast('H')``), as the
    rings do (docs/architecture.md "Memory ordering"); x86-64 keeps stores in program order, so the
    spec's order of stores is the order a successor process finds them in after a crash.

    Args:
        area: the whole inflight area (the shell's mapping).
        index: the queue this tracker serves.
        queue_size: our negotiated queue size (SET_VRING_NUM), never the area's desc_num.
        name: used in error messages.

    Raises:
        InflightError: ``index`` is not in the area, or the area was made for another
            queue size.
    """

    __slots__ = ("_area", "_index", "_name", "_size", "_st")

    def __init__(
        self, area: InflightArea, index: int, queue_size: int, *, name: str = "inflight"
    ) -> None:
        _check_geometry(area, index, queue_size, name, packed=False)
        self._area = area
        self._index = index
        self._size = queue_size
        self._name = name
        # counter, last_batch_head, in_flight: one block the compiled engine updates too
        # (TRACKER_STATE_FIELDS).
        self._st = array("q", (0, 0, 0))

    @property
    def state(self) -> array[int]:
        """The state block (see :data:`TRACKER_STATE_FIELDS`), for the compiled engine."""
        return self._st

    @property
    def in_flight(self) -> int:
        """Heads this tracker has marked in flight and not completed."""
        return self._st[2]

    _counter = StateField(0)
    _last_batch = StateField(1)

    def region(self) -> memoryview:
        """A fresh byte view of this queue's region of the area, for the compiled engine
        (release it after use).

        Raises:
            ValueError: the area was released.
        """
        return self._region()

    @property
    def queue_size(self) -> int:
        """The queue size the region is checked against."""
        return self._size

    @property
    def counter(self) -> int:
        """The counter the next popped head gets."""
        return self._counter

    def _region(self) -> memoryview:
        """A fresh byte view of this queue's region (release it after use).

        Raises:
            ValueError: the area was released (the connection dropped it).
        """
        mv = self._area.queue(self._index)
        return mv if mv.format == "B" else mv.cast("B")

    # -- recovery ----------------------------------------------------------------------------
    def recover(self, used_idx: int, avail_idx: int) -> SplitRecovery:
        """Bring the region in line with the ring at ring start; say what to resubmit.

        ``used_idx`` is ``used.idx`` as the new ring read it from guest memory; ``avail_idx``
        is ``avail.idx`` (bounds the number of requests the driver can have outstanding).

        vhost-user.rst, "When reconnecting": if ``used_idx`` in the region differs from
        ``used.idx``, the last batch was published before the crash: clear the inflight
        flag of its ``used.idx - used_idx`` entries, walking the list from
        ``last_batch_head``; set ``used_idx``; resubmit the in-flight entries in counter
        order. An uninitialized region (version 0) is set up and nothing is resubmitted.

        Raises:
            InflightError: a field is out of range (desc_num, last_batch_head, next,
                inflight), counters repeat, the last batch list loops or leaves the queue,
                or the counts disagree with the ring (more in flight than the driver has
                outstanding, or a batch larger than the queue while heads are in flight).
                Nothing has been written to the region then.
            ValueError: the area was released.
        """
        size = self._size
        name = self._name
        used_idx &= 0xFFFF
        avail_idx &= 0xFFFF
        b = self._region()
        try:
            snap = b.tobytes()  # every field read exactly once, from this snapshot
            version, lbh, area_used, entries = _read_split(snap, size, name)
            if version == 0:
                self._initialize(b, used_idx)
                return SplitRecovery((), None, initialized=True)
            flags = [e[0] for e in entries]
            clear = self._last_batch_entries(flags, entries, lbh, area_used, used_idx)
            for i in clear:
                flags[i] = 0
            heads = sorted((i for i in range(size) if flags[i]), key=lambda i: entries[i][2])
            outstanding = (avail_idx - used_idx) & 0xFFFF
            if len(heads) > outstanding:
                raise InflightError(
                    f"{name}: {len(heads)} heads are in flight but the driver has only "
                    f"{outstanding} requests outstanding (avail.idx {avail_idx}, used.idx "
                    f"{used_idx})"
                )
            # Apply: clear the published batch's flags, then used_idx (the spec's order, so
            # a crash now is recovered the same way again).
            for i in clear:
                b[SPLIT_HEADER + SPLIT_DESC * i] = 0
            h16 = b.cast("H")
            h16[_H_USED_IDX] = used_idx
            h16.release()
        finally:
            b.release()
        self._last_batch = lbh
        self._counter = entries[heads[-1]][2] + 1 if heads else 0
        self._st[2] = len(heads)
        return SplitRecovery(tuple(heads), (used_idx + len(heads)) & 0xFFFF, len(clear))

    def _last_batch_entries(
        self,
        flags: list[int],
        entries: list[tuple[int, int, int]],
        lbh: int,
        area_used: int,
        used_idx: int,
    ) -> list[int]:
        """Heads of the batch published just before a crash (still flagged in flight)."""
        size = self._size
        name = self._name
        batch = (used_idx - area_used) & 0xFFFF
        if not batch:
            return []
        if batch > size:
            in_flight_now = sum(flags)
            if in_flight_now:
                raise InflightError(
                    f"{name}: used.idx {used_idx} is {batch} entries past the region's "
                    f"used_idx {area_used}, more than the queue size {size}, with "
                    f"{in_flight_now} heads in flight"
                )
            # Nothing is in flight: the ring was re-created (a driver reset) since the
            # region was last written. Only used_idx needs to follow.
            return []
        clear: list[int] = []
        idx = lbh
        visited: set[int] = set()
        for k in range(batch):
            if idx in visited:
                raise InflightError(
                    f"{name}: the last batch list from last_batch_head {lbh} loops back to "
                    f"desc[{idx}] after {k} of {batch} entries"
                )
            visited.add(idx)
            if flags[idx]:
                clear.append(idx)
            if k + 1 < batch:
                nxt = entries[idx][1]
                if nxt >= size:
                    raise InflightError(
                        f"{name}: desc[{idx}].next {nxt} of the last batch is outside the "
                        f"queue (size {size})"
                    )
                idx = nxt
        return clear

    def _initialize(self, b: memoryview, used_idx: int) -> None:
        """Set up an uninitialized region: zeroed entries, then version last."""
        b[:] = bytes(len(b))
        h16 = b.cast("H")
        h16[_H_DESC_NUM] = self._size
        h16[_H_USED_IDX] = used_idx
        h16[_H_VERSION] = INFLIGHT_VERSION
        h16.release()
        self._counter = 0
        self._last_batch = 0
        self._st[2] = 0

    # -- normal operation ---------------------------------------------------------------------
    def _check_heads(self, heads: Sequence[int]) -> None:
        size = self._size
        for h in heads:
            if not 0 <= h < size:
                raise ValueError(f"{self._name}: head {h} is outside the queue (size {size})")

    def popped(self, heads: Sequence[int]) -> None:
        """Record heads just taken from the avail ring, in pop order.

        vhost-user.rst: "Set desc[i].counter to the value of global counter; increase
        global counter by 1; set desc[i].inflight to 1" - counter stored before the flag.

        Raises:
            ValueError: a head is outside the queue (a caller bug: rings validate heads),
                or the area was released.
        """
        if not heads:
            return
        self._check_heads(heads)
        b = self._region()
        q = b.cast("Q")
        c = self._counter
        try:
            for h in heads:
                q[3 + 2 * h] = c  # desc[h].counter: byte 16 + 16h + 8, in u64 units
                b[SPLIT_HEADER + SPLIT_DESC * h] = 1
                c += 1
        finally:
            q.release()
            b.release()
        self._counter = c
        self._st[2] += len(heads)

    def completing(self, heads: Sequence[int]) -> None:
        """Link a batch about to be published as used (before ``used.idx`` moves).

        vhost-user.rst: "Set desc[i].next to last_batch_head; set last_batch_head to i".

        Raises:
            ValueError: a head is outside the queue (a caller bug), or the area was
                released.
        """
        if not heads:
            return
        self._check_heads(heads)
        b = self._region()
        h16 = b.cast("H")
        lbh = self._last_batch
        try:
            for h in heads:
                h16[11 + 8 * h] = lbh  # desc[h].next: byte 16 + 16h + 6, in u16 units
                lbh = h
                h16[_H_LAST_BATCH] = h
        finally:
            h16.release()
            b.release()
        self._last_batch = lbh

    def completed(self, heads: Sequence[int], used_idx: int) -> None:
        """The batch is published and ``used.idx`` is now ``used_idx``.

        vhost-user.rst: "Set the inflight field of each DescStateSplit entry in the batch
        to 0; set used_idx to the idx value of used ring".

        Raises:
            ValueError: a head is outside the queue (a caller bug), or the area was
                released.
        """
        self._check_heads(heads)
        b = self._region()
        h16 = b.cast("H")
        try:
            for h in heads:
                b[SPLIT_HEADER + SPLIT_DESC * h] = 0
            h16[_H_USED_IDX] = used_idx & 0xFFFF
        finally:
            h16.release()
            b.release()
        self._st[2] -= len(heads)


def prepare_fresh_area(area: InflightArea) -> None:
    """Stamp ``desc_num`` into every queue region of a new area (as libvhost-user does on
    GET_INFLIGHT_FD); ``version`` stays 0 until a ring starts on the region."""
    for i in range(area.num_queues):
        region = area.queue(i)
        try:
            struct.pack_into("<H", region, 2 * _H_DESC_NUM, area.queue_size)
        finally:
            region.release()




# ---------------------------------------------------------------------------------------
# Packed-ring tracking (vhost-user.rst "Inflight I/O tracking", packed virtqueue algorithm)
# ---------------------------------------------------------------------------------------

#: ``QueueRegionPacked`` header: features u64, version u16, desc_num u16, free_head u16,
#: old_free_head u16, used_idx u16, old_used_idx u16, used_wrap_counter u8,
#: old_used_wrap_counter u8, padding[7]; the 8-byte aligned ``desc[]`` starts at byte 32.
PACKED_HEADER_STRUCT: Final = struct.Struct("<QHHHHHHBB")
#: ``DescStatePacked``: inflight u8, padding u8, next u16, last u16, num u16, counter u64,
#: id u16, flags u16, len u32, addr u64.
PACKED_DESC_STRUCT: Final = struct.Struct("<BxHHHQHHIQ")
#: The descriptor copy at the end of a ``DescStatePacked`` (id, flags, len, addr).
_PACKED_COPY: Final = struct.Struct("<HHIQ")

# Header fields in 16-bit units (free_head..old_used_idx) and bytes (the wrap counters);
# features, version and desc_num sit where they sit in the split header (_H_VERSION ...).
_P_FREE_HEAD: Final = 6
_P_OLD_FREE_HEAD: Final = 7
_P_USED_IDX: Final = 8
_P_OLD_USED_IDX: Final = 9
_P_USED_WRAP_BYTE: Final = 20
_P_OLD_USED_WRAP_BYTE: Final = 21

_AVAIL_BIT: Final = 1 << 7
_USED_BIT: Final = 1 << 15


def _pd(i: int) -> int:
    """Byte offset of ``desc[i]`` in a packed queue region."""
    return PACKED_HEADER + PACKED_DESC * i


@dataclass(frozen=True, slots=True)
class PackedRecovery:
    """What :meth:`PackedInflightTracker.recover` found.

    Attributes:
        buffers: the buffers still in flight, in the order they were first popped
            (ascending counter), each as its ring descriptors ``(addr, len, id, flags)``
            copied when it was popped: hand them to ``PackedDeviceRing.resubmit``.
        next_avail, avail_wrap: where popping resumes (``used_idx`` plus the descriptors
            in flight).
        used_idx, used_wrap: where the next used descriptor goes.
        committed: the last batch had been published before the crash and its update of
            the region was completed; False when there was nothing to commit or it was
            rolled back.
        initialized: the region was uninitialized (version 0) and has now been set up
            from the ring's own position; nothing is resubmitted.
    """

    buffers: tuple[tuple[tuple[int, int, int, int], ...], ...]
    next_avail: int
    avail_wrap: bool
    used_idx: int
    used_wrap: bool
    committed: bool = False
    initialized: bool = False


class PackedInflightTracker:
    """Keeps one packed queue's region of the inflight area in step with the ring.

    The region is a pool of ``desc_num`` entries linked into a free list
    (``free_head``/``next``). Popping a buffer takes one entry per ring descriptor from the
    free list and copies the descriptor into it (a packed ring reuses its slots for used
    descriptors, so the copies are what a successor resubmits); the first entry is the
    buffer's head entry (``inflight``, ``counter``, ``num``, ``last``). Completing a batch
    gives the entries back and advances ``used_idx``; the ``old_*`` fields are the last
    consistent state, which recovery rolls back to unless the ring shows the batch was
    published.

    The device calls, per request: :meth:`popped` right after the pop (before any side
    effect), then for each batch of completions :meth:`completing`, the ring's ``push``,
    and :meth:`completed`. The ring is passed in each time, never kept: the connection
    may rebuild it, and a kept reference would keep its views of guest memory alive. The
    tracker keeps a private copy of the free list and of each buffer's entries; it reads
    the area once, in :meth:`recover`, from a snapshot whose every field is checked
    against our queue size and the ring.

    Args:
        area: the whole inflight area (packed layout).
        index: the queue this tracker serves.
        queue_size: our negotiated queue size.
        name: used in error messages.

    Raises:
        InflightError: ``index`` is not in the area, the area has the split layout, or it
            was made for another queue size.
    """

    __slots__ = (
        "_area", "_counter", "_entry_of", "_free_head", "_index", "_last", "_name", "_next",
        "_num", "_size", "_used_idx", "_used_wrap", "in_flight",
    )

    def __init__(
        self, area: InflightArea, index: int, queue_size: int, *, name: str = "inflight"
    ) -> None:
        _check_geometry(area, index, queue_size, name, packed=True)
        self._area = area
        self._index = index
        self._size = queue_size
        self._name = name
        self._counter = 0
        self._next: list[int] = []
        self._free_head = 0
        self._used_idx = 0
        self._used_wrap = 1
        self._entry_of: dict[int, int] = {}  # buffer id -> head entry
        self._last: dict[int, int] = {}  # head entry -> last entry of the buffer
        self._num: dict[int, int] = {}  # head entry -> ring descriptors of the buffer
        self.in_flight = 0
        """Buffers this tracker has marked in flight and not completed."""

    @property
    def counter(self) -> int:
        """The counter the next popped buffer gets."""
        return self._counter

    def _region(self) -> memoryview:
        mv = self._area.queue(self._index)
        return mv if mv.format == "B" else mv.cast("B")

    # -- recovery ----------------------------------------------------------------------------
    def recover(self, ring: Any) -> PackedRecovery:
        """Bring the region in line with ``ring`` (a started ``PackedDeviceRing``) and say
        what to resubmit.

        vhost-user.rst, "When reconnecting" (packed): if ``used_idx`` differs from
        ``old_used_idx``, the descriptor at ``old_used_idx`` tells whether the last batch
        was published (it no longer looks available in the lap of
        ``old_used_wrap_counter``): then commit (``old_*`` := current), else roll back
        (current := ``old_*``); clear ``inflight`` of every entry on the free list;
        resubmit the in-flight buffers in counter order.

        The position in an initialized area is authoritative, whatever SET_VRING_BASE
        said: after a crash QEMU cannot learn a packed ring's position (it restores nothing
        for packed rings), so its base is stale; after a clean stop the two agree. A
        front-end that resets the device must hand over a fresh area (QEMU gets a new one
        with GET_INFLIGHT_FD after every reset). An uninitialized region (version 0) is
        set up from the ring's position.

        Raises:
            InflightError: a field is out of range, the free list loops or leaves the
                pool, buffers' entries overlap or disagree with ``num``/``last``, the
                entries do not add up to ``desc_num``, counters repeat, or the ring's
                slots where the area says buffers are in flight are not available. Nothing
                has been written to the region then.
            ValueError: the area was released.
        """
        size = self._size
        name = self._name
        b = self._region()
        try:
            snap = b.tobytes()
            need = _pd(size)
            if len(snap) < need:
                raise InflightError(
                    f"{name}: region of {len(snap)} bytes is smaller than the {need} bytes a "
                    f"queue of size {size} needs"
                )
            (features, version, desc_num, free_head, old_free_head, used_idx, old_used_idx,
             used_wrap, old_used_wrap) = PACKED_HEADER_STRUCT.unpack_from(snap, 0)
            if version == 0:
                self._initialize(b, ring.used_idx, int(ring.used_wrap))
                return PackedRecovery((), ring.next_avail, bool(ring.avail_wrap),
                                      ring.used_idx, bool(ring.used_wrap), initialized=True)
            _check_packed_header(size, name, features, version, desc_num, free_head,
                                 old_free_head, used_idx, old_used_idx, used_wrap,
                                 old_used_wrap)
            entries = list(PACKED_DESC_STRUCT.iter_unpack(snap[PACKED_HEADER:need]))
            committed = False
            partial = 0  # descriptors of an unpublished batch push may have half-written
            if (used_idx, used_wrap) != (old_used_idx, old_used_wrap):
                f = ring.descriptor_flags(old_used_idx)
                avail = _AVAIL_BIT if old_used_wrap else _USED_BIT
                if f & (_AVAIL_BIT | _USED_BIT) != avail:
                    # Published before the crash: commit the in-progress update.
                    old_free_head, old_used_idx, old_used_wrap = free_head, used_idx, used_wrap
                    committed = True
                else:
                    # Not published: the push may have stored the batch's other used
                    # descriptors already (the first one's flags go last). Its slots are
                    # in flight again after the roll back, and must look available again.
                    partial = ((used_idx + used_wrap * size)
                               - (old_used_idx + old_used_wrap * size)) % (2 * size)
            # Roll back whatever is still in progress (a pop or an unpublished batch).
            free_head, used_idx, used_wrap = old_free_head, old_used_idx, old_used_wrap
            nxt = [e[1] for e in entries]
            free = _packed_free_list(size, name, nxt, free_head)
            heads = [i for i in range(size) if entries[i][0] and i not in free]
            buffers, chains = _packed_buffers(size, name, entries, nxt, heads, free)
            ndesc = sum(len(c) for c in chains)
            next_avail, avail_wrap = used_idx + ndesc, used_wrap
            if next_avail >= size:
                next_avail -= size
                avail_wrap ^= 1
            if partial > ndesc:
                raise InflightError(
                    f"{name}: the unpublished batch spans {partial} descriptors from slot "
                    f"{used_idx}, more than the {ndesc} in flight"
                )
            self._check_ring(ring, used_idx, used_wrap, ndesc, partial)
            if partial:
                n = ring.make_available(used_idx, bool(used_wrap), partial)
                if n:
                    log.info("%s: %d used descriptors of an unpublished batch made available "
                             "again", name, n)
            # Apply, in the spec's order: commit or roll back the header, then clear the
            # in-flight flags on the free list.
            h16 = b.cast("H")
            try:
                h16[_P_OLD_FREE_HEAD] = free_head
                h16[_P_OLD_USED_IDX] = used_idx
                b[_P_OLD_USED_WRAP_BYTE] = used_wrap
                h16[_P_FREE_HEAD] = free_head
                h16[_P_USED_IDX] = used_idx
                b[_P_USED_WRAP_BYTE] = used_wrap
            finally:
                h16.release()
            for i in free:
                if entries[i][0]:
                    b[_pd(i)] = 0
        finally:
            b.release()
        self._next = nxt
        self._free_head = free_head
        self._used_idx = used_idx
        self._used_wrap = used_wrap
        self._entry_of.clear()
        self._last.clear()
        self._num.clear()
        order = sorted(range(len(heads)), key=lambda k: entries[heads[k]][4])
        for h, chain in zip(heads, chains, strict=True):
            self._entry_of[entries[chain[-1]][5]] = h
            self._last[h] = chain[-1]
            self._num[h] = len(chain)
        self._counter = max((entries[h][4] for h in heads), default=-1) + 1
        self.in_flight = len(heads)
        return PackedRecovery(
            tuple(buffers[k] for k in order), next_avail, bool(avail_wrap), used_idx,
            bool(used_wrap), committed,
        )

    def _check_ring(self, ring: Any, used_idx: int, used_wrap: int, ndesc: int,
                    partial: int = 0) -> None:
        """The slots the area says hold buffers in flight must still look available: the
        driver cannot reuse them, and the device writes used descriptors only from
        ``used_idx`` on - except the first ``partial`` slots, which an interrupted push
        may have marked used (in the same lap)."""
        size = self._size
        slot, wrap = used_idx, used_wrap
        for k in range(ndesc):
            f = ring.descriptor_flags(slot) & (_AVAIL_BIT | _USED_BIT)
            want = _AVAIL_BIT if wrap else _USED_BIT
            used = (_AVAIL_BIT | _USED_BIT) if wrap else 0
            if f != want and not (k < partial and f == used):
                raise InflightError(
                    f"{self._name}: the area has {ndesc} descriptors in flight from slot "
                    f"{used_idx} (wrap {used_wrap}), but slot {slot} (descriptor {k}) has "
                    f"flags {f:#x}, not available in lap {wrap}"
                )
            slot += 1
            if slot == size:
                slot = 0
                wrap ^= 1

    def _initialize(self, b: memoryview, used_idx: int, used_wrap: int) -> None:
        """Set up an uninitialized region: a free list of every entry, the ring's used
        position, then ``version`` last."""
        size = self._size
        b[:] = bytes(len(b))
        for i in range(size):
            struct.pack_into("<H", b, _pd(i) + 2, i + 1)
        h16 = b.cast("H")
        try:
            h16[_H_DESC_NUM] = size
            h16[_P_USED_IDX] = h16[_P_OLD_USED_IDX] = used_idx
            b[_P_USED_WRAP_BYTE] = b[_P_OLD_USED_WRAP_BYTE] = used_wrap
            h16[_H_VERSION] = INFLIGHT_VERSION
        finally:
            h16.release()
        self._next = list(range(1, size + 1))
        self._free_head = 0
        self._used_idx = used_idx
        self._used_wrap = used_wrap
        self._counter = 0
        self._entry_of.clear()
        self._last.clear()
        self._num.clear()
        self.in_flight = 0

    # -- normal operation ---------------------------------------------------------------------
    def popped(self, ring: Any, buffer_ids: Sequence[int]) -> None:
        """Record buffers just popped from ``ring``, in pop order.

        vhost-user.rst (packed, "When receiving available buffers"): the head entry
        (``old_free_head``) gets ``num``, ``counter`` and ``inflight``; each ring
        descriptor is copied into the next free entry; ``free_head`` follows; ``last`` and
        finally ``old_free_head`` commit the buffer.

        Raises:
            ValueError: a buffer is not in flight on the ring, or the pool has no free
                entry left (caller bugs: the ring bounds descriptors in flight by the
                queue size), or the area was released.
        """
        if not buffer_ids:
            return
        size = self._size
        nxt = self._next
        b = self._region()
        h16 = b.cast("H")
        q = b.cast("Q")
        try:
            for bid in buffer_ids:
                descs = ring.descriptors(bid)
                head = self._free_head
                if head == size or bid in self._entry_of:
                    raise ValueError(
                        f"{self._name}: no free entry for buffer {bid}"
                        if head == size else f"{self._name}: buffer {bid} is already tracked"
                    )
                hoff = _pd(head)
                h16[(hoff >> 1) + 3] = 0  # num
                q[(hoff >> 3) + 1] = self._counter  # counter
                b[hoff] = 1  # inflight
                self._counter += 1
                fh = head
                last = head
                pack = _PACKED_COPY.pack_into
                for addr, ln, did, fl in descs:
                    if fh == size:
                        raise ValueError(f"{self._name}: the pool ran out of entries")
                    last = fh
                    pack(b, PACKED_HEADER + PACKED_DESC * fh + 16, did, fl, ln, addr)
                    fh = nxt[fh]
                # The spec moves free_head per descriptor; once per buffer is the same to
                # recovery, which rolls free_head back to old_free_head until the commit.
                h16[_P_FREE_HEAD] = fh
                h16[(hoff >> 1) + 2] = last  # last
                h16[(hoff >> 1) + 3] = len(descs)  # num
                h16[_P_OLD_FREE_HEAD] = fh  # the buffer is recorded
                self._free_head = fh
                self._entry_of[bid] = head
                self._last[head] = last
                self._num[head] = len(descs)
                self.in_flight += 1
        finally:
            q.release()
            h16.release()
            b.release()

    def completing(self, buffer_ids: Sequence[int]) -> None:
        """Give a batch's entries back and advance ``used_idx``, before the ring's push.

        vhost-user.rst (packed, "When supplying used buffers"): ``desc[e.last].next =
        free_head; free_head = e`` per buffer, then ``used_idx`` (and the wrap counter)
        moves by the batch's descriptors.

        Raises:
            ValueError: a buffer is not tracked (a caller bug), or the area was released.
        """
        if not buffer_ids:
            return
        size = self._size
        nxt = self._next
        b = self._region()
        h16 = b.cast("H")
        try:
            fh = self._free_head
            used, wrap = self._used_idx, self._used_wrap
            for bid in buffer_ids:
                e = self._entry_of.get(bid)
                if e is None:
                    raise ValueError(f"{self._name}: buffer {bid} is not tracked")
                last = self._last[e]
                nxt[last] = fh
                h16[(_pd(last) >> 1) + 1] = fh  # desc[last].next
                fh = e
                h16[_P_FREE_HEAD] = fh
                used += self._num[e]
                if used >= size:
                    used -= size
                    wrap ^= 1
            h16[_P_USED_IDX] = used
            b[_P_USED_WRAP_BYTE] = wrap
            self._free_head = fh
            self._used_idx, self._used_wrap = used, wrap
        finally:
            h16.release()
            b.release()

    def completed(self, ring: Any, buffer_ids: Sequence[int]) -> None:
        """The batch is published on ``ring``: clear its in-flight flags, then make the
        state the new consistent one (``old_free_head``, ``old_used_idx``,
        ``old_used_wrap_counter``).

        Raises:
            InflightError: the ring's used position disagrees with ours (a device bug).
            ValueError: a buffer is not tracked (a caller bug), or the area was released.
        """
        if (ring.used_idx, int(ring.used_wrap)) != (self._used_idx, self._used_wrap):
            raise InflightError(
                f"{self._name}: the ring's used position {ring.used_idx}/{int(ring.used_wrap)} "
                f"is not the tracked {self._used_idx}/{self._used_wrap}"
            )
        b = self._region()
        h16 = b.cast("H")
        try:
            for bid in buffer_ids:
                e = self._entry_of.pop(bid, None)
                if e is None:
                    raise ValueError(f"{self._name}: buffer {bid} is not tracked")
                b[_pd(e)] = 0
                del self._last[e]
                del self._num[e]
                self.in_flight -= 1
            h16[_P_OLD_FREE_HEAD] = self._free_head
            h16[_P_OLD_USED_IDX] = self._used_idx
            b[_P_OLD_USED_WRAP_BYTE] = self._used_wrap
        finally:
            h16.release()
            b.release()


def prepare_fresh_packed_area(area: InflightArea) -> None:
    """Set up every queue region of a new packed area as a full free list (``desc_num``,
    ``next = i + 1``, both used wrap counters 1, as DPDK does on GET_INFLIGHT_FD);
    ``version`` stays 0 until a ring starts on the region."""
    size = area.queue_size
    for q in range(area.num_queues):
        region = area.queue(q)
        try:
            struct.pack_into("<H", region, 2 * _H_DESC_NUM, size)
            region[_P_USED_WRAP_BYTE] = region[_P_OLD_USED_WRAP_BYTE] = 1
            for i in range(size):
                struct.pack_into("<H", region, _pd(i) + 2, i + 1)
        finally:
            region.release()


def _check_packed_header(size: int, name: str, features: int, version: int, desc_num: int,
                         free_head: int, old_free_head: int, used_idx: int, old_used_idx: int,
                         used_wrap: int, old_used_wrap: int) -> None:
    """Check a version-1 ``QueueRegionPacked`` header against our queue size."""
    _check_common_header(size, name, features, version, desc_num)
    # free_head == desc_num: every entry is in use (the list's end marker).
    for what, v, top in (("free_head", free_head, size),
                         ("old_free_head", old_free_head, size),
                         ("used_idx", used_idx, size - 1),
                         ("old_used_idx", old_used_idx, size - 1),
                         ("used_wrap_counter", used_wrap, 1),
                         ("old_used_wrap_counter", old_used_wrap, 1)):
        if v > top:
            raise InflightError(f"{name}: {what} {v} is outside 0..{top}")


def _packed_free_list(size: int, name: str, nxt: list[int], free_head: int) -> set[int]:
    """The entries on the free list from ``free_head`` (``desc_num`` ends it)."""
    free: set[int] = set()
    i = free_head
    while i != size:
        if i > size:
            raise InflightError(
                f"{name}: the free list leaves the pool: an entry links to {i} "
                f"(desc_num {size})"
            )
        if i in free:
            raise InflightError(
                f"{name}: the free list from free_head {free_head} loops back to "
                f"desc[{i}] after {len(free)} entries"
            )
        free.add(i)
        i = nxt[i]
    return free


def _packed_buffers(
    size: int, name: str, entries: list[tuple[int, ...]], nxt: list[int], heads: list[int],
    free: set[int]
) -> tuple[list[tuple[tuple[int, int, int, int], ...]], list[list[int]]]:
    """Each in-flight buffer's descriptor copies and entry list; validates the pool."""
    owner: dict[int, int] = {}
    counters: dict[int, int] = {}
    ids: dict[int, int] = {}
    buffers: list[tuple[tuple[int, int, int, int], ...]] = []
    chains: list[list[int]] = []
    for h in heads:
        _flag, _n, last, num, counter = entries[h][:5]
        if entries[h][0] != 1:
            raise InflightError(f"{name}: desc[{h}].inflight is {entries[h][0]}, not 0 or 1")
        if counter >= MAX_SANE_COUNTER:
            raise InflightError(f"{name}: desc[{h}].counter {counter:#x} is not sane")
        if counter in counters:
            raise InflightError(
                f"{name}: desc[{counters[counter]}] and desc[{h}] are both in flight with "
                f"counter {counter}: their order is unknown"
            )
        counters[counter] = h
        if not 1 <= num <= size:
            raise InflightError(f"{name}: desc[{h}].num {num} is outside 1..{size}")
        chain = [h]
        i = h
        for _ in range(num - 1):
            i = nxt[i]
            if i >= size:
                raise InflightError(
                    f"{name}: buffer at desc[{h}] links to entry {i}, outside the pool "
                    f"(desc_num {size})"
                )
            chain.append(i)
        if chain[-1] != last:
            raise InflightError(
                f"{name}: buffer at desc[{h}] ends at entry {chain[-1]} after {num} "
                f"entries, but its last is {last}"
            )
        for i in chain:
            if i in free or i in owner:
                other = "the free list" if i in free else f"the buffer at desc[{owner[i]}]"
                raise InflightError(
                    f"{name}: entry {i} of the buffer at desc[{h}] is also on {other}"
                )
            owner[i] = h
        bid = entries[last][5]
        if bid >= size:
            raise InflightError(
                f"{name}: buffer at desc[{h}] has id {bid}, not below the queue size {size}"
            )
        if bid in ids:
            raise InflightError(
                f"{name}: buffers at desc[{ids[bid]}] and desc[{h}] both have id {bid}"
            )
        ids[bid] = h
        buffers.append(tuple((entries[i][8], entries[i][7], entries[i][5], entries[i][6])
                             for i in chain))
        chains.append(chain)
    used = len(free) + len(owner)
    if used != size:
        raise InflightError(
            f"{name}: {len(free)} free entries and {len(owner)} entries of {len(heads)} "
            f"in-flight buffers do not add up to desc_num {size}"
        )
    return buffers, chains


def check_packed_region(region: memoryview | bytes, queue_size: int,
                        name: str = "inflight") -> int:
    """Validate what can be validated of a packed queue region without its ring.

    Used when SET_INFLIGHT_FD adopts an area: the header is checked against our queue
    size, and the pool (free list plus in-flight buffers) must be consistent in the state
    recovery will roll back to, or, if the last batch was published, in the state it will
    commit (which one only the ring can tell). Returns how many buffers are in flight in
    the first consistent state (0 for an uninitialized region).

    Raises:
        InflightError: the region is too small, or a field is out of range, or neither
            state is consistent (the error of the rolled-back state is raised).
    """
    snap = bytes(region)
    need = _pd(queue_size)
    if len(snap) < need:
        raise InflightError(
            f"{name}: region of {len(snap)} bytes is smaller than the {need} bytes a queue of "
            f"size {queue_size} needs"
        )
    hdr = PACKED_HEADER_STRUCT.unpack_from(snap, 0)
    if hdr[1] == 0:
        return 0
    _check_packed_header(queue_size, name, *hdr)
    entries = list(PACKED_DESC_STRUCT.iter_unpack(snap[PACKED_HEADER:need]))
    nxt = [e[1] for e in entries]
    first: InflightError | None = None
    for free_head in (hdr[4], hdr[3]):  # old_free_head (roll back), free_head (commit)
        try:
            free = _packed_free_list(queue_size, name, nxt, free_head)
            heads = [i for i in range(queue_size) if entries[i][0] and i not in free]
            _packed_buffers(queue_size, name, entries, nxt, heads, free)
            return len(heads)
        except InflightError as e:
            first = first or e
    assert first is not None
    raise first
