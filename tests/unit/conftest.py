"""Fixtures for the sans-IO core tests (fakes of the I/O shell are in fakes.py)."""

from __future__ import annotations

import pytest

from . import fakes


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
