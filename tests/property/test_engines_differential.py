"""Both burst engines are one behaviour: the same traffic through a switch gives the same
guest memory, ring states and counters with the compiled engine as with pure Python.

Two worlds are built alike - a switch with two or three ports, each a virtio-net device
over its own bytearray of guest memory with our driver rings (split or packed, in any
mix; header of 10 or 12 bytes; mergeable buffers or not) - one running ``engine="python"``, one
``engine="compiled"``. Hypothesis plays the same random script on both: receive buffers
posted (big, too small for a frame, split over two descriptors), frames sent (to learned,
unknown, broadcast and multicast addresses; runts and oversized ones; chains of two
descriptors; headers with offload fields), hostile transmit entries (a head outside the
queue, a buffer outside guest memory), kicks and reaps in any order, dirty logging
switched on, collected and off at any point. After every kick the two worlds must hold
identical bytes in every guest memory (rings and buffers), identical ring state blocks and
broken reasons, identical port counters, fabric counters, MAC tables and dirty logs; and
in each world every page the back-end changed during the kick must be marked in its log
(a shadow copy of guest memory is taken before the kick). The compiled engine handles the
common layout and leaves everything else to the Python engine; this is what proves the
hand-over loses and duplicates nothing.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.net_rig import EVENT_IDX, MRG, PACKED, RING_AREA, V1, Rig, eth
from vhostuser import engine as engines
from vhostuser.devices.net import VirtioNetDevice
from vhostuser.memory import DirtyLog
from vhostuser.switch import Port, Switch

pytestmark = pytest.mark.skipif(
    engines.compiled() is None and os.environ.get("CI") != "true",
    reason="the compiled engine is not built (install gcc and python3-dev, then "
           "bash scripts/setup.sh)")

MACS = ["02:00:00:00:00:01", "02:00:00:00:00:02", "02:00:00:00:00:03",
        "ff:ff:ff:ff:ff:ff", "01:00:5e:00:00:01", "02:00:00:00:00:99"]


class FakeReactor:
    """What a Switch needs from a reactor here: timers that never fire."""

    def call_later(self, delay: float, cb: Callable[[], object]) -> Any:
        return _Timer()

    def call_soon(self, cb: Callable[[], object]) -> Any:
        return _Timer()


class _Timer:
    def cancel(self) -> None:
        pass


class RigPort(Port):
    """A switch port around a Rig's device (no sockets): what VhostUserPort does."""

    kind = "rig"

    def __init__(self, switch: Switch, name: str, rig: Rig) -> None:
        super().__init__(switch, name)
        self.rig = rig
        self.counters = rig.dev.counters
        rig.dev.sink = self
        if switch.engine == "compiled":
            rig.dev.accelerator = lambda dev, index, ring, budget: switch.compiled_burst(
                self, dev, index, ring, budget)

    @property
    def link_up(self) -> bool:
        return self.rig.dev.link_up

    def send(self, frames: list[memoryview], hdrs: list[bytes | None] | None,
             pair: int) -> None:
        self.rig.dev.deliver(frames, hdrs, pair, defer=True)
        self.switch.to_publish(self)

    def publish(self) -> None:
        self.rig.dev.publish_rx()

    def compiled_target(self) -> tuple[Any, ...] | None:
        return self.rig.dev.compiled_rx_target()

    def compiled_delivered(self, frames: int, nbytes: int, no_buffer: int) -> None:
        self.rig.dev.compiled_delivered(frames, nbytes, no_buffer)

    # FrameSink
    def on_frames(self, dev: VirtioNetDevice, pair: int, frames: list[memoryview],
                  hdrs: list[bytes | None] | None) -> None:
        self.switch.forward(self, frames, hdrs, pair)

    def on_rarp(self, dev: VirtioNetDevice, mac: bytes) -> None:
        pass

    def commit(self, dev: VirtioNetDevice) -> None:
        self.switch.commit()


class World:
    def __init__(self, engine: str, features: list[int]) -> None:
        self.switch = Switch(FakeReactor(), engine=engine)  # type: ignore[arg-type]
        assert self.switch.engine == engine
        self.rigs = [Rig(f, size=32, mem_size=2 << 20) for f in features]
        self.ports = []
        for i, rig in enumerate(self.rigs):
            p = RigPort(self.switch, f"p{i}", rig)
            self.switch.ports.append(p)
            self.switch.fabric.members.append(p)
            self.ports.append(p)

    def close(self) -> None:
        self.switch.close()
        for r in self.rigs:
            r.close()

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "fabric": (self.switch.flooded, self.switch.filtered, self.switch.learn_refused),
            "macs": sorted((m.hex(), e[0].name) for m, e in self.switch.macs.items()),
        }
        for i, rig in enumerate(self.rigs):
            rings = rig.access.rings
            log = rig.mem.log
            out[f"p{i}"] = {
                "log": None if log is None else bytes(log.buf),
                "mem": bytes(rig.buf),
                "counters": rig.dev.counters.as_dict(),
                "state": {q: list(r.state) for q, r in rings.items()},
                "broken": dict(rig.access.broken),
                "held": rig.dev.held_rx_chains,
                "notified": list(rig.access.notified),
            }
        return out


frame_st = st.tuples(
    st.integers(0, len(MACS) - 1),  # destination
    st.integers(0, 2),  # source (a unicast address)
    st.sampled_from([0, 46, 46, 46, 100, 1000, 1486, 1600]),  # payload: runt .. oversize
    st.sampled_from(["plain"] * 8 + ["two-desc", "csum"]),
)
action = st.one_of(
    st.tuples(st.just("post"), st.integers(0, 2), st.integers(1, 12),
              st.sampled_from([2048, 2048, 2048, 64, 600])),
    st.tuples(st.just("post-split"), st.integers(0, 2), st.integers(1, 3), st.just(0)),
    st.tuples(st.just("tx"), st.integers(0, 2), st.lists(frame_st, min_size=1, max_size=12),
              st.just(0)),
    st.tuples(st.just("kick"), st.integers(0, 2), st.just(0), st.just(0)),
    st.tuples(st.just("reap"), st.integers(0, 2), st.just(0), st.just(0)),
    st.tuples(st.just("hostile"), st.integers(0, 2), st.sampled_from(["head", "addr"]),
              st.just(0)),
    st.tuples(st.just("log"), st.integers(0, 2), st.sampled_from(["on", "off", "collect"]),
              st.just(0)),
)


def play(w: World, act: tuple[Any, ...]) -> None:
    kind, pi, a, b = act
    rig = w.rigs[pi % len(w.rigs)]
    if kind == "post":
        rig.post_rx(a, size=b)
    elif kind == "post-split":
        rig.post_rx(a, pieces=[40, 2000])
    elif kind == "tx":
        drv = rig.drivers[1]
        for dst, src, plen, shape in a:
            if drv.num_free < 2:
                break
            f = eth(MACS[dst], MACS[src], bytes([plen & 0xFF]) * plen)[: 14 + plen if plen
                                                                       else 10]
            hdr = bytes(rig.hdr_len)
            if shape == "csum":
                hdr = bytes([1]) + hdr[1:]
            if shape == "two-desc":
                rig.tx_chain([hdr, f])
            else:
                rig.tx_chain([hdr + f])
    elif kind == "kick":
        rig.kick_tx()
    elif kind == "log":
        if a == "on" and rig.mem.log is None:
            rig.mem.log = DirtyLog(bytearray(len(rig.buf) // 4096 // 8))
        elif a == "off":
            rig.mem.log = None
        elif rig.mem.log is not None:  # the front-end collects and clears the bits
            rig.mem.log.buf[:] = bytes(len(rig.mem.log.buf))
    elif kind == "reap":
        rig.drivers[0].reap()
        rig.drivers[1].reap()
    elif kind == "hostile":
        drv = rig.drivers[1]
        if drv.broken is not None or drv.num_free < 1:
            return
        if rig.packed:
            rig.tx_chain([bytes(rig.hdr_len) + bytes(60)])
            slot = (drv._next_avail - 1) % drv._size
            if a == "head":
                # A buffer id outside the queue.
                struct.pack_into("<H", drv._desc, 16 * slot + 12, 0x7FFF)
            else:
                # The newest descriptor points outside guest memory.
                struct.pack_into("<Q", drv._desc, 16 * slot, len(rig.buf) + 4096)
            return
        if a == "head":
            # An avail entry naming a head outside the queue.
            drv._avail_h[2 + (drv._avail_idx & drv._mask)] = 0x7FFF
            drv._avail_idx = (drv._avail_idx + 1) & 0xFFFF
            drv._avail_h[1] = drv._avail_idx
        else:
            rig.tx_chain([bytes(rig.hdr_len) + bytes(60)])
            # Point the newest descriptor outside guest memory.
            head = drv._avail_h[2 + ((drv._avail_idx - 1) & drv._mask)]
            struct.pack_into("<Q", rig.buf, RING_AREA + 16 * head, len(rig.buf) + 4096)


# Split and packed rings, in any mix on one switch.
features_st = st.lists(st.sampled_from([V1 | MRG, V1, 0, V1 | MRG | PACKED, V1 | PACKED,
                                        V1 | MRG | EVENT_IDX, V1 | PACKED | EVENT_IDX]),
                       min_size=2, max_size=3)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(features=features_st, script=st.lists(action, min_size=1, max_size=30),
       logged=st.lists(st.booleans(), min_size=3, max_size=3))
def test_both_engines_leave_the_same_state(features: list[int],
                                          script: list[tuple[Any, ...]],
                                          logged: list[bool]) -> None:
    py, cc = World("python", features), World("compiled", features)
    try:
        for w in (py, cc):
            for r, on in zip(w.rigs, logged, strict=False):
                r.post_rx(8)
                if on:
                    play(w, ("log", w.rigs.index(r), "on", 0))
        for step, act in enumerate(script):
            play(py, act)
            play(cc, act)
            if act[0] in ("kick", "tx"):
                for w in (py, cc):
                    before = [bytes(r.buf) for r in w.rigs]
                    w.rigs[act[1] % len(w.rigs)].kick_tx()
                    for r, old in zip(w.rigs, before, strict=True):
                        check_logged(r, old)
                a, b = py.snapshot(), cc.snapshot()
                for key in a:
                    assert a[key] == b[key], f"step {step} {act}: {key} differs"
    finally:
        py.close()
        cc.close()


def check_logged(rig: Rig, before: bytes) -> None:
    """Every page that changed since ``before`` is marked in the rig's log (if on)."""
    log = rig.mem.log
    if log is None:
        return
    after = bytes(rig.buf)
    changed = {p for p in range(len(after) // 4096)
               if after[4096 * p : 4096 * (p + 1)] != before[4096 * p : 4096 * (p + 1)]}
    missing = changed - set(log.dirty_pages())
    assert not missing, f"pages written but not logged: {sorted(missing)}"


@pytest.mark.parametrize("features", [[V1 | MRG, V1 | MRG], [V1 | PACKED, V1 | PACKED],
                                      [V1 | MRG | PACKED, V1], [V1, V1 | MRG | PACKED]],
                         ids=["split", "packed", "packed-to-split", "split-to-packed"])
def test_the_compiled_engine_really_runs(features: list[int]) -> None:
    """The differential test is not vacuous: the compiled engine takes the common case,
    on split and packed rings in any mix."""
    w = World("compiled", features)
    calls: list[int] = []
    real = w.switch.compiled_burst

    def spy(port: Port, dev: VirtioNetDevice, index: int, ring: Any,
            budget: int) -> tuple[int, bool]:
        n, complete = real(port, dev, index, ring, budget)
        calls.append(n)
        return n, complete

    w.switch.compiled_burst = spy  # type: ignore[method-assign]
    for p in w.ports:
        p.rig.dev.accelerator = (lambda port: lambda dev, i, r, b: spy(port, dev, i, r, b))(p)
    try:
        w.rigs[1].post_rx(8)
        w.rigs[0].tx([eth(MACS[1], MACS[0], bytes(50))] * 5)
        w.rigs[0].kick_tx()
        assert calls[0] == 5
        got = w.rigs[1].reap_rx()
        assert [len(f) for _h, f in got] == [64] * 5
        assert w.rigs[0].dev.held_rx_chains == 0
        assert not w.rigs[1].access.broken and not w.rigs[0].access.broken
        assert w.ports[1].counters.tx_frames == 5 and w.ports[0].counters.rx_frames == 5
    finally:
        w.close()
