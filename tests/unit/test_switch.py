"""The learning switch's forwarding logic with stand-in ports (no sockets, no rings)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from vhostuser.devices.net import build_rarp
from vhostuser.switch import Port, Switch

from .net_rig import eth

M1, M2, M3 = "02:00:00:00:00:01", "02:00:00:00:00:02", "02:00:00:00:00:03"
BCAST = "ff:ff:ff:ff:ff:ff"
MCAST = "01:00:5e:00:00:01"


class FakeReactor:
    """What the switch needs from a reactor: timers and pollers."""

    def __init__(self) -> None:
        self.later: list[tuple[float, Callable[[], object]]] = []
        self.pollers: list[Callable[[], bool]] = []

    def call_later(self, delay: float, cb: Callable[[], object]) -> Any:
        self.later.append((delay, cb))
        return _Timer()

    def call_soon(self, cb: Callable[[], object]) -> Any:
        self.later.append((0.0, cb))
        return _Timer()

    def add_poller(self, p: Callable[[], bool]) -> None:
        self.pollers.append(p)

    def remove_poller(self, p: Callable[[], bool]) -> bool:
        self.pollers.remove(p)
        return True


class _Timer:
    def cancel(self) -> None:
        pass


class Sink(Port):
    """A port that records what the switch sends it."""

    kind = "test"

    def __init__(self, switch: Switch, name: str) -> None:
        super().__init__(switch, name)
        self.got: list[tuple[bytes, bytes | None, int]] = []

    @property
    def link_up(self) -> bool:
        return True

    def send(self, frames: list[memoryview], hdrs: list[bytes | None] | None, pair: int) -> None:
        for i, f in enumerate(frames):
            self.got.append((bytes(f), None if hdrs is None else hdrs[i], pair))
            self.counters.tx_frames += 1


def make(n: int = 3, **kw: Any) -> tuple[Switch, list[Sink], FakeReactor]:
    r = FakeReactor()
    sw = Switch(r, **kw)  # type: ignore[arg-type]
    ports = []
    for i in range(n):
        p = Sink(sw, f"s{i}")
        sw.ports.append(p)
        sw.fabric.members.append(p)
        ports.append(p)
    return sw, ports, r


def send(sw: Switch, port: Port, *frames: bytes, hdrs: list[bytes | None] | None = None
         ) -> None:
    sw.forward(port, [memoryview(f) for f in frames], hdrs)


def test_unknown_destination_is_flooded_then_learned() -> None:
    sw, (a, b, c), _ = make()
    f1 = eth(M2, M1, b"hello")
    send(sw, a, f1)
    assert [g[0] for g in b.got] == [f1] and [g[0] for g in c.got] == [f1] and a.got == []
    assert sw.flooded == 1
    # M1 is learned on a: the reply goes to a only.
    f2 = eth(M1, M2, b"reply")
    send(sw, b, f2)
    assert [g[0] for g in a.got] == [f2] and len(c.got) == 1
    # Now both are known: unicast both ways, nothing flooded.
    send(sw, a, eth(M2, M1, b"again"))
    assert len(b.got) == 2 and len(c.got) == 1
    assert {e["mac"]: e["port"] for e in sw.mac_table()} == {M1: "s0", M2: "s1"}


@pytest.mark.parametrize("dst", [BCAST, MCAST])
def test_group_addresses_are_flooded(dst: str) -> None:
    sw, (a, b, c), _ = make()
    send(sw, b, eth(M1, M2, b"learn M2 on b"))
    send(sw, a, eth(dst, M1, b"to all"))
    assert any(g[0][:6] == bytes.fromhex(dst.replace(":", "")) for g in b.got)
    assert any(g[0][:6] == bytes.fromhex(dst.replace(":", "")) for g in c.got)
    assert not any(g[0][:6] == bytes.fromhex(dst.replace(":", "")) for g in a.got)


def test_group_source_is_never_learned() -> None:
    sw, (a, _b, _c), _ = make()
    send(sw, a, eth(M2, MCAST, b"bogus source"))
    assert sw.mac_table() == []


def test_frame_to_its_own_port_is_filtered() -> None:
    sw, (a, b, c), _ = make()
    send(sw, a, eth(M3, M1, b"x"), eth(M3, M2, b"y"))  # M1 and M2 both behind a
    send(sw, a, eth(M2, M1, b"local"))
    assert sw.filtered == 1
    assert len(b.got) == 2 and len(c.got) == 2  # only the two floods


def test_station_move_is_followed() -> None:
    sw, (a, b, c), _ = make()
    send(sw, a, eth(BCAST, M1, b"hi"))
    send(sw, c, eth(M1, M3, b"to M1"))
    assert a.got[-1][0].endswith(b"to M1")
    send(sw, b, eth(BCAST, M1, b"moved"))  # M1 now behind b
    send(sw, c, eth(M1, M3, b"again"))
    assert b.got[-1][0].endswith(b"again")
    assert {e["mac"]: e["port"] for e in sw.mac_table()}[M1] == "s1"


def test_burst_decisions_are_per_address_pair() -> None:
    """Within one burst the cached decision must follow every change of addresses."""
    sw, (a, b, c), _ = make()
    send(sw, b, eth(BCAST, M2, b""))
    send(sw, c, eth(BCAST, M3, b""))
    for p in (a, b, c):
        p.got.clear()
    frames = [eth(M2, M1, b"1"), eth(M2, M1, b"2"), eth(M3, M1, b"3"), eth(M2, M1, b"4"),
              eth(BCAST, M1, b"5"), eth(M3, M1, b"6")]
    send(sw, a, *frames)
    assert [g[0][-1:] for g in b.got] == [b"1", b"2", b"4", b"5"]
    assert [g[0][-1:] for g in c.got] == [b"3", b"5", b"6"]


def test_offload_headers_follow_their_frames() -> None:
    sw, (a, b, c), _ = make()
    h = bytes(range(10))
    send(sw, a, eth(M2, M1, b"plain"), eth(M2, M1, b"offload"), hdrs=[None, h])
    assert [g[1] for g in b.got] == [None, h]  # flooded: M2 is unknown
    assert [g[1] for g in c.got] == [None, h]
    send(sw, b, eth(BCAST, M2, b"M2 is on b"))
    send(sw, a, eth(M2, M1, b"1"), eth(M3, M1, b"2"), eth(M2, M1, b"3"), hdrs=[h, None, h])
    assert [(g[0][-1:], g[1]) for g in b.got[-3:]] == [(b"1", h), (b"2", None), (b"3", h)]
    assert [(g[0][-1:], g[1]) for g in c.got[-1:]] == [(b"2", None)]


def test_aging_forgets_quiet_stations(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    sw, (a, b, _c), r = make(aging=60.0)
    send(sw, a, eth(BCAST, M1, b""))
    now[0] += 30
    send(sw, b, eth(BCAST, M2, b""))
    now[0] += 40  # M1 is 70 s old, M2 40 s
    aging = next(cb for d, cb in r.later if d > 0)
    aging()
    assert [e["mac"] for e in sw.mac_table()] == [M2]


def test_table_is_bounded() -> None:
    sw, (a, b, _c), _ = make(max_macs=4)
    for i in range(10):
        send(sw, a, eth(BCAST, f"02:00:00:00:01:{i:02x}", b""))
    assert len(sw.macs) == 4 and sw.learn_refused == 6
    # An unlearned station is still reachable: frames to it are flooded.
    send(sw, b, eth("02:00:00:00:01:09", M2, b"flooded"))
    assert any(g[0].endswith(b"flooded") for g in a.got)


def test_port_down_forgets_its_stations() -> None:
    sw, (a, b, _c), _ = make()
    send(sw, a, eth(BCAST, M1, b""))
    send(sw, b, eth(BCAST, M2, b""))
    sw.port_down(a)
    assert [e["mac"] for e in sw.mac_table()] == [M2]


def test_announce_relearns_and_floods_rarp() -> None:
    sw, (a, b, c), _ = make()
    send(sw, a, eth(BCAST, M1, b""))
    mac = bytes.fromhex(M1.replace(":", ""))
    sw.announce(b, mac)  # the VM with M1 migrated behind b
    assert {e["mac"]: e["port"] for e in sw.mac_table()}[M1] == "s1"
    rarp = build_rarp(mac)
    assert a.got[-1][0] == rarp and c.got[-1][0] == rarp
    assert all(g[0] != rarp for g in b.got)


def test_stats_and_names() -> None:
    sw, (a, _b, _c), _ = make()
    send(sw, a, eth(BCAST, M1, b""))
    s = sw.stats()
    assert s["mode"] == "event" and s["macs"] == 1 and s["flooded"] == 1
    assert [p["name"] for p in s["ports"]] == ["s0", "s1", "s2"]
    assert set(s["ports"][0]) >= {"rx_frames", "tx_frames", "drops", "dropped", "link"}
    assert sw.next_mac() != sw.next_mac()
    assert sw._name(None, "s0") == "s02"
    with pytest.raises(ValueError, match="already used"):
        sw._name("s1", "x")
    with pytest.raises(KeyError, match="no port named 'zz'"):
        sw.port("zz")
    with pytest.raises(ValueError, match="aging"):
        Switch(FakeReactor(), aging=0)  # type: ignore[arg-type]


class HoldingSink(Sink):
    """A port that, like a vhost-user port, holds what it was sent until commit."""

    def __init__(self, switch: Switch, name: str) -> None:
        super().__init__(switch, name)
        self.published: list[int] = []

    def send(self, frames: list[memoryview], hdrs: list[bytes | None] | None,
             pair: int) -> None:
        super().send(frames, hdrs, pair)
        self.switch.to_publish(self)

    def publish(self) -> None:
        self.published.append(len(self.got))


def test_delivered_frames_are_published_only_at_commit() -> None:
    """The switch publishes copies only when told the sources' buffers are back."""
    sw = Switch(FakeReactor())  # type: ignore[arg-type]
    a, b = HoldingSink(sw, "a"), HoldingSink(sw, "b")
    sw.ports += [a, b]
    sw.fabric.members += [a, b]
    sw.forward(a, [memoryview(eth(BCAST, M1, b"x" * 50))], None)
    sw.forward(a, [memoryview(eth(BCAST, M1, b"y" * 50))], None)
    assert len(b.got) == 2 and b.published == []
    sw.commit()
    assert b.published == [2] and a.published == []
    sw.commit()  # nothing new: no second publication
    assert b.published == [2]
    sw.close()
