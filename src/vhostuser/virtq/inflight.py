"""Layout of the INFLIGHT_SHMFD shared area (vhost-user.rst "Inflight I/O tracking"). No I/O.

The back-end allocates one region per queue in a memfd it hands the front-end with
GET_INFLIGHT_FD; after a back-end crash the front-end hands it back with SET_INFLIGHT_FD and
the back-end resubmits what was in flight. Split queues:

``QueueRegionSplit``: features u64, version u16, desc_num u16, last_batch_head u16,
used_idx u16, then ``DescStateSplit[desc_num]`` of 16 bytes (inflight u8, padding[5],
next u16, counter u64).

Packed queues: a 32-byte ``QueueRegionPacked`` header then 32-byte ``DescStatePacked``.
Each queue's region is rounded up to 64 bytes, as libvhost-user does.
"""

from __future__ import annotations

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
