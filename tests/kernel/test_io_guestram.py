"""Kernel tests for io/guestram.py: memfd and file-backed guest RAM, mapped for real."""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
from pathlib import Path

import pytest

from vhostuser.io import fdcount
from vhostuser.io.guestram import (
    F_GET_SEALS,
    F_SEAL_GROW,
    F_SEAL_SEAL,
    F_SEAL_SHRINK,
    GuestRam,
)
from vhostuser.memory import FlatMemory

PAGE = mmap.PAGESIZE
HUGETLB_HINT = (
    "mount hugetlbfs (mount -t hugetlbfs none /dev/hugepages) and reserve pages "
    "(sysctl vm.nr_hugepages=64)"
)


def _hugetlbfs_mount() -> str | None:
    with open("/proc/self/mounts", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3 and fields[2] == "hugetlbfs" and os.access(fields[1], os.W_OK):
                return fields[1]
    return None


def _free_huge_pages() -> int:
    with open("/proc/meminfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("HugePages_Free:"):
                return int(line.split()[1])
    return 0


def _maps_line_for(addr: int) -> str | None:
    with open("/proc/self/maps", encoding="utf-8") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= addr < hi:
                return line
    return None


# -- memfd --------------------------------------------------------------------------------


def test_memfd_is_shared_sealed_and_addressable() -> None:
    before = fdcount.snapshot()
    ram = GuestRam.memfd(16 * PAGE, name="test-guest")
    try:
        assert ram.size == 16 * PAGE
        assert ram.page_size == PAGE
        assert ram.share and not ram.hugetlb
        assert ram.sealed
        assert ram.path is None
        seals = fcntl.fcntl(ram.fd, F_GET_SEALS)
        assert seals & (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) == (
            F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL
        )
        assert not os.get_inheritable(ram.fd)
        # uva is the mapping's real address: /proc/self/maps shows the memfd there and
        # reading through it sees what was written through buf.
        ram.buf[0:4] = b"\xde\xad\xbe\xef"
        line = _maps_line_for(ram.uva)
        assert line is not None and "memfd:test-guest" in line and " rw-s " in line
        assert ctypes.string_at(ram.uva, 4) == b"\xde\xad\xbe\xef"
        # The fd is what a back-end maps: the same bytes.
        assert os.pread(ram.fd, 4, 0) == b"\xde\xad\xbe\xef"
        assert len(ram.mmap) == ram.size
        assert "shared" in repr(ram)
    finally:
        ram.close()
    assert not fdcount.snapshot().diff(before)


def test_memfd_seals_forbid_shrinking_and_growing() -> None:
    with GuestRam.memfd(4 * PAGE) as ram:
        with pytest.raises(PermissionError):
            os.ftruncate(ram.fd, PAGE)
        with pytest.raises(PermissionError):
            os.ftruncate(ram.fd, 8 * PAGE)
        with pytest.raises(PermissionError):  # F_SEAL_SEAL: no seal can be removed/added
            fcntl.fcntl(ram.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
        assert os.fstat(ram.fd).st_size == 4 * PAGE


def test_memfd_prealloc_touches_pages() -> None:
    with GuestRam.memfd(64 * PAGE, prealloc=True) as ram:
        # Every page of the shmem file is now allocated.
        assert os.fstat(ram.fd).st_blocks * 512 >= 64 * PAGE
        assert bytes(ram.buf[:16]) == bytes(16)


@pytest.mark.parametrize(
    ("size", "exc", "match"),
    [
        (0, ValueError, "size 0 must be positive"),
        (-PAGE, ValueError, f"size {-PAGE} must be positive"),
        (PAGE + 1, ValueError, f"size {PAGE + 1:#x} is not a multiple of the page size"),
        (1.5, TypeError, "size must be an int, not float"),
    ],
)
def test_memfd_size_validation(size: int, exc: type[Exception], match: str) -> None:
    before = fdcount.snapshot()
    with pytest.raises(exc, match=match):
        GuestRam.memfd(size)
    assert not fdcount.snapshot().diff(before)


def test_close_is_idempotent_and_accessors_raise_after() -> None:
    ram = GuestRam.memfd(PAGE)
    ram.close()
    ram.close()
    assert ram.closed
    assert "closed" in repr(ram)
    for name in ("fd", "mmap", "buf"):
        with pytest.raises(ValueError, match="closed"):
            getattr(ram, name)


def test_close_with_live_views_names_the_problem_then_succeeds() -> None:
    before = fdcount.snapshot()
    ram = GuestRam.memfd(4 * PAGE)
    view = ram.buf[100:200]
    with pytest.raises(BufferError, match="memoryviews of it are still alive"):
        ram.close()
    assert not ram.closed
    view[0] = 1  # still mapped: the view stays usable
    del view
    ram.close()
    assert ram.closed
    assert not fdcount.snapshot().diff(before)


def test_close_with_a_flat_memory_over_it() -> None:
    ram = GuestRam.memfd(4 * PAGE)
    mem = FlatMemory(ram.buf, va_base=ram.uva)
    mem.view(0, 8)[:] = b"12345678"
    assert bytes(ram.mmap[:8]) == b"12345678"
    held = mem.view(PAGE, 16)  # e.g. a ring's cached view
    with pytest.raises(BufferError, match="FlatMemory"):
        ram.close()
    del held
    ram.close()  # FlatMemory holds ram.buf itself, which close() released
    assert ram.closed
    # Nothing can reach the unmapped memory through the stale table: CPython refuses.
    with pytest.raises(ValueError, match="released memoryview"):
        mem.view(0, 8)


def test_close_when_buf_itself_is_re_exported() -> None:
    ram = GuestRam.memfd(PAGE)
    # A consumer holding a buffer export of buf itself (numpy.frombuffer does this; so
    # does a live struct.iter_unpack iterator), not a slice of it.
    outer = struct.iter_unpack("B", ram.buf)
    with pytest.raises(BufferError, match="re-exported"):
        ram.close()
    del outer
    ram.close()
    assert ram.closed


# -- file ---------------------------------------------------------------------------------


def test_file_prealloc_unlink_removes_the_file(tmp_path: Path) -> None:
    before = fdcount.snapshot()
    with GuestRam.file(str(tmp_path), 32 * PAGE, prealloc=True) as ram:
        assert list(tmp_path.iterdir()) == []  # unlinked once mapped
        assert ram.path is None
        assert os.fstat(ram.fd).st_nlink == 0
        assert os.fstat(ram.fd).st_size == 32 * PAGE
        assert os.fstat(ram.fd).st_blocks * 512 >= 32 * PAGE  # fallocate'd / touched
        ram.buf[PAGE : PAGE + 3] = b"abc"
        assert os.pread(ram.fd, 3, PAGE) == b"abc"  # MAP_SHARED: visible via the fd
    assert list(tmp_path.iterdir()) == []
    assert not fdcount.snapshot().diff(before)


def test_file_kept_when_not_unlinked(tmp_path: Path) -> None:
    ram = GuestRam.file(str(tmp_path), 2 * PAGE, unlink=False)
    try:
        assert ram.path is not None
        p = Path(ram.path)
        assert p.parent == tmp_path
        assert p.stat().st_size == 2 * PAGE
        assert (p.stat().st_mode & 0o777) == 0o600
        ram.buf[0] = 0x41
    finally:
        ram.close()
    assert p.read_bytes()[:1] == b"A"  # the file outlives the mapping, as asked


def test_file_private_mapping_cannot_be_shared(tmp_path: Path) -> None:
    with GuestRam.file(str(tmp_path), 4 * PAGE, share=False, prealloc=True) as ram:
        assert not ram.share
        ram.buf[0:2] = b"hi"
        with pytest.raises(ValueError, match="share=False"):
            _ = ram.fd
        line = _maps_line_for(ram.uva)
        assert line is not None and " rw-p " in line
        assert "private" in repr(ram)


def test_file_size_validation_and_cleanup(tmp_path: Path) -> None:
    before = fdcount.snapshot()
    with pytest.raises(ValueError, match="not a multiple of the page size"):
        GuestRam.file(str(tmp_path), PAGE + 512)
    with pytest.raises(FileNotFoundError):
        GuestRam.file(str(tmp_path / "missing"), PAGE)
    assert list(tmp_path.iterdir()) == []
    assert not fdcount.snapshot().diff(before)


def test_file_on_tmpfs() -> None:
    if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
        pytest.skip("/dev/shm (tmpfs) is not available")
    with GuestRam.file("/dev/shm", 8 * PAGE, prealloc=True) as ram:
        assert not ram.hugetlb
        assert ram.page_size == PAGE
        line = _maps_line_for(ram.uva)
        assert line is not None and "/dev/shm/vhostuser-guest." in line and "(deleted)" in line


# -- huge pages ---------------------------------------------------------------------------


def test_file_on_hugetlbfs() -> None:
    mnt = _hugetlbfs_mount()
    if mnt is None:
        pytest.skip(f"no writable hugetlbfs mount: {HUGETLB_HINT}")
    huge = os.statvfs(mnt).f_bsize
    if _free_huge_pages() < 2:
        pytest.skip(f"fewer than 2 free huge pages of {huge:#x} bytes: {HUGETLB_HINT}")
    with pytest.raises(ValueError, match=f"page size {huge:#x}"):
        GuestRam.file(mnt, PAGE)
    with GuestRam.file(mnt, 2 * huge, prealloc=True) as ram:
        assert ram.hugetlb
        assert ram.page_size == huge
        ram.buf[huge] = 7
        assert os.pread(ram.fd, 1, huge) == b"\x07"


def test_memfd_hugetlb() -> None:
    if _free_huge_pages() < 1:
        pytest.skip(f"no free huge pages: {HUGETLB_HINT}")
    try:
        ram = GuestRam.memfd(2 * 1024 * 1024, hugetlb=True)
    except OSError as e:
        pytest.skip(f"hugetlb memfd unavailable ({e}): {HUGETLB_HINT}")
    with ram:
        assert ram.hugetlb
        assert ram.page_size >= 2 * 1024 * 1024
        ram.buf[0] = 1
