"""A switch port with two front-ends on one socket path: the handover rules of a live
migration on one host (see ``VhostUserPort``), with our own front-ends over real sockets,
memfds and eventfds (no QEMU).

The destination of a migration connects while the source runs and stands by; it takes the
port when it starts its receive queue with the source's stopped, or when the source goes
away. Frames for the port reach exactly one front-end; a standby is neither heard nor
served; a third front-end is refused. Every test checks that no fd or mapping is left
behind (``no_leaks``).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vhostuser.cli.switch import render_table
from vhostuser.frontends.net import VirtioNetFrontend
from vhostuser.io.frontend import FrontendClient
from vhostuser.switch import Switch, SwitchThread

from .test_net_switch import MAC_A, MAC_B, frames_seq, receive_n, wait_until

ENGINES = [pytest.param("python", id="python"), pytest.param("compiled", id="compiled")]


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for unix sockets (AF_UNIX paths are limited to 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="vhu-ho-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _ports(a: str, b: str) -> Callable[[Switch], None]:
    def setup(sw: Switch) -> None:
        sw.add_vhost_user_port(a, name="a")  # the migrating guest's NIC
        sw.add_vhost_user_port(b, name="b")  # its peer

    return setup


def _info(st: SwitchThread, name: str = "a") -> dict[str, Any]:
    def get() -> dict[str, Any]:
        assert st.switch is not None
        return st.switch.port(name).info()

    return st.call(get)


def _destination(path: str) -> VirtioNetFrontend:
    """A front-end connected to ``path`` but not started yet: a destination QEMU started
    with ``-incoming``, which starts its rings once the migration completes."""
    client = FrontendClient.connect(path, timeout=5.0)
    return VirtioNetFrontend(client, name=f"{path} (destination)", reconnect=False)


def _stop_rings(nic: VirtioNetFrontend) -> None:
    """What a source QEMU does at the end of a migration: stop every ring (SET_VRING_ENABLE
    0, GET_VRING_BASE) and keep the connection open."""
    for index in range(2 * nic.queue_pairs):
        nic.client.stop_vring(index)
    nic._started = False  # its close() must not stop them a second time


def _standby(st: SwitchThread) -> dict[str, Any]:
    return wait_until(lambda: _info(st)["standby"], 10, "a standby front-end")


def _handovers(st: SwitchThread, n: int) -> dict[str, Any]:
    return wait_until(lambda: (i := _info(st))["handovers"] == n and i, 10,
                      f"handover #{n}")


@pytest.mark.parametrize("engine", ENGINES)
def test_destination_takes_over_when_the_source_stops_its_rings(
        no_leaks: Any, sock_dir: Path, engine: str, caplog: pytest.LogCaptureFixture) -> None:
    """The migration on one host, step by step: the destination connects while the
    source runs (accepted, standing by, given nothing); the source stops its rings (frames
    for the port are counted rx_down, the port stays the source's); the destination
    starts its rings and takes the port (frames go to it, and what it sends crosses the
    switch); the source quits, and nothing changes for the destination. One set of
    counters throughout."""
    caplog.set_level(logging.INFO, logger="vhostuser.switch.ports")
    a, b = str(sock_dir / "a.sock"), str(sock_dir / "b.sock")
    with SwitchThread(_ports(a, b), engine=engine) as st, \
            VirtioNetFrontend.connect(b) as nb, VirtioNetFrontend.connect(a) as src:
        src.send_all(frames_seq(3, 60, MAC_A, MAC_B))
        assert len(receive_n(nb, 3)) == 3
        with _destination(a) as dst:
            sb = _standby(st)
            info = _info(st)
            assert info["connected"] and info["session"] == "a.sock#0", info
            assert sb == {"session": "a.sock#1", "running": False, "rx_pairs": [],
                          "features": 0}, sb
            before = frames_seq(10, 100, MAC_B, MAC_A, magic=0x10)
            nb.send_all(before)
            assert receive_n(src, 10) == before

            _stop_rings(src)
            nb.send_all(frames_seq(5, 100, MAC_B, MAC_A, magic=0x11))
            wait_until(lambda: _info(st)["drops"]["rx_down"] == 5, 10, "5 frames rx_down")
            assert _info(st)["handovers"] == 0  # nobody else runs: the source keeps it

            dst.start()
            info = _handovers(st, 1)
            assert info["session"] == "a.sock#1" and info["link"], info
            assert info["standby"]["session"] == "a.sock#0", info
            assert not info["standby"]["running"], info
            after = frames_seq(20, 200, MAC_B, MAC_A, magic=0x12)
            nb.send_all(after)
            assert receive_n(dst, 20) == after
            out = frames_seq(8, 300, MAC_A, MAC_B, magic=0x13)
            dst.send_all(out)
            assert receive_n(nb, 8) == out

            src.close()
            wait_until(lambda: _info(st)["standby"] is None, 10, "the source to go")
            last = frames_seq(6, 100, MAC_B, MAC_A, magic=0x14)
            nb.send_all(last)
            assert receive_n(dst, 6) == last
            info = _info(st)
        assert not st.errors, st.errors
    assert info["session"] == "a.sock#1" and info["sessions"] == 2, info
    assert info["handovers"] == 1 and info["refused"] == 0, info
    assert (info["rx_frames"], info["tx_frames"]) == (3 + 8, 10 + 20 + 6), info
    assert info["drops"]["rx_down"] == 5 and info["dropped"] == 5, info
    text = caplog.text
    assert "a: second front-end connected (a.sock#1) while a.sock#0 is active" in text
    assert "a: handover #1: a.sock#1 takes the port from a.sock#0" in text
    assert "a: standby front-end a.sock#0 gone" in text


def test_standby_takes_over_when_the_active_front_end_goes_away(
        no_leaks: Any, sock_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The source quits before the destination started its rings (a migration abandoned,
    a source killed): the standby becomes the port's front-end at once, frames wait as
    rx_down until it starts its rings, then reach it."""
    caplog.set_level(logging.INFO, logger="vhostuser.switch.ports")
    a, b = str(sock_dir / "a.sock"), str(sock_dir / "b.sock")
    with SwitchThread(_ports(a, b)) as st, VirtioNetFrontend.connect(b) as nb:
        with VirtioNetFrontend.connect(a) as src:
            src.send_all(frames_seq(2, 60, MAC_A, MAC_B))
            assert len(receive_n(nb, 2)) == 2
            dst = _destination(a)
            _standby(st)
        with dst:
            info = _handovers(st, 1)
            assert info["session"] == "a.sock#1" and info["standby"] is None, info
            assert not info["link"] and info["connected"], info
            nb.send_all(frames_seq(4, 100, MAC_B, MAC_A, magic=0x21))
            wait_until(lambda: _info(st)["drops"]["rx_down"] == 4, 10, "4 frames rx_down")
            dst.start()
            wait_until(lambda: _info(st)["link"], 10, "the destination's link")
            fr = frames_seq(12, 100, MAC_B, MAC_A, magic=0x22)
            nb.send_all(fr)
            assert receive_n(dst, 12) == fr
            back = frames_seq(3, 100, MAC_A, MAC_B, magic=0x23)
            dst.send_all(back)
            assert receive_n(nb, 3) == back
            info = _info(st)
        assert not st.errors, st.errors
    assert info["handovers"] == 1 and info["sessions"] == 2, info
    assert "a: handover #1: a.sock#1 takes the port from a.sock#0: a.sock#0 went away" \
        in caplog.text


@pytest.mark.parametrize("busy", [False, True], ids=["event", "busy"])
@pytest.mark.parametrize("engine", ENGINES)
def test_a_running_standby_cannot_take_the_port_from_a_running_front_end(
        no_leaks: Any, sock_dir: Path, engine: str, busy: bool,
        caplog: pytest.LogCaptureFixture) -> None:
    """A second front-end that starts its rings while the first one's run (no correct
    migration does this: a second guest on the socket, or a hostile front-end) stays the
    standby, with a warning: frames for the port keep going to the first one only, and
    what the second transmits is dropped (counted ``standby``), not switched. Once the
    first one stops its rings, the running standby takes over; the first one stands by
    and gets nothing more."""
    caplog.set_level(logging.INFO, logger="vhostuser.switch.ports")
    a, b = str(sock_dir / "a.sock"), str(sock_dir / "b.sock")
    with SwitchThread(_ports(a, b), engine=engine, busy_poll=busy) as st, \
            VirtioNetFrontend.connect(b) as nb, VirtioNetFrontend.connect(a) as first, \
            _destination(a) as second:
        _standby(st)
        second.start()
        wait_until(lambda: _info(st)["standby"]["running"], 10, "the standby's rings")
        assert _info(st)["handovers"] == 0
        fr = frames_seq(30, 100, MAC_B, MAC_A, magic=0x31)
        nb.send_all(fr)
        assert receive_n(first, 30) == fr
        assert second.recv(timeout=0.3) == []
        second.send_all(frames_seq(7, 100, MAC_A, MAC_B, magic=0x32))
        wait_until(lambda: _info(st)["drops"].get("standby") == 7, 10, "7 standby drops")
        assert nb.recv(timeout=0.3) == []
        mine = frames_seq(5, 100, MAC_A, MAC_B, magic=0x33)
        first.send_all(mine)
        assert receive_n(nb, 5) == mine

        _stop_rings(first)
        info = _handovers(st, 1)
        assert info["session"] == "a.sock#1" and info["link"], info
        assert info["standby"] == {"session": "a.sock#0", "running": False,
                                   "rx_pairs": [], "features": info["standby"]["features"]}
        fr2 = frames_seq(9, 100, MAC_B, MAC_A, magic=0x34)
        nb.send_all(fr2)
        assert receive_n(second, 9) == fr2
        info = _info(st)
        assert not st.errors, st.errors
    assert info["rx_frames"] == 7 + 5 and info["tx_frames"] == 30 + 9, info
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1, caplog.text
    assert "standby front-end a.sock#1 started its receive queue while the active " \
        "a.sock#0's still runs: a.sock#0 keeps the port" in warned[0].getMessage()
    assert "a: handover #1: a.sock#1 takes the port from a.sock#0: the active front-end " \
        "stopped its receive queues" in caplog.text


def test_a_third_front_end_is_refused(no_leaks: Any, sock_dir: Path,
                                      caplog: pytest.LogCaptureFixture) -> None:
    """With an active and a standby front-end, a third connection is closed at once, with
    a warning naming both; the two go on unharmed (frames still reach the active one),
    and once the standby leaves, a new front-end may stand by again."""
    caplog.set_level(logging.INFO, logger="vhostuser.switch.ports")
    a, b = str(sock_dir / "a.sock"), str(sock_dir / "b.sock")
    with SwitchThread(_ports(a, b)) as st, \
            VirtioNetFrontend.connect(b) as nb, VirtioNetFrontend.connect(a) as src:
        with _destination(a):
            _standby(st)
            with pytest.raises(Exception):  # noqa: B017 - refused: EOF during negotiation
                VirtioNetFrontend.connect(a, timeout=2)
            info = wait_until(lambda: (i := _info(st))["refused"] == 1 and i, 10,
                              "the refusal")
            assert info["session"] == "a.sock#0", info
            assert info["standby"]["session"] == "a.sock#1", info
            table = render_table(st.stats(), None, 1.0)
            assert f"{a}  standby a.sock#1\n" in table + "\n", table
            fr = frames_seq(10, 100, MAC_B, MAC_A, magic=0x41)
            nb.send_all(fr)
            assert receive_n(src, 10) == fr
        wait_until(lambda: _info(st)["standby"] is None, 10, "the standby to go")
        with _destination(a):
            again = _standby(st)
            assert again["session"] == "a.sock#3", again
        info = _info(st)
        assert not st.errors, st.errors
    assert info["refused"] == 1 and info["sessions"] == 3 and info["handovers"] == 0, info
    refusals = [r.getMessage() for r in caplog.records if "refusing" in r.getMessage()]
    assert refusals == [
        "a: refusing a third front-end on " + a + " (a.sock#2): a.sock#0 is active and "
        "a.sock#1 stands by (a migration's destination or a finished migration's source); "
        "one port keeps at most one standby, so quit one of them first"], caplog.text


def test_an_idle_leftover_destination_does_not_block_the_port(
        no_leaks: Any, sock_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A migration abandoned after its source quit leaves the destination connected and
    never started (a QEMU waiting on -incoming for good). A new guest on the socket stands
    by beside it and takes the port as soon as it starts its rings: an active front-end
    that runs nothing cannot keep the port from one that does."""
    caplog.set_level(logging.INFO, logger="vhostuser.switch.ports")
    a, b = str(sock_dir / "a.sock"), str(sock_dir / "b.sock")
    with SwitchThread(_ports(a, b)) as st, VirtioNetFrontend.connect(b) as nb:
        with VirtioNetFrontend.connect(a):
            leftover = _destination(a)
            _standby(st)
        with leftover:
            _handovers(st, 1)  # the source went away: the leftover is the port's now
            with VirtioNetFrontend.connect(a) as guest:
                info = _handovers(st, 2)
                assert info["session"] == "a.sock#2" and info["link"], info
                assert info["standby"]["session"] == "a.sock#1", info
                fr = frames_seq(15, 100, MAC_B, MAC_A, magic=0x51)
                nb.send_all(fr)
                assert receive_n(guest, 15) == fr
                out = frames_seq(4, 100, MAC_A, MAC_B, magic=0x52)
                guest.send_all(out)
                assert receive_n(nb, 4) == out
        assert not st.errors, st.errors
    assert "a: handover #2: a.sock#2 takes the port from a.sock#1: it started its receive " \
        "queue; the active front-end's are stopped" in caplog.text
