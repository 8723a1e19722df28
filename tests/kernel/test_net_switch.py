"""Our net front-ends through our switch over real sockets, memfds and eventfds.

Every test checks that the fds and mappings of this process come back to where they were
(``no_leaks``): the switch thread, its sessions, the front-ends' guest RAM.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from vhostuser.cli.pktgen import Pktgen
from vhostuser.devices.net import build_rarp
from vhostuser.frontends.net import VirtioNetFrontend, probe_template, read_probe, stamp_probe
from vhostuser.io.tap import interface_exists
from vhostuser.switch import Switch, SwitchThread, TapPort, VhostUserPort
from vhostuser.virtq import DESC_F_NEXT, split_layout

T = TypeVar("T")
SRC = str(Path(__file__).resolve().parents[2] / "src")
MAC_A = bytes.fromhex("02000000000a")
MAC_B = bytes.fromhex("02000000000b")


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for unix sockets (AF_UNIX paths are limited to 108 bytes)."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="vhu-k-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def wait_until(fn: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def frames_seq(n: int, size: int, src: bytes, dst: bytes, magic: int = 0x5648
               ) -> list[bytes]:
    t = probe_template(size, src_mac=src, dst_mac=dst, magic=magic)
    out = []
    for i in range(n):
        stamp_probe(t, i, 0, magic)
        out.append(bytes(t))
    return out


def receive_n(nic: VirtioNetFrontend, n: int, timeout: float = 20.0) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += nic.recv(timeout=0.2)
    return got


def transfer(tx: VirtioNetFrontend, rx: VirtioNetFrontend, frames: list[bytes],
             batch: int = 128) -> list[bytes]:
    """Send in batches no larger than the receiver's ring, receiving each batch (as a
    guest's stack would keep its ring filled); what arrived."""
    got: list[bytes] = []
    for i in range(0, len(frames), batch):
        chunk = frames[i : i + batch]
        assert tx.send_all(chunk) == len(chunk)
        got += receive_n(rx, len(chunk))
    return got


def port_info(st: SwitchThread, name: str) -> dict[str, Any]:
    def get() -> dict[str, Any]:
        assert st.switch is not None
        return st.switch.port(name).info()

    return st.call(get)


def two_ports(a: str, b: str, **kw: Any) -> Callable[[Switch], None]:
    def setup(sw: Switch) -> None:
        sw.add_vhost_user_port(a, name="a", **kw)
        sw.add_vhost_user_port(b, name="b", **kw)

    return setup


@pytest.mark.parametrize("kind", [
    pytest.param(dict(packed=False), id="split-mrg"),
    pytest.param(dict(packed=True), id="packed-mrg"),
    pytest.param(dict(packed=False, mrg_rxbuf=False), id="split-nomrg"),
    pytest.param(dict(packed=True, mrg_rxbuf=False, event_idx=False), id="packed-nomrg-noevt"),
    pytest.param(dict(packed=False, version_1=False, mrg_rxbuf=False), id="split-legacy10"),
])
@pytest.mark.parametrize("busy", [False, True], ids=["event", "busy"])
def test_frames_cross_the_switch_exactly(no_leaks: Any, sock_dir: Path, kind: dict[str, Any],
                                         busy: bool) -> None:
    """Every frame arrives once, in order, byte for byte, both ways."""
    a, b = str(sock_dir / "a.sock"), str(sock_dir / "b.sock")
    with SwitchThread(two_ports(a, b), busy_poll=busy) as st:
        with VirtioNetFrontend.connect(a, **kind) as na, VirtioNetFrontend.connect(b, **kind) \
                as nb:
            assert na.hdr_len == (10 if kind.get("version_1") is False else 12)
            sizes = [60, 64, 128, 1000, 1514]
            sent: list[bytes] = []
            for size in sizes:
                sent += frames_seq(300, size, MAC_A, MAC_B)
            assert transfer(na, nb, sent) == sent
            back = frames_seq(500, 200, MAC_B, MAC_A)
            assert transfer(nb, na, back) == back
            ia, ib = port_info(st, "a"), port_info(st, "b")
        assert not st.errors, st.errors
    assert ia["rx_frames"] == len(sent) and ib["tx_frames"] == len(sent)
    assert ib["rx_frames"] == 500 and ia["tx_frames"] == 500
    assert ia["dropped"] == ib["dropped"] == 0
    assert ia["ring_errors"] == ib["ring_errors"] == 0


def test_big_frames_use_merged_buffers(no_leaks: Any, sock_dir: Path) -> None:
    """9000-byte MTU, 1 KiB receive buffers: frames span num_buffers buffers."""
    a, b = str(sock_dir / "a.sock"), str(sock_dir / "b.sock")
    with SwitchThread(two_ports(a, b, mtu=9000)) as st, \
            VirtioNetFrontend.connect(a, mtu=9000) as na, \
            VirtioNetFrontend.connect(b, mtu=9000, rx_buffer_size=1024) as nb:
        fr = frames_seq(50, 9014, MAC_A, MAC_B)
        assert transfer(na, nb, fr, batch=10) == fr
        assert not st.errors


def test_multiqueue_uses_both_pairs(no_leaks: Any, sock_dir: Path) -> None:
    """Two queue pairs on both ends: frames sent on either transmit queue arrive, and
    flows are spread over both receive queues."""
    a, b = str(sock_dir / "a.sock"), str(sock_dir / "b.sock")
    with SwitchThread(two_ports(a, b, queue_pairs=2)) as st, \
            VirtioNetFrontend.connect(a, queue_pairs=2) as na, \
            VirtioNetFrontend.connect(b, queue_pairs=2) as nb:
        wait_until(lambda: port_info(st, "b")["rx_pairs"] == [0, 1], 10, "both pairs up")
        sent = []
        for flow in range(8):
            t = probe_template(100, src_mac=MAC_A, dst_mac=MAC_B, flow=flow)
            for i in range(20):
                stamp_probe(t, flow * 100 + i, 0)
                sent.append(bytes(t))
        assert na.send_all(sent[:80], pair=0) == 80
        assert na.send_all(sent[80:], pair=1) == 80
        got = receive_n(nb, 160)
        assert sorted(got) == sorted(sent)
        for flow in range(8):  # each flow stays in order
            seqs = [read_probe(f) for f in got if f[29] == (2 + flow) & 0xFF]
            assert seqs == sorted(seqs)  # type: ignore[type-var]
        assert all(n > 0 for n in nb.stats.rx_per_pair), nb.stats.rx_per_pair
        assert not st.errors


def test_echo_port_reflects_everything(no_leaks: Any, sock_dir: Path) -> None:
    e = str(sock_dir / "e.sock")
    with SwitchThread(lambda sw: sw.add_echo_port(e)) as st, VirtioNetFrontend.connect(e) as nic:
        gen = Pktgen(nic, size=128, flows=4, src_mac=MAC_A, dst_mac=MAC_B)
        res = gen.run(count=5000, rate=0, duration=None, burst=32, drain=5.0)
        info = port_info(st, "echo")
        assert not st.errors
    s = res.summary(True)
    assert (s["sent"], s["received_ours"], s["lost"], s["duplicates"]) == (5000, 5000, 0, 0)
    assert s["reordered"] == 0 and "latency_us" in s
    assert info["kind"] == "echo" and info["rx_frames"] == info["tx_frames"] == 5000


def test_learning_reconnect_and_announce(no_leaks: Any, sock_dir: Path) -> None:
    """A front-end that goes away leaves its MACs learned on its port; a new one on the
    same port is reached at once (unicast, not flooded); SEND_RARP re-learns and floods
    the announcement."""
    a, b = str(sock_dir / "a.sock"), str(sock_dir / "b.sock")
    mac_table: Callable[[SwitchThread], dict[str, str]] = lambda st: {  # noqa: E731
        e["mac"]: e["port"] for e in st.call(lambda: st.switch.mac_table())  # type: ignore[union-attr]
    }
    flooded: Callable[[SwitchThread], int] = lambda st: st.stats()["flooded"]  # noqa: E731
    with SwitchThread(two_ports(a, b)) as st, VirtioNetFrontend.connect(b) as nb:
        with VirtioNetFrontend.connect(a) as na:
            na.send_all(frames_seq(5, 60, MAC_A, MAC_B))
            assert len(receive_n(nb, 5)) == 5
            assert mac_table(st) == {"02:00:00:00:00:0a": "a"}
        wait_until(lambda: port_info(st, "a")["connected"] is False, 10, "a disconnected")
        assert mac_table(st) == {"02:00:00:00:00:0a": "a"}
        with VirtioNetFrontend.connect(a) as na2:
            before = flooded(st)
            back = frames_seq(5, 60, MAC_B, MAC_A, magic=0x77)
            nb.send_all(back)
            assert receive_n(na2, 5) == back
            assert flooded(st) == before  # straight to a: its address was still known
            na2.send_all(frames_seq(5, 60, MAC_A, MAC_B))
            assert len(receive_n(nb, 5)) == 5
            assert port_info(st, "a")["sessions"] == 2
            # The station "migrates" behind b: b's front-end sends SEND_RARP.
            nb.announce(MAC_A)
            got = receive_n(na2, 1)
            assert got == [build_rarp(MAC_A)]
            assert mac_table(st)["02:00:00:00:00:0a"] == "b"
        assert not st.errors


@pytest.mark.parametrize("mode", ["listen", "connect"])
def test_counters_add_up_across_a_reconnect(no_leaks: Any, sock_dir: Path, mode: str) -> None:
    """A port's counters go on across its front-end's reconnect (a QEMU reconnecting to a
    listening port, a --connect port dialing a restarted front-end): the stats after are
    the stats before plus what crossed since, on both ports, and frames for the port
    while it has no front-end are counted there as rx_down."""
    a, b = str(sock_dir / "a.sock"), str(sock_dir / "b.sock")

    def setup(sw: Switch) -> None:
        sw.add_vhost_user_port(a, name="a", connect=mode == "connect", reconnect_interval=0.1)
        sw.add_vhost_user_port(b, name="b")

    def open_a() -> VirtioNetFrontend:
        if mode == "connect":
            return VirtioNetFrontend.accept(a, accept_timeout=10)
        return VirtioNetFrontend.connect(a)

    def counts(st: SwitchThread) -> dict[str, dict[str, Any]]:
        return {p["name"]: p for p in st.stats()["ports"]}

    with SwitchThread(setup) as st, VirtioNetFrontend.connect(b) as nb:
        with open_a() as na:
            na.send_all(frames_seq(30, 100, MAC_A, MAC_B))
            assert len(receive_n(nb, 30)) == 30
            nb.send_all(frames_seq(20, 200, MAC_B, MAC_A))
            assert len(receive_n(na, 20)) == 20
        wait_until(lambda: port_info(st, "a")["connected"] is False, 10, "a gone")
        first = counts(st)
        nb.send_all(frames_seq(7, 200, MAC_B, MAC_A, magic=0x99))  # a has no front-end
        wait_until(lambda: counts(st)["b"]["rx_frames"] == 27, 10, "b's 7 frames")
        with open_a() as na2:
            na2.send_all(frames_seq(11, 100, MAC_A, MAC_B, magic=0x98))
            assert len(receive_n(nb, 11)) == 11
            back = frames_seq(13, 200, MAC_B, MAC_A, magic=0x97)
            nb.send_all(back)
            assert receive_n(na2, 13) == back
            second = counts(st)
        assert not st.errors
    fa, fb, sa, sb = first["a"], first["b"], second["a"], second["b"]
    assert (fa["rx_frames"], fa["tx_frames"], fb["rx_frames"], fb["tx_frames"]) == (30, 20, 20, 30)
    assert sa["sessions"] == 2 and sa["connected"] and sb["sessions"] == 1
    assert sa["rx_frames"] == fa["rx_frames"] + 11
    assert sa["rx_bytes"] == fa["rx_bytes"] + 11 * 100
    assert sa["tx_frames"] == fa["tx_frames"] + 13
    assert sa["tx_bytes"] == fa["tx_bytes"] + 13 * 200
    assert sa["drops"]["rx_down"] == fa["drops"]["rx_down"] + 7
    assert sb["rx_frames"] == fb["rx_frames"] + 7 + 13
    assert sb["tx_frames"] == fb["tx_frames"] + 11
    # every frame a port took in went out of the other one or was dropped there
    assert sa["rx_frames"] == sb["tx_frames"] + sb["dropped"]
    assert sb["rx_frames"] == sa["tx_frames"] + sa["dropped"]


def test_connect_mode_reconnects(no_leaks: Any, sock_dir: Path) -> None:
    """--connect: the switch dials a listening front-end and dials again after it restarts."""
    c, b = str(sock_dir / "c.sock"), str(sock_dir / "b.sock")

    def setup(sw: Switch) -> None:
        sw.add_vhost_user_port(c, name="c", connect=True, reconnect_interval=0.1)
        sw.add_vhost_user_port(b, name="b")

    with SwitchThread(setup) as st, VirtioNetFrontend.connect(b) as nb:
        for round_ in range(2):
            with VirtioNetFrontend.accept(c, accept_timeout=10) as nc:
                fr = frames_seq(20, 100, MAC_A, MAC_B, magic=0x100 + round_)
                nc.send_all(fr)
                assert receive_n(nb, 20) == fr
            wait_until(lambda: port_info(st, "c")["connected"] is False, 10, "c gone")
        assert port_info(st, "c")["sessions"] == 2
        assert not st.errors


def _corrupt_next_tx(nic: VirtioNetFrontend, size: int, how: str) -> None:
    """Make the driver's next transmit chain invalid, as a hostile guest would."""
    q = nic._tx[0]
    ring = q.ring
    buf = nic._buf
    assert buf is not None
    frame = bytes(12) + frames_seq(1, 60, MAC_A, MAC_B)[0]
    gpa = q.slot_base
    buf[gpa : gpa + len(frame)] = frame
    assert ring.add(((gpa, len(frame), False),), 0)
    # Ring 1's layout: split rings laid out from 1 * ring_bytes (see VirtioNetFrontend.start).
    ring_bytes = (split_layout(size, 0)[3] + 4095) // 4096 * 4096
    desc, avail, _used, _ = split_layout(size, ring_bytes)
    head = struct.unpack_from("<H", buf, avail + 4 + 2 * ((ring._avail_idx - 1) % size))[0]
    if how == "next":
        struct.pack_into("<QIHH", buf, desc + 16 * head, gpa, len(frame), DESC_F_NEXT, 0xFFFF)
    elif how == "loop":
        struct.pack_into("<QIHH", buf, desc + 16 * head, gpa, 1, DESC_F_NEXT, head)
    else:
        struct.pack_into("<QIHH", buf, desc + 16 * head, 1 << 50, 64, 0, 0)
    ring.publish()
    nic.client.kick(1)


@pytest.mark.parametrize("how", ["next", "loop", "unmapped"])
def test_ring_violation_breaks_one_queue_only(no_leaks: Any, sock_dir: Path, how: str) -> None:
    """A guest that breaks its transmit ring (next out of range, a descriptor loop, an
    unmapped buffer): that queue stops, its port counts the error, the other ports keep
    forwarding, nothing is raised into the reactor."""
    a, b, c = (str(sock_dir / f"{n}.sock") for n in "abc")

    def setup(sw: Switch) -> None:
        for n, p in zip("abc", (a, b, c), strict=True):
            sw.add_vhost_user_port(p, name=n)

    with SwitchThread(setup) as st, VirtioNetFrontend.connect(a) as na, \
            VirtioNetFrontend.connect(b) as nb, VirtioNetFrontend.connect(c, queue_size=64) as nc:
        nc.send_all(frames_seq(10, 60, bytes.fromhex("02000000000c"), MAC_B))
        assert len(receive_n(nb, 10)) == 10
        receive_n(na, 10)
        # Runts and oversized frames first: dropped and counted, the ring stays fine.
        q = nc._tx[0]
        buf = nc._buf
        assert buf is not None
        for data in (b"\x00" * 5, bytes(12) + b"\x01" * 10, bytes(12) + bytes(1600)):
            slot = q.free.pop()
            gpa = q.slot_base + slot * q.slot_size
            buf[gpa : gpa + len(data)] = data
            assert q.ring.add(((gpa, len(data), False),), slot)
        q.ring.publish()
        nc.client.kick(1)
        wait_until(lambda: port_info(st, "c")["dropped"] == 3, 10, "runts counted")
        drops = port_info(st, "c")["drops"]
        assert drops["runt"] == 2 and drops["oversize"] == 1
        _corrupt_next_tx(nc, 64, how)
        ic = wait_until(lambda: (i := port_info(st, "c"))["ring_errors"] and i, 10, "broken")
        assert "ring 1" in ic["last_error"], ic["last_error"]
        # The others carry on.
        fr = frames_seq(200, 100, MAC_A, MAC_B)
        assert transfer(na, nb, fr) == fr
        assert port_info(st, "a")["ring_errors"] == 0
        assert not st.errors, st.errors


def _can_tap() -> str | None:
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN) for a tap"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    return None


def test_tap_port_reaches_the_host(no_leaks: Any, sock_dir: Path) -> None:
    """Frames cross between a vhost-user port and a kernel tap (created by the switch and
    gone with it); the host side is an AF_PACKET socket on the tap."""
    why = _can_tap()
    if why:
        pytest.skip(why)
    a = str(sock_dir / "a.sock")
    tap = f"vhuk{os.getpid() % 100000}"

    def setup(sw: Switch) -> None:
        sw.add_vhost_user_port(a, name="a")
        sw.add_tap_port(tap, name="host")

    with SwitchThread(setup) as st:
        port = st.call(lambda: st.switch.port("host"))  # type: ignore[union-attr]
        assert isinstance(port, TapPort) and port.tap.created and interface_exists(tap)
        with VirtioNetFrontend.connect(a) as na, socket.socket(
            socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5)  # local experimental
        ) as raw:
            raw.bind((tap, 0))
            raw.settimeout(5)
            host_mac = port.tap.mac
            # guest -> host
            out = host_mac + MAC_A + b"\x88\xb5" + b"to the host".ljust(46, b".")
            na.send_all([out])
            assert raw.recv(2048) == out
            # host -> guest (the host transmits on the tap: the switch reads it)
            inb = MAC_A + host_mac + b"\x88\xb5" + b"to the guest".ljust(46, b".")
            raw.send(inb)

            def ours() -> list[bytes]:  # the host may send IPv6 noise meanwhile
                return [f for f in na.recv(timeout=0.1) if f[12:14] == b"\x88\xb5"]

            assert wait_until(ours, 5, "the frame from the host") == [inb]
        info = port_info(st, "host")
        assert info["rx_frames"] >= 1 and info["tx_frames"] >= 1
        assert not st.errors
    assert not interface_exists(tap), f"tap {tap} left behind"


def _cli(*args: str, **kw: Any) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=SRC)
    return subprocess.Popen([sys.executable, "-m", "vhostuser.cli.main", *args], env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


@contextlib.contextmanager
def running(proc: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_switch_cli_counts_and_cleans_up(no_leaks: Any, sock_dir: Path, sig: int) -> None:
    a, b, e = (str(sock_dir / f"{n}.sock") for n in "abe")
    stats = sock_dir / "stats.json"
    with running(_cli("switch", "--port", f"{a},name=vm1", "--port", f"{b},name=vm2,queues=2",
                      "--echo", e, "--stats-json", str(stats), "--stats-interval", "0.2")) as p:
        wait_until(lambda: all(os.path.exists(x) for x in (a, b, e)) or p.poll() is not None,
                   20, "sockets")
        assert p.poll() is None, p.communicate()
        with VirtioNetFrontend.connect(a) as na, VirtioNetFrontend.connect(b) as nb:
            fr = frames_seq(100, 64, MAC_A, MAC_B)
            na.send_all(fr)
            assert receive_n(nb, 100) == fr
            snap = wait_until(
                lambda: stats.exists() and (s := json.loads(stats.read_text()))["ports"][0][
                    "rx_frames"] == 100 and s, 10, "stats file")
        assert [x["name"] for x in snap["ports"]] == ["vm1", "vm2", "echo"]
        assert snap["ports"][1]["queue_pairs"] == 2
        p.send_signal(sig)
        out, err = p.communicate(timeout=20)
        assert p.returncode == 0, err
    assert "sockets removed" in out
    assert not any(os.path.exists(x) for x in (a, b, e))
    final = json.loads(stats.read_text())
    assert final["ports"][1]["tx_frames"] == 100


def test_switch_cli_json_lines_and_bad_arguments(sock_dir: Path) -> None:
    a = str(sock_dir / "a.sock")
    with running(_cli("switch", "--port", a, "--stats-json", "-", "--stats-interval",
                      "0.1")) as p:
        assert p.stdout is not None
        line = p.stdout.readline()
        assert json.loads(line)["ports"][0]["path"] == a
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=20)
        assert p.returncode == 0
        last = json.loads(out.strip().splitlines()[-1])
        assert last["mode"] == "event"
    bad = subprocess.run([sys.executable, "-m", "vhostuser.cli.main", "switch", "--port",
                          f"{a},colour=blue"], env=dict(os.environ, PYTHONPATH=SRC),
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown option 'colour'" in bad.stderr
    none = subprocess.run([sys.executable, "-m", "vhostuser.cli.main", "switch"],
                          env=dict(os.environ, PYTHONPATH=SRC), capture_output=True, text=True,
                          timeout=30)
    assert none.returncode == 2 and "at least one" in none.stderr


def test_pktgen_cli_against_an_echo_port(no_leaks: Any, sock_dir: Path) -> None:
    e = str(sock_dir / "e.sock")
    with SwitchThread(lambda sw: sw.add_echo_port(e)) as st:
        r = subprocess.run(
            [sys.executable, "-m", "vhostuser.cli.main", "pktgen", e, "--count", "3000",
             "--size", "256", "--flows", "3", "--json"],
            env=dict(os.environ, PYTHONPATH=SRC), capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        s = json.loads(r.stdout)
        assert (s["sent"], s["received_ours"], s["lost"], s["duplicates"]) == (3000, 3000, 0, 0)
        assert s["latency_us"]["samples"] == 3000
        rate = subprocess.run(
            [sys.executable, "-m", "vhostuser.cli.main", "pktgen", e, "--rate", "2000",
             "--duration", "1", "--packed", "--json"],
            env=dict(os.environ, PYTHONPATH=SRC), capture_output=True, text=True, timeout=60)
        assert rate.returncode == 0, rate.stderr
        s2 = json.loads(rate.stdout)
        assert 1500 <= s2["sent"] <= 2100 and s2["lost"] == 0
        assert not st.errors


def test_switch_thread_reports_setup_errors(no_leaks: Any, sock_dir: Path) -> None:
    a = str(sock_dir / "a.sock")

    def setup(sw: Switch) -> None:
        sw.add_vhost_user_port(a, name="x")
        sw.add_vhost_user_port(a, name="y")  # the path is taken

    with pytest.raises(ValueError, match=r"a\.sock is already used by port x"):
        SwitchThread(setup).start()
    assert not os.path.exists(a)


def test_frontend_accept_times_out_cleanly(no_leaks: Any, sock_dir: Path) -> None:
    from vhostuser.errors import MessageTimeoutError

    with pytest.raises(MessageTimeoutError):
        VirtioNetFrontend.accept(str(sock_dir / "nobody.sock"), accept_timeout=0.2)


def test_vhost_user_port_rejects_a_third_front_end(no_leaks: Any, sock_dir: Path) -> None:
    """A port keeps an active front-end and one standby (a migration's destination on the
    same socket); a third connection is refused and counted (the handover rules are tested
    in tests/kernel/test_port_handover.py)."""
    a = str(sock_dir / "a.sock")
    with SwitchThread(lambda sw: sw.add_vhost_user_port(a, name="a")) as st, \
            VirtioNetFrontend.connect(a), VirtioNetFrontend.connect(a, timeout=2):
        port = st.call(lambda: st.switch.port("a"))  # type: ignore[union-attr]
        assert isinstance(port, VhostUserPort)
        with pytest.raises(Exception):  # noqa: B017 - refused: EOF during negotiation
            VirtioNetFrontend.connect(a, timeout=2)
        info = port_info(st, "a")
        assert info["sessions"] == 2 and info["refused"] == 1
