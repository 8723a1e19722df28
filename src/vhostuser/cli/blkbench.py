"""``vhost-user blkbench``: measure any vhost-user-blk back-end from our own blk front-end."""

from __future__ import annotations

import argparse
import json
import os
import random
import struct
import sys
import time
from array import array
from dataclasses import asdict, dataclass
from typing import Any, TextIO

from ..errors import VhostUserError
from ..frontends.blk import BlkOp, VirtioBlkFrontend
from ._common import add_wait, announce_wait, connect_error, positive, seconds

PATTERNS = ("read", "write", "randread", "randwrite")

EPILOG = """\
examples:
  vhost-user blkbench /tmp/blk.sock                                  # 4k randread, qd 1, 5 s
  vhost-user blkbench /tmp/blk.sock --rw randwrite --bs 4k --iodepth 32 --time 10
  vhost-user blkbench /tmp/blk.sock --rw write --bs 1m --size 256m --verify
  vhost-user blkbench /tmp/blk.sock --json > result.json

Latency is measured from submitting a request to reaping its completion in this process
(Python included). MB/s counts 10^6 bytes. Writes overwrite the disk's contents.

When the back-end goes away mid-run, blkbench waits up to --reconnect seconds for a new one
on SOCKET, hands it the requests that were in flight (INFLIGHT_SHMFD) and goes on; the
result counts the reconnects and the time without a back-end. A back-end that comes back
without a feature the session was built on ends the run at once, naming it.
"""


def parse_size(text: str) -> int:
    """Parse ``4096``, ``4k``, ``1m``, ``2g`` (binary units).

    Raises:
        argparse.ArgumentTypeError: not a size.
    """
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = 1
    for suffix, m in (("k", 1 << 10), ("m", 1 << 20), ("g", 1 << 30), ("t", 1 << 40)):
        if t.endswith(suffix):
            t, mult = t[:-1], m
            break
    try:
        value = int(t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 4k, 1m)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return value


def add_parser(sub: Any) -> None:
    """Register ``blkbench`` on the top-level subparsers."""
    p: argparse.ArgumentParser = sub.add_parser(
        "blkbench",
        help="benchmark a vhost-user-blk back-end (IOPS, MB/s, latency percentiles)",
        description=(
            "Drive the vhost-user-blk back-end at SOCKET with our virtio-blk front-end: "
            "sequential or random reads or writes of --bs bytes with --iodepth requests in "
            "flight for --time seconds, then print IOPS, MB/s and latency percentiles. "
            "--verify writes a pattern over --size bytes, reads it back and compares."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("socket", metavar="SOCKET", help="the back-end's socket")
    p.add_argument("--rw", choices=PATTERNS, default="randread", help="access pattern")
    p.add_argument("--bs", type=parse_size, default=4096, metavar="SIZE",
                   help="bytes per request, a multiple of 512 (default 4k)")
    p.add_argument("--iodepth", type=positive(int), default=1, metavar="N",
                   help="requests in flight (default 1)")
    p.add_argument("--time", type=positive(float), default=5.0, metavar="SECONDS",
                   help="duration of the run (default 5)")
    p.add_argument("--size", type=parse_size, default=None, metavar="SIZE",
                   help="bytes of the disk to use from offset 0 (default: all of it)")
    p.add_argument("--queues", type=positive(int), default=1, metavar="N",
                   help="request queues to use if the back-end offers MQ (default 1)")
    p.add_argument("--seed", type=int, default=1, help="random seed (offsets, data)")
    p.add_argument("--verify", action="store_true",
                   help="after the run, write a pattern over --size, read it back, compare")
    p.add_argument("--packed", action="store_true",
                   help="use packed rings (VIRTIO_F_RING_PACKED; the back-end must offer it)")
    p.add_argument("--no-inflight", action="store_true",
                   help="do not negotiate INFLIGHT_SHMFD (measures the cost of tracking)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_wait(p)
    p.add_argument("--timeout", type=positive(float), default=10.0, metavar="SECONDS",
                   help="how long a request may take before the run fails (default 10)")
    p.add_argument("--reconnect", type=seconds, default=30.0, metavar="SECONDS",
                   help="when the back-end goes away, wait up to SECONDS for one to take "
                        "the disk over (default 30; 0: end the run)")
    p.set_defaults(func=run)


@dataclass(slots=True)
class BenchResult:
    """One run's numbers."""

    rw: str
    bs: int
    iodepth: int
    seconds: float
    ops: int
    bytes: int
    iops: float
    mb_per_s: float
    lat_min_us: float
    lat_mean_us: float
    lat_p50_us: float
    lat_p99_us: float
    lat_p999_us: float
    lat_max_us: float
    errors: int
    reconnects: int
    outage_seconds: float = 0.0
    """Time without a back-end (summed over the reconnects)."""
    verify_blocks: int | None = None
    verify_mismatches: int | None = None
    interrupted: bool = False
    """Stopped early by Ctrl-C: the numbers cover the time it ran."""


def percentile(sorted_ns: array[int] | list[int], q: float) -> float:
    """The ``q`` quantile (0..1) of sorted nanoseconds, in microseconds (0 if empty)."""
    n = len(sorted_ns)
    if not n:
        return 0.0
    return sorted_ns[min(n - 1, int(q * n))] / 1000.0


def _next_pow2(n: int) -> int:
    p = 1
    while p < n:
        p <<= 1
    return p


def open_frontend(path: str, *, bs: int, iodepth: int, queues: int, timeout: float,
                  packed: bool = False, inflight: bool = True,
                  connect_timeout: float = 10.0, reconnect: float = 30.0) -> VirtioBlkFrontend:
    """A front-end sized for ``iodepth`` requests of ``bs`` bytes (packed rings and
    INFLIGHT_SHMFD as asked) that waits up to ``reconnect`` seconds for a back-end that
    went away (0: not at all).

    Raises:
        VhostUserError, OSError: connecting or the handshake failed.
    """
    per_queue = max(1, -(-iodepth // queues))
    size = min(32768, max(128, _next_pow2(3 * per_queue)))
    return VirtioBlkFrontend(path, queue_size=size, depth=per_queue, num_queues=queues,
                             max_io=max(bs, 4096), timeout=timeout, packed=packed,
                             inflight=inflight, connect_timeout=connect_timeout,
                             reconnect=reconnect > 0, reconnect_timeout=reconnect)


class Runner:
    """Keeps ``iodepth`` requests in flight and records their latencies."""

    def __init__(self, disk: VirtioBlkFrontend, *, rw: str, bs: int, iodepth: int,
                 region: int, seed: int, progress: TextIO | None) -> None:
        self.disk = disk
        self.rw = rw
        self.bs = bs
        self.iodepth = iodepth
        self.blocks = region // bs
        self.rand = random.Random(seed)
        self.write = rw in ("write", "randwrite")
        self.random = rw.startswith("rand")
        self.payload = self.rand.randbytes(bs) if self.write else None
        self.next_block = 0
        self.progress = progress
        self.lat: array[int] = array("q")
        self.errors = 0

    def _op(self) -> BlkOp:
        if self.random:
            blk = self.rand.randrange(self.blocks)
        else:
            blk = self.next_block
            self.next_block = (blk + 1) % self.blocks
        off = blk * self.bs
        if self.write:
            return BlkOp("write", off, self.bs, self.payload)
        return BlkOp("read", off, self.bs)

    def run(self, seconds: float) -> BenchResult:
        """Run for ``seconds``; return the numbers.

        Raises:
            VhostUserError: the back-end went away for good or broke the ring.
        """
        disk = self.disk
        lat = self.lat
        start = time.monotonic()
        end = start + seconds
        interrupted = False
        disk.submit_many(self._op() for _ in range(self.iodepth))
        try:
            self._loop(start, end, seconds)
        except KeyboardInterrupt:
            interrupted = True  # report what completed until now (requests in flight not)
        elapsed = time.monotonic() - start
        if self.progress is not None:
            self.progress.write("\r" + " " * 79 + "\r")
            self.progress.flush()
        srt = sorted(lat)
        n = len(srt)
        return BenchResult(
            rw=self.rw, bs=self.bs, iodepth=self.iodepth, seconds=round(elapsed, 3), ops=n,
            bytes=n * self.bs, iops=round(n / elapsed, 1) if elapsed > 0 else 0.0,
            mb_per_s=round(n * self.bs / elapsed / 1e6, 2) if elapsed > 0 else 0.0,
            lat_min_us=percentile(srt, 0.0), lat_mean_us=round(sum(srt) / n / 1000, 1) if n
            else 0.0, lat_p50_us=percentile(srt, 0.5), lat_p99_us=percentile(srt, 0.99),
            lat_p999_us=percentile(srt, 0.999), lat_max_us=srt[-1] / 1000 if n else 0.0,
            errors=self.errors, reconnects=disk.reconnects,
            outage_seconds=round(disk.outage_seconds, 3), interrupted=interrupted,
        )

    def _loop(self, start: float, end: float, seconds: float) -> None:
        """Keep the queue full until ``end``, then drain."""
        disk = self.disk
        lat = self.lat
        next_report = start + 0.5
        done = 0
        while True:
            got = disk.wait(disk.timeout)
            if not got:
                raise VhostUserError(f"no completion within {disk.timeout} s")
            now = time.monotonic()
            for op in got:
                if op.ok:
                    lat.append(op.latency_ns)
                else:
                    self.errors += 1
            done += len(got)
            if now < end:
                disk.submit_many(self._op() for _ in range(len(got)))
            elif not disk.in_flight:
                break
            if self.progress is not None and now >= next_report:
                next_report = now + 0.5
                el = now - start
                self.progress.write(
                    f"\r{self.rw} bs={self.bs} qd={self.iodepth}  {el:5.1f}/{seconds:.0f} s  "
                    f"{done / el:9.0f} IOPS  {done * self.bs / el / 1e6:8.1f} MB/s  ")
                self.progress.flush()


def pattern(offset: int, size: int, seed: int) -> bytes:
    """The verify pattern of the block at ``offset``: (offset, seed) repeated."""
    unit = struct.pack("<QQ", offset, seed)
    return unit * (size // 16) + unit[: size % 16]


def verify(disk: VirtioBlkFrontend, *, region: int, bs: int, iodepth: int,
           seed: int) -> tuple[int, int]:
    """Write the pattern over ``region`` bytes, flush, read back; (blocks, mismatches).

    Raises:
        VhostUserError: a request failed or timed out.
    """
    blocks = region // bs

    def stream(make: Any) -> list[BlkOp]:
        out: list[BlkOp] = []
        nxt = 0
        while nxt < blocks or disk.in_flight:
            while nxt < blocks and disk.free_slots and disk.in_flight < iodepth:
                disk.submit(make(nxt * bs))
                nxt += 1
            got = disk.wait(disk.timeout)
            if not got and disk.in_flight:
                raise VhostUserError(f"no completion within {disk.timeout} s")
            for op in got:
                if not op.ok:
                    raise VhostUserError(f"verify: {op.kind} at {op.offset} failed "
                                         f"(status {op.status})")
            out.extend(got)
        return out

    stream(lambda off: BlkOp("write", off, bs, pattern(off, bs, seed)))
    disk.flush()
    bad = 0
    for op in stream(lambda off: BlkOp("read", off, bs)):
        if op.data != pattern(op.offset, bs, seed):
            bad += 1
    return blocks, bad


def print_text(r: BenchResult, out: TextIO) -> None:
    """The human-readable report."""
    out.write(
        f"{r.rw} bs={r.bs} iodepth={r.iodepth}: {r.ops} requests in {r.seconds:.2f} s\n"
        f"  IOPS     {r.iops:12.1f}\n"
        f"  MB/s     {r.mb_per_s:12.2f}\n"
        f"  latency  min {r.lat_min_us:.1f}  mean {r.lat_mean_us:.1f}  p50 {r.lat_p50_us:.1f}"
        f"  p99 {r.lat_p99_us:.1f}  p999 {r.lat_p999_us:.1f}  max {r.lat_max_us:.1f} us\n"
    )
    if r.interrupted:
        out.write("  interrupted (Ctrl-C): the numbers cover the time it ran\n")
    if r.errors:
        out.write(f"  errors   {r.errors}\n")
    if r.reconnects:
        out.write(f"  reconnects {r.reconnects} ({r.outage_seconds:.2f} s without a "
                  "back-end)\n")
    if r.verify_blocks is not None:
        out.write(f"  verify   {r.verify_blocks} blocks, {r.verify_mismatches} mismatched\n")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``vhost-user blkbench``; returns the exit status."""
    if args.bs % 512:
        print(f"vhost-user blkbench: --bs {args.bs} is not a multiple of 512", file=sys.stderr)
        return 2
    if args.iodepth < 1 or args.queues < 1 or args.time <= 0:
        print("vhost-user blkbench: --iodepth, --queues and --time must be positive",
              file=sys.stderr)
        return 2
    announce_wait("blkbench", args.socket, args.wait)
    try:
        disk = open_frontend(args.socket, bs=args.bs, iodepth=args.iodepth,
                             queues=args.queues, timeout=args.timeout, packed=args.packed,
                             inflight=not args.no_inflight, connect_timeout=args.wait,
                             reconnect=args.reconnect)
    except KeyboardInterrupt:
        print(f"vhost-user blkbench: interrupted ({args.socket})", file=sys.stderr)
        return 130
    except (VhostUserError, OSError, ValueError) as e:
        print(f"vhost-user blkbench: {connect_error(args.socket, e)}", file=sys.stderr)
        return 2
    status = 0
    try:
        if args.size is not None and args.size > disk.capacity:
            print(f"vhost-user blkbench: --size {args.size} is larger than the disk "
                  f"({disk.capacity} bytes)", file=sys.stderr)
            return 2
        region = disk.capacity if args.size is None else args.size
        region -= region % args.bs
        if region < args.bs:
            print(f"vhost-user blkbench: the disk ({disk.capacity} bytes) is smaller than one "
                  f"block of {args.bs}", file=sys.stderr)
            return 2
        if disk.read_only and args.rw in ("write", "randwrite"):
            print("vhost-user blkbench: the disk is read-only", file=sys.stderr)
            return 2
        progress = sys.stderr if sys.stdout.isatty() and not args.json else None
        runner = Runner(disk, rw=args.rw, bs=args.bs, iodepth=args.iodepth, region=region,
                        seed=args.seed, progress=progress)
        result = runner.run(args.time)
        if result.interrupted:
            status = 130
        elif args.verify:
            blocks, bad = verify(disk, region=region, bs=args.bs, iodepth=args.iodepth,
                                 seed=args.seed)
            result.verify_blocks, result.verify_mismatches = blocks, bad
            if bad:
                status = 1
        if result.errors:
            status = 1
        if args.json:
            print(json.dumps({"socket": args.socket, "pid": os.getpid(), **asdict(result)}))
        else:
            print_text(result, sys.stdout)
    except VhostUserError as e:
        print(f"vhost-user blkbench: {e}", file=sys.stderr)
        status = 1
    finally:
        disk.close()
    return status
