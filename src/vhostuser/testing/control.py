"""Control-plane checks: handshake and feature words (HS), REPLY_ACK (ACK), the per-request
rules of the protocol table (RT) and hostile framing (HOS).

A request is *refused* when the back-end answers it with a non-zero ack (NEED_REPLY is set
whenever REPLY_ACK was negotiated) or closes the connection; see
:func:`~vhostuser.testing.wire.judge`. Every hostile message goes on a fresh connection.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..protocol import payloads as P
from ..protocol.enums import BlkFeature, FrontendRequest, NetFeature, ProtocolFeature
from ..protocol.enums import VirtioFeature as VF
from ..protocol.table import FRONTEND_RULES, Fds, Reply
from ..virtio.blk import BlkConfig, blk_config_size
from ..virtq import split_layout
from .outcome import expect, fail, skip
from .registry import Ctx, check
from .rig import STATUS_FEATURES_OK, Rig, Session, choose_features
from .wire import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    FLAG_VERSION,
    U64,
    Verdict,
    judge,
    message,
    verdict_text,
)

R = FrontendRequest
PF = ProtocolFeature
NF = NetFeature
BF = BlkFeature
REPLY_FLAGS = FLAG_VERSION | FLAG_REPLY

SPEC = "vhost-user.rst"


# -- hostile cases ------------------------------------------------------------------------------

Build = Callable[[Ctx, Session, Rig | None, int], tuple[bytes, list[int]]]
"""Makes a case's message and fds from the context, the session, the rig (level
``memory``) and the header flags to use (0x9 with REPLY_ACK, else 0x1)."""


@dataclass(frozen=True)
class Case:
    """One message a conforming back-end refuses.

    ``level``: how far the handshake goes first (``none``, ``protocol``, ``owner``,
    ``features``, or ``memory``: features and guest RAM shared). ``eof``: half-close after
    sending (a message cut short): the back-end must close. ``has_reply``: the request has
    a reply of its own (no NEED_REPLY; answering it counts as accepting it).
    """

    name: str
    level: str
    build: Build
    has_reply: bool = False
    eof: bool = False
    ack: bool = True
    add_pf: int = 0
    remove_pf: int = 0
    features_kw: dict[str, bool] = field(default_factory=dict)
    features: int | None = None


def run_cases(ctx: Ctx, cases: Sequence[Case], what: str) -> None:
    """Run every case on its own connection; FAIL listing the ones not refused.

    Raises:
        CheckFailed: some case was not refused, or the back-end died (named).
    """
    bad: list[str] = []
    for case in cases:
        with ctx.sub(f"case {case.name}"):
            verdict, detail = _run_case(ctx, case)
            if not verdict.refused:
                bad.append(f"{case.name}: {verdict_text(verdict, detail)}")
    if bad:
        fail(f"{len(bad)} of {len(cases)} {what} not refused: " + "; ".join(bad))
    ctx.notes.append(f"{len(cases)} {what} refused")


def _run_case(ctx: Ctx, case: Case) -> tuple[Verdict, str]:
    if case.level == "none":
        s = ctx.connect()
    else:
        upto = "features" if case.level == "memory" else case.level
        s = ctx.session(upto=upto, add_pf=case.add_pf, remove_pf=case.remove_pf,
                        features=case.features, **case.features_kw)
    rig: Rig | None = None
    if case.level in ("memory", "protocol", "owner", "features"):
        rig = ctx.rig(s)
        if case.level == "memory":
            rig.share()
    flags = FLAG_VERSION | FLAG_NEED_REPLY if s.reply_ack and case.ack and not case.has_reply \
        else FLAG_VERSION
    data, fds = case.build(ctx, s, rig, flags)
    try:
        if case.eof:
            try:
                s.wire.send(data, fds)
                s.wire.sock.shutdown(socket.SHUT_WR)
            except OSError:
                return Verdict.CLOSED, "connection closed"
            if s.wire.closed_within(s.timeout):
                return Verdict.CLOSED, "connection closed"
            return Verdict.SILENT, f"the connection stayed open {s.timeout:g} s after EOF"
        return judge(s.wire, data, fds, has_reply=case.has_reply)
    finally:
        ctx.drop(s)
        ctx.close_fds()


def fixed(data: bytes) -> Build:
    """A case whose message needs nothing from the session."""
    return lambda ctx, s, rig, flags: (data, [])


# -- valid requests (the starting point of the table checks) ------------------------------------

MAC = int.from_bytes(bytes.fromhex("02000000c4ec") + b"\0\0", "little")


def ring0_addr(rig: Rig, index: int = 0) -> P.VringAddr:
    """Ring ``index``'s areas (laid out as the rig does) as SET_VRING_ADDR."""
    d, a, u, _ = split_layout(rig.queue_size, index * 0x10000)
    return P.VringAddr(index=index, flags=0, desc=rig.mem.uva(d), used=rig.mem.uva(u),
                       avail=rig.mem.uva(a), log=0)


def valid_message(ctx: Ctx, s: Session, rig: Rig, req: FrontendRequest
                  ) -> tuple[bytes, list[int]] | None:
    """A well-formed ``req`` for a session whose memory is shared (None: the checks do not
    form this request)."""
    region = rig.mem.table()[0]
    if req in (R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM, R.GET_MAX_MEM_SLOTS,
               R.GET_STATUS, R.SET_OWNER):
        return b"", []
    if req is R.SET_FEATURES:
        return U64.pack(s.features), []
    if req is R.SET_PROTOCOL_FEATURES:
        return U64.pack(s.pf), []
    if req is R.SET_MEM_TABLE:
        return P.MemoryTable(regions=(region,)).encode(), [rig.ram.fd]
    if req in (R.SET_VRING_NUM,):
        return P.VringState(index=0, num=rig.queue_size).encode(), []
    if req in (R.SET_VRING_BASE, R.GET_VRING_BASE):
        return P.VringState(index=0, num=0).encode(), []
    if req is R.SET_VRING_ADDR:
        return ring0_addr(rig).encode(), []
    if req in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR):
        return P.VringFile(index=0).encode(), [ctx.eventfd()]
    if req is R.SET_VRING_ENABLE:
        return P.VringState(index=0, num=1).encode(), []
    if req is R.SEND_RARP:
        return U64.pack(MAC), []
    if req is R.NET_SET_MTU:
        return U64.pack(1500), []
    if req is R.SET_BACKEND_REQ_FD:
        return b"", [ctx.socket_fd()]
    if req is R.GET_CONFIG:
        return P.ConfigPayload(offset=0, size=8, flags=0, data=bytes(8)).encode(), []
    if req is R.GET_INFLIGHT_FD:
        return P.InflightPayload(mmap_size=0, mmap_offset=0, num_queues=1,
                                 queue_size=rig.queue_size).encode(), []
    if req is R.ADD_MEM_REG:
        extra = P.MemoryRegion(guest_phys_addr=1 << 32, memory_size=1 << 20,
                               userspace_addr=0x7E00_0000_0000, mmap_offset=0)
        return P.SingleRegion(region=extra).encode(), [ctx.memfd(1 << 20)]
    if req is R.REM_MEM_REG:
        return P.SingleRegion(region=region).encode(), []
    if req is R.SET_STATUS:
        return U64.pack(STATUS_FEATURES_OK), []
    if req is R.SET_LOG_BASE:
        return P.LogBase(mmap_size=4096, mmap_offset=0).encode(), [ctx.memfd(4096)]
    return None


TABLE_PF = int(PF.BACKEND_REQ | PF.INFLIGHT_SHMFD)
"""Protocol features negotiated on top of the defaults in the table checks, so that the
requests they gate are legal there."""


FORMED = frozenset({
    R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM, R.GET_MAX_MEM_SLOTS,
    R.GET_STATUS, R.SET_OWNER, R.SET_FEATURES, R.SET_PROTOCOL_FEATURES, R.SET_MEM_TABLE,
    R.SET_VRING_NUM, R.SET_VRING_BASE, R.GET_VRING_BASE, R.SET_VRING_ADDR, R.SET_VRING_KICK,
    R.SET_VRING_CALL, R.SET_VRING_ERR, R.SET_VRING_ENABLE, R.SEND_RARP, R.NET_SET_MTU,
    R.SET_BACKEND_REQ_FD, R.GET_CONFIG, R.GET_INFLIGHT_FD, R.ADD_MEM_REG, R.REM_MEM_REG,
    R.SET_STATUS, R.SET_LOG_BASE,
})
"""The requests :func:`valid_message` forms (the others are left out of the table checks:
deprecated, device types other than net and blk, migration and postcopy, IOMMU)."""


def legal_requests(ctx: Ctx) -> list[FrontendRequest]:
    """Requests the checks form whose gate the back-end offers (the table checks then
    negotiate it), in id order."""
    offer = ctx.offer
    out: list[FrontendRequest] = []
    for req, rule in FRONTEND_RULES.items():
        if req not in FORMED:
            continue
        if req is R.SET_LOG_BASE and not offer.has_pf(PF.LOG_SHMFD):
            continue
        if req in (R.SEND_RARP, R.NET_SET_MTU) and ctx.device != "net":
            continue
        if req is R.GET_INFLIGHT_FD and ctx.device != "blk":
            continue
        gate = rule.gate
        if isinstance(gate, ProtocolFeature):
            if not offer.has_pf(gate):
                continue
        elif gate is not None and not offer.has(int(gate)):
            continue
        out.append(req)
    return out


def _mutated(req: FrontendRequest, mutate: Callable[[Ctx, bytes, list[int]],
                                                    tuple[bytes, list[int]] | None],
             label: str, level: str = "memory") -> Case | None:
    rule = FRONTEND_RULES[req]

    def build(ctx: Ctx, s: Session, rig: Rig | None, flags: int) -> tuple[bytes, list[int]]:
        assert rig is not None
        valid = valid_message(ctx, s, rig, req)
        assert valid is not None
        got = mutate(ctx, *valid)
        assert got is not None
        payload, fds = got
        return message(req, payload, flags=flags), fds

    return Case(f"{req.name} {label}", level, build, has_reply=rule.reply is Reply.ALWAYS,
                add_pf=TABLE_PF)


# -- HS: handshake and feature words --------------------------------------------------------


@check("HS-01", "GET_FEATURES is answered with one u64, flags 0x5, the request's id and no fd",
       f"{SPEC}: Message specification (header, REPLY flag); GET_FEATURES")
def hs_get_features(ctx: Ctx) -> None:
    s = ctx.connect()
    m = s.wire.exchange(R.GET_FEATURES)
    expect(m.request == R.GET_FEATURES, f"reply names request {m.request}, not 1")
    expect(m.flags == REPLY_FLAGS, f"reply flags {m.flags:#x}, not 0x5 (version 1 | REPLY)")
    expect(len(m.payload) == 8, f"reply payload of {len(m.payload)} bytes, not 8")
    expect(m.nfds == 0, f"reply carries {m.nfds} fds")


@check("HS-02", "the offered feature words are the same on every read and every connection",
       f"{SPEC}: GET_FEATURES, GET_PROTOCOL_FEATURES")
def hs_stable(ctx: Ctx) -> None:
    seen: list[tuple[int, int]] = []
    for _ in range(2):
        s = ctx.connect()
        for _ in range(2):
            f = s.wire.get_u64(R.GET_FEATURES)
            pf = s.wire.get_u64(R.GET_PROTOCOL_FEATURES) if f & VF.PROTOCOL_FEATURES else 0
            seen.append((f, pf))
        ctx.drop(s)
    expect(len(set(seen)) == 1, "the offer changed: " + ", ".join(
        f"{f:#x}/{pf:#x}" for f, pf in seen))


@check("HS-03", "with bit 30 offered, GET_PROTOCOL_FEATURES is answered with one u64 "
       "before SET_FEATURES and SET_OWNER",
       f"{SPEC}: GET_PROTOCOL_FEATURES; Protocol features")
def hs_protocol_features(ctx: Ctx) -> None:
    ctx.require_feature(int(VF.PROTOCOL_FEATURES), "VHOST_USER_F_PROTOCOL_FEATURES (bit 30)")
    s = ctx.connect()
    s.wire.get_u64(R.GET_FEATURES)
    m = s.wire.exchange(R.GET_PROTOCOL_FEATURES)
    expect(m.request == R.GET_PROTOCOL_FEATURES and m.flags == REPLY_FLAGS
           and len(m.payload) == 8 and m.nfds == 0,
           f"GET_PROTOCOL_FEATURES answered with {m.describe()}")


_NET_NEEDS: list[tuple[NF, tuple[NF, ...]]] = [
    (NF.GUEST_TSO4, (NF.GUEST_CSUM,)), (NF.GUEST_TSO6, (NF.GUEST_CSUM,)),
    (NF.GUEST_ECN, (NF.GUEST_TSO4, NF.GUEST_TSO6)), (NF.GUEST_UFO, (NF.GUEST_CSUM,)),
    (NF.HOST_TSO4, (NF.CSUM,)), (NF.HOST_TSO6, (NF.CSUM,)),
    (NF.HOST_ECN, (NF.HOST_TSO4, NF.HOST_TSO6)), (NF.HOST_UFO, (NF.CSUM,)),
    (NF.CTRL_RX, (NF.CTRL_VQ,)), (NF.CTRL_VLAN, (NF.CTRL_VQ,)),
    (NF.GUEST_ANNOUNCE, (NF.CTRL_VQ,)), (NF.MQ, (NF.CTRL_VQ,)),
    (NF.CTRL_MAC_ADDR, (NF.CTRL_VQ,)), (NF.CTRL_GUEST_OFFLOADS, (NF.CTRL_VQ,)),
    (NF.GUEST_USO4, (NF.GUEST_CSUM,)), (NF.GUEST_USO6, (NF.GUEST_CSUM,)),
    (NF.HOST_USO, (NF.CSUM,)), (NF.RSS, (NF.CTRL_VQ,)),
    (NF.RSC_EXT, (NF.HOST_TSO4, NF.HOST_TSO6)),
]


@check("HS-04", "the offer is coherent: INBAND_NOTIFICATIONS and ACCESS_PLATFORM come with "
       "BACKEND_REQ and REPLY_ACK, and no device bit is offered without the bits it needs",
       f"{SPEC}: Protocol features (INBAND_NOTIFICATIONS), IOMMU support; virtio 1.2 §2.2.1 "
       "(a device must not offer a feature that requires one it does not offer), §5.1.3.1")
def hs_coherent(ctx: Ctx) -> None:
    offer = ctx.offer
    problems: list[str] = []
    needs = int(PF.BACKEND_REQ | PF.REPLY_ACK)
    if offer.has_pf(PF.INBAND_NOTIFICATIONS) and offer.protocol_features & needs != needs:
        problems.append("INBAND_NOTIFICATIONS without BACKEND_REQ and REPLY_ACK")
    if offer.features & VF.ACCESS_PLATFORM and offer.protocol_features & needs != needs:
        problems.append("ACCESS_PLATFORM (IOMMU) without BACKEND_REQ and REPLY_ACK")
    if ctx.device == "net":
        for bit, alternatives in _NET_NEEDS:
            if offer.features & bit and not any(offer.features & a for a in alternatives):
                need = " or ".join(str(a.name) for a in alternatives)
                problems.append(f"{bit.name} without {need}")
    expect(not problems, "; ".join(problems))


@check("HS-05", "QEMU's handshake is accepted: GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, "
       "GET_MAX_MEM_SLOTS, SET_BACKEND_REQ_FD, SET_OWNER, SET_FEATURES, SET_STATUS, acked "
       "with REPLY_ACK", f"{SPEC}: Starting and stopping rings; QEMU hw/virtio/vhost-user.c")
def hs_qemu_handshake(ctx: Ctx) -> None:
    s = ctx.session(upto="protocol", add_pf=int(PF.BACKEND_REQ))
    fe = s.fe
    if s.has(PF.MQ):
        fe.get_u64(R.GET_QUEUE_NUM)
    if s.has(PF.CONFIGURE_MEM_SLOTS):
        fe.get_u64(R.GET_MAX_MEM_SLOTS)
    if s.has(PF.BACKEND_REQ):
        s.open_backend_channel()
    fe.send(R.SET_OWNER)
    fe.send(R.SET_FEATURES, P.U64Payload(value=ctx_features(ctx, s)))
    if s.has(PF.STATUS):
        fe.send(R.SET_STATUS, P.U64Payload(value=STATUS_FEATURES_OK))
    s.sync()


def ctx_features(ctx: Ctx, s: Session) -> int:
    """The features the checks ack by default."""
    return choose_features(ctx.device, s.offered)


@check("HS-06", "GET_QUEUE_NUM (MQ) and GET_MAX_MEM_SLOTS (CONFIGURE_MEM_SLOTS) answer "
       "usable counts (at least 1; slots at most 512, QEMU's limit)",
       f"{SPEC}: GET_QUEUE_NUM, GET_MAX_MEM_SLOTS")
def hs_counts(ctx: Ctx) -> None:
    if not (ctx.offer.has_pf(PF.MQ) or ctx.offer.has_pf(PF.CONFIGURE_MEM_SLOTS)):
        skip("neither MQ nor CONFIGURE_MEM_SLOTS offered")
    s = ctx.session(upto="owner")
    if s.queue_num is not None:
        expect(1 <= s.queue_num <= 0x8000, f"GET_QUEUE_NUM answered {s.queue_num}")
        ctx.notes.append(f"queues {s.queue_num}")
    if s.max_slots is not None:
        expect(1 <= s.max_slots <= 512, f"GET_MAX_MEM_SLOTS answered {s.max_slots}")
        ctx.notes.append(f"memory slots {s.max_slots}")


@check("HS-07", "GET_CONFIG answers the range asked for, the same bytes on every read and "
       "for any sub-range; blk: capacity > 0, blk_size a power of two >= 512, queues >= 1",
       f"{SPEC}: GET_CONFIG; virtio 1.2 §5.2.4 (virtio-blk configuration layout)")
def hs_config(ctx: Ctx) -> None:
    ctx.require_pf(PF.CONFIG)
    s = ctx.session()
    size = blk_config_size(s.features) if ctx.device == "blk" else 8
    whole = s.fe.get_config(0, size)
    again = s.fe.get_config(0, size)
    expect(whole == again, f"two reads of config 0+{size} differ: {whole.hex()} / {again.hex()}")
    part = s.fe.get_config(4, 4)
    expect(part == whole[4:8], f"config 4+4 reads {part.hex()}, the whole read has "
           f"{whole[4:8].hex()} there")
    if ctx.device == "blk":
        cfg = BlkConfig.decode(whole)
        expect(cfg.capacity > 0, "capacity 0")
        if s.features & BF.BLK_SIZE:
            bs = cfg.blk_size
            expect(bs >= 512 and bs & (bs - 1) == 0, f"blk_size {bs}")
        if s.features & BF.SEG_MAX:
            expect(cfg.seg_max >= 1, f"seg_max {cfg.seg_max} with SEG_MAX offered")
        if s.features & BF.MQ:
            expect(cfg.num_queues >= 1, f"num_queues {cfg.num_queues} with MQ offered")


@check("HS-08", "SET_STATUS is acked and GET_STATUS returns the status set",
       f"{SPEC}: SET_STATUS, GET_STATUS")
def hs_status(ctx: Ctx) -> None:
    ctx.require_pf(PF.STATUS)
    s = ctx.session()
    got = s.fe.get_u64(R.GET_STATUS)
    expect(got & 0xFF == STATUS_FEATURES_OK,
           f"GET_STATUS answered {got:#x} after SET_STATUS {STATUS_FEATURES_OK:#x}")


def _unoffered(offered: int, candidates: Sequence[int]) -> int | None:
    return next((b for b in candidates if not offered >> b & 1), None)


@check("HS-09", "a feature word with bits never offered is refused (SET_FEATURES, "
       "SET_PROTOCOL_FEATURES)",
       f"{SPEC}: SET_FEATURES, SET_PROTOCOL_FEATURES; virtio 1.2 §2.2 (drivers must not "
       "accept unoffered features)")
def hs_unoffered(ctx: Ctx) -> None:
    offer = ctx.offer
    cases: list[Case] = []
    fbit = _unoffered(offer.features, [45, 46, 47, 44, 43, 42, 31, 25])
    if fbit is not None:
        def bad_features(ctx: Ctx, s: Session, rig: Rig | None, flags: int,
                         bit: int = fbit) -> tuple[bytes, list[int]]:
            want = ctx_features(ctx, s) | 1 << bit
            return message(R.SET_FEATURES, U64.pack(want), flags=flags), []
        cases.append(Case(f"SET_FEATURES with bit {fbit}", "owner", bad_features))
    if offer.features & VF.PROTOCOL_FEATURES:
        pbit = _unoffered(offer.protocol_features, [40, 41, 42, 30, 28, 24])
        if pbit is not None:
            cases.append(Case(f"SET_PROTOCOL_FEATURES with bit {pbit}", "none",
                              _bad_pf(pbit), ack=False))
    if not cases:
        skip("every candidate bit is offered")
    run_cases(ctx, cases, "feature words with unoffered bits")


def _bad_pf(bit: int) -> Build:
    def build(ctx: Ctx, s: Session, rig: Rig | None, flags: int) -> tuple[bytes, list[int]]:
        s.wire.get_u64(R.GET_FEATURES)
        pf = s.wire.get_u64(R.GET_PROTOCOL_FEATURES)
        return message(R.SET_PROTOCOL_FEATURES, U64.pack(pf | 1 << bit)), []
    return build


# -- ACK: REPLY_ACK ------------------------------------------------------------------------------


def _setup_requests(ctx: Ctx, s: Session, rig: Rig) -> list[tuple[FrontendRequest, bytes,
                                                                   list[int]]]:
    """The requests of a ring set-up, in QEMU's order, as raw messages."""
    region = rig.mem.table()[0]
    out: list[tuple[FrontendRequest, bytes, list[int]]] = []
    if s.has(PF.CONFIGURE_MEM_SLOTS):
        out.append((R.ADD_MEM_REG, P.SingleRegion(region=region).encode(), [rig.ram.fd]))
    else:
        out.append((R.SET_MEM_TABLE, P.MemoryTable(regions=(region,)).encode(), [rig.ram.fd]))
    out += [
        (R.SET_VRING_NUM, P.VringState(index=0, num=rig.queue_size).encode(), []),
        (R.SET_VRING_BASE, P.VringState(index=0, num=0).encode(), []),
        (R.SET_VRING_ADDR, ring0_addr(rig).encode(), []),
        (R.SET_VRING_CALL, P.VringFile(index=0).encode(), [ctx.eventfd()]),
        (R.SET_VRING_ERR, P.VringFile(index=0).encode(), [ctx.eventfd()]),
        (R.SET_VRING_KICK, P.VringFile(index=0).encode(), [ctx.eventfd()]),
    ]
    if s.features & VF.PROTOCOL_FEATURES:
        out.append((R.SET_VRING_ENABLE, P.VringState(index=0, num=1).encode(), []))
    return out


@check("ACK-01", "with REPLY_ACK negotiated, every request of the handshake and ring set-up "
       "sent with NEED_REPLY gets a zero ack: flags 0x5, its id, 8 bytes",
       f"{SPEC}: REPLY_ACK")
def ack_all(ctx: Ctx) -> None:
    ctx.require_pf(PF.REPLY_ACK)
    s = ctx.session(upto="protocol")
    rig = ctx.rig(s)
    w = s.wire
    bad: list[str] = []
    steps: list[tuple[FrontendRequest, bytes, list[int]]] = [
        (R.SET_OWNER, b"", []), (R.SET_FEATURES, U64.pack(ctx_features(ctx, s)), [])]
    s.features = ctx_features(ctx, s)
    steps += _setup_requests(ctx, s, rig)
    for req, payload, fds in steps:
        ctx.check_time()
        m = w.exchange(req, payload, fds, flags=FLAG_VERSION | FLAG_NEED_REPLY)
        if m.request != req or m.flags != REPLY_FLAGS or m.u64 != 0:
            bad.append(f"{req.name}: {m.describe()}" + (f" value {m.u64:#x}" if m.u64 else ""))
    expect(not bad, "; ".join(bad))


@check("ACK-02", "without NEED_REPLY no ack is sent (REPLY_ACK negotiated or not): the "
       "next reply is the next request's",
       f"{SPEC}: REPLY_ACK (an ack only when NEED_REPLY is set)")
def ack_none_unasked(ctx: Ctx) -> None:
    variants = [("REPLY_ACK negotiated", 0)]
    if ctx.offer.has_pf(PF.REPLY_ACK):
        variants.append(("REPLY_ACK not negotiated", int(PF.REPLY_ACK)))
    for label, remove in variants:
        with ctx.sub(label):
            s = ctx.session(upto="protocol", remove_pf=remove)
            rig = ctx.rig(s)
            w = s.wire
            s.features = ctx_features(ctx, s)
            steps: list[tuple[FrontendRequest, bytes, list[int]]] = [
                (R.SET_OWNER, b"", []), (R.SET_FEATURES, U64.pack(s.features), [])]
            steps += _setup_requests(ctx, s, rig)
            for req, payload, fds in steps:
                w.send(message(req, payload), fds)
                m = w.exchange(R.GET_FEATURES)
                expect(m.request == R.GET_FEATURES and m.flags == REPLY_FLAGS,
                       f"{label}: after {req.name} without NEED_REPLY the next message was "
                       f"{m.describe()}, not GET_FEATURES' reply")
            ctx.drop(s)


@check("ACK-03", "a request with a reply of its own and NEED_REPLY set gets that reply only, "
       "no extra ack", f"{SPEC}: REPLY_ACK (\"the reply ... is the ack\")")
def ack_own_reply(ctx: Ctx) -> None:
    ctx.require_pf(PF.REPLY_ACK)
    s = ctx.session()
    w = s.wire
    asks: list[tuple[FrontendRequest, bytes]] = [(R.GET_FEATURES, b"")]
    if s.has(PF.MQ):
        asks.append((R.GET_QUEUE_NUM, b""))
    if s.has(PF.CONFIG):
        asks.append((R.GET_CONFIG, P.ConfigPayload(offset=0, size=4, flags=0,
                                                   data=bytes(4)).encode()))
    for req, payload in asks:
        first = w.exchange(req, payload, flags=FLAG_VERSION | FLAG_NEED_REPLY)
        expect(first.request == req and first.flags == REPLY_FLAGS,
               f"{req.name} with NEED_REPLY answered with {first.describe()}")
        nxt = w.exchange(R.GET_PROTOCOL_FEATURES)
        expect(nxt.request == R.GET_PROTOCOL_FEATURES,
               f"after {req.name}'s reply came another message first: {nxt.describe()}")


@check("ACK-04", "a request the back-end cannot carry out, sent with NEED_REPLY, is NACKed "
       "(non-zero u64) rather than left unanswered", f"{SPEC}: REPLY_ACK (failure: non-zero)")
def ack_nack(ctx: Ctx) -> None:
    ctx.require_pf(PF.REPLY_ACK)
    s = ctx.session()
    rig = ctx.rig(s)
    region = P.MemoryRegion(guest_phys_addr=0, memory_size=1 << 20,
                            userspace_addr=rig.ram.uva, mmap_offset=0)
    if s.has(PF.CONFIGURE_MEM_SLOTS):
        data = message(R.ADD_MEM_REG, P.SingleRegion(region=region).encode(),
                       flags=FLAG_VERSION | FLAG_NEED_REPLY)
    else:
        data = message(R.SET_MEM_TABLE, P.MemoryTable(regions=(region,)).encode(),
                       flags=FLAG_VERSION | FLAG_NEED_REPLY)
    verdict, detail = judge(s.wire, data, [ctx.pipe()], need_reply=True)
    expect(verdict is Verdict.NACK,
           f"guest memory in a pipe (it cannot be mapped): {verdict_text(verdict, detail)}")


# -- RT: the per-request rules of the protocol table ------------------------------------------


@check("RT-01", "every request with a reply gets one of the table's size and fd count, "
       "flags 0x5 and the request's id",
       f"{SPEC}: Front-end message types (reply payloads)", timeout=90)
def rt_replies(ctx: Ctx) -> None:
    s = ctx.session(add_pf=TABLE_PF)
    rig = ctx.rig(s)
    rig.share()
    bad: list[str] = []
    for req in legal_requests(ctx):
        rule = FRONTEND_RULES[req]
        if rule.reply is not Reply.ALWAYS or req is R.GET_VRING_BASE:
            continue
        ctx.check_time()
        got = valid_message(ctx, s, rig, req)
        if got is None:
            continue
        m = s.wire.exchange(req, *got)
        want = 12 + 8 if rule.reply_payload is P.ConfigPayload else (
            rule.reply_payload.SIZE if rule.reply_payload is not None else 0)
        if (m.request, m.flags, len(m.payload), m.nfds) != (req, REPLY_FLAGS, want,
                                                           rule.reply_fds):
            bad.append(f"{req.name}: {m.describe()} (want {want} bytes, "
                       f"{rule.reply_fds} fds)")
    # GET_VRING_BASE last: it stops the ring (and with it, for some, the device).
    for index in rig.default_rings():
        rig.vring(index)
    rig.driver_ok()
    m = s.wire.exchange(R.GET_VRING_BASE, P.VringState(index=0, num=0).encode())
    if (m.request, m.flags, len(m.payload), m.nfds) != (R.GET_VRING_BASE, REPLY_FLAGS, 8, 0):
        bad.append(f"GET_VRING_BASE: {m.describe()}")
    elif P.VringState.decode(m.payload).index != 0:
        bad.append(f"GET_VRING_BASE 0 answered for ring {P.VringState.decode(m.payload).index}")
    expect(not bad, "; ".join(bad))


def _short(ctx: Ctx, payload: bytes, fds: list[int]) -> tuple[bytes, list[int]] | None:
    return (payload[:-4], fds) if len(payload) >= 8 else None


def _long(ctx: Ctx, payload: bytes, fds: list[int]) -> tuple[bytes, list[int]] | None:
    return payload + bytes(8), fds


@check("RT-02", "a request whose payload is 4 bytes short or 8 bytes long for its type is "
       "refused", f"{SPEC}: Front-end message types (payload of each request)", timeout=180)
def rt_payload_size(ctx: Ctx) -> None:
    cases: list[Case] = []
    for req in legal_requests(ctx):
        probe = FRONTEND_RULES[req].payload
        for label, mut in (("4 bytes short", _short), ("8 bytes long", _long)):
            if label.startswith("4") and probe.SIZE == 0:
                continue
            case = _mutated(req, mut, label)
            if case is not None:
                cases.append(case)
    run_cases(ctx, cases, "requests with a payload of the wrong size")


def _plus_fd(ctx: Ctx, payload: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
    return payload, [*fds, ctx.eventfd()]


def _no_fd(ctx: Ctx, payload: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
    return payload, []


def _nofd_bit_with_fd(ctx: Ctx, payload: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
    return U64.pack(U64.unpack(payload)[0] | P.VRING_NOFD), fds


def _two_regions_one_fd(ctx: Ctx, payload: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
    table = P.MemoryTable.decode(payload)
    r = table.regions[0]
    second = P.MemoryRegion(guest_phys_addr=r.guest_phys_addr + (1 << 32),
                            memory_size=r.memory_size, userspace_addr=r.userspace_addr + (1 << 40),
                            mmap_offset=0)
    return P.MemoryTable(regions=(r, second)).encode(), fds


@check("RT-03", "a request carrying the wrong number of fds is refused (one where none is "
       "taken, none or two where one is, the NOFD bit contradicted, fewer fds than regions)",
       f"{SPEC}: Front-end message types (ancillary data of each request)", timeout=180)
def rt_fds(ctx: Ctx) -> None:
    cases: list[Case] = []
    for req in legal_requests(ctx):
        rule = FRONTEND_RULES[req]
        muts: list[tuple[str, Callable[..., Any]]] = []
        if rule.fds is Fds.NONE:
            muts.append(("with an fd", _plus_fd))
        elif rule.fds is Fds.ONE:
            muts += [("without its fd", _no_fd), ("with two fds", _plus_fd)]
        elif rule.fds is Fds.NOFD_BIT:
            muts += [("without its fd", _no_fd), ("with NOFD and an fd", _nofd_bit_with_fd)]
        elif rule.fds is Fds.PER_REGION:
            muts += [("with fewer fds than regions", _two_regions_one_fd),
                     ("with more fds than regions", _plus_fd)]
        elif rule.fds is Fds.OPTIONAL:
            muts.append(("with two fds", lambda c, p, f: (p, [c.eventfd(), c.eventfd()])))
        for label, mut in muts:
            case = _mutated(req, mut, label)
            if case is not None:
                cases.append(case)
    run_cases(ctx, cases, "requests with the wrong fds")


@check("RT-04", "a request whose protocol feature was offered but not negotiated is refused "
       "(and SET_VRING_ENABLE when bit 30 was not acked)",
       f"{SPEC}: Front-end message types (\"only legal if ... negotiated\")", timeout=180)
def rt_gates(ctx: Ctx) -> None:
    cases: list[Case] = []
    for req in legal_requests(ctx):
        rule = FRONTEND_RULES[req]
        gate = rule.gate
        if isinstance(gate, ProtocolFeature) and gate is not PF.REPLY_ACK:
            base = _mutated(req, lambda c, p, f: (p, f), f"without {gate.name}")
            if base is not None:
                cases.append(Case(base.name, base.level, base.build, has_reply=base.has_reply,
                                  add_pf=TABLE_PF & ~int(gate), remove_pf=int(gate)))
    if ctx.offer.has(int(VF.PROTOCOL_FEATURES)):
        base = _mutated(R.SET_VRING_ENABLE, lambda c, p, f: (p, f), "without bit 30 acked")
        assert base is not None
        cases.append(Case(base.name, base.level, base.build,
                          features_kw={"protocol": False}))
    if not cases:
        skip("no gated request the back-end offers")
    run_cases(ctx, cases, "requests whose feature was not negotiated")


def _ring_index_case(req: FrontendRequest, index: int, label: str) -> Case:
    rule = FRONTEND_RULES[req]

    def build(ctx: Ctx, s: Session, rig: Rig | None, flags: int) -> tuple[bytes, list[int]]:
        assert rig is not None
        if rule.payload is P.VringFile:
            return message(req, U64.pack(index), flags=flags), [ctx.eventfd()]
        if rule.payload is P.VringAddr:
            a = ring0_addr(rig)
            return message(req, P.VringAddr(index=index, flags=0, desc=a.desc, used=a.used,
                                            avail=a.avail, log=0).encode(), flags=flags), []
        num = 1 if req is R.SET_VRING_ENABLE else (rig.queue_size if req is R.SET_VRING_NUM
                                                   else 0)
        return message(req, struct.pack("<II", index, num), flags=flags), []

    return Case(f"{req.name} ring {label}", "memory", build,
                has_reply=rule.reply is Reply.ALWAYS)


@check("RT-05", "a ring request naming a ring beyond the device's queues is refused",
       f"{SPEC}: Front-end message types (vring index); SECURITY: indices bounded",
       timeout=120)
def rt_ring_index(ctx: Ctx) -> None:
    probe = ctx.session(upto="owner")
    first = probe.first_ring_out_of_range()
    ctx.drop(probe)
    cases: list[Case] = []
    for req in legal_requests(ctx):
        rule = FRONTEND_RULES[req]
        if not rule.ring_index:
            continue
        if rule.payload is P.VringFile:
            if first <= 0xFF:
                cases.append(_ring_index_case(req, first, str(first)))
        else:
            cases.append(_ring_index_case(req, first, str(first)))
            cases.append(_ring_index_case(req, 0xFFFF_FFFF, "0xffffffff"))
    run_cases(ctx, cases, "ring requests beyond the queues")


def _early(req: FrontendRequest, level: str) -> Case:
    rule = FRONTEND_RULES[req]

    def build(ctx: Ctx, s: Session, rig: Rig | None, flags: int) -> tuple[bytes, list[int]]:
        assert rig is not None
        got = valid_message(ctx, s, rig, req)
        assert got is not None
        return message(req, got[0], flags=flags), got[1]

    return Case(f"{req.name} before {'SET_OWNER' if level == 'protocol' else 'SET_FEATURES'}",
                level, build, has_reply=rule.reply is Reply.ALWAYS)


@check("RT-06", "ring and memory requests before SET_OWNER are refused",
       f"{SPEC}: SET_OWNER (\"issued when a new connection is established\", before any "
       "other request that configures the device)", timeout=90)
def rt_owner(ctx: Ctx) -> None:
    wanted = [R.SET_MEM_TABLE, R.SET_VRING_NUM, R.SET_VRING_CALL, R.SET_VRING_KICK]
    if ctx.offer.has_pf(PF.STATUS):
        wanted.append(R.SET_STATUS)
    run_cases(ctx, [_early(r, "protocol") for r in wanted], "requests before SET_OWNER")


@check("RT-07", "memory and ring requests before SET_FEATURES are refused",
       f"{SPEC}: Starting and stopping rings (features are set before the rings)",
       timeout=90)
def rt_features_first(ctx: Ctx) -> None:
    wanted = [R.SET_MEM_TABLE, R.SET_VRING_NUM, R.SET_VRING_ADDR, R.SET_VRING_BASE]
    if ctx.offer.has_pf(PF.CONFIGURE_MEM_SLOTS):
        wanted.append(R.ADD_MEM_REG)
    run_cases(ctx, [_early(r, "owner") for r in wanted], "requests before SET_FEATURES")


# -- HOS: hostile framing ---------------------------------------------------------------------


@check("HOS-01", "a message cut short (header or payload) followed by EOF ends the "
       "connection, nothing else", "docs/security.md: Framing and fds; vhost-user.rst: Message "
       "specification")
def hos_truncated(ctx: Ctx) -> None:
    run_cases(ctx, [
        Case("5-byte header, EOF", "none", fixed(b"\x01\x00\x00\x00\x01"), eof=True),
        Case("SET_FEATURES with 3 of 8 payload bytes, EOF", "owner",
             fixed(message(R.SET_FEATURES, bytes(3), size=8)), eof=True),
    ], "truncated messages")


@check("HOS-02", "a header announcing a payload larger than any request's (1 MiB, 4 GiB) is "
       "refused at once, not waited for", "vhost-user.rst: Message specification (payload "
       "sizes); QEMU rejects payloads larger than its union")
def hos_oversize(ctx: Ctx) -> None:
    run_cases(ctx, [
        Case("size 0x100000", "none", fixed(message(R.GET_FEATURES, size=0x100000))),
        Case("size 0xffffffff", "none", fixed(message(R.GET_FEATURES, size=0xFFFF_FFFF))),
    ], "oversized headers")


@check("HOS-03", "a header with version bits other than 1, reserved flag bits, or the REPLY "
       "flag on a request is refused",
       "vhost-user.rst: Message specification (flags: version 0x1, REPLY 0x4, NEED_REPLY "
       "0x8; other bits reserved)")
def hos_flags(ctx: Ctx) -> None:
    run_cases(ctx, [
        Case(f"SET_OWNER flags {flags:#x}", "protocol", fixed(message(R.SET_OWNER, flags=flags)))
        for flags in (0x0, 0x2, 0x3, 0x11, 0x5, 0x101)
    ], "headers with bad flags")


@check("HOS-04", "an unknown request id (0, 99, 0xffff) is refused",
       "vhost-user.rst: Front-end message types (ids); REPLY_ACK")
def hos_unknown(ctx: Ctx) -> None:
    def unknown(code: int) -> Build:
        return lambda ctx, s, rig, flags: (message(code, flags=flags), [])
    run_cases(ctx, [Case(f"request {code}", "features", unknown(code))
                    for code in (0, 99, 0xFFFF)], "unknown requests")


@check("HOS-05", "notification and channel fds of the wrong kind are refused: a kick fd "
       "that is a regular file, a call fd that is a socket, a back-end channel that is an "
       "eventfd", "vhost-user.rst: SET_VRING_KICK/CALL (an eventfd), SET_BACKEND_REQ_FD (a "
       "socket); docs/security.md: Order and indices")
def hos_fd_kinds(ctx: Ctx) -> None:
    cases = [
        Case("SET_VRING_KICK with a regular file", "memory",
             lambda c, s, rig, f: (message(R.SET_VRING_KICK, U64.pack(0), flags=f),
                                   [c.memfd(4096)])),
        Case("SET_VRING_CALL with a socket", "memory",
             lambda c, s, rig, f: (message(R.SET_VRING_CALL, U64.pack(0), flags=f),
                                   [c.socket_fd()])),
    ]
    if ctx.offer.has_pf(PF.BACKEND_REQ):
        cases.append(Case("SET_BACKEND_REQ_FD with an eventfd", "protocol",
                          lambda c, s, rig, f: (message(R.SET_BACKEND_REQ_FD, flags=f),
                                                [c.eventfd()]),
                          add_pf=int(PF.BACKEND_REQ)))
    run_cases(ctx, cases, "fds of the wrong kind")
