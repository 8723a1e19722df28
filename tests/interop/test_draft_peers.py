"""The 2014 draft dialect against unmodified peers that speak the current protocol.

QEMU 7.2 drives our back-end speaking the draft: with the text's numbering its first
request, GET_FEATURES (1), is the draft's ECHO, it gives up on the empty answer, and we say
the front-end may speak the current protocol; with the code's numbering QEMU's realize-time
handshake is valid as it is (ids 1-14 did not move) and nothing is said. Our probe speaking
the draft against DPDK's net_vhost and qemu-storage-daemon fails with one clear line that
the back-end speaks another dialect.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, TypeVar

import pytest

from vhostuser.devices.net import NullNetDevice
from vhostuser.io.thread import ServerThread
from vhostuser.protocol.table import Dialect

from .peers import QemuStorageDaemon, QemuVhostUserNet, TestpmdVhost, make_raw_image, require_peer
from .test_control_plane import wait_until

pytestmark = pytest.mark.interop

T = TypeVar("T")
SRC = str(Path(__file__).resolve().parents[2] / "src")
HINT = "looks like it speaks another dialect"




def sessions(srv: ServerThread) -> list[dict[str, Any]]:
    def snap() -> list[dict[str, Any]]:
        return [{"closed": s.closed, "reason": s.close_reason, "hint": s.conn.dialect_hint,
                 "error": s.conn.error, "events": [type(e).__name__ for e in s.events]}
                for s in srv.sessions_seen]

    return srv.call(snap)


def test_qemu_gives_up_on_a_text_numbered_back_end_and_we_say_why(
        no_leaks: Any, sock_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """QEMU retries at once, again and again: every session carries the hint, the log
    says it once."""
    require_peer("qemu")
    sock = str(sock_dir / "net.sock")
    with caplog.at_level(logging.WARNING, logger="vhostuser.connection.backend"), \
            ServerThread(sock, NullNetDevice, dialect=Dialect.DRAFT_TEXT) as srv, \
            QemuVhostUserNet(sock) as q:
        got = wait_until(lambda: [s for s in sessions(srv) if s["closed"]][:3], 60,
                         "QEMU to give up (three times)")
        q.stop()
    for s in got:
        assert s["reason"] == "front-end closed the connection", s
        assert s["hint"] is not None and s["hint"].startswith("the front-end may speak")
        assert "Dialect.CURRENT" in s["hint"]
    said = [r for r in caplog.records if "another dialect" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in said]
    assert not srv.errors, srv.errors


@pytest.mark.parametrize("dialect", [Dialect.DRAFT_CODE, Dialect.CURRENT])
def test_qemu_realize_handshake_gives_no_hint(no_leaks: Any, sock_dir: Path,
                                              dialect: Dialect) -> None:
    """With the code numbering QEMU's start-up requests (GET_FEATURES, SET_OWNER, per ring
    SET_VRING_CALL and SET_VRING_ERR with an fd) are well formed in the draft too: no hint."""
    require_peer("qemu")
    sock = str(sock_dir / "net.sock")
    with ServerThread(sock, NullNetDevice, dialect=dialect) as srv:
        with QemuVhostUserNet(sock) as q:
            wait_until(lambda: [s for s in sessions(srv)
                                if s["events"].count("VringFdSet") >= 4], 60,
                       "QEMU's call and err fds for both rings")
            q.stop()
        (s,) = wait_until(lambda: [s for s in sessions(srv) if s["closed"]], 20, "close")
    # the same as with the current protocol: QEMU never noticed the difference
    assert s["error"] is None and s["hint"] is None, s


def _probe(sock: str, *flags: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=SRC)
    return subprocess.run(
        [sys.executable, "-m", "vhostuser.cli.main", "probe", "--timeout", "2", *flags, sock],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )


def _one_hint(r: subprocess.CompletedProcess[str], says: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    hints = [line for line in lines if "another dialect" in line]
    assert len(hints) == 1 and says in hints[0], r.stderr
    assert lines[-1].startswith("vhost-user probe: "), r.stderr


@pytest.mark.parametrize("flags", [["--draft"], ["--draft-numbering", "code"]])
def test_draft_probe_names_dpdk_as_current(no_leaks: Any, sock_dir: Path,
                                           flags: list[str]) -> None:
    require_peer("testpmd")
    sock = str(sock_dir / "vhost.sock")
    with TestpmdVhost(sock, forward_mode="io") as be:
        be.wait_listening()
        _one_hint(_probe(sock, *flags), "Dialect.CURRENT (command line: no --draft)")


@pytest.mark.parametrize("flags", [["--draft"], ["--draft-numbering", "code"]])
def test_draft_probe_names_qemu_storage_daemon_as_current(
        no_leaks: Any, sock_dir: Path, flags: list[str]) -> None:
    require_peer("qemu-storage-daemon")
    image = make_raw_image(sock_dir / "disk.raw", 16 << 20)
    sock = str(sock_dir / "blk.sock")
    with QemuStorageDaemon(sock, image) as qsd:
        qsd.wait_ready()
        _one_hint(_probe(sock, *flags), "Dialect.CURRENT (command line: no --draft)")
