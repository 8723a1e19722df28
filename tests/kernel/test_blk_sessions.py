"""``vhost-user blk`` with two front-ends on one socket (a live migration's destination
beside its source, see ``vhost-user blk --help``), run as a process: the second is
served on the same image, a third is refused with a message that says why, ``--sessions
1`` refuses the second, and two front-ends running their queues at once are warned of."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vhostuser.errors import VhostUserError
from vhostuser.frontends import VirtioBlkFrontend
from vhostuser.io.frontend import FrontendClient

from .test_blk_frontend import MiB, _env, _start_blk, make_image


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short directory under /tmp (AF_UNIX paths must fit 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="vhu-blks-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _stop(proc: subprocess.Popen[bytes]) -> str:
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=20)[0].decode()
    assert proc.returncode == 0, out
    return out


def _refused(sock: str) -> None:
    """Connect and ask for the features: the back-end closes the connection instead."""
    with FrontendClient.connect(sock, timeout=5.0) as c, pytest.raises(VhostUserError):
        c.negotiate()


def test_second_front_end_is_served_and_a_third_refused(no_leaks: Any,
                                                         workdir: Path) -> None:
    """Default --sessions 2: a front-end connecting while one runs is served (the
    handshake of a migration's destination), on the same image; a third is turned away
    with a warning naming the two, and the first goes on unharmed. Once the second
    leaves, another may connect; if it starts its queues while the first runs, the
    back-end warns that two drivers write one disk."""
    img = make_image(workdir / "disk.raw", 2 * MiB)
    sock = str(workdir / "blk.sock")
    proc = _start_blk(img, sock)
    try:
        with VirtioBlkFrontend(sock) as first:
            first.write(0, b"a" * 4096)
            with FrontendClient.connect(sock, timeout=5.0) as second:
                n = second.negotiate()
                assert n.backend_features  # served: it got the offer
                _refused(sock)
                first.write(4096, b"b" * 4096)
                assert first.read(0, 8192) == b"a" * 4096 + b"b" * 4096
            with VirtioBlkFrontend(sock) as other:
                assert other.read(0, 4096) == b"a" * 4096  # the same image
    finally:
        out = _stop(proc)
    assert "front-end connected (blk.sock#0)" in out, out
    assert "front-end connected (blk.sock#1) while blk.sock#0 is connected: both are " \
        "served, on this one image" in out, out
    assert f"{sock}: refusing another front-end (blk.sock#2): blk.sock#0 and blk.sock#1 " \
        "already connected (--sessions 2; the second one is for a live migration's " \
        "destination)" in out, out
    assert "blk.sock#3 started queue 0 while blk.sock#0 runs its queues too: two drivers " \
        "write this one disk at once" in out, out
    assert "stopped after 4 session(s)" in out, out


def test_one_session_refuses_a_second_front_end(no_leaks: Any, workdir: Path) -> None:
    """--sessions 1: one front-end at a time; a second is turned away while it runs."""
    img = make_image(workdir / "disk.raw", MiB)
    sock = str(workdir / "blk.sock")
    proc = _start_blk(img, sock, "--sessions", "1")
    try:
        with VirtioBlkFrontend(sock) as first:
            _refused(sock)
            first.write(0, b"x" * 512)
            assert first.read(0, 512) == b"x" * 512
    finally:
        out = _stop(proc)
    assert "refusing another front-end (blk.sock#1): blk.sock#0 already connected " \
        "(--sessions 1" in out, out


@pytest.mark.parametrize(("value", "message"), [
    ("0", "sessions 0 is outside 1..2"),
    ("3", "sessions 3 is outside 1..2: a second front-end is for a live migration's"),
    ("two", "sessions 'two' is not an integer"),
])
def test_sessions_out_of_range_is_refused(workdir: Path, value: str, message: str) -> None:
    img = make_image(workdir / "disk.raw", MiB)
    r = subprocess.run(
        [sys.executable, "-m", "vhostuser.cli.main", "blk", "--image", str(img), "--socket",
         str(workdir / "x.sock"), "--sessions", value], capture_output=True, text=True,
        env=_env(), timeout=30)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr, r.stderr
    assert not (workdir / "x.sock").exists()
