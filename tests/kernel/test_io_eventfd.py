"""Kernel tests for io/eventfd.py: real eventfds and pipes, adopted across SCM_RIGHTS."""

from __future__ import annotations

import os
import select
import socket
import struct
import tempfile

import pytest

from vhostuser.errors import RemoteProtocolError
from vhostuser.io import fdcount
from vhostuser.io.eventfd import EventFd
from vhostuser.io.fdpass import OwnedFd, close_all, recv_some, send_msg


def test_notify_and_drain() -> None:
    before = fdcount.snapshot()
    with EventFd() as ev:
        assert ev.is_eventfd
        assert not os.get_blocking(ev.fd)
        assert not os.get_inheritable(ev.fd)
        assert ev.drain() == 0
        ev.notify()
        ev.notify()
        ev.notify()
        assert ev.drain() == 3
        assert ev.drain() == 0
    assert ev.closed
    assert not fdcount.snapshot().diff(before)


def test_initial_value() -> None:
    with EventFd(5) as ev:
        assert ev.drain() == 5


def test_notify_on_a_saturated_counter_is_swallowed() -> None:
    with EventFd() as ev:
        # The largest value an eventfd holds is 2**64 - 2; one more write would block.
        os.write(ev.fd, struct.pack("=Q", 0xFFFF_FFFF_FFFF_FFFE))
        ev.notify()  # EAGAIN, ignored: a wake-up is pending anyway
        assert ev.drain() == 0xFFFF_FFFF_FFFF_FFFE


def test_closed_eventfd_raises() -> None:
    ev = EventFd()
    ev.close()
    with pytest.raises(ValueError, match="closed"):
        ev.notify()
    with pytest.raises(ValueError, match="closed"):
        ev.drain()


def test_adopt_received_eventfd() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b, EventFd() as mine:
        send_msg(a, b"kick", [mine.fd])
        _, fds = recv_some(b)
        assert len(fds) == 1
        owned = fds[0]
        number = owned.fd
        theirs = EventFd.from_owned(owned, what="SET_VRING_KICK fd")
        assert owned.closed  # ownership moved
        assert theirs.fd == number
        assert theirs.is_eventfd
        mine.notify()
        assert theirs.drain() == 1
        theirs.notify()
        assert mine.drain() == 1
        theirs.close()


def test_adopt_pipe_ends() -> None:
    before = fdcount.snapshot()
    r, w = os.pipe()
    os.set_blocking(r, True)
    reader = EventFd.from_owned(OwnedFd(r))
    writer = EventFd.from_owned(OwnedFd(w))
    assert not reader.is_eventfd
    assert not os.get_blocking(r)  # switched to non-blocking
    assert reader.drain() == 0
    writer.notify()
    writer.notify()
    assert reader.drain() == 2
    assert reader.drain() == 0
    os.write(w, b"\x00" * 3)  # a short, zero-valued write still counts as a wake-up
    assert reader.drain() == 1
    close_all([reader, writer])
    assert not fdcount.snapshot().diff(before)


def test_pipe_drain_reads_everything_pending() -> None:
    r, w = os.pipe()
    reader = EventFd.from_owned(OwnedFd(r))
    writer = EventFd.from_owned(OwnedFd(w))
    for _ in range(1000):  # 8000 bytes: more than one read chunk
        writer.notify()
    assert reader.drain() == 1000
    close_all([reader, writer])


def test_adopt_refuses_regular_file_and_socket() -> None:
    with tempfile.TemporaryFile() as f:
        owned = OwnedFd(os.dup(f.fileno()))
        with pytest.raises(RemoteProtocolError, match=r"SET_VRING_CALL fd: fd \d+ is a regular"):
            EventFd.from_owned(owned, what="SET_VRING_CALL fd")
        assert not owned.closed  # still ours to close on the error path
        owned.close()
    a, b = socket.socketpair()
    with a, b:
        owned = OwnedFd(os.dup(a.fileno()))
        with pytest.raises(RemoteProtocolError, match="socket, not an eventfd or a pipe"):
            EventFd.from_owned(owned)
        owned.close()


def test_adopt_refuses_other_anon_inodes() -> None:
    ep = select.epoll()
    owned = OwnedFd(os.dup(ep.fileno()))
    try:
        with pytest.raises(RemoteProtocolError, match=r"anon_inode:\[eventpoll\]"):
            EventFd.from_owned(owned)
    finally:
        owned.close()
        ep.close()
