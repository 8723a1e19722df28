"""``vhost-user demo``, run as the README runs it: the VM demo, its Python front-end
fallback and ``--probe``; each must succeed and leave no QEMU, socket or tap behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .peers import require_peer

pytestmark = pytest.mark.interop

COUNT = 3
_SOCKET_DIR_RE = re.compile(r"switch: ports vm1 \((/tmp/vhost-user-demo-[^/]+)/vm1\.sock\)")
_TAP_RE = re.compile(r"host \(tap (\S+), ")


def _demo(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "vhostuser.cli.main", "demo", *args],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        check=False,
    )
    print(proc.stdout[-6000:], proc.stderr[-3000:], sep="\n")
    return proc


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def _check_clean(stdout: str) -> None:
    m = _SOCKET_DIR_RE.search(stdout)
    assert m is not None, "demo did not print its switch ports"
    assert not Path(m[1]).exists(), f"{m[1]} left behind"
    assert _processes_mentioning(m[1]) == []
    tap = _TAP_RE.search(stdout)
    if tap is not None:
        assert not Path("/sys/class/net", tap[1]).exists(), f"tap {tap[1]} left behind"


def _check_pings(stdout: str) -> None:
    assert "all pings answered" in stdout
    for pair in ("vm1 -> vm2", "vm2 -> vm1"):
        assert re.search(rf"{pair}\s+{COUNT}/{COUNT} replies", stdout), pair
    if _TAP_RE.search(stdout):
        assert re.search(rf"vm1 -> host\s+{COUNT}/{COUNT} replies", stdout)
    assert "=== switch counters" in stdout


def test_demo_with_two_vms() -> None:
    """The README's first command: two QEMU guests and the host ping each other."""
    require_peer("qemu")
    require_peer("guest")
    proc = _demo("--count", str(COUNT), "--quiet")
    assert proc.returncode == 0
    assert "two tiny VMs (QEMU, TCG)" in proc.stdout
    _check_pings(proc.stdout)
    _check_clean(proc.stdout)


def test_demo_with_python_frontends() -> None:
    """Without QEMU (forced with --python) the same pings run between Python front-ends."""
    proc = _demo("--python", "--count", str(COUNT))
    assert proc.returncode == 0
    assert "two Python front-ends" in proc.stdout
    _check_pings(proc.stdout)
    _check_clean(proc.stdout)


def test_demo_probe() -> None:
    """--probe keeps the older demo: live back-ends started here and probed."""
    proc = _demo("--probe", timeout=180)
    assert proc.returncode == 0
    assert "=== vhostuser null-net back-end (this project)" in proc.stdout
    assert proc.stdout.rstrip().endswith("done")
