"""Issue "Net" (and "Virtqueues") acceptance with DPDK: our switch between real peers.

* DPDK virtio-user txonly -> our switch -> DPDK virtio-user rxonly, split and packed,
  event-driven and busy-polling: every frame the sender counted as transmitted is counted
  by the receiver.
* DPDK txonly frames are popped with the exact bytes DPDK sent (split/packed, mrg_rxbuf
  0/1), checked against the frame testpmd builds.
* Our pktgen (sequence numbers) at a rate we sustain -> switch -> DPDK rxonly and our own
  receiver: the DPDK count equals what was sent; our receiver sees every sequence number
  once, in order.
* Our pktgen -> DPDK net_vhost (testpmd macswap) -> back: sent == received.
* A port whose guest breaks its ring: that queue stops, the DPDK traffic goes on.

The loss rule. DPDK's txonly cannot be rate-limited: it puts out frames as fast as its
ring takes them, i.e. exactly at the rate the switch sustains (a full ring makes its
tx_burst return short; those frames were never "put out" and testpmd does not count them
as transmitted). So the claim "zero loss below the sustainable rate" becomes: every frame
in the sender's TX-packets enters the switch, and every one reaches the receiver, with no
drop of any kind counted by the switch. The receiver has a CPU of its own (the sender and
the switch share the other one) and a deep ring, so it never runs out of buffers; with
fewer than 2 CPUs the test is skipped. The sender starts only once the receiver's queue
runs. Counts are taken after the sender's forwarding is stopped with testpmd's interactive
``stop`` (its port stays open, so nothing is cut off mid-ring) and the switch has drained.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from vhostuser.frontends.net import VirtioNetFrontend, read_probe
from vhostuser.switch import Switch, SwitchThread
from vhostuser.virtq import DESC_F_NEXT, split_layout

from .peers import TestpmdVhost, TestpmdVirtioUser, require_peer, wait_for_socket

pytestmark = pytest.mark.interop

T = TypeVar("T")
SRC = str(Path(__file__).resolve().parents[2] / "src")
DPDK_MAC = "02:00:00:00:00:aa"
RX_RING = 16384
"""Receive ring of the DPDK receivers: deep enough to ride over the receiver being
descheduled for a while (other processes on a shared machine), which would otherwise show
up as no_rx_buffer drops in the switch that are not the switch's doing."""
RX_EXTRA = [f"--rxd={RX_RING}", f"--total-num-mbufs={2 * RX_RING + 8192}"]


def wait_until(fn: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


_FWD_TX_RE = re.compile(
    r"Forward statistics for port (\d+)\s+-+\s*\n\s*RX-packets:\s*(\d+).*\n"
    r"\s*TX-packets:\s*(\d+)\s+TX-dropped:\s*(\d+)"
)


class InteractiveVirtioUser(TestpmdVirtioUser):
    """virtio-user testpmd driven through its interactive prompt (stdin).

    ``stop`` ends forwarding with the port left open, so counts can be compared exactly.
    stdout is line-buffered with ``stdbuf`` (testpmd's prompt output is block-buffered in
    a pipe otherwise). Leaving sends ``quit``.
    """

    __test__ = False

    def __init__(self, sock: str, *, mac: str | None = None, **kw: Any) -> None:
        super().__init__(sock, **kw)
        self.mac = mac

    def argv(self) -> list[str]:
        argv = [a for a in super().argv() if not a.startswith("--stats-period")]
        if self.mac is not None:
            argv = [a + f",mac={self.mac}" if a.startswith("net_virtio_user") else a
                    for a in argv]
        stdbuf = shutil.which("stdbuf")
        return ([stdbuf, "-oL", "-eL"] if stdbuf else []) + argv + ["-i"]

    def command(self, line: str, done: str, timeout: float = 15.0) -> str:
        mark = self.mark()
        self.send_stdin(line.encode() + b"\n")
        m = self.wait_for(done, timeout, since=mark)
        return self.log_text()[mark : m.end()]

    def stop_forwarding(self) -> tuple[int, int]:
        """``stop``: (RX-packets, TX-packets) of port 0's forward statistics."""
        out = self.command("stop", r"^Done\.")
        m = _FWD_TX_RE.search(out)
        assert m is not None, out
        return int(m[2]), int(m[3])

    def nic_stats(self) -> Any:
        mark = self.mark()
        self.send_stdin(b"show port stats 0\n")
        self.wait_for(r"Tx-pps:", 15, since=mark)
        return self.port_stats()

    def _request_stop(self) -> None:
        try:
            self.send_stdin(b"quit\n")
        except OSError:
            super()._request_stop()


@contextlib.contextmanager
def switch_process(workdir: Path, *ports: str, busy: bool = False, cpu: int | None = None,
                   engine: str | None = None) -> Iterator[Callable[[], dict[str, Any]]]:
    """``vhost-user switch`` in its own process (pinned to ``cpu``), yielding a function
    that returns its newest counters; stopped with SIGTERM, sockets checked removed."""
    stats = workdir / "switch.json"
    cmd = [sys.executable, "-m", "vhostuser.cli.main", "switch", "--stats-json", str(stats),
           "--stats-interval", "0.1", "-q"]
    for p in ports:
        cmd += ["--port", p]
    if busy:
        cmd.append("--busy-poll")
    if engine is not None:
        cmd += ["--engine", engine]
    if cpu is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(cpu), *cmd]
    log = open(workdir / "switch.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=SRC), stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    paths = [p.split(",")[0] for p in ports]
    try:
        for p in paths:
            wait_for_socket(p, 20)

        def read() -> dict[str, Any]:
            for _ in range(50):
                with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                    got: dict[str, Any] = json.loads(stats.read_text())
                    return got
                time.sleep(0.02)
            raise AssertionError(f"no counters in {stats}")

        yield read
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, (workdir / "switch.log").read_text()[-3000:]
        assert not any(os.path.exists(p) for p in paths), "switch left sockets behind"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def port(stats: dict[str, Any], name: str) -> dict[str, Any]:
    for p in stats["ports"]:
        if p["name"] == name:
            found: dict[str, Any] = p
            return found
    raise KeyError(name)


# -- DPDK -> switch -> DPDK --------------------------------------------------------------


@pytest.mark.parametrize("packed, busy", [
    pytest.param(False, False, id="split-event"),
    pytest.param(True, False, id="packed-event"),
    pytest.param(False, True, id="split-busy"),
])
def test_dpdk_txonly_through_switch_to_dpdk_rxonly(sock_dir: Path, packed: bool, busy: bool
                                                    ) -> None:
    """Every frame DPDK's txonly counted as transmitted is counted by DPDK's rxonly."""
    require_peer("testpmd")
    cpu = cpus()
    if len(cpu) < 2:
        pytest.skip("needs 2 CPUs: the receiver must have one to itself (see the loss rule)")
    tx_sock, rx_sock = str(sock_dir / "tx.sock"), str(sock_dir / "rx.sock")
    with switch_process(sock_dir, f"{tx_sock},name=tx", f"{rx_sock},name=rx", busy=busy,
                        cpu=cpu[0]) as counters, \
            InteractiveVirtioUser(rx_sock, packed=packed, forward_mode="rxonly", cpu=cpu[1],
                                  queue_size=RX_RING, extra=RX_EXTRA) as rx:
        rx.wait_link_up(30)
        rx.started()
        # The sender starts once the receiver's queue runs, so no frame meets a down port.
        wait_until(lambda: port(counters(), "rx")["link"], 30, "the receiver's queue")
        with InteractiveVirtioUser(tx_sock, packed=packed, forward_mode="txonly", cpu=cpu[0],
                                   mac=DPDK_MAC) as tx:
            tx.wait_link_up(30)
            tx.started()
            _run_and_count(counters, tx, rx)


def _run_and_count(counters: Callable[[], dict[str, Any]], tx: InteractiveVirtioUser,
                   rx: InteractiveVirtioUser) -> None:
    wait_until(lambda: port(counters(), "rx")["tx_frames"] > 20000, 30, "traffic")
    time.sleep(2)
    _, sent = tx.stop_forwarding()
    # The switch drains the sender's ring; then the receiver has everything.
    sw = wait_until(lambda: (s := counters()) and port(s, "tx")["rx_frames"] == sent and s,
                    20, f"the switch to take all {sent} frames")
    forwarded = port(sw, "rx")["tx_frames"]
    got = wait_until(lambda: (s := rx.nic_stats()).rx_packets >= forwarded and s, 20,
                     "the receiver to count what the switch forwarded")
    rx_in, _ = rx.stop_forwarding()
    print(f"sender TX {sent}, switch in {port(sw, 'tx')['rx_frames']} out {forwarded}, "
          f"receiver RX {got.rx_packets}; drops {port(sw, 'tx')['drops']} "
          f"{port(sw, 'rx')['drops']}")
    assert sent > 20000
    assert port(sw, "tx")["dropped"] == 0 and port(sw, "rx")["dropped"] == 0
    assert forwarded == sent
    assert got.rx_packets == sent == rx_in
    assert port(sw, "tx")["ring_errors"] == port(sw, "rx")["ring_errors"] == 0


def _txonly_frame(size: int, src_mac: str) -> bytes:
    """The frame testpmd 22.11 txonly builds (app/test-pmd/txonly.c defaults): to the
    peer address 02:00:00:00:00:00, IPv4 198.18.0.1 -> 198.18.0.2, TTL 64, UDP 9 -> 9
    without checksum, zero payload."""
    ip_len = size - 14
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, ip_len, 0, 0, 64, 17, 0,
                               bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2])))
    s = sum(struct.unpack("!10H", ip))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    struct.pack_into("!H", ip, 10, ~s & 0xFFFF)
    udp = struct.pack("!HHHH", 9, 9, ip_len - 20, 0)
    head = bytes.fromhex("020000000000") + bytes.fromhex(src_mac.replace(":", "")) + b"\x08\x00"
    return (head + ip + udp).ljust(size, b"\0")


@pytest.mark.parametrize("mrg", [False, True], ids=["mrg0", "mrg1"])
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_dpdk_txonly_frames_arrive_byte_exact(no_leaks: Any, sock_dir: Path, packed: bool,
                                              mrg: bool) -> None:
    """Issue "Virtqueues": our device pops what DPDK virtio-user sent, byte for byte (at
    two frame sizes), and our front-end receives it through the switch."""
    require_peer("testpmd")
    a, b = str(sock_dir / "dpdk.sock"), str(sock_dir / "us.sock")

    def setup(sw: Switch) -> None:
        sw.add_vhost_user_port(a, name="dpdk")
        sw.add_vhost_user_port(b, name="us")

    for size in (64, 1000):
        want = _txonly_frame(size, DPDK_MAC)
        sender = TestpmdVirtioUser(a, forward_mode="txonly", packed=packed, mrg_rxbuf=mrg,
                                   txpkts=size, cpu=0)
        sender.vdev += f",mac={DPDK_MAC}"  # a known source address
        with SwitchThread(setup) as st, VirtioNetFrontend.connect(b) as nic, sender:
            got: list[bytes] = []
            deadline = time.monotonic() + 20
            while len(got) < 3000 and time.monotonic() < deadline:
                got += nic.recv(timeout=0.1)
            info = st.call(lambda: st.switch.port("dpdk").info())  # type: ignore[union-attr]
            assert not st.errors, st.errors
        assert len(got) >= 3000, (len(got), info)
        bad = [f for f in got if f != want]
        assert not bad, (len(bad), bad[0].hex(), want.hex())
        assert info["dropped"] == 0 and info["ring_errors"] == 0


# -- our pktgen -> switch -> DPDK rxonly (+ our receiver) -------------------------------------


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_pktgen_below_rate_reaches_dpdk_without_loss(no_leaks: Any, sock_dir: Path,
                                                     packed: bool) -> None:
    """At a rate the switch sustains nothing is lost: DPDK rxonly counts every frame and
    our second receiver sees every sequence number once, in order (the frames are flooded
    to both: their destination is never learned)."""
    require_peer("testpmd")
    cpu = cpus()
    g, d, r = (str(sock_dir / f"{n}.sock") for n in ("gen", "dpdk", "ours"))

    def setup(sw: Switch) -> None:
        sw.add_vhost_user_port(g, name="gen")
        sw.add_vhost_user_port(d, name="dpdk")
        sw.add_vhost_user_port(r, name="ours")

    with SwitchThread(setup) as st, \
            InteractiveVirtioUser(d, forward_mode="rxonly", cpu=cpu[-1], packed=packed,
                                  queue_size=RX_RING, extra=RX_EXTRA) as rx, \
            VirtioNetFrontend.connect(r, packed=packed, queue_size=1024) as ours:
        rx.wait_link_up(30)
        rx.started()
        env = dict(os.environ, PYTHONPATH=SRC)
        gen = subprocess.Popen(
            [sys.executable, "-m", "vhostuser.cli.main", "pktgen", g, "--rate", "5000",
             "--count", "20000", "--tx-only", "--json", "--flows", "4", "--dst-mac",
             "02:00:00:00:00:99"] + (["--packed"] if packed else []),
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        seen: list[tuple[int, int]] = []
        magic = None
        while gen.poll() is None or len(seen) < 20000:
            for f in ours.recv(timeout=0.05):
                if magic is None:
                    magic = struct.unpack_from("!H", f, 42)[0]
                p = read_probe(f, magic)
                if p is not None:
                    seen.append(p)
            if gen.poll() is not None and not ours.recv(timeout=1.0):
                break
        out, err = gen.communicate(timeout=60)
        assert gen.returncode == 0, err
        summary = json.loads(out)
        try:
            got = wait_until(lambda: (s := rx.nic_stats()).rx_packets >= summary["sent"] and s,
                             20, "DPDK to count every frame")
        except AssertionError:
            print(st.stats(), rx.nic_stats(), summary)
            raise
        assert not st.errors, st.errors
    assert summary["sent"] == 20000
    assert got.rx_packets == 20000
    seqs = [s for s, _ in seen]
    assert seqs == list(range(20000)), (len(seqs), seqs[:5])


# -- our pktgen -> DPDK net_vhost macswap -> back ------------------------------------------------


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_pktgen_through_dpdk_macswap(no_leaks: Any, sock_dir: Path, packed: bool) -> None:
    """Our driver side sends through DPDK's vhost PMD in macswap mode; every frame comes
    back (issue "Virtqueues": each one returned). At a rate our receive side keeps up with:
    DPDK drops what finds no receive buffer, so pktgen flat out would measure its own
    receiver, not the path."""
    require_peer("testpmd")
    sock = str(sock_dir / "vhost.sock")
    with TestpmdVhost(sock, forward_mode="macswap", cpu=cpus()[-1]) as be:
        be.wait_listening()
        r = subprocess.run(
            [sys.executable, "-m", "vhostuser.cli.main", "pktgen", sock, "--count", "30000",
             "--rate", "10000", "--queue-size", "4096", "--flows", "8", "--json",
             "--drain", "5"] + (["--packed"] if packed else []),
            env=dict(os.environ, PYTHONPATH=SRC), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr + r.stdout
    s = json.loads(r.stdout)
    assert s["sent"] == s["received_ours"] == 30000
    assert s["lost"] == 0 and s["duplicates"] == 0 and s["reordered"] == 0
    assert s["device"]["packed"] is packed


# -- a broken ring on one port ------------------------------------------------------------------


def test_ring_violation_on_one_port_spares_the_others(sock_dir: Path) -> None:
    """DPDK txonly -> switch -> DPDK rxonly keeps forwarding while a third port's guest
    writes a descriptor whose next is out of range: that ring stops, counted."""
    require_peer("testpmd")
    cpu = cpus()
    tx_sock, rx_sock, bad = (str(sock_dir / f"{n}.sock") for n in ("tx", "rx", "bad"))
    with switch_process(sock_dir, f"{tx_sock},name=tx", f"{rx_sock},name=rx",
                        f"{bad},name=bad", cpu=cpu[0]) as counters, \
            InteractiveVirtioUser(rx_sock, forward_mode="rxonly", cpu=cpu[-1]) as rx, \
            InteractiveVirtioUser(tx_sock, forward_mode="txonly", cpu=cpu[0]) as tx, \
            VirtioNetFrontend.connect(bad, queue_size=64) as nic:
        rx.wait_link_up(30)
        tx.wait_link_up(30)
        before = wait_until(lambda: port(counters(), "rx")["tx_frames"] > 5000 and counters(),
                            30, "traffic")
        q = nic._tx[0]
        buf = nic._buf
        assert buf is not None
        gpa = q.slot_base
        frame = bytes(12) + bytes.fromhex("ffffffffffff02000000000c0800") + bytes(46)
        buf[gpa : gpa + len(frame)] = frame
        assert q.ring.add(((gpa, len(frame), False),), 0)
        ring_bytes = (split_layout(64, 0)[3] + 4095) // 4096 * 4096
        desc, avail, _u, _ = split_layout(64, ring_bytes)
        head = struct.unpack_from("<H", buf, avail + 4 + 2 * ((q.ring._avail_idx - 1) % 64))[0]
        struct.pack_into("<QIHH", buf, desc + 16 * head, gpa, len(frame), DESC_F_NEXT, 999)
        q.ring.publish()
        nic.client.kick(1)
        broken = wait_until(lambda: (s := counters()) and port(s, "bad")["ring_errors"] and s,
                            20, "the bad port's ring to break")
        assert "next 999" in port(broken, "bad")["last_error"]
        after = wait_until(
            lambda: (s := counters()) and port(s, "rx")["tx_frames"] > port(broken, "rx")[
                "tx_frames"] + 5000 and s, 20, "traffic to go on")
        assert port(after, "tx")["ring_errors"] == port(after, "rx")["ring_errors"] == 0
        assert port(after, "rx")["tx_frames"] > port(before, "rx")["tx_frames"]
        tx.stop_forwarding()
