"""``vhost-user demo``: start live back-ends on this machine and probe each of them.

Until the switch and the VM demo exist, this is the main job of the README's first
command: it starts our own back-end, and qemu-storage-daemon and DPDK testpmd's vhost
back-end where they are installed, then probes each as a front-end would.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from .probe import _print_text, probe


def _wait_socket(path: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise RuntimeError(f"peer exited with status {proc.returncode} before {path} appeared")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _peers(tmp: str) -> list[tuple[str, list[str], str, dict[str, Any]]]:
    peers: list[tuple[str, list[str], str, dict[str, Any]]] = []
    ours = os.path.join(tmp, "ours.sock")
    peers.append((
        "vhostuser null-net back-end (this project)",
        [sys.executable, "-m", "vhostuser.cli.main", "serve", "--socket", ours],
        ours, {},
    ))
    qsd = shutil.which("qemu-storage-daemon")
    if qsd:
        img = os.path.join(tmp, "disk.raw")
        with open(img, "wb") as f:
            f.truncate(64 << 20)
        sock = os.path.join(tmp, "qsd.sock")
        peers.append((
            "qemu-storage-daemon vhost-user-blk export (64 MiB raw image)",
            [qsd, "--blockdev",
             f"driver=file,node-name=file0,filename={img},cache.direct=off",
             "--export",
             f"type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={sock},"
             "writable=on,num-queues=1,logical-block-size=512"],
            sock, {},
        ))
    testpmd = shutil.which("dpdk-testpmd")
    if testpmd:
        sock = os.path.join(tmp, "dpdk.sock")
        peers.append((
            "DPDK testpmd net_vhost back-end",
            [testpmd, "--no-pci", "--lcores", "0@0,1@0", "--file-prefix", f"demo{os.getpid()}",
             "--no-huge", "-m", "256", "--no-shconf", "--vdev", f"net_vhost0,iface={sock}",
             "--", "--nb-cores=1", "--total-num-mbufs=16384", "--forward-mode=io",
             "--auto-start", "--stats-period=0"],
            sock, {"stdin": subprocess.PIPE},
        ))
    return peers


def run(args: argparse.Namespace) -> int:
    """Entry point of ``vhost-user demo``."""
    failures = 0
    with tempfile.TemporaryDirectory(prefix="vhost-user-demo-") as tmp:
        peers = _peers(tmp)
        if len(peers) == 1:
            print("qemu-storage-daemon and dpdk-testpmd are not installed; run "
                  "scripts/install-peers.sh to probe them too.\n")
        for title, cmd, sock, kw in peers:
            print(f"=== {title}")
            log = open(os.path.join(tmp, "peer.log"), "wb")  # noqa: SIM115
            env = dict(os.environ)
            src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, **kw)
            try:
                _wait_socket(sock, proc)
                r = probe(sock, connect_timeout=10.0)
                _print_text(r)
            except Exception as e:  # report and go on with the next peer
                failures += 1
                print(f"probe failed: {e}")
            finally:
                _stop(proc)
                log.close()
            print()
    print("done" if not failures else f"{failures} probe(s) failed")
    return 1 if failures else 0


def add_parser(sub: Any) -> None:
    """Register ``demo`` on the top-level subparsers."""
    p: argparse.ArgumentParser = sub.add_parser(
        "demo",
        help="start live back-ends here and probe each one",
        description=(
            "Start our own back-end, and qemu-storage-daemon and DPDK testpmd where they "
            "are installed, each on a socket in a temporary directory; probe each one as a "
            "front-end and print what it offers; stop them all."
        ),
    )
    p.set_defaults(func=run)
