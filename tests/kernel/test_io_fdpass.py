"""Kernel tests for io/fdpass.py: real SCM_RIGHTS over AF_UNIX socketpairs and sockets."""

from __future__ import annotations

import array
import errno
import fcntl
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhostuser.errors import MessageTimeoutError, PeerClosedError, RemoteProtocolError
from vhostuser.io import fdcount
from vhostuser.io.fdpass import (
    MAX_FDS,
    OwnedFd,
    close_all,
    connect_unix,
    listen_unix,
    recv_some,
    send_msg,
)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    b.setblocking(False)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _eventfds(n: int) -> list[OwnedFd]:
    return [OwnedFd(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)) for _ in range(n)]


def _raw_send_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    """Send any number of fds, bypassing send_msg's limit (a hostile peer)."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    assert sock.sendmsg([data], anc) == len(data)


# -- OwnedFd -----------------------------------------------------------------------------


def test_owned_fd_close_is_idempotent_and_fd_raises_after() -> None:
    r, w = os.pipe()
    owned = OwnedFd(r)
    assert owned.fd == r
    assert owned.fileno() == r
    assert not owned.closed
    assert f"fd={r}" in repr(owned)
    owned.close()
    owned.close()
    assert owned.closed
    assert "closed" in repr(owned)
    with pytest.raises(ValueError, match="closed"):
        _ = owned.fd
    with pytest.raises(OSError) as info:
        os.fstat(r)
    assert info.value.errno == errno.EBADF
    os.close(w)


def test_owned_fd_detach_gives_up_ownership() -> None:
    r, w = os.pipe()
    owned = OwnedFd(r)
    assert owned.detach() == r
    assert owned.closed
    with pytest.raises(ValueError, match="closed or detached"):
        owned.detach()
    owned.close()  # nothing to close any more
    del owned  # must not close r either
    os.fstat(r)
    os.close(r)
    os.close(w)


def test_owned_fd_context_manager_and_del_close_silently() -> None:
    r, w = os.pipe()
    with OwnedFd(r) as owned:
        assert owned.fd == r
    assert owned.closed
    owned2 = OwnedFd(w)
    del owned2  # closed by __del__, with no ResourceWarning (the suite runs -W error)
    with pytest.raises(OSError):
        os.fstat(w)


def test_owned_fd_rejects_negative() -> None:
    with pytest.raises(ValueError, match="-1"):
        OwnedFd(-1)


def test_close_all_closes_everything_then_reports_first_error() -> None:
    fds = _eventfds(3)
    numbers = [f.fd for f in fds]
    os.close(numbers[0])  # someone else closed it behind our back: EBADF
    with pytest.raises(OSError) as info:
        close_all(fds)
    assert info.value.errno == errno.EBADF
    assert all(f.closed for f in fds)
    for n in numbers[1:]:
        with pytest.raises(OSError):
            os.fstat(n)


# -- send_msg / recv_some ----------------------------------------------------------------


@pytest.mark.parametrize("nfds", range(1, MAX_FDS + 1))
def test_fd_passing_1_to_8(pair: tuple[socket.socket, socket.socket], nfds: int) -> None:
    a, b = pair
    before = fdcount.snapshot()
    originals = _eventfds(nfds)
    send_msg(a, b"\x01\x00\x00\x00hello", [f.fd for f in originals])
    for f in originals:
        os.write(f.fd, (7).to_bytes(8, "little"))
    data, received = recv_some(b)
    assert data == b"\x01\x00\x00\x00hello"
    assert len(received) == nfds
    for f in received:
        assert isinstance(f, OwnedFd)
        assert not os.get_inheritable(f.fd)  # MSG_CMSG_CLOEXEC
        assert fcntl.fcntl(f.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        # Same eventfd object as the original: the value written there is read here.
        assert int.from_bytes(os.read(f.fd, 8), "little") == 7
    close_all(received)
    close_all(originals)
    assert not fdcount.snapshot().diff(before)


def test_send_refuses_more_than_max_fds(pair: tuple[socket.socket, socket.socket]) -> None:
    a, _ = pair
    fds = _eventfds(MAX_FDS + 1)
    try:
        with pytest.raises(ValueError, match="9 fds exceed the limit of 8"):
            send_msg(a, b"x", [f.fd for f in fds])
    finally:
        close_all(fds)


def test_send_refuses_fds_without_data(pair: tuple[socket.socket, socket.socket]) -> None:
    a, _ = pair
    fds = _eventfds(1)
    try:
        with pytest.raises(ValueError, match="empty message"):
            send_msg(a, b"", [fds[0].fd])
    finally:
        close_all(fds)


def test_ctrunc_closes_every_received_fd_10000_times(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    extra = _eventfds(MAX_FDS + 4)  # 12 fds on one message
    numbers = [f.fd for f in extra]
    # Warm up once so lazily created interpreter state is not counted as a leak.
    _raw_send_fds(a, b"hdr", numbers)
    with pytest.raises(RemoteProtocolError):
        recv_some(b)
    before = fdcount.snapshot()
    for _ in range(10_000):
        _raw_send_fds(a, b"hdr", numbers)
        with pytest.raises(RemoteProtocolError) as info:
            recv_some(b)
        assert "MSG_CTRUNC: more than 8 fds" in str(info.value)
    after = fdcount.snapshot()
    close_all(extra)
    assert not after.diff(before), after.diff(before)


def test_ctrunc_with_a_small_control_buffer(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    fds = _eventfds(5)
    before = fdcount.snapshot()
    _raw_send_fds(a, b"hdr", [f.fd for f in fds])
    with pytest.raises(RemoteProtocolError, match="more than 3 fds"):
        recv_some(b, max_fds=3)
    assert not fdcount.snapshot().diff(before)
    close_all(fds)


def test_recv_in_small_chunks_fds_come_with_the_first(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    fds = _eventfds(3)
    payload = bytes(range(100))
    send_msg(a, payload, [f.fd for f in fds])
    got = b""
    received: list[OwnedFd] = []
    chunks = 0
    while len(got) < len(payload):
        data, new = recv_some(b, bufsize=7)
        if chunks == 0:
            assert len(new) == 3
        else:
            assert new == []
        received += new
        got += data
        chunks += 1
    assert got == payload
    assert chunks == 15
    close_all(received)
    close_all(fds)


def test_partial_sends_of_a_large_message(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    payload = os.urandom(2 * 1024 * 1024)  # far more than the socket buffers hold
    fds = _eventfds(2)
    got = bytearray()
    received: list[OwnedFd] = []

    def reader() -> None:
        b.setblocking(True)
        b.settimeout(10)
        while len(got) < len(payload):
            data, new = recv_some(b, bufsize=65536)
            if not data:
                break
            got.extend(data)
            received.extend(new)

    before = fdcount.snapshot()
    t = threading.Thread(target=reader)
    t.start()
    try:
        send_msg(a, memoryview(payload), [f.fd for f in fds], timeout=10.0)
    finally:
        t.join(15)
    assert bytes(got) == payload
    assert len(received) == 2  # attached once, to the first chunk only
    close_all(received)
    # glibc caches the finished thread's stack and malloc maps the 2 MiB buffers: private
    # mappings that are not ours to count. Fds, shared maps and threads must be exact.
    diff = before.settled_diff(maps_slack=16)
    assert not diff, diff
    close_all(fds)


def test_send_times_out_when_peer_does_not_read(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, _ = pair
    payload = b"x" * (8 * 1024 * 1024)
    t0 = time.monotonic()
    with pytest.raises(MessageTimeoutError, match=r"0\.2 s deadline") as info:
        send_msg(a, payload, timeout=0.2)
    assert time.monotonic() - t0 >= 0.2
    assert f"of {len(payload)} bytes" in str(info.value)


def test_send_to_closed_peer_is_peer_closed(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    b.close()
    with pytest.raises(PeerClosedError, match="peer closed"):
        send_msg(a, b"hello")


def test_eof_is_empty_result(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    send_msg(a, b"last")
    a.close()
    assert recv_some(b) == (b"last", [])
    assert recv_some(b) == (b"", [])


def test_reset_is_peer_closed(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    send_msg(a, b"never read")
    b.close()  # closing with unread data makes Linux report ECONNRESET to the peer
    with pytest.raises(PeerClosedError, match="reset"):
        recv_some(a)


def test_nothing_to_read_raises_blocking_io(pair: tuple[socket.socket, socket.socket]) -> None:
    _, b = pair
    with pytest.raises(BlockingIOError):
        recv_some(b)


def test_recv_argument_checks(pair: tuple[socket.socket, socket.socket]) -> None:
    _, b = pair
    with pytest.raises(ValueError, match="bufsize 0"):
        recv_some(b, bufsize=0)
    with pytest.raises(ValueError, match="max_fds 0"):
        recv_some(b, max_fds=0)


# -- listen_unix / connect_unix ----------------------------------------------------------


def test_listen_creates_mode_0600_nonblocking_cloexec(tmp_path: Path) -> None:
    path = str(tmp_path / "vu.sock")
    umask = os.umask(0o022)
    try:
        sock = listen_unix(path)
        assert os.umask(0o022) == 0o022  # restored
    finally:
        os.umask(umask)
    try:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert sock.getblocking() is False
        assert not os.get_inheritable(sock.fileno())
    finally:
        sock.close()


def test_listen_mode_is_applied_exactly(tmp_path: Path) -> None:
    path = str(tmp_path / "vu.sock")
    with listen_unix(path, mode=0o660):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    with pytest.raises(ValueError, match="0o1777"):
        listen_unix(path, mode=0o1777)


def test_listen_replaces_a_stale_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "vu.sock")
    listen_unix(path).close()  # the file stays behind, as after a crash
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    with listen_unix(path) as sock:
        client = connect_unix(path, timeout=1)
        conn, _ = sock.accept()
        conn.close()
        client.close()


def test_listen_refuses_to_delete_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "precious"
    path.write_bytes(b"data")
    with pytest.raises(FileExistsError, match="regular file") as info:
        listen_unix(str(path))
    assert info.value.filename == str(path)
    assert str(path) in str(info.value)
    assert path.read_bytes() == b"data"


def test_listen_refuses_a_directory(tmp_path: Path) -> None:
    with pytest.raises(FileExistsError, match="directory"):
        listen_unix(str(tmp_path))
    assert tmp_path.is_dir()


def test_listen_rejects_too_long_path() -> None:
    with pytest.raises(ValueError, match="200 bytes"):
        listen_unix("/" + "x" * 199)


def test_connect_times_out_naming_the_path(tmp_path: Path) -> None:
    path = str(tmp_path / "nobody.sock")
    t0 = time.monotonic()
    with pytest.raises(MessageTimeoutError, match=r"nobody\.sock") as info:
        connect_unix(path, timeout=0.3, retry_interval=0.05)
    assert time.monotonic() - t0 >= 0.3
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_connect_retries_until_the_peer_listens(tmp_path: Path) -> None:
    path = str(tmp_path / "late.sock")
    # Bound but not yet listening: connect() gets ECONNREFUSED, as with a slow peer.
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    starter = threading.Timer(0.2, server.listen)
    starter.start()
    try:
        t0 = time.monotonic()
        client = connect_unix(path, timeout=5.0, retry_interval=0.02)
        assert time.monotonic() - t0 >= 0.15
        assert client.getblocking() is False
        conn, _ = server.accept()
        send_msg(client, b"ping")
        assert conn.recv(4) == b"ping"
        conn.close()
        client.close()
    finally:
        starter.join()
        server.close()


def test_connect_waits_for_the_file_to_appear(tmp_path: Path) -> None:
    path = str(tmp_path / "later.sock")
    holder: list[socket.socket] = []
    starter = threading.Timer(0.1, lambda: holder.append(listen_unix(path)))
    starter.start()
    try:
        client = connect_unix(path, timeout=5.0, retry_interval=0.02)
        client.close()
    finally:
        starter.join()
        for s in holder:
            s.close()


def test_connect_nonretryable_error_names_path(tmp_path: Path) -> None:
    afile = tmp_path / "plain"
    afile.write_bytes(b"")
    path = str(afile / "vu.sock")  # a path through a regular file: ENOTDIR, never retried
    t0 = time.monotonic()
    with pytest.raises(NotADirectoryError) as info:
        connect_unix(path, timeout=5.0)
    assert time.monotonic() - t0 < 1.0
    assert info.value.filename == path
    assert path in str(info.value) and "Not a directory" in str(info.value)
