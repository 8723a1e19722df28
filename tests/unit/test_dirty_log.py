"""The dirty-page bitmap (vhost-user.rst "Live migration"): one bit per 4 KiB page."""

from __future__ import annotations

import pytest

from vhostuser.memory import DirtyLog, FlatMemory


def test_bits_for_pages_touched() -> None:
    log = DirtyLog(bytearray(4))  # 32 pages
    log.mark(0, 1)
    log.mark(4095, 2)  # crosses into page 1
    log.mark(9 * 4096 + 100, 3 * 4096)  # pages 9..12
    log.mark(5 * 4096, 0)  # nothing written, nothing marked
    assert log.dirty_pages() == [0, 1, 9, 10, 11, 12]
    assert bytes(log.buf) == bytes([0b11, 0b00011110, 0, 0])


def test_writes_past_the_log_are_counted_not_made() -> None:
    log = DirtyLog(bytearray(1))  # 8 pages
    log.mark(7 * 4096, 2 * 4096)  # page 7 inside, page 8 beyond
    log.mark(100 * 4096, 1)
    assert log.dirty_pages() == [7] and log.beyond == 2
    assert len(log.buf) == 1


def test_bits_are_only_ever_set() -> None:
    """The front-end clears bits concurrently; marking never clears one it did not set."""
    buf = bytearray([0b10100101])
    log = DirtyLog(buf)
    log.mark(1 * 4096, 1)
    assert buf[0] == 0b10100111


def test_logging_switched_on_later_sees_later_writes() -> None:
    mem = FlatMemory(bytearray(8 * 4096))
    assert not mem.logging
    mem.mark_dirty(0, 10)  # no log yet: nothing to record
    mem.log = DirtyLog(bytearray(1))
    assert mem.logging
    mem.mark_dirty(3 * 4096, 10)
    assert mem.log.dirty_pages() == [3]


def test_read_only_log_refused() -> None:
    with pytest.raises(ValueError, match="writable"):
        DirtyLog(memoryview(bytes(8)))
