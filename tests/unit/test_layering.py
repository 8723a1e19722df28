"""The sans-IO rule: the pure layers do no I/O, import nothing from io/, read no clock.

Pure: protocol/, connection/, virtq/, devices/, memory.py, errors.py and the switch's
forwarding fabric (switch/fabric.py). Applications over the shell (io/, cli/, frontends/,
the rest of switch/) may do anything. Imports are resolved, so ``from ..io import x`` is
caught like ``from vhostuser.io import x``.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "vhostuser"
PURE_DIRS = ("protocol", "connection", "virtq", "devices", "virtio")
PURE_FILES = ("memory.py", "errors.py", "switch/fabric.py")
FORBIDDEN_MODULES = {"socket", "selectors", "asyncio", "mmap", "select", "fcntl", "time",
                     "datetime", "subprocess"}
# (threading is allowed: virtq/barrier.py makes the full barrier from a Lock.)
FORBIDDEN_PACKAGES = {"vhostuser.io", "vhostuser.cli", "vhostuser.frontends",
                      "vhostuser.switch.core", "vhostuser.switch.ports"}
FORBIDDEN_CALLS = {("os", "read"), ("os", "write"), ("os", "close"), ("os", "open")}


def _pure_files() -> list[Path]:
    out = [p for d in PURE_DIRS for p in (SRC / d).rglob("*.py")]
    out += [SRC / f for f in PURE_FILES]
    return out


def _module_of(path: Path) -> list[str]:
    rel = path.relative_to(SRC).with_suffix("")
    parts = ["vhostuser", *rel.parts]
    return parts[:-1] if parts[-1] == "__init__" else parts


def _resolve(path: Path, node: ast.ImportFrom) -> list[str]:
    """Absolute module names an ImportFrom brings in (``from .. import io`` -> the
    package and ``vhostuser.io``)."""
    if node.level == 0:
        base = node.module or ""
    else:
        pkg = _module_of(path)
        if path.name != "__init__.py":
            pkg = pkg[:-1]
        up = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(up + ([node.module] if node.module else []))
    return [base] + [f"{base}.{a.name}" for a in node.names]


def offenders_in(path: Path, source: str) -> list[str]:
    """Every forbidden import, clock read or syscall in ``source`` (a file at ``path``)."""
    found: list[str] = []
    tree = ast.parse(source, str(path))
    for node in ast.walk(tree):
        names: list[str] = []
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = _resolve(path, node)
        for n in names:
            if n.split(".")[0] in FORBIDDEN_MODULES or any(
                    n == p or n.startswith(p + ".") for p in FORBIDDEN_PACKAGES):
                found.append(f"{path.name}:{line} imports {n}")
                break  # one finding per import statement
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and (node.func.value.id, node.func.attr) in FORBIDDEN_CALLS):
            found.append(f"{path.name}:{line} {node.func.value.id}.{node.func.attr}()")
    return found


def test_pure_layers_exist() -> None:
    names = {p.relative_to(SRC).as_posix() for p in _pure_files()}
    assert {"memory.py", "protocol/framing.py", "connection/backend.py", "virtq/runner.py",
            "devices/net.py", "switch/fabric.py"} <= names


def test_no_io_outside_shell() -> None:
    offenders = [o for p in _pure_files() for o in offenders_in(p, p.read_text())]
    assert offenders == [], offenders


def test_the_check_catches_relative_io_imports_and_clock_reads() -> None:
    """The rule has teeth: what the old check missed is caught."""
    fake = SRC / "devices" / "example.py"
    bad = ("from ..io.backend import BackendServer\nfrom .. import io\nimport time\n"
           "from time import monotonic\nimport os\nos.write(1, b'x')\n")
    got = offenders_in(fake, bad)
    assert any("vhostuser.io.backend" in o for o in got)
    assert any(o.endswith("imports vhostuser.io") for o in got)
    assert sum("imports time" in o for o in got) == 2
    assert any("os.write()" in o for o in got)
    fabric = SRC / "switch" / "fabric.py"
    assert offenders_in(fabric, "from .ports import Port\n")
    assert offenders_in(fabric, "from .fabric import Member\n") == []


#: Packages that drive a back-end from the front-end side: they share virtio's definitions
#: (vhostuser.virtio) with the devices, never the devices themselves.
FRONT_END_SIDE = ("frontends", "testing")


def _device_imports(path: Path, text: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(text)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = _resolve(path, node)
        found += [f"{path.name}:{getattr(node, 'lineno', 0)} imports {n}" for n in names
                  if n == "vhostuser.devices" or n.startswith("vhostuser.devices.")]
    return found


def test_front_ends_do_not_import_devices() -> None:
    files = [p for d in FRONT_END_SIDE for p in (SRC / d).rglob("*.py")]
    assert files
    offenders = [o for p in files for o in _device_imports(p, p.read_text())]
    assert offenders == [], offenders
    # and the check has teeth
    fake = SRC / "frontends" / "example.py"
    assert _device_imports(fake, "from ..devices.net import NET_HDR_MRG\n")
    assert _device_imports(fake, "from ..virtio.net import NET_HDR_MRG\n") == []
