"""Which burst engine runs: the compiled one (``vhostuser._fastpath``) or pure Python.

The compiled engine is built by ``pip install`` when a C compiler and Python's headers are
present. It replaces the per-frame work of a net transmit burst (switched straight into
the receivers' rings, split or packed) and the per-request work of a blk request queue
(reads and writes straight between the image and guest memory); for every buffer it does
not handle it stops and the Python engine carries on in the same burst, so both engines
give the same ring states, bytes and counters. Chosen automatically (compiled when built),
forced with the environment variable ``VHOSTUSER_ENGINE=python|compiled`` or a command's
``--engine`` (``vhost-user switch``, ``vhost-user blk``).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Final

__all__ = ["ENGINES", "ENV", "EngineUnavailableError", "compiled", "select"]

ENV: Final = "VHOSTUSER_ENGINE"
ENGINES: Final = ("auto", "python", "compiled")


class EngineUnavailableError(ValueError):
    """The compiled engine was asked for but is not built (or an unknown name was given)."""


def compiled() -> ModuleType | None:
    """The compiled engine module, or None when it was not built."""
    try:
        return importlib.import_module("vhostuser._fastpath")
    except ImportError:
        return None


def select(name: str | None = None) -> str:
    """Resolve an engine choice to ``"python"`` or ``"compiled"``.

    ``name`` (a command's ``--engine``) wins over ``$VHOSTUSER_ENGINE``; ``auto`` (the
    default) means compiled when built, else python.

    Raises:
        EngineUnavailableError: an unknown name, or ``compiled`` when it is not built
            (the message says where the choice came from and how to build it).
    """
    source = "--engine"
    if name is None:
        name = os.environ.get(ENV) or "auto"
        source = f"${ENV}"
    name = name.strip().lower()
    if name not in ENGINES:
        raise EngineUnavailableError(
            f"{source}={name!r}: the engine must be one of {', '.join(ENGINES)}")
    have = compiled() is not None
    if name == "compiled" and not have:
        raise EngineUnavailableError(
            f"{source}=compiled: the compiled engine (vhostuser._fastpath) is not built; "
            "install a C compiler and Python's headers (Debian: gcc python3-dev) and "
            "reinstall the package, or use the python engine")
    if name == "auto":
        return "compiled" if have else "python"
    return name
