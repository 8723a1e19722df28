"""One path, one server: a second back-end started on a path where a live server listens
refuses instead of taking it over; a stale socket is replaced; a server removes its socket
on exit only if the file is still its own; a disk image has one writer at a time.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vhostuser.devices.net import NullNetDevice
from vhostuser.io.backend import BackendServer
from vhostuser.io.blkfile import BlkFile
from vhostuser.io.fdpass import listen_unix, socket_identity, unlink_socket
from vhostuser.io.reactor import Reactor


def test_listen_refuses_a_live_socket_and_leaves_it(tmp_path: Path) -> None:
    path = str(tmp_path / "vu.sock")
    with listen_unix(path) as first:
        ident = socket_identity(path)
        with pytest.raises(FileExistsError, match="listening on this socket already") as info:
            listen_unix(path)
        assert info.value.errno == errno.EADDRINUSE
        assert info.value.filename == path
        assert socket_identity(path) == ident  # not replaced
        # The first server still accepts (the probe connection is gone again).
        while True:
            try:
                conn, _ = first.accept()
                conn.close()
            except BlockingIOError:
                break
        c = socket.socket(socket.AF_UNIX)
        c.connect(path)
        c.close()


def test_unlink_socket_only_removes_our_own_file(tmp_path: Path) -> None:
    path = str(tmp_path / "vu.sock")
    a = listen_unix(path)
    ident_a = socket_identity(path)
    a.close()
    os.unlink(path)
    b = listen_unix(path)  # another server took the path meanwhile
    try:
        assert not unlink_socket(path, ident_a)
        assert socket_identity(path) is not None
        assert unlink_socket(path, socket_identity(path))
        assert not os.path.exists(path)
    finally:
        b.close()


def test_backend_server_close_leaves_a_successors_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "vu.sock")
    reactor = Reactor()
    try:
        server = BackendServer(reactor, path, NullNetDevice)
        os.unlink(path)
        other = listen_unix(path)
        server.close()
        assert socket_identity(path) is not None  # the successor's file survives
        other.close()
        server2 = BackendServer(reactor, path, NullNetDevice)  # stale now: replaced
        server2.close()
        assert not os.path.exists(path)
    finally:
        reactor.close()


def test_image_has_one_writer(tmp_path: Path) -> None:
    img = tmp_path / "disk.raw"
    img.write_bytes(bytes(4096))
    with BlkFile.open(str(img)):
        with pytest.raises(OSError, match="in use by another process") as info:
            BlkFile.open(str(img))
        assert info.value.errno == errno.EBUSY
        with pytest.raises(OSError, match="in use"):
            BlkFile.open(str(img), read_only=True)
    with (BlkFile.open(str(img), read_only=True), BlkFile.open(str(img), read_only=True),
          pytest.raises(OSError, match="a writer needs it alone")):
        BlkFile.open(str(img))
    BlkFile.open(str(img)).close()  # the locks went with the descriptors


def test_empty_image_is_refused(tmp_path: Path) -> None:
    img = tmp_path / "empty.raw"
    img.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        BlkFile.open(str(img))


def _cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "vhostuser.cli.main", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_listening(path: Path, proc: subprocess.Popen[str], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("command", ["blk", "serve", "switch"])
def test_second_server_on_a_live_path_refuses_and_first_keeps_it(
        tmp_path: Path, command: str) -> None:
    """The second process exits with one line and status 2; the first keeps its socket
    (also after the second is gone) and stops cleanly, removing it."""
    sock = tmp_path / "vu.sock"
    argv = {"blk": ["blk", "--socket", str(sock), "--image"],
            "serve": ["serve", "--socket", str(sock)],
            "switch": ["switch", "--port", str(sock)]}[command]

    def image(name: str) -> list[str]:
        if command != "blk":
            return []
        img = tmp_path / name  # each its own image: the socket must be what refuses
        img.write_bytes(bytes(1 << 20))
        return [str(img)]

    first = _cli(*argv, *image("a.raw"))
    try:
        _wait_listening(sock, first)
        ident = socket_identity(str(sock))
        second = _cli(*argv, *image("b.raw"))
        out, err = second.communicate(timeout=30)
        assert second.returncode == 2, (out, err)
        assert "Traceback" not in err
        assert "listening on this socket already" in err, err
        assert len(err.strip().splitlines()) == 1, err
        assert socket_identity(str(sock)) == ident
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)
    assert first.returncode == 0
    assert not sock.exists()


def test_second_blk_on_the_same_image_refuses(tmp_path: Path) -> None:
    img = tmp_path / "disk.raw"
    img.write_bytes(bytes(1 << 20))
    a, b = tmp_path / "a.sock", tmp_path / "b.sock"
    first = _cli("blk", "--image", str(img), "--socket", str(a))
    try:
        _wait_listening(a, first)
        second = _cli("blk", "--image", str(img), "--socket", str(b))
        _out, err = second.communicate(timeout=30)
        assert second.returncode == 2
        assert "in use by another process" in err and "Traceback" not in err
        assert not b.exists()
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)


@pytest.mark.parametrize("command", ["serve", "switch", "blk"])
@pytest.mark.parametrize(("where", "expect"), [
    ("nodir/x.sock", "directory .*nodir does not exist"),
    ("regular", "refusing to replace a regular file"),
    ("x" * 120, "bytes; AF_UNIX allows 1 to 107"),
], ids=["missing-dir", "regular-file", "too-long"])
def test_bad_socket_paths_get_one_line(tmp_path: Path, command: str, where: str,
                                       expect: str) -> None:
    (tmp_path / "regular").write_bytes(b"keep")
    img = tmp_path / "disk.raw"
    img.write_bytes(bytes(1 << 20))
    path = str(tmp_path / where)
    argv = {"blk": ["blk", "--image", str(img), "--socket", path],
            "serve": ["serve", "--socket", path],
            "switch": ["switch", "--port", path]}[command]
    proc = _cli(*argv)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"vhost-user {command}: ")
    assert re.search(expect, err), err
    assert (tmp_path / "regular").read_bytes() == b"keep"


@pytest.mark.parametrize(("args", "expect"), [
    (["blk", "--image", "IMG", "--socket", "S", "--queues", "0"], "--queues 0 is outside"),
    (["blk", "--image", "IMG", "--socket", "S", "--blk-size", "1000"], "--blk-size 1000"),
    (["blk", "--image", "IMG", "--socket", "S", "--serial", "x" * 30], "--serial 'xxx"),
    (["serve", "--socket", "S", "--queue-pairs", "0"], "--queue-pairs 0 is outside"),
    (["switch", "--port", "S", "--queue-pairs", "0"], "--queue-pairs 0 is outside"),
    (["switch", "--port", "S", "--max-macs", "0"], "--max-macs 0"),
    (["switch", "--port", "S", "--aging", "-1"], "--aging -1"),
])
def test_errors_name_the_flag(tmp_path: Path, args: list[str], expect: str) -> None:
    img = tmp_path / "disk.raw"
    img.write_bytes(bytes(1 << 20))
    argv = [str(img) if a == "IMG" else str(tmp_path / "s.sock") if a == "S" else a
            for a in args]
    proc = _cli(*argv)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"vhost-user {args[0]}: {expect}"), err
    assert not (tmp_path / "s.sock").exists()
