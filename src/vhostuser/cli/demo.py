"""``vhost-user demo``: our switch with two tiny VMs and the host, pinging each other.

The main job of the README's first command (issue "Net", item 4):

1. start a learning switch (:class:`~vhostuser.switch.SwitchThread`) with two
   vhost-user ports and, when this process may (root, ``/dev/net/tun``, ``ip``), a tap
   port whose host side gets an address in a private 10.x /24 that no host route uses;
2. boot two tiny Linux VMs under QEMU (TCG) attached to the two ports
   (:mod:`vhostuser.cli.guest`: Debian's kernel and a busybox initramfs built on first use);
3. make them ping each other and the host, streaming their consoles;
4. print the switch's counters and MAC table, power the VMs off and remove the tap.

Without QEMU (or with ``--python``) the same traffic runs between two Python front-ends
(:class:`~vhostuser.frontends.net.VirtioNetFrontend`) on the same switch: a few lines of
ARP and ICMP echo here stand in for the guests' IP stacks, and the host's kernel answers
through the tap as it does for the VMs. ``--probe`` keeps the older demo: start live
back-ends here (ours, qemu-storage-daemon, DPDK testpmd) and probe each as a front-end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .probe import _print_text, probe

DEFAULT_COUNT = 10


# ============================================================================ the network


@dataclass(slots=True)
class Network:
    """The switch, its sockets and the optional host tap of one demo run."""

    switch: Any  # SwitchThread
    sockets: list[str]
    subnet: str
    tap: str | None
    host_ip: str | None
    tap_skipped: str | None = None
    stations: list[tuple[str, str]] = field(default_factory=list)  # (name, ip)


def _tap_problem() -> str | None:
    if os.geteuid() != 0:
        return "not root (a tap needs CAP_NET_ADMIN)"
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR)
    except OSError as e:
        return f"/dev/net/tun: {e.strerror}"
    os.close(fd)
    if shutil.which("ip") is None:
        return "no 'ip' command (iproute2) to address the tap"
    return None


@contextlib.contextmanager
def network(tmp: str, *, use_tap: bool) -> Iterator[Network]:
    """Start the switch with ports ``vm1``/``vm2`` (sockets in ``tmp``) and maybe a tap."""
    from ..switch import Switch, SwitchThread
    from .guest import host_address, pick_subnet

    subnet = pick_subnet()
    sockets = [os.path.join(tmp, "vm1.sock"), os.path.join(tmp, "vm2.sock")]
    problem = None if use_tap else "--no-tap"
    if problem is None:
        problem = _tap_problem()
    tap = None if problem is not None else f"vudemo{os.getpid() % 100000}"

    def setup(sw: Switch) -> None:
        sw.add_vhost_user_port(sockets[0], name="vm1")
        sw.add_vhost_user_port(sockets[1], name="vm2")
        if tap is not None:
            sw.add_tap_port(tap, name="host")

    with SwitchThread(setup) as st:
        host_ip = f"{subnet}.1" if tap is not None else None
        with contextlib.ExitStack() as stack:
            if tap is not None and host_ip is not None:
                stack.enter_context(host_address(tap, f"{host_ip}/24"))
            yield Network(switch=st, sockets=sockets, subnet=subnet, tap=tap,
                          host_ip=host_ip, tap_skipped=problem)


def _print_network(net: Network) -> None:
    print(f"switch: ports vm1 ({net.sockets[0]}), vm2 ({net.sockets[1]})"
          + (f", host (tap {net.tap}, {net.host_ip}/24)" if net.tap else ""))
    if net.tap is None:
        print(f"        no tap port ({net.tap_skipped}): the host is left out")


def _print_counters(net: Network) -> None:
    from .switch import render_table

    stats = net.switch.stats()
    table: list[dict[str, Any]] = net.switch.call(lambda: net.switch.switch.mac_table())
    print("\n=== switch counters (rx: frames the port's peer sent into the switch; tx: frames "
          "it delivered)")
    print(render_table(stats, None, 0.0))
    print("MAC table: " + (", ".join(f"{e['mac']} on {e['port']}" for e in table) or "empty"))


@dataclass(frozen=True, slots=True)
class PingRun:
    """One ``ping -c N`` between two stations."""

    src: str
    dst: str
    sent: int
    received: int

    @property
    def ok(self) -> bool:
        return self.sent > 0 and self.received == self.sent


def _summary(runs: list[PingRun]) -> int:
    print("\n=== summary")
    for r in runs:
        print(f"  {r.src:>5} -> {r.dst:<5} {r.received}/{r.sent} replies"
              + ("" if r.ok else "  <-- LOSS"))
    bad = [r for r in runs if not r.ok]
    print("all pings answered" if runs and not bad else f"{len(bad)} ping run(s) lost replies")
    return 0 if runs and not bad else 1


def _pairs(net: Network) -> list[tuple[str, str]]:
    """(source, destination) station names in the order the demo pings them."""
    out = [("vm1", "vm2"), ("vm2", "vm1")]
    if net.host_ip is not None:
        out += [("vm1", "host"), ("vm2", "host")]
    return out


# ============================================================================ with QEMU


def run_vms(args: argparse.Namespace) -> int:
    """The demo with two QEMU guests."""
    from .guest import GuestError, GuestVM, NetPort, build_initramfs, kernel_path

    t0 = time.monotonic()
    print("=== vhost-user demo: a switch, two tiny VMs (QEMU, TCG) and the host")
    try:
        kernel = kernel_path()
        initrd = build_initramfs(kernel=kernel)
    except GuestError as e:
        print(f"cannot build the guest: {e}")
        return 1
    print(f"guest: {kernel} + {initrd}")
    with tempfile.TemporaryDirectory(prefix="vhost-user-demo-") as tmp, \
            network(tmp, use_tap=not args.no_tap) as net:
        _print_network(net)
        ips = {"vm1": f"{net.subnet}.11", "vm2": f"{net.subnet}.12"}
        if net.host_ip is not None:
            ips["host"] = net.host_ip

        def printer(name: str) -> Callable[[str], None]:
            def show(line: str) -> None:
                if args.quiet or not line.strip() or line.startswith(("VU-READY", "VU-BEGIN",
                                                                      "VU-END")):
                    return
                print(f"{name} | {line}", flush=True)
            return show

        print(f"booting vm1 ({ips['vm1']}) and vm2 ({ips['vm2']}) ...", flush=True)
        vms = {
            name: GuestVM(nets=[NetPort(socket=sock)], params={"ip": f"{ips[name]}/24"},
                          end="shell", name=name, on_line=printer(name),
                          kernel=kernel, initrd=initrd)
            for name, sock in zip(("vm1", "vm2"), net.sockets, strict=True)
        }
        runs: list[PingRun] = []
        with contextlib.ExitStack() as stack:
            for vm in vms.values():
                stack.enter_context(vm)
            for vm in vms.values():
                vm.wait_ready(args.timeout)
            print(f"both VMs up after {time.monotonic() - t0:.1f} s", flush=True)
            for src, dst in _pairs(net):
                print(f"\n=== {src} pings {dst} ({ips[dst]})", flush=True)
                r = vms[src].run(f"vu_ping {ips[dst]} {args.count} 20 0.2", args.timeout)
                res = [x for x in r.results if x.name == "ping"]
                sent = res[-1].int("sent") if res else 0
                received = res[-1].int("received") if res else 0
                runs.append(PingRun(src, dst, sent, received))
            _print_counters(net)
            for vm in vms.values():
                vm.poweroff()
    print(f"VMs powered off, switch stopped{', tap removed' if net.tap else ''} "
          f"({time.monotonic() - t0:.1f} s)")
    return _summary(runs)


# ============================================================================ without QEMU

_ETH = struct.Struct("!6s6sH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")
_IP = struct.Struct("!BBHHHBBH4s4s")
_ICMP = struct.Struct("!BBHHH")
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
BROADCAST = b"\xff" * 6


def _csum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\0"
    s: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _ip4(text: str) -> bytes:
    return bytes(int(x) for x in text.split("."))


class Station:
    """A Python front-end with just enough IPv4 to ping and be pinged (ARP, ICMP echo)."""

    def __init__(self, name: str, nic: Any, mac: bytes, ip: str) -> None:
        self.name = name
        self.nic = nic
        self.mac = mac
        self.ip = _ip4(ip)
        self.neighbours: dict[bytes, bytes] = {}
        self.replies: dict[tuple[bytes, int], float] = {}  # (from, seq) -> arrival time
        self.ident = os.getpid() & 0xFFFF

    def _send(self, dst: bytes, ethertype: int, payload: bytes) -> None:
        frame = _ETH.pack(dst, self.mac, ethertype) + payload
        self.nic.send([frame.ljust(60, b"\0")])

    def _arp(self, oper: int, dst_mac: bytes, tha: bytes, tpa: bytes) -> None:
        self._send(dst_mac, ETH_P_ARP,
                   _ARP.pack(1, ETH_P_IP, 6, 4, oper, self.mac, self.ip, tha, tpa))

    def _ipv4(self, dst_ip: bytes, dst_mac: bytes, icmp: bytes) -> None:
        hdr = _IP.pack(0x45, 0, 20 + len(icmp), 0, 0x4000, 64, 1, 0, self.ip, dst_ip)
        hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
        self._send(dst_mac, ETH_P_IP, hdr + icmp)

    @staticmethod
    def _icmp(kind: int, ident: int, seq: int, data: bytes) -> bytes:
        body = _ICMP.pack(kind, 0, 0, ident, seq) + data
        return body[:2] + struct.pack("!H", _csum(body)) + body[4:]

    def handle(self, frame: bytes) -> None:
        """Answer ARP requests and echo requests for our address; note replies."""
        if len(frame) < _ETH.size:
            return
        _dst, src, ethertype = _ETH.unpack_from(frame)
        body = frame[_ETH.size:]
        if ethertype == ETH_P_ARP and len(body) >= _ARP.size:
            _h, _p, _hl, _pl, oper, sha, spa, _tha, tpa = _ARP.unpack_from(body)
            self.neighbours[spa] = sha
            if oper == 1 and tpa == self.ip:
                self._arp(2, sha, sha, spa)
        elif ethertype == ETH_P_IP and len(body) >= 28 and body[9] == 1:
            ihl = (body[0] & 0x0F) * 4
            total = struct.unpack_from("!H", body, 2)[0]
            src_ip, dst_ip = body[12:16], body[16:20]
            if dst_ip != self.ip:
                return
            self.neighbours.setdefault(src_ip, src)
            kind, _code, _c, ident, seq = _ICMP.unpack_from(body, ihl)
            data = body[ihl + _ICMP.size: total]
            if kind == 8:
                self._ipv4(src_ip, src, self._icmp(0, ident, seq, data))
            elif kind == 0 and ident == self.ident:
                self.replies[src_ip, seq] = time.monotonic()

    def resolve(self, ip: bytes) -> None:
        """Broadcast an ARP request for ``ip``."""
        self._arp(1, BROADCAST, bytes(6), ip)

    def echo(self, ip: bytes, seq: int) -> None:
        """Send one echo request (ARP must have resolved ``ip``)."""
        payload = struct.pack("!d", time.time()).ljust(56, b"\0")
        self._ipv4(ip, self.neighbours[ip], self._icmp(8, self.ident, seq, payload))


def _pump(stations: list[Station], until: Callable[[], bool], timeout: float) -> bool:
    """Deliver received frames to their stations until ``until()`` or ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        if until():
            return True
        if time.monotonic() > deadline:
            return False
        idle = True
        for s in stations:
            for f in s.nic.recv(0.0):
                idle = False
                s.handle(f)
        if idle:
            stations[0].nic.wait(0.005)


def _python_ping(src: Station, dst_ip: str, dst_name: str, count: int,
                 stations: list[Station]) -> PingRun:
    ip = _ip4(dst_ip)
    if ip not in src.neighbours:
        src.resolve(ip)
        if not _pump(stations, lambda: ip in src.neighbours, 3.0):
            print(f"{src.name}: no ARP reply from {dst_ip}")
            return PingRun(src.name, dst_name, count, 0)
    print(f"{src.name}: PING {dst_ip}: 56 data bytes")
    received = 0
    src.replies.clear()
    for seq in range(count):
        sent_at = time.monotonic()
        src.echo(ip, seq)
        key = (ip, seq)
        if _pump(stations, lambda: key in src.replies, 2.0):  # noqa: B023 -- used at once
            received += 1
            ms = (src.replies[key] - sent_at) * 1000
            print(f"{src.name}: 64 bytes from {dst_ip}: seq={seq} time={ms:.3f} ms")
        else:
            print(f"{src.name}: no reply from {dst_ip} for seq={seq}")
        time.sleep(0.1)
    loss = 100 * (count - received) // count
    print(f"{src.name}: {count} packets transmitted, {received} packets received, "
          f"{loss}% packet loss")
    return PingRun(src.name, dst_name, count, received)


def run_python(args: argparse.Namespace, why: str | None) -> int:
    """The demo with two Python front-ends in place of the VMs."""
    try:
        from ..frontends.net import VirtioNetFrontend
    except ImportError:
        print(f"no QEMU guests here ({why}) and no Python net front-end in this build; "
              "showing the probe demo instead\n")
        return run_probe(args)
    print("=== vhost-user demo: a switch, two Python front-ends and the host")
    if why is not None:
        print(f"QEMU guests cannot run here: {why}\nrunning the same traffic between two "
              "Python front-ends (vhostuser.frontends.net.VirtioNetFrontend) instead")
    runs: list[PingRun] = []
    with tempfile.TemporaryDirectory(prefix="vhost-user-demo-") as tmp, \
            network(tmp, use_tap=not args.no_tap) as net:
        _print_network(net)
        ips = {"vm1": f"{net.subnet}.11", "vm2": f"{net.subnet}.12"}
        if net.host_ip is not None:
            ips["host"] = net.host_ip
        with contextlib.ExitStack() as stack:
            stations: dict[str, Station] = {}
            for i, (name, sock) in enumerate(zip(("vm1", "vm2"), net.sockets, strict=True)):
                nic = stack.enter_context(VirtioNetFrontend.connect(sock))
                mac_text = nic.device_mac or f"02:00:00:00:00:{i + 1:02x}"
                mac = bytes.fromhex(mac_text.replace(":", ""))
                stations[name] = Station(name, nic, mac, ips[name])
                print(f"{name}: front-end on {sock}, mac {mac_text}, ip {ips[name]}")
            everyone = list(stations.values())
            for src, dst in _pairs(net):
                print(f"\n=== {src} pings {dst} ({ips[dst]})", flush=True)
                runs.append(_python_ping(stations[src], ips[dst], dst, args.count, everyone))
            _print_counters(net)
    print(f"front-ends closed, switch stopped{', tap removed' if net.tap else ''}")
    return _summary(runs)


# ============================================================================ --probe


def _wait_socket(path: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise RuntimeError(f"peer exited with status {proc.returncode} before {path} appeared")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _peers(tmp: str) -> list[tuple[str, list[str], str, dict[str, Any]]]:
    peers: list[tuple[str, list[str], str, dict[str, Any]]] = []
    ours = os.path.join(tmp, "ours.sock")
    peers.append((
        "vhostuser null-net back-end (this project)",
        [sys.executable, "-m", "vhostuser.cli.main", "serve", "--socket", ours],
        ours, {},
    ))
    qsd = shutil.which("qemu-storage-daemon")
    if qsd:
        img = os.path.join(tmp, "disk.raw")
        with open(img, "wb") as f:
            f.truncate(64 << 20)
        sock = os.path.join(tmp, "qsd.sock")
        peers.append((
            "qemu-storage-daemon vhost-user-blk export (64 MiB raw image)",
            [qsd, "--blockdev",
             f"driver=file,node-name=file0,filename={img},cache.direct=off",
             "--export",
             f"type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={sock},"
             "writable=on,num-queues=1,logical-block-size=512"],
            sock, {},
        ))
    testpmd = shutil.which("dpdk-testpmd")
    if testpmd:
        sock = os.path.join(tmp, "dpdk.sock")
        peers.append((
            "DPDK testpmd net_vhost back-end",
            [testpmd, "--no-pci", "--lcores", "0@0,1@0", "--file-prefix", f"demo{os.getpid()}",
             "--no-huge", "-m", "256", "--no-shconf", "--vdev", f"net_vhost0,iface={sock}",
             "--", "--nb-cores=1", "--total-num-mbufs=16384", "--forward-mode=io",
             "--auto-start", "--stats-period=0"],
            sock, {"stdin": subprocess.PIPE},
        ))
    return peers


def run_probe(args: argparse.Namespace) -> int:
    """``--probe``: start live back-ends here and probe each of them."""
    failures = 0
    with tempfile.TemporaryDirectory(prefix="vhost-user-demo-") as tmp:
        peers = _peers(tmp)
        if len(peers) == 1:
            print("qemu-storage-daemon and dpdk-testpmd are not installed; run "
                  "scripts/install-peers.sh to probe them too.\n")
        for title, cmd, sock, kw in peers:
            print(f"=== {title}")
            log = open(os.path.join(tmp, "peer.log"), "wb")  # noqa: SIM115
            env = dict(os.environ)
            src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, **kw)
            try:
                _wait_socket(sock, proc)
                r = probe(sock, connect_timeout=10.0)
                _print_text(r)
            except Exception as e:  # report and go on with the next peer
                failures += 1
                print(f"probe failed: {e}")
            finally:
                _stop(proc)
                if proc.stdin is not None:
                    proc.stdin.close()
                log.close()
            print()
    print("done" if not failures else f"{failures} probe(s) failed")
    return 1 if failures else 0


# ============================================================================ command line


def run(args: argparse.Namespace) -> int:
    """Entry point of ``vhost-user demo``."""
    if args.count < 1:
        print(f"vhost-user demo: --count {args.count} must be at least 1", file=sys.stderr)
        return 2
    if args.probe:
        return run_probe(args)
    from .guest import guest_unavailable

    why = "--python given" if args.python else guest_unavailable()
    if why is None:
        return run_vms(args)
    return run_python(args, None if args.python else why)


def add_parser(sub: Any) -> None:
    """Register ``demo`` on the top-level subparsers."""
    p: argparse.ArgumentParser = sub.add_parser(
        "demo",
        help="two tiny VMs and the host ping each other through our switch",
        description=(
            "Start our vhost-user switch with two ports and a tap port for the host, boot\n"
            "two tiny Linux VMs under QEMU (TCG) on the two ports, make them ping each other\n"
            "and the host, print the pings and the switch's counters, then clean up (VMs\n"
            "powered off, sockets and tap removed). The guest (Debian's kernel and a busybox\n"
            "initramfs) is built on first use and cached. Without QEMU, the same traffic\n"
            "runs between two Python front-ends. Addresses come from a private 10.x /24\n"
            "that no host route uses."
        ),
        epilog=(
            "examples:\n"
            "  vhost-user demo                 # VMs if QEMU is installed\n"
            "  vhost-user demo --count 20 -q   # 20 pings per pair, no guest consoles\n"
            "  vhost-user demo --python        # Python front-ends instead of VMs\n"
            "  vhost-user demo --probe         # probe live back-ends instead"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--count", type=int, default=DEFAULT_COUNT, metavar="N",
                   help=f"pings per pair (default {DEFAULT_COUNT})")
    p.add_argument("--no-tap", action="store_true",
                   help="leave the host out (no tap port)")
    p.add_argument("--python", action="store_true",
                   help="use two Python front-ends even where QEMU is installed")
    p.add_argument("--quiet", "-q", action="store_true",
                   help="do not stream the guests' consoles")
    p.add_argument("--timeout", type=float, default=180.0, metavar="SECONDS",
                   help="give up on a VM that takes longer to boot or answer (default 180)")
    p.add_argument("--probe", action="store_true",
                   help="instead: start our back-end, qemu-storage-daemon and DPDK testpmd "
                        "here and probe each one as a front-end")
    p.set_defaults(func=run)
