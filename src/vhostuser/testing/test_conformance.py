"""The conformance suite as pytest tests, one per check (see :mod:`vhostuser.testing.plugin`)::

    pytest --pyargs vhostuser.testing --vhost-backend 'CMD ... {socket} ...' --vhost-device net

Without ``--vhost-backend`` the single test here is skipped, saying how to run it.
"""

from __future__ import annotations

import pytest

from vhostuser.testing.plugin import run_conformance_check
from vhostuser.testing.registry import Check


def test_conformance(vhost_check: Check | None, request: pytest.FixtureRequest) -> None:
    """One conformance check against the back-end of ``--vhost-backend``."""
    run_conformance_check(vhost_check, request)
