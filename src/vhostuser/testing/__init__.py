"""A test kit for other people's vhost-user back-ends.

* :class:`BackendProcess` starts a back-end command with ``{socket}`` where it must listen,
  restarts it, notices its death and stops it;
* :mod:`vhostuser.testing.checks` is the conformance suite (``vhost-user check``): each
  check has an id, a one-line meaning and a reference to the spec, and ends PASS, FAIL
  with a reason, or SKIP with a reason;
* :mod:`vhostuser.testing.plugin` is a pytest plugin (registered as ``vhostuser``) with
  fixtures to start a back-end, connect a front-end, allocate guest memory and send frames
  or block requests, and the suite as parametrized tests::

      pytest --pyargs vhostuser.testing --vhost-backend 'CMD ... {socket} ...' \\
          --vhost-device net

The plugin does nothing unless ``--vhost-backend`` is given.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .backend import BackendProcess, BackendStartError
    from .checks import all_checks, run_check, run_checks, select_checks, summary
    from .outcome import CheckFailed, CheckSkipped, Outcome, Result
    from .registry import Check, Ctx
    from .rig import VQ, Rig, Session

_WHERE = {
    "BackendProcess": "backend", "BackendStartError": "backend",
    "all_checks": "checks", "run_check": "checks", "run_checks": "checks",
    "select_checks": "checks", "summary": "checks",
    "CheckFailed": "outcome", "CheckSkipped": "outcome", "Outcome": "outcome",
    "Result": "outcome", "Check": "registry", "Ctx": "registry",
    "VQ": "rig", "Rig": "rig", "Session": "rig",
}

__all__ = [
    "VQ",
    "BackendProcess",
    "BackendStartError",
    "Check",
    "CheckFailed",
    "CheckSkipped",
    "Ctx",
    "Outcome",
    "Result",
    "Rig",
    "Session",
    "all_checks",
    "run_check",
    "run_checks",
    "select_checks",
    "summary",
]


def __getattr__(name: str) -> Any:
    """Import the kit's parts on first use: the pytest plugin loads this package in every
    pytest run, and should cost nothing there unless asked for."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
