"""Migration checks (MIG): what a front-end migrating a guest relies on.

* MIG-01: with logging on, every guest page whose bytes the device changes is marked in
  the dirty log. A shadow copy of guest memory is taken once the work is laid out (the
  front-end's last write before the device may act is the available index, whose bytes
  are left out of the comparison), the work is published and kicked, and once memory
  settled every page that differs must be marked. Pages marked but unchanged pass (a
  device may write the bytes that were there).
* MIG-02: GET_VRING_BASE stops a ring and returns the index the next back-end connection
  resumes from: buffers made available before the stop (some of them not kicked) are each
  used exactly once across the two connections, and the next ones after them too.

Split rings, built by :class:`~vhostuser.testing.rig.Rig`; the log is a
:class:`~vhostuser.io.dirtylog.FrontendDirtyLog` (sized as QEMU sizes it).
"""

from __future__ import annotations

from ..io.dirtylog import LOG_PAGE, FrontendDirtyLog, changed_pages
from ..protocol import payloads as P
from ..protocol.enums import BlkFeature as BF
from ..protocol.enums import FrontendRequest, ProtocolFeature
from ..protocol.enums import VirtioFeature as VF
from ..virtio.blk import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from .migration import settle
from .outcome import expect, fail
from .registry import Ctx, check
from .rig import VQ, Rig

R = FrontendRequest
PF = ProtocolFeature
SPEC = "vhost-user.rst"


def _start_logging(ctx: Ctx, rig: Rig) -> FrontendDirtyLog:
    """SET_LOG_BASE with a fresh log, SET_FEATURES with LOG_ALL, SET_VRING_ADDR with the
    log flag on every ring; a GET_FEATURES round trip so it is all in force."""
    ctx.require_feature(int(VF.LOG_ALL), "VHOST_F_LOG_ALL")
    ctx.require_pf(PF.LOG_SHMFD)
    log = FrontendDirtyLog(rig.ram.size, name="vhost-user-check-log")
    ctx.on_close(log.close)
    s = rig.s
    s.fe.send(R.SET_LOG_BASE, P.LogBase(mmap_size=log.size, mmap_offset=0), [log.fd])
    s.features |= int(VF.LOG_ALL)
    s.fe.send(R.SET_FEATURES, P.U64Payload(value=s.features))
    for i, vq in rig.vqs.items():
        s.fe.send(R.SET_VRING_ADDR, P.VringAddr(
            index=i, flags=P.VRING_F_LOG, desc=rig.mem.uva(vq.desc_gpa),
            used=rig.mem.uva(vq.used_gpa), avail=rig.mem.uva(vq.avail_gpa), log=vq.used_gpa))
    s.sync()
    return log


def _what(rig: Rig, page: int) -> str:
    gpa = page * LOG_PAGE
    for i, vq in rig.vqs.items():
        if vq.desc_gpa <= gpa < vq.used_gpa + 6 + 8 * vq.size:
            return f"page {page} (ring {i})"
    return f"page {page} (buffers)"


@check("MIG-01", "with logging on, every guest page whose bytes the device changes is marked "
       "in the dirty log (a shadow copy of guest memory compared before and after: used "
       "rings, and what the device writes into buffers)",
       f"{SPEC}: Migration (\"All the modifications to memory pointed by vring descriptor "
       "should be marked\"; used ring at log_guest_addr)", timeout=90)
def mig_log_all_writes(ctx: Ctx) -> None:
    rig = ctx.started()
    rig.exercise(2, seed=1)
    log = _start_logging(ctx, rig)
    buf = rig.ram.buf
    heads: list[int] = []
    work: VQ
    if ctx.device == "net":
        work = rig.vqs[1]
        for k in range(8):
            heads.append(work.add(rig.tx_chain(rig.frame(5000 + k, 700))))
    else:
        work = rig.vqs[0]
        reqs = [rig.blk_request(work, VIRTIO_BLK_T_IN, 8 * k, length=8192, publish=False)
                for k in range(6)]
        if not rig.s.features & BF.RO:
            reqs.append(rig.blk_request(work, VIRTIO_BLK_T_OUT, 64, data=rig.pattern(9, 4096),
                                        publish=False))
        heads = [r.head for r in reqs]
    log.take()
    before = bytearray(buf)
    work.publish()
    work.kick()
    rig.expect_used(work, heads, "buffers")
    after = bytearray(settle(buf, quiet=0.3, timeout=rig.timeout))
    marked = log.take()
    # The only bytes we wrote after the copy: avail.idx (and our used-ring bookkeeping is
    # in our own memory, not the guest's).
    for vq in rig.vqs.values():
        after[vq.avail_gpa + 2 : vq.avail_gpa + 4] = before[vq.avail_gpa + 2 : vq.avail_gpa + 4]
    changed = changed_pages(before, after)
    missing = sorted(changed - marked)
    ctx.notes.append(f"{len(changed)} pages changed, {len(marked)} marked, "
                     f"{len(marked - changed)} marked but unchanged")
    expect(bool(changed), "with logging on, the device changed no guest page at all "
           "(not even a used ring)")
    expect(not missing, f"{len(missing)} of {len(changed)} changed pages are not marked in "
           "the log: " + ", ".join(_what(rig, p) for p in missing[:8]))
    if ctx.device == "blk":
        statuses = [rig.mem.read(r.status_gpa, 1)[0] for r in reqs]
        expect(all(st == VIRTIO_BLK_S_OK for st in statuses),
               f"requests completed with statuses {statuses}")


@check("MIG-02", "GET_VRING_BASE stops a ring and returns the index a second connection "
       "resumes from (SET_VRING_BASE, same memory): buffers made available before the stop, "
       "kicked or not, are used exactly once across the two connections, and later ones "
       "after them", f"{SPEC}: Starting and stopping rings; GET_VRING_BASE; Migration",
       timeout=120)
def mig_resume_at_base(ctx: Ctx) -> None:
    rig = ctx.started()
    rig.exercise(2, seed=1)
    work = rig.vqs[1 if ctx.device == "net" else 0]
    # Made available and published, not kicked: a polling device may take them before
    # the stop, an event-driven one after the hand-over; either way each once.
    if ctx.device == "net":
        pending = [work.add(rig.tx_chain(rig.frame(7000 + k, 200))) for k in range(4)]
    else:
        pending = [rig.blk_request(work, VIRTIO_BLK_T_IN, 8 * k, length=4096,
                                   publish=False).head for k in range(4)]
    work.publish()
    bases: dict[int, int] = {}
    for i in rig.default_rings():
        bases[i] = rig.stop(i)
        vq = rig.vqs[i]
        used = vq.used_idx()
        span = (vq.next_avail - used) & 0xFFFF
        if (bases[i] - used) & 0xFFFF > span:
            fail(f"GET_VRING_BASE of ring {i} returned {bases[i]}, outside used.idx {used} "
                 f"to avail.idx {vq.next_avail}")
    ctx.notes.append("bases " + ", ".join(f"ring {i}: {b}" for i, b in bases.items()))
    features, pf = rig.s.features, rig.s.pf
    # The old connection goes first: some back-ends (DPDK's net_vhost port) serve one
    # front-end at a time. Guest memory and rings stay (they are the rig's).
    rig.s.close()
    rig.s = ctx.session(features=features, pf=pf)
    rig.shared = False
    rig.share()
    for i in rig.default_rings():
        rig.vring(i, base=bases[i], resume=True)
    rig.driver_ok()
    for i in rig.default_rings():
        rig.vqs[i].kick()
    rig.expect_used(work, pending, "buffers made available before the stop")
    rig.exercise(3, seed=2)
