"""vhost-user-blk back-ends compared: ours against qemu-storage-daemon, back to back.

Not a test. For each of 4 KiB randread and randwrite at queue depth 1 and 32, both
back-ends serve the same kind of image (a raw file of --size bytes in --dir, filled with the
same data), and our blk front-end (``vhost-user blkbench``'s runner, in this process) drives
each for --time seconds, ours first then qsd or the other way round, alternating. Prints
IOPS, MB/s and latency percentiles of both, the ratio ours/qsd, and the machine. The
front-end is the same Python code for both, so the ratio compares the back-ends under the
same (Python) driver; it is not what a guest kernel would see.

    PYTHONPATH=src python benchmarks/blk_bench.py
    PYTHONPATH=src python benchmarks/blk_bench.py --time 10 --size 1g --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

try:
    import vhostuser  # noqa: F401
except ImportError:  # running from a checkout without PYTHONPATH=src
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe_machine

from vhostuser.cli.blkbench import BenchResult, Runner, open_frontend, parse_size

CASES = [("randread", 1), ("randread", 32), ("randwrite", 1), ("randwrite", 32)]
SRC = str(Path(__file__).resolve().parent.parent / "src")


def fill_image(path: Path, size: int) -> None:
    """Write ``size`` bytes of a fixed pseudo-random pattern (not a sparse file)."""
    chunk = bytes((i * 131 + 7) & 0xFF for i in range(1 << 20))
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, len(chunk))
            f.write(chunk[:n])
            left -= n


@contextlib.contextmanager
def backend(kind: str, image: Path, sock: Path, queues: int) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``ours`` or ``qsd`` on ``image`` at ``sock``; stop it afterwards."""
    if kind == "ours":
        env = dict(os.environ)
        env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
        argv = [sys.executable, "-m", "vhostuser.cli.main", "blk", "--image", str(image),
                "--socket", str(sock), "--queues", str(queues)]
    else:
        env = None
        argv = [
            shutil.which("qemu-storage-daemon") or "qemu-storage-daemon",
            "--blockdev",
            f"driver=file,node-name=file0,filename={image},cache.direct=off",
            "--export",
            f"type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={sock},"
            f"writable=on,num-queues={queues},logical-block-size=512",
        ]
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"{kind} did not start: {err}")
            time.sleep(0.02)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def measure(kind: str, image: Path, sock: Path, rw: str, depth: int, seconds: float,
            size: int) -> BenchResult:
    """One blkbench run against a freshly started back-end."""
    with backend(kind, image, sock, 1):
        disk = open_frontend(str(sock), bs=4096, iodepth=depth, queues=1, timeout=20.0)
        try:
            runner = Runner(disk, rw=rw, bs=4096, iodepth=depth, region=min(size, disk.capacity),
                            seed=1, progress=None)
            runner.run(min(1.0, seconds / 5))  # warm-up: page cache, import paths
            runner = Runner(disk, rw=rw, bs=4096, iodepth=depth,
                            region=min(size, disk.capacity), seed=2, progress=None)
            return runner.run(seconds)
        finally:
            disk.close()


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; returns the exit status."""
    p = argparse.ArgumentParser(
        description="Compare our vhost-user-blk back-end with qemu-storage-daemon: 4 KiB "
                    "randread and randwrite at queue depth 1 and 32, back to back, with "
                    "our blk front-end; prints both, the ratio and the machine.")
    p.add_argument("--time", type=float, default=5.0, metavar="SECONDS",
                   help="seconds per run (default 5)")
    p.add_argument("--size", type=parse_size, default=256 << 20, metavar="SIZE",
                   help="image size (default 256m)")
    p.add_argument("--dir", default=None, metavar="DIR",
                   help="where to put the two images (default: a temporary directory in "
                        "/var/tmp, a disk file system)")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="runs per case and back-end; the best is reported (default 1)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    if shutil.which("qemu-storage-daemon") is None:
        print("qemu-storage-daemon is not installed (scripts/install-peers.sh)", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="vhu-blkbench-", dir=args.dir or "/var/tmp"))
    sock_dir = Path(tempfile.mkdtemp(prefix="vhu-bb-", dir="/tmp"))
    rows = []
    try:
        images = {k: base / f"{k}.raw" for k in ("ours", "qsd")}
        for img in images.values():
            fill_image(img, args.size)
        order = ["ours", "qsd"]
        for rw, depth in CASES:
            best: dict[str, BenchResult] = {}
            for _ in range(args.repeat):
                for kind in order:
                    r = measure(kind, images[kind], sock_dir / f"{kind}.sock", rw, depth,
                                args.time, args.size)
                    if kind not in best or r.iops > best[kind].iops:
                        best[kind] = r
                order.reverse()  # alternate who goes first
            rows.append((rw, depth, best["ours"], best["qsd"]))
            if not args.json:
                o, q = best["ours"], best["qsd"]
                print(f"{rw:9} qd{depth:<3} ours {o.iops:9.0f} IOPS  qsd {q.iops:9.0f} IOPS  "
                      f"ratio {o.iops / q.iops:5.2f}   p50/p99 us ours {o.lat_p50_us:.0f}/"
                      f"{o.lat_p99_us:.0f}  qsd {q.lat_p50_us:.0f}/{q.lat_p99_us:.0f}",
                      flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(sock_dir, ignore_errors=True)
    machine = describe_machine()
    if args.json:
        print(json.dumps({
            "machine": machine, "seconds": args.time, "size": args.size,
            "results": [{"rw": rw, "iodepth": d, "ours": asdict(o), "qsd": asdict(q),
                         "ratio_iops": round(o.iops / q.iops, 3)}
                        for rw, d, o, q in rows],
        }, indent=2))
    else:
        print(f"\n{'case':14} {'ours IOPS':>10} {'qsd IOPS':>10} {'ratio':>6} "
              f"{'ours MB/s':>10} {'qsd MB/s':>9}")
        for rw, d, o, q in rows:
            print(f"{rw + ' qd' + str(d):14} {o.iops:10.0f} {q.iops:10.0f} "
                  f"{o.iops / q.iops:6.2f} {o.mb_per_s:10.1f} {q.mb_per_s:9.1f}")
        print(f"\n4 KiB requests, {args.time:g} s per run, {args.size >> 20} MiB raw images "
              f"(page cache), one queue, driven by our Python front-end.")
        print(f"machine: {machine}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
