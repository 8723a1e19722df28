"""Guest RAM in files, as the seed ran it (``-mem-path``), with real QEMU guests on our switch.

- RAM that is not shared (``share=off``): QEMU completes the vhost-user handshake, the
  guest kicks, and every frame is lost; the switch says once that guest memory is not
  shared, naming ``share=on``.
- RAM in a file that is truncated under the switch (a front-end that shrinks guest memory):
  the switch's SIGBUS guard ends that port's session only; the other guests keep pinging
  and a new guest on the same port works.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from vhostuser.cli.guest import GuestVM, NetPort, pick_subnet, wait_all
from vhostuser.io import memguard
from vhostuser.switch import Switch, SwitchThread

from .peers import require_peer

pytestmark = pytest.mark.interop

BOOT_TIMEOUT = 120.0
SHM = "/dev/shm"
UNSHARED = "guest memory is probably not shared with this back-end"


def _require_guest() -> None:
    require_peer("qemu")
    require_peer("guest")


def _two_ports(p1: str, p2: str) -> Any:
    def setup(sw: Switch) -> None:
        sw.add_vhost_user_port(p1, name="vm1")
        sw.add_vhost_user_port(p2, name="vm2")
    return setup


@pytest.mark.parametrize("when", ["at-boot", "later"])
def test_unshared_guest_memory_is_diagnosed(no_leaks: Any, sock_dir: Path,
                                            caplog: pytest.LogCaptureFixture,
                                            when: str) -> None:
    """The seed's ``-mem-path`` without share: pings from that guest are all lost and the
    switch names the cause once, whether the guest pings as soon as its link is up (its
    kicks then come right after QEMU's start-up kicks) or a while later."""
    _require_guest()
    caplog.set_level(logging.WARNING, logger="vhostuser.io.backend")
    net = pick_subnet()
    p1, p2 = str(sock_dir / "p1.sock"), str(sock_dir / "p2.sock")
    early: dict[str, str | int] = (
        {"peer": f"{net}.2", "ping": 3, "wait": 3} if when == "at-boot" else {})
    with SwitchThread(_two_ports(p1, p2)) as st:
        with GuestVM(nets=[NetPort(socket=p1)], mem_path=SHM, mem_share=False, end="shell",
                     params={"ip": f"{net}.1/24", **early}) as a, \
             GuestVM(nets=[NetPort(socket=p2)], end="shell",
                     params={"ip": f"{net}.2/24"}) as b:
            if early:
                ping = a.wait_result("ping", BOOT_TIMEOUT)
            else:
                a.wait_ready(BOOT_TIMEOUT)
                r = a.run(f"vu_ping {net}.2 3 5", timeout=60)
                ping = next(x for x in r.results if x.name == "ping")
            assert ping.int("received") == 0, ping.line  # nothing gets through
            a.stop()
            assert b.poweroff() == 0
        assert not st.errors, st.errors
    said = [x.getMessage() for x in caplog.records if UNSHARED in x.getMessage()]
    assert len(said) == 1, said
    assert "p1.sock" in said[0] and "share=on" in said[0]  # the guest at fault, only


def test_truncated_guest_memory_ends_only_that_port(no_leaks: Any, sock_dir: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Guest a's RAM is a file on tmpfs. It is truncated while a is stopped, and guest b
    pings a: the switch touches a's lost pages (its receive ring), catches the SIGBUS,
    closes a's session and goes on; a new guest on a's port then pings b."""
    _require_guest()
    if not memguard.available():
        if os.environ.get("CI") == "true":
            pytest.fail("the SIGBUS guard (vhostuser._memguard) is not built in CI")
        pytest.skip("the SIGBUS guard (vhostuser._memguard) is not built: install gcc and "
                    "python3-dev, then bash scripts/setup.sh")
    caplog.set_level(logging.WARNING, logger="vhostuser.io.backend")
    net = pick_subnet()
    p1, p2 = str(sock_dir / "p1.sock"), str(sock_dir / "p2.sock")
    ram = Path(SHM) / f"vhostuser-test-guest.{os.getpid()}"
    try:
        with SwitchThread(_two_ports(p1, p2)) as st:
            with GuestVM(nets=[NetPort(socket=p1)], mem_path=ram, end="shell",
                         params={"ip": f"{net}.1/24"}) as a, \
                 GuestVM(nets=[NetPort(socket=p2)], end="shell",
                         params={"ip": f"{net}.2/24", "peer": f"{net}.1", "ping": 3}) as b:
                first = wait_all([b], "ping", BOOT_TIMEOUT)[0]
                assert first.int("received") == 3, first.line
                assert a.proc is not None
                os.kill(a.proc.pid, signal.SIGSTOP)  # a must not touch its RAM first
                os.truncate(ram, 0)
                r = b.run(f"vu_ping {net}.1 3 3", timeout=60)  # into a's lost RX ring
                assert next(x for x in r.results if x.name == "ping").int("received") == 0
                os.kill(a.proc.pid, signal.SIGKILL)
                a.stop()
                assert st.call(lambda: True), st.errors  # the switch still answers
                # The same port takes a new guest, which reaches b.
                with GuestVM(nets=[NetPort(socket=p1)], end="shell",
                             params={"ip": f"{net}.3/24"}) as c:
                    c.wait_ready(BOOT_TIMEOUT)
                    r = c.run(f"vu_ping {net}.2 5 30", timeout=90)
                    ping = next(x for x in r.results if x.name == "ping")
                    assert ping.int("received") == 5, ping.line
                    assert c.poweroff() == 0
                assert b.poweroff() == 0
            assert not st.errors, st.errors
    finally:
        ram.unlink(missing_ok=True)
    lost = [x.getMessage() for x in caplog.records if "guest memory lost" in x.getMessage()]
    assert len(lost) == 1, lost
