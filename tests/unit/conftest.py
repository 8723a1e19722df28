"""Fixtures for the sans-IO core tests.

``fakes.py`` beside this file is loaded by path and registered as the module ``fakes``
before any test module here is imported, so the tests can ``import fakes`` whatever
pytest's import mode is, with no package ``__init__`` and no ``sys.path`` edits.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


def _load_fakes() -> None:
    if "fakes" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location("fakes", Path(__file__).with_name("fakes.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fakes"] = module
    spec.loader.exec_module(module)


_load_fakes()

import fakes  # noqa: E402  (registered just above)


@pytest.fixture
def host() -> fakes.FakeHost:
    """A fresh fake shell host."""
    return fakes.FakeHost()


@pytest.fixture
def fd_source() -> fakes.FdSource:
    """Unique integer fd tokens."""
    return fakes.FdSource()


@pytest.fixture
def stub_factory() -> fakes.StubRingFactory:
    """A ring factory building stub engines."""
    return fakes.StubRingFactory()
