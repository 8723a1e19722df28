"""Ring engine throughput: device-side pop+push per format and burst size.

Not a test. For each ring format (split, packed) and burst size (default 32 and 256) our
driver side refills the ring (untimed), then the device side runs ``run_burst`` - pop a
burst, a minimal handler returning ``(head, writable_len)`` for each chain, push, decide
notify - and only that is timed. Prints chains/second and nanoseconds per chain, the cost of
one ``full_barrier()``, and the machine (platform, CPU model, Python).

    PYTHONPATH=src python benchmarks/ring_bench.py
    PYTHONPATH=src python benchmarks/ring_bench.py --chains 500000 --descs 1 --indirect
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

try:
    import vhostuser  # noqa: F401
except ImportError:  # running from a checkout without PYTHONPATH=src
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from vhostuser.memory import FlatMemory
from vhostuser.virtq import (
    Chain,
    PackedDeviceRing,
    PackedDriverRing,
    SplitDeviceRing,
    SplitDriverRing,
    full_barrier,
    packed_layout,
    run_burst,
    split_layout,
)

BUF_LEN = 64


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, or platform.processor()."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def handler(chains: list[Chain]) -> list[tuple[int, int]]:
    """The cheapest possible device: every chain used, all writable bytes "written"."""
    return [(c.head, c.writable_len) for c in chains]


def bench(
    fmt: str, burst: int, total: int, qsize: int, descs: int, indirect: bool, event_idx: bool
) -> tuple[float, float]:
    """Return (chains per second, ns per chain) for the device side of one configuration."""
    data = 0x100000
    ind = 0x80000
    mem = FlatMemory(bytearray(data + qsize * descs * BUF_LEN))
    area = (ind, qsize * descs * 16) if indirect else None
    drv: SplitDriverRing[int] | PackedDriverRing[int]
    dev: SplitDeviceRing | PackedDeviceRing
    if fmt == "split":
        d, a, u, _ = split_layout(qsize, 0)
        drv = SplitDriverRing(mem, qsize, d, a, u, event_idx=event_idx, indirect_area=area)
        dev = SplitDeviceRing(mem, qsize, d, a, u, event_idx=event_idx, indirect=indirect)
    else:
        d, a, u, _ = packed_layout(qsize, 0)
        drv = PackedDriverRing(mem, qsize, d, a, u, event_idx=event_idx, indirect_area=area)
        dev = PackedDeviceRing(mem, qsize, d, a, u, event_idx=event_idx, indirect=indirect)
    # Half readable, half writable descriptors (at least one writable).
    nread = descs // 2
    shapes = []
    for slot in range(qsize):
        base = data + slot * descs * BUF_LEN
        shapes.append([(base + k * BUF_LEN, BUF_LEN, k >= nread) for k in range(descs)])
    per_chain = 1 if indirect else descs
    if burst * per_chain > qsize:
        raise SystemExit(f"burst {burst} x {per_chain} descriptors does not fit queue {qsize}")
    done = 0
    elapsed = 0.0
    perf = time.perf_counter
    tok = 0
    while done < total:
        n = min(burst, total - done)
        for _ in range(n):
            drv.add(shapes[tok % qsize], tok, indirect=indirect)
            tok += 1
        drv.publish()
        drv.should_kick()
        t0 = perf()
        res = run_burst(dev, handler, n)
        elapsed += perf() - t0
        if res.popped != n or res.broken is not None:
            raise SystemExit(f"unexpected burst result {res}")
        drv.reap()
        done += n
    drv.close()
    dev.close()
    return total / elapsed, elapsed / total * 1e9


def barrier_ns(rounds: int = 1_000_000) -> float:
    """Nanoseconds per full_barrier() call (including the Python call)."""
    fb = full_barrier
    t0 = time.perf_counter()
    for _ in range(rounds):
        fb()
    return (time.perf_counter() - t0) / rounds * 1e9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Device-side pop+push throughput of the vhostuser virtqueue engine "
        "(split and packed rings, over a bytearray)."
    )
    p.add_argument("--chains", type=int, default=200_000, help="chains per configuration")
    p.add_argument(
        "--repeat", type=int, default=3, help="runs per configuration; the best is shown"
    )
    p.add_argument("--bursts", type=int, nargs="+", default=[32, 256], help="burst sizes")
    p.add_argument("--queue-size", type=int, default=1024, help="ring size (power of two)")
    p.add_argument("--descs", type=int, default=2, help="descriptors (buffers) per chain")
    p.add_argument("--indirect", action="store_true", help="put each chain in an indirect table")
    p.add_argument("--no-event-idx", action="store_true", help="disable VIRTIO_F_EVENT_IDX")
    p.add_argument("--formats", nargs="+", choices=["split", "packed"], default=["split", "packed"])
    args = p.parse_args(argv)

    print(f"platform: {platform.platform()} ({platform.machine()})")
    print(f"cpu:      {cpu_model()}")
    print(f"python:   {platform.python_implementation()} {sys.version.split()[0]}")
    print(
        f"config:   queue {args.queue_size}, {args.descs} x {BUF_LEN} B descriptors per chain,"
        f" indirect={args.indirect}, event_idx={not args.no_event_idx}, "
        f"{args.chains} chains per run, best of {args.repeat}"
    )
    print(f"full_barrier(): {min(barrier_ns() for _ in range(args.repeat)):.0f} ns per call")
    print(f"{'format':8} {'burst':>6} {'chains/s':>12} {'ns/chain':>10}")
    for fmt in args.formats:
        for burst in args.bursts:
            rate, ns = max(
                bench(
                    fmt,
                    burst,
                    args.chains,
                    args.queue_size,
                    args.descs,
                    args.indirect,
                    not args.no_event_idx,
                )
                for _ in range(args.repeat)
            )
            print(f"{fmt:8} {burst:>6} {rate:>12,.0f} {ns:>10.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
