"""Two QEMU guests ping each other through the switch while it captures: tcpdump reads
each port's pcap file, sees the pings, and every file holds exactly the frames the port's
counters say crossed it."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from vhostuser.cli.guest import GuestVM, NetPort, pick_subnet, wait_all
from vhostuser.io.pcap import read_pcap
from vhostuser.switch import Switch, SwitchThread

from .peers import require_peer

pytestmark = pytest.mark.interop

BOOT_TIMEOUT = 120.0
PINGS = 10


def test_two_guest_ping_capture(no_leaks: Any, sock_dir: Path) -> None:
    require_peer("qemu")
    require_peer("guest")
    require_peer("tcpdump")
    net = pick_subnet()
    p1, p2 = str(sock_dir / "p1.sock"), str(sock_dir / "p2.sock")
    cap = sock_dir / "pcap"
    cap.mkdir()

    def setup(sw: Switch) -> None:
        sw.start_capture(str(cap))
        sw.add_vhost_user_port(p1, name="vm1")
        sw.add_vhost_user_port(p2, name="vm2")

    with SwitchThread(setup) as st:
        with GuestVM(nets=[NetPort(socket=p1)], end="shell", params={
                "ip": f"{net}.1/24", "peer": f"{net}.2", "ping": PINGS}) as a, \
             GuestVM(nets=[NetPort(socket=p2)], end="shell", params={
                "ip": f"{net}.2/24", "peer": f"{net}.1", "ping": PINGS}) as b:
            pings = wait_all([a, b], "ping", BOOT_TIMEOUT)
            assert a.poweroff() == 0 and b.poweroff() == 0
        ports = {p["name"]: p for p in st.stats()["ports"]}
        st.call(lambda: st.switch.stop_capture())  # type: ignore[union-attr]
        assert not st.errors, st.errors
    for p in pings:
        assert p.int("received") == PINGS, p.line
    for name in ("vm1", "vm2"):
        path = cap / f"{name}.pcap"
        counters = ports[name]
        assert len(read_pcap(path)) == counters["rx_frames"] + counters["tx_frames"], counters
        assert counters["capture"]["dropped"] == 0
        r = subprocess.run(["tcpdump", "-nn", "-r", str(path), "icmp"], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        # Each guest's port saw its own pings and replies and the other guest's, at least.
        assert r.stdout.count("ICMP echo request") >= 2 * PINGS, r.stdout
        assert r.stdout.count("ICMP echo reply") >= 2 * PINGS, r.stdout
