"""Session snapshots: equal exactly when the control-plane state is equal; diffs in words."""

from __future__ import annotations

import json

from vhostuser.connection.backend import BackendConnection
from vhostuser.connection.snapshot import SessionSnapshot, snapshot_backend
from vhostuser.protocol import payloads as P
from vhostuser.protocol.enums import FrontendRequest

from .fakes import configure_ring, feed, handshake, make_backend, ram_region, req

R = FrontendRequest


def _session() -> tuple[SessionSnapshot, BackendConnection[int]]:
    conn, _host, factory, fds = make_backend()
    handshake(conn, fds)
    configure_ring(conn, fds, 0)
    configure_ring(conn, fds, 1, kick=False)
    conn.kick(0)  # the first kick starts ring 0
    factory.built[0].next_base = 7  # and it moved on
    return snapshot_backend(conn), conn


def test_same_steps_same_snapshot_and_what_a_message_changes() -> None:
    a, _ = _session()
    b, conn = _session()
    assert a == b and hash(a) == hash(b) and a.diff(b) == []
    assert a.rings[0].started and a.rings[0].base == 7 and a.rings[0].kick == "fd"
    assert not a.rings[1].started and a.rings[1].kick == "none" and a.rings[1].call == "fd"
    assert [r.guest_phys_addr for r in a.regions] == [0] and a.owner
    feed(conn, req(R.SET_VRING_ENABLE, P.VringState(index=0, num=1)))
    feed(conn, req(R.ADD_MEM_REG, P.SingleRegion(region=ram_region(
        gpa=1 << 30, uva=0x7F10_0000_0000))), [900])
    c = snapshot_backend(conn)
    assert c != a
    changes = a.diff(c)
    assert "ring 0 enabled: False -> True" in changes, changes
    assert any(x.startswith("region added: gpa 0x40000000") for x in changes), changes
    assert len(changes) == 2, changes


def test_reset_owner_clears_the_session_and_json() -> None:
    a, conn = _session()
    feed(conn, req(R.RESET_OWNER))
    b = snapshot_backend(conn)
    changes = a.diff(b)
    assert "region gone: gpa 0x0 size 0x100000" in changes, changes
    assert any(x.startswith("features: 0x") and x.endswith("-> None") for x in changes)
    assert any(x.startswith("ring 0 started: True -> False") for x in changes)
    d = json.loads(json.dumps(a.as_json()))
    assert d["rings"][0]["base"] == 7 and "VERSION_1" in d["feature_names"]
