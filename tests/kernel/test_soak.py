"""scripts/soak.py, short: two net front-ends through a switch process that is SIGKILLed
and restarted every couple of seconds. The script checks that frames are lost only in
the outage windows, that each front-end reconnects once per kill, and that the fd and
mapping counts of its process stay flat; here it runs for about 20 seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOAK = ROOT / "scripts" / "soak.py"


def _run(*args: str, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.run([sys.executable, str(SOAK), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_soak_kills_the_switch_and_every_check_holds() -> None:
    r = _run("--seconds", "20", "--kill-every", "2", "--rate", "1000", "--progress", "2",
             "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    assert rep["violations"] == []
    assert rep["kills"] >= 3, rep
    assert rep["switch_starts"] == rep["kills"] + 1
    for name in ("a->b", "b->a"):
        s = rep["streams"][name]
        assert s["lost_outside_outages"] == 0 and s["duplicates"] == 0, s
        assert s["received"] > 0
    for fe in rep["frontends"].values():
        assert fe["reconnects"] == rep["kills"] and fe["outage_seconds"] > 0
    assert rep["fds"]["start"] == rep["fds"]["end"]
    # progress lines while it runs, on stderr with --json
    progress = [line for line in r.stderr.splitlines() if line.startswith("[")]
    assert len(progress) >= 5 and "reconnects a" in progress[-1], r.stderr
    assert r.stderr.rstrip().endswith("soak: OK")


def test_soak_help_and_usage_errors() -> None:
    h = _run("--help", timeout=60)
    assert h.returncode == 0
    for word in ("SIGKILL", "outage window", "--minutes", "--seconds", "exit status"):
        assert word in h.stdout, word
    bad = _run("--seconds", "0", timeout=60)
    assert bad.returncode == 2 and "--seconds: 0: must be greater than 0" in bad.stderr
    bad = _run("--size", "20", timeout=60)
    assert bad.returncode == 2 and "--size 20 is outside 60..1514" in bad.stderr
