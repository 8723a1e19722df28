"""A VirtioNetDevice wired to driver rings over one bytearray, for the net unit tests.

The driver side is our own SplitDriverRing/PackedDriverRing (what a guest does); the
device side is the engine the back-end builds. ``Access`` plays the session's QueueAccess.
Buffers are laid out in a data area by a bump allocator; ``raw_*`` helpers write
descriptors by hand the way a hostile guest would.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from vhostuser.connection import events as ev
from vhostuser.devices.net import NET_HDR_MRG, FrameSink, VirtioNetDevice
from vhostuser.memory import FlatMemory
from vhostuser.protocol.enums import NetFeature, VirtioFeature
from vhostuser.virtq import (
    INITIAL_BASE,
    PackedDeviceRing,
    PackedDriverRing,
    SplitDeviceRing,
    SplitDriverRing,
    packed_layout,
    split_layout,
)
from vhostuser.virtq.runner import QueueRunner

from .fakes import ManualTimers

MEM = 4 << 20
RING_AREA = 0x10000  # per queue
DATA = 0x100000
IND = 0x80000  # indirect tables

V1 = int(VirtioFeature.VERSION_1)
MRG = int(NetFeature.MRG_RXBUF)
EVENT_IDX = int(VirtioFeature.RING_EVENT_IDX)
INDIRECT = int(VirtioFeature.RING_INDIRECT_DESC)
PACKED = int(VirtioFeature.RING_PACKED)


class Access:
    """The session side of QueueAccess: rings, enablement, notifications, breakage."""

    def __init__(self) -> None:
        self.rings: dict[int, Any] = {}
        self.enabled_set: set[int] = set()
        self.notified: list[int] = []
        self.broken: dict[int, str] = {}
        self.timers = ManualTimers()
        self.device: VirtioNetDevice | None = None

    def ring(self, index: int) -> Any:
        r = self.rings.get(index)
        if r is None or index in self.broken or r.broken is not None:
            return None
        return r

    def enabled(self, index: int) -> bool:
        return index in self.enabled_set

    def notify(self, index: int) -> None:
        self.notified.append(index)

    def ring_broken(self, index: int, reason: str) -> None:
        if index not in self.broken:
            self.broken[index] = reason
            if self.device is not None:
                self.device.on_event(ev.VringBroken(index, reason))

    def call_later(self, delay: float, callback: Any) -> ManualTimers.Handle:
        return self.timers.call_later(delay, callback)


class Rig:
    """One device, ``pairs`` queue pairs, driver rings of ``size`` over a bytearray."""

    def __init__(
        self,
        features: int = V1 | MRG,
        *,
        pairs: int = 1,
        size: int = 64,
        sink: FrameSink | None = None,
        mtu: int = 1500,
        offloads: bool = False,
        fast: bool = True,
        enabled_pairs: Sequence[int] | None = None,
        mac: str = "52:54:00:00:00:01",
        mem_size: int = MEM,
    ) -> None:
        self.buf = bytearray(mem_size)
        self.mem = FlatMemory(self.buf)
        self.rx_layout: dict[int, list[tuple[int, int]]] = {}
        self.features = features
        self.packed = bool(features & PACKED)
        self.event_idx = bool(features & EVENT_IDX)
        self.size = size
        self.access = Access()
        self.dev = VirtioNetDevice(sink, queue_pairs=pairs, mtu=mtu, offloads=offloads,
                                   mac=mac)
        self.dev.fast_path = fast
        self.access.device = self.dev
        self.dev.attach(self.access)
        self.dev.on_features(features)
        self.dev.on_memory(self.mem)
        self.drivers: dict[int, Any] = {}
        self._next_data = DATA
        pairs_on = range(pairs) if enabled_pairs is None else enabled_pairs
        for q in range(2 * pairs):
            base = q * RING_AREA
            ind = (IND + q * 0x2000, 0x2000) if features & INDIRECT else None
            if self.packed:
                d, a, u, _ = packed_layout(size, base)
                self.drivers[q] = PackedDriverRing(self.mem, size, d, a, u,
                                                   event_idx=self.event_idx, indirect_area=ind)
                dev_ring: Any = PackedDeviceRing(
                    self.mem, size, d, a, u, event_idx=self.event_idx,
                    indirect=bool(features & INDIRECT), base=INITIAL_BASE, name=f"ring {q}")
            else:
                d, a, u, _ = split_layout(size, base)
                self.drivers[q] = SplitDriverRing(self.mem, size, d, a, u,
                                                  event_idx=self.event_idx, indirect_area=ind)
                dev_ring = SplitDeviceRing(self.mem, size, d, a, u, event_idx=self.event_idx,
                                           indirect=bool(features & INDIRECT), name=f"ring {q}")
            self.access.rings[q] = dev_ring
            self.dev.on_event(ev.VringStarted(q))
            if q // 2 in pairs_on:
                self.access.enabled_set.add(q)
                self.dev.on_event(ev.VringEnabled(q, True))
        self._token = 0
        # One runner per transmit queue, as the session has (the only scheduler).
        self.runners = {
            q: QueueRunner(q, self._burst_fn(q)) for q in range(1, 2 * pairs, 2)
        }

    def _burst_fn(self, q: int) -> Any:
        def burst(ring: Any, budget: int) -> Any:
            return self.dev.run_queue(q, ring, budget, self.access.enabled(q))
        return burst

    # -- memory -------------------------------------------------------------------------
    def alloc(self, n: int) -> int:
        gpa = self._next_data
        self._next_data += (n + 63) & ~63
        if self._next_data > len(self.buf):
            raise MemoryError("rig data area exhausted")
        return gpa

    def close(self) -> None:
        """Break the reference cycles (device <-> access, rings -> memory) at once."""
        self.dev.close()
        for r in (*self.drivers.values(), *self.access.rings.values()):
            r.close()
        self.access.rings.clear()
        self.access.device = None
        self.drivers.clear()

    def put(self, data: bytes) -> int:
        gpa = self.alloc(len(data))
        self.buf[gpa : gpa + len(data)] = data
        return gpa

    @property
    def hdr_len(self) -> int:
        return self.dev.hdr_len

    def header(self, flags: int = 0, gso: int = 0, hdr_len: int = 0, gso_size: int = 0,
               csum_start: int = 0, csum_offset: int = 0) -> bytes:
        return NET_HDR_MRG.pack(flags, gso, hdr_len, gso_size, csum_start, csum_offset,
                                0)[: self.hdr_len]

    # -- driver: transmit -----------------------------------------------------------------
    def tx_chain(self, pieces: Sequence[bytes], pair: int = 0, *,
                 indirect: bool | None = None) -> int:
        """Queue one transmit chain made of ``pieces`` (each its own descriptor)."""
        bufs = [(self.put(p), len(p), False) for p in pieces]
        tok = self._token
        self._token += 1
        drv = self.drivers[2 * pair + 1]
        assert drv.add(bufs, tok, indirect=indirect)
        drv.publish()
        return tok

    def tx(self, frames: Sequence[bytes], pair: int = 0, hdr: bytes | None = None) -> None:
        """Queue frames with a plain header, one descriptor each."""
        h = hdr if hdr is not None else bytes(self.hdr_len)
        for f in frames:
            self.tx_chain([h + f], pair)

    def kick_tx(self, pair: int = 0) -> int:
        """Drain the transmit queue as the session does after a kick: the queue's runner
        steps until it has re-armed kicks on an empty ring; returns the chains taken."""
        q = 2 * pair + 1
        runner = self.runners[q]
        runner.kicked()
        total = 0
        while True:
            ring = self.access.ring(q)
            if ring is None:
                return total
            res, again = runner.step(ring)
            total += res.popped
            if res.notify:  # as the session: completions first, then the break
                self.access.notify(q)
            if res.broken is not None:
                self.access.ring_broken(q, res.broken)
                return total
            if not again:
                return total

    def reap_tx(self, pair: int = 0) -> list[tuple[int, int]]:
        return list(self.drivers[2 * pair + 1].reap())

    # -- driver: receive ------------------------------------------------------------------
    def post_rx(self, count: int, size: int = 2048, pair: int = 0,
                pieces: Sequence[int] | None = None) -> int:
        """Post up to ``count`` receive buffers of ``size`` bytes (or split as ``pieces``);
        returns how many fitted in the ring."""
        drv = self.drivers[2 * pair]
        posted = 0
        for _ in range(count):
            lens = list(pieces) if pieces is not None else [size]
            bufs = []
            for ln in lens:
                bufs.append((self.alloc(ln), ln, True))
            tok = self._token
            if not drv.add(bufs, tok, indirect=False):
                break
            self._token += 1
            self.rx_layout[tok] = [(g, ln) for g, ln, _ in bufs]
            posted += 1
        drv.publish()
        return posted

    def read_rx_buffer(self, tok: int, written: int) -> bytes:
        out = bytearray()
        for gpa, ln in self.rx_layout[tok]:
            take = min(ln, written - len(out))
            if take <= 0:
                break
            out += self.buf[gpa : gpa + take]
        return bytes(out)

    def reap_rx(self, pair: int = 0) -> list[tuple[bytes, bytes]]:
        """Used receive buffers as (header, frame), merging num_buffers when mergeable."""
        drv = self.drivers[2 * pair]
        used = list(drv.reap())
        out: list[tuple[bytes, bytes]] = []
        hl = self.hdr_len
        i = 0
        while i < len(used):
            tok, written = used[i]
            data = self.read_rx_buffer(tok, written)
            hdr, body = data[:hl], bytearray(data[hl:])
            nbuf = struct.unpack_from("<H", hdr, 10)[0] if hl == 12 else 1
            if self.dev.mergeable:
                for k in range(1, nbuf):
                    t2, w2 = used[i + k]
                    body += self.read_rx_buffer(t2, w2)
                i += nbuf
            else:
                i += 1
            out.append((hdr, bytes(body)))
        return out

    def used_rx(self, pair: int = 0) -> list[tuple[int, int]]:
        return list(self.drivers[2 * pair].reap())


def eth(dst: str, src: str, payload: bytes, ethertype: int = 0x0800) -> bytes:
    """An Ethernet frame (no FCS)."""
    return (bytes.fromhex(dst.replace(":", "")) + bytes.fromhex(src.replace(":", ""))
            + ethertype.to_bytes(2, "big") + payload)


class Collect:
    """A FrameSink that copies what it is given."""

    def __init__(self) -> None:
        self.frames: list[tuple[int, bytes, bytes | None]] = []
        self.rarps: list[bytes] = []

    def on_frames(self, dev: VirtioNetDevice, pair: int, frames: list[memoryview],
                  hdrs: list[bytes | None] | None) -> None:
        for i, f in enumerate(frames):
            self.frames.append((pair, bytes(f), None if hdrs is None else hdrs[i]))

    def on_rarp(self, dev: VirtioNetDevice, mac: bytes) -> None:
        self.rarps.append(mac)

    def commit(self, dev: VirtioNetDevice) -> None:
        pass


class Wire:
    """A FrameSink that delivers into another device (a two-port cable)."""

    def __init__(self) -> None:
        self.peer: VirtioNetDevice | None = None

    def on_frames(self, dev: VirtioNetDevice, pair: int, frames: list[memoryview],
                  hdrs: list[bytes | None] | None) -> None:
        assert self.peer is not None
        self.peer.deliver(frames, hdrs, pair, defer=True)

    def on_rarp(self, dev: VirtioNetDevice, mac: bytes) -> None:
        pass

    def commit(self, dev: VirtioNetDevice) -> None:
        assert self.peer is not None
        self.peer.publish_rx()
