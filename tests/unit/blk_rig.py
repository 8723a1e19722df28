"""A virtio-blk device and driver over one bytearray, no sockets: the unit-test rig.

The driver side is the front-end's own pure :class:`~vhostuser.frontends.blk.BlkQueue`;
the device side is :class:`~vhostuser.devices.blk.BlkDevice` on a split device ring; the
session is a :class:`FakeQueues` implementing ``QueueAccess``.
"""

from __future__ import annotations

import struct
from typing import Any

from vhostuser.devices.blk import MemoryBackend
from vhostuser.frontends.blk import BlkOp, BlkQueue, QueueLayout
from vhostuser.memory import FlatMemory
from vhostuser.virtq import INITIAL_BASE, PackedDeviceRing, SplitDeviceRing, run_burst
from vhostuser.virtq.inflight import InflightArea, inflight_area_bytes

from .fakes import ManualTimers


class FakeQueues:
    """``QueueAccess`` over rings held in a dict."""

    def __init__(self) -> None:
        self.rings: dict[int, Any] = {}
        self.enabled_set: set[int] = set()
        self.notified: list[int] = []
        self.broken: dict[int, str] = {}
        self.timers = ManualTimers()

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
        self.broken.setdefault(index, reason)

    def call_later(self, delay: float, callback: Any) -> ManualTimers.Handle:
        return self.timers.call_later(delay, callback)


class Rig:
    """One or more queues of a :class:`BlkDevice` driven by :class:`BlkQueue` drivers."""

    def __init__(self, device_factory: Any, *, disk: int = 1 << 20, queue_size: int = 32,
                 depth: int = 8, max_io: int = 64 << 10, num_queues: int = 1,
                 event_idx: bool = True, indirect: bool = False,
                 read_only: bool = False, inflight: bool = False,
                 packed: bool = False) -> None:
        self.packed = packed
        self.layouts = [QueueLayout.plan(0, queue_size, depth, max_io, packed=packed)]
        for _ in range(1, num_queues):
            self.layouts.append(QueueLayout.plan(self.layouts[-1].end, queue_size, depth,
                                                 max_io, packed=packed))
        self.buf = bytearray(self.layouts[-1].end)
        self.mem = FlatMemory(self.buf)
        self.disk = MemoryBackend(disk, read_only=read_only)
        self.factory = device_factory
        self.dev = device_factory(self.disk)
        self.queues = FakeQueues()
        self.dev.attach(self.queues)
        self.event_idx = event_idx
        self.indirect = indirect
        self.queue_size = queue_size
        self.drivers = [BlkQueue(self.mem, lay, event_idx=event_idx, indirect=indirect, index=i,
                                 packed=packed)
                        for i, lay in enumerate(self.layouts)]
        self.area: InflightArea | None = None
        if inflight:
            self.give_inflight(fresh=True)
        for i in range(num_queues):
            self.start_ring(i)

    def device_ring(self, index: int = 0, next_avail: int = 0) -> Any:
        lay = self.layouts[index]
        if self.packed:
            return PackedDeviceRing(self.mem, lay.size, lay.desc, lay.avail, lay.used,
                                    event_idx=self.event_idx, indirect=self.indirect,
                                    base=INITIAL_BASE, name=f"ring {index}")
        return SplitDeviceRing(self.mem, lay.size, lay.desc, lay.avail, lay.used,
                               event_idx=self.event_idx, indirect=self.indirect,
                               next_avail=next_avail, name=f"ring {index}")

    def start_ring(self, index: int = 0, next_avail: int = 0, *, enable: bool = True) -> None:
        """Build the device ring and tell the device it started (as the core does)."""
        from vhostuser.connection import events as ev

        self.queues.rings[index] = self.device_ring(index, next_avail)
        self.queues.broken.pop(index, None)
        if enable:
            self.queues.enabled_set.add(index)
        self.dev.on_event(ev.VringStarted(index))
        if enable:
            self.dev.on_event(ev.VringEnabled(index, True))
        self.process(index)  # the shell schedules a burst when a ring starts or is enabled

    def enable(self, index: int = 0) -> None:
        """SET_VRING_ENABLE 1, then the burst the shell schedules."""
        from vhostuser.connection import events as ev

        self.queues.enabled_set.add(index)
        self.dev.on_event(ev.VringEnabled(index, True))
        self.process(index)

    def give_inflight(self, *, fresh: bool = True, area_buf: bytearray | None = None) -> None:
        """GET_INFLIGHT_FD (fresh) or SET_INFLIGHT_FD of ``area_buf``."""
        n = len(self.layouts)
        if area_buf is None:
            area_buf = bytearray(inflight_area_bytes(n, self.queue_size, self.packed))
        self.area_buf = area_buf
        self.area = InflightArea(memoryview(area_buf), n, self.queue_size, self.packed)
        self.dev.on_inflight(self.area, fresh=fresh)

    def restart(self, device_factory: Any | None = None) -> None:
        """The back-end crashed and a new one starts: a new device on the same disk, the
        same guest RAM and inflight area (SET_INFLIGHT_FD), rings restarted at used.idx as
        QEMU does (virtio_queue_restore_last_avail_idx); packed rings at the initial base,
        as stale as QEMU's (it restores nothing for them: the area says where to resume)."""
        factory = device_factory or self.factory
        self.dev = factory(self.disk)
        self.queues = FakeQueues()
        self.dev.attach(self.queues)
        if self.area is not None:
            self.give_inflight(fresh=False, area_buf=self.area_buf)
        for i, drv in enumerate(self.drivers):
            self.start_ring(i, 0 if self.packed else drv.used_idx())

    @property
    def driver(self) -> BlkQueue:
        return self.drivers[0]

    def submit(self, *ops: BlkOp, index: int = 0) -> list[BlkOp]:
        for op in ops:
            assert self.drivers[index].add(op), "no free slot"
        self.drivers[index].publish()
        return list(ops)

    def process(self, index: int = 0, budget: int = 256) -> int:
        """One kick: bursts on the device ring as the shell runs them
        (``BackendSession._process``), re-arming kicks once drained; returns chains taken."""
        taken = 0
        while True:
            ring = self.queues.ring(index)
            if ring is None or not self.dev.consumes(index):
                return taken
            result = run_burst(ring, lambda chains: self.dev.handle_burst(index, chains, True),
                               budget)
            taken += result.popped
            if result.broken is not None:
                self.queues.ring_broken(index, result.broken)
                return taken
            if result.notify:
                self.queues.notify(index)
            if result.popped < budget and not ring.enable_notifications():
                return taken

    def run(self, *ops: BlkOp, index: int = 0) -> list[BlkOp]:
        """Submit, process, reap; return the ops (completed)."""
        self.submit(*ops, index=index)
        self.process(index)
        got = self.drivers[index].reap()
        assert {id(o) for o in got} == {id(o) for o in ops}, (got, ops)
        return list(ops)

    def one(self, op: BlkOp, index: int = 0) -> BlkOp:
        return self.run(op, index=index)[0]

    # -- hand-made chains (hostile drivers) ---------------------------------------------------
    def raw_chain(self, bufs: list[tuple[bytes | int, bool]], index: int = 0) -> list[int]:
        """Add a chain of buffers given as bytes (readable, copied) or int (writable length,
        filled with 0xEE) straight to the driver ring; return the GPAs of each buffer."""
        drv: Any = self.drivers[index].ring
        lay = self.layouts[index]
        gpa = lay.slot_data(lay.depth - 1)  # scratch: the last slot's data buffer
        out = []
        spec = []
        for b, w in bufs:
            if isinstance(b, int):
                self.buf[gpa : gpa + b] = b"\xee" * b
                spec.append((gpa, b, w))
                out.append(gpa)
                gpa += b
            else:
                self.buf[gpa : gpa + len(b)] = b
                spec.append((gpa, len(b), w))
                out.append(gpa)
                gpa += len(b)
            gpa = (gpa + 15) & ~15
        assert drv.add(spec, "raw")
        drv.publish()
        return out

    def reap_raw(self, index: int = 0) -> list[tuple[Any, int]]:
        return self.drivers[index].ring.reap()


def header(rtype: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector)


def segment(sector: int, num: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, num, flags)
