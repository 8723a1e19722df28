"""A front-end that reconnects after the back-end dropped its session restores exactly the
protocol state it had: the new session's snapshot equals the old one's final snapshot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vhostuser.connection.snapshot import SessionSnapshot
from vhostuser.frontends.net import VirtioNetFrontend
from vhostuser.switch import SwitchThread, VhostUserPort

from .test_net_switch import MAC_A, MAC_B, frames_seq, receive_n, two_ports, wait_until


def _session_of(st: SwitchThread, name: str) -> Any:
    def get() -> Any:
        assert st.switch is not None
        port = st.switch.port(name)
        assert isinstance(port, VhostUserPort)
        return port.session
    return st.call(get)


def _pump(nic: VirtioNetFrontend) -> int:
    """Let the front-end run (this is where it notices the loss and dials again)."""
    nic.wait(0.2)
    return nic.reconnects


def test_reconnected_session_equals_the_dropped_one(no_leaks: Any, tmp_path: Path) -> None:
    a, b = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    with SwitchThread(two_ports(a, b)) as st, VirtioNetFrontend.connect(b) as nb, \
            VirtioNetFrontend.connect(a) as na:
        na.send_all(frames_seq(50, 60, MAC_A, MAC_B))
        assert len(receive_n(nb, 50)) == 50
        first = _session_of(st, "a")
        live: SessionSnapshot = st.call(first.snapshot)
        st.call(lambda: first.close("dropped by the test"))
        final = first.final_snapshot
        assert final is not None and final == live  # nothing moved between the two
        # The front-end notices, dials again and resumes: same features, same memory
        # table, same rings at the same positions.
        wait_until(lambda: _pump(na) == 1, 20, "the reconnect")
        second = wait_until(lambda: (s := _session_of(st, "a")) is not first and s, 10,
                            "the new session")
        resumed: SessionSnapshot = wait_until(
            lambda: (snap := st.call(second.snapshot)).rings[1].started and snap, 10,
            "the rings to start")
        assert resumed == final, final.diff(resumed)
        # And it goes on from there: only the transmit ring's position moves.
        fr = frames_seq(10, 60, MAC_A, MAC_B, magic=0x99)
        na.send_all(fr)
        assert receive_n(nb, 10) == fr
        after: SessionSnapshot = st.call(second.snapshot)
        assert final.diff(after) == [f"ring 1 base: {final.rings[1].base:#x} -> "
                                     f"{final.rings[1].base + 10:#x}"]
