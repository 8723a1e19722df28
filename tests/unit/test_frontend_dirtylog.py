"""FrontendDirtyLog: QEMU's sizing, reading and clearing (atomic against a back-end that
marks concurrently), the shadow-copy comparison."""

from __future__ import annotations

import mmap
import subprocess
import sys
from typing import Any

import pytest

from vhostuser.io.dirtylog import FrontendDirtyLog, changed_pages, log_size
from vhostuser.memory import DirtyLog

KiB = 1024


@pytest.mark.parametrize(("end", "size"), [
    (1, 8), (256 * KiB, 8), (256 * KiB + 1, 16), (4 << 20, 128), ((1 << 30) + 4096, 4096 * 8 + 8)])
def test_sized_as_qemu_sizes_it(end: int, size: int) -> None:
    assert log_size(end) == size


def test_bad_sizes() -> None:
    with pytest.raises(ValueError, match="not positive"):
        log_size(0)


@pytest.mark.parametrize("atomic", [True, False])
def test_pages_reads_and_take_clears(no_leaks: Any, atomic: bool) -> None:
    with FrontendDirtyLog(1 << 20, atomic=atomic) as log:
        assert log.size == 32
        theirs = mmap.mmap(log.fd, log.size)
        view = memoryview(theirs)
        try:
            be = DirtyLog(view)
            be.mark(0, 1)
            be.mark(65 * 4096 - 1, 2)  # pages 64 and 65 (two words)
            be.mark(255 * 4096, 4096)
            assert log.pages() == {0, 64, 65, 255}
            assert log.pages() == {0, 64, 65, 255}  # not cleared by reading
            assert log.take() == {0, 64, 65, 255}
            assert log.take() == set() and not any(view)
        finally:
            view.release()
            theirs.close()
    assert log.closed
    with pytest.raises(ValueError, match="closed"):
        log.take()
    log.close()  # idempotent


_MARKER = """
import mmap, sys
from vhostuser.memory import DirtyLog
fd, size = int(sys.argv[1]), int(sys.argv[2])
m = mmap.mmap(fd, size)
log = DirtyLog(memoryview(m))
for rounds in range(3):
    for p in range(rounds, 8 * size, 3):
        log.mark(p * 4096, 1)
"""


def test_no_bit_is_lost_while_the_back_end_marks(no_leaks: Any) -> None:
    """Another process marks every page a 64 MiB guest has once (atomic ORs with the
    compiled marker), while we take concurrently: every page turns up in exactly one
    take."""
    with FrontendDirtyLog(64 << 20) as log:
        assert log.atomic
        child = subprocess.Popen([sys.executable, "-c", _MARKER, str(log.fd), str(log.size)],
                                 pass_fds=(log.fd,))
        takes: list[set[int]] = []
        try:
            while child.poll() is None:
                takes.append(log.take())
        finally:
            assert child.wait(60) == 0
        takes.append(log.take())
        pages = 8 * log.size
        assert sum(len(x) for x in takes) == pages
        assert set().union(*takes) == set(range(pages))
        assert sum(1 for x in takes if x) > 1  # it did run concurrently


def test_atomic_needs_libatomic_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    import vhostuser.io.dirtylog as d

    monkeypatch.setattr(d, "_EXCHANGE", None)
    with pytest.raises(ValueError, match="libatomic"):
        FrontendDirtyLog(4096, atomic=True)
    with FrontendDirtyLog(4096) as log:
        assert not log.atomic


def test_changed_pages() -> None:
    a = bytearray(5 * 4096)
    b = bytearray(a)
    b[4096] = 1
    b[4 * 4096 + 4095] = 2
    assert changed_pages(a, b) == {1, 4}
    assert changed_pages(a, b, base=0x10000) == {17, 20}
    with pytest.raises(ValueError, match="do not compare"):
        changed_pages(a, b[:-1])
    with pytest.raises(ValueError, match="aligned"):
        changed_pages(a, b, base=1)
