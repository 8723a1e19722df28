"""DESIGN.md rule 1: only io/ and cli/ do I/O."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "vhostuser"
FORBIDDEN_MODULES = {"socket", "selectors", "asyncio", "mmap", "select", "fcntl"}
FORBIDDEN_CALLS = {("os", "read"), ("os", "write"), ("os", "close"), ("os", "open")}


def _pure_files() -> list[Path]:
    return [
        p for p in SRC.rglob("*.py")
        if p.relative_to(SRC).parts[0] not in ("io", "cli")
    ]


def test_pure_layers_exist() -> None:
    names = {p.relative_to(SRC).as_posix() for p in _pure_files()}
    assert "memory.py" in names
    assert "protocol/framing.py" in names
    assert "connection/backend.py" in names


def test_no_io_outside_shell() -> None:
    offenders: list[str] = []
    for path in _pure_files():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] in FORBIDDEN_MODULES:
                        offenders.append(f"{path.name}:{node.lineno} import {a.name}")
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.split(".")[0] in FORBIDDEN_MODULES:
                    offenders.append(f"{path.name}:{node.lineno} from {node.module}")
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and (node.func.value.id, node.func.attr) in FORBIDDEN_CALLS
            ):
                offenders.append(f"{path.name}:{node.lineno} {node.func.value.id}."
                                 f"{node.func.attr}()")
    assert offenders == [], offenders
