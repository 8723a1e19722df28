"""The client commands (probe, pktgen, blkbench) on bad input: one line and an exit
status, never a traceback; a path that is not a live socket is explained at once (it
waits only with --wait, and says so); Ctrl-C while waiting or running ends cleanly, with
the partial result of a run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

CLIENTS = {
    "probe": ["probe"],
    "pktgen": ["pktgen", "--count", "10"],
    "blkbench": ["blkbench", "--time", "1"],
}


def _run(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vhostuser.cli.main", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def _start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "vhostuser.cli.main", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _one_line_error(r: subprocess.CompletedProcess[str], cmd: str) -> str:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"vhost-user {cmd}: "), lines
    return lines[0]


def _target(tmp_path: Path, kind: str) -> str:
    path = tmp_path / "target"
    if kind == "file":
        path.write_bytes(b"x")
    elif kind == "dir":
        path.mkdir()
    elif kind == "stale":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.close()  # the file stays, nobody listens: as after a crash
    return str(path)


@pytest.mark.parametrize("cmd", list(CLIENTS))
@pytest.mark.parametrize(("kind", "expect"), [
    ("missing", "no such socket (is the back-end running? --wait SECONDS"),
    ("file", "is a regular file, not a socket"),
    ("dir", "is a directory, not a socket"),
    ("stale", "nothing listens on this socket"),
])
def test_unreachable_paths_are_explained_at_once(tmp_path: Path, cmd: str, kind: str,
                                                 expect: str) -> None:
    path = _target(tmp_path, kind)
    t0 = time.monotonic()
    r = _run(*CLIENTS[cmd][:1], path, *CLIENTS[cmd][1:])
    line = _one_line_error(r, cmd)
    assert expect in line and path in line, line
    assert time.monotonic() - t0 < 10  # no hidden retrying (interpreter start included)


@pytest.mark.parametrize("cmd", list(CLIENTS))
def test_wait_says_it_waits_then_explains(tmp_path: Path, cmd: str) -> None:
    path = str(tmp_path / "later.sock")
    t0 = time.monotonic()
    r = _run(CLIENTS[cmd][0], path, *CLIENTS[cmd][1:], "--wait", "1")
    took = time.monotonic() - t0
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"waiting up to 1 s for a back-end on {path}" in r.stderr
    assert "no such socket" in r.stderr
    assert took >= 1.0


@pytest.mark.parametrize("cmd", list(CLIENTS))
def test_ctrl_c_while_waiting(tmp_path: Path, cmd: str) -> None:
    path = str(tmp_path / "never.sock")
    p = _start(CLIENTS[cmd][0], path, *CLIENTS[cmd][1:], "--wait", "60")
    deadline = time.monotonic() + 20
    line = ""
    assert p.stderr is not None
    while "waiting" not in line and time.monotonic() < deadline:
        line = p.stderr.readline()
    p.send_signal(signal.SIGINT)
    _out, err = p.communicate(timeout=20)
    assert p.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err, err


@pytest.mark.parametrize(("args", "flag"), [
    (["pktgen", "S", "--count", "0"], "--count"),
    (["pktgen", "S", "--count", "-5"], "--count"),
    (["pktgen", "S", "--rate", "0"], "--rate"),
    (["pktgen", "S", "--duration", "-1"], "--duration"),
    (["pktgen", "S", "--burst", "0"], "--burst"),
    (["pktgen", "S", "--wait", "-1"], "--wait"),
    (["blkbench", "S", "--iodepth", "0"], "--iodepth"),
    (["blkbench", "S", "--time", "0"], "--time"),
    (["blkbench", "S", "--queues", "x"], "--queues"),
    (["probe", "S", "--timeout", "0"], "--timeout"),
])
def test_bad_numbers_name_the_flag(args: list[str], flag: str) -> None:
    r = _run(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"argument {flag}" in r.stderr, r.stderr
    assert "usage: vhost-user " + args[0] in r.stderr


def _wait_file(path: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 20
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)


def _eventfds(pid: int) -> int:
    """How many eventfds process ``pid`` has open."""
    n = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                n += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        pass
    return n


def _interrupt_client(sock: Path, server: list[str], client: list[str]
                      ) -> tuple[int, str, str]:
    """Start ``server`` (listening on ``sock``), run ``client`` against it for 2 s once its
    rings are set up, send it SIGINT; its exit status and output. The server is stopped
    afterwards. (Waiting for the rings, not a fixed time: a loaded machine may take
    seconds just to start Python.)"""
    srv = _start(*server)
    try:
        _wait_file(sock, srv)
        p = _start(*client)
        deadline = time.monotonic() + 60
        while _eventfds(p.pid) < 3:  # the guard's, a kick and a call fd: the rings run
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline, "the client never set up its rings"
            time.sleep(0.05)
        time.sleep(2.0)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        srv.send_signal(signal.SIGTERM)
        srv.communicate(timeout=20)
    return p.returncode, out, err


def test_ctrl_c_during_pktgen_gives_the_partial_summary(tmp_path: Path) -> None:
    sock = tmp_path / "echo.sock"
    rc, out, err = _interrupt_client(sock, ["switch", "--echo", str(sock), "--quiet"],
                                     ["pktgen", str(sock), "--rate", "2000", "--duration",
                                      "60", "--quiet"])
    assert rc == 130, (out, err)
    assert "Traceback" not in err and "interrupted (Ctrl-C)" in out, (out, err)
    sent_line = next(x for x in out.splitlines() if x.startswith("sent"))
    seconds = float(sent_line.split(" in ")[1].split(" s")[0])
    assert 1.0 < seconds < 10.0, sent_line  # the real elapsed time, not 0 or 60
    lost = int(next(x for x in out.splitlines() if x.startswith("lost")).split()[1])
    assert lost == 0, out  # frames in flight at the interrupt were drained, not lost


def test_ctrl_c_during_blkbench_prints_the_partial_result(tmp_path: Path) -> None:
    img = tmp_path / "disk.raw"
    img.write_bytes(bytes(8 << 20))
    sock = tmp_path / "blk.sock"
    rc, out, err = _interrupt_client(sock, ["blk", "--image", str(img), "--socket", str(sock)],
                                     ["blkbench", str(sock), "--time", "60", "--iodepth", "4"])
    assert rc == 130, (out, err)
    assert "Traceback" not in err, err
    assert "IOPS" in out and "interrupted (Ctrl-C)" in out, out
    assert os.path.exists(img)
