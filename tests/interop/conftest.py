"""Fixtures for the tests that drive real peers (QEMU, DPDK testpmd, qemu-storage-daemon).

``peers.py`` beside this file is the harness. It is registered as the module ``peers``
by path, so test modules can ``import peers`` under any pytest import mode without a
package ``__init__`` or ``sys.path`` edits.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


def _load_peers() -> None:
    if "peers" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location("peers", Path(__file__).with_name("peers.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["peers"] = module
    spec.loader.exec_module(module)


_load_peers()

import peers  # noqa: E402  (registered just above)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A fresh directory with a short path under /tmp for unix sockets, removed afterwards.

    pytest's ``tmp_path`` can push an AF_UNIX path past its 108-byte limit.
    """
    with peers.short_tmpdir("vhu-t-") as path:
        yield path
