"""Issue "reconnection" acceptance: two QEMU guests ping each other through ``vhost-user
switch`` while the switch process is SIGKILLed and started again on the same sockets.

Both ways QEMU can hold its vhost-user socket are covered: QEMU connects with
``reconnect=1`` (the switch listens, ``--port``) and QEMU listens with ``server=on``
(the switch connects, ``--connect``). Either way the guests' pings resume once the new
switch took the rings over, and the only pings lost are one run of consecutive sequence
numbers around the outage: the ones on their way at the kill or sent while no switch ran.
Host-side times of each reply (the guest console is read as it comes) place that run
between the kill and the restart.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import pytest

from vhostuser.cli.guest import GuestVM, NetPort, pick_subnet

from .peers import require_peer

pytestmark = pytest.mark.interop

BOOT_TIMEOUT = 120.0
PINGS = 80
INTERVAL = 0.25
KILL_AFTER_SEQ = 12
"""The switch is killed once both guests have seen this many replies."""
OUTAGE_SLACK = 3.0
"""Seconds of pings beyond the measured outage that may be lost (the guest's link comes
back after the new switch has the session; ARP may have to be redone)."""
_REPLY = re.compile(r"bytes from [0-9.]+: seq=(\d+) ")


class Replies:
    """Host-side arrival times of the ping replies a guest prints (``seq=N``)."""

    def __init__(self) -> None:
        self.at: dict[int, float] = {}
        self._lock = threading.Lock()

    def on_line(self, line: str) -> None:
        """GuestVM's console callback (runs on its reader thread)."""
        m = _REPLY.search(line)
        if m is not None:
            with self._lock:
                self.at.setdefault(int(m[1]), time.monotonic())

    def seen(self) -> int:
        """Replies so far."""
        with self._lock:
            return len(self.at)

    def after(self, t: float) -> list[int]:
        """Sequence numbers of the replies that arrived after monotonic time ``t``."""
        with self._lock:
            return sorted(seq for seq, at in self.at.items() if at > t)


class SwitchProcess:
    """``vhost-user switch`` as a child process, started again on the same arguments."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.argv = [sys.executable, "-m", "vhostuser.cli.main", "switch", *args]
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 -- closed in stop()/kill()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def _reap(self) -> None:
        assert self.proc is not None
        self.proc.wait(20)
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """SIGKILL: no goodbye to the front-ends, the socket files left behind."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self._reap()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            if self._log is not None:
                self._log.close()
                self._log = None
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self._reap()
        except subprocess.TimeoutExpired:
            self.kill()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])


@contextmanager
def switch_process(args: list[str], log: Path) -> Iterator[SwitchProcess]:
    sw = SwitchProcess(args, log)
    sw.start()
    try:
        yield sw
    finally:
        sw.stop()


def _wait(cond: Any, timeout: float, what: str, sw: SwitchProcess) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; switch "
                                 f"log:\n{sw.tail()}")
        time.sleep(0.05)


def _ping_script(peer: str) -> str:
    return f"ping -c {PINGS} -i {INTERVAL} {peer}; true"


@pytest.mark.parametrize("qemu_listens", [False, True], ids=["qemu-reconnect", "qemu-server"])
def test_pings_resume_after_the_switch_is_killed(no_leaks: Any, sock_dir: Path,
                                                 qemu_listens: bool) -> None:
    """Two guests ping each other (80 pings, 4 a second); once both saw 12 replies the
    switch is SIGKILLed and started again on the same sockets. The new switch takes the
    guests' rings over (QEMU reconnects to it, or it connects to QEMU), the pings go on to
    the last one, and each guest lost only one run of consecutive pings: those that left
    between the last reply before the kill and the first after the restart."""
    require_peer("qemu")
    require_peer("guest")
    net = pick_subnet()
    p1, p2 = str(sock_dir / "p1.sock"), str(sock_dir / "p2.sock")
    stats = sock_dir / "stats.json"
    flag = "--connect" if qemu_listens else "--port"
    args = [flag, f"{p1},name=vm1", flag, f"{p2},name=vm2", "--stats-json", str(stats),
            "--stats-interval", "0.5", "-v"]
    if qemu_listens:
        ports = [NetPort(socket=p1, server=True), NetPort(socket=p2, server=True)]
    else:
        ports = [NetPort(socket=p1, reconnect=1), NetPort(socket=p2, reconnect=1)]
    ra, rb = Replies(), Replies()
    with switch_process(args, sock_dir / "switch.log") as sw, \
            GuestVM(nets=[ports[0]], end="shell", on_line=ra.on_line,
                    params={"ip": f"{net}.1/24"}) as a, \
            GuestVM(nets=[ports[1]], end="shell", on_line=rb.on_line,
                    params={"ip": f"{net}.2/24"}) as b:
        for vm, peer in ((a, f"{net}.2"), (b, f"{net}.1")):
            first = vm.run(f"vu_ping {peer} 2 60 0.2", timeout=BOOT_TIMEOUT)
            reach = [r for r in first.results if r.name == "reach"]
            assert reach and reach[0]["ok"] == "1", first.output + sw.tail()
        ra.at.clear()
        rb.at.clear()
        ca = a.submit(_ping_script(f"{net}.2"))
        cb = b.submit(_ping_script(f"{net}.1"))
        _wait(lambda: ra.seen() >= KILL_AFTER_SEQ and rb.seen() >= KILL_AFTER_SEQ, 60,
              "replies before the kill", sw)
        assert sw.alive(), sw.tail()
        sw.kill()
        t_kill = time.monotonic()
        stats.unlink(missing_ok=True)
        sw.start()
        _wait(lambda: stats.exists() and all(
            p["connected"] for p in json.loads(stats.read_text())["ports"]), 30,
            "both ports of the new switch connected", sw)
        t_up = time.monotonic()
        done_a = a.wait_command(ca, PINGS * INTERVAL + 60)
        done_b = b.wait_command(cb, PINGS * INTERVAL + 60)
        ports_after = {p["name"]: p for p in json.loads(stats.read_text())["ports"]}
        assert a.poweroff() == 0 and b.poweroff() == 0
        assert sw.alive(), sw.tail()
    for name, replies, done in (("vm1", ra, done_a), ("vm2", rb, done_b)):
        got = sorted(replies.at)
        missing = sorted(set(range(PINGS)) - set(got))
        print(f"{name}: {len(got)}/{PINGS} replies, lost {missing} (kill at "
              f"+{t_kill - min(replies.at.values()):.1f} s, new switch connected after "
              f"{t_up - t_kill:.2f} s)")
        assert f"{PINGS} packets transmitted" in done.output, done.output
        assert PINGS - 1 in replies.at, f"{name}: pings did not resume: {done.output}"
        assert got[0] == 0 and len(got) >= KILL_AFTER_SEQ + 10, done.output
        if not missing:
            continue  # the guest held its pings in its ring until the new switch came
        # The pings lost are one run of consecutive ones, and it falls in the outage:
        # nothing was lost before the last reply that came through the old switch, no reply
        # after the run came before the kill, and the run is no longer than the outage
        # (from the kill until the new switch had both guests), give or take the guest
        # noticing (pings queued in a guest's ring meanwhile come late, not lost).
        lo, hi = missing[0], missing[-1]
        assert missing == list(range(lo, hi + 1)), (name, missing)
        last_old = max(s for s in got if replies.at[s] < t_kill)
        early = [s for s in got if s > hi and replies.at[s] < t_kill]
        assert lo > last_old and not early, (name, missing, last_old, early)
        assert len(missing) * INTERVAL <= (t_up - t_kill) + OUTAGE_SLACK, (
            name, missing, t_up - t_kill)
    for name in ("vm1", "vm2"):
        p = ports_after[name]
        assert p["sessions"] == 1 and p["rx_frames"] > 0 and p["tx_frames"] > 0, p
        assert p["ring_errors"] == 0, p
        assert p["mode"] == ("connect" if qemu_listens else "listen")
    assert not os.path.exists(p1) or qemu_listens  # the switch removed its sockets
