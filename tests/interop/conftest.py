"""Fixtures for the tests that drive real peers (QEMU, DPDK testpmd, qemu-storage-daemon).

The harness is peers.py beside this file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from . import peers


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A fresh directory with a short path under /tmp for unix sockets, removed afterwards.

    pytest's ``tmp_path`` can push an AF_UNIX path past its 108-byte limit.
    """
    with peers.short_tmpdir("vhu-t-") as path:
        yield path
