"""Front-ends that outlive their back-end: the net front-end takes up a restarted switch
and resumes its rings, both front-ends refuse at once a back-end that came back without
a bit the session depends on (naming the bits), and nothing leaks across reconnects.

Back-ends run on reactor threads (``SwitchThread``, ``ServerThread``) over real sockets,
memfds and eventfds; stopping one closes its sessions as a crash would (the front-end
sees the control socket close).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vhostuser.devices.base import QueueAccess
from vhostuser.devices.blk import BlkDevice, MemoryBackend
from vhostuser.devices.net import VirtioNetDevice
from vhostuser.errors import PeerClosedError
from vhostuser.frontends import BlkOp, VirtioBlkFrontend
from vhostuser.frontends.net import ProbeLedger, VirtioNetFrontend
from vhostuser.frontends.resume import BackendChangedError, check_offer
from vhostuser.io.backend import BackendSession
from vhostuser.io.fdcount import snapshot
from vhostuser.io.thread import ServerThread
from vhostuser.protocol.enums import (
    BlkFeature,
    DeviceType,
    NetFeature,
    ProtocolFeature,
    VirtioFeature,
)
from vhostuser.switch import Switch, SwitchThread

from .test_net_switch import (
    MAC_A,
    MAC_B,
    SRC,
    _cli,
    frames_seq,
    receive_n,
    running,
    sock_dir,
    transfer,
    wait_until,
)

__all__ = ["sock_dir"]  # the fixture, imported for the tests below

MiB = 1 << 20


def two_ports(a: str, b: str) -> Callable[[Switch], None]:
    def setup(sw: Switch) -> None:
        sw.add_vhost_user_port(a, name="a")
        sw.add_vhost_user_port(b, name="b")

    return setup


def notice_outage(*nics: VirtioNetFrontend) -> None:
    """Let each front-end see that its back-end closed the connection."""
    for nic in nics:
        wait_until(lambda nic=nic: (nic.wait(0.05), not nic.connected)[1], 10,  # type: ignore[misc]
                   f"{nic.name} to notice the outage")


# -- the net front-end takes up a restarted switch ---------------------------------------


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_net_frontend_resumes_on_a_restarted_switch(no_leaks: Any, sock_dir: Path,
                                                    packed: bool) -> None:
    """The switch goes away and a new one starts on the same sockets: both front-ends
    take it up (same guest RAM, same rings) and frames cross exactly again. Frames queued
    while it was away go out from a resumed split ring and are dropped, counted, from a
    packed ring, which restarts empty. The process's fds and mappings are where they were."""
    a, b = str(sock_dir / "a.sock"), str(sock_dir / "b.sock")
    st = SwitchThread(two_ports(a, b)).start()
    try:
        with VirtioNetFrontend.connect(a, packed=packed) as na, \
                VirtioNetFrontend.connect(b, packed=packed) as nb:
            fr = frames_seq(40, 100, MAC_A, MAC_B)
            assert na.send_all(fr) == 40 and receive_n(nb, 40) == fr
            back = frames_seq(40, 100, MAC_B, MAC_A)
            assert nb.send_all(back) == 40 and receive_n(na, 40) == back
            before = snapshot()
            st.stop()
            notice_outage(na, nb)
            assert na.outages[-1][1] is None and na.last_disconnect_reason
            queued = frames_seq(10, 100, MAC_A, MAC_B, magic=0x1234)
            assert na.send(queued) == 10  # no back-end: queued in the ring
            st = SwitchThread(two_ports(a, b)).start()
            assert nb.reconnect(10) and na.reconnect(10)
            if packed:
                assert nb.recv(timeout=0.5) == []
                assert na.stats.tx_outage_dropped == 10
            else:
                assert receive_n(nb, 10) == queued
                assert na.stats.tx_outage_dropped == 0
            fr = frames_seq(300, 200, MAC_A, MAC_B, magic=0x4321)
            assert transfer(na, nb, fr) == fr
            back = frames_seq(300, 200, MAC_B, MAC_A, magic=0x4322)
            assert transfer(nb, na, back) == back
            # As many fds and the same shared mappings (guest RAM) as before the outage:
            # the new connections replaced the old ones (sockets are new, hence counts).
            after = snapshot()
            assert after.fd_count == before.fd_count, (before.fd_targets, after.fd_targets)
            assert after.shared_maps == before.shared_maps
            assert after.maps_count <= before.maps_count + 8
            for nic in (na, nb):
                assert nic.connected and nic.reconnects == 1 == nic.stats.reconnects
                assert len(nic.outages) == 1 and nic.outages[0][1] is not None
                assert nic.stats.outage_seconds == nic.outages[0][1] - nic.outages[0][0] > 0
                assert nic.stats.rx_errors == 0
        assert not st.errors, st.errors
    finally:
        st.stop()


def test_net_frontend_in_listen_mode_takes_the_switch_back(no_leaks: Any,
                                                           sock_dir: Path) -> None:
    """A front-end that listens (DPDK ``client=1`` style, ``accept``) for a switch port in
    --connect mode listens again when that switch goes away, and the next one dials in."""
    c, b = str(sock_dir / "c.sock"), str(sock_dir / "b.sock")

    def setup(sw: Switch) -> None:
        sw.add_vhost_user_port(c, name="c", connect=True, reconnect_interval=0.05)
        sw.add_vhost_user_port(b, name="b")

    st = SwitchThread(setup).start()
    try:
        with VirtioNetFrontend.accept(c, accept_timeout=10) as nc, \
                VirtioNetFrontend.connect(b) as nb:
            fr = frames_seq(20, 100, MAC_A, MAC_B)
            assert nc.send_all(fr) == 20 and receive_n(nb, 20) == fr
            st.stop()
            notice_outage(nc, nb)
            assert os.path.exists(c)  # listening again for the next switch
            st = SwitchThread(setup).start()
            assert nb.reconnect(10) and nc.reconnect(10)
            fr = frames_seq(20, 100, MAC_A, MAC_B, magic=0x55)
            assert nc.send_all(fr) == 20 and receive_n(nb, 20) == fr
            assert nc.reconnects == 1
        assert not os.path.exists(c)  # the socket we listened on is gone with us
        assert not st.errors, st.errors
    finally:
        st.stop()


def test_net_frontend_without_reconnect_or_past_its_timeout(no_leaks: Any,
                                                            sock_dir: Path) -> None:
    """reconnect=False: the outage is an error at the next wait. With reconnect on, a
    back-end that does not come back within reconnect_timeout is one too; both say why."""
    a, b = str(sock_dir / "a.sock"), str(sock_dir / "b.sock")
    with SwitchThread(two_ports(a, b)) as st, \
            VirtioNetFrontend.connect(a, reconnect=False) as na, \
            VirtioNetFrontend.connect(b, reconnect_timeout=0.3) as nb:
        st.stop()
        with pytest.raises(PeerClosedError, match="the back-end closed the connection"):
            for _ in range(200):
                na.wait(0.05)
        with pytest.raises(PeerClosedError, match=r"no back-end took the session over within "
                                                  r"0\.3 s"):
            for _ in range(200):
                nb.wait(0.05)


def _switch_cli(*ports: str) -> subprocess.Popen[str]:
    """``vhost-user switch`` with ``--port`` (or ``--echo`` for ``echo:PATH``) ports,
    started once every socket is there."""
    args: list[str] = []
    for p in ports:
        args += ["--echo", p[5:]] if p.startswith("echo:") else ["--port", p]
    proc = _cli("switch", *args)
    paths = [p.removeprefix("echo:") for p in ports]
    wait_until(lambda: all(os.path.exists(x) for x in paths) or proc.poll() is not None, 20,
               "the switch's sockets")
    assert proc.poll() is None, proc.communicate()
    return proc


def test_frontends_take_up_a_switch_killed_and_restarted(no_leaks: Any,
                                                         sock_dir: Path) -> None:
    """SIGKILL of the switch process (no goodbye, stale socket files left behind) and a
    new one started on the same sockets: both front-ends take it up and frames cross
    exactly again, both ways."""
    a, b = str(sock_dir / "a.sock"), str(sock_dir / "b.sock")
    with running(_switch_cli(a, b)) as first, VirtioNetFrontend.connect(a) as na, \
            VirtioNetFrontend.connect(b) as nb:
        fr = frames_seq(50, 100, MAC_A, MAC_B)
        assert transfer(na, nb, fr) == fr
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        assert os.path.exists(a)  # stale: nobody removed it
        notice_outage(na, nb)
        with running(_switch_cli(a, b)) as second:
            assert na.reconnect(20) and nb.reconnect(20)
            fr = frames_seq(200, 300, MAC_A, MAC_B, magic=0x66)
            assert transfer(na, nb, fr) == fr
            back = frames_seq(200, 300, MAC_B, MAC_A, magic=0x67)
            assert transfer(nb, na, back) == back
            assert na.reconnects == nb.reconnects == 1
            assert second.poll() is None


def test_pktgen_counts_an_outage_apart(no_leaks: Any, sock_dir: Path) -> None:
    """pktgen against an echo port of a switch that is SIGKILLed mid-run and restarted:
    it takes the new switch up and goes on; what was lost went in the outage (exit status
    0), and the summary counts the reconnect and the time without a back-end."""
    e = str(sock_dir / "e.sock")
    with running(_switch_cli("echo:" + e)) as first:
        gen = subprocess.Popen(
            [sys.executable, "-m", "vhostuser.cli.main", "pktgen", e, "--rate", "2000",
             "--duration", "6", "--json", "--reconnect", "20"],
            env=dict(os.environ, PYTHONPATH=SRC), text=True, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE)
        with running(gen):
            time.sleep(2.0)  # traffic flows meanwhile (not a timing assertion)
            first.send_signal(signal.SIGKILL)
            first.wait(10)
            with running(_switch_cli("echo:" + e)):
                out, err = gen.communicate(timeout=60)
    assert gen.returncode == 0, (out, err)
    s = json.loads(out)
    assert s["reconnects"] == 1 and s["outage_seconds"] > 0, s
    assert s["lost_outside_outages"] == 0 and s["lost"] == s["lost_in_outages"], s
    assert s["duplicates"] == 0 and s["received_ours"] > 0, s
    assert s["frontend"]["reconnects"] == 1
    assert "the back-end closed the connection after" in err, err
    assert "a back-end took the session over after" in err, err


def test_pktgen_reconnect_0_ends_the_run(no_leaks: Any, sock_dir: Path) -> None:
    """pktgen --reconnect 0: the back-end going away ends the run with status 2, saying so."""
    e = str(sock_dir / "e.sock")
    with running(_switch_cli("echo:" + e)) as sw:
        gen = subprocess.Popen(
            [sys.executable, "-m", "vhostuser.cli.main", "pktgen", e, "--rate", "1000",
             "--duration", "30", "--reconnect", "0", "--quiet"],
            env=dict(os.environ, PYTHONPATH=SRC), text=True, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE)
        with running(gen):
            time.sleep(1.5)  # traffic flows meanwhile (not a timing assertion)
            sw.send_signal(signal.SIGKILL)
            out, err = gen.communicate(timeout=30)
    assert gen.returncode == 2, (out, err)
    assert "went away" in err and "the back-end closed the connection" in err, err


class ChangedNet(VirtioNetDevice):
    """A net back-end that offers less than a stock one: ``strip`` is taken from its
    offered virtio features."""

    strip = 0

    def attach(self, queues: QueueAccess) -> None:
        super().attach(queues)
        if isinstance(queues, BackendSession):
            queues.conn.offered_features &= ~self.strip


@pytest.mark.parametrize(("kw", "strip", "names"), [
    (dict(packed=True), VirtioFeature.RING_PACKED | VirtioFeature.RING_EVENT_IDX,
     "RING_EVENT_IDX, RING_PACKED"),
    (dict(), NetFeature.MRG_RXBUF, "MRG_RXBUF"),
], ids=["packed-event-idx", "mrg-rxbuf"])
def test_net_frontend_refuses_a_changed_back_end_at_once(no_leaks: Any, sock_dir: Path,
                                                         kw: dict[str, Any], strip: int,
                                                         names: str) -> None:
    """A back-end that comes back without bits the rings and buffers were built for ends
    the session with an error naming them, after one attempt (not at reconnect_timeout)."""
    sock = str(sock_dir / "n.sock")

    class Less(ChangedNet):
        pass

    Less.strip = int(strip)
    first = ServerThread(sock, VirtioNetDevice).start()
    try:
        with VirtioNetFrontend.connect(sock, reconnect_timeout=60, **kw) as nic:
            assert nic.features & strip == strip
            first.stop()
            notice_outage(nic)
            with ServerThread(sock, Less) as second:
                with pytest.raises(BackendChangedError) as info:
                    for _ in range(400):
                        nic.wait(0.05)
                assert len(second.sessions_seen) == 1  # not retried
        assert not second.errors, second.errors
    finally:
        first.stop()
    msg = str(info.value)
    assert f"the back-end no longer offers {names} (features " in msg, msg
    assert msg.startswith(sock) and "not retrying" in msg
    assert info.value.missing_features == int(strip)
    assert ", ".join(info.value.missing_names) == names


# -- the blk front-end -----------------------------------------------------------------------


@pytest.mark.parametrize(("second_kw", "names"), [
    (dict(flush=False, inflight=False), "FLUSH, INFLIGHT_SHMFD"),
    (dict(write_zeroes=False), "WRITE_ZEROES"),
], ids=["flush-inflight", "write-zeroes"])
def test_blk_frontend_refuses_a_changed_back_end_at_once(no_leaks: Any, sock_dir: Path,
                                                         second_kw: dict[str, Any],
                                                         names: str) -> None:
    """Requests are in flight when the disk's back-end goes away; the one that comes back
    lacks bits the session depends on: wait() fails at once (one session, not 30 s of
    retries) naming them, and the requests stay where they were."""
    sock = str(sock_dir / "blk.sock")
    disk_data = MemoryBackend(4 * MiB)
    first = ServerThread(sock, lambda: BlkDevice(disk_data, latency=3600.0)).start()
    try:
        with VirtioBlkFrontend(sock, depth=4, reconnect_timeout=60.0) as disk:
            assert disk.has_inflight
            ops = [BlkOp("write", i * 4096, data=bytes([i + 1]) * 4096) for i in range(4)]
            disk.submit_many(ops)
            first.stop()
            with ServerThread(sock, lambda: BlkDevice(disk_data, **second_kw)) as second:
                with pytest.raises(BackendChangedError) as info:
                    disk.wait(30.0)
                assert len(second.sessions_seen) == 1
                assert disk.in_flight == 4 and disk.reconnects == 0
    finally:
        first.stop()
    msg = str(info.value)
    assert f"after reconnecting, the back-end no longer offers {names} (" in msg, msg
    assert msg.startswith(sock)


def test_blk_frontend_takes_a_back_end_that_offers_more(no_leaks: Any,
                                                        sock_dir: Path) -> None:
    """Bits a new back-end adds are not acked: the session goes on as negotiated."""
    sock = str(sock_dir / "blk.sock")
    disk_data = MemoryBackend(4 * MiB)
    first = ServerThread(sock, lambda: BlkDevice(disk_data, discard=False,
                                                 latency=3600.0)).start()
    try:
        with VirtioBlkFrontend(sock, depth=4, reconnect_timeout=30.0) as disk:
            negotiated = disk.features
            assert not negotiated & BlkFeature.DISCARD
            op = disk.submit(BlkOp("write", 0, data=b"z" * 4096))
            first.stop()
            with ServerThread(sock, lambda: BlkDevice(disk_data)) as second:
                got = disk.wait(20.0)
                assert got == [op] and op.ok and disk.reconnects == 1
                assert disk.features == negotiated
                assert second.call(lambda: second.sessions_seen[-1].conn.features) \
                    == negotiated
                assert disk.read(0, 4096) == b"z" * 4096
    finally:
        first.stop()


def test_check_offer_names_features_and_protocol_features() -> None:
    """The message names virtio and protocol feature bits with their enum names."""
    check_offer("x", features=0b11, offered_features=0b111)  # more is fine
    with pytest.raises(BackendChangedError) as info:
        check_offer("/s", features=int(VirtioFeature.VERSION_1 | BlkFeature.FLUSH),
                    offered_features=int(VirtioFeature.VERSION_1),
                    protocol_features=int(ProtocolFeature.INFLIGHT_SHMFD
                                          | ProtocolFeature.CONFIG),
                    offered_protocol_features=int(ProtocolFeature.CONFIG),
                    device=DeviceType.BLK)
    e = info.value
    assert e.missing_names == ("FLUSH", "INFLIGHT_SHMFD")
    assert e.missing_protocol_features == int(ProtocolFeature.INFLIGHT_SHMFD)
    assert str(e).startswith("/s: after reconnecting, the back-end no longer offers "
                             "FLUSH, INFLIGHT_SHMFD (features 0x100000200 negotiated before, "
                             "0x100000000 offered now; protocol features 0x1200 in use, "
                             "0x200 offered now)")


def test_probe_ledger_writes_off_outage_windows() -> None:
    """Arrivals, duplicates, an outage window and a late arrival from it."""
    led = ProbeLedger()
    for s in (0, 1, 2, 4, 2):
        led.see(s)
    assert (led.received, led.duplicates) == (4, 1)
    assert led.close_window(3, 8) == 4  # 3, 5, 6, 7 never came back
    assert led.close_window(6, 9) == 1  # 8 only: 6 and 7 are written off already
    assert led.lost_in_windows == 5 and led.in_window(5) and not led.in_window(4)
    led.see(5)  # a late one from the window
    assert led.lost_in_windows == 4 and not led.in_window(5)
    assert led.lost_outside(9) == 0
    assert led.lost_outside(12) == 3 and led.first_lost_outside(12) == [9, 10, 11]
    with pytest.raises(ValueError, match=r"outage window 5\.\.3"):
        led.close_window(5, 3)


@pytest.mark.parametrize("reconnect", ["20", "0"])
def test_blkbench_reconnect_flag(no_leaks: Any, sock_dir: Path, reconnect: str) -> None:
    """blkbench mid-run loses its back-end: with --reconnect 20 it takes up the next one
    and reports the reconnect and the outage; with --reconnect 0 the run ends, saying why."""
    sock = str(sock_dir / "blk.sock")
    disk_data = MemoryBackend(4 * MiB)
    first = ServerThread(sock, lambda: BlkDevice(disk_data)).start()
    try:
        bench = subprocess.Popen(
            [sys.executable, "-m", "vhostuser.cli.main", "blkbench", sock, "--rw", "randwrite",
             "--iodepth", "4", "--time", "5", "--json", "--reconnect", reconnect],
            env=dict(os.environ, PYTHONPATH=SRC), text=True, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE)
        with running(bench):
            wait_until(lambda: first.call(lambda: len(first.sessions_seen)), 20,
                       "blkbench to connect")
            time.sleep(1.0)  # requests flow meanwhile (not a timing assertion)
            first.stop()
            with ServerThread(sock, lambda: BlkDevice(disk_data)):
                out, err = bench.communicate(timeout=60)
    finally:
        first.stop()
    if reconnect == "0":
        assert bench.returncode == 1, (out, err)
        assert "the back-end closed the connection" in err, err
        return
    assert bench.returncode == 0, (out, err)
    r = json.loads(out)
    assert r["reconnects"] == 1 and r["outage_seconds"] > 0 and r["errors"] == 0, r
