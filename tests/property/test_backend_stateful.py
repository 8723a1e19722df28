"""The back-end under random message sequences (Hypothesis stateful): only protocol errors
escape, every fd is owned or closed, every mapping is accounted for.

Two state machines:

:class:`CoreMachine` drives the sans-IO core (:class:`BackendConnection`) over the real
shell host (:class:`~vhostuser.io.backend.ShellHost`: real ``mmap`` of real memfds, real
fd checks) with a net device, a multiqueue net device with config space, the null net
device, and a blk device (one queue or several, with INFLIGHT_SHMFD). Its rules send
protocol-shaped requests in any order - features, protocol features, owner, memory tables
and ADD/REM_MEM_REG over memfds of random sizes and offsets, every vring message,
GET_VRING_BASE, inflight, config, status, RARP, MTU, resets, requests never offered and
unknown codes - with random payload mutations (cut short, lengthened, bad flags), random
fd mistakes (missing, extra, a pipe, a socket, an eventfd, ``/dev/null`` or a read-only
file where a memfd belongs, and the reverse), NEED_REPLY on and off with REPLY_ACK
negotiated or not, messages delivered in pieces or two to one chunk. A model of the
session predicts, from the rule table and the spec, whether each request must be
accepted, must be refused, or may go either way, and what the session holds afterwards.
After every step:

- the only exception ever raised is :class:`RemoteProtocolError` (after which the session
  is closed and everything it held is released);
- replies have the shape the rule table gives (flags 0x5, the request's id, its reply
  payload or a u64 ack/NACK, the reply fds);
- the session state equals the model (owner, features, regions, per-ring size, base,
  addresses, started/enabled, kick/call/err fds, channel, log fd, inflight area);
- ring state is consistent (a started ring is configured and has an engine or is broken,
  an engine matches the ring size, split rings have power-of-two sizes and 16-bit bases);
- every fd the test gave the core is either held by the session (exactly once, open) or
  closed, and ``/proc/self/fd`` holds nothing else new except the duplicates Python's
  ``mmap`` keeps of mapped fds; ``/proc/self/maps`` holds exactly one shared mapping per
  region and one for the inflight area.

Ending a session (EOF, a violation, or a reset of the machine) must bring fds and
mappings back to where they were.

:class:`ShellMachine` covers the framing layer and the I/O shell: a real
:class:`~vhostuser.io.backend.BackendSession` on a :class:`Reactor` stepped in this
thread (the current protocol, or either numbering of the 2014 draft), fed over a real
socketpair with random chunks - whole messages, handshakes, junk, headers split
anywhere, up to 10 fds of any kind on any chunk (past 8 the kernel truncates them:
MSG_CTRUNC) - plus kicks on the eventfds it was given and junk written into guest memory
(so rings run over hostile descriptors). No callback may raise into the reactor, no ring
may break with a "device error", every reply is well formed, a session ends only for a
protocol violation, a failed receive or the peer's hang-up, and after each session the
fd, shared-mapping and thread counts (``vhostuser.io.fdcount``) are back to the start
without the garbage collector's help.

When a session ends for a violation, the next step starts a new one (with a handshake
most of the time), so long sequences keep exercising live sessions. The shell's
per-message deadline (``MESSAGE_DEADLINE``, 5 s) is raised to an hour while the shell
machine runs: whether a partial message outlives it depends on how loaded the machine
is, and a run must not depend on the clock (Hypothesis replays examples); the deadline
has its own test in tests/kernel/test_backend_hostile.py.

Budget: ``VHOSTUSER_STATEFUL_EXAMPLES`` (default 30) and ``VHOSTUSER_STATEFUL_STEPS``
(default 40) per machine; raise them to hunt, e.g. 500 and 80.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import struct
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import pytest
from hypothesis import HealthCheck, Phase, event, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from vhostuser.connection import events as ev
from vhostuser.connection.backend import (
    MAX_LOG_BYTES,
    MAX_SPLIT_RING,
    BackendConnection,
    Dialect,
)
from vhostuser.devices.base import Device
from vhostuser.devices.blk import BlkDevice, MemoryBackend
from vhostuser.devices.net import NullNetDevice, VirtioNetDevice
from vhostuser.errors import RemoteProtocolError
from vhostuser.io import backend as io_backend
from vhostuser.io import fdcount
from vhostuser.io.backend import BackendSession, ShellHost
from vhostuser.io.fdpass import OwnedFd
from vhostuser.io.mapping import deferred_count, reap_deferred
from vhostuser.io.reactor import Reactor
from vhostuser.protocol import payloads as P
from vhostuser.protocol.enums import FrontendRequest, ProtocolFeature, VirtioFeature
from vhostuser.protocol.framing import MAX_FDS, MAX_PAYLOAD
from vhostuser.protocol.table import FRONTEND_RULES, Fds, Reply
from vhostuser.virtq.inflight import inflight_area_bytes, inflight_queue_bytes

R = FrontendRequest
PF = ProtocolFeature
VF = VirtioFeature

HEADER = struct.Struct("<III")
U64 = struct.Struct("<Q")
U64_MAX = (1 << 64) - 1
PAGE = 4096

EXAMPLES = int(os.environ.get("VHOSTUSER_STATEFUL_EXAMPLES", "30"))
STEPS = int(os.environ.get("VHOSTUSER_STATEFUL_STEPS", "40"))

SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    # No "explain" phase: re-running a long stateful example to explain it costs minutes.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)

MEMFD_PREFIX = "vhu-stateful"
"""Name of every memfd this test creates (so its mappings can be told apart)."""
INFLIGHT_MEMFD = "vhostuser-inflight"
"""Name of the memfds the shell creates for GET_INFLIGHT_FD."""

GPA_SLOT = 1 << 20
UVA_BASE = 0x7F00_0000_0000

MEM_SLOTS = st.sampled_from([32, 32, 32, 3])
"""max_mem_slots of a session: BackendConnection's default, or few enough to run out."""

Expect = Literal["ok", "error", "either"]

MUTATIONS = st.sampled_from(["none"] * 40 + ["short", "long", "flags", "extra-fd", "drop-fd",
                                             "swap-fd", "many-fds", "huge-size"])
#: (NEED_REPLY, mutation, delivered in pieces) with REPLY_ACK negotiated, and without it
#: (a front-end that sets NEED_REPLY anyway, sometimes).
DELIVERY_ACK = st.tuples(st.booleans(), MUTATIONS, st.sampled_from([False] * 3 + [True]))
DELIVERY_NO_ACK = st.tuples(st.sampled_from([False, False, True]), MUTATIONS,
                            st.sampled_from([False] * 3 + [True]))

#: Where QEMU sets NEED_REPLY when REPLY_ACK is negotiated (QEMU vhost-user.c, with REPLY_ACK).
QEMU_NEED_REPLY = frozenset({R.SET_MEM_TABLE, R.ADD_MEM_REG, R.REM_MEM_REG, R.SET_VRING_KICK,
                             R.SET_VRING_CALL, R.SET_VRING_ERR, R.NET_SET_MTU,
                             R.SET_VRING_ENABLE, R.SET_FEATURES, R.SET_VRING_ADDR})

#: Requests the back-end has no handler for, or whose feature it never offers.
NEVER_ACCEPTED = (
    R.IOTLB_MSG, R.SET_VRING_ENDIAN, R.CREATE_CRYPTO_SESSION,
    R.CLOSE_CRYPTO_SESSION, R.POSTCOPY_ADVISE, R.POSTCOPY_LISTEN, R.POSTCOPY_END,
    R.GPU_SET_SOCKET, R.VRING_KICK, R.GET_SHARED_OBJECT, R.SET_DEVICE_STATE_FD,
    R.CHECK_DEVICE_STATE, R.GET_SHMEM_CONFIG, R.GET_VRING_BASE_SKIP_DRAIN,
)

FD_KINDS = ("eventfd", "pipe", "socket", "dgram", "memfd", "rofile", "devnull")


# -- fds ---------------------------------------------------------------------------------------


@dataclass
class FdInfo:
    """What the test knows about an fd it made."""

    kind: str
    size: int = 0
    area: tuple[int, int, bool] | None = None
    """For an inflight area the back-end made: (num_queues, queue_size, packed)."""


class FdMaker:
    """Makes real fds of every kind the test needs and remembers what each one is."""

    _made = itertools.count(1)  # memfd names are unique in the process, across examples

    def __init__(self) -> None:
        self.info: dict[int, FdInfo] = {}  # id(OwnedFd) -> info
        self.made: list[OwnedFd] = []

    def make(self, kind: str, size: int = PAGE, fill: bytes = b"") -> OwnedFd:
        """A new fd of ``kind``; memfds are ``size`` bytes (``fill`` written at 0)."""
        n = next(self._made)
        if kind == "eventfd":
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        elif kind == "pipe":
            r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            os.close(w)
            fd = r
        elif kind in ("socket", "dgram"):
            a, b = socket.socketpair(socket.AF_UNIX,
                                     socket.SOCK_STREAM if kind == "socket"
                                     else socket.SOCK_DGRAM)
            fd = a.detach()
            b.close()
        elif kind in ("memfd", "rofile"):
            mfd = os.memfd_create(f"{MEMFD_PREFIX}-{n}", os.MFD_CLOEXEC)
            os.ftruncate(mfd, size)
            if fill:
                os.pwrite(mfd, fill[:size], 0)
            if kind == "rofile":
                fd = os.open(f"/proc/self/fd/{mfd}", os.O_RDONLY | os.O_CLOEXEC)
                os.close(mfd)
            else:
                fd = mfd
        elif kind == "devnull":
            fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        else:  # pragma: no cover - a typo in the test
            raise AssertionError(kind)
        owned = OwnedFd(fd)
        self.info[id(owned)] = FdInfo(kind, size if kind in ("memfd", "rofile") else 0)
        self.made.append(owned)
        return owned

    def close_unsent(self, sent: Sequence[OwnedFd]) -> None:
        """Close what was made but never handed over (Hypothesis may end an example
        between making fds and sending them)."""
        keep = {id(f) for f in sent}
        for f in self.made:
            if id(f) not in keep:
                f.close()
        self.made = []

    def adopt(self, fd: OwnedFd, kind: str, size: int,
              area: tuple[int, int, bool] | None = None) -> None:
        """Record an fd made elsewhere (an inflight area the back-end sent, or a dup)."""
        self.info[id(fd)] = FdInfo(kind, size, area)

    def kind(self, fd: OwnedFd) -> FdInfo:
        return self.info[id(fd)]


def fd_table() -> dict[int, str]:
    """fd number -> link target, for this process."""
    out: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return out


def our_mappings() -> list[str]:
    """Lines of /proc/self/maps that map a memfd this test or the shell's inflight made."""
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
        return [line.rstrip() for line in f
                if f"/memfd:{MEMFD_PREFIX}" in line or f"/memfd:{INFLIGHT_MEMFD}" in line]


def count_our_mappings() -> int:
    """How many lines :func:`our_mappings` would return (cheaper: called every step)."""
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
        text = f.read()
    return text.count(f"/memfd:{MEMFD_PREFIX}") + text.count(f"/memfd:{INFLIGHT_MEMFD}")


def is_memfd_target(target: str) -> bool:
    return target.startswith(f"/memfd:{MEMFD_PREFIX}") or target.startswith(
        f"/memfd:{INFLIGHT_MEMFD}")


# -- the devices -------------------------------------------------------------------------------


DEVICE_KINDS = ("null-net", "net-mq", "blk", "blk-mq")


def make_device(kind: str) -> Device:
    """A fresh device of ``kind``."""
    if kind == "null-net":
        return NullNetDevice()
    if kind == "net-mq":
        return VirtioNetDevice(queue_pairs=2, offer_config=True)
    if kind == "blk":
        return BlkDevice(MemoryBackend(1 << 20))
    if kind == "blk-mq":
        return BlkDevice(MemoryBackend(64 << 10), num_queues=3, serial="stateful")
    raise AssertionError(kind)


class CoreQueues:
    """The device's view of the rings (what the shell's BackendSession gives it)."""

    def __init__(self, conn: BackendConnection[OwnedFd]) -> None:
        self.conn = conn
        self.notified = 0

    def ring(self, index: int) -> Any:
        if self.conn.closed or not 0 <= index < len(self.conn.vrings):
            return None
        v = self.conn.vrings[index]
        return v.engine if v.started and v.broken is None else None

    def enabled(self, index: int) -> bool:
        return 0 <= index < len(self.conn.vrings) and self.conn.vrings[index].enabled

    def notify(self, index: int) -> None:
        self.notified += 1

    def ring_broken(self, index: int, reason: str) -> None:
        if not self.conn.closed and self.conn.vrings[index].broken is None:
            self.conn.ring_broken(index, reason)

    def call_later(self, delay: float, callback: Any) -> Any:
        raise AssertionError("no device here completes requests later")


# -- the model -------------------------------------------------------------------------------


@dataclass
class RingModel:
    """What the session must hold about one ring."""

    num: int = 0
    base: int = 0
    base_known: bool = True
    addr: P.VringAddr | None = None
    started: bool = False
    enabled: bool = False
    kick: OwnedFd | None = None
    call: OwnedFd | None = None
    err: OwnedFd | None = None


@dataclass
class RegionModel:
    """One region of the memory table."""

    gpa: int
    size: int
    uva: int
    off: int
    refs: int = 1

    def key(self) -> tuple[int, int, int, int]:
        return (self.gpa, self.size, self.uva, self.off)


@dataclass
class Model:
    """What the session must hold (see the module docstring)."""

    nq: int
    offered: int
    offered_pf: int
    config_len: int
    max_slots: int
    owner: bool = False
    features: int | None = None
    pf: int = 0
    pf_set: bool = False
    status: int = 0
    regions: list[RegionModel] = field(default_factory=list)
    rings: list[RingModel] = field(default_factory=list)
    channel: OwnedFd | None = None
    log_fd: OwnedFd | None = None
    inflight: tuple[int, int] | None = None
    dirty_log: bool = False
    """A dirty log is mapped (SET_LOG_BASE with LOG_SHMFD)."""

    def __post_init__(self) -> None:
        self.rings = [RingModel() for _ in range(self.nq)]

    @property
    def packed(self) -> bool:
        return bool((self.features or 0) & VF.RING_PACKED)

    def reset(self) -> None:
        """RESET_OWNER / RESET_DEVICE: everything but owner and protocol features."""
        self.features = None
        self.status = 0
        self.regions = []
        self.rings = [RingModel() for _ in range(self.nq)]
        self.channel = None
        self.log_fd = None
        self.inflight = None
        self.dirty_log = False

    def held(self) -> list[OwnedFd]:
        out = [f for r in self.rings for f in (r.kick, r.call, r.err) if f is not None]
        out += [f for f in (self.channel, self.log_fd) if f is not None]
        return out

    def find_exact(self, gpa: int, size: int, uva: int) -> RegionModel | None:
        for r in self.regions:
            if (r.gpa, r.size, r.uva) == (gpa, size, uva):
                return r
        return None

    def va_ok(self, va: int, length: int) -> bool:
        return any(r.uva <= va and va + length <= r.uva + r.size for r in self.regions)


def wraps(r: P.MemoryRegion) -> bool:
    return any(base + r.memory_size - 1 > U64_MAX
               for base in (r.guest_phys_addr, r.userspace_addr, r.mmap_offset))


def overlaps(a_gpa: int, a_size: int, b_gpa: int, b_size: int) -> bool:
    return a_gpa < b_gpa + b_size and b_gpa < a_gpa + a_size


# -- wire helpers ----------------------------------------------------------------------------


def frame(request: int, payload: bytes, flags: int) -> bytes:
    return HEADER.pack(request, flags, len(payload)) + payload


def parse(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split concatenated messages into (request, flags, payload); the bytes must end on a
    message boundary."""
    out: list[tuple[int, int, bytes]] = []
    off = 0
    while off < len(data):
        assert off + 12 <= len(data), f"reply cut inside its header: {data[off:].hex()}"
        request, flags, size = HEADER.unpack_from(data, off)
        assert off + 12 + size <= len(data), f"reply cut inside its payload: {data.hex()}"
        out.append((request, flags, data[off + 12 : off + 12 + size]))
        off += 12 + size
    return out


def request_name(code: int) -> str:
    try:
        return FrontendRequest(code).name
    except ValueError:
        return f"request {code}"


Reply_ = tuple[int, int, bytes, list[OwnedFd]]


# -- strategies ------------------------------------------------------------------------------


T = TypeVar("T")


def mostly(valid: st.SearchStrategy[T], invalid: st.SearchStrategy[T],
           odds: int = 9) -> st.SearchStrategy[T]:
    """``valid`` ``odds`` times out of ``odds + 1``, else ``invalid``: a session ends at its
    first refused request, so most requests must be good for sequences to get deep."""
    return st.sampled_from([True] * odds + [False]).flatmap(
        lambda good: valid if good else invalid)


def u32_index(nq: int) -> st.SearchStrategy[int]:
    """A ring index: mostly valid, sometimes just past the end, 8/16/32-bit edges."""
    return mostly(st.integers(0, nq - 1), st.sampled_from([nq, 0xFF, 0x100, 0x10000,
                                                           0xFFFFFFFF]))


RING_NUMS = mostly(st.sampled_from([8, 16, 64, 256, 1, 2, 4]),
                   st.sampled_from([0, 3, 1000, 32768, 32769, 65536, 0xFFFFFFFF]))

BASES = mostly(st.sampled_from([0, 1, 5, 7]) | st.integers(0, 0xFFFF),
               st.sampled_from([0x8000, 0x10000, 0x8000_8000, 0x0001_0001, 0xFFFFFFFF])
               | st.integers(0, 0xFFFFFFFF))


@st.composite
def plausible_split_area(draw: st.DrawFn, nq: int, qs: int) -> bytes:
    """A split inflight area as a crashed back-end might leave it: version 1, desc_num
    right, a few heads in flight with counters, last_batch_head and used_idx anywhere."""
    per = inflight_queue_bytes(qs, False)
    out = bytearray(per * nq)
    for q in range(nq):
        base = q * per
        struct.pack_into("<QHHHH", out, base, 0, 1, qs,
                         draw(st.integers(0, qs - 1) | st.just(0xFFFF)),
                         draw(st.integers(0, 0xFFFF)))
        for head in draw(st.lists(st.integers(0, qs - 1), max_size=4, unique=True)):
            struct.pack_into("<B5xHQ", out, base + 16 + 16 * head, 1,
                             draw(st.integers(0, qs - 1)), draw(st.integers(1, 1000)))
    return bytes(out)


# -- the core machine ------------------------------------------------------------------------


class CoreMachine(RuleBasedStateMachine):
    """BackendConnection over the real ShellHost, against a model (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        reap_deferred()
        self.baseline_fds = fd_table()
        self.baseline_maps = count_our_mappings()
        self.fds = FdMaker()
        self.kept: list[OwnedFd] = []  # fds the test itself holds (inflight areas got back)
        self.given: list[OwnedFd] = []  # every fd handed to a core
        self.conn: BackendConnection[OwnedFd] | None = None
        self.device: Device | None = None
        self.model: Model | None = None
        self.dead = False
        self.sessions = 0
        self.inflight_garbage = False
        self.device_kind = ""

    # -- session lifecycle ----------------------------------------------------------------
    def _start(self, data: st.DataObject) -> None:
        """A new front-end connects, and takes the handshake some way (or not at all)."""
        kind = data.draw(st.sampled_from(DEVICE_KINDS), label="device")
        slots = data.draw(MEM_SLOTS, label="max_mem_slots")
        device = make_device(kind)
        conn: BackendConnection[OwnedFd] = BackendConnection(
            device, ShellHost(), max_mem_slots=slots, name=f"stateful-{kind}")
        device.attach(CoreQueues(conn))
        self.device, self.conn, self.device_kind = device, conn, kind
        config = device.config_space() if device.offer_config else b""
        self.model = Model(nq=device.num_queues, offered=conn.offered_features,
                           offered_pf=conn.offered_protocol_features, config_len=len(config),
                           max_slots=slots)
        self.dead = False
        self.inflight_garbage = False
        self.sessions += 1
        note(f"== session {self.sessions}: {kind}, {device.num_queues} queues, {slots} slots, "
             f"features {conn.offered_features:#x}, protocol features "
             f"{conn.offered_protocol_features:#x}")
        depth = data.draw(st.sampled_from(["none", "owner", "features", "memory", "rings",
                                           "rings", "rings", "rings"]), label="handshake")
        self._handshake(data, depth)

    def _end(self, how: str) -> None:
        """End the session (``eof``: the peer hung up; ``close``: we close) and check that
        every fd and mapping it held is gone."""
        conn, device = self.conn, self.device
        assert conn is not None and device is not None
        if how == "eof" and not self.dead:
            conn.receive_data(b"")  # at a message boundary: no error
            assert conn.closed and conn.error is None
        device.close()
        conn.close()
        reap_deferred()
        self.conn = self.device = None
        self.model = None
        open_given = [f for f in self.given if not f.closed]
        assert not open_given, f"fds still open after the session ended: {open_given}"
        self.given = []
        maps = our_mappings()
        assert len(maps) == self.baseline_maps, (
            "mappings left after the session ended (deferred unmaps: "
            f"{deferred_count()}):\n" + "\n".join(maps))
        self._check_fd_table(held=[])

    def _died(self, data: st.DataObject) -> None:
        """The session refused something and is in ERROR: it holds nothing any more, and
        refuses (and closes the fds of) whatever comes next. Then a new front-end comes."""
        conn = self.conn
        assert conn is not None
        self.dead = True
        self._check_dead()
        fds = [self._give("eventfd")]
        ok, _ = self._receive(frame(R.GET_FEATURES, b"", 0x9), fds)
        assert not ok and fds[0].closed, "a session in ERROR took another message"
        assert self._replies() == []
        self._end("close")
        self._start(data)

    def _check_dead(self) -> None:
        conn = self.conn
        assert conn is not None
        assert conn.closed and conn.error is not None
        open_given = [f for f in self.given if not f.closed]
        assert not open_given, f"a failed session still holds fds: {open_given}"
        assert len(conn.mem) == 0 and conn.inflight is None
        assert all(v.engine is None for v in conn.vrings)
        assert count_our_mappings() == self.baseline_maps, "a failed session still maps memory"
        self._check_fd_table(held=[])

    @initialize(data=st.data())
    def start(self, data: st.DataObject) -> None:
        self._start(data)

    @rule(data=st.data(), how=st.sampled_from(["eof", "close"]))
    def reconnect(self, data: st.DataObject, how: str) -> None:
        """The front-end goes away (or we close); a new one connects."""
        note(f"-- session ends ({how})")
        self._end(how)
        self._start(data)

    def teardown(self) -> None:
        self.fds.close_unsent(self.given)
        if self.conn is not None:
            self._end("close")
        for f in self.kept:
            f.close()
        self.kept = []
        self._check_fd_table(held=[])

    # -- sending ---------------------------------------------------------------------------
    def _give(self, kind: str, size: int = PAGE, fill: bytes = b"") -> OwnedFd:
        """A new fd to send (it counts as given once :meth:`_receive` hands it over)."""
        return self.fds.make(kind, size, fill)

    def _receive(self, data: bytes, fds: list[OwnedFd]) -> tuple[bool, list[ev.Event]]:
        """Feed the core; True if it accepted. Only RemoteProtocolError may come out."""
        assert self.conn is not None
        self.given.extend(fds)
        try:
            events = self.conn.receive_data(data, fds)
        except RemoteProtocolError as e:
            note(f"   refused: {e}")
            assert str(e), "an error message must say what was wrong"
            assert self.conn.closed and self.conn.error is not None
            return False, []
        return True, events

    def _replies(self) -> list[Reply_]:
        assert self.conn is not None
        out: list[Reply_] = []
        for data, fds in self.conn.data_to_send():
            msgs = parse(data)
            assert len(msgs) == 1, f"one reply per queued item, got {msgs}"
            out.append((*msgs[0], list(fds)))
        return out

    def _emit(self, data: st.DataObject, request: int, payload: bytes, fds: list[OwnedFd],
              *, mutate: bool = True) -> bool:
        """Send one request (maybe mutated, maybe in pieces); check the outcome, replies
        and model against each other. Returns True if the core accepted it."""
        assert self.conn is not None and self.model is not None
        m = self.model
        if mutate:
            need_reply, mutation, split = data.draw(
                DELIVERY_ACK if m.pf & PF.REPLY_ACK else DELIVERY_NO_ACK, label="delivery")
        else:
            # A well-behaved front-end: NEED_REPLY where QEMU sets it, one piece.
            need_reply = bool(m.pf & PF.REPLY_ACK) and request in QEMU_NEED_REPLY
            mutation, split = "none", False
        flags = 0x9 if need_reply else 0x1
        framing_error = False
        if mutation == "short" and payload:
            payload = payload[: data.draw(st.integers(0, len(payload) - 1), label="cut")]
        elif mutation == "long":
            payload += data.draw(st.binary(min_size=1, max_size=16), label="junk")
        elif mutation == "flags":
            flags = data.draw(st.sampled_from([0x0, 0x2, 0x3, 0x5, 0xD, 0x11, 0x41, 0x80000001]),
                              label="bad flags")
            framing_error = True
        elif mutation == "extra-fd":
            fds = [*fds, self._give(data.draw(st.sampled_from(FD_KINDS), label="extra kind"))]
        elif mutation == "drop-fd" and fds:
            dropped = fds.pop(data.draw(st.integers(0, len(fds) - 1), label="drop"))
            dropped.close()
            del self.fds.info[id(dropped)]
        elif mutation == "swap-fd" and fds:
            i = data.draw(st.integers(0, len(fds) - 1), label="swap")
            fds[i].close()
            del self.fds.info[id(fds[i])]
            fds[i] = self._give(data.draw(st.sampled_from(FD_KINDS), label="swap kind"))
        elif mutation == "many-fds":
            fds = fds + [self._give("eventfd") for _ in range(MAX_FDS + 1 - len(fds))]
            framing_error = True
        if len(fds) > MAX_FDS:
            framing_error = True  # the decoder refuses them before the message is read
        wire = frame(request, payload, flags)
        if mutation == "huge-size":
            wire = HEADER.pack(request, flags, data.draw(
                st.sampled_from([MAX_PAYLOAD + 1, 0x10000, 0xFFFFFFFF]), label="size")) + payload
            framing_error = True

        # What the model says about it.
        expect: Expect
        parsed: Any = None
        if framing_error:
            expect = "error"
        else:
            expect, parsed = self._predict(request, payload, fds)
        note(f"-> {request_name(request)} flags={flags:#x} payload={payload.hex() or '-'} "
             f"fds={[self.fds.kind(f).kind for f in fds]} ({mutation}; expect {expect})")

        # Deliver: whole, or in pieces (fds ride with the first piece, as a kernel
        # delivers them with the first byte of the sendmsg that carried them).
        pieces = [wire]
        if len(wire) > 1 and split:
            cuts = sorted(set(data.draw(st.lists(st.integers(1, len(wire) - 1), min_size=1,
                                                 max_size=3), label="cuts")))
            pieces = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
        ok = True
        events: list[ev.Event] = []
        for k, piece in enumerate(pieces):
            ok, got = self._receive(piece, fds if k == 0 else [])
            events += got
            if not ok:
                break
        replies = self._replies()
        event(f"{request_name(request)}: {'accepted' if ok else 'refused'}")
        try:
            self._check_outcome(request, need_reply, expect, ok, framing_error, replies, fds)
            if ok:
                self._apply(request, parsed, fds, replies, events)
        finally:
            for *_rest, rfds in replies:
                for f in rfds:
                    if f not in self.kept:
                        f.close()
        if not ok:
            self._died(data)
        return ok

    # -- expectations ------------------------------------------------------------------------
    def _check_outcome(self, request: int, need_reply: bool, expect: Expect, ok: bool,
                       framing_error: bool, replies: list[Reply_], fds: list[OwnedFd]) -> None:
        name = request_name(request)
        if expect == "ok":
            assert ok, f"{name} was refused but the model says it is valid"
        elif expect == "error":
            assert not ok, f"{name} was accepted but the model says it must be refused"
        for r_req, r_flags, _p, _f in replies:
            assert r_flags == 0x5, f"reply flags {r_flags:#x} (QEMU accepts only 0x5)"
            assert r_req == request, f"reply to {name} carries request {r_req}"
        shapes = [(len(p), len(f)) for _r, _fl, p, f in replies]
        try:
            rule_ = FRONTEND_RULES[FrontendRequest(request)]
        except (ValueError, KeyError):
            rule_ = None
        if not ok:
            assert all(f.closed for f in fds), "a refused request's fds must be closed"
            if framing_error or not need_reply:
                assert replies == [], f"{name}: nothing may be answered, got {shapes}"
            elif rule_ is None or rule_.reply is not Reply.ALWAYS:
                assert len(replies) == 1 and len(replies[0][2]) == 8, shapes
                assert U64.unpack(replies[0][2])[0] != 0, f"{name}: a NACK must be non-zero"
                assert replies[0][3] == []
            elif rule_.reply_payload is P.ConfigPayload:
                assert shapes == [(0, 0)], f"GET_CONFIG error reply is size 0, got {shapes}"
            else:
                assert replies == [], f"{name}: its own reply has no error code, got {shapes}"
            return
        assert rule_ is not None
        if rule_.reply is Reply.IF_LOG_SHMFD:
            # Accepted only with LOG_SHMFD, so always answered, u64 0 (NEED_REPLY or not).
            assert [(p, f) for _r, _fl, p, f in replies] == [(U64.pack(0), [])], (
                f"{name} must be answered with u64 0, got {shapes}")
        elif rule_.reply is Reply.ALWAYS:
            assert len(replies) == 1, f"{name} must be answered once, got {shapes}"
            payload, rfds = replies[0][2], replies[0][3]
            assert rule_.reply_payload is not None
            rule_.reply_payload.decode(payload)  # the reply's layout
            assert len(rfds) == rule_.reply_fds, f"{name} reply carries {len(rfds)} fds"
        elif need_reply:
            assert [(p, f) for _r, _fl, p, f in replies] == [(U64.pack(0), [])], (
                f"{name} with NEED_REPLY must be acked with u64 0, got {shapes}")
        else:
            assert replies == [], f"{name} has no reply, got {shapes}"

    def _predict(self, request: int, payload: bytes, fds: list[OwnedFd]) -> tuple[Expect, Any]:
        """The model's verdict on one syntactically framed request, and its decoded payload."""
        m = self.model
        assert m is not None
        try:
            req = FrontendRequest(request)
        except ValueError:
            return "error", None
        rule_ = FRONTEND_RULES[req]
        try:
            p: Any = rule_.payload.decode(payload)
        except RemoteProtocolError:
            return "error", None
        n = len(fds)
        if rule_.fds is Fds.NONE and n:
            return "error", p
        if rule_.fds is Fds.ONE and n != 1:
            return "error", p
        if rule_.fds is Fds.OPTIONAL and n > 1:
            return "error", p
        if rule_.fds is Fds.NOFD_BIT and (n != (0 if p.nofd else 1)):
            return "error", p
        if rule_.fds is Fds.PER_REGION and n != len(p.regions):
            return "error", p
        gate = rule_.gate
        if isinstance(gate, ProtocolFeature):
            if not m.pf & gate:
                return "error", p
        elif gate is VF.PROTOCOL_FEATURES:
            if m.features is not None and not m.features & VF.PROTOCOL_FEATURES:
                return "error", p
            if req is R.SET_VRING_ENABLE and not m.pf_set:
                return "error", p
        elif gate is not None and not (m.features or 0) & gate:
            return "error", p
        if rule_.needs_owner and not m.owner:
            return "error", p
        if rule_.needs_features and m.features is None:
            return "error", p
        if rule_.ring_index and p.index >= m.nq:
            return "error", p
        if req in NEVER_ACCEPTED:
            return "error", p
        method = getattr(self, f"_predict_{req.name.lower()}", None)
        if method is None:
            return "ok", p
        verdict: Expect = method(p, fds)
        return verdict, p

    def _map_ok(self, fd: OwnedFd, off: int, size: int) -> bool:
        info = self.fds.kind(fd)
        return info.kind == "memfd" and size > 0 and off + size <= info.size

    def _predict_set_features(self, p: P.U64Payload, fds: list[OwnedFd]) -> Expect:
        m = self.model
        assert m is not None
        v = p.value
        if v & ~m.offered:
            return "error"
        started = any(r.started for r in m.rings)
        if m.features is not None and started and (v ^ m.features) & ~int(VF.LOG_ALL):
            return "error"
        if not v & VF.RING_PACKED:
            for r in m.rings:
                if r.num & (r.num - 1) or r.base > 0xFFFF:
                    return "error"
        return "ok"

    def _predict_set_protocol_features(self, p: P.U64Payload, fds: list[OwnedFd]) -> Expect:
        m = self.model
        assert m is not None
        return "error" if p.value & ~m.offered_pf else "ok"

    def _predict_set_mem_table(self, p: P.MemoryTable, fds: list[OwnedFd]) -> Expect:
        m = self.model
        assert m is not None
        if len(p.regions) > m.max_slots:
            return "error"
        for r, fd in zip(p.regions, fds, strict=True):
            if wraps(r) or not self._map_ok(fd, r.mmap_offset, r.memory_size):
                return "error"
        for i, a in enumerate(p.regions):
            for b in p.regions[i + 1:]:
                if overlaps(a.guest_phys_addr, a.memory_size, b.guest_phys_addr, b.memory_size):
                    return "error"
        return "ok"

    def _predict_add_mem_reg(self, p: P.SingleRegion, fds: list[OwnedFd]) -> Expect:
        m = self.model
        assert m is not None
        r = p.region
        same = m.find_exact(r.guest_phys_addr, r.memory_size, r.userspace_addr)
        if same is not None and same.off == r.mmap_offset:
            return "ok"
        if len(m.regions) >= m.max_slots:
            return "error"
        if wraps(r) or not self._map_ok(fds[0], r.mmap_offset, r.memory_size):
            return "error"
        if any(overlaps(r.guest_phys_addr, r.memory_size, o.gpa, o.size) for o in m.regions):
            return "error"
        return "ok"

    def _predict_rem_mem_reg(self, p: P.SingleRegion, fds: list[OwnedFd]) -> Expect:
        m = self.model
        assert m is not None
        r = p.region
        found = m.find_exact(r.guest_phys_addr, r.memory_size, r.userspace_addr)
        return "ok" if found is not None else "error"

    def _predict_set_vring_num(self, p: P.VringState, fds: list[OwnedFd]) -> Expect:
        m = self.model
        assert m is not None
        ring = m.rings[p.index]
        if not 1 <= p.num <= MAX_SPLIT_RING:
            return "error"
        if not m.packed and p.num & (p.num - 1):
            return "error"
        if ring.started:
            return "error"
        if m.inflight is not None and p.index < m.inflight[0] and p.num != m.inflight[1]:
            return "error"
        return "ok"

    def _predict_set_vring_addr(self, p: P.VringAddr, fds: list[OwnedFd]) -> Expect:
        m = self.model
        assert m is not None
        # vhost-user.rst "Live migration": VHOST_VRING_F_LOG logs the used ring at
        # log_guest_addr, which must be able to hold a whole used ring.
        if p.flags & P.VRING_F_LOG and (not m.offered & VF.LOG_ALL or p.log % 4
                                        or p.log + 6 + 8 * MAX_SPLIT_RING > U64_MAX):
            return "error"
        if p.desc % 16 or p.avail % (4 if m.packed else 2) or p.used % 4:
            return "error"
        n = m.rings[p.index].num or 1
        if not (m.va_ok(p.desc, 16 * n) and m.va_ok(p.avail, 4) and m.va_ok(p.used, 4)):
            return "error"
        return "ok"

    def _predict_set_vring_base(self, p: P.VringState, fds: list[OwnedFd]) -> Expect:
        m = self.model
        assert m is not None
        if m.rings[p.index].started:
            return "error"
        if not m.packed and p.num > 0xFFFF:
            return "error"
        return "ok"

    def _predict_get_vring_base(self, p: P.VringState, fds: list[OwnedFd]) -> Expect:
        m = self.model
        assert m is not None
        ring = m.rings[p.index]
        return "ok" if ring.num and ring.addr is not None else "error"

    def _predict_notify_fd(self, p: P.VringFile, fds: list[OwnedFd]) -> Expect:
        if fds and self.fds.kind(fds[0]).kind not in ("eventfd", "pipe"):
            return "error"
        return "ok"

    _predict_set_vring_kick = _predict_notify_fd
    _predict_set_vring_call = _predict_notify_fd
    _predict_set_vring_err = _predict_notify_fd

    def _predict_set_vring_enable(self, p: P.VringState, fds: list[OwnedFd]) -> Expect:
        return "error" if p.num > 1 else "ok"

    def _predict_set_log_base(self, p: P.LogBase, fds: list[OwnedFd]) -> Expect:
        m = self.model
        assert m is not None
        size, off = p.mmap_size, p.mmap_offset
        if not m.pf & PF.LOG_SHMFD or not 0 < size <= MAX_LOG_BYTES or off > MAX_LOG_BYTES:
            return "error"
        return "ok" if self._map_ok(fds[0], off, size) else "error"

    def _predict_set_backend_req_fd(self, p: Any, fds: list[OwnedFd]) -> Expect:
        return "ok" if self.fds.kind(fds[0]).kind == "socket" else "error"

    def _predict_get_config(self, p: P.ConfigPayload, fds: list[OwnedFd]) -> Expect:
        m = self.model
        assert m is not None
        return "error" if p.offset > m.config_len or p.offset + p.size > 256 else "ok"

    def _predict_set_config(self, p: P.ConfigPayload, fds: list[OwnedFd]) -> Expect:
        return "either"

    def _predict_set_status(self, p: P.U64Payload, fds: list[OwnedFd]) -> Expect:
        return "error" if p.value > 0xFF else "ok"

    def _predict_net_set_mtu(self, p: P.U64Payload, fds: list[OwnedFd]) -> Expect:
        return "ok" if 68 <= p.value <= 65535 else "error"

    def _predict_get_inflight_fd(self, p: P.InflightPayload, fds: list[OwnedFd]) -> Expect:
        m = self.model
        assert m is not None
        if not 1 <= p.num_queues <= m.nq or not 1 <= p.queue_size <= MAX_SPLIT_RING:
            return "error"
        return "ok"

    def _predict_set_inflight_fd(self, p: P.InflightPayload, fds: list[OwnedFd]) -> Expect:
        m = self.model
        assert m is not None
        if not 1 <= p.num_queues <= m.nq or not 1 <= p.queue_size <= MAX_SPLIT_RING:
            return "error"
        need = inflight_area_bytes(p.num_queues, p.queue_size, m.packed)
        if p.mmap_size < need:
            return "error"
        for r in m.rings[: p.num_queues]:
            if r.num and r.num != p.queue_size:
                return "error"
        if p.mmap_offset + p.mmap_size > U64_MAX:
            return "error"
        if not self._map_ok(fds[0], p.mmap_offset, p.mmap_size):
            return "error"
        # The device checks the area's content: only one it prepared itself is sure to pass.
        area = self.fds.kind(fds[0]).area
        if area == (p.num_queues, p.queue_size, m.packed) and p.mmap_offset == 0:
            return "ok"
        return "either"

    # -- applying an accepted request to the model -------------------------------------------
    def _apply(self, request: int, p: Any, fds: list[OwnedFd], replies: list[Reply_],
               events: list[ev.Event]) -> None:
        m = self.model
        assert m is not None and self.conn is not None
        req = FrontendRequest(request)
        if req is R.GET_FEATURES:
            assert U64.unpack(replies[0][2])[0] == m.offered
        elif req is R.GET_PROTOCOL_FEATURES:
            assert U64.unpack(replies[0][2])[0] == m.offered_pf
        elif req is R.GET_QUEUE_NUM:
            assert U64.unpack(replies[0][2])[0] == m.nq
        elif req is R.GET_MAX_MEM_SLOTS:
            assert U64.unpack(replies[0][2])[0] == m.max_slots
        elif req is R.GET_STATUS:
            assert U64.unpack(replies[0][2])[0] == m.status
        elif req is R.SET_OWNER:
            m.owner = True
        elif req in (R.RESET_OWNER, R.RESET_DEVICE):
            m.reset()
            self.inflight_garbage = False
        elif req is R.SET_FEATURES:
            m.features = p.value
            if not p.value & VF.PROTOCOL_FEATURES:
                for r in m.rings:
                    r.enabled = True
        elif req is R.SET_PROTOCOL_FEATURES:
            m.pf, m.pf_set = p.value, True
        elif req is R.SET_STATUS:
            m.status = p.value
        elif req is R.SET_MEM_TABLE:
            m.regions = [RegionModel(r.guest_phys_addr, r.memory_size, r.userspace_addr,
                                     r.mmap_offset) for r in p.regions]
            self._engines_changed()
        elif req is R.ADD_MEM_REG:
            r = p.region
            same = m.find_exact(r.guest_phys_addr, r.memory_size, r.userspace_addr)
            if same is not None and same.off == r.mmap_offset:
                same.refs += 1
            else:
                m.regions.append(RegionModel(r.guest_phys_addr, r.memory_size,
                                             r.userspace_addr, r.mmap_offset))
                self._engines_changed()
        elif req is R.REM_MEM_REG:
            r = p.region
            found = m.find_exact(r.guest_phys_addr, r.memory_size, r.userspace_addr)
            assert found is not None
            found.refs -= 1
            if found.refs == 0:
                m.regions.remove(found)
                self._engines_changed()
        elif req is R.SET_LOG_FD:
            m.log_fd = fds[0]
        elif req is R.SET_LOG_BASE:
            m.dirty_log = True
        elif req is R.SET_BACKEND_REQ_FD:
            m.channel = fds[0]
        elif req is R.SET_VRING_NUM:
            m.rings[p.index].num = p.num
        elif req is R.SET_VRING_BASE:
            ring = m.rings[p.index]
            ring.base, ring.base_known = p.num, True
        elif req is R.SET_VRING_ADDR:
            m.rings[p.index].addr = p
            self._engines_changed()
        elif req is R.GET_VRING_BASE:
            ring = m.rings[p.index]
            got = P.VringState.decode(replies[0][2])
            assert got.index == p.index, f"GET_VRING_BASE answered for ring {got.index}"
            if ring.base_known:
                assert got.num == ring.base, (
                    f"GET_VRING_BASE ring {p.index}: base {got.num:#x}, expected {ring.base:#x}")
            ring.base, ring.base_known = got.num, True
            ring.started = False
            ring.addr = None
            ring.kick = None
        elif req in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR):
            ring = m.rings[p.index]
            fd = None if p.nofd else fds[0]
            kind = req.name.removeprefix("SET_VRING_").lower()
            setattr(ring, kind, fd)
            if kind == "kick" and p.nofd:
                self._model_kick(p.index)
        elif req is R.SET_VRING_ENABLE:
            m.rings[p.index].enabled = bool(p.num)
        elif req is R.GET_CONFIG:
            got_cfg = P.ConfigPayload.decode(replies[0][2])
            assert (got_cfg.offset, got_cfg.size, got_cfg.flags) == (p.offset, p.size, p.flags)
            assert self.device is not None
            want = self.device.config_space()[p.offset : p.offset + p.size]
            assert got_cfg.data == want + bytes(p.size - len(want))
        elif req is R.GET_INFLIGHT_FD:
            got_inf = P.InflightPayload.decode(replies[0][2])
            size = inflight_area_bytes(p.num_queues, p.queue_size, m.packed)
            assert got_inf == P.InflightPayload(mmap_size=size, mmap_offset=0,
                                                num_queues=p.num_queues,
                                                queue_size=p.queue_size), got_inf
            rfd = replies[0][3][0]
            st_ = os.fstat(rfd.fd)
            assert st_.st_size >= size and os.readlink(f"/proc/self/fd/{rfd.fd}").startswith(
                f"/memfd:{INFLIGHT_MEMFD}")
            m.inflight = (p.num_queues, p.queue_size)
            # Keep the area, as QEMU does, to hand it back with SET_INFLIGHT_FD.
            self.fds.adopt(rfd, "memfd", st_.st_size, (p.num_queues, p.queue_size, m.packed))
            self.kept.append(rfd)
            if len(self.kept) > 2:
                self.kept.pop(0).close()
        elif req is R.SET_INFLIGHT_FD:
            m.inflight = (p.num_queues, p.queue_size)
            self.inflight_garbage = True
        for e in events:
            if isinstance(e, ev.VringStarted):
                self._sync_base(e.index)

    def _model_kick(self, index: int) -> None:
        m = self.model
        assert m is not None
        ring = m.rings[index]
        if not ring.started and ring.num and ring.addr is not None and m.regions:
            ring.started = True
            self._sync_base(index)

    def _sync_base(self, index: int) -> None:
        """A packed ring's engine reads a 16-bit base as 'used = avail' and reports the
        whole 32 bits from then on; a blk device may put in-flight requests back."""
        m = self.model
        assert m is not None and self.conn is not None
        ring = m.rings[index]
        if self.inflight_garbage:
            ring.base_known = False
        if (m.packed and self.conn.vrings[index].engine is not None
                and ring.base >> 16 == 0):
            ring.base |= (ring.base & 0xFFFF) << 16

    def _engines_changed(self) -> None:
        m = self.model
        assert m is not None
        for i, ring in enumerate(m.rings):
            if ring.started:
                self._sync_base(i)

    # -- invariants --------------------------------------------------------------------------
    def _check_fd_table(self, held: Sequence[OwnedFd]) -> None:
        now = fd_table()
        expected = {f.fd for f in held} | {f.fd for f in self.kept if not f.closed}
        missing = expected - now.keys()
        assert not missing, f"fds the session holds are not open: {sorted(missing)}"
        extra = {fd: t for fd, t in now.items()
                 if self.baseline_fds.get(fd) != t and fd not in expected}
        maps = count_our_mappings() - self.baseline_maps
        # Python < 3.13 keeps a dup of the fd inside every mmap object.
        dups = maps if sys.version_info < (3, 13) else 0
        assert all(is_memfd_target(t) for t in extra.values()) and len(extra) <= dups, (
            f"fds open that nobody owns ({maps} mappings): {extra}")

    @invariant()
    def session_matches_model(self) -> None:
        conn, m = self.conn, self.model
        if conn is None or m is None:
            return
        assert not conn.closed and conn.error is None
        assert conn.owner == m.owner
        assert conn.features == m.features
        assert conn.protocol_features == m.pf
        assert conn.status == m.status
        got_regions = sorted((r.guest_phys_addr, r.size, r.userspace_addr, r.mmap_offset)
                             for r in conn.mem.regions)
        assert got_regions == sorted(r.key() for r in m.regions), (got_regions, m.regions)
        assert conn.backend_channel is m.channel
        assert conn.log_fd is m.log_fd
        assert conn.extra_fds == []
        if m.inflight is None:
            assert conn.inflight is None
        else:
            assert conn.inflight is not None
            assert (conn.inflight.num_queues, conn.inflight.queue_size) == m.inflight
        for i, (v, r) in enumerate(zip(conn.vrings, m.rings, strict=True)):
            where = f"ring {i}"
            assert (v.num, v.started, v.enabled) == (r.num, r.started, r.enabled), (
                where, v, r)
            if r.base_known:
                assert v.base == r.base or (v.engine is not None and v.engine.base() == r.base), (
                    where, hex(v.base), hex(r.base))
            assert (v.addr is None) == (r.addr is None), where
            assert v.kick is r.kick and v.call is r.call and v.err is r.err, where
            # Ring state consistency.
            assert 0 <= v.num <= MAX_SPLIT_RING, where
            if not conn.packed:
                assert v.num & (v.num - 1) == 0 and v.base <= 0xFFFF, where
            if v.started:
                assert v.num and v.addr is not None, f"{where} started unconfigured"
                assert v.engine is not None or v.broken is not None, (
                    f"{where} started with neither an engine nor a reason it is broken")
            else:
                assert v.engine is None, f"{where} is stopped but has an engine"
            if v.engine is not None:
                assert v.engine.size == v.num, where
        held = m.held()
        assert len({id(f) for f in held}) == len(held), "one fd held twice"
        assert all(not f.closed for f in held), "the session holds a closed fd"
        stray = [f for f in self.given if not f.closed and not any(f is h for h in held)]
        assert not stray, f"fds neither held nor closed: {stray}"
        assert (conn.dirty_log is not None) == m.dirty_log
        # Writes are logged exactly while a log is mapped and VHOST_F_LOG_ALL is acked.
        logging_on = m.dirty_log and bool((m.features or 0) & VF.LOG_ALL)
        assert (conn.mem.log is not None) == logging_on
        assert conn.mem.log is None or conn.mem.log is conn.dirty_log
        nmaps = count_our_mappings() - self.baseline_maps
        want = (len(conn.mem) + (1 if conn.inflight is not None else 0)
                + (1 if conn.dirty_log is not None else 0))
        assert nmaps == want, (
            f"{nmaps} mappings for {len(conn.mem)} regions, "
            f"{'an' if conn.inflight else 'no'} inflight area and "
            f"{'a' if conn.dirty_log else 'no'} dirty log (deferred: {deferred_count()})"
            ":\n" + "\n".join(our_mappings()))
        self._check_fd_table(held)

    # -- rules: negotiation ------------------------------------------------------------------
    @rule(data=st.data(), request=st.sampled_from(
        [R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM, R.GET_MAX_MEM_SLOTS,
         R.GET_STATUS, R.SET_OWNER, R.RESET_OWNER, R.RESET_DEVICE]))
    def simple(self, data: st.DataObject, request: FrontendRequest) -> None:
        """Requests without a payload."""
        self._emit(data, request, b"", [])

    @rule(data=st.data())
    def set_protocol_features(self, data: st.DataObject) -> None:
        """What was offered, with or without REPLY_ACK, any subset; or bits never offered."""
        m = self.model
        assert m is not None
        offered = m.offered_pf
        value = data.draw(mostly(
            st.sampled_from([offered, offered, offered & ~int(PF.REPLY_ACK), 0])
            | st.integers(0, U64_MAX).map(lambda x: x & offered),
            st.sampled_from([offered | int(PF.INBAND_NOTIFICATIONS), offered | int(PF.LOG_SHMFD),
                             U64_MAX])), label="protocol features")
        self._emit(data, R.SET_PROTOCOL_FEATURES, U64.pack(value), [])

    @rule(data=st.data())
    def set_features(self, data: st.DataObject) -> None:
        """The current features again, split or packed, with or without bit 30, any subset;
        or bits never offered."""
        m = self.model
        assert m is not None
        offered = m.offered
        split = offered & ~int(VF.RING_PACKED)
        current = m.features if m.features is not None else split
        value = data.draw(mostly(
            st.sampled_from([current, current, split, offered,
                             split & ~int(VF.PROTOCOL_FEATURES),
                             offered & ~int(VF.PROTOCOL_FEATURES)])
            | st.integers(0, U64_MAX).map(lambda x: x & offered),
            st.sampled_from([offered | int(VF.LOG_ALL), split | (1 << 33), U64_MAX])),
            label="features")
        self._emit(data, R.SET_FEATURES, U64.pack(value), [])

    @rule(data=st.data())
    def status_rarp_mtu(self, data: st.DataObject) -> None:
        """SET_STATUS, SEND_RARP and NET_SET_MTU with values in and out of range."""
        request = data.draw(st.sampled_from([R.SET_STATUS, R.SEND_RARP, R.NET_SET_MTU]))
        value = data.draw(st.sampled_from([0, 1, 0xF, 0x80, 0xFF, 0x100, 67, 68, 1500, 65535,
                                           65536, U64_MAX]))
        self._emit(data, request, U64.pack(value), [])

    # -- rules: memory -------------------------------------------------------------------------
    def _region(self, data: st.DataObject, slot: int) -> tuple[P.MemoryRegion, OwnedFd]:
        """One region over a fresh fd at GPA and front-end address ``slot`` (1 MiB slots):
        mostly a memfd just big enough, sometimes not (too small, not a memfd, size 0,
        wrapping 2**64, offset or skewed)."""
        pages = data.draw(st.integers(1, 16), label="fd pages")
        fd_size = pages * PAGE
        off = data.draw(st.sampled_from([0, 0, 0, PAGE, 64, fd_size - PAGE]),
                        label="mmap_offset")
        room = fd_size - off
        size = data.draw(mostly(st.just(room) | st.integers(1, max(1, room)),
                                st.sampled_from([0, room + 1, U64_MAX - PAGE])),
                         label="memory_size")
        gpa = slot * GPA_SLOT + data.draw(st.sampled_from([0, 0, 0, PAGE]), label="gpa skew")
        uva = UVA_BASE + slot * GPA_SLOT
        if data.draw(st.sampled_from([False] * 30 + [True]), label="wrap"):
            gpa = U64_MAX - PAGE + 1
        kind = data.draw(mostly(st.just("memfd"), st.sampled_from(
            ["pipe", "eventfd", "socket", "rofile", "devnull"]), odds=15), label="fd kind")
        fd = self._give(kind, fd_size)
        return P.MemoryRegion(guest_phys_addr=gpa, memory_size=size, userspace_addr=uva,
                              mmap_offset=off), fd

    @rule(data=st.data())
    def set_mem_table(self, data: st.DataObject) -> None:
        """1 to 4 or 8 regions over fresh memfds in distinct slots (sometimes overlapping,
        0 or 9 regions)."""
        n = data.draw(mostly(st.integers(1, 4) | st.just(8), st.sampled_from([0, 9])),
                      label="nregions")
        slots = data.draw(st.permutations(range(9)), label="slots")[:n]
        if n > 1 and data.draw(st.sampled_from([False] * 15 + [True]), label="overlap"):
            slots[-1] = slots[0]
        regions, fds = [], []
        for slot in slots:
            r, fd = self._region(data, slot)
            regions.append(r)
            fds.append(fd)
        if n == 0 or n > P.MAX_MEM_TABLE_REGIONS:
            payload = struct.pack("<II", n, 0) + b"".join(r.encode() for r in regions)
            for f in fds[MAX_FDS:]:  # a front-end cannot send more than the kernel passes
                f.close()
            fds = fds[:MAX_FDS]
        else:
            payload = P.MemoryTable(regions=tuple(regions)).encode()
        self._emit(data, R.SET_MEM_TABLE, payload, fds)

    @rule(data=st.data())
    def add_mem_reg(self, data: st.DataObject) -> None:
        """A region in a free slot, or again one that is there (counted, like QEMU's
        once-per-vhost_dev ADD_MEM_REG)."""
        m = self.model
        assert m is not None
        if m.regions and data.draw(st.sampled_from([False, True]),
                                   label="same as an existing region"):
            # QEMU sends the same region once per vhost_dev: a duplicate is counted.
            old = data.draw(st.sampled_from(m.regions), label="region")
            region = P.MemoryRegion(guest_phys_addr=old.gpa, memory_size=old.size,
                                    userspace_addr=old.uva, mmap_offset=old.off)
            fd = self._give("memfd", old.off + old.size)
        else:
            used = {r.gpa // GPA_SLOT for r in m.regions}
            free = [i for i in range(12) if i not in used] or [0]
            slot = data.draw(mostly(st.sampled_from(free), st.integers(0, 11)), label="slot")
            region, fd = self._region(data, slot)
        self._emit(data, R.ADD_MEM_REG, P.SingleRegion(region=region).encode(), [fd])

    @rule(data=st.data())
    def rem_mem_reg(self, data: st.DataObject) -> None:
        """A region that is there, or one that is not; with or without a (closed) fd."""
        m = self.model
        assert m is not None
        if m.regions and data.draw(st.sampled_from([True] * 9 + [False]), label="existing"):
            old = data.draw(st.sampled_from(m.regions), label="region")
            region = P.MemoryRegion(guest_phys_addr=old.gpa, memory_size=old.size,
                                    userspace_addr=old.uva, mmap_offset=old.off)
        else:
            region, fd = self._region(data, data.draw(st.integers(0, 11), label="slot"))
            fd.close()
            del self.fds.info[id(fd)]
        fds = [self._give("memfd", PAGE)] if data.draw(st.booleans(), label="with fd") else []
        self._emit(data, R.REM_MEM_REG, P.SingleRegion(region=region).encode(), fds)

    # -- rules: rings --------------------------------------------------------------------------
    @rule(data=st.data())
    def set_vring_num(self, data: st.DataObject) -> None:
        """A ring size: a power of two mostly, or 0, 3, 1000, past 32768."""
        m = self.model
        assert m is not None
        index = data.draw(u32_index(m.nq), label="index")
        num = data.draw(RING_NUMS, label="num")
        self._emit(data, R.SET_VRING_NUM, P.VringState(index=index, num=num).encode(), [])

    @rule(data=st.data())
    def set_vring_base(self, data: st.DataObject) -> None:
        """A 16-bit base mostly, or wider ones (only packed rings take those)."""
        m = self.model
        assert m is not None
        index = data.draw(u32_index(m.nq), label="index")
        num = data.draw(BASES, label="base")
        self._emit(data, R.SET_VRING_BASE, P.VringState(index=index, num=num).encode(), [])

    @rule(data=st.data())
    def set_vring_addr(self, data: st.DataObject) -> None:
        """Ring areas inside a region mostly (sometimes running past it), outside all,
        misaligned, or with the log flag."""
        m = self.model
        assert m is not None
        index = data.draw(u32_index(m.nq), label="index")
        ring = m.rings[index] if index < m.nq else RingModel()
        n = ring.num or 256
        if m.regions and data.draw(st.sampled_from([True] * 9 + [False]), label="inside"):
            reg = data.draw(st.sampled_from(m.regions), label="region")
            fits = max(0, reg.size - 24 * n - 16)
            start = data.draw(mostly(st.integers(0, fits), st.integers(0, max(0, reg.size - 1))),
                              label="desc offset") & ~15
            desc = reg.uva + start
        else:
            desc = data.draw(st.sampled_from([0, 16, UVA_BASE, U64_MAX - 15]), label="desc")
        avail = desc + 16 * n
        used = (avail + 6 + 2 * n + 3) & ~3
        if m.packed:
            avail = (avail + 3) & ~3
        skew = data.draw(mostly(st.just((0, 0, 0)),
                                st.sampled_from([(8, 0, 0), (0, 1, 0), (0, 0, 2)]), odds=15),
                         label="misalign")
        flags = data.draw(st.sampled_from([0] * 20 + [1]), label="flags")
        addr = P.VringAddr(index=index, flags=flags, desc=(desc + skew[0]) & U64_MAX,
                           used=(used + skew[2]) & U64_MAX, avail=(avail + skew[1]) & U64_MAX,
                           log=0)
        self._emit(data, R.SET_VRING_ADDR, addr.encode(), [])

    @rule(data=st.data(), request=st.sampled_from([R.SET_VRING_KICK, R.SET_VRING_CALL,
                                                   R.SET_VRING_ERR]))
    def set_vring_fd(self, data: st.DataObject, request: FrontendRequest) -> None:
        """KICK/CALL/ERR with an eventfd or a pipe, the NOFD bit, reserved bits, or an fd
        that is no notifier (a socket, a memfd, /dev/null)."""
        m = self.model
        assert m is not None
        index = data.draw(mostly(st.integers(0, m.nq - 1), st.sampled_from([m.nq, 0xFF])),
                          label="index")
        nofd = data.draw(st.sampled_from([False, False, False, True]), label="nofd")
        value = index | (0x100 if nofd else 0)
        if data.draw(st.sampled_from([False] * 20 + [True]), label="reserved bits"):
            value |= 0x200
        kind = data.draw(mostly(st.sampled_from(["eventfd", "eventfd", "pipe"]),
                                st.sampled_from(["socket", "memfd", "devnull", "dgram"])),
                         label="fd kind")
        fds = [] if nofd else [self._give(kind)]
        self._emit(data, request, U64.pack(value), fds)

    @rule(data=st.data())
    def set_vring_enable(self, data: st.DataObject) -> None:
        """Enable or disable a ring; 2 and 0xFFFFFFFF are not booleans."""
        m = self.model
        assert m is not None
        index = data.draw(u32_index(m.nq), label="index")
        num = data.draw(mostly(st.sampled_from([0, 1, 1]), st.sampled_from([2, 0xFFFFFFFF])),
                        label="enable")
        self._emit(data, R.SET_VRING_ENABLE, P.VringState(index=index, num=num).encode(), [])

    @rule(data=st.data())
    def get_vring_base(self, data: st.DataObject) -> None:
        """Stop a ring and read its base (refused for a ring never configured)."""
        m = self.model
        assert m is not None
        index = data.draw(u32_index(m.nq), label="index")
        self._emit(data, R.GET_VRING_BASE, P.VringState(index=index, num=0).encode(), [])

    @rule(data=st.data())
    def kick(self, data: st.DataObject) -> None:
        """The shell saw a kick fd readable: BackendConnection.kick."""
        m = self.model
        assert m is not None
        self._kick(data.draw(st.integers(0, m.nq - 1), label="index"))

    def _kick(self, index: int) -> None:
        m, conn = self.model, self.conn
        assert m is not None and conn is not None
        note(f"-> kick({index})")
        events = conn.kick(index)
        was_started = m.rings[index].started
        self._model_kick(index)
        started = [e for e in events if isinstance(e, ev.VringStarted)]
        assert len(started) == (0 if was_started or not m.rings[index].started else 1)
        for e in events:
            if isinstance(e, ev.VringBroken):
                note(f"   ring {e.index} broken: {e.reason}")
        assert self._replies() == []

    @precondition(lambda self: self.model is not None and any(
        r.num and r.addr is not None for r in self.model.rings))
    @rule(data=st.data())
    def stop_and_restart_ring(self, data: st.DataObject) -> None:
        """A ring stopped and started again, as QEMU does (GET_VRING_BASE, then the base it
        got back, the same addresses, a new kick fd and a kick)."""
        m = self.model
        assert m is not None
        i = data.draw(st.sampled_from([i for i, r in enumerate(m.rings)
                                       if r.num and r.addr is not None]), label="ring")
        addr = m.rings[i].addr
        assert addr is not None
        if not self._emit(data, R.GET_VRING_BASE, P.VringState(index=i, num=0).encode(), [],
                          mutate=False):
            return
        base = m.rings[i].base
        for request, payload, nfds in (
            (R.SET_VRING_BASE, P.VringState(index=i, num=base).encode(), 0),
            (R.SET_VRING_ADDR, addr.encode(), 0),
            (R.SET_VRING_KICK, U64.pack(i), 1),
        ):
            fds = [self._give("eventfd") for _ in range(nfds)]
            if not self._emit(data, request, payload, fds, mutate=False):
                return
        self._kick(i)

    # -- rules: the rest -----------------------------------------------------------------------
    @rule(data=st.data())
    def backend_channel_and_log_fd(self, data: st.DataObject) -> None:
        """SET_BACKEND_REQ_FD (an AF_UNIX stream socket, or not) or SET_LOG_FD."""
        request = data.draw(st.sampled_from([R.SET_BACKEND_REQ_FD, R.SET_LOG_FD]))
        kind = data.draw(mostly(st.just("socket"), st.sampled_from(["dgram", "eventfd",
                                                                     "memfd"])),
                         label="fd kind")
        self._emit(data, request, b"", [self._give(kind)])

    @rule(data=st.data())
    def set_log_base(self, data: st.DataObject) -> None:
        """SET_LOG_BASE over a memfd (LOG_SHMFD) that fits or not, at an offset or not;
        size 0 or past 4 GiB, an offset past it; a read-only file, a pipe, an eventfd."""
        fd_size = data.draw(st.integers(1, 4), label="log pages") * PAGE
        off = data.draw(mostly(st.just(0), st.sampled_from([PAGE, fd_size, MAX_LOG_BYTES + 1,
                                                            U64_MAX])), label="mmap_offset")
        room = max(1, fd_size - off)
        size = data.draw(mostly(st.just(room) | st.integers(1, room),
                                st.sampled_from([0, fd_size + 1, MAX_LOG_BYTES + 1, U64_MAX])),
                         label="mmap_size")
        kind = data.draw(mostly(st.just("memfd"), st.sampled_from(["rofile", "pipe", "eventfd"])),
                         label="fd kind")
        payload = P.LogBase(mmap_size=size, mmap_offset=off).encode()
        self._emit(data, R.SET_LOG_BASE, payload, [self._give(kind, fd_size)])

    @rule(data=st.data())
    def config(self, data: st.DataObject) -> None:
        """GET_CONFIG / SET_CONFIG inside the config space, at its end, or past it."""
        m = self.model
        assert m is not None
        request = data.draw(st.sampled_from([R.GET_CONFIG, R.GET_CONFIG, R.SET_CONFIG]))
        offset = data.draw(mostly(st.sampled_from([0, 0, 4, 6, m.config_len]),
                                  st.sampled_from([m.config_len + 1, 0xFFFFFFFF])),
                           label="offset")
        size = data.draw(mostly(st.sampled_from([0, 4, 8, 12, m.config_len]),
                                st.sampled_from([256, 257])), label="size")
        cflags = data.draw(mostly(st.sampled_from([0, 1]), st.just(2)), label="config flags")
        body = bytes(min(size, 300))
        payload = struct.pack("<III", offset, size, cflags) + body
        self._emit(data, request, payload, [])

    @rule(data=st.data())
    def get_inflight_fd(self, data: st.DataObject) -> None:
        """GET_INFLIGHT_FD for our queues or the wrong number, sizes in and out of range."""
        m = self.model
        assert m is not None
        nq = data.draw(st.sampled_from([m.nq, 1, 0, m.nq + 1, 0xFFFF]), label="num_queues")
        nums = [r.num for r in m.rings if r.num]
        qs = data.draw(st.sampled_from([*nums, 256, 1, 0, 32768, 32769, 0xFFFF]),
                       label="queue_size")
        payload = P.InflightPayload(mmap_size=0, mmap_offset=0, num_queues=nq,
                                    queue_size=qs).encode()
        self._emit(data, R.GET_INFLIGHT_FD, payload, [])

    @rule(data=st.data())
    def set_inflight_fd(self, data: st.DataObject) -> None:
        """SET_INFLIGHT_FD with an area we got back from GET_INFLIGHT_FD (a reconnect), or
        a memfd of our own: zeroed, a plausible split area with requests in flight, or
        junk; and sometimes the wrong geometry, size, offset or kind of fd."""
        m = self.model
        assert m is not None
        nq = data.draw(mostly(st.integers(1, m.nq), st.sampled_from([0, m.nq + 1])),
                       label="num_queues")
        nums = [r.num for r in m.rings if r.num]
        qs = data.draw(mostly(st.sampled_from([*nums, *nums, 256, 8]),
                              st.sampled_from([0, 32769])), label="queue_size")
        geometry_ok = 1 <= nq <= 256 and 1 <= qs <= 32768
        need = inflight_area_bytes(nq, qs, m.packed) if geometry_ok else PAGE
        live = [f for f in self.kept if not f.closed]
        if live and data.draw(st.sampled_from([False, True]), label="an area we got back"):
            src = data.draw(st.sampled_from(live), label="area")
            fd = OwnedFd(os.dup(src.fd))
            info = self.fds.kind(src)
            self.fds.adopt(fd, "memfd", info.size, info.area)
            size = info.size
        else:
            size = data.draw(mostly(st.just(need), st.sampled_from([need + PAGE, need - 64])),
                             label="fd size")
            content = data.draw(st.sampled_from(["zero", "plausible", "plausible", "junk"]),
                                label="content")
            fill = b""
            if content == "plausible" and geometry_ok and not m.packed:
                fill = data.draw(plausible_split_area(nq, qs), label="area bytes")
            elif content == "junk":
                fill = data.draw(st.binary(max_size=256), label="junk")
            kind = data.draw(mostly(st.just("memfd"), st.sampled_from(["pipe", "rofile"])),
                             label="kind")
            fd = self._give(kind, max(1, size), fill)
        mmap_size = data.draw(mostly(st.just(need), st.sampled_from([size, need - 1, U64_MAX])),
                              label="mmap_size")
        mmap_offset = data.draw(mostly(st.just(0), st.sampled_from([64, U64_MAX])),
                                label="mmap_offset")
        payload = P.InflightPayload(mmap_size=mmap_size, mmap_offset=mmap_offset,
                                    num_queues=nq, queue_size=qs).encode()
        self._emit(data, R.SET_INFLIGHT_FD, payload, [fd])

    @rule(data=st.data(), what=st.sampled_from(["never-accepted", "garbage", "cut-short"]))
    def hostile(self, data: st.DataObject, what: str) -> None:
        """A request that is never accepted here (a feature never offered, no handler), any
        request code with random bytes and fds, or a message cut short by EOF."""
        if what == "never-accepted":
            request = data.draw(st.sampled_from(NEVER_ACCEPTED), label="request")
            rule_ = FRONTEND_RULES[request]
            size = rule_.payload.SIZE if rule_.payload.SIZE is not None else 16
            fds = [self._give("eventfd")] if rule_.fds is Fds.ONE else []
            self._emit(data, request, bytes(size), fds)
        elif what == "garbage":
            code: int = data.draw(st.integers(0, 50)
                                  | st.sampled_from([0x7FFFFFFF, 0xFFFFFFFF]), label="request")
            payload = data.draw(st.binary(max_size=64), label="payload")
            kinds = data.draw(st.lists(st.sampled_from(FD_KINDS), max_size=3), label="fd kinds")
            self._emit(data, code, payload, [self._give(k) for k in kinds], mutate=False)
        else:
            self._cut_short_then_eof(data)

    @rule(data=st.data())
    def two_in_one_chunk(self, data: st.DataObject) -> None:
        """Two requests in one receive_data call; the chunk's fd belongs to the second
        (a SET_VRING_CALL). The first is any simple request, valid or not."""
        m, conn = self.model, self.conn
        assert m is not None and conn is not None
        # (None of these changes what the model needs to judge the second one.)
        first_req = data.draw(st.sampled_from([R.GET_FEATURES, R.GET_STATUS, R.SET_STATUS,
                                               R.GPU_SET_SOCKET, 0]),
                              label="first")
        first_payload = U64.pack(0) if first_req == R.SET_STATUS else b""
        index = data.draw(st.integers(0, m.nq - 1), label="index")
        fd = self._give("eventfd")
        verdict1, p1 = self._predict(first_req, first_payload, [])
        verdict2, p2 = self._predict(R.SET_VRING_CALL, U64.pack(index), [fd])
        wire = frame(first_req, first_payload, 0x1) + frame(R.SET_VRING_CALL, U64.pack(index),
                                                           0x1)
        note(f"-> {request_name(first_req)} + SET_VRING_CALL({index}) in one chunk "
             f"(expect {verdict1}, {verdict2})")
        ok, events = self._receive(wire, [fd])
        replies = self._replies()
        try:
            if not ok:
                assert verdict1 != "ok" or verdict2 != "ok"
                assert fd.closed, (
                    "the second message's fd is still open after the first was refused "
                    "and the session closed")
            else:
                assert verdict1 != "error" and verdict2 != "error"
                first_replies = [r for r in replies if r[0] == first_req]
                self._apply(first_req, p1, [], first_replies, [])
                self._apply(R.SET_VRING_CALL, p2, [fd], [], events)
        finally:
            for *_r, rfds in replies:
                for f in rfds:
                    f.close()
        if not ok:
            self._died(data)

    def _cut_short_then_eof(self, data: st.DataObject) -> None:
        """A message cut short (header or payload), then the peer hangs up."""
        conn = self.conn
        assert conn is not None
        wire = frame(R.SET_VRING_NUM, P.VringState(index=0, num=256).encode(), 0x9)
        cut = data.draw(st.integers(1, len(wire) - 1), label="cut")
        fds = [self._give("eventfd")] if data.draw(st.booleans(), label="fd") else []
        note(f"-> SET_VRING_NUM cut after {cut} bytes, fds {len(fds)}, then EOF")
        ok, _ = self._receive(wire[:cut], fds)
        assert ok, "a partial message is not an error yet"
        assert conn.in_message
        ok, _ = self._receive(b"", [])
        assert not ok, "EOF inside a message must be an error"
        assert self._replies() == []
        self._died(data)

    # -- a QEMU-like handshake, so that random steps start from deep states ----------------
    def _handshake(self, data: st.DataObject, depth: str) -> None:
        """GET_FEATURES, protocol features, SET_OWNER, SET_FEATURES, a memory table and
        rings set up (and maybe started), as far as ``depth`` says; all must be accepted."""
        m = self.model
        assert m is not None
        if depth == "none":
            return
        packed = data.draw(st.sampled_from([False, False, True]), label="packed")
        reply_ack = data.draw(st.booleans(), label="REPLY_ACK")
        with_pf = data.draw(st.sampled_from([True, True, True, False]), label="bit 30")
        send = self._emit
        send(data, R.GET_FEATURES, b"", [], mutate=False)
        pf = m.offered_pf if reply_ack else m.offered_pf & ~int(PF.REPLY_ACK)
        if with_pf:
            send(data, R.GET_PROTOCOL_FEATURES, b"", [], mutate=False)
            send(data, R.SET_PROTOCOL_FEATURES, U64.pack(pf), [], mutate=False)
        send(data, R.SET_OWNER, b"", [], mutate=False)
        if depth == "owner":
            return
        features = m.offered
        if not packed:
            features &= ~int(VF.RING_PACKED)
        if not with_pf:
            features &= ~int(VF.PROTOCOL_FEATURES)
        send(data, R.SET_FEATURES, U64.pack(features), [], mutate=False)
        if depth == "features":
            return
        size = 16 * PAGE
        nregions = data.draw(st.integers(1, 3), label="regions")
        regions, fds = [], []
        for i in range(nregions):
            regions.append(P.MemoryRegion(guest_phys_addr=i * GPA_SLOT, memory_size=size,
                                          userspace_addr=UVA_BASE + i * GPA_SLOT,
                                          mmap_offset=0))
            fds.append(self._give("memfd", size))
        send(data, R.SET_MEM_TABLE, P.MemoryTable(regions=tuple(regions)).encode(), fds,
             mutate=False)
        if depth == "memory":
            return
        for i in range(data.draw(st.integers(1, m.nq), label="rings")):
            num = data.draw(st.sampled_from([8, 64, 256] + ([100] if packed else [])),
                            label="num")
            base = data.draw(st.sampled_from([0, 0, 1, num - 1]), label="base")
            desc = UVA_BASE + i * 4 * PAGE
            avail = desc + 16 * num
            used = (avail + 6 + 2 * num + 3) & ~3
            send(data, R.SET_VRING_NUM, P.VringState(index=i, num=num).encode(), [],
                 mutate=False)
            send(data, R.SET_VRING_BASE, P.VringState(index=i, num=base).encode(), [],
                 mutate=False)
            send(data, R.SET_VRING_ADDR,
                 P.VringAddr(index=i, flags=0, desc=desc, used=used, avail=avail,
                             log=0).encode(), [], mutate=False)
            send(data, R.SET_VRING_CALL, U64.pack(i), [self._give("eventfd")], mutate=False)
            send(data, R.SET_VRING_KICK, U64.pack(i), [self._give("eventfd")], mutate=False)
            if with_pf:
                send(data, R.SET_VRING_ENABLE, P.VringState(index=i, num=1).encode(), [],
                     mutate=False)
            if data.draw(st.booleans(), label="start"):
                self._kick(i)


# -- the shell machine -----------------------------------------------------------------------


class ShellMachine(RuleBasedStateMachine):
    """A real BackendSession on a real socketpair, fed random chunks (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._deadline = io_backend.MESSAGE_DEADLINE
        io_backend.MESSAGE_DEADLINE = 3600.0  # see the module docstring
        reap_deferred()
        self.before = fdcount.snapshot()
        self.fds = FdMaker()
        self.reactor: Reactor | None = None
        self.session: BackendSession | None = None
        self.peer: socket.socket | None = None
        self.kicks: list[OwnedFd] = []  # our duplicates of kick eventfds we sent
        self.ram: list[OwnedFd] = []  # our duplicates of memfds we sent as guest RAM
        self.replies = bytearray()
        self.peer_closed = False
        self.sessions = 0
        self.dialect = Dialect.CURRENT

    # -- session lifecycle ----------------------------------------------------------------
    def _open(self, data: st.DataObject) -> None:
        kind = data.draw(st.sampled_from(DEVICE_KINDS), label="device")
        dialect = data.draw(st.sampled_from([Dialect.CURRENT] * 6 + [Dialect.DRAFT_TEXT,
                                                                     Dialect.DRAFT_CODE]),
                            label="dialect")
        self.reactor = Reactor()
        ours, theirs = socket.socketpair()
        self.peer = ours
        self.peer.setblocking(False)
        self.session = BackendSession(self.reactor, theirs, make_device(kind),
                                      dialect=dialect, name=f"shell-{kind}")
        self.dialect = dialect
        self.replies = bytearray()
        self.peer_closed = False
        self.sessions += 1
        note(f"== shell session {self.sessions}: {kind}, {dialect.value}")
        if dialect is Dialect.CURRENT and data.draw(st.sampled_from([True, True, True, False]),
                                                    label="handshake"):
            self._handshake(data)

    def _close(self) -> None:
        """The peer goes away: the session must close and leave nothing behind."""
        assert self.reactor is not None and self.session is not None and self.peer is not None
        if not self.peer_closed:
            self.peer.close()
            self.peer_closed = True
            self._pump()
        assert self.session.closed, "the session outlived its peer"
        self._check_session()
        self.reactor.close()
        for f in self.kicks + self.ram:
            f.close()
        self.fds.close_unsent([])
        self.kicks, self.ram = [], []
        self.session = None
        self.reactor = None
        self.peer = None
        reap_deferred()
        diff = fdcount.snapshot().diff(self.before, maps_slack=64)
        if diff:
            # Say whether a reference cycle still held it (the garbage collector frees it)
            # or it is gone for good.
            settled = self.before.settled_diff(maps_slack=64)
            raise AssertionError(
                f"a closed session left resources behind: {diff} (deferred unmaps: "
                f"{deferred_count()}); after a garbage collection: {settled or 'nothing'}")

    def _next_if_closed(self, data: st.DataObject) -> None:
        """After a violation the session is closed: check that, then a new peer comes."""
        assert self.session is not None
        if self.session.closed or self.peer_closed:
            note(f"   session closed: {self.session.close_reason}")
            event("shell session closed: "
                  + " ".join(str(self.session.close_reason).split(":")[:2])[:60])
            self._close()
            self._open(data)

    @initialize(data=st.data())
    def start(self, data: st.DataObject) -> None:
        self._open(data)

    def teardown(self) -> None:
        try:
            if self.session is not None:
                self._close()
        finally:
            io_backend.MESSAGE_DEADLINE = self._deadline

    # -- I/O --------------------------------------------------------------------------------
    def _check_session(self) -> None:
        assert self.reactor is not None and self.session is not None
        assert self.reactor.errors == [], f"raised into the reactor: {self.reactor.errors!r}"
        bad = [e for e in self.session.events
               if isinstance(e, ev.VringBroken) and "device error" in e.reason]
        assert not bad, f"a device raised instead of reporting a guest fault: {bad}"
        if self.session.closed:
            reason = self.session.close_reason or ""
            assert reason.startswith(("protocol violation", "receive failed",
                                      "front-end closed")), reason

    def _pump(self) -> None:
        """Run the reactor until it goes idle (bounded: a pipe at EOF stays readable), then
        read every reply: each whole, flags 0x5, fds closed."""
        assert self.reactor is not None and self.peer is not None
        for _ in range(64):
            if not self.reactor.run_once(0):
                break
        if self.peer_closed:
            return
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.peer, 65536, MAX_FDS)
            except BlockingIOError:
                break
            except ConnectionResetError:
                data, fds = b"", []
            for f in fds:
                os.close(f)
            if not data:
                break
            self.replies += data
        # Replies are small: the socket buffer never holds half of one.
        for _r, flags, _p in parse(bytes(self.replies)):
            assert flags == 0x5, f"reply flags {flags:#x}"
        self.replies = bytearray()

    def _send(self, chunks: Sequence[tuple[bytes, list[OwnedFd]]]) -> None:
        """Send each chunk with one sendmsg (its fds attached), running the reactor after
        each. Our copies of the fds are closed once sent (the kernel holds them)."""
        assert self.peer is not None and self.session is not None
        for k, (data, fds) in enumerate(chunks):
            if self.session.closed or self.peer_closed:
                for _d, rest in chunks[k:]:
                    for f in rest:
                        f.close()
                break
            note(f"-> {data.hex()} fds={[self.fds.kind(f).kind for f in fds]}")
            try:
                if fds:
                    socket.send_fds(self.peer, [data], [f.fd for f in fds])
                else:
                    self.peer.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                pass
            except BlockingIOError as e:  # pragma: no cover - small writes never block
                raise AssertionError("the session stopped reading") from e
            finally:
                for f in fds:
                    f.close()
            self._pump()
        self._check_session()

    @invariant()
    def nothing_raised(self) -> None:
        if self.session is not None:
            self._check_session()

    # -- rules --------------------------------------------------------------------------------
    @rule(data=st.data())
    def reconnect(self, data: st.DataObject) -> None:
        note("-- peer goes away")
        self._close()
        self._open(data)

    def _handshake(self, data: st.DataObject) -> None:
        """A QEMU-like handshake with guest RAM and rings, each message one sendmsg."""
        assert self.session is not None
        conn = self.session.conn
        features = conn.offered_features
        if not data.draw(st.booleans(), label="packed"):
            features &= ~int(VF.RING_PACKED)
        pf = conn.offered_protocol_features
        msgs: list[tuple[bytes, list[OwnedFd]]] = [
            (frame(R.GET_FEATURES, b"", 0x1), []),
            (frame(R.GET_PROTOCOL_FEATURES, b"", 0x1), []),
            (frame(R.SET_PROTOCOL_FEATURES, U64.pack(pf), 0x1), []),
            (frame(R.SET_OWNER, b"", 0x1), []),
            (frame(R.SET_FEATURES, U64.pack(features), 0x9), []),
        ]
        size = 16 * PAGE
        ram = self.fds.make("memfd", size)
        self.ram.append(OwnedFd(os.dup(ram.fd)))
        table = P.MemoryTable(regions=(P.MemoryRegion(guest_phys_addr=0, memory_size=size,
                                                      userspace_addr=UVA_BASE, mmap_offset=0),))
        msgs.append((frame(R.SET_MEM_TABLE, table.encode(), 0x9), [ram]))
        for i in range(data.draw(st.integers(0, conn.device.num_queues), label="rings")):
            num = data.draw(st.sampled_from([8, 64]), label="num")
            desc = UVA_BASE + i * 2 * PAGE
            avail = desc + 16 * num
            used = (avail + 6 + 2 * num + 3) & ~3
            call = self.fds.make("eventfd")
            kick = self.fds.make("eventfd")
            self.kicks.append(OwnedFd(os.dup(kick.fd)))
            msgs += [
                (frame(R.SET_VRING_NUM, P.VringState(index=i, num=num).encode(), 0x1), []),
                (frame(R.SET_VRING_BASE, P.VringState(index=i, num=0).encode(), 0x1), []),
                (frame(R.SET_VRING_ADDR, P.VringAddr(index=i, flags=0, desc=desc, used=used,
                                                     avail=avail, log=0).encode(), 0x9), []),
                (frame(R.SET_VRING_CALL, U64.pack(i), 0x9), [call]),
                (frame(R.SET_VRING_KICK, U64.pack(i), 0x9), [kick]),
                (frame(R.SET_VRING_ENABLE, P.VringState(index=i, num=1).encode(), 0x9), []),
            ]
        self._send(msgs)
        self._next_if_closed(data)

    def _message(self, data: st.DataObject, nq: int) -> tuple[bytes, list[str]]:
        """One framed message and the kinds of fds it wants: a request that a handshaken
        session takes, a random one, or a header promising more than comes."""
        kind = data.draw(st.sampled_from(["good"] * 6 + ["random", "random", "header"]),
                         label="message kind")
        if kind == "good":
            i = data.draw(st.integers(0, nq - 1), label="ring")
            good: tuple[int, bytes, list[str]] = data.draw(st.sampled_from([
                (R.GET_FEATURES, b"", []),
                (R.GET_PROTOCOL_FEATURES, b"", []),
                (R.GET_QUEUE_NUM, b"", []),
                (R.GET_MAX_MEM_SLOTS, b"", []),
                (R.GET_STATUS, b"", []),
                (R.SET_STATUS, U64.pack(0xF), []),
                (R.SET_VRING_ENABLE, P.VringState(index=i, num=0).encode(), []),
                (R.SET_VRING_ENABLE, P.VringState(index=i, num=1).encode(), []),
                (R.SET_VRING_CALL, U64.pack(i), ["eventfd"]),
                (R.SET_VRING_ERR, U64.pack(i), ["eventfd"]),
                (R.SET_VRING_ERR, U64.pack(i | 0x100), []),
                (R.GET_CONFIG, P.ConfigPayload(offset=0, size=8, flags=0,
                                               data=bytes(8)).encode(), []),
                (R.SEND_RARP, U64.pack(0x0100_5E00_0001), []),
                (R.NET_SET_MTU, U64.pack(1500), []),
                (R.SET_BACKEND_REQ_FD, b"", ["socket"]),
                (R.SET_LOG_FD, b"", ["eventfd"]),
                (R.SET_LOG_BASE, P.LogBase(mmap_size=PAGE, mmap_offset=0).encode(), ["memfd"]),
            ]), label="request")
            request, payload, fds = good
            if self.dialect is not Dialect.CURRENT and data.draw(st.booleans(), label="ECHO"):
                # The draft's liveness probe, in its numbering (text: 1, code: 16).
                echo = 1 if self.dialect is Dialect.DRAFT_TEXT else 16
                request, payload, fds = echo, b"", []
            # The draft has no NEED_REPLY: a draft front-end sets it only by mistake.
            flags = data.draw(st.sampled_from([0x1, 0x9] if self.dialect is Dialect.CURRENT
                                              else [0x1, 0x1, 0x1, 0x9]), label="flags")
            return frame(request, payload, flags), fds
        code: int = data.draw(st.sampled_from(list(FrontendRequest)) | st.integers(0, 60),
                              label="request")
        flags = data.draw(st.sampled_from([0x1, 0x1, 0x9, 0x9, 0x5, 0x0, 0x21]), label="flags")
        if kind == "header":
            size = data.draw(st.sampled_from([0, 8, 40, MAX_PAYLOAD, MAX_PAYLOAD + 1,
                                              0xFFFFFFFF]), label="size")
            return HEADER.pack(code, flags, size), []
        payload = data.draw(st.one_of(
            st.binary(max_size=48),
            st.builds(lambda i, n: P.VringState(index=i, num=n).encode(),
                      u32_index(nq), RING_NUMS),
            st.builds(U64.pack, st.integers(0, nq) | st.just(0x100)),
        ), label="payload")
        kinds = data.draw(st.lists(st.sampled_from(FD_KINDS), max_size=2), label="fds")
        return frame(code, payload, flags), kinds

    @rule(data=st.data())
    def send_stream(self, data: st.DataObject) -> None:
        """One to three messages (and maybe junk) as one byte stream, cut anywhere; each
        message's fds on the piece its first byte is in, or fds on any piece."""
        assert self.session is not None
        nq = self.session.conn.device.num_queues
        stream = b""
        starts: list[tuple[int, list[str]]] = []
        for _ in range(data.draw(st.integers(1, 3), label="messages")):
            if data.draw(st.sampled_from([False] * 9 + [True]), label="junk"):
                stream += data.draw(st.binary(min_size=1, max_size=40), label="junk bytes")
                continue
            msg, kinds = self._message(data, nq)
            starts.append((len(stream), kinds))
            stream += msg
        cuts = sorted({c for c in data.draw(st.lists(st.integers(1, max(1, len(stream) - 1)),
                                                     max_size=4), label="cuts")
                       if 0 < c < len(stream)})
        bounds = list(zip([0, *cuts], [*cuts, len(stream)], strict=True))
        kinds_per_piece: list[list[str]] = [[] for _ in bounds]
        if data.draw(st.sampled_from([True] * 4 + [False]), label="fds with their message"):
            for start, kinds in starts:
                k = next(j for j, (a, b) in enumerate(bounds) if a <= start < b)
                kinds_per_piece[k] += kinds
        else:
            for k in range(len(bounds)):
                kinds_per_piece[k] = data.draw(
                    st.lists(st.sampled_from(FD_KINDS), max_size=10), label="fds")
        chunks = [(stream[a:b], [self.fds.make(kind) for kind in kinds])
                  for (a, b), kinds in zip(bounds, kinds_per_piece, strict=True)]
        self._send(chunks)
        self._next_if_closed(data)

    @precondition(lambda self: bool(self.kicks))
    @rule(data=st.data())
    def kick(self, data: st.DataObject) -> None:
        """Kick a ring through the eventfd we gave the session."""
        fd = data.draw(st.sampled_from(self.kicks), label="kick fd")
        note(f"-> kick fd {fd.fd}")
        with contextlib.suppress(BlockingIOError):
            os.write(fd.fd, U64.pack(1))
        self._pump()
        self._check_session()
        self._next_if_closed(data)

    @precondition(lambda self: bool(self.ram))
    @rule(data=st.data())
    def scribble(self, data: st.DataObject) -> None:
        """The guest writes junk anywhere in its RAM (rings included), then kicks them all."""
        fd = data.draw(st.sampled_from(self.ram), label="ram")
        size = os.fstat(fd.fd).st_size
        off = data.draw(st.integers(0, size - 1), label="offset")
        junk = data.draw(st.binary(min_size=1, max_size=64), label="junk")
        note(f"-> guest writes {junk.hex()} at {off:#x}")
        os.pwrite(fd.fd, junk[: size - off], off)
        for k in self.kicks:
            with contextlib.suppress(BlockingIOError):
                os.write(k.fd, U64.pack(1))
        self._pump()
        self._check_session()
        self._next_if_closed(data)

    @rule(data=st.data(), how=st.sampled_from(["shutdown", "close"]))
    def hang_up(self, data: st.DataObject, how: str) -> None:
        """The peer half-closes or closes: the session closes at once."""
        assert self.peer is not None and self.session is not None
        note(f"-> peer {how}")
        if how == "shutdown":
            self.peer.shutdown(socket.SHUT_WR)
        else:
            self.peer.close()
            self.peer_closed = True
        self._pump()
        assert self.session.closed, "the session did not close when its peer hung up"
        self._next_if_closed(data)


# -- the tests ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _quiet_logs() -> Iterator[None]:
    """Protocol violations are logged as warnings by design; thousands of them only slow
    the run down (a failure's notes say what was refused and why)."""
    logger = logging.getLogger("vhostuser")
    old = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(old)


TestBackendCoreStateful = CoreMachine.TestCase
TestBackendCoreStateful.settings = SETTINGS

TestBackendShellStateful = ShellMachine.TestCase
TestBackendShellStateful.settings = SETTINGS
