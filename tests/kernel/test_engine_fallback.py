"""Engine selection, and a machine without a C compiler: the package installs and runs the
pure-Python engine (the build of the compiled one is optional)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from vhostuser import engine as engines
from vhostuser.io.reactor import Reactor
from vhostuser.switch import Switch

ROOT = Path(__file__).resolve().parents[2]


def test_select_follows_flag_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(engines.ENV, "python")
    assert engines.select() == "python"
    assert engines.select("auto") in ("python", "compiled")
    monkeypatch.setenv(engines.ENV, "turbo")
    with pytest.raises(engines.EngineUnavailableError, match=r"\$VHOSTUSER_ENGINE='turbo'"):
        engines.select()
    with pytest.raises(engines.EngineUnavailableError, match=r"--engine='fast'"):
        engines.select("fast")


def test_compiled_asked_for_but_not_built(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engines, "compiled", lambda: None)
    monkeypatch.delenv(engines.ENV, raising=False)
    assert engines.select() == "python"
    with pytest.raises(engines.EngineUnavailableError, match="gcc python3-dev"):
        engines.select("compiled")
    with Reactor() as r, pytest.raises(ValueError, match="not built"):
        Switch(r, engine="compiled")


def test_in_ci_the_compiled_engine_is_built() -> None:
    if os.environ.get("CI") != "true" and engines.compiled() is None:
        pytest.skip("compiled engine not built here (gcc and python3-dev, then setup.sh)")
    assert engines.compiled() is not None
    assert engines.select() == "compiled"


def test_without_a_compiler_the_package_installs_with_the_python_engine(
        tmp_path: Path) -> None:
    """``pip install`` with a C compiler that fails: a wheel without the extension, which
    imports, picks the python engine, and refuses ``compiled`` with a clear message."""
    src = tmp_path / "src-tree"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", "*.egg-info"))
    env = dict(os.environ, CC="false", LDSHARED="false")
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheels), str(src)],
        env=env, capture_output=True, text=True, timeout=300, check=False)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = wheels.glob("vhostuser-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "vhostuser/engine.py" in names
    assert not any(n.endswith(".so") for n in names), names
    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(target)
    probe = ("import os, vhostuser.engine as e, vhostuser.switch\n"
             "print(e.select())\n"
             "try:\n    e.select('compiled')\nexcept e.EngineUnavailableError as x:\n"
             "    print('refused:', x)\n")
    run = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, "
                          f"{str(target)!r})\n" + probe],
                         env={k: v for k, v in os.environ.items() if k != engines.ENV},
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "python"
    assert lines[1].startswith("refused: --engine=compiled: the compiled engine")
