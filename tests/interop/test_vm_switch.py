"""Issue "Net" acceptance: real QEMU guests on our switch (vhostuser.switch).

Tiny Debian guests (vhostuser.cli.guest, TCG, about 5 s to boot) ping each other through
the switch, ping the host through a tap port, and a 2-CPU guest with ``queues=2``/``mq=on``
moves traffic on both queue pairs in both directions. Guest addresses come from a private
10.x /24 that no host route overlaps, so nothing leaves this machine.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from vhostuser import engine as engines
from vhostuser.cli.guest import GuestVM, NetPort, pick_subnet, wait_all
from vhostuser.io.tap import interface_exists
from vhostuser.switch import Switch, SwitchThread, TapPort, VhostUserPort

from .peers import require_peer
from .test_vm_guest import xfail_if_duplicate_region_refused

pytestmark = pytest.mark.interop

BOOT_TIMEOUT = 120.0
PINGS = 20


def _require_guest() -> None:
    require_peer("qemu")
    require_peer("guest")


def _port_info(st: SwitchThread, name: str) -> dict[str, Any]:
    info: dict[str, Any] = st.call(lambda: _switch(st).port(name).info())
    return info


def _switch(st: SwitchThread) -> Switch:
    assert st.switch is not None
    return st.switch


def _ring_counts(st: SwitchThread, name: str, rings: int) -> list[int]:
    """used.idx of each ring of the port's session: chains completed per ring so far."""

    def read() -> list[int]:
        port = _switch(st).port(name)
        assert isinstance(port, VhostUserPort)
        s = port.session
        assert s is not None, f"port {name} has no front-end"
        out = []
        for i in range(rings):
            ring = s.ring(i)
            out.append(int(ring.used_idx) if ring is not None else 0)
        return out

    return st.call(read)


@pytest.mark.parametrize("engine", ["python", "compiled"])
def test_two_guests_ping_each_other(no_leaks: Any, sock_dir: Path, engine: str) -> None:
    """Two guests on two switch ports ping each other at the same time: 20 pings each way,
    0 % loss; the switch learned both MACs and counted the frames on both ports. With each
    burst engine."""
    _require_guest()
    if engine == "compiled" and engines.compiled() is None and os.environ.get("CI") != "true":
        pytest.skip("the compiled engine is not built (gcc and python3-dev, then "
                    "bash scripts/setup.sh)")
    net = pick_subnet()
    p1, p2 = str(sock_dir / "p1.sock"), str(sock_dir / "p2.sock")

    def setup(sw: Switch) -> None:
        sw.add_vhost_user_port(p1, name="vm1")
        sw.add_vhost_user_port(p2, name="vm2")

    t0 = time.monotonic()
    with SwitchThread(setup, engine=engine) as st:
        assert _switch(st).engine == engine
        with GuestVM(nets=[NetPort(socket=p1)], end="shell", params={
                "ip": f"{net}.1/24", "peer": f"{net}.2", "ping": PINGS}) as a, \
             GuestVM(nets=[NetPort(socket=p2)], end="shell", params={
                "ip": f"{net}.2/24", "peer": f"{net}.1", "ping": PINGS}) as b:
            pings = wait_all([a, b], "ping", BOOT_TIMEOUT)
            macs = {e["mac"]: e["port"] for e in st.call(_switch(st).mac_table)}
            info = {n: _port_info(st, n) for n in ("vm1", "vm2")}
            assert a.poweroff() == 0 and b.poweroff() == 0
        assert not st.errors, st.errors
    print(f"{time.monotonic() - t0:.1f} s; " + "; ".join(p.line for p in pings))
    for p in pings:
        assert p.int("sent") == PINGS and p.int("received") == PINGS and p.int("loss") == 0
    assert macs.get(a.nets[0].mac) == "vm1" and macs.get(b.nets[0].mac) == "vm2", macs
    for name, i in info.items():
        # each port carried both guests' echo requests and replies (plus ARP)
        assert i["rx_frames"] >= 2 * PINGS and i["tx_frames"] >= 2 * PINGS, (name, i)
        assert i["ring_errors"] == 0, (name, i)


def _tap_usable() -> str | None:
    if os.geteuid() != 0:
        return "creating a tap needs root (CAP_NET_ADMIN)"
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR)
    except OSError as e:
        return f"/dev/net/tun unusable: {e}"
    os.close(fd)
    return None


def test_guest_pings_host_through_tap(no_leaks: Any, sock_dir: Path) -> None:
    """A guest pings the host's own stack through a tap port of the switch (the tap gets
    a private address; it disappears with the switch)."""
    _require_guest()
    why = _tap_usable()
    if why is not None:
        pytest.skip(why)
    from vhostuser.cli.guest import host_address

    net = pick_subnet()
    tap = f"vut{os.getpid() % 100000}"
    sock = str(sock_dir / "vm.sock")

    def setup(sw: Switch) -> None:
        sw.add_vhost_user_port(sock, name="vm")
        sw.add_tap_port(tap, name="host")

    with SwitchThread(setup) as st:
        port = st.call(lambda: _switch(st).port("host"))
        assert isinstance(port, TapPort) and port.tap.created
        with host_address(tap, f"{net}.1/24"), GuestVM(
            nets=[NetPort(socket=sock)],
            params={"ip": f"{net}.2/24", "peer": f"{net}.1", "ping": PINGS},
        ) as vm:
            ping = vm.wait_result("ping", BOOT_TIMEOUT)
            assert vm.wait_exit(BOOT_TIMEOUT) == 0
        host = _port_info(st, "host")
        assert not st.errors, st.errors
    print(ping.line, {k: host[k] for k in ("rx_frames", "tx_frames", "dropped")})
    assert ping.int("received") == PINGS and ping.int("loss") == 0, ping.line
    assert host["rx_frames"] >= PINGS and host["tx_frames"] >= PINGS, host
    assert not interface_exists(tap), f"tap {tap} left behind"


def test_mq_guest_uses_both_queue_pairs(no_leaks: Any, sock_dir: Path) -> None:
    """A 2-CPU guest with queues=2/mq=on on a 2-pair port: pings pinned to CPU 0 and CPU 1
    leave on TX rings 1 and 3 (virtio_net's XPS maps queue i to CPU i); flows to four of its
    addresses are spread by the switch's flow hash over RX rings 0 and 2. Every ring
    completes chains and no ping is lost."""
    _require_guest()
    net = pick_subnet()
    pa, pb = str(sock_dir / "mq.sock"), str(sock_dir / "peer.sock")

    def setup(sw: Switch) -> None:
        sw.add_vhost_user_port(pa, name="mq", queue_pairs=2)
        sw.add_vhost_user_port(pb, name="peer")

    aliases = [f"{net}.{n}" for n in (1, 11, 12, 13)]
    with SwitchThread(setup) as st:
        with GuestVM(nets=[NetPort(socket=pa, queues=2)], params={"ip": f"{net}.1/24"},
                     end="shell") as a, \
             GuestVM(nets=[NetPort(socket=pb)], params={"ip": f"{net}.2/24"},
                     end="shell") as b:
            assert a.smp == 2
            a.wait_ready(BOOT_TIMEOUT)
            b.wait_ready(BOOT_TIMEOUT)
            net_a = a.results()[1]
            assert net_a.name == "net" and net_a["queues"] == "rx-0,rx-1,tx-0,tx-1", net_a.line
            if net_a["carrier"] != "1":
                xfail_if_duplicate_region_refused(_port_info(st, "mq")["last_close_reason"])
            assert net_a["carrier"] == "1", net_a.line
            add = a.run("; ".join(f"ip addr add {ip}/24 dev eth0" for ip in aliases[1:]))
            assert add.rc == 0, add.output
            before = _ring_counts(st, "mq", 4)
            rx = b.run("; ".join(f"vu_ping {ip} 5 20 0.1" for ip in aliases))
            after_rx = _ring_counts(st, "mq", 4)
            tx = a.run("; ".join(f"taskset -c {cpu} sh -c '. /etc/vu-lib.sh; "
                                 f"vu_ping {net}.2 5 20 0.1'" for cpu in (0, 1)))
            after_tx = _ring_counts(st, "mq", 4)
            info = _port_info(st, "mq")
            assert a.poweroff() == 0 and b.poweroff() == 0
        assert not st.errors, st.errors
    print(f"used.idx rx0,tx0,rx1,tx1: start {before}, after flows in {after_rx}, after "
          f"pinned pings out {after_tx}; rx_pairs {info['rx_pairs']}")
    assert rx.rc == 0 and tx.rc == 0
    assert info["rx_pairs"] == [0, 1]
    pings = [r for r in rx.results + tx.results if r.name == "ping"]
    assert len(pings) == len(aliases) + 2, rx.output + tx.output
    for r in pings:
        assert r.int("received") == 5, r.line
    delta_rx = [x - y for x, y in zip(after_rx, before, strict=True)]
    delta_tx = [x - y for x, y in zip(after_tx, after_rx, strict=True)]
    assert delta_rx[0] > 0 and delta_rx[2] > 0, f"receive pairs used: {delta_rx}"
    assert delta_tx[1] > 0 and delta_tx[3] > 0, f"transmit pairs used: {delta_tx}"
