"""``vhost-user trace`` between a real front-end (pktgen) and a real back-end (our switch):
traffic works through it as without it, and what it prints is exactly what went over the
socket, checked against an independent capture of the stream it forwarded."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from .test_net_switch import running, wait_until

SRC = str(Path(__file__).resolve().parents[2] / "src")
HEADER = struct.Struct("<III")


def _cli(*args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=SRC)
    return subprocess.Popen([sys.executable, "-m", "vhostuser.cli.main", *args], env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


class Capture:
    """A second, independent relay: accepts one connection at ``path``, connects to
    ``upstream``, forwards both ways message by message with their fds, and records each
    message's header and fd count per direction."""

    def __init__(self, path: str, upstream: str) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.upstream = upstream
        self.seen: dict[str, list[tuple[int, int, int, int]]] = {"FE->BE": [], "BE->FE": []}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        down, _ = self.listener.accept()
        up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        up.connect(self.upstream)
        back = threading.Thread(target=self._pump, args=(up, down, "BE->FE"), daemon=True)
        back.start()
        self._pump(down, up, "FE->BE")
        back.join(10)
        down.close()
        up.close()

    def _recv(self, src: socket.socket, n: int, fds: list[int]) -> bytes | None:
        out = b""
        while len(out) < n:
            data, got, _flags, _addr = socket.recv_fds(src, n - len(out), 8)
            fds.extend(got)
            if not data:
                return None
            out += data
        return out

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        while True:
            fds: list[int] = []
            try:
                head = self._recv(src, 12, fds)
                if head is None:
                    break
                req, flags, size = HEADER.unpack(head)
                body = self._recv(src, size, fds) if size else b""
                if body is None:
                    break
                self.seen[direction].append((req, flags, size, len(fds)))
                socket.send_fds(dst, [head + body], fds)
            except OSError:
                break
            finally:
                for f in fds:
                    os.close(f)
        # Pass the close on, as the peer would see it.
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()
        self.thread.join(10)


def test_trace_shows_exactly_what_was_exchanged(no_leaks: Any, tmp_path: Path) -> None:
    echo, cap, front = (str(tmp_path / f"{n}.sock") for n in ("echo", "cap", "front"))
    with running(_cli("switch", "--echo", echo, "--quiet")) as sw:
        wait_until(lambda: os.path.exists(echo) or sw.poll() is not None, 20, "switch")
        capture = Capture(cap, echo)
        try:
            with running(_cli("trace", "--listen", front, "--connect", cap, "--json",
                              "--sessions", "1")) as tr:
                wait_until(lambda: os.path.exists(front) or tr.poll() is not None, 20, "trace")
                pk = subprocess.run(
                    [sys.executable, "-m", "vhostuser.cli.main", "pktgen", front, "--count",
                     "300", "--quiet"], env=dict(os.environ, PYTHONPATH=SRC), text=True,
                    capture_output=True, timeout=120)
                assert pk.returncode == 0, pk.stderr
                assert "lost      0" in pk.stdout, pk.stdout  # the echo works through it
                out, err = tr.communicate(timeout=30)
                assert tr.returncode == 0, err
        finally:
            capture.close()
    lines = [json.loads(x) for x in out.splitlines()]
    records = [x for x in lines if "event" not in x]
    events = [x for x in lines if "event" in x]
    assert [e["event"] for e in events][:1] == ["session"]
    assert events[-1]["event"] == "session_end" and events[-1]["problems"] == 0, events[-1]
    assert all(not r.get("problems") for r in records), [r for r in records if "problems" in r]
    for direction in ("FE->BE", "BE->FE"):
        traced = [(r["request"], r["flags"], r["size"], r["fds"]) for r in records
                  if r["channel"] == "main" and r["direction"] == direction]
        assert traced == capture.seen[direction], direction
    names = [r["name"] for r in records if r["direction"] == "FE->BE"]
    for must in ("GET_FEATURES", "SET_FEATURES", "ADD_MEM_REG", "SET_VRING_ADDR",
                 "SET_VRING_KICK", "SET_BACKEND_REQ_FD", "GET_VRING_BASE"):
        assert must in names, names
    replies = [r for r in records if r["reply"]]
    assert replies and all("answers" in r and r["latency_ms"] >= 0 for r in replies)
    features = next(r for r in records if r["name"] == "GET_FEATURES" and r["reply"])
    assert "MRG_RXBUF" in features["fields"]["value_names"]  # net bits named (guessed)


def test_trace_names_the_path_it_cannot_reach(tmp_path: Path) -> None:
    front, missing = str(tmp_path / "front.sock"), str(tmp_path / "missing.sock")
    with running(_cli("trace", "--listen", front, "--connect", missing, "--wait", "0")) as tr:
        wait_until(lambda: os.path.exists(front) or tr.poll() is not None, 20, "trace")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(front)
            out, err = tr.communicate(timeout=30)
    assert tr.returncode == 1, (out, err)
    assert f"back-end: {missing}: no such socket" in err, err
    assert "Traceback" not in err
    assert not os.path.exists(front)  # our listening socket is removed


@pytest.mark.parametrize("argv", [
    ["trace", "--connect", "/tmp/x.sock"],
    ["trace", "--listen", "/tmp/x.sock"],
    ["trace", "--listen", "a", "--frontend-listens", "b", "--connect", "c"],
    ["trace", "--listen", "a", "--connect", "c", "--sessions", "0"],
])
def test_trace_usage_errors(argv: list[str]) -> None:
    p = subprocess.run([sys.executable, "-m", "vhostuser.cli.main", *argv],
                       env=dict(os.environ, PYTHONPATH=SRC), text=True, capture_output=True,
                       timeout=60)
    assert p.returncode == 2 and "usage: vhost-user trace" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
