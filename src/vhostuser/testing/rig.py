"""A front-end for conformance checks: a session, guest memory, hand-driven split rings.

:class:`Session` is one connection to the back-end under test: a
:class:`~vhostuser.io.frontend.FrontendClient` for requests the protocol allows (its
errors name what the back-end did wrong) and a :class:`~vhostuser.testing.wire.Wire` on
the same socket for the ones it forbids. :meth:`Session.handshake` runs QEMU's handshake
up to a chosen point with chosen feature words.

:class:`Rig` adds guest RAM (a memfd), rings and buffers: :class:`VQ` is a split
virtqueue written by hand, so a check can lay out any chain (scattered, indirect, looping,
out of range) and see exactly what the device did with it. :meth:`Rig.exercise` moves a
few frames (net) or a write and a read-back (blk) through the device and fails the check
with what went wrong.

Every wait is bounded by the session's timeout; failures raise
:class:`~vhostuser.testing.outcome.CheckFailed` (via :func:`fail`) or the library's
errors (``MessageTimeoutError``, ``PeerClosedError``, ``RemoteProtocolError``), which the
runner reports as failures.
"""

from __future__ import annotations

import contextlib
import gc
import select
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..errors import PeerClosedError
from ..io.eventfd import EventFd
from ..io.frontend import FrontendClient
from ..io.guestram import GuestRam
from ..protocol import payloads as P
from ..protocol.enums import (
    BlkFeature,
    FrontendRequest,
    NetFeature,
    ProtocolFeature,
    VirtioFeature,
)
from ..virtio.blk import (
    REQ_HEADER,
    SECTOR_SIZE,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    BlkConfig,
    blk_config_size,
)
from ..virtq import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, split_layout
from .outcome import fail
from .wire import Wire

__all__ = [
    "DEVICES",
    "VQ",
    "BlkReq",
    "Memory",
    "Rig",
    "Session",
    "choose_features",
    "choose_protocol_features",
    "eth_frame",
]

R = FrontendRequest
PF = ProtocolFeature
VF = VirtioFeature
NF = NetFeature
BF = BlkFeature

DEVICES = ("net", "blk")
PAGE = 4096
RING_AREA = 0x10000
"""Guest-physical bytes reserved per ring (ring ``i`` at ``i * RING_AREA``)."""
DATA_BASE = 0x20_0000
"""Buffers are allocated from here up."""
DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")
STATUS_FEATURES_OK = 1 | 2 | 8
STATUS_DRIVER_OK = STATUS_FEATURES_OK | 4

NET_BITS = int(NF.MAC | NF.MTU | NF.STATUS | NF.MRG_RXBUF)
"""Net device bits the checks' driver honours (no offloads: headers stay zero)."""
BLK_BITS = int(BF.SIZE_MAX | BF.SEG_MAX | BF.BLK_SIZE | BF.FLUSH | BF.TOPOLOGY | BF.DISCARD
               | BF.WRITE_ZEROES | BF.RO)
"""Blk device bits the checks' driver honours."""
DEFAULT_PF = int(PF.MQ | PF.REPLY_ACK | PF.CONFIG | PF.CONFIGURE_MEM_SLOTS | PF.STATUS
                 | PF.MTU | PF.RARP | PF.LOG_SHMFD)
"""Protocol features negotiated unless a check asks otherwise (no back-end channel, no
inflight area: those are negotiated by the checks that test them)."""

FRAME_ETHERTYPE = b"\x88\xb5"  # IEEE local experimental


def eth_frame(seq: int, size: int = 64) -> bytes:
    """A broadcast Ethernet frame of ``size`` bytes (local experimental ethertype)
    numbered ``seq``."""
    head = b"\xff" * 6 + b"\x02\x00\x00\xc4\xec\x01" + FRAME_ETHERTYPE
    body = struct.pack("<I", seq) + bytes(range(256)) * (size // 256 + 1)
    return (head + body)[:size]


def choose_features(device: str, offered: int, *, protocol: bool = True,
                    minimal: bool = False, indirect: bool = False, event_idx: bool = False,
                    packed: bool = False, log: bool = False) -> int:
    """The virtio feature word a check acks: VERSION_1, bit 30 (``protocol``), the device
    bits the driver honours (not with ``minimal``) and the ring features asked for, all
    masked by the offer."""
    want = int(VF.VERSION_1)
    if protocol:
        want |= int(VF.PROTOCOL_FEATURES)
    if not minimal:
        want |= NET_BITS if device == "net" else BLK_BITS
    if indirect:
        want |= int(VF.RING_INDIRECT_DESC)
    if event_idx:
        want |= int(VF.RING_EVENT_IDX)
    if packed:
        want |= int(VF.RING_PACKED)
    if log:
        want |= int(VF.LOG_ALL)
    return want & offered


def choose_protocol_features(offered: int, *, add: int = 0, remove: int = 0) -> int:
    """:data:`DEFAULT_PF` plus ``add`` minus ``remove``, masked by the offer."""
    return (DEFAULT_PF | add) & ~remove & offered


# -- guest memory as the front-end sees it ---------------------------------------------------


@dataclass(slots=True)
class _Region:
    gpa: int
    size: int
    uva: int
    fd: int
    fd_offset: int
    buf: memoryview
    buf_offset: int


class Memory:
    """Guest-physical address space made of regions of front-end buffers.

    Accesses go through the whole buffer with offsets (no lasting slices), so the owner
    can unmap it afterwards.
    """

    def __init__(self) -> None:
        self.regions: list[_Region] = []

    def add(self, gpa: int, size: int, *, uva: int, fd: int, fd_offset: int,
            buf: memoryview, buf_offset: int = 0) -> None:
        """Add a region: ``size`` bytes at ``gpa``, at ``buf[buf_offset:]`` here, at
        ``fd_offset`` in ``fd`` for the back-end, announced at front-end address ``uva``."""
        self.regions.append(_Region(gpa, size, uva, fd, fd_offset, buf, buf_offset))

    def _find(self, gpa: int, n: int) -> tuple[memoryview, int]:
        for r in self.regions:
            if r.gpa <= gpa and gpa + n <= r.gpa + r.size:
                return r.buf, r.buf_offset + gpa - r.gpa
        raise ValueError(f"guest range {gpa:#x}+{n:#x} is not inside one region")

    def read(self, gpa: int, n: int) -> bytes:
        """``n`` bytes at ``gpa``."""
        buf, off = self._find(gpa, n)
        return bytes(buf[off : off + n])

    def write(self, gpa: int, data: bytes | bytearray) -> None:
        """Store ``data`` at ``gpa``."""
        buf, off = self._find(gpa, len(data))
        buf[off : off + len(data)] = data

    def pack(self, st: struct.Struct, gpa: int, *values: int) -> None:
        """``st.pack_into`` at ``gpa``."""
        buf, off = self._find(gpa, st.size)
        st.pack_into(buf, off, *values)

    def unpack(self, st: struct.Struct, gpa: int) -> tuple[int, ...]:
        """``st.unpack_from`` at ``gpa``."""
        buf, off = self._find(gpa, st.size)
        return tuple(st.unpack_from(buf, off))

    def uva(self, gpa: int) -> int:
        """The front-end address announced for ``gpa``."""
        for r in self.regions:
            if r.gpa <= gpa < r.gpa + r.size:
                return r.uva + gpa - r.gpa
        raise ValueError(f"gpa {gpa:#x} is in no region")

    def table(self) -> list[P.MemoryRegion]:
        """The regions as vhost-user memory regions."""
        return [P.MemoryRegion(guest_phys_addr=r.gpa, memory_size=r.size, userspace_addr=r.uva,
                               mmap_offset=r.fd_offset) for r in self.regions]


# -- a split ring driven by hand ---------------------------------------------------------------


class VQ:
    """The driver side of one split virtqueue, written field by field.

    ``start``: initial ``avail.idx`` and ``used.idx`` (the base the ring is set up with).
    Descriptors come from a free list; :meth:`add` writes a chain and puts its head in the
    next avail slot, :meth:`publish` stores ``avail.idx``, :meth:`kick` notifies.
    """

    def __init__(self, mem: Memory, index: int, size: int, base_gpa: int, *,
                 start: int = 0) -> None:
        self.mem = mem
        self.index = index
        self.size = size
        self.desc_gpa, self.avail_gpa, self.used_gpa, total = split_layout(size, base_gpa)
        mem.write(base_gpa, bytes(total))
        self.next_avail = start & 0xFFFF
        self.last_used = start & 0xFFFF
        mem.pack(U16, self.avail_gpa + 2, self.next_avail)
        mem.pack(U16, self.used_gpa + 2, self.last_used)
        self._free = list(range(size - 1, -1, -1))
        self.chains: dict[int, list[int]] = {}
        self.kick_fd = EventFd()
        self.call_fd = EventFd()
        self.err_fd: EventFd | None = None
        self.calls = 0

    # descriptors ---------------------------------------------------------------------------
    def put_desc(self, i: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        """Write descriptor ``i`` (any values: hostile checks use this directly)."""
        self.mem.pack(DESC, self.desc_gpa + 16 * i, addr, length, flags, nxt)

    def take(self, n: int) -> list[int]:
        """Take ``n`` free descriptor indices.

        Raises:
            ValueError: not enough are free.
        """
        if n > len(self._free):
            raise ValueError(f"ring {self.index}: {n} descriptors wanted, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def add(self, bufs: Sequence[tuple[int, int, bool]], *, indirect_gpa: int | None = None
            ) -> int:
        """Queue a chain of ``(gpa, length, device_writable)``; return its head.

        With ``indirect_gpa`` the chain goes into an indirect table there (one ring
        descriptor). The head is placed in the next avail slot, not yet published.
        """
        if indirect_gpa is not None:
            (head,) = self.take(1)
            last = len(bufs) - 1
            for k, (gpa, ln, w) in enumerate(bufs):
                flags = (DESC_F_WRITE if w else 0) | (DESC_F_NEXT if k < last else 0)
                self.mem.pack(DESC, indirect_gpa + 16 * k, gpa, ln, flags,
                              k + 1 if k < last else 0)
            self.put_desc(head, indirect_gpa, 16 * len(bufs), DESC_F_INDIRECT)
            self.chains[head] = [head]
        else:
            ids = self.take(len(bufs))
            for k, (gpa, ln, w) in enumerate(bufs):
                more = k < len(bufs) - 1
                flags = (DESC_F_WRITE if w else 0) | (DESC_F_NEXT if more else 0)
                self.put_desc(ids[k], gpa, ln, flags, ids[k + 1] if more else 0)
            head = ids[0]
            self.chains[head] = ids
        self.offer(head)
        return head

    def offer(self, head: int) -> None:
        """Put ``head`` (any value) in the next avail slot (published by :meth:`publish`)."""
        self.mem.pack(U16, self.avail_gpa + 4 + 2 * (self.next_avail % self.size), head)
        self.next_avail = (self.next_avail + 1) & 0xFFFF

    def publish(self) -> None:
        """Store ``avail.idx``."""
        self.mem.pack(U16, self.avail_gpa + 2, self.next_avail)

    def kick(self) -> None:
        """Notify the device."""
        self.kick_fd.notify()

    def push(self, bufs_list: Iterable[Sequence[tuple[int, int, bool]]]) -> list[int]:
        """Add several chains, publish, kick; return their heads."""
        heads = [self.add(b) for b in bufs_list]
        self.publish()
        self.kick()
        return heads

    # the device's side ---------------------------------------------------------------------
    def used_idx(self) -> int:
        """``used.idx`` as the device last stored it."""
        return self.mem.unpack(U16, self.used_gpa + 2)[0]

    def used_flags(self) -> int:
        """``used.flags``."""
        return self.mem.unpack(U16, self.used_gpa)[0]

    def avail_event(self) -> int:
        """``avail_event`` (EVENT_IDX) as the device last stored it."""
        return self.mem.unpack(U16, self.used_gpa + 4 + 8 * self.size)[0]

    def set_used_event(self, value: int) -> None:
        """Store ``used_event`` (EVENT_IDX: call me when used.idx passes this)."""
        self.mem.pack(U16, self.avail_gpa + 4 + 2 * self.size, value & 0xFFFF)

    def set_no_interrupt(self, on: bool) -> None:
        """Set or clear VRING_AVAIL_F_NO_INTERRUPT in ``avail.flags``."""
        self.mem.pack(U16, self.avail_gpa, 1 if on else 0)

    def pending_used(self) -> int:
        """Used entries the device published that :meth:`reap` has not taken."""
        return (self.used_idx() - self.last_used) & 0xFFFF

    def reap(self) -> list[tuple[int, int]]:
        """Take every newly used ``(id, len)``; descriptors of known heads are freed."""
        out: list[tuple[int, int]] = []
        end = self.used_idx()
        while self.last_used != end:
            uid, ln = self.mem.unpack(USED_ELEM, self.used_gpa + 4 + 8 * (self.last_used
                                                                           % self.size))
            out.append((uid, ln))
            ids = self.chains.pop(uid, None)
            if ids is not None:
                self._free.extend(ids)
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def wait_used(self, n: int, timeout: float) -> list[tuple[int, int]]:
        """Wait up to ``timeout`` s until ``n`` used entries arrive; return what came
        (fewer on timeout). Call notifications are counted in :attr:`calls`."""
        deadline = time.monotonic() + timeout
        out: list[tuple[int, int]] = []
        while True:
            out += self.reap()
            if len(out) >= n:
                return out
            left = deadline - time.monotonic()
            if left <= 0:
                return out
            r, _, _ = select.select([self.call_fd.fd], [], [], min(left, 0.02))
            if r:
                self.calls += self.call_fd.drain()

    def drain_calls(self) -> int:
        """Calls received since the last look (added to :attr:`calls`)."""
        n = self.call_fd.drain()
        self.calls += n
        return n

    def close(self) -> None:
        """Close the eventfds."""
        self.kick_fd.close()
        self.call_fd.close()
        if self.err_fd is not None:
            self.err_fd.close()


# -- a session -------------------------------------------------------------------------------


def _ready_client(path: str, timeout: float) -> FrontendClient:
    """Connect and make sure the back-end serves this connection: a GET_FEATURES round
    trip. A back-end that serves one front-end at a time may turn a connection away (close
    it at once) while it still tears the previous one down; that is retried until
    ``timeout``.

    Raises:
        MessageTimeoutError, PeerClosedError: no connection served within ``timeout``.
        RemoteProtocolError: the back-end answered GET_FEATURES wrongly.
    """
    deadline = time.monotonic() + timeout
    while True:
        left = max(0.1, deadline - time.monotonic())
        fe = FrontendClient.connect(path, timeout=left, connect_timeout=left)
        try:
            Wire(fe.sock, left).get_u64(R.GET_FEATURES)
        except PeerClosedError:
            fe.close()
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)
            continue
        except BaseException:
            fe.close()
            raise
        fe.timeout = timeout
        return fe



class Session:
    """One connection to the back-end under test (see the module docstring).

    Attributes after :meth:`handshake`: ``offered``, ``offered_pf`` (0 without bit 30),
    ``features``, ``pf`` (what we acked), ``queue_num``, ``max_slots`` (None when not
    asked).
    """

    def __init__(self, path: str, device: str, *, timeout: float, ready: bool = False
                 ) -> None:
        self.path = path
        self.device = device
        self.timeout = timeout
        if ready:
            self.fe = _ready_client(path, timeout)
        else:
            self.fe = FrontendClient.connect(path, timeout=timeout, connect_timeout=timeout)
        self.wire = Wire(self.fe.sock, timeout)
        self.offered = 0
        self.offered_pf = 0
        self.features = 0
        self.pf = 0
        self.queue_num: int | None = None
        self.max_slots: int | None = None
        self._channel: socket.socket | None = None

    @property
    def reply_ack(self) -> bool:
        """REPLY_ACK was negotiated."""
        return bool(self.pf & PF.REPLY_ACK)

    def has(self, feature: ProtocolFeature) -> bool:
        """``feature`` was negotiated."""
        return bool(self.pf & feature)

    def handshake(self, *, upto: str = "features", features: int | None = None,
                  pf: int | None = None, status: bool = True, legacy: bool = False
                  ) -> Session:
        """QEMU's handshake up to ``upto``: ``"get"`` (GET_FEATURES, GET_PROTOCOL_FEATURES),
        ``"protocol"`` (SET_PROTOCOL_FEATURES), ``"owner"`` (GET_QUEUE_NUM,
        GET_MAX_MEM_SLOTS, SET_OWNER) or ``"features"`` (SET_FEATURES and, with STATUS,
        SET_STATUS FEATURES_OK). ``features``/``pf`` default to :func:`choose_features` /
        :func:`choose_protocol_features` of the offer. ``legacy``: a front-end that knows
        nothing of protocol features (no GET/SET_PROTOCOL_FEATURES, bit 30 not acked).
        Returns self.

        Raises:
            VhostUserError: the back-end answered wrongly, hung up or timed out.
        """
        fe = self.fe
        self.offered = fe.get_u64(R.GET_FEATURES)
        if self.offered & VF.PROTOCOL_FEATURES and not legacy:
            self.offered_pf = fe.get_u64(R.GET_PROTOCOL_FEATURES)
        if upto == "get":
            return self
        if self.offered & VF.PROTOCOL_FEATURES and not legacy:
            self.pf = choose_protocol_features(self.offered_pf) if pf is None \
                else pf & self.offered_pf
            fe.send(R.SET_PROTOCOL_FEATURES, P.U64Payload(value=self.pf))
        if upto == "protocol":
            return self
        if self.has(PF.MQ):
            self.queue_num = fe.get_u64(R.GET_QUEUE_NUM)
        if self.has(PF.CONFIGURE_MEM_SLOTS):
            self.max_slots = fe.get_u64(R.GET_MAX_MEM_SLOTS)
        fe.send(R.SET_OWNER)
        if upto == "owner":
            return self
        self.features = choose_features(self.device, self.offered) if features is None \
            else features & self.offered
        if legacy:
            self.features &= ~int(VF.PROTOCOL_FEATURES)
        fe.send(R.SET_FEATURES, P.U64Payload(value=self.features))
        if status and self.has(PF.STATUS):
            fe.send(R.SET_STATUS, P.U64Payload(value=STATUS_FEATURES_OK))
        return self

    def open_backend_channel(self) -> None:
        """SET_BACKEND_REQ_FD with one end of a socketpair (we keep the other, unread).

        Raises:
            VhostUserError: the back-end refused it.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.fe.send(R.SET_BACKEND_REQ_FD, fds=[theirs.fileno()])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._channel = ours

    def sync(self) -> None:
        """A GET_FEATURES round trip: everything sent before was read.

        Raises:
            VhostUserError: no answer.
        """
        self.fe.get_u64(R.GET_FEATURES)

    def first_ring_out_of_range(self) -> int:
        """The lowest ring index beyond the device's queues (from GET_QUEUE_NUM when asked:
        queue pairs for net, queues for blk; else the device's usual count)."""
        if self.queue_num is not None:
            return 2 * self.queue_num if self.device == "net" else self.queue_num
        return 2 if self.device == "net" else 1

    def close(self) -> None:
        """Close the connection and the back-end channel."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        self.fe.close()


# -- guest memory, rings, and the device's data path ---------------------------------------


@dataclass(slots=True)
class BlkReq:
    """One virtio-blk request laid out in guest memory."""

    head: int
    kind: int
    sector: int
    length: int
    data_gpa: int
    status_gpa: int
    expect: bytes | None = None
    used_len: int | None = None
    status: int | None = None
    extra: dict[str, int] = field(default_factory=dict)


class Rig:
    """Guest RAM, rings and device helpers over a :class:`Session` (module docstring).

    Default layout: one memfd of ``ram_size`` bytes as one region at GPA 0; ring ``i`` at
    ``i * 64 KiB`` (split, ``queue_size`` entries); buffers from 2 MiB up. ``rams`` (sizes
    of memfds) and ``regions`` (``(gpa, size, ram index, offset in that memfd)``) describe
    other layouts; ring areas must then lie in a region covering GPA 0..1 MiB, and buffers
    are taken from the regions in turn (from 2 MiB up in a region at GPA 0).

    Raises:
        OSError: a memfd could not be created.
        ValueError: a region lies outside its memfd.
    """

    def __init__(self, session: Session, *, ram_size: int = 8 << 20, queue_size: int = 64,
                 rams: Sequence[int] | None = None,
                 regions: Sequence[tuple[int, int, int, int]] | None = None) -> None:
        self.s = session
        self.queue_size = queue_size
        sizes = list(rams) if rams is not None else [ram_size]
        self.rams: list[GuestRam] = []
        self._extra: list[GuestRam] = []
        self.vqs: dict[int, VQ] = {}
        self.mem = Memory()
        try:
            for size in sizes:
                self.rams.append(GuestRam.memfd(size, name="vhost-user-check"))
        except BaseException:
            self.close()
            raise
        self.ram = self.rams[0]
        for gpa, size, k, off in regions or [(0, sizes[0], 0, 0)]:
            ram = self.rams[k]
            if off + size > ram.size:
                raise ValueError(f"region at {gpa:#x} runs past its memfd")
            self.mem.add(gpa, size, uva=ram.uva + off, fd=ram.fd, fd_offset=off, buf=ram.buf,
                         buf_offset=off)
        self._cursors: list[list[int]] = []  # [next, end] per region used for buffers
        self._reset_cursors()
        self._turn = 0
        self.shared = False
        self.blk_config: BlkConfig | None = None

    def _reset_cursors(self) -> None:
        self._cursors = []
        for r in self.mem.regions:
            start = max(r.gpa, DATA_BASE) if r.gpa < DATA_BASE else r.gpa
            if start < r.gpa + r.size:
                self._cursors.append([start, r.gpa + r.size])

    @property
    def timeout(self) -> float:
        """The session's timeout."""
        return self.s.timeout

    @property
    def hdr_len(self) -> int:
        """virtio-net header length for the negotiated features."""
        return 12 if self.s.features & (VF.VERSION_1 | NF.MRG_RXBUF) else 10

    def alloc(self, n: int, align: int = 64) -> int:
        """``n`` bytes of guest memory (zeroed), ``align``-aligned, from the next region in
        turn that has room; returns the GPA.

        Raises:
            ValueError: guest RAM is exhausted.
        """
        for _ in range(len(self._cursors)):
            cur = self._cursors[self._turn % len(self._cursors)]
            self._turn += 1
            gpa = (cur[0] + align - 1) // align * align
            if gpa + n <= cur[1]:
                cur[0] = gpa + n
                self.mem.write(gpa, bytes(n))
                return gpa
        raise ValueError(f"guest RAM exhausted ({n} bytes wanted)")

    def only_region(self, gpa: int) -> None:
        """Take buffers only from the region at ``gpa`` from now on."""
        for r in self.mem.regions:
            if r.gpa == gpa:
                self._cursors = [[r.gpa, r.gpa + r.size]]
                return
        raise ValueError(f"no region at {gpa:#x}")

    def extra_ram(self, size: int) -> GuestRam:
        """Another memfd, closed with the rig."""
        ram = GuestRam.memfd(size, name="vhost-user-check-extra")
        self._extra.append(ram)
        return ram

    # control plane -------------------------------------------------------------------------
    def region_fd(self, region: P.MemoryRegion) -> int:
        """The memfd behind one of our regions."""
        for r in self.mem.regions:
            if r.gpa == region.guest_phys_addr:
                return r.fd
        raise ValueError(f"no region at {region.guest_phys_addr:#x}")

    def share(self) -> None:
        """Share guest RAM: one ADD_MEM_REG per region when CONFIGURE_MEM_SLOTS was
        negotiated (as QEMU does), else one SET_MEM_TABLE.

        Raises:
            VhostUserError: refused or no answer.
        """
        fe = self.s.fe
        table = self.mem.table()
        if self.s.has(PF.CONFIGURE_MEM_SLOTS):
            for region in table:
                fe.send(R.ADD_MEM_REG, P.SingleRegion(region=region), [self.region_fd(region)])
        else:
            fe.send(R.SET_MEM_TABLE, P.MemoryTable(regions=tuple(table)),
                    [self.region_fd(r) for r in table])
        self.shared = True

    def add_region(self, gpa: int, size: int) -> GuestRam:
        """A new memfd as a region at ``gpa``, announced with ADD_MEM_REG.

        Raises:
            VhostUserError: refused or no answer.
        """
        ram = self.extra_ram(size)
        self.mem.add(gpa, size, uva=ram.uva, fd=ram.fd, fd_offset=0, buf=ram.buf)
        region = self.mem.table()[-1]
        self.s.fe.send(R.ADD_MEM_REG, P.SingleRegion(region=region), [ram.fd])
        return ram

    def move_region(self, old_gpa: int, new_gpa: int) -> None:
        """Replace the region at ``old_gpa`` by a new memfd of the same size at ``new_gpa``
        (memory unplugged and plugged elsewhere) and tell the back-end: REM_MEM_REG +
        ADD_MEM_REG with CONFIGURE_MEM_SLOTS, else a new SET_MEM_TABLE. Buffers come from
        the new region from then on. Rings and buffers in the old region are the caller's
        to stop and forget first.

        Raises:
            ValueError: no region at ``old_gpa``.
            VhostUserError: refused or no answer.
        """
        table = self.mem.table()
        old = next((r for r in table if r.guest_phys_addr == old_gpa), None)
        if old is None:
            raise ValueError(f"no region at {old_gpa:#x}")
        ram = self.extra_ram(old.memory_size)
        self.mem.regions = [r for r in self.mem.regions if r.gpa != old_gpa]
        self.mem.add(new_gpa, ram.size, uva=ram.uva, fd=ram.fd, fd_offset=0, buf=ram.buf)
        fe = self.s.fe
        table = self.mem.table()
        if self.s.has(PF.CONFIGURE_MEM_SLOTS):
            fe.send(R.REM_MEM_REG, P.SingleRegion(region=old))
            fe.send(R.ADD_MEM_REG, P.SingleRegion(region=table[-1]), [ram.fd])
        else:
            fe.send(R.SET_MEM_TABLE, P.MemoryTable(regions=tuple(table)),
                    [self.region_fd(r) for r in table])
        self.only_region(new_gpa)

    def vring(self, index: int, *, base: int = 0, enable: bool = True, log: bool = False,
              ring_gpa: int | None = None, size: int | None = None, err: bool = False,
              resume: bool = False) -> VQ:
        """Lay ring ``index`` out and set it up: SET_VRING_NUM, _BASE, _ADDR, _CALL,
        (_ERR), _KICK and, with bit 30 acked and ``enable``, SET_VRING_ENABLE 1.

        ``resume``: keep the ring as it is in guest memory (and our state of it) and set it
        up again at ``base`` (as after GET_VRING_BASE or a reconnection); new eventfds.

        Raises:
            VhostUserError: refused or no answer.
        """
        size = size or self.queue_size
        gpa = index * RING_AREA if ring_gpa is None else ring_gpa
        old = self.vqs.pop(index, None)
        if resume and old is not None:
            vq = old
            vq.kick_fd.close()
            vq.call_fd.close()
            vq.kick_fd, vq.call_fd = EventFd(), EventFd()
            size = vq.size
        else:
            if old is not None:
                old.close()
            vq = VQ(self.mem, index, size, gpa, start=base)
        self.vqs[index] = vq
        fe = self.s.fe
        m = self.mem
        fe.send(R.SET_VRING_NUM, P.VringState(index=index, num=size))
        fe.send(R.SET_VRING_BASE, P.VringState(index=index, num=base))
        fe.send(R.SET_VRING_ADDR, P.VringAddr(
            index=index, flags=P.VRING_F_LOG if log else 0, desc=m.uva(vq.desc_gpa),
            used=m.uva(vq.used_gpa), avail=m.uva(vq.avail_gpa),
            log=vq.used_gpa if log else 0))
        fe.send(R.SET_VRING_CALL, P.VringFile(index=index), [vq.call_fd.fd])
        if err:
            vq.err_fd = EventFd()
            fe.send(R.SET_VRING_ERR, P.VringFile(index=index), [vq.err_fd.fd])
        fe.send(R.SET_VRING_KICK, P.VringFile(index=index), [vq.kick_fd.fd])
        if enable and self.s.features & VF.PROTOCOL_FEATURES:
            fe.send(R.SET_VRING_ENABLE, P.VringState(index=index, num=1))
        return vq

    def default_rings(self) -> list[int]:
        """The rings a device needs to run: net RX 0 and TX 1, blk request queue 0."""
        return [0, 1] if self.s.device == "net" else [0]

    def driver_ok(self) -> None:
        """SET_STATUS DRIVER_OK (with STATUS), as a guest does after setting rings up."""
        if self.s.has(PF.STATUS):
            self.s.fe.send(R.SET_STATUS, P.U64Payload(value=STATUS_DRIVER_OK))

    def start(self, *, base: int = 0, share: bool = True, rx_buffers: int = 16) -> None:
        """Share memory, set up the device's rings, DRIVER_OK; net: post receive buffers.

        Raises:
            VhostUserError: a request was refused or unanswered.
        """
        if share and not self.shared:
            self.share()
        if self.s.device == "blk":
            self.read_blk_config()
        for i in self.default_rings():
            self.vring(i, base=base)
        self.driver_ok()
        if self.s.device == "net" and rx_buffers:
            self.post_rx(self.vqs[0], rx_buffers)

    def stop(self, index: int) -> int:
        """GET_VRING_BASE for ring ``index``; return the base.

        Raises:
            VhostUserError: no answer; CheckFailed: the reply names another ring.
        """
        reply = self.s.fe.send(R.GET_VRING_BASE, P.VringState(index=index, num=0))
        if reply is None:
            fail(f"GET_VRING_BASE {index}: no reply")
        st = P.VringState.decode(reply.payload)
        if st.index != index:
            fail(f"GET_VRING_BASE for ring {index} answered for ring {st.index}")
        return st.num

    # net -------------------------------------------------------------------------------------
    def frame(self, seq: int, size: int = 64) -> bytes:
        """A broadcast Ethernet frame of ``size`` bytes numbered ``seq``."""
        return eth_frame(seq, size)

    def tx_chain(self, frame: bytes, layout: str = "one") -> list[tuple[int, int, bool]]:
        """Lay a frame (with a zero virtio-net header) out in guest memory as a chain.

        ``layout``: ``one`` (header and frame in one buffer), ``split`` (header, frame),
        ``scatter`` (header, then the frame in four pieces).
        """
        hl = self.hdr_len
        if layout == "one":
            gpa = self.alloc(hl + len(frame))
            self.mem.write(gpa + hl, frame)
            return [(gpa, hl + len(frame), False)]
        hdr = self.alloc(hl)
        bufs = [(hdr, hl, False)]
        pieces = [frame] if layout == "split" else [
            frame[i : i + (len(frame) + 3) // 4] for i in range(0, len(frame),
                                                                 (len(frame) + 3) // 4)]
        for piece in pieces:
            gpa = self.alloc(len(piece))
            self.mem.write(gpa, piece)
            bufs.append((gpa, len(piece), False))
        return bufs

    def post_rx(self, vq: VQ, n: int, size: int = 2048) -> None:
        """Offer ``n`` device-writable receive buffers and kick."""
        for _ in range(n):
            vq.add([(self.alloc(size), size, True)])
        vq.publish()
        vq.kick()

    def send_frames(self, count: int, *, layout: str = "one", indirect: bool = False,
                    size: int = 64, first: int = 0) -> None:
        """Send ``count`` frames on TX ring 1 and require every buffer back, each head once.

        Raises:
            CheckFailed: buffers not used in time, unknown or repeated ids.
        """
        vq = self.vqs[1]
        heads: list[int] = []
        for k in range(count):
            bufs = self.tx_chain(self.frame(first + k, size), layout)
            ind = self.alloc(16 * len(bufs), 16) if indirect else None
            heads.append(vq.add(bufs, indirect_gpa=ind))
        vq.publish()
        vq.kick()
        self.expect_used(vq, heads, "transmit buffers")

    def expect_used(self, vq: VQ, heads: Sequence[int], what: str) -> list[tuple[int, int]]:
        """Wait for ``heads`` to come back used on ``vq``, each once and nothing else.

        Raises:
            CheckFailed: missing, unknown or repeated ids.
        """
        got = vq.wait_used(len(heads), self.timeout)
        ids = [u for u, _ in got]
        if len(got) < len(heads):
            fail(f"ring {vq.index}: {len(heads)} {what} made available and kicked, "
                 f"{len(got)} used within {self.timeout:g} s")
        if sorted(ids) != sorted(heads):
            fail(f"ring {vq.index}: used ids {ids} differ from the heads {list(heads)}")
        return got

    # blk -------------------------------------------------------------------------------------
    def read_blk_config(self) -> BlkConfig | None:
        """GET_CONFIG (with CONFIG), decoded; None without it.

        Raises:
            VhostUserError: refused or unanswered.
        """
        if self.blk_config is None and self.s.has(PF.CONFIG):
            raw = self.s.fe.get_config(0, blk_config_size(self.s.features))
            self.blk_config = BlkConfig.decode(raw)
        return self.blk_config

    @property
    def capacity_sectors(self) -> int | None:
        """Capacity from config space (None without CONFIG)."""
        return None if self.blk_config is None else self.blk_config.capacity

    def blk_request(self, vq: VQ, kind: int, sector: int = 0, *, data: bytes | None = None,
                    length: int = 0, layout: str = "standard", indirect: bool = False,
                    segment: bytes | None = None, publish: bool = True) -> BlkReq:
        """Lay a request out and make it available (published and kicked unless not
        ``publish``).

        ``kind``: a VIRTIO_BLK_T_* type; ``data`` for writes (OUT), ``length`` for reads
        (IN, GET_ID); ``segment`` for DISCARD/WRITE_ZEROES. ``layout``: ``standard``
        (header | data | status), ``any`` (write: header+data in one readable buffer;
        read: data+status in one writable buffer), ``scatter`` (data in 512-byte
        buffers).
        """
        hdr = self.alloc(REQ_HEADER.size + (len(data) if data else 0) + len(segment or b"")
                         + 16)
        self.mem.pack(REQ_HEADER, hdr, kind, 0, sector)
        bufs: list[tuple[int, int, bool]] = []
        data_gpa = 0
        nbytes = len(data) if data is not None else length
        if kind == VIRTIO_BLK_T_OUT and data is not None and layout == "any":
            self.mem.write(hdr + REQ_HEADER.size, data)
            bufs.append((hdr, REQ_HEADER.size + len(data), False))
            data_gpa = hdr + REQ_HEADER.size
        else:
            bufs.append((hdr, REQ_HEADER.size, False))
        if segment is not None:
            seg = self.alloc(len(segment))
            self.mem.write(seg, segment)
            bufs.append((seg, len(segment), False))
        writable = data is None
        if nbytes and not (kind == VIRTIO_BLK_T_OUT and layout == "any"):
            data_gpa = self.alloc(nbytes + 1, 512)
            if data is not None:
                self.mem.write(data_gpa, data)
            if layout == "scatter":
                for off in range(0, nbytes, SECTOR_SIZE):
                    bufs.append((data_gpa + off, min(SECTOR_SIZE, nbytes - off), writable))
            elif not (layout == "any" and writable):
                bufs.append((data_gpa, nbytes, writable))
        if layout == "any" and writable and nbytes:
            status = data_gpa + nbytes
            bufs.append((data_gpa, nbytes + 1, True))
        else:
            status = self.alloc(1)
            bufs.append((status, 1, True))
        self.mem.write(status, b"\xff")
        ind = self.alloc(16 * len(bufs), 16) if indirect else None
        head = vq.add(bufs, indirect_gpa=ind)
        if publish:
            vq.publish()
            vq.kick()
        return BlkReq(head, kind, sector, nbytes, data_gpa, status)

    def blk_complete(self, vq: VQ, reqs: Sequence[BlkReq], what: str = "requests"
                     ) -> list[BlkReq]:
        """Wait for ``reqs`` to complete; fill in status and used length.

        Raises:
            CheckFailed: not all completed in time, or unknown/repeated ids.
        """
        got = self.expect_used(vq, [r.head for r in reqs], what)
        by_head = {r.head: r for r in reqs}
        for uid, ln in got:
            r = by_head[uid]
            r.used_len = ln
            r.status = self.mem.read(r.status_gpa, 1)[0]
        return list(reqs)

    def blk_io(self, vq: VQ, kind: int, sector: int = 0, *, data: bytes | None = None,
               length: int = 0, layout: str = "standard", indirect: bool = False,
               segment: bytes | None = None) -> BlkReq:
        """One request, made available and waited for (see :meth:`blk_request`).

        Raises:
            CheckFailed: it did not complete in time.
        """
        req = self.blk_request(vq, kind, sector, data=data, length=length, layout=layout,
                               indirect=indirect, segment=segment)
        self.blk_complete(vq, [req])
        return req

    def pattern(self, seed: int, n: int) -> bytes:
        """``n`` bytes no two seeds share."""
        unit = struct.pack("<II", seed, 0x5648_434B)
        return (unit * (n // 8 + 1))[:n]

    def exercise(self, rounds: int = 4, *, seed: int = 1) -> None:
        """Move data through the started device: net ``rounds`` frames on TX; blk a write
        of ``rounds`` 4 KiB blocks and their read-back (unless read-only).

        Raises:
            CheckFailed: buffers not used in time, a bad status or data that differ.
        """
        if self.s.device == "net":
            self.send_frames(rounds, first=seed * 1000)
            return
        vq = self.vqs[0]
        ro = bool(self.s.features & BF.RO)
        reqs = []
        for k in range(rounds):
            sector = 8 * ((seed * 7 + k) % 128)
            if ro:
                reqs.append(self.blk_request(vq, VIRTIO_BLK_T_IN, sector, length=4096))
            else:
                reqs.append(self.blk_request(vq, VIRTIO_BLK_T_OUT, sector,
                                             data=self.pattern(seed * 100 + k, 4096)))
        self.blk_complete(vq, reqs, "requests")
        for r in reqs:
            if r.status != VIRTIO_BLK_S_OK:
                fail(f"{'read' if ro else 'write'} of 4096 bytes at sector {r.sector}: "
                     f"status {r.status}")
        if ro:
            return
        back = [self.blk_request(vq, VIRTIO_BLK_T_IN, r.sector, length=4096) for r in reqs]
        self.blk_complete(vq, back, "read-backs")
        for k, r in enumerate(back):
            if r.status != VIRTIO_BLK_S_OK:
                fail(f"read of 4096 bytes at sector {r.sector}: status {r.status}")
            if self.mem.read(r.data_gpa, 4096) != self.pattern(seed * 100 + k, 4096):
                fail(f"the 4096 bytes read back at sector {r.sector} differ from those "
                     "written")

    # lifetime ----------------------------------------------------------------------------------
    def close(self) -> None:
        """Close eventfds and unmap guest memory (the session is the caller's)."""
        for vq in self.vqs.values():
            vq.close()
        self.vqs.clear()
        self.mem.regions.clear()
        for ram in [*self.rams, *self._extra]:
            try:
                ram.close()
            except BufferError:
                gc.collect()
                with contextlib.suppress(BufferError):
                    ram.close()
