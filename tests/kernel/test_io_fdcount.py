"""Kernel tests for io/fdcount.py: the leak-check snapshots other kernel tests rely on."""

from __future__ import annotations

import mmap
import os
import threading

from vhostuser.io.fdcount import Snapshot, snapshot


def test_unchanged_snapshot_has_empty_diff() -> None:
    a = snapshot()
    b = snapshot()
    assert a.fd_count == len(a.fd_targets) > 0
    assert a.maps_count > 0
    assert a.threads >= 1
    assert b.diff(a, maps_slack=4) == ""


def test_new_fd_is_named_in_the_diff() -> None:
    before = snapshot()
    fd = os.eventfd(0)
    try:
        after = snapshot()
    finally:
        os.close(fd)
    assert after.fd_count == before.fd_count + 1
    assert "fds" in after.diff(before)
    assert "+1: anon_inode:[eventfd]" in after.diff(before)
    assert before.diff(after) == ""  # shrinking is not a leak
    assert snapshot().diff(before, maps_slack=4) == ""


def test_shared_mapping_is_tracked_exactly() -> None:
    fd = os.memfd_create("fdcount-probe")
    os.ftruncate(fd, mmap.PAGESIZE)
    before = snapshot()
    mm = mmap.mmap(fd, mmap.PAGESIZE)  # MAP_SHARED by default
    try:
        during = snapshot()
    finally:
        mm.close()
        os.close(fd)
    assert len(during.shared_maps) == len(before.shared_maps) + 1
    assert any("rw-s /memfd:fdcount-probe" in m for m in during.shared_maps)
    assert "shared mappings" in during.diff(before)


def test_threads_are_counted() -> None:
    before = snapshot()
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        during = snapshot()
    finally:
        stop.set()
        t.join()
    assert during.threads == before.threads + 1
    assert f"threads {before.threads} -> {during.threads}" in during.diff(before, maps_slack=99)


def test_maps_slack() -> None:
    base = Snapshot(fd_count=0, fd_targets=(), maps_count=100, shared_maps=(), threads=1)
    more = Snapshot(fd_count=0, fd_targets=(), maps_count=103, shared_maps=(), threads=1)
    assert more.diff(base) == "mappings 100 -> 103"
    assert more.diff(base, maps_slack=3) == ""
