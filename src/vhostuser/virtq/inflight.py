"""Layout of the INFLIGHT_SHMFD shared area (vhost-user.rst "Inflight I/O tracking"). No I/O.

The back-end allocates one region per queue in a memfd it hands the front-end with
GET_INFLIGHT_FD; after a back-end crash the front-end hands it back with SET_INFLIGHT_FD and
the back-end resubmits what was in flight. Split queues:

``QueueRegionSplit``: features u64, version u16, desc_num u16, last_batch_head u16,
used_idx u16, then ``DescStateSplit[desc_num]`` of 16 bytes (inflight u8, padding[5],
next u16, counter u64).

Packed queues: a 32-byte ``QueueRegionPacked`` header then 32-byte ``DescStatePacked``.
Each queue's region is rounded up to 64 bytes, as libvhost-user does.

:class:`SplitInflightTracker` keeps one split queue's region in step with its ring,
following the spec's algorithm step by step so that a crash between any two stores is
recoverable, and :meth:`SplitInflightTracker.recover` repairs the region and lists what to
resubmit when the ring starts again. Every field it reads from the area (which the
front-end can write) is checked against our own queue size and ring first. Resubmission
goes through ``SplitDeviceRing.resubmit``, which walks each chain exactly as a pop does.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from ..errors import RingError

if TYPE_CHECKING:
    pass

INFLIGHT_ALIGNMENT = 64
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
    if version != INFLIGHT_VERSION:
        raise InflightError(f"{name}: version {version} is not {INFLIGHT_VERSION}")
    if features != 0:
        # vhost-user.rst: "The feature flags of this region. Now it's initialized to 0."
        raise InflightError(f"{name}: features {features:#x} are unknown (expected 0)")
    if desc_num != queue_size:
        # vhost-user.rst: desc_num "is equal to the virtqueue size".
        raise InflightError(f"{name}: desc_num {desc_num} is not the queue size {queue_size}")
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
    rings do (DESIGN.md "Memory ordering"); x86-64 keeps stores in program order, so the
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

    __slots__ = ("_area", "_counter", "_index", "_last_batch", "_name", "_size", "in_flight")

    def __init__(
        self, area: InflightArea, index: int, queue_size: int, *, name: str = "inflight"
    ) -> None:
        if not 0 <= index < area.num_queues:
            raise InflightError(
                f"{name}: queue {index} is not in the area ({area.num_queues} queues)"
            )
        if area.packed:
            raise InflightError(f"{name}: the area has the packed layout, the ring is split")
        if queue_size != area.queue_size:
            raise InflightError(
                f"{name}: the area was made for queue size {area.queue_size}, the ring has "
                f"{queue_size}"
            )
        self._area = area
        self._index = index
        self._size = queue_size
        self._name = name
        self._counter = 0
        self._last_batch = 0
        self.in_flight = 0
        """Heads this tracker has marked in flight and not completed."""

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
        self.in_flight = len(heads)
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
        self.in_flight = 0

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
        self.in_flight += len(heads)

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
        self.in_flight -= len(heads)


def prepare_fresh_area(area: InflightArea) -> None:
    """Stamp ``desc_num`` into every queue region of a new area (as libvhost-user does on
    GET_INFLIGHT_FD); ``version`` stays 0 until a ring starts on the region."""
    for i in range(area.num_queues):
        region = area.queue(i)
        try:
            struct.pack_into("<H", region, 2 * _H_DESC_NUM, area.queue_size)
        finally:
            region.release()


