"""Switch throughput: DPDK virtio-user txonly -> SWITCH -> DPDK virtio-user rxonly.

Not a test. For each frame size the same harness runs twice, back to back:

* reference: DPDK testpmd forwarding (``io``) between two ``net_vhost`` ports;
* ours: ``vhost-user switch`` (busy-poll by default) with two vhost-user ports, once per
  burst engine (``--engine``: the compiled one and pure Python by default);

and prints the receiver's rate for both, the ratio, the machine and how the processes were
placed. A second measurement saturates the switch: one testpmd with two virtio-user ports
(io, ``--tx-first``) loops frames through it, so no busy sender/receiver pair shares a CPU
and limits the rate; both directions of the loop are reported separately (a direction at
0 has stalled). The sender is testpmd txonly on a virtio-user port, the receiver
testpmd rxonly on another; frames are flooded by our switch (the destination is never
learned) and forwarded port to port by testpmd. With ``--profile`` the switch runs once
more under cProfile (in the loop, unless ``--no-loop``) and the functions where the time
goes are printed.

Placement on a 2-CPU machine: the switch under test gets one CPU to itself; sender and
receiver share the other. Each testpmd pins its two lcores to one CPU (``--lcores``).
Busy-polling neighbours on a shared CPU take turns in CFS timeslices, so the rings are
made large (``--queue-size``, default 4096) to ride over them; the reference and ours see
the same placement, which is why only their ratio is meaningful.

    PYTHONPATH=src python benchmarks/net_bench.py
    PYTHONPATH=src python benchmarks/net_bench.py --sizes 64 --seconds 10 --profile
    PYTHONPATH=src python benchmarks/net_bench.py --mode event --packed
    PYTHONPATH=src python benchmarks/net_bench.py --engine python --sizes 64
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import pstats
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parent.parent / "src"
_STATS_RE = re.compile(r"NIC statistics for port (\d+)\s+#+\s*\n\s*RX-packets:\s*(\d+).*?"
                       r"TX-packets:\s*(\d+)", re.S)
_seq = 0


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


def dpdk_version() -> str:
    """The testpmd package version, if dpkg knows it."""
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "dpdk-dev"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


class Proc:
    """One background process with a log file; stopped with SIGINT, then SIGKILL."""

    def __init__(self, name: str, argv: list[str], workdir: Path, *,
                 env: dict[str, str] | None = None, runtime_dir: Path | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log = workdir / f"{name}.log"
        self.runtime_dir = runtime_dir
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=f,
                                         stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> None:
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while not rx.search(self.text()):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n"
                                   f"{self.text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: no {pattern!r} in {timeout} s:\n"
                                   f"{self.text()[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        if self.runtime_dir is not None:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)


def testpmd(name: str, workdir: Path, cpu: int, vdevs: list[str], mode: str, mbufs: int,
            extra: list[str]) -> Proc:
    """dpdk-testpmd with ``vdevs`` on one CPU, forwarding ``mode``, stats every second."""
    global _seq
    _seq += 1
    prefix = f"vhubench{os.getpid()}x{_seq}"
    argv = [shutil.which("dpdk-testpmd") or "dpdk-testpmd", "--no-pci", "--lcores",
            f"0@{cpu},1@{cpu}", "--file-prefix", prefix, "--no-huge", "-m", "1024",
            "--no-shconf", "--log-level=pmd.net.virtio.init:info"]
    for v in vdevs:
        argv += ["--vdev", v]
    argv += ["--", "--nb-cores=1", f"--total-num-mbufs={mbufs}", f"--forward-mode={mode}",
             "--stats-period=1", "--auto-start", *extra]
    runtime = Path("/var/run/dpdk" if os.geteuid() == 0 else
                   os.environ.get("XDG_RUNTIME_DIR", "/tmp") + "/dpdk") / prefix
    return Proc(name, argv, workdir, runtime_dir=runtime)


def rx_count(p: Proc, port: int = 0) -> tuple[int, int] | None:
    """(RX-packets, TX-packets) of the newest statistics block of ``port``."""
    last = None
    for m in _STATS_RE.finditer(p.text()):
        if int(m[1]) == port:
            last = (int(m[2]), int(m[3]))
    return last


def wait_new_stats(p: Proc, port: int, timeout: float = 10.0) -> tuple[int, int, float]:
    """Wait for the next statistics block; (rx, tx, time it was seen)."""
    before = p.text().count("NIC statistics for port")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.text().count("NIC statistics for port") > before:
            got = rx_count(p, port)
            if got is not None:
                return got[0], got[1], time.monotonic()
        time.sleep(0.02)
    raise RuntimeError(f"{p.name}: no statistics for {timeout} s:\n{p.text()[-1500:]}")


@contextlib.contextmanager
def switch_under_test(kind: str, workdir: Path, a: str, b: str, cpu: int, args: argparse.Namespace,
                      profile: Path | None = None) -> Iterator[Proc]:
    """Start the switch under test listening on ``a`` and ``b``: ``dpdk`` (the reference)
    or ``python`` / ``compiled`` (ours with that engine)."""
    qs = args.queue_size
    if kind == "dpdk":
        p = testpmd("testpmd-io", workdir, cpu, [f"net_vhost0,iface={a}",
                                                 f"net_vhost1,iface={b}"],
                    "io", 8 * qs + 8192, [])
    else:
        argv = ["taskset", "-c", str(cpu), sys.executable]
        if profile is not None:
            argv += ["-m", "cProfile", "-o", str(profile)]
        argv += ["-m", "vhostuser.cli.main", "switch", "--port", f"{a},name=in", "--port",
                 f"{b},name=out", "--stats-json", str(workdir / "switch.json"), "-q"]
        if args.mode == "busy":
            argv.append("--busy-poll")
        argv += ["--engine", kind]
        env = dict(os.environ, PYTHONPATH=str(SRC))
        p = Proc("switch", argv, workdir, env=env)
    try:
        deadline = time.monotonic() + 30
        while not (os.path.exists(a) and os.path.exists(b)):
            if p.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{p.name} did not listen:\n{p.text()[-2000:]}")
            time.sleep(0.05)
        yield p
    finally:
        p.stop()
        for s in (a, b):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(s)


def run_once(kind: str, size: int, args: argparse.Namespace, cpus: tuple[int, int],
             profile: Path | None = None) -> dict[str, Any]:
    """One measurement: the receiver's frames per second through switch ``kind``."""
    sw_cpu, peer_cpu = cpus
    qs = args.queue_size
    pk = ",packed_vq=1" if args.packed else ""
    with tempfile.TemporaryDirectory(prefix="vhu-bench-") as tmp:
        d = Path(tmp)
        a, b = str(d / "in.sock"), str(d / "out.sock")
        with switch_under_test(kind, d, a, b, sw_cpu, args, profile):
            rx = testpmd("receiver", d, peer_cpu,
                         [f"net_virtio_user0,path={b},queue_size={qs}{pk}"],
                         "rxonly", 2 * qs + 8192, [f"--rxd={qs}", f"--txd={qs}"])
            tx = None
            try:
                rx.wait_for(r"Port 0 is up|forwards packets", 30)
                tx = testpmd("sender", d, peer_cpu,
                             [f"net_virtio_user0,path={a},queue_size={qs}{pk}"], "txonly",
                             2 * qs + 8192,
                             [f"--rxd={qs}", f"--txd={qs}", f"--txpkts={size}"])
                tx.wait_for(r"forwards packets", 30)
                time.sleep(args.warmup)
                r0, _, t0 = wait_new_stats(rx, 0)
                _, s0, _ = wait_new_stats(tx, 0)
                time.sleep(args.seconds)
                r1, _, t1 = wait_new_stats(rx, 0)
                _, s1, _ = wait_new_stats(tx, 0)
            finally:
                if tx is not None:
                    tx.stop()
                rx.stop()
        extra: dict[str, Any] = {}
        stats = d / "switch.json"
        if kind != "dpdk" and stats.exists():
            with contextlib.suppress(ValueError):
                st = json.loads(stats.read_text())
                extra["drops"] = {p["name"]: {k: v for k, v in p["drops"].items() if v}
                                  for p in st["ports"]}
    dt = t1 - t0
    return {"switch": kind, "size": size, "rx_pps": (r1 - r0) / dt,
            "tx_pps": (s1 - s0) / dt, **extra}


def run_loop(kind: str, size: int, args: argparse.Namespace, cpus: tuple[int, int],
             profile: Path | None = None) -> dict[str, Any]:
    """Saturation: one testpmd (io, ``--tx-first``) with two virtio-user ports loops a
    fixed population of frames through the switch; its RX rate is the switch's rate. No
    sender/receiver pair shares a CPU here, so the switch is the bottleneck."""
    sw_cpu, peer_cpu = cpus
    qs = min(args.queue_size, 1024)
    pk = ",packed_vq=1" if args.packed else ""
    with tempfile.TemporaryDirectory(prefix="vhu-bench-") as tmp:
        d = Path(tmp)
        a, b = str(d / "in.sock"), str(d / "out.sock")
        with switch_under_test(kind, d, a, b, sw_cpu, args, profile):
            loop = testpmd("loop", d, peer_cpu,
                           [f"net_virtio_user0,path={a},queue_size={qs}{pk}",
                            f"net_virtio_user1,path={b},queue_size={qs}{pk}"],
                           "io", 4 * qs + 8192,
                           [f"--rxd={qs}", f"--txd={qs}", f"--txpkts={size}", "--tx-first",
                            "--burst=512"])
            try:
                loop.wait_for(r"forwards packets", 30)
                time.sleep(args.warmup)
                r0 = [wait_new_stats(loop, port) for port in (0, 1)]
                time.sleep(args.seconds)
                r1 = [wait_new_stats(loop, port) for port in (0, 1)]
            finally:
                loop.stop()
    dirs = [(r1[i][0] - r0[i][0]) / (r1[i][2] - r0[i][2]) for i in (0, 1)]
    return {"switch": kind, "size": size, "rx_pps": sum(dirs), "dirs": dirs}


def print_profile(path: Path, top: int) -> None:
    """The functions the switch spent its time in (tottime), and a grouped summary."""
    st = pstats.Stats(str(path))
    raw: Any = st.stats  # type: ignore[attr-defined]  # {(file, line, fn): (cc, nc, tt, ct, callers)}
    total = sum(v[2] for v in raw.values()) or 1.0
    rows = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    print(f"  {'tottime':>8} {'share':>6} {'calls':>10}  function")
    for (file, line, fn), (_cc, nc, tt, _ct, _callers) in rows:
        where = f"{Path(file).name}:{line}" if line else file
        print(f"  {tt:8.2f} {100 * tt / total:5.1f}% {nc:>10}  {fn} ({where})")
    groups = {
        "transmit side (parse, stage)": ("_tx_fast", "_tx_each", "_take_frame",
                                         "handle_burst", "_flush_frames", "_region"),
        "ring reads and used writes (both sides)": ("peek_run", "complete_run", "_avail_raw",
                                                    "_avail_heads", "_advance_used",
                                                    "complete_in_place"),
        "switching (learn, look up, stage)": ("forward",),
        "receive side (copy into buffers)": ("_rx_fast", "_deliver_pair", "deliver", "send",
                                             "_rx_ring"),
        "ring engine (generic path)": ("pop", "_walk", "push", "run_burst", "should_notify"),
        "reactor and polling": ("run_once", "run", "select", "poll", "_poll", "poll_queue",
                                "ring", "enabled"),
    }
    print("  where the time goes:")
    for label, names in groups.items():
        t = sum(v[2] for (f, _l, fn), v in raw.items() if fn in names
                and ("vhostuser" in f or "selectors" in f))
        print(f"    {label:42} {100 * t / total:5.1f}%")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Needs dpdk-testpmd with the vhost and virtio PMDs "
               "(scripts/install-peers.sh) and two CPUs.",
    )
    p.add_argument("--sizes", default="64,1500", help="frame sizes (default 64,1500)")
    p.add_argument("--seconds", type=float, default=5.0, help="measured interval (default 5)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    p.add_argument("--mode", choices=["busy", "event"], default="busy",
                   help="our switch's mode (default busy-poll)")
    p.add_argument("--packed", action="store_true", help="packed virtqueues")
    p.add_argument("--engine", choices=["both", "compiled", "python"], default="both",
                   help="our switch's burst engine(s) (default both; compiled needs the "
                        "extension built at install)")
    p.add_argument("--queue-size", type=int, default=4096,
                   help="virtio-user queue size (default 4096)")
    p.add_argument("--cpus", default=None, metavar="SWITCH,PEERS",
                   help="CPU for the switch, CPU for sender+receiver (default: the last two "
                        "this process may use)")
    p.add_argument("--no-loop", dest="loop", action="store_false",
                   help="skip the saturation measurement (a testpmd looping frames "
                        "through the switch)")
    p.add_argument("--profile", action="store_true",
                   help="also run our switch under cProfile and print where the time goes")
    p.add_argument("--top", type=int, default=15, help="profile rows (default 15)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    if shutil.which("dpdk-testpmd") is None:
        print("dpdk-testpmd not found: run scripts/install-peers.sh", file=sys.stderr)
        return 2
    allowed = sorted(os.sched_getaffinity(0))
    if args.cpus:
        sw_cpu, peer_cpu = (int(x) for x in args.cpus.split(","))
    else:
        sw_cpu, peer_cpu = (allowed[-1], allowed[-2]) if len(allowed) > 1 else (allowed[0],) * 2
    sizes = [int(s) for s in args.sizes.split(",")]
    sys.path.insert(0, str(SRC))
    from vhostuser import engine as engines

    kinds = ["compiled", "python"] if args.engine == "both" else [args.engine]
    if "compiled" in kinds and engines.compiled() is None:
        if args.engine == "compiled":
            print("the compiled engine is not built (gcc, python3-dev, scripts/setup.sh)",
                  file=sys.stderr)
            return 2
        kinds.remove("compiled")
        print("note: the compiled engine is not built; measuring the python engine only")
    print(f"machine:  {platform.node()} {platform.platform()} ({platform.machine()}), "
          f"{os.cpu_count()} CPUs: {cpu_model()}")
    print(f"software: {platform.python_implementation()} {sys.version.split()[0]}, "
          f"DPDK {dpdk_version()}")
    print(f"placement: switch under test on CPU {sw_cpu} (ours: one Python process, "
          f"taskset; reference: testpmd io, lcores 0@{sw_cpu},1@{sw_cpu}); "
          f"sender (txonly) and receiver (rxonly) testpmd on CPU {peer_cpu}, lcores "
          f"0@{peer_cpu},1@{peer_cpu} each")
    mode = "busy-polling" if args.mode == "busy" else "event-driven"
    print(f"rings: {'packed' if args.packed else 'split'}, queue size {args.queue_size}; "
          f"our switch {mode}")
    results = []
    for size in sizes:
        ref = run_once("dpdk", size, args, (sw_cpu, peer_cpu))
        print(f"\n{size:5d}-byte frames, txonly -> switch -> rxonly:")
        print(f"  testpmd io (reference): {ref['rx_pps'] / 1e6:8.3f} Mpps received "
              f"({ref['tx_pps'] / 1e6:.3f} Mpps offered)")
        for kind in kinds:
            ours = run_once(kind, size, args, (sw_cpu, peer_cpu))
            ratio = ours["rx_pps"] / ref["rx_pps"] if ref["rx_pps"] else 0.0
            results.append({"size": size, "engine": kind, "dpdk": ref, "ours": ours,
                            "ratio": ratio})
            print(f"  vhost-user switch, {kind:8} engine: {ours['rx_pps'] / 1e6:8.3f} Mpps "
                  f"received ({ours['tx_pps'] / 1e6:.3f} offered), ratio {ratio:6.3f}, "
                  f"{ours['rx_pps'] * size * 8 / 1e9:.2f} Gbit/s of frames"
                  + (f"  drops {ours['drops']}" if ours.get("drops") else ""))
    if args.loop:
        print("\nloop (one testpmd, io --tx-first, two virtio-user ports on the switch; "
              f"testpmd on CPU {peer_cpu}, the switch on CPU {sw_cpu}); Mpps per direction "
              "(frames received by testpmd port 0 / port 1) and total:")
        for size in sizes:
            ref = run_loop("dpdk", size, args, (sw_cpu, peer_cpu))
            d0, d1 = ref["dirs"]
            print(f"  {size:5d} bytes  testpmd io (reference) {d0 / 1e6:7.3f} / {d1 / 1e6:7.3f}"
                  f"  total {ref['rx_pps'] / 1e6:7.3f}")
            for kind in kinds:
                ours = run_loop(kind, size, args, (sw_cpu, peer_cpu))
                ratio = ours["rx_pps"] / ref["rx_pps"] if ref["rx_pps"] else 0.0
                results.append({"size": size, "loop": True, "engine": kind, "dpdk": ref,
                                "ours": ours, "ratio": ratio})
                o0, o1 = ours["dirs"]
                print(f"  {size:5d} bytes  switch, {kind:8} engine  {o0 / 1e6:7.3f} / "
                      f"{o1 / 1e6:7.3f}  total {ours['rx_pps'] / 1e6:7.3f}  ratio {ratio:.3f}  "
                      f"{ours['rx_pps'] * size * 8 / 1e9:.2f} Gbit/s")
    if args.profile:
        with tempfile.TemporaryDirectory(prefix="vhu-prof-") as tmp:
            prof = Path(tmp) / "switch.prof"
            # The loop when it is measured (the switch is the bottleneck there), else the
            # txonly -> rxonly topology.
            run = run_loop if args.loop else run_once
            r = run(kinds[-1], sizes[0], args, (sw_cpu, peer_cpu), profile=prof)
            where = "loop" if args.loop else "txonly -> rxonly"
            print(f"\nprofile ({where}, {sizes[0]}-byte frames, {r['rx_pps'] / 1e6:.3f} Mpps "
                  "under cProfile, which slows Python calls several-fold):")
            print_profile(prof, args.top)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
