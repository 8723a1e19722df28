"""``vhost-user check`` against other people's back-ends: DPDK's vhost PMD (testpmd, io
forwarding, one port: it sends frames back) and qemu-storage-daemon's vhost-user-blk export.

Each run must complete (a generous guard, not a speed limit), report a result with a
reason for every check by id, and pass the checks any working back-end passes (the
handshake and the data path), so that a broken kit cannot hide behind the peers'
failures. The scores go to a JSON file (``$VHOSTUSER_CHECK_SCORES``, default
``/tmp/vhost-user-check-scores.json``), merged with those of our back-ends written by
tests/kernel/test_check_ours.py, for the README's table.

In CI (CI=true) these tests must run: a missing peer fails them (``require_peer``).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.check_scores import record_score

from . import peers

pytestmark = pytest.mark.interop

HANG_GUARD = 900.0
"""Seconds after which a run counts as hung (DPDK's takes well under a minute)."""



def run_check(command: str, device: str) -> dict[str, Any]:
    """``vhost-user check COMMAND --device DEVICE --json``; the JSON document.

    The exit status is 0 (all passed) or 1 (some failed); anything else is a failure of
    the run itself.
    """
    r = subprocess.run([sys.executable, "-m", "vhostuser.cli.main", "check", command,
                        "--device", device, "--json"],
                       capture_output=True, text=True, timeout=HANG_GUARD, check=False)
    assert r.returncode in (0, 1), f"status {r.returncode}\n{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    doc: dict[str, Any] = json.loads(r.stdout)
    print(r.stderr)  # the progress lines, shown with -s or on failure
    return doc


def listed_ids() -> set[str]:
    """Every check id ``vhost-user check --list`` names."""
    r = subprocess.run([sys.executable, "-m", "vhostuser.cli.main", "check", "--list"],
                       capture_output=True, text=True, timeout=120, check=True)
    return {line.split()[0] for line in r.stdout.splitlines() if line and not line[0].isspace()}


def assert_complete(doc: dict[str, Any], device: str, must_pass: list[str]) -> None:
    """Every check reported once, with a reason unless it passed; the basics passed."""
    got = {r["id"]: r for r in doc["results"]}
    assert len(got) == len(doc["results"]), "a check reported twice"
    assert set(got) == listed_ids(), f"{device}: not every check was reported"
    for r in doc["results"]:
        assert r["outcome"] in ("PASS", "FAIL", "SKIP"), r
        if r["outcome"] != "PASS":
            assert r["reason"], f"{r['id']} {r['outcome']} without a reason"
    counts = doc["summary"]
    assert counts["passed"] + counts["failed"] + counts["skipped"] == len(got)
    broken = [f"{c}: {got[c]['outcome']} {got[c]['reason']}" for c in must_pass
              if got[c]["outcome"] != "PASS"]
    assert not broken, "\n".join(broken)
    start_failures = [r["id"] for r in doc["results"] if "could not be started" in r["reason"]]
    assert not start_failures, start_failures


def test_check_dpdk_vhost_pmd() -> None:
    peers.require_peer("testpmd")
    prefix = f"vhu{os.getpid()}chk"
    cpu = sorted(os.sched_getaffinity(0))[-1]
    command = shlex.join([
        shutil.which("dpdk-testpmd") or "dpdk-testpmd", "--no-pci", "--lcores",
        f"0@{cpu},1@{cpu}", "--file-prefix", prefix, "--no-huge", "-m", "256",
        "--no-shconf", "--vdev", "net_vhost0,iface={socket},queues=1", "--",
        "--nb-cores=1", "--total-num-mbufs=16384", "--forward-mode=io", "--auto-start",
    ])
    try:
        doc = run_check(command, "net")
    finally:
        shutil.rmtree(peers._dpdk_runtime_dir(prefix), ignore_errors=True)
    # NET-01 is not required here: in one of a handful of runs DPDK 22.11 handed back 32 used
    # entries, all id 0, for a single transmit buffer (seen on this 2-CPU machine under
    # load; not understood yet), and the kit reports that as the failure it is.
    # MIG-01 is not required either: it fails on the same DPDK anomaly when it strikes (a
    # burst of 32 used entries past the available index, the extra ones id 0), which the
    # kit reports as the ring violation it is; its dirty logging of split rings, the check's
    # point, marks every page written (tests/interop/test_frontend_migrate.py).
    assert_complete(doc, "net", ["HS-01", "HS-05", "ACK-01", "MEM-01", "RING-01", "RING-03",
                                 "DESC-01", "NET-02", "RC-01", "RC-02", "MIG-02"])
    record_score("dpdk-vhost-pmd", command, doc)


def test_check_qemu_storage_daemon(sock_dir: Path) -> None:
    peers.require_peer("qemu-storage-daemon")
    image = peers.make_raw_image(sock_dir / "disk.raw", 64 << 20)
    command = shlex.join([
        shutil.which("qemu-storage-daemon") or "qemu-storage-daemon",
        "--blockdev", f"driver=file,node-name=file0,filename={image},cache.direct=off",
        "--export", "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,"
                    "addr.path={socket},writable=on,num-queues=1,logical-block-size=512",
    ])
    doc = run_check(command, "blk")
    assert_complete(doc, "blk", ["HS-01", "HS-05", "ACK-01", "MEM-01", "RING-01", "RING-03",
                                 "DESC-01", "BLK-01", "BLK-05", "RC-01", "RC-02", "MIG-01",
                                 "MIG-02"])
    record_score("qemu-storage-daemon", command, doc)
