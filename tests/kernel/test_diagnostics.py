"""What a user needs to be told: guest memory that is not shared with the back-end, and a
front-end that reconnects in a tight loop."""

from __future__ import annotations

import functools
import logging
import mmap
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from vhostuser.devices.net import NullNetDevice
from vhostuser.frontends.net import VirtioNetFrontend
from vhostuser.io import backend as io_backend
from vhostuser.io.backend import BackendServer
from vhostuser.io.fdpass import OwnedFd
from vhostuser.io.guestram import GuestRam
from vhostuser.io.reactor import Reactor

from .test_net_switch import MAC_A, MAC_B, frames_seq, receive_n, running, wait_until

SRC = str(Path(__file__).resolve().parents[2] / "src")
SHM = "/dev/shm"
UNSHARED = "guest memory is probably not shared with this back-end"


def _qemu_private_ram(size: int) -> GuestRam:
    """Guest RAM as QEMU makes it with ``-mem-path DIR`` and no share=on: a file whose fd is
    handed to the back-end, while the guest reads and writes a private copy-on-write
    mapping of it (our own GuestRam refuses to share such memory, so it is built here)."""
    fd, path = tempfile.mkstemp(prefix="vhostuser-private.", dir=SHM)
    os.unlink(path)
    os.ftruncate(fd, size)
    mm = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    return GuestRam(fd=OwnedFd(fd), mm=mm, size=size, page_size=mmap.PAGESIZE, share=True,
                    hugetlb=False, sealed=False, path=None)


@pytest.mark.parametrize("share", [False, True], ids=["private", "shared"])
def test_unshared_guest_memory_is_named(no_leaks: Any, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch, share: bool) -> None:
    """The seed's ``-mem-path`` without share: the back-end maps the file, the guest writes
    its private copy. The handshake works, every frame is lost; the switch says why, once."""
    a, b = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    env = dict(os.environ, PYTHONPATH=SRC)
    cmd = [sys.executable, "-m", "vhostuser.cli.main", "switch", "--port", a, "--port", b]
    with running(subprocess.Popen(cmd, env=env, text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)) as sw:
        wait_until(lambda: (os.path.exists(a) and os.path.exists(b)) or sw.poll() is not None,
                   20, "sockets")
        with monkeypatch.context() as mp:
            mp.setattr(GuestRam, "memfd", classmethod(
                lambda cls, size, **kw: (
                    GuestRam.file(SHM, size) if share else _qemu_private_ram(size))))
            # Without EVENT_IDX this driver kicks at every send, whatever it sees.
            na = VirtioNetFrontend.connect(a, event_idx=False)
        with na, VirtioNetFrontend.connect(b) as nb:
            time.sleep(io_backend.UNSHARED_GRACE + 0.2)  # past the kicks of a ring's start
            for f in frames_seq(5, 64, MAC_A, MAC_B):
                na.send([f])  # one kick each, apart (a loaded machine may be late)
                time.sleep(2 * io_backend.UNSHARED_GAP)
            if share:
                assert len(receive_n(nb, 5)) == 5
            else:
                assert nb.recv(timeout=1.0) == []
        sw.terminate()
        _, err = sw.communicate(timeout=20)
    assert sw.returncode == 0, err
    if share:
        assert UNSHARED not in err
    else:
        assert err.count(UNSHARED) == 1, err  # once, not per kick
        assert "share=on" in err


def test_tight_reconnect_loop_is_reported_rate_limited(
        no_leaks: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = str(tmp_path / "s.sock")
    caplog.set_level(logging.WARNING, logger="vhostuser.io.backend")
    with Reactor() as reactor:
        server = BackendServer(reactor, path, NullNetDevice)
        try:
            for i in range(3 * io_backend.LOOP_SESSIONS):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(path)
                    # One bad message per session: what a mismatched front-end would trip on.
                    s.sendall(b"\xff" * 12)
                    assert reactor.run(until=functools.partial(_closed, server, i + 1),
                                       timeout=5)
        finally:
            server.close()
    loops = [r.getMessage() for r in caplog.records if "tight loop" in r.getMessage()]
    assert len(loops) == 1, loops  # 60 sessions in well under LOOP_LOG_INTERVAL: one report
    assert f"{io_backend.LOOP_SESSIONS} sessions in the last" in loops[0]
    assert "ended with: protocol violation" in loops[0], loops[0]


def _closed(server: BackendServer, n: int) -> bool:
    return server.closed_sessions >= n
