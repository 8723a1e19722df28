"""Data-plane checks: memory (MEM), rings (RING), descriptor chains (DESC), the net and blk
data paths (NET, BLK), inflight recovery (IF), dirty logging (DL), reconnection (RC) and
survival (SURV).

Each check drives the device through :class:`~vhostuser.testing.rig.Rig`: guest RAM in
memfds, split rings laid out by hand, frames on the transmit ring (net) or requests on the
request queue (blk), and looks at what the device wrote back.
"""

from __future__ import annotations

import mmap
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import TypeVar

from ..errors import MessageTimeoutError, PeerClosedError, RemoteProtocolError, VhostUserError
from ..io.fdpass import OwnedFd
from ..protocol import payloads as P
from ..protocol.enums import BlkFeature, FrontendRequest, NetFeature, ProtocolFeature
from ..protocol.enums import VirtioFeature as VF
from ..virtio.blk import (
    DWZ_SEGMENT,
    REQ_HEADER,
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
)
from ..virtio.net import NET_HDR_MRG
from ..virtq import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE
from .control import Case, run_cases
from .outcome import expect, fail, skip
from .registry import Ctx, check
from .rig import DESC, VQ, Rig, Session, eth_frame
from .wire import FLAG_NEED_REPLY, FLAG_VERSION, U64, Verdict, judge, message, verdict_text

R = FrontendRequest
PF = ProtocolFeature
NF = NetFeature
BF = BlkFeature
SPEC = "vhost-user.rst"
VIRTIO = "virtio 1.2"


def data_ring(rig: Rig) -> VQ:
    """The ring the checks put work on: net TX (1), blk request queue 0."""
    return rig.vqs[1 if rig.s.device == "net" else 0]


def _settle(seconds: float = 0.3) -> None:
    time.sleep(seconds)


# -- MEM: memory table and slots -------------------------------------------------------------


@check("MEM-01", "SET_MEM_TABLE with 8 regions (the most it carries), each its own memfd with "
       "gaps between, is accepted and the device reads and writes buffers in all of them",
       f"{SPEC}: SET_MEM_TABLE; Memory region description")
def mem_eight(ctx: Ctx) -> None:
    s = ctx.session(remove_pf=int(PF.CONFIGURE_MEM_SLOTS))
    regions = [(0, 2 << 20, 0, 0)] + [(0x1000_0000 + k * 0x0200_0000, 1 << 20, k, 0)
                                      for k in range(1, 8)]
    rig = ctx.rig(s, rams=[2 << 20] + [1 << 20] * 7, regions=regions)
    rig.start()
    rig.exercise(14)


@check("MEM-02", "regions at non-zero offsets of one memfd (mmap_offset) are mapped from "
       "their offset: the device finds buffers placed there",
       f"{SPEC}: Memory region description (mmap_offset)")
def mem_offset(ctx: Ctx) -> None:
    s = ctx.session()
    regions = [(0, 2 << 20, 0, 0), (0x4000_0000, 2 << 20, 0, 3 << 20),
               (0x8000_0000, 1 << 20, 0, 6 << 20)]
    rig = ctx.rig(s, rams=[8 << 20], regions=regions)
    rig.start()
    rig.exercise(6)


@check("MEM-03", "guest memory can change under stopped rings: a region unplugged and a new "
       "one (another memfd, other addresses) plugged in, by a new table or REM/ADD_MEM_REG, "
       "is used from then on", f"{SPEC}: SET_MEM_TABLE (replaces the table), REM_MEM_REG, "
       "ADD_MEM_REG")
def mem_replace(ctx: Ctx) -> None:
    s = ctx.session()
    rig = ctx.rig(s, rams=[2 << 20, 4 << 20],
                  regions=[(0, 2 << 20, 0, 0), (0x4000_0000, 4 << 20, 1, 0)])
    rig.start(rx_buffers=0)
    rig.exercise(2, seed=1)
    bases = {i: rig.stop(i) for i in rig.default_rings()}
    rig.move_region(0x4000_0000, 0x8000_0000)
    for i, base in bases.items():
        rig.vring(i, base=base, resume=True)
    rig.driver_ok()
    rig.exercise(2, seed=2)


@check("MEM-04", "ADD_MEM_REG fills every slot GET_MAX_MEM_SLOTS announces, one more is "
       "refused, REM_MEM_REG frees one, and removing a region never added is refused",
       f"{SPEC}: GET_MAX_MEM_SLOTS, ADD_MEM_REG, REM_MEM_REG", timeout=120)
def mem_slots(ctx: Ctx) -> None:
    ctx.require_pf(PF.CONFIGURE_MEM_SLOTS)
    s = ctx.session()
    slots = s.max_slots or 0
    expect(slots >= 1, f"GET_MAX_MEM_SLOTS answered {slots}")

    def region(i: int) -> P.SingleRegion:
        return P.SingleRegion(region=P.MemoryRegion(
            guest_phys_addr=0x1_0000_0000 + i * 0x20_0000, memory_size=4096,
            userspace_addr=0x7E00_0000_0000 + i * 0x20_0000, mmap_offset=0))

    for i in range(slots):
        ctx.check_time()
        s.fe.send(R.ADD_MEM_REG, region(i), [ctx.memfd(4096)])
        ctx.close_fds()
    s.sync()
    flags = FLAG_VERSION | FLAG_NEED_REPLY if s.reply_ack else FLAG_VERSION
    verdict, detail = judge(s.wire, message(R.ADD_MEM_REG, region(slots).encode(), flags=flags),
                            [ctx.memfd(4096)], need_reply=s.reply_ack)
    expect(verdict.refused, f"ADD_MEM_REG number {slots + 1} of {slots} slots: "
           + verdict_text(verdict, detail))
    ctx.drop(s)
    s2 = ctx.session()
    s2.fe.send(R.ADD_MEM_REG, region(0), [ctx.memfd(4096)])
    s2.fe.send(R.REM_MEM_REG, region(0))
    s2.sync()
    verdict, detail = judge(s2.wire, message(R.REM_MEM_REG, region(7).encode(),
                                             flags=FLAG_VERSION | FLAG_NEED_REPLY
                                             if s2.reply_ack else FLAG_VERSION),
                            need_reply=s2.reply_ack)
    expect(verdict.refused, f"REM_MEM_REG of a region never added: {verdict_text(verdict, detail)}")
    ctx.notes.append(f"{slots} slots")


@check("MEM-05", "a region added with ADD_MEM_REG while the device runs is used at once "
       "(memory hot-plug)", f"{SPEC}: ADD_MEM_REG")
def mem_hotplug(ctx: Ctx) -> None:
    ctx.require_pf(PF.CONFIGURE_MEM_SLOTS)
    rig = ctx.started()
    rig.exercise(2, seed=1)
    rig.add_region(0x2_0000_0000, 2 << 20)
    rig.only_region(0x2_0000_0000)
    rig.exercise(4, seed=2)


def _table_case(name: str, regions: list[P.MemoryRegion], make_fds: Callable[[Ctx], list[int]],
                nregions: int | None = None) -> Case:
    def build(ctx: Ctx, s: Session, rig: Rig | None, flags: int) -> tuple[bytes, list[int]]:
        body = P.MemoryTable(regions=tuple(regions)).encode() if regions else b""
        if nregions is not None:
            body = struct.pack("<II", nregions, 0) + body[8:]
        return message(R.SET_MEM_TABLE, body, flags=flags), make_fds(ctx)
    return Case(name, "features", build, remove_pf=int(PF.CONFIGURE_MEM_SLOTS))


def _r(gpa: int = 0, size: int = 1 << 20, uva: int = 0x7F00_0000_0000, off: int = 0
       ) -> P.MemoryRegion:
    return P.MemoryRegion(guest_phys_addr=gpa, memory_size=size, userspace_addr=uva,
                          mmap_offset=off)


@check("MEM-06", "hostile memory tables are refused: 0, 9 and 0xffffffff regions, a region "
       "of size 0, addresses or offsets wrapping 2^64, a region past its fd's end, an fd "
       "that cannot be mapped (pipe, eventfd, read-only file)",
       "docs/security.md: Memory table; vhost-user.rst: SET_MEM_TABLE", timeout=120)
def mem_hostile(ctx: Ctx) -> None:
    nine = [_r(gpa=i << 20, uva=0x7F00_0000_0000 + (i << 20)) for i in range(9)]
    cases = [
        _table_case("0 regions", [], lambda c: [], nregions=0),
        Case("9 regions", "features",
             lambda c, s, rig, f: (message(R.SET_MEM_TABLE, struct.pack("<II", 9, 0)
                                           + b"".join(r.encode() for r in nine), flags=f),
                                   [c.memfd() for _ in range(8)]),
             remove_pf=int(PF.CONFIGURE_MEM_SLOTS)),
        _table_case("0xffffffff regions", [], lambda c: [], nregions=0xFFFF_FFFF),
        _table_case("region of size 0", [_r(size=0)], lambda c: [c.memfd()]),
        _table_case("guest address wraps 2^64", [_r(gpa=2**64 - 4096, size=8192)],
                    lambda c: [c.memfd()]),
        _table_case("user address wraps 2^64", [_r(uva=2**64 - 4096, size=8192)],
                    lambda c: [c.memfd()]),
        _table_case("mmap_offset wraps 2^64", [_r(off=2**64 - 4096, size=8192)],
                    lambda c: [c.memfd()]),
        _table_case("region past the end of its fd", [_r(size=8192, off=4096)],
                    lambda c: [c.memfd(8192)]),
        _table_case("region in a pipe", [_r(size=4096)], lambda c: [c.pipe()]),
        _table_case("region in an eventfd", [_r(size=4096)], lambda c: [c.eventfd()]),
        _table_case("region in a read-only file", [_r()], lambda c: [c.readonly_file()]),
    ]
    run_cases(ctx, cases, "hostile memory tables")


# -- RING: ring set-up, bases, notifications ---------------------------------------------------


@check("RING-01", "GET_VRING_BASE returns the base SET_VRING_BASE set when nothing was "
       "processed, and stops the ring", f"{SPEC}: SET_VRING_BASE, GET_VRING_BASE")
def ring_base(ctx: Ctx) -> None:
    rig = ctx.started(base=5, rx=0)
    got = {i: rig.stop(i) for i in rig.default_rings()}
    expect(all(v == 5 for v in got.values()),
           "GET_VRING_BASE answered " + ", ".join(f"ring {i}: {v}" for i, v in got.items())
           + " after SET_VRING_BASE 5 and no buffers")


@check("RING-02", "a ring set up at base 0xfff8 is served across the 16-bit wrap of its "
       "indices; GET_VRING_BASE then returns the next index to process",
       f"{SPEC}: SET_VRING_BASE, GET_VRING_BASE; {VIRTIO} §2.7.6 (free-running indices)")
def ring_wrap(ctx: Ctx) -> None:
    rig = ctx.started(base=0xFFF8)
    rig.exercise(8)
    vq = data_ring(rig)
    base = rig.stop(vq.index)
    expect(base == vq.next_avail, f"GET_VRING_BASE {vq.index} answered {base}, the next "
           f"index is {vq.next_avail}")


@check("RING-03", "a ring stopped with GET_VRING_BASE and set up again at that base resumes: "
       "new buffers are served, old ones not again",
       f"{SPEC}: Starting and stopping rings; GET_VRING_BASE")
def ring_resume(ctx: Ctx) -> None:
    rig = ctx.started()
    rig.exercise(4, seed=1)
    bases = {i: rig.stop(i) for i in rig.default_rings()}
    vq = data_ring(rig)
    expect(bases[vq.index] == vq.next_avail,
           f"GET_VRING_BASE {vq.index} answered {bases[vq.index]}, {vq.next_avail} buffers "
           "were used")
    for i, base in bases.items():
        rig.vring(i, base=base, resume=True)
    rig.driver_ok()
    rig.exercise(4, seed=2)
    _settle(0.2)
    extra = vq.reap()
    expect(not extra, f"ring {vq.index} returned buffers again after the resume: {extra}")


@check("RING-04", "without VHOST_USER_F_PROTOCOL_FEATURES acked the rings run at once, "
       "without SET_VRING_ENABLE", f"{SPEC}: Ring states (\"If ... not negotiated, the ring "
       "starts directly in the enabled state\")")
def ring_legacy(ctx: Ctx) -> None:
    s = ctx.session(legacy=True)
    rig = ctx.rig(s)
    rig.start()
    rig.exercise(4)


@check("RING-05", "a ring disabled with SET_VRING_ENABLE 0 and enabled again serves what "
       "was made available meanwhile", f"{SPEC}: SET_VRING_ENABLE; Ring states")
def ring_disable(ctx: Ctx) -> None:
    ctx.require_feature(int(VF.PROTOCOL_FEATURES), "VHOST_USER_F_PROTOCOL_FEATURES")
    rig = ctx.started()
    vq = data_ring(rig)
    rig.s.fe.send(R.SET_VRING_ENABLE, P.VringState(index=vq.index, num=0))
    if rig.s.device == "net":
        heads = [vq.add(rig.tx_chain(rig.frame(k))) for k in range(4)]
        vq.publish()
    else:
        reqs = [rig.blk_request(vq, VIRTIO_BLK_T_IN, 8 * k, length=4096, publish=False)
                for k in range(4)]
        heads = [r.head for r in reqs]
        vq.publish()
    vq.kick()
    rig.s.fe.send(R.SET_VRING_ENABLE, P.VringState(index=vq.index, num=1))
    rig.s.sync()
    vq.kick()
    rig.expect_used(vq, heads, "buffers made available while the ring was disabled")


@check("RING-06", "the device signals the call eventfd after using buffers, and not while "
       "the driver sets VRING_AVAIL_F_NO_INTERRUPT (no EVENT_IDX)",
       f"{VIRTIO} §2.7.7 (used buffer notification suppression); {SPEC}: SET_VRING_CALL")
def ring_calls(ctx: Ctx) -> None:
    rig = ctx.started()
    vq = data_ring(rig)
    rig.exercise(2, seed=1)
    _settle(0.1)
    vq.drain_calls()
    expect(vq.calls > 0, f"ring {vq.index}: buffers were used and no call came")
    vq.set_no_interrupt(True)
    _settle(0.1)
    vq.drain_calls()
    before = vq.calls
    rig.exercise(2, seed=2)
    _settle(0.2)
    vq.drain_calls()
    expect(vq.calls == before, f"ring {vq.index}: {vq.calls - before} calls while "
           "VRING_AVAIL_F_NO_INTERRUPT was set")


@check("RING-07", "with EVENT_IDX the device calls when used.idx passes used_event, and not "
       "before", f"{VIRTIO} §2.7.7.2 (used_event); §2.7.10")
def ring_event_idx(ctx: Ctx) -> None:
    ctx.require_feature(int(VF.RING_EVENT_IDX), "VIRTIO_F_EVENT_IDX")
    rig = ctx.started(event_idx=True)
    vq = data_ring(rig)
    vq.set_used_event(vq.last_used)
    rig.exercise(2, seed=1)
    _settle(0.1)
    vq.drain_calls()
    expect(vq.calls > 0, f"ring {vq.index}: used_event {vq.last_used} was passed, no call came")
    vq.set_used_event(vq.last_used + 0x4000)
    _settle(0.1)
    vq.drain_calls()
    before = vq.calls
    rig.exercise(2, seed=2)
    _settle(0.2)
    vq.drain_calls()
    expect(vq.calls == before, f"ring {vq.index}: {vq.calls - before} calls although "
           "used_event was far ahead")


@check("RING-08", "packed rings (when offered) carry frames or requests both ways",
       f"{VIRTIO} §2.8 (packed virtqueues); {SPEC}: SET_VRING_BASE (packed)")
def ring_packed(ctx: Ctx) -> None:
    ctx.require_feature(int(VF.RING_PACKED), "VIRTIO_F_RING_PACKED")
    path = ctx.backend.socket_path
    if ctx.device == "net":
        from ..frontends.net import VirtioNetFrontend

        nic = _retry_busy(ctx, lambda: VirtioNetFrontend.connect(
            path, packed=True, reconnect=False, queue_size=64, timeout=ctx.timeout))
        with nic:
            frames = [eth_frame(k, 128) for k in range(32)]
            sent = nic.send_all(frames, timeout=ctx.timeout)
            expect(sent == len(frames), f"{sent} of {len(frames)} frames queued")
            deadline = time.monotonic() + ctx.timeout
            while nic.tx_pending() and time.monotonic() < deadline:
                nic.wait(0.05)
            expect(nic.tx_pending() == 0, f"{nic.tx_pending()} transmit buffers never used")
        return
    from ..frontends.blk import VirtioBlkFrontend

    disk = _retry_busy(ctx, lambda: VirtioBlkFrontend(
        path, packed=True, reconnect=False, queue_size=64, depth=16, inflight=False,
        timeout=ctx.timeout, max_io=1 << 16))
    with disk:
        data = bytes(range(256)) * 64
        if disk.read_only:
            disk.read(0, len(data))
        else:
            disk.write(0, data)
            expect(disk.read(0, len(data)) == data, "data read back differ over packed rings")


T = TypeVar("T")


def _retry_busy(ctx: Ctx, make: Callable[[], T]) -> T:
    """``make()``, again while the back-end turns the connection away at once (busy with
    the previous one), until the timeout.

    Raises:
        What ``make`` raises, once the time is up.
    """
    deadline = time.monotonic() + ctx.timeout
    while True:
        try:
            return make()
        except (PeerClosedError, RemoteProtocolError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@check("RING-09", "a bad ring set-up is refused: sizes 0, 3 (split), 32769 and 65536; ring "
       "addresses outside guest memory or misaligned (at SET_VRING_ADDR, KICK or ENABLE)",
       f"{SPEC}: SET_VRING_NUM, SET_VRING_ADDR; {VIRTIO} §2.7 (alignment); docs/security.md: Rings",
       timeout=120)
def ring_bad_setup(ctx: Ctx) -> None:
    def size_case(num: int) -> Case:
        return Case(f"SET_VRING_NUM {num}", "memory",
                    lambda c, s, rig, f: (message(R.SET_VRING_NUM, struct.pack("<II", 0, num),
                                                  flags=f), []))
    run_cases(ctx, [size_case(n) for n in (0, 3, 32769, 65536)], "bad ring sizes")
    bad: list[str] = []
    for label, shift in (("outside guest memory", 1 << 40), ("misaligned", 1)):
        with ctx.sub(f"ring addresses {label}"):
            s = ctx.session()
            rig = ctx.rig(s)
            rig.share()
            vq = VQ(rig.mem, 0, rig.queue_size, 0)
            flags = FLAG_VERSION | FLAG_NEED_REPLY if s.reply_ack else FLAG_VERSION
            s.fe.send(R.SET_VRING_NUM, P.VringState(index=0, num=rig.queue_size))
            s.fe.send(R.SET_VRING_BASE, P.VringState(index=0, num=0))
            addr = P.VringAddr(index=0, flags=0, desc=rig.mem.uva(vq.desc_gpa) + shift,
                               used=rig.mem.uva(vq.used_gpa) + shift,
                               avail=rig.mem.uva(vq.avail_gpa) + shift, log=0)
            steps: list[tuple[bytes, list[int]]] = [
                (message(R.SET_VRING_ADDR, addr.encode(), flags=flags), []),
                (message(R.SET_VRING_CALL, U64.pack(0), flags=flags), [vq.call_fd.fd]),
                (message(R.SET_VRING_KICK, U64.pack(0), flags=flags), [vq.kick_fd.fd]),
            ]
            if s.features & VF.PROTOCOL_FEATURES:
                steps.append((message(R.SET_VRING_ENABLE, struct.pack("<II", 0, 1),
                                      flags=flags), []))
            verdict, detail = Verdict.ACK, ""
            for data, fds in steps:
                verdict, detail = judge(s.wire, data, fds, need_reply=s.reply_ack)
                if verdict.refused or verdict is Verdict.SILENT:
                    break
            vq.close()
            if not verdict.refused:
                bad.append(f"ring addresses {label}: {verdict_text(verdict, detail)}")
            ctx.drop(s)
    expect(not bad, "; ".join(bad))


# -- DESC: descriptor chains ----------------------------------------------------------------


def _blk_rw(rig: Rig, vq: VQ, layout: str, seed: int, *, indirect: bool = False,
            nbytes: int = 4096, sector: int = 64) -> None:
    if rig.s.features & BF.RO:
        r = rig.blk_io(vq, VIRTIO_BLK_T_IN, sector, length=nbytes, layout=layout,
                       indirect=indirect)
        expect(r.status == VIRTIO_BLK_S_OK, f"{layout} read: status {r.status}")
        return
    data = rig.pattern(seed, nbytes)
    w = rig.blk_io(vq, VIRTIO_BLK_T_OUT, sector, data=data, layout=layout, indirect=indirect)
    expect(w.status == VIRTIO_BLK_S_OK, f"{layout} write of {nbytes} bytes: status {w.status}")
    r = rig.blk_io(vq, VIRTIO_BLK_T_IN, sector, length=nbytes, layout=layout, indirect=indirect)
    expect(r.status == VIRTIO_BLK_S_OK, f"{layout} read of {nbytes} bytes: status {r.status}")
    expect(rig.mem.read(r.data_gpa, nbytes) == data,
           f"{layout} read-back of {nbytes} bytes differs from what was written")


@check("DESC-01", "chains of any layout are served: net header and frame apart or the "
       "frame in pieces; blk data in 512-byte pieces, header with data, data with status",
       f"{VIRTIO} §2.7.4 (message framing), §5.1.6, §5.2.6")
def desc_layouts(ctx: Ctx) -> None:
    rig = ctx.started()
    if ctx.device == "net":
        rig.send_frames(8, layout="split", size=200)
        rig.send_frames(8, layout="scatter", size=1000)
        return
    vq = rig.vqs[0]
    for k, layout in enumerate(("scatter", "any")):
        _blk_rw(rig, vq, layout, seed=10 + k)


@check("DESC-02", "indirect descriptor tables (when offered) are followed",
       f"{VIRTIO} §2.7.5.3 (indirect descriptors)")
def desc_indirect(ctx: Ctx) -> None:
    ctx.require_feature(int(VF.RING_INDIRECT_DESC), "VIRTIO_F_INDIRECT_DESC")
    rig = ctx.started(indirect=True)
    if ctx.device == "net":
        rig.send_frames(8, layout="split", indirect=True, size=300)
        rig.send_frames(8, layout="scatter", indirect=True, size=900)
        return
    vq = rig.vqs[0]
    _blk_rw(rig, vq, "standard", seed=20, indirect=True)
    _blk_rw(rig, vq, "scatter", seed=21, indirect=True)


@check("DESC-03", "used lengths are what the device wrote: 0 for a transmitted frame; data "
       "plus status byte for a blk read, 1 for a write or flush",
       f"{VIRTIO} §2.7.8.2 (len: bytes written into the buffer)")
def desc_used_len(ctx: Ctx) -> None:
    rig = ctx.started()
    vq = data_ring(rig)
    if ctx.device == "net":
        heads = vq.push([rig.tx_chain(rig.frame(k, 100)) for k in range(4)])
        got = rig.expect_used(vq, heads, "transmit buffers")
        lens = sorted({ln for _, ln in got})
        expect(lens == [0], f"transmit buffers came back with used lengths {lens}, not 0")
        return
    bad: list[str] = []
    r = rig.blk_io(vq, VIRTIO_BLK_T_IN, 0, length=4096)
    if r.used_len != 4097:
        bad.append(f"read of 4096 bytes: used length {r.used_len}, not 4097")
    if not rig.s.features & BF.RO:
        w = rig.blk_io(vq, VIRTIO_BLK_T_OUT, 0, data=rig.mem.read(r.data_gpa, 4096))
        if w.used_len != 1:
            bad.append(f"write: used length {w.used_len}, not 1")
    if rig.s.features & BF.FLUSH:
        f = rig.blk_io(vq, VIRTIO_BLK_T_FLUSH)
        if f.used_len != 1:
            bad.append(f"flush: used length {f.used_len}, not 1")
    expect(not bad, "; ".join(bad))


@check("DESC-04", "long chains are served: a frame in 16 pieces; a blk read in as many "
       "512-byte segments as seg_max allows (up to 120)",
       f"{VIRTIO} §5.2.4 (seg_max), §2.7.13 (chains)")
def desc_long(ctx: Ctx) -> None:
    rig = ctx.started(queue_size=256)
    vq = data_ring(rig)
    if ctx.device == "net":
        frame = rig.frame(1, 1024)
        hl = rig.hdr_len
        bufs = [(rig.alloc(hl), hl, False)]
        for off in range(0, 1024, 64):
            gpa = rig.alloc(64)
            rig.mem.write(gpa, frame[off : off + 64])
            bufs.append((gpa, 64, False))
        heads = vq.push([bufs])
        rig.expect_used(vq, heads, "17-descriptor transmit chains")
        return
    cfg = rig.blk_config
    segs = 120
    if cfg is not None and rig.s.features & BF.SEG_MAX and cfg.seg_max:
        segs = min(segs, cfg.seg_max)
    r = rig.blk_io(vq, VIRTIO_BLK_T_IN, 0, length=512 * segs, layout="scatter")
    expect(r.status == VIRTIO_BLK_S_OK, f"read in {segs} segments: status {r.status}")
    ctx.notes.append(f"{segs} segments")


def _survives(ctx: Ctx, cases: list[tuple[str, Callable[[Rig, VQ], None]]],
              what: str, **session_kw: bool) -> None:
    """Put each hostile chain on a fresh running device; the back-end must stay alive and
    answer (or close that connection), and a new session must still be served."""
    bad: list[str] = []
    for name, place in cases:
        with ctx.sub(f"{what}: {name}"):
            rig = ctx.started(rx=0, **session_kw)
            vq = data_ring(rig)
            place(rig, vq)
            vq.publish()
            vq.kick()
            _settle(0.3)
            try:
                rig.s.sync()
            except PeerClosedError:
                pass  # closing the connection is a fine answer to a broken ring
            except MessageTimeoutError:
                bad.append(f"{name}: the control socket stopped answering")
            except VhostUserError:
                pass
            ctx.drop(rig.s)
    with ctx.sub("a new session after the hostile chains"):
        rig = ctx.started()
        rig.exercise(2)
    expect(not bad, "; ".join(bad))


def _head_desc(rig: Rig) -> tuple[int, int, bool]:
    """The first buffer of a chain for this device (a header, device-readable)."""
    if rig.s.device == "net":
        return rig.alloc(rig.hdr_len), rig.hdr_len, False
    gpa = rig.alloc(16)
    rig.mem.pack(REQ_HEADER, gpa, VIRTIO_BLK_T_IN, 0, 0)
    return gpa, 16, False


def _chain_of(rig: Rig, vq: VQ, entries: list[tuple[int, int, int, int]]) -> None:
    """Write descriptors 0.. as given (addr, len, flags, next) and offer head 0."""
    for i, (addr, ln, flags, nxt) in enumerate(entries):
        vq.put_desc(i, addr, ln, flags, nxt)
    vq.offer(0)


@check("DESC-05", "malformed chains do not take the back-end down or hang it: loops (also "
       "of zero-length descriptors), next or head beyond the ring, avail.idx running ahead "
       "by more than the ring, a readable buffer after a writable one",
       f"docs/security.md: Rings; {VIRTIO} §2.7.5.2, §2.7.13", timeout=150)
def desc_malformed(ctx: Ctx) -> None:
    def loop_self(rig: Rig, vq: VQ) -> None:
        a, n, _ = _head_desc(rig)
        _chain_of(rig, vq, [(a, n, DESC_F_NEXT, 0)])

    def loop_two(rig: Rig, vq: VQ) -> None:
        a, n, _ = _head_desc(rig)
        b = rig.alloc(64)
        _chain_of(rig, vq, [(a, n, DESC_F_NEXT, 1), (b, 64, DESC_F_NEXT, 0)])

    def loop_zero(rig: Rig, vq: VQ) -> None:
        a, n, _ = _head_desc(rig)
        _chain_of(rig, vq, [(a, n, DESC_F_NEXT, 1), (a, 0, DESC_F_NEXT, 2),
                            (a, 0, DESC_F_NEXT, 1)])

    def next_beyond(rig: Rig, vq: VQ) -> None:
        a, n, _ = _head_desc(rig)
        _chain_of(rig, vq, [(a, n, DESC_F_NEXT, vq.size + 5)])

    def head_beyond(rig: Rig, vq: VQ) -> None:
        vq.offer(vq.size + 3)

    def idx_ahead(rig: Rig, vq: VQ) -> None:
        a, n, _ = _head_desc(rig)
        vq.put_desc(0, a, n, 0)
        for _ in range(vq.size + 2):
            vq.offer(0)

    def write_then_read(rig: Rig, vq: VQ) -> None:
        a, n, _ = _head_desc(rig)
        w = rig.alloc(512)
        r = rig.alloc(512)
        _chain_of(rig, vq, [(a, n, DESC_F_NEXT, 1), (w, 512, DESC_F_WRITE | DESC_F_NEXT, 2),
                            (r, 512, 0, 0)])

    _survives(ctx, [("a descriptor whose next is itself", loop_self),
                    ("a two-descriptor loop", loop_two),
                    ("a loop of zero-length descriptors", loop_zero),
                    ("next beyond the ring", next_beyond),
                    ("an avail head beyond the ring", head_beyond),
                    ("avail.idx ahead by more than the ring", idx_ahead),
                    ("a readable buffer after a writable one", write_then_read)],
              "malformed chains")


@check("DESC-06", "malformed indirect tables (when offered) do not take the back-end down: "
       "length not a multiple of 16, length 0, a table inside a table, INDIRECT with NEXT, "
       "more entries than the ring, a table outside guest memory",
       f"docs/security.md: Rings; {VIRTIO} §2.7.5.3.1", timeout=150)
def desc_bad_indirect(ctx: Ctx) -> None:
    ctx.require_feature(int(VF.RING_INDIRECT_DESC), "VIRTIO_F_INDIRECT_DESC")

    def table(rig: Rig, entries: int) -> int:
        t = rig.alloc(16 * max(entries, 1), 16)
        a, n, _ = _head_desc(rig)
        for k in range(entries):
            rig.mem.pack(DESC, t + 16 * k, a, n, DESC_F_NEXT if k < entries - 1 else 0,
                         k + 1 if k < entries - 1 else 0)
        return t

    def odd_len(rig: Rig, vq: VQ) -> None:
        _chain_of(rig, vq, [(table(rig, 2), 24, DESC_F_INDIRECT, 0)])

    def zero_len(rig: Rig, vq: VQ) -> None:
        _chain_of(rig, vq, [(table(rig, 2), 0, DESC_F_INDIRECT, 0)])

    def nested(rig: Rig, vq: VQ) -> None:
        inner = table(rig, 2)
        outer = rig.alloc(16, 16)
        rig.mem.pack(DESC, outer, inner, 32, DESC_F_INDIRECT, 0)
        _chain_of(rig, vq, [(outer, 16, DESC_F_INDIRECT, 0)])

    def with_next(rig: Rig, vq: VQ) -> None:
        a, n, _ = _head_desc(rig)
        _chain_of(rig, vq, [(table(rig, 2), 32, DESC_F_INDIRECT | DESC_F_NEXT, 1),
                            (a, n, 0, 0)])

    def too_many(rig: Rig, vq: VQ) -> None:
        n = vq.size + 1
        _chain_of(rig, vq, [(table(rig, n), 16 * n, DESC_F_INDIRECT, 0)])

    def outside(rig: Rig, vq: VQ) -> None:
        _chain_of(rig, vq, [(1 << 44, 32, DESC_F_INDIRECT, 0)])

    _survives(ctx, [("table length 24", odd_len), ("table length 0", zero_len),
                    ("a table inside a table", nested), ("INDIRECT with NEXT", with_next),
                    ("more entries than the ring", too_many),
                    ("a table outside guest memory", outside)],
              "malformed indirect tables", indirect=True)


@check("DESC-07", "buffers the device cannot reach do not take the back-end down: outside "
       "guest memory, running past a region's end, lengths summing past 2^32, an address "
       "wrapping 2^64", f"docs/security.md: Rings; {SPEC}: Memory access", timeout=120)
def desc_bad_buffers(ctx: Ctx) -> None:
    def placed(bufs: Callable[[Rig], list[tuple[int, int, int]]]) -> Callable[[Rig, VQ], None]:
        def place(rig: Rig, vq: VQ) -> None:
            a, n, _ = _head_desc(rig)
            entries = [(a, n, 0), *bufs(rig)]
            _chain_of(rig, vq, [(addr, ln, fl | (DESC_F_NEXT if i < len(entries) - 1 else 0),
                                 i + 1 if i < len(entries) - 1 else 0)
                                for i, (addr, ln, fl) in enumerate(entries)])
        return place

    w = 0 if ctx.device == "net" else DESC_F_WRITE
    end = 8 << 20
    _survives(ctx, [
        ("a buffer outside guest memory", placed(lambda r: [(1 << 44, 512, w)])),
        ("a buffer running past the region's end", placed(lambda r: [(end - 256, 4096, w)])),
        ("lengths summing past 2^32", placed(lambda r: [(0, 0xFFFF_F000, w),
                                                        (0, 0xFFFF_F000, w)])),
        ("an address wrapping 2^64", placed(lambda r: [(2**64 - 256, 4096, w)])),
    ], "unreachable buffers")


# -- NET -----------------------------------------------------------------------------------------


@check("NET-01", "transmitted frames of 60 to 1514 bytes are all consumed, each buffer "
       "returned once under its head id", f"{VIRTIO} §5.1.6.2 (packet transmission)",
       devices=("net",))
def net_tx(ctx: Ctx) -> None:
    rig = ctx.started()
    sizes = [60, 64, 128, 256, 512, 1000, 1500, 1514]
    for round_ in range(4):
        for k, size in enumerate(sizes):
            rig.send_frames(1, size=size, first=round_ * 100 + k)
    rig.send_frames(32, size=700)


@check("NET-02", "frames the device delivers are well formed: a used length of header plus "
       "frame within the buffer, num_buffers 1..n with mergeable buffers, no offload flags "
       "that were not negotiated (SKIP when the back-end delivers nothing)",
       f"{VIRTIO} §5.1.6.3, §5.1.6.4 (receiving packets)", devices=("net",))
def net_rx(ctx: Ctx) -> None:
    rig = ctx.started(rx=32)
    rx = rig.vqs[0]
    rig.send_frames(16, size=200)
    got = rx.wait_used(1, 1.0)
    _settle(0.2)
    got += rx.reap()
    if not got:
        skip("the back-end delivered no frame (it does not send frames back)")
    hl = rig.hdr_len
    bad: list[str] = []
    mrg = bool(rig.s.features & NF.MRG_RXBUF)
    for uid, ln in got:
        if not hl + 14 <= ln <= 2048:
            bad.append(f"buffer {uid}: used length {ln}")
            continue
    for uid, ln in got:
        gpa = _rx_gpa(rig, rx, uid)
        if gpa is None:
            bad.append(f"used id {uid} was not a receive buffer we posted")
            continue
        hdr = rig.mem.read(gpa, hl)
        flags, gso = hdr[0], hdr[1]
        if flags & ~2 or (flags & 2 and not rig.s.features & NF.GUEST_CSUM):
            bad.append(f"buffer {uid}: header flags {flags:#x} without GUEST_CSUM")
        if gso:
            bad.append(f"buffer {uid}: gso_type {gso} without GUEST_TSO/UFO")
        if mrg:
            nbuf = NET_HDR_MRG.unpack(hdr)[6]
            if nbuf != 1:
                bad.append(f"buffer {uid}: num_buffers {nbuf} for a {ln - hl}-byte frame")
    expect(not bad, "; ".join(bad[:8]))
    ctx.notes.append(f"{len(got)} frames received")


def _rx_gpa(rig: Rig, vq: VQ, uid: int) -> int | None:
    if not 0 <= uid < vq.size:
        return None
    addr, _ln, flags, _n = rig.mem.unpack(DESC, vq.desc_gpa + 16 * uid)
    return int(addr) if flags & DESC_F_WRITE else None


@check("NET-03", "SEND_RARP (RARP) and NET_SET_MTU (MTU) are accepted when offered",
       f"{SPEC}: SEND_RARP, NET_SET_MTU", devices=("net",))
def net_rarp_mtu(ctx: Ctx) -> None:
    if not (ctx.offer.has_pf(PF.RARP) or ctx.offer.has_pf(PF.MTU)):
        skip("neither RARP nor MTU offered")
    rig = ctx.started()
    if rig.s.has(PF.RARP):
        rig.s.fe.send(R.SEND_RARP, P.U64Payload(value=int.from_bytes(
            bytes.fromhex("02000000c4ec") + b"\0\0", "little")))
    if rig.s.has(PF.MTU):
        rig.s.fe.send(R.NET_SET_MTU, P.U64Payload(value=1500))
    rig.s.sync()
    rig.exercise(2)


# -- BLK -----------------------------------------------------------------------------------------


@check("BLK-01", "data written reads back the same: 512 bytes, 4 KiB, 32 KiB in 4 KiB "
       "pieces, and the disk's last sector", f"{VIRTIO} §5.2.6 (device operation)",
       devices=("blk",))
def blk_readback(ctx: Ctx) -> None:
    rig = ctx.started()
    if rig.s.features & BF.RO:
        skip("the disk is read-only (VIRTIO_BLK_F_RO)")
    vq = rig.vqs[0]
    _blk_rw(rig, vq, "standard", 30, nbytes=512, sector=3)
    _blk_rw(rig, vq, "standard", 31, nbytes=4096, sector=16)
    data = rig.pattern(32, 32768)
    w = rig.blk_request(vq, VIRTIO_BLK_T_OUT, 128, data=data)
    rig.blk_complete(vq, [w])
    expect(w.status == VIRTIO_BLK_S_OK, f"32 KiB write: status {w.status}")
    back = rig.blk_io(vq, VIRTIO_BLK_T_IN, 128, length=32768)
    expect(back.status == VIRTIO_BLK_S_OK and rig.mem.read(back.data_gpa, 32768) == data,
           f"32 KiB read-back: status {back.status} or data differ")
    cap = rig.capacity_sectors
    if cap:
        _blk_rw(rig, vq, "standard", 33, nbytes=512, sector=cap - 1)


@check("BLK-02", "FLUSH completes OK (when offered); GET_ID returns OK with up to 20 bytes "
       "or UNSUPP", f"{VIRTIO} §5.2.6 (VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID)",
       devices=("blk",))
def blk_flush_id(ctx: Ctx) -> None:
    rig = ctx.started()
    vq = rig.vqs[0]
    if rig.s.features & BF.FLUSH:
        f = rig.blk_io(vq, VIRTIO_BLK_T_FLUSH)
        expect(f.status == VIRTIO_BLK_S_OK, f"FLUSH: status {f.status}")
    g = rig.blk_io(vq, VIRTIO_BLK_T_GET_ID, length=VIRTIO_BLK_ID_BYTES)
    expect(g.status in (VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP), f"GET_ID: status {g.status}")


@check("BLK-03", "errors are reported, not hidden: a read past the capacity gets IOERR, an "
       "unknown request type UNSUPP, a write to a read-only disk IOERR",
       f"{VIRTIO} §5.2.6.1 (device requirements)", devices=("blk",))
def blk_errors(ctx: Ctx) -> None:
    rig = ctx.started()
    vq = rig.vqs[0]
    bad: list[str] = []
    cap = rig.capacity_sectors
    if cap:
        r = rig.blk_io(vq, VIRTIO_BLK_T_IN, cap, length=4096)
        if r.status != VIRTIO_BLK_S_IOERR:
            bad.append(f"read at sector {cap} (the capacity): status {r.status}, not IOERR")
        r = rig.blk_io(vq, VIRTIO_BLK_T_IN, cap - 1, length=4096)
        if r.status != VIRTIO_BLK_S_IOERR:
            bad.append(f"read across the end of the disk: status {r.status}, not IOERR")
    u = rig.blk_io(vq, 0x7F, 0, length=512)
    if u.status != VIRTIO_BLK_S_UNSUPP:
        bad.append(f"request type 0x7f: status {u.status}, not UNSUPP")
    if rig.s.features & BF.RO:
        w = rig.blk_io(vq, VIRTIO_BLK_T_OUT, 0, data=bytes(512))
        if w.status != VIRTIO_BLK_S_IOERR:
            bad.append(f"write to a read-only disk: status {w.status}, not IOERR")
    expect(not bad, "; ".join(bad))


@check("BLK-04", "WRITE_ZEROES leaves zeroes and DISCARD completes OK (when offered)",
       f"{VIRTIO} §5.2.6 (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES)",
       devices=("blk",))
def blk_discard(ctx: Ctx) -> None:
    if not ctx.offer.has(int(BF.DISCARD)) and not ctx.offer.has(int(BF.WRITE_ZEROES)):
        skip("neither DISCARD nor WRITE_ZEROES offered")
    rig = ctx.started()
    if rig.s.features & BF.RO:
        skip("the disk is read-only")
    vq = rig.vqs[0]
    if rig.s.features & BF.WRITE_ZEROES:
        rig.blk_io(vq, VIRTIO_BLK_T_OUT, 256, data=rig.pattern(40, 8192))
        z = rig.blk_io(vq, VIRTIO_BLK_T_WRITE_ZEROES,
                       segment=DWZ_SEGMENT.pack(256, 16, 0))
        expect(z.status == VIRTIO_BLK_S_OK, f"WRITE_ZEROES: status {z.status}")
        r = rig.blk_io(vq, VIRTIO_BLK_T_IN, 256, length=8192)
        expect(rig.mem.read(r.data_gpa, 8192) == bytes(8192),
               "the 8 KiB zeroed with WRITE_ZEROES do not read back as zeroes")
    if rig.s.features & BF.DISCARD:
        d = rig.blk_io(vq, VIRTIO_BLK_T_DISCARD, segment=DWZ_SEGMENT.pack(512, 16, 0))
        expect(d.status == VIRTIO_BLK_S_OK, f"DISCARD: status {d.status}")


@check("BLK-05", "32 requests in flight at once each complete once, with the right data",
       f"{VIRTIO} §2.7.13 (in-flight buffers), §5.2.6", devices=("blk",))
def blk_depth(ctx: Ctx) -> None:
    rig = ctx.started(queue_size=128)
    if rig.s.features & BF.RO:
        skip("the disk is read-only")
    vq = rig.vqs[0]
    writes = [rig.blk_request(vq, VIRTIO_BLK_T_OUT, 1024 + 8 * k,
                              data=rig.pattern(500 + k, 4096), publish=False)
              for k in range(32)]
    vq.publish()
    vq.kick()
    rig.blk_complete(vq, writes)
    expect(all(w.status == VIRTIO_BLK_S_OK for w in writes),
           f"write statuses {[w.status for w in writes]}")
    reads = [rig.blk_request(vq, VIRTIO_BLK_T_IN, 1024 + 8 * k, length=4096, publish=False)
             for k in range(32)]
    vq.publish()
    vq.kick()
    rig.blk_complete(vq, reads)
    for k, r in enumerate(reads):
        expect(r.status == VIRTIO_BLK_S_OK and rig.mem.read(r.data_gpa, 4096)
               == rig.pattern(500 + k, 4096), f"request {k}: status {r.status} or data differ")
    _settle(0.2)
    extra = vq.reap()
    expect(not extra, f"requests completed twice: {extra}")


# -- IF: inflight recovery (blk) -----------------------------------------------------------------

INFLIGHT_HEADER = struct.Struct("<QHHHH")
INFLIGHT_DESC = struct.Struct("<B5xHQ")


def _get_inflight(s: Session, queue_size: int) -> tuple[P.InflightPayload, int]:
    """GET_INFLIGHT_FD for one queue: the reply and its fd (ours to close).

    Raises:
        CheckFailed: no fd, or a reply of the wrong shape.
    """
    reply = s.fe.send(R.GET_INFLIGHT_FD, P.InflightPayload(
        mmap_size=0, mmap_offset=0, num_queues=1, queue_size=queue_size))
    if reply is None or len(reply.fds) != 1:
        fail("GET_INFLIGHT_FD: no fd in the reply")
    msg = P.InflightPayload.decode(reply.payload)
    owned = reply.fds[0]
    if not isinstance(owned, OwnedFd):
        fail("GET_INFLIGHT_FD: the reply's fd is not usable")
    return msg, owned.detach()


@check("IF-01", "GET_INFLIGHT_FD returns a mappable area large enough for the queue, zeroed "
       "apart from its header", f"{SPEC}: GET_INFLIGHT_FD; Inflight I/O tracking",
       devices=("blk",))
def if_area(ctx: Ctx) -> None:
    ctx.require_pf(PF.INFLIGHT_SHMFD)
    s = ctx.session(add_pf=int(PF.INFLIGHT_SHMFD))
    msg, fd = _get_inflight(s, 64)
    ctx.adopt_fd(fd)
    need = 16 + 16 * 64
    expect(msg.mmap_size >= need, f"mmap_size {msg.mmap_size} < {need} bytes for 64 entries")
    size = os.fstat(fd).st_size
    expect(size >= msg.mmap_offset + msg.mmap_size,
           f"the fd holds {size} bytes, the area is {msg.mmap_offset}+{msg.mmap_size}")
    with mmap.mmap(fd, msg.mmap_offset + msg.mmap_size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
        body = m[msg.mmap_offset + 16 : msg.mmap_offset + need]
    expect(body == bytes(len(body)), "descriptor entries of a new area are not zero")


def _inflight_session(ctx: Ctx) -> tuple[Rig, P.InflightPayload, int]:
    s = ctx.session(add_pf=int(PF.INFLIGHT_SHMFD))
    rig = ctx.rig(s)
    msg, fd = _get_inflight(s, rig.queue_size)
    ctx.adopt_fd(fd)
    s.fe.send(R.SET_INFLIGHT_FD, msg, [fd])
    return rig, msg, fd


@check("IF-02", "the inflight area tracks requests: after they complete, no descriptor is "
       "marked in flight and the area's used_idx equals the ring's",
       f"{SPEC}: Inflight I/O tracking (split virtqueue)", devices=("blk",))
def if_tracking(ctx: Ctx) -> None:
    ctx.require_pf(PF.INFLIGHT_SHMFD)
    rig, msg, fd = _inflight_session(ctx)
    rig.start()
    rig.exercise(4)
    _settle(0.1)
    vq = rig.vqs[0]
    with mmap.mmap(fd, msg.mmap_offset + msg.mmap_size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
        raw = m[msg.mmap_offset : msg.mmap_offset + 16 + 16 * rig.queue_size]
    _f, version, desc_num, _lbh, used_idx = INFLIGHT_HEADER.unpack_from(raw)
    expect(version == 1, f"area version {version}, not 1")
    expect(desc_num == rig.queue_size, f"desc_num {desc_num}, queue size {rig.queue_size}")
    expect(used_idx == vq.used_idx(), f"area used_idx {used_idx}, ring used.idx "
           f"{vq.used_idx()}")
    marked = [i for i in range(rig.queue_size)
              if INFLIGHT_DESC.unpack_from(raw, 16 + 16 * i)[0]]
    expect(not marked, f"descriptors {marked} still marked in flight after completion")


@check("IF-03", "requests marked in flight in an area handed back with SET_INFLIGHT_FD are "
       "resubmitted on a new connection and complete, each once",
       f"{SPEC}: Inflight I/O tracking (\"When reconnecting\")", devices=("blk",))
def if_resubmit(ctx: Ctx) -> None:
    ctx.require_pf(PF.INFLIGHT_SHMFD)
    qsize = 64
    first = ctx.session(add_pf=int(PF.INFLIGHT_SHMFD))
    msg, fd = _get_inflight(first, qsize)
    ctx.adopt_fd(fd)
    ctx.drop(first)
    s = ctx.session(add_pf=int(PF.INFLIGHT_SHMFD))
    rig = ctx.rig(s, queue_size=qsize)
    ro = bool(s.features & BF.RO)
    # The ring as a back-end that took four requests and crashed left it: available,
    # not used, and marked in flight in the area (counters 1..4).
    vq = VQ(rig.mem, 0, qsize, 0)
    rig.vqs[0] = vq
    reqs = []
    for k in range(4):
        if ro:
            reqs.append(rig.blk_request(vq, VIRTIO_BLK_T_IN, 8 * k, length=4096,
                                        publish=False))
        else:
            reqs.append(rig.blk_request(vq, VIRTIO_BLK_T_OUT, 2048 + 8 * k,
                                        data=rig.pattern(700 + k, 4096), publish=False))
    vq.publish()
    with mmap.mmap(fd, msg.mmap_offset + msg.mmap_size, mmap.MAP_SHARED) as m:
        base = msg.mmap_offset
        INFLIGHT_HEADER.pack_into(m, base, 0, 1, qsize, 0, 0)
        for n, r in enumerate(reqs):
            INFLIGHT_DESC.pack_into(m, base + 16 + 16 * r.head, 1, 0, n + 1)
    s.fe.send(R.SET_INFLIGHT_FD, msg, [fd])
    rig.share()
    rig.read_blk_config()
    rig.vring(0, base=0, resume=True)  # QEMU: last_avail_idx = used.idx after a crash
    rig.driver_ok()
    vq.kick()
    rig.blk_complete(vq, reqs, "resubmitted requests")
    expect(all(r.status == VIRTIO_BLK_S_OK for r in reqs),
           f"resubmitted requests completed with statuses {[r.status for r in reqs]}")
    _settle(0.2)
    again = vq.reap()
    expect(not again, f"requests completed twice: {again}")
    if not ro:
        for k, r in enumerate(reqs):
            back = rig.blk_io(vq, VIRTIO_BLK_T_IN, r.sector, length=4096)
            expect(rig.mem.read(back.data_gpa, 4096) == rig.pattern(700 + k, 4096),
                   f"resubmitted write {k} did not reach the disk")


# -- DL: dirty logging -------------------------------------------------------------------------


def _log_setup(ctx: Ctx, rig: Rig) -> tuple[int, mmap.mmap]:
    """SET_LOG_BASE with a memfd log covering guest RAM; returns (fd, its mapping).

    Raises:
        CheckFailed: refused, or a reply that is not the SET_LOG_BASE ack.
    """
    pages = rig.ram.size // 4096
    size = max(4096, (pages + 7) // 8)
    fd = ctx.memfd(size)
    flags = FLAG_VERSION
    data = message(R.SET_LOG_BASE, P.LogBase(mmap_size=size, mmap_offset=0).encode(),
                   flags=flags)
    rig.s.wire.send(data, [fd])
    m = rig.s.wire.recv()
    # vhost-user.rst gives the reply no payload; QEMU reads one and looks only at its id.
    if m.request != R.SET_LOG_BASE or m.flags != 0x5 or len(m.payload) not in (0, 8):
        fail(f"SET_LOG_BASE (LOG_SHMFD) answered with {m.describe()}")
    if m.u64:
        ctx.notes.append(f"SET_LOG_BASE's reply carries {m.u64:#x}")
    return fd, mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)


def _dirty(log: mmap.mmap, gpa: int) -> bool:
    page = gpa // 4096
    return bool(log[page // 8] >> (page % 8) & 1)


@check("DL-01", "logging starts while the device runs: SET_LOG_BASE (answered, LOG_SHMFD), "
       "SET_FEATURES with LOG_ALL and SET_VRING_ADDR with the log flag are accepted and "
       "the device keeps serving", f"{SPEC}: Migration (dirty log); SET_LOG_BASE",
       timeout=60)
def dl_start(ctx: Ctx) -> None:
    _dl_prepare(ctx)


def _dl_prepare(ctx: Ctx) -> tuple[Rig, mmap.mmap]:
    ctx.require_feature(int(VF.LOG_ALL), "VHOST_F_LOG_ALL")
    ctx.require_pf(PF.LOG_SHMFD)
    rig = ctx.started()
    rig.exercise(2, seed=1)
    _fd, log = _log_setup(ctx, rig)
    ctx.on_close(log.close)
    s = rig.s
    s.features |= int(VF.LOG_ALL)
    s.fe.send(R.SET_FEATURES, P.U64Payload(value=s.features))
    for i, vq in rig.vqs.items():
        s.fe.send(R.SET_VRING_ADDR, P.VringAddr(
            index=i, flags=P.VRING_F_LOG, desc=rig.mem.uva(vq.desc_gpa),
            used=rig.mem.uva(vq.used_gpa), avail=rig.mem.uva(vq.avail_gpa), log=vq.used_gpa))
    s.sync()
    rig.exercise(2, seed=2)
    return rig, log


@check("DL-02", "with logging on, every page the device writes is marked in the log: the "
       "used ring, and for blk the data read and the status byte",
       f"{SPEC}: Migration (\"All the modifications to memory pointed by vring descriptor "
       "should be marked\")", timeout=60)
def dl_marks(ctx: Ctx) -> None:
    rig, log = _dl_prepare(ctx)
    vq = data_ring(rig)
    missing: list[str] = []
    if not _dirty(log, vq.used_gpa):
        missing.append(f"the used ring at {vq.used_gpa:#x}")
    if ctx.device == "blk":
        r = rig.blk_io(vq, VIRTIO_BLK_T_IN, 0, length=8192)
        for off in (0, 4096):
            if not _dirty(log, r.data_gpa + off):
                missing.append(f"read data page {r.data_gpa + off:#x}")
        if not _dirty(log, r.status_gpa):
            missing.append(f"status byte page {r.status_gpa:#x}")
    expect(not missing, "not marked dirty: " + ", ".join(missing))


# -- RC: reconnection --------------------------------------------------------------------------


@check("RC-01", "after a front-end goes away mid-session (rings running, no GET_VRING_BASE), "
       "the next connection is served, three times over",
       f"{SPEC}: Introduction (reconnection); Starting and stopping rings")
def rc_reconnect(ctx: Ctx) -> None:
    for k in range(3):
        with ctx.sub(f"connection {k + 1}"):
            rig = ctx.started()
            rig.exercise(2, seed=k)
            ctx.drop(rig.s)


@check("RC-02", "a back-end killed and started again serves a front-end that resumes its "
       "session: same features and memory, rings set up at their used index",
       f"{SPEC}: Reconnection; QEMU vhost-user reconnect (virtio_queue_restore_last_avail_idx)",
       timeout=120, restarts=True)
def rc_restart(ctx: Ctx) -> None:
    rig = ctx.started()
    rig.exercise(3, seed=1)
    features, pf = rig.s.features, rig.s.pf
    ctx.backend.restart(crash=True)
    s2 = ctx.session(features=features, pf=pf)
    old = rig.s
    rig.s = s2
    ctx.drop(old)
    rig.shared = False
    rig.share()
    for i in rig.default_rings():
        vq = rig.vqs[i]
        vq.reap()
        rig.vring(i, base=vq.used_idx(), resume=True)
    rig.driver_ok()
    if ctx.device == "net":
        rig.vqs[0].kick()
    rig.exercise(3, seed=2)


# -- SURV: fd and process survival ----------------------------------------------------------------


def _counts(ctx: Ctx) -> tuple[int, int] | None:
    fds, maps = ctx.backend.fd_count(), ctx.backend.map_count()
    return None if fds is None or maps is None else (fds, maps)


def _settled(ctx: Ctx, before: tuple[int, int], slack: int) -> tuple[int, int] | None:
    deadline = time.monotonic() + max(5.0, ctx.timeout)
    now = _counts(ctx)
    while now is not None and (now[0] > before[0] + slack or now[1] > before[1]):
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
        now = _counts(ctx)
    return now


@check("SURV-01", "20 front-ends that set up memory and rings and then vanish (half of them "
       "mid-message) leave the back-end's fd and shared-mapping counts where they were",
       "docs/security.md: Resources (nothing accumulates); vhost-user.rst: Introduction",
       timeout=150)
def surv_leaks(ctx: Ctx) -> None:
    def cycle(k: int) -> None:
        rig = ctx.started(rx=4)
        rig.exercise(1, seed=k)
        if k % 2:
            rig.s.wire.sock.send(message(R.SET_VRING_NUM, bytes(4), size=8))
        ctx.drop(rig.s)

    cycle(0)
    _settle(0.5)
    before = _counts(ctx)
    if before is None:
        skip(f"/proc/{ctx.backend.pid} is not readable")
    for k in range(1, 21):
        with ctx.sub(f"cycle {k}"):
            cycle(k)
    after = _settled(ctx, before, slack=2)
    expect(after is not None, "the back-end's /proc entries could not be read afterwards")
    assert after is not None
    expect(after[0] <= before[0] + 2 and after[1] <= before[1],
           f"fds {before[0]} -> {after[0]}, shared mappings {before[1]} -> {after[1]}")
    ctx.notes.append(f"fds {before[0]} -> {after[0]}, shared mappings {before[1]} -> {after[1]}")


@check("SURV-02", "a message carrying 32 fds (more than any back-end takes) is refused and "
       "every fd closed: 20 times over, the fd count stays flat",
       "docs/security.md: Framing and fds (MSG_CTRUNC)", timeout=90)
def surv_ctrunc(ctx: Ctx) -> None:
    before = _counts(ctx)
    bad: list[str] = []
    for k in range(20):
        with ctx.sub(f"try {k + 1}"):
            s = ctx.connect()
            fds = [ctx.eventfd() for _ in range(32)]
            verdict, detail = judge(s.wire, message(R.GET_FEATURES), fds, need_reply=False,
                                    has_reply=True)
            ctx.drop(s)
            ctx.close_fds()
            if not verdict.refused and k == 0:
                bad.append(f"GET_FEATURES with 32 fds: {verdict_text(verdict, detail)}")
    if before is not None:
        after = _settled(ctx, before, slack=2)
        if after is not None and after[0] > before[0] + 2:
            bad.append(f"fds {before[0]} -> {after[0]} after 20 messages with 32 fds")
    expect(not bad, "; ".join(bad))


@check("SURV-03", "a session keeps running while another connection comes and breaks the "
       "protocol", "docs/security.md: one bad peer must not take down the others; vhost-user.rst")
def surv_other(ctx: Ctx) -> None:
    rig = ctx.started()
    rig.exercise(2, seed=1)
    intruder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        intruder.settimeout(ctx.timeout)
        intruder.connect(ctx.backend.socket_path)
        intruder.sendall(message(R.SET_OWNER, flags=0x2) + b"\xff" * 64)
    except OSError:
        pass  # turned away at once: as good as served and dropped
    finally:
        intruder.close()
    _settle(0.3)
    rig.exercise(2, seed=2)
    rig.s.sync()

