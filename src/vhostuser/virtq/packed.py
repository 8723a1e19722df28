"""Packed virtqueues (virtio 1.2 section 2.8, VIRTIO_F_RING_PACKED): device and driver. No I/O.

One descriptor ring is shared both ways: the driver marks a descriptor available by setting
``VIRTQ_DESC_F_AVAIL`` to its wrap counter and ``VIRTQ_DESC_F_USED`` to the inverse; the
device marks it used by setting both to its own wrap counter. Each side polls one slot.

Shared-memory discipline (docs/architecture.md "Memory ordering", docs/security.md "Rings"):

* a descriptor's ``flags`` is read first, as one aligned 16-bit load, and only if it says
  "available" are the address, length and id read (one ``struct`` call) - virtio 1.2 2.8
  "Supplying Buffers": the driver writes flags last; x86-64 keeps load->load order;
* the device writes a used descriptor's id and length before its flags, and the flags of
  the first used descriptor of a burst after all the others (store->store order), so the
  driver sees a burst at once;
* event suppression structures are read and written as one aligned 32-bit access, so
  ``off_wrap`` and ``flags`` are always a consistent pair;
* the full barrier is :func:`vhostuser.virtq.barrier.full_barrier`.

GET/SET_VRING_BASE for packed rings (vhost-user spec): bits 0-14 next avail index, bit 15
avail wrap counter, bits 16-30 used index, bit 31 used wrap counter
(:func:`encode_base` / :func:`decode_base`).
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Sequence
from typing import Final, Generic, NamedTuple, NoReturn, TypeVar

from ..errors import GuestMemoryError, RingError
from ..memory import GuestMemory
from .barrier import full_barrier
from .chain import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    DESCS_PER_CHAIN,
    MAX_CHAIN_BYTES,
    Chain,
    check_queue_size,
    map_area,
    vring_need_event,
)
from .split import _seq
from .state import StateField

__all__ = [
    "INITIAL_BASE",
    "PACKED_DESC_F_AVAIL",
    "PACKED_DESC_F_USED",
    "RING_EVENT_FLAGS_DESC",
    "RING_EVENT_FLAGS_DISABLE",
    "RING_EVENT_FLAGS_ENABLE",
    "PackedBase",
    "PackedDeviceRing",
    "PackedDriverRing",
    "decode_base",
    "encode_base",
    "packed_layout",
]

#: virtio 1.2 2.8.1: the avail/used bits of a packed descriptor's flags.
PACKED_DESC_F_AVAIL: Final = 1 << 7
PACKED_DESC_F_USED: Final = 1 << 15
_AU: Final = PACKED_DESC_F_AVAIL | PACKED_DESC_F_USED

#: virtio 1.2 2.8.10: Descriptor Ring Change Event Flags.
RING_EVENT_FLAGS_ENABLE: Final = 0
RING_EVENT_FLAGS_DISABLE: Final = 1
RING_EVENT_FLAGS_DESC: Final = 2

# struct pvirtq_desc { le64 addr; le32 len; le16 id; le16 flags; }  (virtio 1.2 2.8.13)
_PDESC: Final = struct.Struct("<QIHH")
_PDESC_UNPACK: Final = _PDESC.unpack_from
_PDESC_PACK: Final = _PDESC.pack_into
# The same descriptor without its flags: read after the flags, written before them.
_PREST: Final = struct.Struct("<QIH")
_PREST_UNPACK: Final = _PREST.unpack_from
_PREST_PACK: Final = _PREST.pack_into

_NO_RUN: Final[tuple[list[int], list[int], list[int]]] = ([], [], [])


T = TypeVar("T")


def _avail_pattern(wrap: int) -> int:
    """AVAIL/USED bits of a descriptor the driver made available in a lap with ``wrap``."""
    return PACKED_DESC_F_AVAIL if wrap else PACKED_DESC_F_USED


#: The fields of :attr:`PackedDeviceRing.state`, in order (the first five mean what
#: they mean in a split ring's block, except ``held``: the 16-bit offset of the held
#: used descriptor's flags, -1 for none).
PACKED_STATE_FIELDS: Final = ("next_avail", "used_idx", "in_flight", "held", "pushed",
                              "avail_wrap", "used_wrap", "in_flight_descs", "held_flags",
                              "since_signal")
PACKED_STATE_LEN: Final = 12
#: ``engine_view`` kinds: a split ring is 0, a packed ring 1.
PACKED_KIND: Final = 1


class PackedBase(NamedTuple):
    """A decoded packed-ring GET/SET_VRING_BASE ``num``."""

    avail_idx: int
    avail_wrap: bool
    used_idx: int
    used_wrap: bool


def encode_base(avail_idx: int, avail_wrap: bool, used_idx: int, used_wrap: bool) -> int:
    """Pack ring state into a VRING_BASE ``num`` (bits 0-14, 15, 16-30, 31).

    Raises:
        ValueError: an index is not in 0..32767.
    """
    if not 0 <= avail_idx <= 0x7FFF or not 0 <= used_idx <= 0x7FFF:
        raise ValueError(f"packed ring indices {avail_idx}/{used_idx} are not in 0..32767")
    return avail_idx | (int(avail_wrap) << 15) | (used_idx << 16) | (int(used_wrap) << 31)


def decode_base(num: int) -> PackedBase:
    """Split a VRING_BASE ``num`` into indices and wrap counters.

    Raises:
        ValueError: ``num`` does not fit 32 bits.
    """
    if not 0 <= num <= 0xFFFF_FFFF:
        raise ValueError(f"vring base {num:#x} does not fit 32 bits")
    return PackedBase(num & 0x7FFF, bool(num >> 15 & 1), (num >> 16) & 0x7FFF, bool(num >> 31 & 1))


#: The state of a fresh ring: both indices 0, both wrap counters 1 (virtio 1.2 2.8.1).
INITIAL_BASE: Final = encode_base(0, True, 0, True)


def packed_layout(size: int, base_gpa: int = 0) -> tuple[int, int, int, int]:
    """Lay out a packed ring from ``base_gpa`` (virtio 1.2 2.8.10.1 alignment table).

    Returns ``(desc_gpa, driver_event_gpa, device_event_gpa, total_bytes)``.

    Raises:
        ValueError: ``size`` not in 1..32768 or ``base_gpa`` not 16-byte aligned.
    """
    if not 1 <= size <= 32768:
        raise ValueError(f"packed ring size {size} is not in 1..32768")
    if base_gpa % 16:
        raise ValueError(f"packed ring base {base_gpa:#x} is not 16-byte aligned")
    desc = base_gpa
    driver = desc + 16 * size
    device = driver + 4
    return desc, driver, device, device + 4 - base_gpa


class PackedDeviceRing:
    """The back-end side of one packed virtqueue over a :class:`GuestMemory`.

    Args:
        mem: guest memory.
        size: queue size (SET_VRING_NUM), 1..32768 (need not be a power of two).
        desc_gpa: the descriptor ring (SET_VRING_ADDR ``desc_user_addr``, translated).
        driver_gpa: the driver event suppression area (``avail_user_addr``).
        device_gpa: the device event suppression area (``used_user_addr``).
        event_idx: VIRTIO_F_EVENT_IDX negotiated.
        indirect: VIRTIO_F_INDIRECT_DESC negotiated.
        base: SET_VRING_BASE ``num`` (see :func:`decode_base`); default: a fresh ring.
        name: used in error messages.

    Raises:
        RingError: bad size, misaligned or unmapped area, or a base whose index is not below
            the queue size. The message names the values.
    """

    __slots__ = (
        "__weakref__",  # a QueueRunner refers to its ring without keeping it alive
        "_broken",
        "_desc",
        "_desc_gpa",
        "_desc_h",
        "_desc_q",
        "_desc_w",
        "_dev_w",
        "_device_gpa",
        "_drv_w",
        "_event_idx",
        "_ids",
        "_indirect",
        "_mem",
        "_name",
        "_run",
        "_seq",
        "_seq_b",
        "_seq_h",
        "_signalled_valid",
        "_size",
        "_slot_of",
        "_st",
        "_view",
        "_walked",
        "_zeros",
    )

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc_gpa: int,
        driver_gpa: int,
        device_gpa: int,
        *,
        event_idx: bool,
        indirect: bool,
        base: int = INITIAL_BASE,
        name: str = "vring",
    ) -> None:
        check_queue_size(size, name, power_of_two=False)
        try:
            b = decode_base(base)
        except ValueError as e:
            raise RingError(f"{name}: {e}") from e
        if b.avail_idx >= size or b.used_idx >= size:
            raise RingError(
                f"{name}: vring base {base:#x}: avail index {b.avail_idx} or used index "
                f"{b.used_idx} is not below the queue size {size}"
            )
        # virtio 1.2 2.8.10.1: descriptor ring 16-aligned, event structures 4-aligned.
        desc = map_area(mem, desc_gpa, 16 * size, 16, "descriptor ring", name)
        drv = map_area(mem, driver_gpa, 4, 4, "driver event suppression area", name)
        dev = map_area(mem, device_gpa, 4, 4, "device event suppression area", name)
        self._mem = mem
        self._size = size
        self._name = name
        self._event_idx = event_idx
        self._indirect = indirect
        self._desc = desc
        self._desc_h = desc.cast("H")
        self._desc_w = desc.cast("I")
        self._desc_q = desc.cast("Q")
        self._seq, _, self._zeros, self._seq_b = _seq(size)
        self._seq_h = array("H")
        self._seq_h.frombytes(self._seq_b)
        self._run: list[int] | None = None  # the ids of the last peek_run, if consecutive
        self._drv_w = drv.cast("I")
        self._dev_w = dev.cast("I")
        self._desc_gpa = desc_gpa
        self._device_gpa = device_gpa
        # The ring's mutable state lives in one small block (PACKED_STATE_FIELDS) that the
        # compiled engine reads and writes too.
        self._st = array("q", bytes(8 * PACKED_STATE_LEN))
        self._next_avail = b.avail_idx
        self._avail_wrap = int(b.avail_wrap)
        self._used_idx = b.used_idx
        self._used_wrap = int(b.used_wrap)
        self._ids: list[Chain | None] = [None] * size
        # Where each in-flight buffer starts: slot | avail wrap counter << 15 (descriptors()).
        self._slot_of: list[int] = [0] * size
        self._in_flight = 0
        self._inflight_descs = 0
        self._broken: str | None = None
        self._pushed = False
        # A used descriptor whose flags push(publish=False) held back: its position in
        # _desc_h (-1: none) and the flags publish() stores.
        self._held_off = -1
        self._held_flags = 0
        self._since_signal = 0
        self._view = (PACKED_KIND, self._st, desc, None, None, size, desc_gpa)
        self._signalled_valid = False
        self._walked = 0  # descriptors read by the current pop()

    # -- the state block (PACKED_STATE_FIELDS): every mutable index, in one array ---------
    @property
    def state(self) -> array[int]:
        """The state block (see :data:`PACKED_STATE_FIELDS`), for the compiled engine."""
        return self._st

    @property
    def engine_view(self) -> tuple[int, array[int], memoryview, None, None, int, int]:
        """``(kind, state, descriptor ring, None, None, size, descriptor ring gpa)``: the
        ring as the compiled engine takes it (built once; :meth:`close` releases the
        views)."""
        return self._view

    # Attribute names for the state block's slots (PACKED_STATE_FIELDS order).
    _next_avail = StateField(0)
    _used_idx = StateField(1)
    _in_flight = StateField(2)
    _held_off = StateField(3)
    _pushed = StateField(4)
    _avail_wrap = StateField(5)
    _used_wrap = StateField(6)
    _inflight_descs = StateField(7)
    _held_flags = StateField(8)
    _since_signal = StateField(9)

    @property
    def _avail_pat(self) -> int:
        return _avail_pattern(self._st[5])

    # -- state --------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """The queue size."""
        return self._size

    @property
    def broken(self) -> str | None:
        """Why the guest broke this queue, or None. Once set, nothing more is processed."""
        return self._broken

    @property
    def in_flight(self) -> int:
        """Buffers popped and not yet pushed."""
        return self._in_flight

    @property
    def next_avail(self) -> int:
        """The next ring slot to look at for an available descriptor."""
        return self._next_avail

    @property
    def avail_wrap(self) -> bool:
        """The device's copy of the driver ring wrap counter."""
        return bool(self._avail_wrap)

    @property
    def used_idx(self) -> int:
        """The ring slot the next used descriptor is written to."""
        return self._used_idx

    @property
    def used_wrap(self) -> bool:
        """The device ring wrap counter."""
        return bool(self._used_wrap)

    def base(self) -> int:
        """GET_VRING_BASE ``num``: next avail index and wrap, used index and wrap."""
        return encode_base(
            self._next_avail, bool(self._avail_wrap), self._used_idx, bool(self._used_wrap)
        )

    def mark_broken(self, reason: str) -> None:
        """Stop the queue (a guest fault found by a device handler). The first reason wins."""
        if self._broken is None:
            self._broken = reason

    def adopt_in_flight(self, old: PackedDeviceRing) -> None:
        """Take over the buffers ``old`` had in flight (``old``: this queue as built before
        the memory table or the ring addresses changed), so that a device completing them
        later still can; the ring position comes from the base it was built with.

        Raises:
            ValueError: ``old`` has another queue size (a caller bug).
        """
        if old._size != self._size:
            raise ValueError(f"{self._name}: cannot adopt a ring of size {old._size}")
        self._ids = list(old._ids)
        self._slot_of = list(old._slot_of)
        self._in_flight = old._in_flight
        self._inflight_descs = old._inflight_descs

    def _fail(self, msg: str) -> NoReturn:
        reason = f"{self._name}: {msg}"
        self.mark_broken(reason)
        raise RingError(reason)

    def close(self) -> None:
        """Drop every view into guest memory (before the shell unmaps it). Idempotent."""
        self._ids = [None] * self._size
        for mv in (self._desc_h, self._desc_w, self._desc_q, self._drv_w, self._dev_w,
                   self._desc):
            mv.release()
        self.mark_broken(f"{self._name}: ring closed")

    # -- consuming available buffers -----------------------------------------------------
    def pending(self) -> int:
        """1 if the descriptor at ``next_avail`` is available, else 0 (also when broken).

        A packed ring cannot be counted without walking it; this is the "is there work"
        test for pollers.
        """
        if self._broken is not None:
            return 0
        f: int = self._desc_h[(self._next_avail << 3) + 7]
        return 1 if f & _AU == self._avail_pat else 0

    def pop(self, budget: int) -> list[Chain]:
        """Take up to ``budget`` available buffers, in ring order.

        A descriptor whose AVAIL/USED bits do not match the wrap counter is simply not
        available (virtio 1.2 2.8.1); popping stops there. It also stops once the call has
        read ``DESCS_PER_CHAIN * budget`` descriptors (the rest wait for the next call).

        A buffer the guest broke stops the call: the buffers before it are returned, and
        the next call meets it first.

        Raises:
            RingError: the first buffer of the call breaks the ring; the ring is now broken
                and every later ``pop`` returns ``[]``.
        """
        if self._broken is not None or budget <= 0:
            return []
        desc_h = self._desc_h
        walk = self._walk
        desc_budget = DESCS_PER_CHAIN * budget
        self._walked = 0
        out: list[Chain] = []
        while len(out) < budget and self._walked < desc_budget:
            slot = self._next_avail
            # Flags first, one aligned 16-bit load; the rest of the descriptor is read
            # only after it says "available" (load->load order, barrier.py).
            f: int = desc_h[(slot << 3) + 7]
            if f & _AU != self._avail_pat:
                break
            try:
                out.append(walk(slot, f))
            except RingError:
                if not out:
                    raise
                # Hand over the good buffers before the faulty one; the next pop meets it
                # first and breaks the ring (as SplitDeviceRing.pop).
                self._broken = None
                return out
        return out

    def _walk(
        self, slot: int, f: int, src: tuple[memoryview, memoryview] | None = None
    ) -> Chain:
        """Walk, validate and translate the buffer starting at ``slot`` with flags ``f``.

        ``src`` (resubmission only): ``(desc, desc_h)`` views of a copy of the buffer's
        descriptors laid out from slot 0 with the AVAIL/USED bits of wrap counter 1; the
        ring position is then not moved (the caller sets it).
        """
        size = self._size
        segments = self._mem.segments
        view = self._mem.view
        if src is None:
            desc = self._desc
            desc_h = self._desc_h
            wrap = self._avail_wrap
        else:
            desc, desc_h = src
            wrap = 1
        head_slot = slot
        head_wrap = wrap
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        wgpas: list[tuple[int, int]] = []
        rlen = 0
        wlen = 0
        in_write = False
        n = 0
        while True:
            addr, ln, bid = _PREST_UNPACK(desc, slot << 4)  # read once, after the flags
            n += 1
            if f & DESC_F_INDIRECT:
                where = f"buffer at slot {head_slot}: descriptor at slot {slot}"
                if n != 1:
                    # virtio 1.2 2.8.19: no INDIRECT descriptor in a NEXT-linked list.
                    self._fail(f"{where} is indirect inside a NEXT chain")
                if f & DESC_F_NEXT:
                    self._fail(f"{where} sets both INDIRECT and NEXT (flags {f:#x})")
                if not self._indirect:
                    self._fail(f"{where} is indirect but VIRTIO_F_INDIRECT_DESC is off")
                if ln == 0 or ln & 15:
                    self._fail(
                        f"{where}: indirect table length {ln} is not a nonzero multiple of 16"
                    )
                entries = ln >> 4
                if entries > size:
                    self._fail(
                        f"{where}: indirect table has {entries} entries, more than the queue "
                        f"size {size}"
                    )
                self._walked += entries
                try:
                    table = self._mem.view(addr, ln)
                except GuestMemoryError as e:
                    self._fail(
                        f"{where}: indirect table at gpa {addr:#x} length {ln} is not inside one "
                        f"memory region ({e})"
                    )
                if table.format != "B":
                    table = table.cast("B")
                # virtio 1.2 2.8.7: entries follow each other; only WRITE is meaningful, the
                # other flags and the id are reserved and ignored - except INDIRECT, which
                # the driver MUST NOT set (2.8.19) and which we reject as nested.
                for ent in range(entries):
                    a, el, _eid, ef = _PDESC_UNPACK(table, ent << 4)
                    if ef & DESC_F_INDIRECT:
                        self._fail(
                            f"{where}: indirect table entry {ent} is itself indirect (nested)"
                        )
                    if rlen + wlen + el > MAX_CHAIN_BYTES:
                        self._fail(
                            f"{where}: descriptor lengths sum to {rlen + wlen + el}, past 2^32 - 1"
                        )
                    if ef & DESC_F_WRITE:
                        in_write = True
                        if el:
                            try:
                                writable.append(view(a, el))
                            except GuestMemoryError:  # crosses regions (or is unmapped)
                                try:
                                    writable += segments(a, el)
                                except GuestMemoryError as err:
                                    self._fail(f"{where}: entry {ent} buffer {a:#x}+{el:#x}: {err}")
                            wlen += el
                        wgpas.append((a, el))
                    else:
                        if in_write:
                            self._fail(
                                f"{where}: indirect entry {ent} is device-readable after a "
                                "device-writable one"
                            )
                        if el:
                            try:
                                readable.append(view(a, el))
                            except GuestMemoryError:  # crosses regions (or is unmapped)
                                try:
                                    readable += segments(a, el)
                                except GuestMemoryError as err:
                                    self._fail(f"{where}: entry {ent} buffer {a:#x}+{el:#x}: {err}")
                            rlen += el
                break
            if rlen + wlen + ln > MAX_CHAIN_BYTES:
                # virtio 1.2 2.7.5.2 / 2.8.17: at most 2^32 bytes, checked before translating.
                self._fail(
                    f"buffer at slot {head_slot}: descriptor lengths sum to {rlen + wlen + ln}, "
                    "past 2^32 - 1"
                )
            if f & DESC_F_WRITE:
                in_write = True
                if ln:
                    try:
                        writable.append(view(addr, ln))
                    except GuestMemoryError:  # crosses regions (or is unmapped)
                        try:
                            writable += segments(addr, ln)
                        except GuestMemoryError as e:
                            self._fail(f"buffer at slot {head_slot}: {addr:#x}+{ln:#x}: {e}")
                    wlen += ln
                wgpas.append((addr, ln))
            else:
                if in_write:
                    # virtio 1.2 2.8.17: writable elements after all readable ones.
                    self._fail(
                        f"buffer at slot {head_slot}: descriptor at slot {slot} is "
                        "device-readable after a device-writable one"
                    )
                if ln:
                    try:
                        readable.append(view(addr, ln))
                    except GuestMemoryError:  # crosses regions (or is unmapped)
                        try:
                            readable += segments(addr, ln)
                        except GuestMemoryError as e:
                            self._fail(f"buffer at slot {head_slot}: {addr:#x}+{ln:#x}: {e}")
                    rlen += ln
            if not f & DESC_F_NEXT:
                break
            if n == size:
                # virtio 1.2 2.8.17: "MUST NOT create a descriptor list longer than the
                # Queue Size" - this one never ends.
                self._fail(
                    f"buffer at slot {head_slot}: chain of {size} descriptors (the queue size) "
                    "still has NEXT set"
                )
            slot += 1
            if slot == size:
                slot = 0
                wrap ^= 1
            f = desc_h[(slot << 3) + 7]  # flags first, one aligned 16-bit load
            if f & _AU != _avail_pattern(wrap):
                # virtio 1.2 2.8.6: every descriptor of the list is made available (flags
                # set correctly in all of them) before the first one.
                self._fail(
                    f"buffer at slot {head_slot}: descriptor {n} of its chain, at slot {slot}, "
                    f"is not available (flags {f:#x}, wrap counter {wrap})"
                )
        # virtio 1.2 2.8.6: the buffer id is in the last descriptor of the list.
        if bid >= size:
            self._fail(f"buffer at slot {head_slot} has id {bid} >= queue size {size}")
        ids = self._ids
        if ids[bid] is not None:
            self._fail(f"buffer at slot {head_slot} has id {bid}, which is already in flight")
        if self._inflight_descs + n > size:
            self._fail(
                f"buffer at slot {head_slot}: {n} descriptors with {self._inflight_descs} in "
                f"flight exceed the queue size {size}"
            )
        self._walked += n
        chain = Chain(bid, readable, writable, rlen, wlen, wgpas, n)
        ids[bid] = chain
        self._slot_of[bid] = head_slot | (head_wrap << 15)
        self._in_flight += 1
        self._inflight_descs += n
        if src is not None:
            return chain
        slot += 1
        if slot == size:
            slot = 0
            wrap ^= 1
        self._next_avail = slot
        self._avail_wrap = wrap
        return chain

    # -- in-place fast path (device handlers that consume one-descriptor buffers) ---------
    #
    # As SplitDeviceRing's peek_heads/complete_in_place: a device may consume buffers of
    # ONE descriptor without Chain objects. peek_simple() reads them (flags first, then the
    # rest, each once), stopping at anything else, which it leaves to pop() - the engine
    # that validates every docs/security.md case; complete_in_place() writes their used
    # descriptors. Every store to the descriptor ring stays in this class.

    def peek_simple(self, limit: int, flags: int) -> list[tuple[int, int, int]] | None:
        """Up to ``limit`` available buffers of one descriptor whose flags (AVAIL/USED
        aside) are exactly ``flags`` (0 to transmit, DESC_F_WRITE to receive), from
        ``next_avail`` on, as ``(buffer_id, addr, len)``, without taking them.

        ``[]``: none available. None: the caller must :meth:`pop` the next buffer (it is
        not of that kind, its id is outside the queue or repeated, or buffers are in
        flight - the in-place path works only on an idle ring).
        """
        if self._broken is not None:
            return []
        st = self._st
        if st[2]:  # in flight
            return None
        desc_h = self._desc_h
        desc = self._desc
        size = self._size
        slot = st[0]
        wrap = st[5]
        pat = _avail_pattern(wrap)
        out: list[tuple[int, int, int]] = []
        seen: set[int] = set()
        while len(out) < limit:
            f: int = desc_h[(slot << 3) + 7]  # flags first, one aligned 16-bit load
            if f & _AU != pat:
                break
            if f & ~_AU != flags:
                break
            addr, ln, bid = _PREST_UNPACK(desc, slot << 4)  # read once, after the flags
            if bid >= size or bid in seen:
                break
            seen.add(bid)
            out.append((bid, addr, ln))
            slot += 1
            if slot == size:
                slot = 0
                wrap ^= 1
                pat = _avail_pattern(wrap)
        if not out and desc_h[(st[0] << 3) + 7] & _AU == _avail_pattern(st[5]):
            return None  # available, but not for this path
        return out

    def peek_run(self, limit: int, flags: int
                 ) -> tuple[list[int], list[int], list[int]] | None:
        """:meth:`peek_simple` for a whole burst: the same buffers, as three parallel lists
        ``(ids, addrs, lens)``. The flags of the burst's slots are read first (one strided
        load per lap of the ring), then each other field of the available descriptors
        with one strided load per lap (load->load order, barrier.py): each field is read
        once.
        ``([], [], [])``: none available; None: the caller must :meth:`pop` the next buffer.
        """
        if self._broken is not None:
            return _NO_RUN
        st = self._st
        if st[2]:  # in flight
            return None
        desc_h = self._desc_h
        desc_w = self._desc_w
        desc_q = self._desc_q
        size = self._size
        slot = st[0]
        wrap = st[5]
        raw = b""
        addrs: list[int] = []
        lens: list[int] = []
        left = limit
        while left > 0:
            end = slot + left
            if end > size:
                end = size
            want = _avail_pattern(wrap) | flags
            fl = desc_h[(slot << 3) + 7 : (end << 3) : 8].tolist()
            m = len(fl)
            if fl.count(want) != m:
                m = 0
                for f in fl:
                    if f != want:
                        break
                    m += 1
            if m:
                e = slot + m
                raw += desc_h[(slot << 3) + 6 : e << 3 : 8].tobytes()
                addrs += desc_q[slot << 1 : e << 1 : 2].tolist()
                lens += desc_w[(slot << 2) + 2 : e << 2 : 4].tolist()
            if m < end - slot:
                break
            left -= m
            slot = 0
            wrap ^= 1
        n = len(addrs)
        self._run = None
        i0 = raw[0] | raw[1] << 8 if n else 0
        if n and i0 < size and raw == self._seq_b[2 * i0 : 2 * (i0 + n)]:
            # Consecutive ids (as DPDK and QEMU hand them out) lie in the queue and repeat
            # none; complete_run may store them from _seq_h.
            ids = self._run = self._seq[i0 : i0 + n]
            return ids, addrs, lens
        ids = array("H", raw).tolist()
        if n and (max(ids) >= size or len(set(ids)) != n):
            # An id outside the queue or repeated: the buffers before it only.
            seen: set[int] = set()
            n = 0
            for bid in ids:
                if bid >= size or bid in seen:
                    break
                seen.add(bid)
                n += 1
            del ids[n:], addrs[n:], lens[n:]
        if not n:
            if desc_h[(st[0] << 3) + 7] & _AU == _avail_pattern(st[5]):
                return None  # available, but not for this path
            return _NO_RUN
        return ids, addrs, lens

    def complete_run(self, ids: Sequence[int], addrs: Sequence[int], lens: Sequence[int] | None,
                     taken: int, *, publish: bool = True) -> None:
        """:meth:`complete_in_place` for the first ``taken`` buffers of :meth:`peek_run`:
        ``ids[k]`` used with ``lens[k]`` bytes written (0 for all when ``lens`` is None).
        ``addrs`` is not needed here (a split ring's :meth:`complete_run` has the same
        arguments).

        Each field of the used descriptors is stored with one strided store per lap of
        the ring: for all but the burst's first descriptor lengths, then ids, then flags;
        then the first one's length and id, and its flags last (or held, as :meth:`push`
        does), so the driver, which reads in ring order, sees none of them before all are
        written (virtio 1.2 2.8.6; x86-64 store->store order, barrier.py).
        """
        if not taken or self._broken is not None:
            return
        size = self._size
        desc_h = self._desc_h
        desc_w = self._desc_w
        st = self._st
        idx = st[1]
        wrap = st[6]
        bits = _AU if wrap else 0
        w = DESC_F_WRITE
        zero = lens is None
        if lens is None:
            lens = self._zeros
            fl: list[int] | None = None
        elif min(lens[:taken]) > 0:
            fl = None
            bits |= w
        else:
            fl = [w if x else 0 for x in lens[:taken]]
        mark = self._mem.mark_dirty
        gpa = self._desc_gpa
        run = ids is self._run  # consecutive ids from peek_run: slices of _seq_h
        i0 = ids[0]
        # Descriptors 1.. of the burst, a lap at a time (the used wrap flips at the end).
        first_run = size - idx if idx + taken > size else taken
        k = 1
        while k < taken:
            lap_bits = bits if k < first_run else bits ^ _AU
            end = first_run if k < first_run else taken
            slot = idx + k
            if slot >= size:
                slot -= size
            e = slot + end - k
            desc_w[(slot << 2) + 2 : e << 2 : 4] = (
                self._zeros[k:end] if zero else array("I", lens[k:end]))
            desc_h[(slot << 3) + 6 : e << 3 : 8] = (
                self._seq_h[i0 + k : i0 + end] if run else array("H", ids[k:end]))
            if fl is None:
                desc_h[(slot << 3) + 7 : e << 3 : 8] = array("H", [lap_bits]) * (end - k)
            else:
                desc_h[(slot << 3) + 7 : e << 3 : 8] = array(
                    "H", [lap_bits | f for f in fl[k:end]])
            mark(gpa + (slot << 4) + 8, ((e - slot) << 4) - 8)  # lens, ids, flags
            k = end
        # The first: length and id, then the flags (stored last, or held).
        h = idx << 3
        first_len = lens[0]
        desc_w[(idx << 2) + 2] = first_len
        desc_h[h + 6] = ids[0]
        first_flags = (bits & _AU) | (w if first_len else 0)
        mark(gpa + (idx << 4) + 8, 8)
        if publish or st[3] >= 0:
            desc_h[h + 7] = first_flags
        else:
            st[3] = h + 7
            st[8] = first_flags
        if publish and st[3] >= 0:
            desc_h[st[3]] = st[8]
            st[3] = -1
        idx += taken
        if idx >= size:
            idx -= size
            wrap ^= 1
        st[1] = idx
        st[6] = wrap
        st[9] += taken
        st[4] = int(st[3] < 0)
        # An idle ring: the avail position moves with the used one.
        st[0] = st[1]
        st[5] = st[6]

    def complete_in_place(self, used: Sequence[int], taken: int, *, publish: bool = True) -> None:
        """The first ``taken`` buffers of :meth:`peek_simple` were consumed in place:
        write ``used`` (id, len, id, len ...) as their used descriptors, move the ring past
        them, report the descriptor bytes written to ``mem.mark_dirty`` (the caller reports
        the buffer bytes it wrote). The flags of the first one are stored last; with
        ``publish=False`` they are held for :meth:`publish`, as :meth:`push` does.
        """
        if not taken or self._broken is not None:
            return
        self._store_used([(used[2 * k], used[2 * k + 1], 1) for k in range(taken)], publish)
        # An idle ring: the avail position moves with the used one.
        st = self._st
        st[0] = st[1]
        st[5] = st[6]

    # -- inflight tracking (vhost-user.rst "Inflight I/O tracking", packed) ----------------
    def descriptors(self, buffer_id: int) -> list[tuple[int, int, int, int]]:
        """The ring descriptors of in-flight buffer ``buffer_id``: ``(addr, len, id, flags)``
        each, read from the ring now.

        For the inflight tracker, which copies them into the shared area right after the
        buffer is popped and before anything is pushed: until then nothing can have
        overwritten those slots (the device writes used descriptors only at ``used_idx``,
        which stays behind every buffer still in flight, and the driver may not touch
        them). For an indirect buffer this is the one descriptor naming the table.

        Raises:
            ValueError: ``buffer_id`` is not in flight (a caller bug).
        """
        size = self._size
        if not 0 <= buffer_id < size or self._ids[buffer_id] is None:
            raise ValueError(f"{self._name}: buffer id {buffer_id} is not in flight")
        chain = self._ids[buffer_id]
        assert chain is not None
        where = self._slot_of[buffer_id]
        slot = where & 0x7FFF
        out: list[tuple[int, int, int, int]] = []
        desc = self._desc
        for _ in range(chain.ring_descs):
            out.append(_PDESC_UNPACK(desc, slot << 4))  # (addr, len, id, flags)
            slot += 1
            if slot == size:
                slot = 0
        return out

    def descriptor_flags(self, slot: int) -> int:
        """The flags of the descriptor at ``slot``, one aligned 16-bit load (for inflight
        recovery: has the device marked it used?).

        Raises:
            ValueError: ``slot`` is outside the ring.
        """
        if not 0 <= slot < self._size:
            raise ValueError(f"{self._name}: slot {slot} is outside the ring (size {self._size})")
        f: int = self._desc_h[(slot << 3) + 7]
        return f

    def make_available(self, slot: int, wrap: bool, count: int) -> int:
        """Turn used descriptors back into available ones: of the ``count`` slots from
        ``slot`` (lap ``wrap``), each whose AVAIL/USED bits say "used in this lap" gets the
        bits of "available in this lap"; returns how many changed.

        For inflight recovery only: a back-end killed inside :meth:`push` leaves the
        batch's later used descriptors written and the first one not (it is stored last),
        so the driver has seen none of them; after the batch is rolled back its buffers are
        in flight again and those slots must not look used when the driver gets there.

        Raises:
            ValueError: ``slot`` or ``count`` outside the ring.
        """
        size = self._size
        if not 0 <= slot < size or not 0 <= count <= size:
            raise ValueError(f"{self._name}: slots {slot}+{count} are outside the ring")
        desc_h = self._desc_h
        mark = self._mem.mark_dirty
        w = int(wrap)
        changed = 0
        for _ in range(count):
            i = (slot << 3) + 7
            f: int = desc_h[i]
            if f & _AU == (_AU if w else 0):
                desc_h[i] = (f & ~_AU & 0xFFFF) | _avail_pattern(w)
                mark(self._desc_gpa + (slot << 4) + 14, 2)
                changed += 1
            slot += 1
            if slot == size:
                slot = 0
                w ^= 1
        return changed

    def resubmit(
        self,
        buffers: Sequence[Sequence[tuple[int, int, int, int]]],
        *,
        next_avail: int,
        avail_wrap: bool,
        used_idx: int,
        used_wrap: bool,
    ) -> list[Chain]:
        """Put buffers a previous back-end had popped back in flight; resume at the given
        position.

        For INFLIGHT_SHMFD recovery. A packed ring's slots are reused as used descriptors,
        so the buffers come from the copies the tracker kept: ``(addr, len, id, flags)``
        per ring descriptor, in chain order. Each buffer is walked and validated exactly as
        :meth:`pop` does (translation, lengths, order of readable and writable parts,
        indirect tables, ids not already in flight) and returned in the given order. Then
        popping resumes at ``next_avail``/``avail_wrap`` and used descriptors are written
        from ``used_idx``/``used_wrap``.

        Raises:
            RingError: a buffer is invalid (its NEXT flags do not end where its list ends,
                or :meth:`pop` would refuse it); the ring is then broken.
            ValueError: an index is not below the queue size, or buffers are already in
                flight (caller bugs).
        """
        size = self._size
        for what, v in (("next avail", next_avail), ("used index", used_idx)):
            if not 0 <= v < size:
                raise ValueError(f"{self._name}: resubmit: {what} {v} is not below {size}")
        if self._in_flight:
            raise ValueError(f"{self._name}: resubmit with {self._in_flight} buffers in flight")
        if self._broken is not None:
            return []
        out: list[Chain] = []
        for k, descs in enumerate(buffers):
            n = len(descs)
            label = f"resubmitted buffer {k} ({n} descriptors)"
            if not 1 <= n <= size:
                self._fail(f"{label}: a buffer has 1..{size} descriptors")
            tbl = bytearray(16 * n)
            for j, (addr, ln, bid, fl) in enumerate(descs):
                has_next = bool(fl & DESC_F_NEXT)
                if has_next != (j < n - 1):
                    self._fail(
                        f"{label}: descriptor {j} has flags {fl:#x}: NEXT must be set on all "
                        "but the last"
                    )
                # Laid out from slot 0 as available in a lap with wrap counter 1.
                _PDESC_PACK(tbl, j << 4, addr, ln, bid,
                            (fl & ~_AU & 0xFFFF) | PACKED_DESC_F_AVAIL)
            t = memoryview(tbl)
            th = t.cast("H")
            try:
                out.append(self._walk(0, th[7], (t, th)))
            except RingError as e:
                raise RingError(f"{self._name}: {label}: {e}") from e
            finally:
                th.release()
                t.release()
        self._next_avail = next_avail
        self._avail_wrap = int(avail_wrap)
        self._used_idx = used_idx
        self._used_wrap = int(used_wrap)
        self._signalled_valid = False
        return out

    # -- returning used buffers ---------------------------------------------------------
    def push(self, elems: Sequence[tuple[int, int]], *, publish: bool = True) -> None:
        """Write ``(buffer_id, written_len)`` pairs as used descriptors, in order.

        Each used descriptor takes the next used slot; the slot then skips ahead by the
        number of ring descriptors the buffer occupied (virtio 1.2 2.8.6). The flags of the
        first one are stored last, so the driver sees the burst at once. ``mem.mark_dirty``
        is called for each used descriptor and the first ``written_len`` bytes of each
        buffer's writable part. Does nothing on a broken ring.

        With ``publish=False`` the flags of the first used descriptor not yet published are
        held back: the driver reads used descriptors in ring order, so it sees none of
        them until :meth:`publish` stores those flags.

        Raises:
            ValueError: an id not in flight, or a length outside ``0..writable_len`` (a
                device-handler bug). The elements before the bad one are still published.
        """
        if self._broken is not None or not elems:
            return
        ids = self._ids
        size = self._size
        mark = self._mem.mark_dirty
        entries: list[tuple[int, int, int]] = []
        error: str | None = None
        for bid, written in elems:
            chain = ids[bid] if 0 <= bid < size else None
            if chain is None:
                error = f"{self._name}: push: buffer id {bid} is not in flight"
                break
            if not 0 <= written <= chain.writable_len:
                error = (
                    f"{self._name}: push: buffer id {bid} written length {written} is outside "
                    f"0..{chain.writable_len}"
                )
                break
            ids[bid] = None
            if written:
                chain.mark_written(mark, written)
            entries.append((bid, written, chain.ring_descs))
        if entries:
            slots = self._store_used(entries, publish)
            self._in_flight -= len(entries)
            self._inflight_descs -= slots
        if error is not None:
            raise ValueError(error)

    def _store_used(self, entries: Sequence[tuple[int, int, int]], publish: bool) -> int:
        """Write ``(buffer_id, written_len, ring_descriptors)`` as used descriptors from
        ``used_idx`` on, each advancing it by its ring descriptors (virtio 1.2 2.8.6);
        report the descriptor bytes to ``mem.mark_dirty``; store the first flags last, or
        hold them (``publish=False``); return the slots used."""
        size = self._size
        desc_h = self._desc_h
        desc_w = self._desc_w
        mark = self._mem.mark_dirty
        desc_gpa = self._desc_gpa
        st = self._st
        idx = st[1]
        wrap = st[6]
        used_bits = _AU if wrap else 0
        first_off = -1
        first_flags = 0
        slots = 0
        for bid, written, nd in entries:
            h = idx << 3
            # virtio 1.2 2.8.3/2.8.4: a used descriptor carries id and written length, and
            # WRITE when data was written. id and len are stored before the flags.
            desc_w[(idx << 2) + 2] = written
            desc_h[h + 6] = bid
            flags = used_bits | (DESC_F_WRITE if written else 0)
            if first_off < 0:
                first_off = h + 7
                first_flags = flags
            else:
                desc_h[h + 7] = flags
            mark(desc_gpa + (idx << 4) + 8, 8)
            idx += nd
            if idx >= size:
                idx -= size
                wrap ^= 1
                used_bits = _AU if wrap else 0
            slots += nd
        if publish or st[3] >= 0:
            # The first used descriptor's flags go last: every other store of the burst
            # (ids, lengths, later flags, buffer contents) precedes it - program order
            # plus x86-64 store->store order (barrier.py). Behind a held descriptor they
            # are invisible anyway (the driver reads in ring order).
            desc_h[first_off] = first_flags
        else:
            st[3] = first_off
            st[8] = first_flags
        if publish and st[3] >= 0:
            desc_h[st[3]] = st[8]
            st[3] = -1
        st[1] = idx
        st[6] = wrap
        st[9] += slots
        st[4] = int(st[3] < 0)
        return slots

    @property
    def held(self) -> bool:
        """True if used descriptors were written with ``publish=False`` and not published."""
        return self._held_off >= 0

    def publish(self) -> None:
        """Make every used descriptor written with ``publish=False`` visible: store the
        held flags, after every other store of those pushes (store->store, barrier.py).
        Nothing happens when nothing is held or the ring is broken."""
        if self._held_off < 0 or self._broken is not None:
            return
        self._desc_h[self._held_off] = self._held_flags
        self._held_off = -1
        self._pushed = True

    def should_notify(self) -> bool:
        """After :meth:`push`: must the driver be notified, per the driver event suppression?

        ENABLE: yes; DISABLE: no; DESC (only with EVENT_IDX): if a used descriptor was written
        at the slot and wrap counter it names. False when nothing was pushed since the last
        call, or the ring is broken. Never raises.
        """
        if not self._pushed or self._broken is not None:
            return False
        self._pushed = False
        since = self._since_signal
        self._since_signal = 0
        valid = self._signalled_valid  # "since" counts from a known point
        self._signalled_valid = True
        # Full barrier: orders the used flags stores in push() before the load of the driver
        # event suppression structure (store->load; barrier.py).
        full_barrier()
        v: int = self._drv_w[0]  # one 32-bit load: off_wrap (low half), flags (high half)
        flags = (v >> 16) & 3
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags != RING_EVENT_FLAGS_DESC or not self._event_idx:
            return True  # ENABLE (or reserved value 3, or DESC without EVENT_IDX)
        size = self._size
        if not valid or since >= size:
            return True
        new = self._used_idx
        old = new - since
        off = v & 0x7FFF
        if (v >> 15) & 1 != self._used_wrap:
            off -= size
        return vring_need_event(off, new, old)

    # -- available-buffer notification suppression (device event suppression) -----------
    def disable_notifications(self) -> None:
        """Ask the driver not to kick while we poll (flags = RING_EVENT_FLAGS_DISABLE)."""
        if self._broken is not None:
            return
        self._dev_w[0] = RING_EVENT_FLAGS_DISABLE << 16
        self._mem.mark_dirty(self._device_gpa, 4)

    def enable_notifications(self) -> bool:
        """Ask the driver to kick again; return True if more work arrived meanwhile.

        With EVENT_IDX: DESC at ``next_avail``/``avail_wrap``; otherwise ENABLE. Then a full
        barrier, then the flags at ``next_avail`` are re-read. False on a broken ring.
        """
        if self._broken is not None:
            return False
        if self._event_idx:
            self._dev_w[0] = (
                (RING_EVENT_FLAGS_DESC << 16) | self._next_avail | (self._avail_wrap << 15)
            )
        else:
            self._dev_w[0] = RING_EVENT_FLAGS_ENABLE << 16
        self._mem.mark_dirty(self._device_gpa, 4)
        # Full barrier: orders the event suppression store above before the flags load
        # below, or a buffer made available in between would get no kick (store->load).
        full_barrier()
        f: int = self._desc_h[(self._next_avail << 3) + 7]
        return f & _AU == self._avail_pat


class PackedDriverRing(Generic[T]):
    """The front-end (driver) side of one packed virtqueue, over memory it owns.

    The constructor initialises the ring (every descriptor looks already used, event
    structures ENABLE). ``start_idx``/``start_wrap`` other than ``0``/``True`` exist to test
    wrap-around; the device must then be built with the matching base,
    ``encode_base(start_idx, start_wrap, start_idx, start_wrap)``.

    Args:
        mem: memory holding the ring, the buffers and the indirect area.
        size: queue size, 1..32768.
        desc_gpa, driver_gpa, device_gpa: ring areas (see :func:`packed_layout`).
        event_idx: VIRTIO_F_EVENT_IDX negotiated.
        indirect_area: ``(gpa, length)`` for indirect tables, or None. Each buffer id gets a
            fixed slot of ``length // size`` bytes (whole descriptors, at most ``size``).

    Raises:
        ValueError: bad size, alignment, area or start position.
    """

    __slots__ = (
        "_added",
        "_avail_wrap",
        "_broken",
        "_desc",
        "_desc_h",
        "_desc_w",
        "_dev_w",
        "_drv_w",
        "_event_idx",
        "_free_ids",
        "_free_slots",
        "_in_flight",
        "_ind_gpa",
        "_ind_stride",
        "_ind_view",
        "_max_indirect",
        "_name",
        "_next_avail",
        "_next_used",
        "_pending",
        "_pub_avail",
        "_pub_wrap",
        "_since_kick",
        "_size",
        "_state",
        "_used_wrap",
    )

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc_gpa: int,
        driver_gpa: int,
        device_gpa: int,
        *,
        event_idx: bool,
        indirect_area: tuple[int, int] | None = None,
        start_idx: int = 0,
        start_wrap: bool = True,
        name: str = "vring",
    ) -> None:
        if not 0 <= start_idx < size:
            raise ValueError(f"{name}: start index {start_idx} is not below queue size {size}")
        try:
            check_queue_size(size, name, power_of_two=False)
            desc = map_area(mem, desc_gpa, 16 * size, 16, "descriptor ring", name)
            drv = map_area(mem, driver_gpa, 4, 4, "driver event suppression area", name)
            dev = map_area(mem, device_gpa, 4, 4, "device event suppression area", name)
            ind_view: memoryview | None = None
            ind_gpa = stride = max_ind = 0
            if indirect_area is not None:
                ind_gpa, ind_len = indirect_area
                max_ind = min(size, ind_len // (16 * size))
                if max_ind < 1:
                    raise ValueError(
                        f"{name}: indirect area of {ind_len} bytes holds less than one "
                        f"descriptor per buffer id (queue size {size})"
                    )
                stride = 16 * max_ind
                ind_view = map_area(mem, ind_gpa, stride * size, 16, "indirect area", name)
        except RingError as e:
            raise ValueError(str(e)) from e
        desc[:] = bytes(len(desc))
        self._desc = desc
        self._desc_h = desc.cast("H")
        self._desc_w = desc.cast("I")
        # Make the ring look as if every earlier position had been used: slots before
        # start_idx in this lap, the others in the previous lap. Then no slot matches what
        # either side polls for until it is written (all four AVAIL/USED patterns are
        # meaningful, so no single fill value would do). Fresh ring: all zero.
        used_now = _AU if start_wrap else 0
        used_before = 0 if start_wrap else _AU
        for s in range(size):
            self._desc_h[(s << 3) + 7] = used_now if s < start_idx else used_before
        self._drv_w = drv.cast("I")
        self._dev_w = dev.cast("I")
        self._drv_w[0] = RING_EVENT_FLAGS_ENABLE << 16
        self._dev_w[0] = RING_EVENT_FLAGS_ENABLE << 16
        self._name = name
        self._size = size
        self._event_idx = event_idx
        self._ind_view = ind_view
        self._ind_gpa = ind_gpa
        self._ind_stride = stride
        self._max_indirect = max_ind
        self._next_avail = start_idx
        self._avail_wrap = int(start_wrap)
        self._pub_avail = start_idx
        self._pub_wrap = int(start_wrap)
        self._next_used = start_idx
        self._used_wrap = int(start_wrap)
        self._free_slots = size
        self._free_ids = list(range(size - 1, -1, -1))
        self._state: list[tuple[T, int, int] | None] = [None] * size
        self._pending: list[tuple[int, int]] = []
        self._added = 0
        self._since_kick = 0
        self._in_flight = 0
        self._broken: str | None = None

    @property
    def num_free(self) -> int:
        """Free descriptor slots in the ring."""
        return self._free_slots

    @property
    def in_flight(self) -> int:
        """Buffers added and not yet reaped."""
        return self._in_flight

    @property
    def max_indirect(self) -> int:
        """Largest chain that fits one indirect table (0 without an indirect area)."""
        return self._max_indirect

    @property
    def broken(self) -> str | None:
        """Why the device broke this ring (bad used descriptor), or None."""
        return self._broken

    def close(self) -> None:
        """Drop every view into memory. Idempotent."""
        views = [self._desc_h, self._desc_w, self._drv_w, self._dev_w, self._desc]
        if self._ind_view is not None:
            views.append(self._ind_view)
        for mv in views:
            mv.release()
        if self._broken is None:
            self._broken = f"{self._name}: ring closed"

    def add(
        self,
        bufs: Sequence[tuple[int, int, bool]],
        token: T,
        *,
        indirect: bool | None = None,
    ) -> bool:
        """Queue one buffer of ``(gpa, length, device_writable)`` elements; not yet visible.

        ``indirect=None`` uses an indirect table when possible and the buffer has more than
        one element. Returns False (changing nothing) when slots or ids run out.

        Raises:
            ValueError: empty buffer, readable after writable, lengths past 2^32 - 1, or
                ``indirect=True`` without room for the table.
        """
        n = len(bufs)
        if n == 0:
            raise ValueError(f"{self._name}: add: empty buffer")
        wlen = 0
        total = 0
        seen_w = False
        for _gpa, ln, w in bufs:
            total += ln
            if w:
                seen_w = True
                wlen += ln
            elif seen_w:
                raise ValueError(f"{self._name}: add: readable element after a writable one")
        if total > MAX_CHAIN_BYTES:
            raise ValueError(f"{self._name}: add: buffer of {total} bytes is past 2^32 - 1")
        if indirect is None:
            use_ind = 1 < n <= self._max_indirect
        elif indirect:
            if n > self._max_indirect:
                raise ValueError(
                    f"{self._name}: add: {n} elements do not fit an indirect table of "
                    f"{self._max_indirect} entries"
                )
            use_ind = True
        else:
            use_ind = False
        need = 1 if use_ind else n
        if need > self._free_slots or not self._free_ids:
            return False
        bid = self._free_ids.pop()
        size = self._size
        desc = self._desc
        desc_h = self._desc_h
        slot = self._next_avail
        wrap = self._avail_wrap
        head = (slot << 3) + 7
        if use_ind:
            table = self._ind_view
            if table is None:  # unreachable: max_indirect > 0 implies an area
                raise ValueError(f"{self._name}: add: no indirect area")
            off = bid * self._ind_stride
            for k, (gpa, ln, w) in enumerate(bufs):
                _PDESC_PACK(table, off + 16 * k, gpa, ln, 0, DESC_F_WRITE if w else 0)
            _PREST_PACK(desc, slot << 4, self._ind_gpa + off, 16 * n, bid)
            head_flags = DESC_F_INDIRECT | _avail_pattern(wrap)
            slot += 1
            if slot == size:
                slot = 0
                wrap ^= 1
        else:
            last = n - 1
            head_flags = 0
            for k, (gpa, ln, w) in enumerate(bufs):
                _PREST_PACK(desc, slot << 4, gpa, ln, bid)
                flags = (
                    (DESC_F_WRITE if w else 0)
                    | (DESC_F_NEXT if k < last else 0)
                    | _avail_pattern(wrap)
                )
                if k == 0:
                    head_flags = flags  # stored by publish(), after everything else
                else:
                    desc_h[(slot << 3) + 7] = flags  # after this descriptor's other fields
                slot += 1
                if slot == size:
                    slot = 0
                    wrap ^= 1
        self._pending.append((head, head_flags))
        self._next_avail = slot
        self._avail_wrap = wrap
        self._state[bid] = (token, need, wlen)
        self._free_slots -= need
        self._added += need
        self._in_flight += 1
        return True

    def publish(self) -> None:
        """Make every buffer added so far visible by storing the head flags.

        The first pending head goes last, so the device (which polls that slot) sees the
        whole batch at once; every descriptor field was stored before (virtio 1.2 2.8.21.1:
        flags last; program order + x86-64 store->store order). Call :meth:`should_kick`
        after each publish.
        """
        pend = self._pending
        if not pend:
            return
        desc_h = self._desc_h
        for i in range(len(pend) - 1, 0, -1):
            off, f = pend[i]
            desc_h[off] = f
        off, f = pend[0]
        desc_h[off] = f
        pend.clear()
        self._since_kick += self._added
        self._added = 0
        self._pub_avail = self._next_avail
        self._pub_wrap = self._avail_wrap

    def should_kick(self) -> bool:
        """Must the device be notified of what was published since the last call?

        Per the device event suppression structure: ENABLE yes, DISABLE no, DESC (with
        EVENT_IDX) if the named slot/wrap was made available since the last check.
        """
        since = self._since_kick
        if not since:
            return False
        self._since_kick = 0
        # Full barrier: orders the head-flags stores of publish() before the load of the
        # device event suppression structure (store->load; barrier.py).
        full_barrier()
        v: int = self._dev_w[0]
        flags = (v >> 16) & 3
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags != RING_EVENT_FLAGS_DESC or not self._event_idx:
            return True
        size = self._size
        if since >= size:
            return True
        new = self._pub_avail
        old = new - since
        off = v & 0x7FFF
        if (v >> 15) & 1 != self._pub_wrap:
            off -= size
        return vring_need_event(off, new, old)

    def _fail(self, msg: str) -> NoReturn:
        reason = f"{self._name}: {msg}"
        if self._broken is None:
            self._broken = reason
        raise RingError(reason)

    def reap(self) -> list[tuple[T, int]]:
        """Collect used buffers: ``(token, written_len)`` in the order the device used them.

        Raises:
            RingError: a used descriptor names an id not in flight or a length larger than
                the buffer's writable bytes; the ring is then broken.
        """
        if self._broken is not None or not self._in_flight:
            return []
        desc_h = self._desc_h
        desc_w = self._desc_w
        state = self._state
        size = self._size
        slot = self._next_used
        wrap = self._used_wrap
        pat = _AU if wrap else 0
        out: list[tuple[T, int]] = []
        while self._in_flight:
            f: int = desc_h[(slot << 3) + 7]  # flags first, one aligned 16-bit load
            if f & _AU != pat:
                break
            bid: int = desc_h[(slot << 3) + 6]
            ln: int = desc_w[(slot << 2) + 2] if f & DESC_F_WRITE else 0
            st = state[bid] if bid < size else None
            if st is None:
                self._fail(f"used descriptor at slot {slot} has id {bid}, which is not in flight")
            token, nd, wlen = st
            if ln > wlen:
                self._fail(
                    f"used descriptor at slot {slot}: id {bid} length {ln} > writable length {wlen}"
                )
            state[bid] = None
            self._free_ids.append(bid)
            self._free_slots += nd
            self._in_flight -= 1
            out.append((token, ln))
            slot += nd
            if slot >= size:
                slot -= size
                wrap ^= 1
                pat = _AU if wrap else 0
            self._next_used = slot
            self._used_wrap = wrap
        return out

    @property
    def used_position(self) -> tuple[int, bool]:
        """The slot and wrap counter of the next used descriptor :meth:`reap` looks at
        (after reaping everything: where the device will write its next one)."""
        return self._next_used, bool(self._used_wrap)

    def has_used(self) -> bool:
        """True if the descriptor at the next used slot has been marked used."""
        if self._broken is not None or not self._in_flight:
            return False
        f: int = self._desc_h[(self._next_used << 3) + 7]
        return f & _AU == (_AU if self._used_wrap else 0)

    def disable_interrupts(self) -> None:
        """Ask the device not to notify us (driver event suppression flags = DISABLE)."""
        self._drv_w[0] = RING_EVENT_FLAGS_DISABLE << 16

    def enable_interrupts(self) -> bool:
        """Ask for a notification at the next used buffer; True if one is already there.

        With EVENT_IDX: DESC at the next used slot/wrap; otherwise ENABLE. Then a full
        barrier and a re-read of that slot's flags.
        """
        if self._event_idx:
            self._drv_w[0] = (
                (RING_EVENT_FLAGS_DESC << 16) | self._next_used | (self._used_wrap << 15)
            )
        else:
            self._drv_w[0] = RING_EVENT_FLAGS_ENABLE << 16
        # Full barrier: orders the event suppression store before the flags load below.
        full_barrier()
        return self.has_used()
