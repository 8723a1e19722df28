"""Replay the real message traces (traces/vhost-user-trace-*.txt) through both cores.

Each FE->BE line is rebuilt into bytes from its decoded fields (the payload sizes must come
out exactly as logged), then:

* fed to a :class:`FrontendConnection`, which must agree to build exactly those bytes, with
  the trace's BE->FE replies fed back to it;
* fed to our :class:`BackendConnection`, set up to offer what the trace's back-end offered,
  whose replies must match the trace's where they are deterministic.
"""

from __future__ import annotations

import os
import re
import struct
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from vhostuser.connection import events as ev
from vhostuser.connection.backend import BASE_PROTOCOL_FEATURES, BASE_VIRTIO_FEATURES
from vhostuser.connection.frontend import FrontendConnection
from vhostuser.protocol import payloads as P
from vhostuser.protocol.enums import FrontendRequest, VirtioFeature
from vhostuser.protocol.framing import HEADER
from vhostuser.protocol.table import FRONTEND_RULES

from .fakes import FakeDevice, StubRingFactory, make_backend, replies

R = FrontendRequest


def _traces_dir() -> Path:
    """The recorded traces (tests/data/traces, or $VHOSTUSER_TRACES)."""
    env = os.environ.get("VHOSTUSER_TRACES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1] / "data" / "traces"


TRACES_DIR = _traces_dir()
TRACE_FILES = sorted(TRACES_DIR.glob("vhost-user-trace-*.txt"))
assert TRACE_FILES, f"no traces in {TRACES_DIR}"  # a missing copy must fail, not skip

LINE = re.compile(
    r"^\s*(?P<time>[\d.]+)\s+(?P<dir>FE->BE|BE->FE)\s+(?P<name>\w+)"
    r"(?:\s+flags=(?P<flags>0x[0-9a-f]+)(?:\s+\(reply\))?\s+need_reply=(?P<nr>\d)"
    r"\s+size=(?P<size>\d+)\s+fds=(?P<fds>\d+)\s*(?P<rest>.*?))?\s*$"
)
HEX = r"0x[0-9a-f]+"
REGION = re.compile(rf"gpa=({HEX}) size=({HEX}) uva=({HEX}) off=({HEX})")


@dataclass
class TraceMsg:
    lineno: int
    direction: str
    name: str
    flags: int = 0
    size: int = 0
    nfds: int = 0
    rest: str = ""
    payload: Any = None  # a payload object, or None for a synthesized one
    data: bytes = b""
    synthesized: bool = False

    @property
    def request(self) -> FrontendRequest:
        return FrontendRequest[self.name]

    @property
    def closed(self) -> bool:
        return self.name == "closed"

    def wire(self) -> bytes:
        return HEADER.pack(self.request, self.flags, len(self.data)) + self.data


def _decode_fields(msg: TraceMsg) -> None:
    rest = msg.rest
    req = msg.request
    obj: Any
    if rest.startswith("u64="):
        obj = P.U64Payload(value=int(rest[4:], 16))
    elif rest.startswith("nregions="):
        n = int(rest.split()[0].split("=")[1])
        regions = tuple(
            P.MemoryRegion(guest_phys_addr=int(g, 16), memory_size=int(s, 16),
                           userspace_addr=int(u, 16), mmap_offset=int(o, 16))
            for g, s, u, o in REGION.findall(rest)
        )
        assert len(regions) == n, msg
        obj = P.MemoryTable(regions=regions)
    elif rest.startswith("region "):
        ((g, s, u, o),) = REGION.findall(rest)
        obj = P.SingleRegion(region=P.MemoryRegion(
            guest_phys_addr=int(g, 16), memory_size=int(s, 16), userspace_addr=int(u, 16),
            mmap_offset=int(o, 16)))
    elif rest.startswith("offset="):
        kv = dict(f.split("=", 1) for f in rest.split())
        data = bytes.fromhex(kv["cfg"])
        assert len(data) == int(kv["size"]), msg
        obj = P.ConfigPayload(offset=int(kv["offset"]), size=int(kv["size"]),
                              flags=int(kv["flags"], 0), data=data)
    elif rest.startswith("index="):
        kv = dict(f.split("=", 1) for f in rest.split())
        index = int(kv["index"])
        if "desc" in kv:
            obj = P.VringAddr(index=index, flags=int(kv["flags"], 0), desc=int(kv["desc"], 16),
                              used=int(kv["used"], 16), avail=int(kv["avail"], 16),
                              log=int(kv["log"], 16))
        elif "num" in kv:
            obj = P.VringState(index=index, num=int(kv["num"]))
        else:
            obj = P.VringFile(index=index, nofd=msg.nfds == 0)
    elif re.fullmatch(r"[0-9a-f]+", rest):
        obj = None
        msg.data = bytes.fromhex(rest)
    elif rest == "":
        obj = None
        rule = FRONTEND_RULES[req]
        layout = rule.reply_payload if msg.direction == "BE->FE" else rule.payload
        if msg.size and layout is not None and layout.SIZE not in (None, msg.size):
            raise AssertionError(f"line {msg.lineno}: size {msg.size} for {layout.__name__}")
        msg.data = bytes(msg.size)  # nothing logged: synthesize a payload of the logged size
        msg.synthesized = msg.size > 0
        if msg.size and layout is not None:
            obj = layout.decode(msg.data)
    else:
        raise AssertionError(f"line {msg.lineno}: cannot decode {rest!r}")
    if obj is not None:
        msg.payload = obj
        msg.data = obj.encode()
    elif msg.payload is None and msg.direction == "FE->BE":
        msg.payload = FRONTEND_RULES[req].payload.decode(msg.data)


def parse_trace(path: Path) -> list[TraceMsg]:
    out: list[TraceMsg] = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        m = LINE.match(line)
        assert m is not None, f"{path.name}:{lineno}: {line!r}"
        if m["flags"] is None:
            assert m["name"] == "closed", line
            out.append(TraceMsg(lineno, m["dir"], "closed"))
            continue
        msg = TraceMsg(lineno, m["dir"], m["name"], int(m["flags"], 16), int(m["size"]),
                       int(m["fds"]), m["rest"])
        assert bool(msg.flags & 0x8) == bool(int(m["nr"])), line
        _decode_fields(msg)
        # the rebuilt payload has exactly the logged size: our layouts match the wire
        assert len(msg.data) == msg.size, f"{path.name}:{lineno}: {len(msg.data)} != {msg.size}"
        out.append(msg)
    return out


@dataclass
class Offer:
    features: int
    protocol_features: int
    num_queues: int
    config: bytes
    max_mem_slots: int | None = None
    set_bases: dict[int, int] = field(default_factory=dict)


def trace_offer(msgs: list[TraceMsg]) -> Offer:
    """What the trace's back-end offered, from its replies."""
    def first(name: str) -> TraceMsg | None:
        return next((m for m in msgs if m.direction == "BE->FE" and m.name == name), None)

    feats = first("GET_FEATURES")
    pf = first("GET_PROTOCOL_FEATURES")
    qn = first("GET_QUEUE_NUM")
    cfg = first("GET_CONFIG")
    slots = first("GET_MAX_MEM_SLOTS")
    assert feats is not None and pf is not None
    nq = qn.payload.value if qn is not None else max(
        (m.payload.index for m in msgs if m.direction == "FE->BE"
         and isinstance(m.payload, P.VringState | P.VringFile | P.VringAddr)), default=0) + 1
    return Offer(
        features=feats.payload.value,
        protocol_features=pf.payload.value,
        num_queues=nq,
        config=cfg.payload.data if cfg is not None else b"",
        max_mem_slots=slots.payload.value if slots is not None else None,
    )


def _ids(paths: list[Path]) -> list[str]:
    return [p.stem.removeprefix("vhost-user-trace-") for p in paths]


pytestmark = pytest.mark.skipif(not TRACE_FILES, reason=f"no traces in {TRACES_DIR}")


# -- parsing -----------------------------------------------------------------------------------


def test_all_four_traces_are_present() -> None:
    assert len(TRACE_FILES) >= 4, TRACE_FILES


@pytest.mark.parametrize("path", TRACE_FILES, ids=_ids(TRACE_FILES))
def test_trace_parses_and_sizes_match(path: Path) -> None:
    msgs = parse_trace(path)
    assert msgs[-1].closed
    for m in msgs:
        if m.closed:
            continue
        if m.direction == "BE->FE":
            assert m.flags == 0x5, m  # QEMU accepts only 0x5
        else:
            assert m.flags in (0x1, 0x9), m
            rule = FRONTEND_RULES[m.request]
            assert not m.synthesized, f"line {m.lineno}: {m.name} payload not logged"
            assert isinstance(m.payload, rule.payload)


def test_trace_memory_table_golden() -> None:
    (path,) = [p for p in TRACE_FILES if "net-to-testpmd" in p.name]
    (m,) = [m for m in parse_trace(path) if m.name == "SET_MEM_TABLE" and
            m.direction == "FE->BE"]
    assert m.payload == P.MemoryTable(regions=(P.MemoryRegion(
        guest_phys_addr=0, memory_size=0x10000000, userspace_addr=0x7F259BFFF000,
        mmap_offset=0),))
    assert m.wire() == bytes.fromhex(
        "05000000 09000000 28000000 01000000 00000000"
        "0000000000000000 0000001000000000 00f0ff9b257f0000 0000000000000000".replace(" ", "")
    )


# -- front-end replay ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", TRACE_FILES, ids=_ids(TRACE_FILES))
def test_frontend_core_builds_every_trace_request(path: Path) -> None:
    fe: FrontendConnection[int] = FrontendConnection()
    for m in parse_trace(path):
        if m.closed:
            assert fe.waiting == 0, f"{path.name}: replies still due at close"
            assert fe.receive_data(b"") == []
            continue
        if m.direction == "FE->BE":
            payload = m.payload if m.payload is not None else None
            data = fe.request(m.request, payload, nfds=m.nfds, need_reply=bool(m.flags & 0x8))
            assert data == m.wire(), f"{path.name}:{m.lineno}: {m.name}"
        else:
            got = fe.receive_data(m.wire())
            assert got == [ev.ReplyReceived(m.request, m.data, ())], f"line {m.lineno}"
    assert fe.error is None


# -- back-end replay ----------------------------------------------------------------------------


class TraceDevice(FakeDevice):
    """A device offering what the trace's back-end offered."""


def _backend_for(offer: Offer) -> tuple[Any, Any, StubRingFactory, Any]:
    dev = TraceDevice(virtio_features=offer.features, protocol_features=offer.protocol_features,
                      num_queues=offer.num_queues, config=offer.config)
    conn, host, factory, fds = make_backend(dev, max_mem_slots=offer.max_mem_slots or 32)
    return conn, host, factory, fds


@pytest.mark.parametrize("path", TRACE_FILES, ids=_ids(TRACE_FILES))
def test_device_offer_covers_the_trace_backend(path: Path) -> None:
    """Built through the Device plug point, our back-end offers at least what the trace's
    back-end offered (it adds its base features: BASE_VIRTIO/PROTOCOL_FEATURES)."""
    offer = trace_offer(parse_trace(path))
    conn = _backend_for(offer)[0]
    assert conn.offered_features & offer.features == offer.features
    assert conn.offered_protocol_features & offer.protocol_features == offer.protocol_features
    assert conn.offered_features == BASE_VIRTIO_FEATURES | offer.features
    assert conn.offered_protocol_features & ~offer.protocol_features & ~int(
        BASE_PROTOCOL_FEATURES) == 0


@pytest.mark.parametrize("path", TRACE_FILES, ids=_ids(TRACE_FILES))
def test_backend_core_replays_the_trace(path: Path) -> None:
    msgs = parse_trace(path)
    offer = trace_offer(msgs)
    conn, host, _factory, fds = _backend_for(offer)
    # Offer exactly what the trace's back-end offered, so the replies can be compared.
    conn.offered_features = VirtioFeature(offer.features)
    conn.offered_protocol_features = offer.protocol_features
    produced: deque[tuple[int, int, bytes]] = deque()
    set_base: dict[int, int] = {}
    compared = 0
    for m in msgs:
        where = f"{path.name}:{m.lineno} {m.name}"
        if m.closed:
            assert conn.receive_data(b"") == []
            continue
        if m.direction == "FE->BE":
            given = fds.take(m.nfds)
            try:
                conn.receive_data(m.wire(), given)
            except Exception as e:  # a real peer did this: the core must accept it
                pytest.fail(f"{where}: back-end core rejected a real front-end: {e!r}")
            if m.request is R.SET_VRING_BASE:
                set_base[m.payload.index] = m.payload.num
            if m.request is R.SET_VRING_KICK and m.nfds:
                # QEMU writes one kick right after SET_VRING_KICK; the shell turns the
                # readable kick fd into kick(): the ring starts on our stub engine.
                conn.kick(m.payload.index)
            produced.extend(replies(conn))
            continue
        assert produced, f"{where}: the trace's back-end replied, ours did not"
        request, flags, payload = produced.popleft()
        assert (request, flags) == (m.request, 0x5), where
        assert len(payload) == len(m.data), where
        if m.request is R.GET_VRING_BASE:
            ours = P.VringState.decode(payload)
            theirs = m.payload
            assert ours.index == theirs.index, where
            if theirs.num == set_base.get(theirs.index):  # the ring made no progress
                assert ours.num == theirs.num, where
                compared += 1
        else:
            assert payload == m.data, f"{where}: {payload.hex()} != {m.data.hex()}"
            compared += 1
    assert not produced, f"{path.name}: our back-end sent extra replies {list(produced)}"
    assert compared > 0
    assert conn.error is None and conn.closed
    host.assert_all_released(fds.given)
    assert host.live_mappings() == []


def test_blk_trace_get_config_is_reproduced_from_the_config_space() -> None:
    (path,) = [p for p in TRACE_FILES if "blk" in p.name]
    msgs = parse_trace(path)
    offer = trace_offer(msgs)
    assert len(offer.config) == 57
    capacity, = struct.unpack_from("<Q", offer.config)
    assert capacity == 0x20000
    conn = _backend_for(offer)[0]
    get = next(m for m in msgs if m.name == "GET_CONFIG" and m.direction == "FE->BE")
    want = next(m for m in msgs if m.name == "GET_CONFIG" and m.direction == "BE->FE")
    conn.receive_data(HEADER.pack(R.SET_PROTOCOL_FEATURES, 1, 8) + struct.pack(
        "<Q", offer.protocol_features))
    conn.receive_data(get.wire())
    assert replies(conn) == [(R.GET_CONFIG, 0x5, want.data)]
