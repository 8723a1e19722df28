"""The pure forwarding fabric with explicit time: learning, lookup, flooding, aging."""

from __future__ import annotations

import pytest

from vhostuser.switch.fabric import Fabric, Member

from .net_rig import eth

M1, M2, M3 = "02:00:00:00:00:01", "02:00:00:00:00:02", "02:00:00:00:00:03"
BCAST = "ff:ff:ff:ff:ff:ff"


def frame(dst: str, src: str) -> memoryview:
    return memoryview(eth(dst, src, bytes(46)))


def staged(members: list[Member]) -> dict[str, int]:
    return {m.name: len(m.out) for m in members if m.out}


def test_learn_lookup_flood_filter_and_age_with_time_passed_in() -> None:
    fab = Fabric(aging=10.0)
    a, b, c = Member("a"), Member("b"), Member("c")
    fab.members += [a, b, c]
    touched = fab.forward(a, [frame(BCAST, M1)], None, now=100.0)
    assert staged(touched) == {"b": 1, "c": 1} and fab.flooded == 1
    for m in touched:
        m.clear_out()
    touched = fab.forward(b, [frame(M1, M2), frame(M1, M2)], None, now=101.0)
    assert staged(touched) == {"a": 2}  # learned: unicast to a only
    for m in touched:
        m.clear_out()
    assert fab.forward(a, [frame(M1, M3)], None, now=102.0) == []  # M1 is on a: filtered
    assert fab.filtered == 1
    assert [(mac.hex(), m.name) for mac, m, _age in fab.table(now=103.0)] == [
        ("020000000001", "a"), ("020000000002", "b"), ("020000000003", "a")]
    assert fab.age(now=111.5) == 2  # M1 (last 100) and M2 (101) are older than 10 s
    assert [m.name for _mac, m, _ in fab.table(now=111.5)] == ["a"]
    assert fab.forget_member(a) == 1 and fab.macs == {}


def test_table_is_bounded_and_group_sources_are_not_learned() -> None:
    fab = Fabric(max_macs=1)
    a, b = Member("a"), Member("b")
    fab.members += [a, b]
    fab.forward(a, [frame(BCAST, M1), frame(BCAST, M2), frame(BCAST, "01:00:5e:00:00:01")],
                None, now=0.0)
    assert list(fab.macs) == [bytes.fromhex("020000000001")]
    assert fab.learn_refused == 1


def test_headers_run_parallel_to_frames() -> None:
    fab = Fabric()
    a, b = Member("a"), Member("b")
    fab.members += [a, b]
    hdr = bytes(range(10))
    (out,) = fab.forward(a, [frame(BCAST, M1), frame(BCAST, M1)], [None, hdr], now=0.0)
    assert out is b and out.staged_hdrs() == [None, hdr]


@pytest.mark.parametrize(("kw", "msg"), [({"aging": 0}, "aging 0"),
                                         ({"max_macs": 0}, "max_macs 0")])
def test_bad_settings_are_named(kw: dict[str, float], msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        Fabric(**kw)  # type: ignore[arg-type]
