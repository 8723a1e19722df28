"""Kernel tests for io/mapping.py: mapping region fds as a back-end, and never leaking."""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhostuser.errors import GuestMemoryError
from vhostuser.io import fdcount
from vhostuser.io.eventfd import EventFd
from vhostuser.io.fdpass import OwnedFd, recv_some, send_msg
from vhostuser.io.guestram import GuestRam
from vhostuser.io.mapping import Mapping, deferred_count, map_region_fd, reap_deferred
from vhostuser.memory import Region, RegionTable

PAGE = mmap.PAGESIZE


@pytest.fixture(autouse=True)
def no_deferred_left() -> Iterator[None]:
    """Every test must leave the module's deferred-unmap list empty."""
    assert reap_deferred() == 0
    yield
    assert reap_deferred() == 0


def _memfd(size: int, *, seal: bool = False) -> int:
    fd = os.memfd_create("test-region", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def test_map_from_offset_zero_and_share_with_the_front_end() -> None:
    before = fdcount.snapshot()
    with GuestRam.memfd(4 * PAGE) as ram:
        ram.buf[PAGE : PAGE + 5] = b"guest"
        owned = OwnedFd(os.dup(ram.fd))
        m = map_region_fd(owned, mmap_offset=PAGE, size=3 * PAGE)
        assert owned.closed  # not needed once mapped
        assert m.length == 4 * PAGE == len(m.buf) == len(m.mm)
        assert (m.mmap_offset, m.size, m.fd_size) == (PAGE, 3 * PAGE, 4 * PAGE)
        assert m.shrink_sealed  # GuestRam.memfd seals
        assert bytes(m.buf[PAGE : PAGE + 5]) == b"guest"
        m.buf[2 * PAGE] = 0x5A  # MAP_SHARED: the front-end sees the back-end's write
        assert ram.buf[2 * PAGE] == 0x5A
        assert "mapped" in repr(m)
        assert m.close() is True
        assert m.unmapped and m.closed
        assert m.close() is True  # idempotent
        with pytest.raises(ValueError, match="closed"):
            _ = m.buf
        with pytest.raises(ValueError, match="closed"):
            _ = m.mm
    assert not fdcount.snapshot().diff(before)


def test_map_a_received_fd_into_a_region_table() -> None:
    a, b = socket.socketpair()
    with a, b, GuestRam.memfd(2 * PAGE) as ram:
        send_msg(a, b"SET_MEM_TABLE", [ram.fd])
        _, fds = recv_some(b)
        with map_region_fd(fds[0], mmap_offset=0, size=2 * PAGE) as m:
            table = RegionTable()
            table.add(
                Region(
                    guest_phys_addr=0x1000_0000,
                    size=2 * PAGE,
                    userspace_addr=ram.uva,
                    mmap_offset=0,
                    buf=m.buf,
                )
            )
            table.view(0x1000_0000 + 8, 4)[:] = b"ring"
            assert bytes(ram.buf[8:12]) == b"ring"
            table.clear()


def test_readonly_mapping() -> None:
    fd = _memfd(PAGE)
    with map_region_fd(OwnedFd(fd), mmap_offset=0, size=PAGE, readonly=True) as m:
        assert m.readonly
        assert m.buf.readonly
        assert m.shrink_sealed  # sealed by us: the fd allows it (memguard.seal_shrink)


def _assert_refused(owned: OwnedFd, match: str, **kw: int) -> GuestMemoryError:
    number = owned.fd
    with pytest.raises(GuestMemoryError, match=match) as info:
        map_region_fd(owned, **kw)  # type: ignore[arg-type]
    assert owned.closed  # the fd is released on the error path too
    assert f"fd {number}" in str(info.value)
    return info.value


def test_refuses_a_pipe() -> None:
    before = fdcount.snapshot()
    r, w = os.pipe()
    _assert_refused(OwnedFd(r), "is a pipe", mmap_offset=0, size=PAGE)
    os.close(w)
    assert not fdcount.snapshot().diff(before)


def test_refuses_an_eventfd() -> None:
    before = fdcount.snapshot()
    ev = EventFd()
    _assert_refused(OwnedFd(ev.detach()), r"anon_inode:\[eventfd\]", mmap_offset=0, size=PAGE)
    assert not fdcount.snapshot().diff(before)


def test_refuses_a_socket() -> None:
    a, b = socket.socketpair()
    with a, b:
        _assert_refused(OwnedFd(os.dup(a.fileno())), "is a socket", mmap_offset=0, size=PAGE)


def test_refuses_a_read_only_file_for_a_writable_mapping(tmp_path: Path) -> None:
    path = tmp_path / "ro"
    path.write_bytes(bytes(2 * PAGE))
    before = fdcount.snapshot()
    _assert_refused(
        OwnedFd(os.open(path, os.O_RDONLY)),
        "opened read-only; it cannot be mapped writable",
        mmap_offset=0,
        size=PAGE,
    )
    assert not fdcount.snapshot().diff(before)
    # Asked for read-only, the same file maps fine.
    with map_region_fd(
        OwnedFd(os.open(path, os.O_RDONLY)), mmap_offset=0, size=PAGE, readonly=True
    ):
        pass


def test_refuses_a_write_sealed_memfd() -> None:
    fd = _memfd(PAGE)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
    err = _assert_refused(
        OwnedFd(fd), "mmap of 0x1000 bytes .read-write. failed", mmap_offset=0, size=PAGE
    )
    assert isinstance(err.__cause__, PermissionError)


def test_refuses_a_too_small_fd_naming_the_numbers() -> None:
    before = fdcount.snapshot()
    err = _assert_refused(OwnedFd(_memfd(PAGE)), "only", mmap_offset=PAGE, size=PAGE)
    msg = str(err)
    assert f"mmap_offset {PAGE:#x}" in msg
    assert f"size {PAGE:#x}" in msg
    assert f"= {2 * PAGE:#x} bytes" in msg
    assert f"only {PAGE:#x} bytes" in msg
    assert not fdcount.snapshot().diff(before)


@pytest.mark.parametrize(
    ("offset", "size", "match"),
    [
        (0, 0, "size 0x0 must be positive"),
        (-PAGE, PAGE, "mmap_offset -0x1000 is negative"),
        ((1 << 64) - PAGE, 2 * PAGE, "wraps past 2\\*\\*64"),
        ((1 << 63), PAGE, "exceeds the address space"),
    ],
)
def test_refuses_bad_geometry(offset: int, size: int, match: str) -> None:
    before = fdcount.snapshot()
    _assert_refused(OwnedFd(_memfd(PAGE)), match, mmap_offset=offset, size=size)
    assert not fdcount.snapshot().diff(before)


def test_closed_fd_is_a_value_error() -> None:
    owned = OwnedFd(_memfd(PAGE))
    owned.close()
    with pytest.raises(ValueError):
        map_region_fd(owned, mmap_offset=0, size=PAGE)


# -- deferred unmap -----------------------------------------------------------------------


def test_deferred_unmap_while_a_view_is_held() -> None:
    before = fdcount.snapshot()
    m = map_region_fd(OwnedFd(_memfd(2 * PAGE, seal=True)), mmap_offset=0, size=2 * PAGE)
    view = m.buf[16:32]
    assert m.close() is False  # cannot unmap: deferred, not leaked, no exception
    assert m.closed and not m.unmapped
    assert "deferred" in repr(m)
    with pytest.raises(ValueError, match="closed"):
        _ = m.buf  # logically closed already
    assert deferred_count() == 1
    assert reap_deferred() == 1  # still held
    assert m.close() is False  # again: still deferred, listed once
    assert deferred_count() == 1
    view[0] = 1  # the memory stays valid while the view lives
    del view
    assert reap_deferred() == 0
    assert m.unmapped
    assert not fdcount.snapshot().diff(before)


def test_deferred_unmap_retried_by_a_later_close() -> None:
    first = map_region_fd(OwnedFd(_memfd(PAGE)), mmap_offset=0, size=PAGE)
    held = first.buf[:8]
    assert first.close() is False
    del held
    second = map_region_fd(OwnedFd(_memfd(PAGE)), mmap_offset=0, size=PAGE)
    assert second.close() is True
    assert first.unmapped  # reaped as a side effect
    assert deferred_count() == 0


def test_deferred_when_buf_itself_is_re_exported() -> None:
    m = map_region_fd(OwnedFd(_memfd(PAGE)), mmap_offset=0, size=PAGE)
    it = struct.iter_unpack("B", m.buf)  # holds a buffer export of m.buf itself
    assert m.close() is False
    del it
    assert reap_deferred() == 0
    assert m.unmapped


def test_mapping_constructor_is_usable_directly() -> None:
    mm = mmap.mmap(-1, PAGE)
    m = Mapping(mm, mmap_offset=0, size=PAGE, fd_size=PAGE, readonly=False, shrink_sealed=False)
    assert m.close() is True
    assert mm.closed


# -- no leaks over many cycles ------------------------------------------------------------


def test_1000_map_unmap_cycles_leave_fds_and_maps_flat() -> None:
    with GuestRam.memfd(16 * PAGE) as ram:
        # Warm up: first-use allocations of the interpreter are not leaks.
        map_region_fd(OwnedFd(os.dup(ram.fd)), mmap_offset=PAGE, size=8 * PAGE).close()
        before = fdcount.snapshot()
        for i in range(1000):
            m = map_region_fd(OwnedFd(os.dup(ram.fd)), mmap_offset=PAGE, size=8 * PAGE)
            m.buf[PAGE + i % PAGE] = i & 0xFF
            assert m.close()
        after = fdcount.snapshot()
    assert not after.diff(before), after.diff(before)


def test_1000_refusals_leave_fds_and_maps_flat() -> None:
    fd = _memfd(PAGE)
    r, w = os.pipe()
    try:
        before = fdcount.snapshot()
        for _ in range(1000):
            with pytest.raises(GuestMemoryError):
                map_region_fd(OwnedFd(os.dup(fd)), mmap_offset=PAGE, size=PAGE)
            with pytest.raises(GuestMemoryError):
                map_region_fd(OwnedFd(os.dup(r)), mmap_offset=0, size=PAGE)
        after = fdcount.snapshot()
    finally:
        os.close(fd)
        os.close(r)
        os.close(w)
    assert not after.diff(before), after.diff(before)
