"""``vhost-user trace`` between real peers: a QEMU guest and our switch, our front-end and
DPDK's vhost PMD, our front-end and qemu-storage-daemon. The peers work through the proxy
as without it, and the decoded sequence is what they really exchanged: checked against an
independent socket-level capture, and against DPDK's own log of what it read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.kernel.test_trace import Capture
from vhostuser.cli.guest import BlkDisk, GuestVM, NetPort, pick_subnet
from vhostuser.switch import Switch, SwitchThread

from .peers import QemuStorageDaemon, TestpmdVhost, make_raw_image, require_peer, wait_for_socket

pytestmark = pytest.mark.interop

SRC = str(Path(__file__).resolve().parents[2] / "src")
BOOT_TIMEOUT = 120.0


@contextmanager
def tracing(front: str, back: str) -> Iterator[list[dict[str, Any]]]:
    """Run ``vhost-user trace --json --sessions 1`` from ``front`` to ``back``; yields the
    list its records land in once the block is left (the session must have ended)."""
    p = subprocess.Popen(
        [sys.executable, "-m", "vhostuser.cli.main", "trace", "--listen", front, "--connect",
         back, "--json", "--sessions", "1", "--wait", "20"],
        env=dict(os.environ, PYTHONPATH=SRC), text=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    out: list[dict[str, Any]] = []
    try:
        wait_for_socket(front, 20)
        yield out
        stdout, stderr = p.communicate(timeout=60)
        assert p.returncode == 0, stderr
        out.extend(json.loads(x) for x in stdout.splitlines())
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()


def _check(lines: list[dict[str, Any]], capture: Capture | None) -> list[dict[str, Any]]:
    records = [x for x in lines if "event" not in x]
    end = lines[-1]
    assert end["event"] == "session_end", end
    assert end["problems"] == 0, [r for r in records if r.get("problems")]
    if capture is not None:
        for direction in ("FE->BE", "BE->FE"):
            traced = [(r["request"], r["flags"], r["size"], r["fds"]) for r in records
                      if r["channel"] == "main" and r["direction"] == direction]
            assert traced == capture.seen[direction], direction
    return records


def test_qemu_guest_through_trace_to_our_switch(no_leaks: Any, sock_dir: Path) -> None:
    require_peer("qemu")
    require_peer("guest")
    net = pick_subnet()
    front, cap, p1, p2 = (str(sock_dir / f"{n}.sock") for n in ("front", "cap", "p1", "p2"))

    def setup(sw: Switch) -> None:
        sw.add_vhost_user_port(p1, name="vm1")
        sw.add_vhost_user_port(p2, name="vm2")

    with SwitchThread(setup) as st:
        capture = Capture(cap, p1)
        try:
            # Left in reverse order: the guests stop, then the trace's session ends.
            with tracing(front, cap) as lines, \
                    GuestVM(nets=[NetPort(socket=front)], params={
                        "ip": f"{net}.1/24", "peer": f"{net}.2", "ping": 5}) as a, \
                    GuestVM(nets=[NetPort(socket=p2)], end="shell", params={
                        "ip": f"{net}.2/24"}) as b:
                ping = a.wait_result("ping", BOOT_TIMEOUT)
                assert a.wait_exit(60) == 0
                assert b.poweroff() == 0
        finally:
            capture.close()
        assert not st.errors, st.errors
    assert ping.int("received") == 5, ping.line  # the guest works through the proxy
    records = _check(lines, capture)
    sent = [r["name"] for r in records if r["direction"] == "FE->BE"]
    for must in ("GET_FEATURES", "SET_FEATURES", "SET_VRING_ADDR", "SET_VRING_KICK",
                 "SET_VRING_CALL"):
        assert must in sent, sent
    assert "SET_MEM_TABLE" in sent or "ADD_MEM_REG" in sent, sent


def test_our_frontend_through_trace_to_dpdk(no_leaks: Any, sock_dir: Path) -> None:
    """DPDK logs every request it reads: its list is the trace's front-end list."""
    require_peer("testpmd")
    sock, front = str(sock_dir / "vhost.sock"), str(sock_dir / "front.sock")
    with TestpmdVhost(sock, forward_mode="macswap") as be:
        be.wait_listening()
        mark = be.mark()
        with tracing(front, sock) as lines:
            r = subprocess.run(
                [sys.executable, "-m", "vhostuser.cli.main", "pktgen", front, "--count",
                 "2000", "--rate", "5000", "--json", "--drain", "5"],
                env=dict(os.environ, PYTHONPATH=SRC), capture_output=True, text=True,
                timeout=120)
            assert r.returncode == 0, r.stderr + r.stdout
        be.wait_until(lambda: be.CLOSED_RE.search(be.log_text()[mark:]), 20, "peer closed")
        dpdk_read = be.messages(mark)
    s = json.loads(r.stdout)
    assert s["sent"] == s["received_ours"] == 2000 and s["lost"] == 0
    records = _check(lines, None)
    traced = [r["name"] for r in records if r["direction"] == "FE->BE" and not r["reply"]]
    # DPDK 22.11 still says SLAVE where the spec now says BACKEND.
    assert [n.replace("SLAVE", "BACKEND") for n in dpdk_read] == traced


def test_our_frontend_through_trace_to_qsd(no_leaks: Any, sock_dir: Path) -> None:
    require_peer("qemu-storage-daemon")
    image = make_raw_image(sock_dir / "disk.raw", 16 << 20)
    sock, cap, front = (str(sock_dir / f"{n}.sock") for n in ("qsd", "cap", "front"))
    with QemuStorageDaemon(sock, image) as qsd:
        qsd.wait_ready()
        capture = Capture(cap, sock)
        try:
            with tracing(front, cap) as lines:
                r = subprocess.run(
                    [sys.executable, "-m", "vhostuser.cli.main", "blkbench", front,
                     "--time", "1", "--size", "1M", "--verify", "--json"],
                    env=dict(os.environ, PYTHONPATH=SRC), capture_output=True, text=True,
                    timeout=120)
                assert r.returncode == 0, r.stderr + r.stdout
        finally:
            capture.close()
    records = _check(lines, capture)
    sent = [r["name"] for r in records if r["direction"] == "FE->BE"]
    assert "GET_CONFIG" in sent and "SET_VRING_KICK" in sent, sent


def test_qemu_guest_disk_through_trace_to_qsd(no_leaks: Any, sock_dir: Path) -> None:
    """A booting guest writes a pattern over a qemu-storage-daemon disk through the proxy
    and reads it back: the disk works as without the proxy, and the decoded sequence is
    what went over the socket."""
    require_peer("qemu")
    require_peer("guest")
    require_peer("qemu-storage-daemon")
    size = 16 << 20
    image = make_raw_image(sock_dir / "disk.raw", size)
    sock, cap, front = (str(sock_dir / f"{n}.sock") for n in ("qsd", "cap", "front"))
    with QemuStorageDaemon(sock, image) as qsd:
        qsd.wait_ready()
        capture = Capture(cap, sock)
        try:
            with tracing(front, cap) as lines, GuestVM(
                    blks=[BlkDisk(socket=front)], params={"blk": "pattern", "seed": 77}) as vm:
                wrote = vm.wait_result("blkwrite", BOOT_TIMEOUT)
                check = vm.wait_result("blkcheck", BOOT_TIMEOUT)
                assert vm.wait_exit(BOOT_TIMEOUT) == 0
        finally:
            capture.close()
    assert wrote.int("rc") == 0 and check["match"] == "1", (wrote.line, check.line)
    records = _check(lines, capture)
    sent = [r["name"] for r in records if r["direction"] == "FE->BE"]
    assert "GET_CONFIG" in sent and "SET_VRING_KICK" in sent, sent
    assert "SET_MEM_TABLE" in sent or "ADD_MEM_REG" in sent, sent


def test_qemu_guest_nic_through_trace_to_dpdk(no_leaks: Any, sock_dir: Path) -> None:
    """A booting guest's NIC on DPDK's vhost PMD through the proxy: DPDK brings the device
    up (every ring ready) and forwards what the guest sends, and DPDK's own log of the
    requests it read equals the trace's."""
    require_peer("qemu")
    require_peer("guest")
    require_peer("testpmd")
    net = pick_subnet()
    sock, front = str(sock_dir / "vhost.sock"), str(sock_dir / "front.sock")
    with TestpmdVhost(sock, forward_mode="macswap") as be:
        be.wait_listening()
        mark = be.mark()
        with tracing(front, sock) as lines, GuestVM(nets=[NetPort(socket=front)], params={
                "ip": f"{net}.1/24", "peer": f"{net}.2", "ping": 3, "wait": 3}) as vm:
            vm.wait_result("ping", BOOT_TIMEOUT)  # unanswered (macswap), but sent
            be.wait_until(lambda: be.READY_RE.search(be.log_text()[mark:]), 30,
                          "DPDK to see every ring ready")
            stats = be.wait_stats(lambda s: s.rx_packets > 0, 30)
            assert vm.wait_exit(BOOT_TIMEOUT) == 0
        be.wait_until(lambda: be.CLOSED_RE.search(be.log_text()[mark:]), 20, "peer closed")
        dpdk_read = be.messages(mark)
    assert stats.rx_packets > 0  # the guest's frames reached DPDK through the proxy
    records = _check(lines, None)
    traced = [r["name"] for r in records if r["direction"] == "FE->BE" and not r["reply"]]
    assert [n.replace("SLAVE", "BACKEND") for n in dpdk_read] == traced
