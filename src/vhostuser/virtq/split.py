"""Split virtqueues (virtio 1.2 section 2.7): the device side and the driver side. No I/O.

:class:`SplitDeviceRing` is what a back-end runs: it pops descriptor chains the guest made
available, validates every field it reads from shared memory against bounds it owns (queue
size, region table), and publishes used elements. :class:`SplitDriverRing` is the front-end /
guest side, used by the front-end role and by the tests.

Shared-memory discipline (docs/architecture.md "Memory ordering", docs/security.md "Rings"):

* ``avail.idx``, ``used.idx``, ``avail.flags``, ``used.flags``, ``used_event``,
  ``avail_event`` and the avail ring entries are read and written as single aligned 16-bit
  accesses through ``memoryview.cast('H')`` items; used elements through ``cast('I')`` items.
* every descriptor is read exactly once, with one 16-byte ``struct.unpack_from``, into locals
  that are validated and then used;
* the one full barrier is :func:`vhostuser.virtq.barrier.full_barrier`; the orderings that
  need no instruction on x86-64 are explained there and named at each use below.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Sequence
from operator import itemgetter
from typing import Final, Generic, NoReturn, TypeVar

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

__all__ = [
    "AVAIL_F_NO_INTERRUPT",
    "USED_F_NO_NOTIFY",
    "SplitDeviceRing",
    "SplitDriverRing",
    "split_layout",
]

#: virtio 1.2 2.7.6: ``struct virtq_avail`` flags bit.
AVAIL_F_NO_INTERRUPT: Final = 1
#: virtio 1.2 2.7.8: ``struct virtq_used`` flags bit.
USED_F_NO_NOTIFY: Final = 1

# struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; }  (virtio 1.2 2.7.5)
_DESC: Final = struct.Struct("<QIHH")
_DESC_UNPACK: Final = _DESC.unpack_from
_DESC_PACK: Final = _DESC.pack_into

T = TypeVar("T")

#: The device ring's state block (``SplitDeviceRing.state``): an ``array('q')`` of these
#: fields, shared by the Python engine and the compiled one (``vhostuser._fastpath``):
#: the next avail index to take, the used index to write next, chains in flight, used
#: elements written but not published (0/1), pushed since the last notification check (0/1).
STATE_FIELDS: Final = ("next_avail", "used_idx", "in_flight", "held", "pushed")
_NA, _UI, _IF, _HELD, _PUSHED = range(5)
STATE_LEN: Final = 8  # room to grow without changing the compiled engine's checks
#: ``engine_view`` kinds: a split ring is 0 (a packed ring 1, virtq/packed.py).
SPLIT_KIND: Final = 0


def split_layout(size: int, base_gpa: int = 0) -> tuple[int, int, int, int]:
    """Lay out a split ring contiguously from ``base_gpa`` (virtio 1.2 2.7 alignment table).

    Returns ``(desc_gpa, avail_gpa, used_gpa, total_bytes)``; the avail and used areas
    include the EVENT_IDX fields, so the layout serves both feature settings.

    Raises:
        ValueError: ``size`` is not a power of two in 1..32768, or ``base_gpa`` is not
            16-byte aligned.
    """
    if not 1 <= size <= 32768 or size & (size - 1):
        raise ValueError(f"split ring size {size} is not a power of two in 1..32768")
    if base_gpa % 16:
        raise ValueError(f"split ring base {base_gpa:#x} is not 16-byte aligned")
    desc = base_gpa
    avail = desc + 16 * size
    used = (avail + 6 + 2 * size + 3) & ~3
    end = used + 6 + 8 * size
    return desc, avail, used, end - base_gpa


_USED_STRUCTS: dict[int, struct.Struct] = {}
_NO_RUN: Final[tuple[list[int], list[int], list[int]]] = ([], [], [])


_SEQS: dict[int, tuple[list[int], array[int], array[int], bytes]] = {}


def _seq(size: int) -> tuple[list[int], array[int], array[int], bytes]:
    """``0..size-1`` twice, as a list, as 32-bit items and as the bytes of 16-bit items
    (in the rings' byte order): the heads of any run of consecutive heads, wrapping at the
    table's end, are one slice of them; and ``size`` 32-bit zeros. Shared by the rings of
    one size (packed.py's too: buffer ids are handed out alike)."""
    got = _SEQS.get(size)
    if got is None:
        twice = [*range(size), *range(size)]
        got = _SEQS[size] = (twice, array("I", twice), array("I", bytes(4 * size)),
                             array("H", twice).tobytes())
    return got


def _used_struct(n: int) -> struct.Struct:
    """The packer of ``n`` used elements (id u32, len u32 each; virtio 1.2 2.7.8)."""
    st = _USED_STRUCTS.get(n)
    if st is None:
        st = _USED_STRUCTS[n] = struct.Struct(f"<{2 * n}I")
    return st


class SplitDeviceRing:
    """The back-end side of one split virtqueue over a :class:`GuestMemory`.

    Args:
        mem: guest memory; ring areas and buffers are looked up through it.
        size: queue size (SET_VRING_NUM): a power of two in 1..32768.
        desc_gpa, avail_gpa, used_gpa: guest-physical addresses of the descriptor table,
            available ring and used ring (the connection translates SET_VRING_ADDR's
            front-end addresses with ``mem.va_to_gpa`` first).
        event_idx: VIRTIO_F_EVENT_IDX (bit 29) was negotiated.
        indirect: VIRTIO_F_INDIRECT_DESC (bit 28) was negotiated.
        next_avail: SET_VRING_BASE ``num``: the next avail index to process.
        name: used in error messages (e.g. ``"ring 0"``).
        used_log_gpa: where writes to the used ring are logged (SET_VRING_ADDR's
            ``log_guest_addr`` when VHOST_VRING_F_LOG is set); default ``used_gpa``.

    ``used.idx`` is read from memory here, so a ring re-created after reconnect resumes
    where the previous back-end stopped (as libvhost-user and rust-vmm do on
    SET_VRING_ADDR).

    The ring keeps views into guest memory: build a new one after the memory table
    changes, and :meth:`close` the old one.

    Raises:
        RingError: bad size, misaligned area, an area not inside one region, or
            ``next_avail`` outside 0..65535. The message names the values.
    """

    __slots__ = (
        "__weakref__",  # a QueueRunner refers to its ring without keeping it alive
        "_avail_event_i",
        "_avail_gpa",
        "_avail_h",
        "_broken",
        "_chains",
        "_desc",
        "_desc_hw",
        "_desc_q",
        "_desc_w",
        "_event_idx",
        "_indirect",
        "_mask",
        "_mem",
        "_name",
        "_run",
        "_seq",
        "_seq_b",
        "_seq_i",
        "_signalled_used",
        "_signalled_valid",
        "_size",
        "_st",
        "_used_event_i",
        "_used_gpa",
        "_used_h",
        "_used_log",
        "_used_w",
        "_view",
        "_zeros",
    )

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc_gpa: int,
        avail_gpa: int,
        used_gpa: int,
        *,
        event_idx: bool,
        indirect: bool,
        next_avail: int = 0,
        name: str = "vring",
        used_log_gpa: int | None = None,
    ) -> None:
        check_queue_size(size, name, power_of_two=True)
        if not 0 <= next_avail <= 0xFFFF:
            raise RingError(f"{name}: next avail index {next_avail} is not in 0..65535")
        ev = 2 if event_idx else 0
        # virtio 1.2 2.7 alignment table: descriptors 16, avail ring 2, used ring 4.
        desc = map_area(mem, desc_gpa, 16 * size, 16, "descriptor table", name)
        avail = map_area(mem, avail_gpa, 4 + 2 * size + ev, 2, "available ring", name)
        used = map_area(mem, used_gpa, 4 + 8 * size + ev, 4, "used ring", name)
        self._mem = mem
        self._size = size
        self._mask = size - 1
        self._name = name
        self._event_idx = event_idx
        self._indirect = indirect
        self._desc = desc
        # The descriptor table's fields as items (addr, len, flags: 2h, 4h+2, 8h+6), for
        # the in-place fast path's strided reads.
        self._desc_q = desc.cast("Q")
        self._desc_w = desc.cast("I")
        self._desc_hw = desc.cast("H")
        self._seq, self._seq_i, self._zeros, self._seq_b = _seq(size)
        self._run: list[int] | None = None  # the heads of the last peek_run, if consecutive
        self._avail_h = avail.cast("H")
        self._used_h = used.cast("H")
        self._used_w = used[: 4 + 8 * size].cast("I")
        self._avail_gpa = avail_gpa
        self._used_gpa = used_gpa
        # vhost-user.rst "Live migration": with VHOST_VRING_F_LOG, used-ring writes are
        # logged at the ring's log_guest_addr; otherwise at the used ring's own address.
        self._used_log = used_gpa if used_log_gpa is None else used_log_gpa
        self._used_event_i = 2 + size  # avail->used_event, in 16-bit units
        self._avail_event_i = 2 + 4 * size  # used->avail_event, in 16-bit units
        # The ring's mutable indices live in one small block (STATE_FIELDS) that the
        # compiled engine reads and writes too; resume used.idx with one 16-bit read.
        self._st = array("q", bytes(8 * STATE_LEN))
        self._st[_NA] = next_avail
        self._st[_UI] = self._used_h[1]
        self._chains: list[Chain | None] = [None] * size
        self._broken: str | None = None
        self._view = (SPLIT_KIND, self._st, desc, self._avail_h, self._used_h, size,
                      self._used_log)
        # _HELD: used elements written past the published used.idx (push(publish=False)).
        self._signalled_used = self._st[_UI]
        self._signalled_valid = False

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
    def state(self) -> array[int]:
        """The state block (see :data:`STATE_FIELDS`), for the compiled engine."""
        return self._st

    @property
    def engine_view(self) -> tuple[int, array[int], memoryview, memoryview, memoryview, int,
                                   int]:
        """``(kind, state, descriptor_table, avail_area, used_area, size, used ring gpa)``:
        the ring as the compiled engine takes it (built once; :meth:`close` releases the
        views). The gpa is where the engine's writes to the ring are logged."""
        return self._view

    @property
    def indirect(self) -> bool:
        """VIRTIO_F_INDIRECT_DESC was negotiated (indirect tables are accepted)."""
        return self._indirect

    @property
    def used_gpa(self) -> int:
        """Guest-physical address of the used ring (where its writes are logged)."""
        return self._used_gpa

    @property
    def avail_area(self) -> memoryview:
        """The available ring as 16-bit items (flags, idx, ring..., used_event)."""
        return self._avail_h

    @property
    def used_area(self) -> memoryview:
        """The used ring as 16-bit items (flags, idx, elements..., avail_event)."""
        return self._used_h

    @property
    def in_flight(self) -> int:
        """Chains popped and not yet pushed."""
        return self._st[_IF]

    @property
    def next_avail(self) -> int:
        """The next avail index to process (16 bits)."""
        return self._st[_NA]

    @property
    def used_idx(self) -> int:
        """The used index this ring will publish next (16 bits)."""
        return self._st[_UI]

    def base(self) -> int:
        """GET_VRING_BASE ``num`` for a split ring: the next avail index, low 16 bits."""
        return self._st[_NA] & 0xFFFF

    def mark_broken(self, reason: str) -> None:
        """Stop the queue (a guest fault found by a device handler). The first reason wins."""
        if self._broken is None:
            self._broken = reason

    def adopt_in_flight(self, old: SplitDeviceRing) -> None:
        """Take over the chains ``old`` had in flight: ``old`` is this queue as it was
        built before the memory table or the ring addresses changed (vhost-user.rst: the
        table may change while rings run), so that a device completing them later still
        can. Their views keep the old mappings alive until they are pushed.

        Raises:
            ValueError: ``old`` has another queue size (a caller bug).
        """
        if old._size != self._size:
            raise ValueError(f"{self._name}: cannot adopt a ring of size {old._size}")
        self._chains = list(old._chains)
        self._st[_IF] = old._st[_IF]

    def _fail(self, msg: str) -> NoReturn:
        reason = f"{self._name}: {msg}"
        self.mark_broken(reason)
        raise RingError(reason)

    def close(self) -> None:
        """Drop every view into guest memory (before the shell unmaps it). Idempotent."""
        self._chains = [None] * self._size
        for mv in (self._avail_h, self._used_h, self._used_w, self._desc_q, self._desc_w,
                   self._desc_hw, self._desc):
            mv.release()
        self.mark_broken(f"{self._name}: ring closed")

    # -- consuming available buffers -----------------------------------------------------
    def pending(self) -> int:
        """How many avail entries the driver has published beyond ``next_avail``.

        Reads ``avail.idx`` once; does not validate (``pop`` does). Returns 0 when broken.
        """
        if self._broken is not None:
            return 0
        return (self._avail_h[1] - self._st[_NA]) & 0xFFFF

    def pop(self, budget: int) -> list[Chain]:
        """Take up to ``budget`` available chains.

        ``avail.idx`` is read once per call. Each chain's head is recorded as in flight until
        :meth:`push` returns it. Fewer chains come back when the call has already read
        ``DESCS_PER_CHAIN * budget`` descriptors (the rest wait for the next call).

        A chain the guest broke stops the call: the chains before it are returned, and the
        next call meets it first.

        Raises:
            RingError: the first chain of the call breaks the ring (or avail.idx does); the
                ring is now broken (``broken`` holds the same message) and every later
                ``pop`` returns ``[]``.
        """
        if self._broken is not None or budget <= 0:
            return []
        avail_h = self._avail_h
        # virtio 1.2 2.7.13.3: read avail.idx (one aligned 16-bit load) before the ring
        # entries it covers; x86-64 keeps load->load order, so no fence (barrier.py).
        avail_idx: int = avail_h[1]
        nxt = self._st[_NA]
        pending = (avail_idx - nxt) & 0xFFFF
        if not pending:
            return []
        size = self._size
        if pending > size:
            # virtio 1.2 2.7.13: at most queue-size buffers can be outstanding.
            self._fail(
                f"avail.idx {avail_idx} is {pending} entries past next avail {nxt}, more "
                f"than the queue size {size}"
            )
        if pending > budget:
            pending = budget
        chains = self._chains
        mask = self._mask
        walk = self._walk
        desc_budget = DESCS_PER_CHAIN * budget
        out: list[Chain] = []
        for _ in range(pending):
            head: int = avail_h[2 + (nxt & mask)]  # read once
            try:
                if head >= size:
                    self._fail(f"avail ring entry {nxt} holds head {head} >= queue size {size}")
                if chains[head] is not None:
                    self._fail(
                        f"avail ring entry {nxt} holds head {head}, which is already in flight"
                    )
                chain = walk(head)
            except RingError:
                if not out:
                    raise
                # The chains before the faulty one are good: hand them over (the device
                # serves them, as it would have before the driver published the bad one)
                # and stop in front of it; the next pop meets the fault first and breaks
                # the ring. The compiled engines work the same way.
                self._broken = None
                return out
            chains[head] = chain
            out.append(chain)
            nxt = (nxt + 1) & 0xFFFF
            self._st[_NA] = nxt
            self._st[_IF] += 1
            desc_budget -= chain.ring_descs
            if desc_budget <= 0:
                break
        return out

    def resubmit(self, heads: Sequence[int], next_avail: int) -> list[Chain]:
        """Put ``heads`` back in flight and resume popping at ``next_avail``.

        For INFLIGHT_SHMFD recovery: the chains a previous back-end had popped but not
        completed are walked and validated exactly as :meth:`pop` does, and returned in the
        given order.

        Raises:
            RingError: a head's chain is invalid; the ring is then broken.
            ValueError: a head is outside the queue or already in flight, or ``next_avail``
                is not a 16-bit index (caller bugs).
        """
        if not 0 <= next_avail <= 0xFFFF:
            raise ValueError(f"{self._name}: resubmit: next avail {next_avail} is not 16-bit")
        if self._broken is not None:
            return []
        chains = self._chains
        out: list[Chain] = []
        for h in heads:
            if not 0 <= h < self._size or chains[h] is not None:
                raise ValueError(
                    f"{self._name}: resubmit: head {h} is outside the queue or already in flight"
                )
            chain = self._walk(h)
            chains[h] = chain
            self._st[_IF] += 1
            out.append(chain)
        self._st[_NA] = next_avail
        return out

    def _walk(self, head: int) -> Chain:
        """Walk, validate and translate the chain at ``head`` (docs/security.md "Rings")."""
        size = self._size
        segments = self._mem.segments
        view = self._mem.view
        table = self._desc
        limit = size  # virtio 1.2 2.7.5.3.1: no chain longer than the queue size
        in_table = False
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        wgpas: list[tuple[int, int]] = []
        rlen = 0
        wlen = 0
        in_write = False
        idx = head
        hops = 0
        ndesc = 0
        while True:
            if hops == limit:
                where = "indirect table" if in_table else "descriptor table"
                self._fail(
                    f"chain at head {head} visits more than {limit} descriptors of its {where} "
                    "(a loop)"
                )
            hops += 1
            ndesc += 1
            # The descriptor is read once, into locals, then validated, then used.
            addr, ln, flags, nxt = _DESC_UNPACK(table, idx << 4)
            if flags & DESC_F_INDIRECT:
                where = f"chain at head {head}: descriptor {idx}"
                if in_table:
                    # virtio 1.2 2.7.5.3.1: "MUST NOT set the VIRTQ_DESC_F_INDIRECT flag
                    # within an indirect descriptor".
                    self._fail(f"{where} of an indirect table is itself indirect (nested)")
                if not self._indirect:
                    self._fail(f"{where} is indirect but VIRTIO_F_INDIRECT_DESC is off")
                if flags & DESC_F_NEXT:
                    # virtio 1.2 2.7.5.3.1: "MUST NOT set both INDIRECT and NEXT".
                    self._fail(f"{where} sets both INDIRECT and NEXT (flags {flags:#x})")
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
                try:
                    table = self._mem.view(addr, ln)
                except GuestMemoryError as e:
                    self._fail(
                        f"{where}: indirect table at gpa {addr:#x} length {ln} is not inside one "
                        f"memory region ({e})"
                    )
                if table.format != "B":
                    table = table.cast("B")
                # virtio 1.2 2.7.5.3.2: the WRITE flag of this descriptor is ignored; the
                # table starts at index 0.
                in_table = True
                limit = entries
                hops = 0
                idx = 0
                continue
            if rlen + wlen + ln > MAX_CHAIN_BYTES:
                # virtio 1.2 2.7.5.2: no chain longer than 2^32 bytes in total (checked
                # before the buffer is translated).
                self._fail(
                    f"chain at head {head}: descriptor lengths sum to {rlen + wlen + ln}, "
                    "past 2^32 - 1"
                )
            if flags & DESC_F_WRITE:
                in_write = True
                if ln:
                    try:
                        writable.append(view(addr, ln))
                    except GuestMemoryError:  # crosses regions (or is unmapped)
                        try:
                            writable += segments(addr, ln)
                        except GuestMemoryError as e:
                            self._fail(f"chain at head {head}: buffer {addr:#x}+{ln:#x}: {e}")
                    wlen += ln
                wgpas.append((addr, ln))
            else:
                if in_write:
                    # virtio 1.2 2.7.4.2: writable elements come after all readable ones.
                    self._fail(
                        f"chain at head {head}: descriptor {idx} is device-readable after a "
                        "device-writable one"
                    )
                if ln:
                    try:
                        readable.append(view(addr, ln))
                    except GuestMemoryError:  # crosses regions (or is unmapped)
                        try:
                            readable += segments(addr, ln)
                        except GuestMemoryError as e:
                            self._fail(f"chain at head {head}: buffer {addr:#x}+{ln:#x}: {e}")
                    rlen += ln
            if not flags & DESC_F_NEXT:
                break
            if nxt >= limit:
                where = "indirect table entries" if in_table else "queue size"
                self._fail(
                    f"chain at head {head}: descriptor {idx} has next {nxt} >= {where} {limit}"
                )
            idx = nxt
        return Chain(head, readable, writable, rlen, wlen, wgpas, ndesc)

    # -- in-place fast path (device handlers that consume one-descriptor chains) ----------
    #
    # A device may consume simple chains without building Chain objects: peek_heads()
    # gives the heads the driver made available, the device reads each head's descriptor
    # from descriptor_table itself (once, into locals; it must stop at any chain it does
    # not fully understand and leave it to pop(), which validates every docs/security.md case),
    # then complete_in_place() publishes the ones it took and moves the ring past them.
    # Every store to the used ring stays in this class.

    @property
    def descriptor_table(self) -> memoryview:
        """The descriptor table, 16 bytes per entry (virtio 1.2 2.7.5), read-only use."""
        return self._desc

    def peek_heads(self, limit: int) -> list[int] | None:
        """Up to ``limit`` heads the driver made available from ``next_avail`` on, without
        taking them; ``[]`` if none; None when the avail ring is not plausible (more than
        the queue size ahead, a head outside the queue, repeated, or already in flight):
        the caller must then :meth:`pop`, which reports the fault.
        """
        heads = self._avail_heads(limit)
        if not heads:
            return heads
        if max(heads) >= self._size or len(set(heads)) != len(heads):
            return None
        if self._st[_IF] and self._any_in_flight(heads):
            return None
        return heads

    def _avail_heads(self, limit: int) -> list[int] | None:
        """Up to ``limit`` avail entries from ``next_avail`` on, not yet checked; None when
        ``avail.idx`` is more than the queue size ahead."""
        avail_h = self._avail_h
        nxt = self._st[_NA]
        # One aligned 16-bit load of avail.idx, before the entries it covers (load->load).
        pending = (avail_h[1] - nxt) & 0xFFFF
        size = self._size
        if pending > size:
            return None
        n = pending if pending < limit else limit
        if not n:
            return []
        s = nxt & (size - 1)
        if s + n <= size:
            heads: list[int] = avail_h[2 + s : 2 + s + n].tolist()
        else:
            heads = avail_h[2 + s : 2 + size].tolist() + avail_h[2 : 2 + s + n - size].tolist()
        return heads

    def _avail_raw(self, limit: int) -> bytes | None:
        """:meth:`_avail_heads` as the entries' bytes (16 bits each)."""
        avail_h = self._avail_h
        nxt = self._st[_NA]
        # One aligned 16-bit load of avail.idx, before the entries it covers (load->load).
        pending = (avail_h[1] - nxt) & 0xFFFF
        size = self._size
        if pending > size:
            return None
        n = pending if pending < limit else limit
        if not n:
            return b""
        s = nxt & (size - 1)
        if s + n <= size:
            return avail_h[2 + s : 2 + s + n].tobytes()
        return avail_h[2 + s : 2 + size].tobytes() + avail_h[2 : 2 + s + n - size].tobytes()

    def _any_in_flight(self, heads: list[int]) -> bool:
        chains = self._chains
        return any(chains[h] is not None for h in heads)

    def peek_simple(self, limit: int, flags: int) -> list[tuple[int, int, int]] | None:
        """Up to ``limit`` available chains of ONE descriptor whose flags are exactly
        ``flags`` (0 to transmit, DESC_F_WRITE to receive), as ``(head, addr, len)``,
        without taking them; each descriptor is read once. Stops before the first other
        chain. ``[]``: none available; None: the caller must :meth:`pop` the next chain
        (not of that kind, or the avail ring is not plausible - see :meth:`peek_heads`).
        """
        heads = self.peek_heads(limit)
        if heads is None:
            return None
        if not heads:
            return []
        desc = self._desc
        out: list[tuple[int, int, int]] = []
        for h in heads:
            addr, ln, fl, _nx = _DESC_UNPACK(desc, h << 4)  # read once, into locals
            if fl != flags:
                break
            out.append((h, addr, ln))
        return out or None

    def peek_run(self, limit: int, flags: int
                 ) -> tuple[list[int], list[int], list[int]] | None:
        """:meth:`peek_simple` for a whole burst: the same chains, as three parallel lists
        ``(heads, addrs, lens)``. Heads the driver made available in order (the usual
        case: the descriptor table is handed out in order by QEMU's, Linux's and DPDK's
        drivers) are read with one unpack per run of consecutive heads; each descriptor is
        still read once, after the avail entries naming it (load->load order, barrier.py).
        ``([], [], [])``: none available; None: the caller must :meth:`pop` the next chain.
        """
        raw = self._avail_raw(limit)
        if raw is None:
            return None
        n = len(raw) >> 1
        if not n:
            return _NO_RUN
        h0 = raw[0] | raw[1] << 8
        dq = self._desc_q
        dw = self._desc_w
        dh = self._desc_hw
        # Runs of consecutive heads: [h0, h0+1, ...], wrapping at most once at the table's
        # end: each field read with one strided load per run.
        size = self._size
        k = size - h0
        if k > n:
            k = n
        if h0 < size and raw == self._seq_b[2 * h0 : 2 * (h0 + n)]:
            # Consecutive heads lie in the queue and repeat none.
            heads = self._seq[h0 : h0 + n]
            if self._st[_IF] and self._any_in_flight(heads):
                return None
            self._run = heads  # complete_run may store their ids from _seq_i
            e = h0 + k
            addrs: list[int] = dq[h0 << 1 : e << 1 : 2].tolist()
            lens: list[int] = dw[(h0 << 2) + 2 : e << 2 : 4].tolist()
            fl: list[int] = dh[(h0 << 3) + 6 : e << 3 : 8].tolist()
            if k < n:
                e = n - k
                addrs += dq[0 : e << 1 : 2].tolist()
                lens += dw[2 : e << 2 : 4].tolist()
                fl += dh[6 : e << 3 : 8].tolist()
        else:
            # Any order (a LIFO free list, as Linux keeps): checked as peek_heads does,
            # then read from the span the heads lie in when it is small, else one at a time.
            self._run = None
            heads = array("H", raw).tolist()
            if max(heads) >= size or len(set(heads)) != n:
                return None
            if self._st[_IF] and self._any_in_flight(heads):
                return None
            lo = min(heads)
            hi = max(heads) + 1
            if n > 1 and hi - lo <= 2 * n + 32:
                pick = itemgetter(*[h - lo for h in heads])
                addrs = list(pick(dq[lo << 1 : hi << 1 : 2].tolist()))
                lens = list(pick(dw[(lo << 2) + 2 : hi << 2 : 4].tolist()))
                fl = list(pick(dh[(lo << 3) + 6 : hi << 3 : 8].tolist()))
            else:
                addrs = [dq[h << 1] for h in heads]
                lens = [dw[(h << 2) + 2] for h in heads]
                fl = [dh[(h << 3) + 6] for h in heads]
        if fl.count(flags) != n:
            m = 0
            for f in fl:
                if f != flags:
                    break
                m += 1
            if not m:
                return None
            return heads[:m], addrs[:m], lens[:m]
        return heads, addrs, lens

    def complete_run(self, heads: Sequence[int], addrs: Sequence[int],
                     lens: Sequence[int] | None, taken: int, *, publish: bool = True) -> None:
        """:meth:`complete_in_place` for the first ``taken`` chains of :meth:`peek_run`:
        ``heads[k]`` used with ``lens[k]`` bytes written (0 for all when ``lens`` is None).
        ``addrs`` is not needed here (a packed ring's :meth:`complete_run` takes it).
        """
        if not taken:
            return
        size = self._size
        start = self._st[_UI]
        s = start & (size - 1)
        used_w = self._used_w
        first = size - s if s + taken > size else taken
        # virtio 1.2 2.7.8: used elements (id, len), one strided store per field and lap,
        # all before used.idx (complete_in_place's rules).
        e = s + first
        if heads is self._run:  # consecutive (peek_run): the ids are a slice of _seq_i
            h0 = heads[0]
            ids = self._seq_i[h0 : h0 + taken]
        else:
            ids = array("I", heads[:taken])
        lw = array("I", lens[:taken]) if lens is not None else self._zeros[:taken]
        used_w[1 + 2 * s : 1 + 2 * e : 2] = ids[:first]
        used_w[2 + 2 * s : 2 + 2 * e : 2] = lw[:first]
        if first < taken:
            rest = taken - first
            used_w[1 : 1 + 2 * rest : 2] = ids[first:]
            used_w[2 : 2 + 2 * rest : 2] = lw[first:]
        self._advance_used(start, s, first, taken, publish)

    def complete_in_place(self, used: Sequence[int], taken: int, *, publish: bool = True) -> None:
        """The first ``taken`` heads of :meth:`peek_heads` were consumed in place:
        write ``used`` (head, len, head, len ...) as their used elements, in one or two
        stores, then ``used.idx`` (virtio 1.2 2.7.8.2: elements before the index; x86-64
        store->store order, barrier.py), and move ``next_avail`` past them. Written bytes
        of the used ring are reported to ``mem.mark_dirty``; the caller reports the
        buffer bytes it wrote. With ``publish=False`` ``used.idx`` is left for
        :meth:`publish` (see there).
        """
        if not taken:
            return
        size = self._size
        start = self._st[_UI]
        s = start & (size - 1)
        used_w = self._used_w
        first = size - s if s + taken > size else taken
        _used_struct(first).pack_into(used_w, 4 + 8 * s, *used[: 2 * first])
        if first < taken:
            _used_struct(taken - first).pack_into(used_w, 4, *used[2 * first : 2 * taken])
        self._advance_used(start, s, first, taken, publish)

    def _advance_used(self, start: int, s: int, first: int, taken: int, publish: bool) -> None:
        """After ``taken`` used elements were stored from ``start`` (slot ``s``, ``first``
        of them before the ring's end): move the indices, report the ring writes, publish
        ``used.idx`` (or hold it)."""
        u = (start + taken) & 0xFFFF
        self._st[_UI] = u
        self._st[_NA] = (self._st[_NA] + taken) & 0xFFFF
        mark = self._mem.mark_dirty
        gpa = self._used_log
        mark(gpa + 4 + 8 * s, 8 * first)
        if first < taken:
            mark(gpa + 4, 8 * (taken - first))
        if publish:
            self._used_h[1] = u  # one aligned 16-bit store, after the elements (store->store)
            self._st[_HELD] = 0
            self._st[_PUSHED] = 1
            mark(gpa + 2, 2)
        else:
            self._st[_HELD] = 1

    # -- returning used buffers ---------------------------------------------------------
    def push(self, elems: Sequence[tuple[int, int]], *, publish: bool = True) -> None:
        """Publish ``(head, written_len)`` pairs as used, then ``used.idx`` once.

        With ``publish=False`` the elements are written but ``used.idx`` is not: the driver
        cannot see them until :meth:`publish` (a switch holds a destination's receive
        buffers back until the source's transmit buffers are returned).

        This is the one place the writes a device handler made into guest buffers are
        reported: ``mem.mark_dirty`` is called for the first ``written_len`` bytes of each
        chain's writable buffers, and for the used elements and ``used.idx``. (The ring's own
        control writes, ``used.flags`` and ``avail_event``, are reported where they are
        made.) Does nothing on a broken ring.

        Raises:
            ValueError: a head is not in flight, or ``written_len`` is negative or larger than
                the chain's writable length (a device-handler bug, not a guest fault). The
                elements before the bad one are still published.
        """
        if self._broken is not None or not elems:
            return
        chains = self._chains
        used_w = self._used_w
        mask = self._mask
        size = self._size
        mark = self._mem.mark_dirty
        start = idx = self._st[_UI]
        error: str | None = None
        for head, written in elems:
            chain = chains[head] if 0 <= head < size else None
            if chain is None:
                error = f"{self._name}: push: head {head} is not in flight"
                break
            if not 0 <= written <= chain.writable_len:
                error = (
                    f"{self._name}: push: head {head} written length {written} is outside "
                    f"0..{chain.writable_len}"
                )
                break
            chains[head] = None
            slot = idx & mask
            # virtio 1.2 2.7.8.2: "The device MUST set len prior to updating the used idx".
            used_w[1 + 2 * slot] = head
            used_w[2 + 2 * slot] = written
            if written:
                chain.mark_written(mark, written)
            idx = (idx + 1) & 0xFFFF
        n = (idx - start) & 0xFFFF
        if n:
            self._st[_UI] = idx
            self._st[_IF] -= n
            if publish:
                # Used elements (and the buffer contents written by the handler) are stored
                # before used.idx: program order + x86-64 store->store order (barrier.py).
                self._used_h[1] = idx  # one aligned 16-bit store
                self._st[_HELD] = 0
                self._st[_PUSHED] = 1
            else:
                self._st[_HELD] = 1
            used_gpa = self._used_log
            s = start & mask
            if s + n <= size:
                mark(used_gpa + 4 + 8 * s, 8 * n)
            else:
                mark(used_gpa + 4 + 8 * s, 8 * (size - s))
                mark(used_gpa + 4, 8 * (n - (size - s)))
            mark(used_gpa + 2, 2)
        if error is not None:
            raise ValueError(error)

    @property
    def held(self) -> bool:
        """True if used elements were written with ``publish=False`` and not published."""
        return bool(self._st[_HELD])

    def publish(self) -> None:
        """Store ``used.idx`` for every element written with ``publish=False``, in one
        aligned 16-bit store after them (virtio 1.2 2.7.8.2; store->store, barrier.py).
        Nothing happens when nothing is held or the ring is broken."""
        if not self._st[_HELD] or self._broken is not None:
            return
        self._used_h[1] = self._st[_UI]
        self._st[_HELD] = 0
        self._st[_PUSHED] = 1
        self._mem.mark_dirty(self._used_log + 2, 2)

    def should_notify(self) -> bool:
        """After :meth:`push`: must the driver be notified (call eventfd)?

        virtio 1.2 2.7.7.2: with EVENT_IDX, notify when ``used.idx`` passed ``used_event``;
        without it, unless ``VRING_AVAIL_F_NO_INTERRUPT`` is set. False when nothing was
        pushed since the last call, or the ring is broken. Never raises.
        """
        if not self._st[_PUSHED] or self._broken is not None:
            return False
        self._st[_PUSHED] = 0
        # Full barrier: orders the used.idx store in push() before the loads of
        # avail.flags / used_event below (store->load; barrier.py).
        full_barrier()
        if self._event_idx:
            new = self._st[_UI]
            old = self._signalled_used
            self._signalled_used = new
            if not self._signalled_valid:
                self._signalled_valid = True
                return True
            return vring_need_event(self._avail_h[self._used_event_i], new, old)
        return not self._avail_h[0] & AVAIL_F_NO_INTERRUPT

    # -- available-buffer notification suppression (virtio 1.2 2.7.10) ---------------------
    def disable_notifications(self) -> None:
        """Ask the driver not to kick while we poll.

        Without EVENT_IDX sets ``VRING_USED_F_NO_NOTIFY``. With EVENT_IDX nothing is written:
        ``avail_event`` stays at the index that woke us, which the driver has already passed,
        so it will not kick again until :meth:`enable_notifications` moves it.
        """
        if self._broken is not None or self._event_idx:
            return
        self._used_h[0] = USED_F_NO_NOTIFY
        self._mem.mark_dirty(self._used_log, 2)

    def enable_notifications(self) -> bool:
        """Ask the driver to kick again; return True if more work arrived meanwhile.

        Writes ``avail_event = next_avail`` (EVENT_IDX) or clears ``VRING_USED_F_NO_NOTIFY``,
        then a full barrier, then re-reads ``avail.idx``. On True the caller should
        :meth:`disable_notifications` and keep polling. False on a broken ring.
        """
        if self._broken is not None:
            return False
        if self._event_idx:
            self._used_h[self._avail_event_i] = self._st[_NA]
            self._mem.mark_dirty(self._used_log + 4 + 8 * self._size, 2)
        else:
            self._used_h[0] = 0
            self._mem.mark_dirty(self._used_log, 2)
        # Full barrier: orders the flags/avail_event store above before the avail.idx load
        # below, or a buffer published in between would get no kick (store->load).
        full_barrier()
        return self._avail_h[1] != self._st[_NA]


class SplitDriverRing(Generic[T]):
    """The front-end (driver) side of one split virtqueue, over memory it owns.

    The constructor initialises the ring areas (zeroes them, sets both indices to
    ``start_idx``; ``start_idx`` other than 0 exists to test 16-bit wrap-around).

    Args:
        mem: memory holding the ring, the buffers and the indirect area.
        size: queue size, a power of two in 1..32768.
        desc_gpa, avail_gpa, used_gpa: ring areas (see :func:`split_layout`).
        event_idx: VIRTIO_F_EVENT_IDX negotiated.
        indirect_area: ``(gpa, length)`` where indirect tables may be placed, or None for no
            indirect descriptors. Each head gets a fixed slot of ``length // size`` bytes
            (rounded down to whole descriptors, at most ``size`` entries).
        start_idx: initial ``avail.idx`` and ``used.idx``.

    Buffers are added with :meth:`add` (tokens are returned by :meth:`reap` as given), made
    visible with :meth:`publish`, and the device is kicked when :meth:`should_kick` says so.

    Raises:
        ValueError: bad size, alignment, area or start index (our own caller's mistake).
    """

    __slots__ = (
        "_avail_event_i",
        "_avail_h",
        "_avail_idx",
        "_broken",
        "_desc",
        "_event_idx",
        "_free_head",
        "_in_flight",
        "_ind_gpa",
        "_ind_stride",
        "_ind_view",
        "_kick_old",
        "_last_used",
        "_mask",
        "_max_indirect",
        "_name",
        "_next",
        "_num_free",
        "_published",
        "_size",
        "_state",
        "_used_event_i",
        "_used_h",
        "_used_w",
    )

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc_gpa: int,
        avail_gpa: int,
        used_gpa: int,
        *,
        event_idx: bool,
        indirect_area: tuple[int, int] | None = None,
        start_idx: int = 0,
        name: str = "vring",
    ) -> None:
        if not 0 <= start_idx <= 0xFFFF:
            raise ValueError(f"{name}: start index {start_idx} is not in 0..65535")
        try:
            check_queue_size(size, name, power_of_two=True)
            desc = map_area(mem, desc_gpa, 16 * size, 16, "descriptor table", name)
            avail = map_area(mem, avail_gpa, 6 + 2 * size, 2, "available ring", name)
            used = map_area(mem, used_gpa, 6 + 8 * size, 4, "used ring", name)
            ind_view: memoryview | None = None
            ind_gpa = stride = max_ind = 0
            if indirect_area is not None:
                ind_gpa, ind_len = indirect_area
                max_ind = min(size, ind_len // (16 * size))
                if max_ind < 1:
                    raise ValueError(
                        f"{name}: indirect area of {ind_len} bytes holds less than one "
                        f"descriptor per head (queue size {size})"
                    )
                stride = 16 * max_ind
                ind_view = map_area(mem, ind_gpa, stride * size, 16, "indirect area", name)
        except RingError as e:
            raise ValueError(str(e)) from e
        desc[:] = bytes(len(desc))
        avail[:] = bytes(len(avail))
        used[:] = bytes(len(used))
        self._name = name
        self._size = size
        self._mask = size - 1
        self._event_idx = event_idx
        self._desc = desc
        self._avail_h = avail.cast("H")
        self._used_h = used.cast("H")
        self._used_w = used[: 4 + 8 * size].cast("I")
        self._used_event_i = 2 + size
        self._avail_event_i = 2 + 4 * size
        self._avail_h[1] = start_idx
        self._avail_h[self._used_event_i] = start_idx
        self._used_h[1] = start_idx
        self._used_h[self._avail_event_i] = start_idx
        self._ind_view = ind_view
        self._ind_gpa = ind_gpa
        self._ind_stride = stride
        self._max_indirect = max_ind
        self._next = [i + 1 for i in range(size)]
        self._free_head = 0
        self._num_free = size
        self._state: list[tuple[T, int, int] | None] = [None] * size
        self._avail_idx = start_idx
        self._published = start_idx
        self._kick_old = start_idx
        self._last_used = start_idx
        self._in_flight = 0
        self._broken: str | None = None

    @property
    def num_free(self) -> int:
        """Free descriptors in the table."""
        return self._num_free

    @property
    def in_flight(self) -> int:
        """Chains added and not yet reaped."""
        return self._in_flight

    @property
    def max_indirect(self) -> int:
        """Largest chain that fits one indirect table (0 without an indirect area)."""
        return self._max_indirect

    @property
    def broken(self) -> str | None:
        """Why the device broke this ring (bad used entry), or None."""
        return self._broken

    def close(self) -> None:
        """Drop every view into memory. Idempotent."""
        views = [self._desc, self._avail_h, self._used_h, self._used_w]
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
        """Queue one chain of ``(gpa, length, device_writable)`` buffers; not yet visible.

        ``indirect=None`` uses an indirect table when there is an indirect area and the chain
        has more than one buffer and fits a table. Returns False (and changes nothing) when
        there are not enough free descriptors.

        Raises:
            ValueError: empty chain, a readable buffer after a writable one, lengths summing
                past 2^32 - 1, or ``indirect=True`` without room for the table.
        """
        n = len(bufs)
        if n == 0:
            raise ValueError(f"{self._name}: add: empty chain")
        wlen = 0
        total = 0
        seen_w = False
        for _gpa, ln, w in bufs:
            total += ln
            if w:
                seen_w = True
                wlen += ln
            elif seen_w:
                raise ValueError(f"{self._name}: add: readable buffer after a writable one")
        if total > MAX_CHAIN_BYTES:
            raise ValueError(f"{self._name}: add: chain of {total} bytes is past 2^32 - 1")
        if indirect is None:
            use_ind = 1 < n <= self._max_indirect
        elif indirect:
            if n > self._max_indirect:
                raise ValueError(
                    f"{self._name}: add: {n} buffers do not fit an indirect table of "
                    f"{self._max_indirect} entries"
                )
            use_ind = True
        else:
            use_ind = False
        need = 1 if use_ind else n
        if need > self._num_free:
            return False
        desc = self._desc
        nxt_list = self._next
        head = self._free_head
        if use_ind:
            table = self._ind_view
            if table is None:  # unreachable: max_indirect > 0 implies an area
                raise ValueError(f"{self._name}: add: no indirect area")
            off = head * self._ind_stride
            last = n - 1
            for k, (gpa, ln, w) in enumerate(bufs):
                flags = (DESC_F_WRITE if w else 0) | (DESC_F_NEXT if k < last else 0)
                _DESC_PACK(table, off + 16 * k, gpa, ln, flags, k + 1 if k < last else 0)
            _DESC_PACK(desc, head << 4, self._ind_gpa + off, 16 * n, DESC_F_INDIRECT, 0)
            self._free_head = nxt_list[head]
        else:
            i = head
            last = n - 1
            for k, (gpa, ln, w) in enumerate(bufs):
                nxt = nxt_list[i]
                flags = (DESC_F_WRITE if w else 0) | (DESC_F_NEXT if k < last else 0)
                _DESC_PACK(desc, i << 4, gpa, ln, flags, nxt if k < last else 0)
                if k < last:
                    i = nxt
            self._free_head = nxt_list[i]
        self._num_free -= need
        self._state[head] = (token, need, wlen)
        self._avail_h[2 + (self._avail_idx & self._mask)] = head
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF
        self._in_flight += 1
        return True

    def publish(self) -> None:
        """Make every chain added so far visible: one aligned 16-bit store of ``avail.idx``.

        Descriptors and avail entries were stored before it: program order + x86-64
        store->store order (virtio 1.2 2.7.13.3.1, barrier.py). Call :meth:`should_kick`
        after each publish.
        """
        if self._avail_idx != self._published:
            self._avail_h[1] = self._avail_idx
            self._published = self._avail_idx

    def should_kick(self) -> bool:
        """Must the device be notified of what was published since the last call?

        virtio 1.2 2.7.10.1: with EVENT_IDX, kick when ``avail.idx`` passed ``avail_event``;
        without it, unless ``VRING_USED_F_NO_NOTIFY`` is set.
        """
        new = self._published
        old = self._kick_old
        if new == old:
            return False
        self._kick_old = new
        # Full barrier: orders the avail.idx store in publish() before the loads of
        # used.flags / avail_event (virtio 1.2 2.7.13.4.1; store->load).
        full_barrier()
        if self._event_idx:
            return vring_need_event(self._used_h[self._avail_event_i], new, old)
        return not self._used_h[0] & USED_F_NO_NOTIFY

    def _fail(self, msg: str) -> NoReturn:
        reason = f"{self._name}: {msg}"
        if self._broken is None:
            self._broken = reason
        raise RingError(reason)

    def reap(self) -> list[tuple[T, int]]:
        """Collect used buffers: ``(token, written_len)`` in used-ring order.

        Raises:
            RingError: the device published a bad used entry (id not in flight, length larger
                than the chain's writable bytes, ``used.idx`` ahead of what is in flight); the
                ring is then broken and later calls return ``[]``.
        """
        if self._broken is not None:
            return []
        # One aligned 16-bit load, before the used elements it covers (load->load order).
        used_idx: int = self._used_h[1]
        last = self._last_used
        pending = (used_idx - last) & 0xFFFF
        if not pending:
            return []
        if pending > self._in_flight:
            self._fail(
                f"used.idx {used_idx} is {pending} entries past {last} with only "
                f"{self._in_flight} chains in flight"
            )
        used_w = self._used_w
        state = self._state
        nxt_list = self._next
        mask = self._mask
        size = self._size
        out: list[tuple[T, int]] = []
        for _ in range(pending):
            slot = last & mask
            hid: int = used_w[1 + 2 * slot]
            ln: int = used_w[2 + 2 * slot]
            st = state[hid] if hid < size else None
            if st is None:
                self._fail(f"used entry {last} holds id {hid}, which is not in flight")
            token, ndesc, wlen = st
            if ln > wlen:
                self._fail(f"used entry {last}: id {hid} length {ln} > writable length {wlen}")
            state[hid] = None
            tail = hid
            for _ in range(ndesc - 1):
                tail = nxt_list[tail]
            nxt_list[tail] = self._free_head
            self._free_head = hid
            self._num_free += ndesc
            out.append((token, ln))
            last = (last + 1) & 0xFFFF
        self._last_used = last
        self._in_flight -= pending
        return out

    def has_used(self) -> bool:
        """True if the device has published used buffers not reaped yet (one 16-bit load)."""
        return self._broken is None and self._used_h[1] != self._last_used

    def disable_interrupts(self) -> None:
        """Ask the device not to notify us (used-buffer notifications, virtio 1.2 2.7.7).

        Without EVENT_IDX sets ``VRING_AVAIL_F_NO_INTERRUPT``; with it moves ``used_event``
        just behind what we have reaped, which the device cannot pass within one lap.
        """
        if self._event_idx:
            self._avail_h[self._used_event_i] = (self._last_used - 1) & 0xFFFF
        else:
            self._avail_h[0] = AVAIL_F_NO_INTERRUPT

    def enable_interrupts(self) -> bool:
        """Ask for a notification at the next used buffer; True if some are already there.

        Writes ``used_event = last reaped`` (EVENT_IDX) or clears the flag, then a full
        barrier, then re-reads ``used.idx`` (virtio 1.2 2.7.14 note). On True the caller
        should reap (and may disable again).
        """
        if self._event_idx:
            self._avail_h[self._used_event_i] = self._last_used
        else:
            self._avail_h[0] = 0
        # Full barrier: orders the used_event/flags store before the used.idx load below.
        full_barrier()
        return self._used_h[1] != self._last_used
