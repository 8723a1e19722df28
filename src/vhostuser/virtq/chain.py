"""Pieces shared by the split and packed rings: the Chain, flag bits, event arithmetic. No I/O.

A :class:`Chain` is what the device side hands to a device handler: one buffer (descriptor
chain) already walked, validated and translated to ``memoryview`` slices of guest memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from ..errors import GuestMemoryError, RingError
from ..memory import GuestMemory

__all__ = [
    "DESCS_PER_CHAIN",
    "DESC_F_INDIRECT",
    "DESC_F_NEXT",
    "DESC_F_WRITE",
    "MAX_CHAIN_BYTES",
    "MAX_QUEUE_SIZE",
    "Chain",
    "map_area",
    "vring_need_event",
]

# virtio 1.2 2.7.5 (split) and 2.8.6/2.8.7 (packed): the same three bits in both formats.
DESC_F_NEXT: Final = 1
DESC_F_WRITE: Final = 2
DESC_F_INDIRECT: Final = 4

#: virtio 1.2 2.7 / 2.8: "The maximum Queue Size value is 32768" (packed: "up to 2^15").
MAX_QUEUE_SIZE: Final = 32768

#: virtio 1.2 2.7.5.2: "Drivers MUST NOT add a descriptor chain longer than 2^32 bytes in
#: total"; the used ``len`` is a u32, so we allow at most 2**32 - 1.
MAX_CHAIN_BYTES: Final = 0xFFFF_FFFF

#: ``pop(budget)`` stops taking chains once it has read ``DESCS_PER_CHAIN * budget``
#: descriptors (direct and indirect). Legal chains may each be as long as the queue and may
#: share descriptors, so without this a guest could make one burst read budget x 32768
#: descriptors and starve every other queue (docs/security.md "a flood on one queue does not
#: starve the others"). A burst then reads at most this many plus one chain's worth.
DESCS_PER_CHAIN: Final = 16


class Chain:
    """One descriptor chain popped from a ring, ready for a device handler.

    Attributes:
        head: the value to hand back to ``push``: the head descriptor index (split) or the
            buffer id (packed).
        readable: device-readable buffers, in chain order.
        writable: device-writable buffers, in chain order (all after the readable ones).
        readable_len: total bytes in ``readable``.
        writable_len: total bytes in ``writable``.
        writable_gpas: ``(gpa, length)`` of each device-writable descriptor, in order; the ring
            uses it to report the bytes written (``GuestMemory.mark_dirty``) on ``push``.
        ring_descs: ring slots the chain occupies (packed: how far ``push`` skips; split: the
            number of descriptors read, informational).

    The views stay valid until the memory table changes; a handler must not keep a chain
    after pushing it.
    """

    __slots__ = (
        "head",
        "readable",
        "readable_len",
        "ring_descs",
        "writable",
        "writable_gpas",
        "writable_len",
    )

    def __init__(
        self,
        head: int,
        readable: list[memoryview],
        writable: list[memoryview],
        readable_len: int,
        writable_len: int,
        writable_gpas: list[tuple[int, int]],
        ring_descs: int,
    ) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readable_len = readable_len
        self.writable_len = writable_len
        self.writable_gpas = writable_gpas
        self.ring_descs = ring_descs

    def read_bytes(self) -> bytes:
        """Return a copy of all device-readable bytes, concatenated."""
        return b"".join(self.readable)

    def write_bytes(self, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Scatter ``data`` into the device-writable buffers starting at byte ``offset``.

        Returns the number of bytes copied (less than ``len(data)`` if it does not fit).

        Raises:
            ValueError: ``offset`` is negative.
        """
        if offset < 0:
            raise ValueError(f"write_bytes: negative offset {offset}")
        src = memoryview(data).cast("B")
        pos = 0
        total = len(src)
        for buf in self.writable:
            n = len(buf)
            if offset >= n:
                offset -= n
                continue
            k = min(n - offset, total - pos)
            buf[offset : offset + k] = src[pos : pos + k]
            pos += k
            offset = 0
            if pos == total:
                break
        return pos

    def mark_written(self, mark: Callable[[int, int], None], written: int) -> None:
        """Report the first ``written`` bytes of the writable part to ``mark(gpa, len)``
        (``mem.mark_dirty``), buffer by buffer."""
        rest = written
        for gpa, ln in self.writable_gpas:
            if not rest:
                return
            if ln >= rest:
                mark(gpa, rest)
                return
            if ln:
                mark(gpa, ln)
                rest -= ln

    def __repr__(self) -> str:
        return (
            f"Chain(head={self.head}, readable={self.readable_len}B/{len(self.readable)}, "
            f"writable={self.writable_len}B/{len(self.writable)}, descs={self.ring_descs})"
        )


def vring_need_event(event: int, new: int, old: int) -> bool:
    """virtio 1.2 2.7.7/2.7.10 (``vring_need_event``): did the index pass ``event``?

    True when ``event`` lies in ``[old, new)`` modulo 2**16, i.e. one of the entries written
    since ``old`` was the one the other side asked to be told about.
    """
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


def map_area(
    mem: GuestMemory, gpa: int, length: int, align: int, what: str, name: str
) -> memoryview:
    """Return a byte view of one ring area after checking alignment and mapping.

    Raises:
        RingError: ``gpa`` is not a multiple of ``align``, or the area is not inside one
            memory region.
    """
    if gpa < 0 or gpa % align:
        raise RingError(f"{name}: {what} address {gpa:#x} is not {align}-byte aligned")
    try:
        mv = mem.view(gpa, length)
    except GuestMemoryError as e:
        raise RingError(
            f"{name}: {what} at gpa {gpa:#x} length {length:#x} is not inside one memory "
            f"region ({e})"
        ) from e
    return mv if mv.format == "B" else mv.cast("B")


def check_queue_size(size: int, name: str, *, power_of_two: bool) -> None:
    """Validate a queue size (virtio 1.2 2.7: split sizes are powers of two, at most 32768).

    Raises:
        RingError: the size is out of range, or not a power of two where one is needed.
    """
    if not 1 <= size <= MAX_QUEUE_SIZE:
        raise RingError(f"{name}: queue size {size} is not in 1..{MAX_QUEUE_SIZE}")
    if power_of_two and size & (size - 1):
        raise RingError(f"{name}: queue size {size} is not a power of two")
