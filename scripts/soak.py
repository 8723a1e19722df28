#!/usr/bin/env python3
"""Soak test: two net front-ends through a switch that is killed and restarted, for minutes.

Run ``python scripts/soak.py --help`` for what it does and checks.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from vhostuser.errors import VhostUserError
from vhostuser.frontends.net import (
    ProbeLedger,
    VirtioNetFrontend,
    probe_template,
    read_probe,
    stamp_probe,
)
from vhostuser.io.fdcount import Snapshot, snapshot

DESCRIPTION = """\
Soak the reconnection path: two of our virtio-net front-ends (vhostuser.frontends.net, in
this process) send numbered frames to each other through `vhost-user switch` (a separate
process), and every few seconds the switch is killed with SIGKILL and started again on the
same sockets. The front-ends notice, dial the new switch, hand it their rings and carry
on. This goes on for --minutes (or --seconds); then the run is judged.

What is checked (each failure is printed as a VIOLATION line and makes the exit status 1):
  * frames are lost only in outage windows: a window opens at the kill (taking in the
    frames that may have been on their way) and closes --grace seconds after both
    front-ends took the new switch up; a frame lost outside every window is a violation,
    and so is a frame that arrives twice;
  * traffic resumes after every restart, both ways;
  * each front-end reconnected exactly once per kill;
  * this process's open fds and memory mappings stay flat: after every recovery the fd
    count and the shared mappings (guest RAM) are those at the start, and the mapping
    count has grown by at most --maps-slack.

Progress lines (every --progress seconds) read:
  [   42.0s] kills 12 | a->b sent 41980 recv 41850 outage-lost 128 on-way 2 | b->a ...
             | reconnects a 12 b 12 | fds 31 maps 402
"on-way" frames were sent and have neither arrived nor been written off to an outage;
whatever of them never arrives is reported at the end as lost outside the outages.
"""

EPILOG = """\
examples:
  .venv/bin/python scripts/soak.py --minutes 10
  .venv/bin/python scripts/soak.py --seconds 30 --kill-every 2 --rate 2000 --packed
  .venv/bin/python scripts/soak.py --minutes 60 --json > soak.json

exit status: 0 when every check held, 1 on any violation, 2 on a usage error or when the
switch could not be started.
"""

MAC_A = bytes.fromhex("02000000a00a")
MAC_B = bytes.fromhex("02000000b00b")


def positive_float(text: str) -> float:
    """argparse type: a number > 0.

    Raises:
        argparse.ArgumentTypeError: not a positive number (names the value).
    """
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"{text}: must be greater than 0")
    return v


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see DESCRIPTION)."""
    p = argparse.ArgumentParser(prog="soak.py", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    length = p.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=positive_float, default=None, metavar="N",
                        help="how long to run (default 1)")
    length.add_argument("--seconds", type=positive_float, default=None, metavar="N",
                        help="how long to run, in seconds (for short runs in CI)")
    p.add_argument("--kill-every", type=positive_float, default=3.0, metavar="SECONDS",
                   help="mean time the switch runs between a recovery and the next kill "
                        "(each one drawn from 0.5x..1.5x; default 3)")
    p.add_argument("--rate", type=positive_float, default=1000.0, metavar="PPS",
                   help="frames per second each way (default 1000)")
    p.add_argument("--size", type=int, default=128, metavar="BYTES",
                   help="frame size, 60..1514 (default 128)")
    p.add_argument("--packed", action="store_true", help="packed virtqueues")
    p.add_argument("--engine", choices=("auto", "python", "compiled"), default=None,
                   help="the switch's burst engine (default: the switch's own default)")
    p.add_argument("--grace", type=positive_float, default=1.0, metavar="SECONDS",
                   help="how long an outage window stays open after both front-ends "
                        "reconnected (default 1)")
    p.add_argument("--reconnect-timeout", type=positive_float, default=30.0,
                   metavar="SECONDS",
                   help="how long a front-end waits for the new switch (default 30)")
    p.add_argument("--maps-slack", type=int, default=16, metavar="N",
                   help="growth of the mapping count tolerated (private heap mappings "
                        "come and go; default 16)")
    p.add_argument("--progress", type=positive_float, default=5.0, metavar="SECONDS",
                   help="seconds between progress lines (default 5)")
    p.add_argument("--seed", type=int, default=1, help="seed for the kill times (default 1)")
    p.add_argument("--json", action="store_true",
                   help="print the final report as JSON on stdout (progress goes to stderr)")
    args = p.parse_args(argv)
    if not 60 <= args.size <= 1514:
        p.error(f"--size {args.size} is outside 60..1514")
    if args.maps_slack < 0:
        p.error(f"--maps-slack {args.maps_slack} is negative")
    return args


@dataclass
class Stream:
    """Numbered frames from one front-end to the other."""

    name: str
    tx: VirtioNetFrontend
    rx: VirtioNetFrontend
    template: bytearray
    magic: int
    max_outstanding: int
    ledger: ProbeLedger = field(default_factory=ProbeLedger)
    sent: int = 0
    foreign: int = 0
    window_lo: int | None = None
    received_at_recovery: int = 0

    @property
    def outstanding(self) -> int:
        """Frames sent that neither came back nor were written off to an outage."""
        return self.sent - self.ledger.received - self.ledger.lost_in_windows

    def send(self, n: int) -> None:
        """Send up to ``n`` frames (fewer when too many are on their way or the ring is
        full)."""
        n = min(n, self.max_outstanding - self.outstanding)
        if n <= 0:
            return
        frames = []
        for k in range(n):
            stamp_probe(self.template, self.sent + k, 0, self.magic)
            frames.append(bytes(self.template))
        self.sent += self.tx.send(frames)

    def take(self, frames: list[bytes]) -> None:
        """Account for frames that arrived at ``rx``."""
        for f in frames:
            got = read_probe(f, self.magic)
            if got is None or got[0] >= self.sent:
                self.foreign += 1
                continue
            self.ledger.see(got[0])

    def open_window(self) -> None:
        """The switch is gone: the frames that may be on their way join the window."""
        if self.window_lo is None:
            self.window_lo = max(0, self.sent - self.max_outstanding)

    def close_window(self) -> None:
        """Both front-ends are back (and the grace time passed): write off the window."""
        if self.window_lo is not None:
            self.ledger.close_window(self.window_lo, self.sent)
            self.window_lo = None
        self.received_at_recovery = self.ledger.received


class SwitchProcess:
    """``vhost-user switch`` with two listening ports, as a child process."""

    def __init__(self, a: str, b: str, engine: str | None, log: IO[str]) -> None:
        self.argv = [sys.executable, "-m", "vhostuser.cli.main", "switch", "--quiet",
                     "--port", f"{a},name=a", "--port", f"{b},name=b"]
        if engine is not None:
            self.argv += ["--engine", engine]
        self.paths = (a, b)
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        """Start it (its output goes to the log file)."""
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self.starts += 1

    def kill(self) -> None:
        """SIGKILL and reap it (its socket files stay behind, stale)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        """SIGTERM (it removes its sockets), SIGKILL if it does not go in 10 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()

    def died(self) -> int | None:
        """Its exit status if it exited by itself."""
        return None if self.proc is None else self.proc.poll()


class Soak:
    """The run: traffic, kills, recoveries and the checks (see DESCRIPTION)."""

    def __init__(self, args: argparse.Namespace, workdir: Path, log: IO[str],
                 out: IO[str]) -> None:
        self.args = args
        self.out = out
        self.rand = random.Random(args.seed)
        self.a = str(workdir / "a.sock")
        self.b = str(workdir / "b.sock")
        self.switch = SwitchProcess(self.a, self.b, args.engine, log)
        self.violations: list[str] = []
        self.kills = 0
        self.outage_times: list[float] = []
        self.baseline: Snapshot | None = None
        self.last: Snapshot | None = None
        self.nics: list[VirtioNetFrontend] = []
        self.streams: list[Stream] = []

    def say(self, text: str) -> None:
        """A progress or event line."""
        self.out.write(text + "\n")
        self.out.flush()

    def violation(self, text: str) -> None:
        """Record (and print) a failed check."""
        self.violations.append(text)
        self.say(f"VIOLATION: {text}")

    # -- set-up ------------------------------------------------------------------------------
    def open(self) -> None:
        """Start the switch and connect both front-ends.

        Raises:
            VhostUserError, OSError: the switch did not come up within 30 s.
        """
        self.switch.start()
        kw: dict[str, Any] = {"packed": self.args.packed, "connect_timeout": 30.0,
                              "reconnect_timeout": self.args.reconnect_timeout}
        na = VirtioNetFrontend.connect(self.a, mac="02:00:00:00:a0:0a", **kw)
        self.nics.append(na)
        nb = VirtioNetFrontend.connect(self.b, mac="02:00:00:00:b0:0b", **kw)
        self.nics.append(nb)
        cap = na.queue_size // 2
        self.streams = [
            Stream("a->b", na, nb, probe_template(self.args.size, src_mac=MAC_A, dst_mac=MAC_B),
                   0xA0B0, cap),
            Stream("b->a", nb, na, probe_template(self.args.size, src_mac=MAC_B, dst_mac=MAC_A),
                   0xB0A0, cap),
        ]

    def close(self) -> None:
        """Close the front-ends and stop the switch."""
        for nic in self.nics:
            nic.close()
        self.switch.stop()

    # -- traffic -----------------------------------------------------------------------------
    def pump(self, budget: dict[str, float], dt: float, sending: bool) -> None:
        """One round: send what the rate allows, take what arrived, let outages be seen."""
        for s in self.streams:
            if sending:
                budget[s.name] = min(budget[s.name] + dt * self.args.rate, 64.0)
                n = int(budget[s.name])
                if n > 0:
                    before = s.sent
                    s.send(n)
                    budget[s.name] -= s.sent - before
            s.take(s.rx.recv())
        for nic in self.nics:
            nic.wait(0.002)  # also where an outage is noticed and the new switch taken up

    def both_up(self) -> bool:
        """Both front-ends have a back-end."""
        return all(n.connected for n in self.nics)

    # -- checks ------------------------------------------------------------------------------
    def check_resources(self, when: str) -> None:
        """fds and mappings against the first recovery's."""
        gc.collect()
        now = snapshot()
        self.last = now
        if self.baseline is None:
            self.baseline = now
            return
        base = self.baseline
        if now.fd_count != base.fd_count:
            self.violation(f"{when}: {now.fd_count} open fds, {base.fd_count} at the start"
                           f"{now.diff(base)}")
        if now.shared_maps != base.shared_maps:
            self.violation(f"{when}: shared mappings changed: {now.diff(base)}")
        if now.maps_count > base.maps_count + self.args.maps_slack:
            self.violation(f"{when}: {now.maps_count} mappings, {base.maps_count} at the "
                           f"start (more than --maps-slack {self.args.maps_slack} grown)")

    def check_recovery(self) -> None:
        """After a recovery: reconnect counts, resources."""
        for nic, name in zip(self.nics, ("a", "b"), strict=True):
            if nic.reconnects != self.kills:
                self.violation(f"after kill {self.kills}: front-end {name} reconnected "
                               f"{nic.reconnects} times")
        self.check_resources(f"after kill {self.kills}")

    def progress(self, elapsed: float) -> None:
        """One progress line."""
        parts = [f"[{elapsed:7.1f}s] kills {self.kills}"]
        for s in self.streams:
            led = s.ledger
            parts.append(f"{s.name} sent {s.sent} recv {led.received} outage-lost "
                         f"{led.lost_in_windows} on-way {s.outstanding}")
        parts.append("reconnects " + " ".join(
            f"{n} {nic.reconnects}" for n, nic in zip("ab", self.nics, strict=True)))
        snap = self.last
        if snap is not None:
            parts.append(f"fds {snap.fd_count} maps {snap.maps_count}")
        self.say(" | ".join(parts))

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> None:
        """Traffic with kills until the time is up, then drain and judge.

        Raises:
            VhostUserError: a front-end gave up (no switch within --reconnect-timeout, or
                one that lacks a feature).
        """
        args = self.args
        total = args.seconds if args.seconds is not None else 60.0 * (args.minutes or 1.0)
        t0 = time.monotonic()
        end = t0 + total
        budget = {s.name: 0.0 for s in self.streams}
        state = "up"
        recovered = killed_at = 0.0
        next_kill = t0 + self.rand.uniform(0.5, 1.5) * args.kill_every
        next_progress = t0 + args.progress
        last = t0
        self.check_resources("start")
        while True:
            now = time.monotonic()
            if state == "up" and now >= end:
                break
            if self.switch.died() is not None:
                self.violation(f"the switch exited by itself with status {self.switch.died()}")
                self.switch.start()
            if state == "up" and now >= next_kill:
                self.switch.kill()
                self.kills += 1
                killed_at = now
                for s in self.streams:
                    if s.ledger.received == s.received_at_recovery and s.sent:
                        self.violation(f"{s.name}: no frame arrived between recovery "
                                       f"{self.kills - 1} and kill {self.kills}")
                    s.open_window()
                self.switch.start()
                state = "outage"
            elif state == "outage" and self.both_up():
                recovered = now
                self.outage_times.append(now - killed_at)
                state = "grace"
            elif state == "grace" and now - recovered >= args.grace:
                for s in self.streams:
                    s.close_window()
                self.check_recovery()
                state = "up"
                next_kill = now + self.rand.uniform(0.5, 1.5) * args.kill_every
            self.pump(budget, now - last, sending=True)
            last = now
            if now >= next_progress:
                self.progress(now - t0)
                next_progress = now + args.progress
        # Drain: nothing more is sent; what is on its way may still come.
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and any(s.outstanding for s in self.streams):
            self.pump(budget, 0.0, sending=False)
        self.progress(time.monotonic() - t0)
        self.judge()

    def judge(self) -> None:
        """The end-of-run checks."""
        for s in self.streams:
            led = s.ledger
            lost = led.lost_outside(s.sent)
            if lost:
                first = ", ".join(map(str, led.first_lost_outside(s.sent)))
                self.violation(f"{s.name}: {lost} frames lost outside the outage windows "
                               f"(first: {first})")
            if led.duplicates:
                self.violation(f"{s.name}: {led.duplicates} frames arrived twice")
            if s.sent and led.received == s.received_at_recovery and self.kills:
                self.violation(f"{s.name}: no frame arrived after the last recovery")
        for nic, name in zip(self.nics, "ab", strict=True):
            if nic.reconnects != self.kills:
                self.violation(f"front-end {name} reconnected {nic.reconnects} times for "
                               f"{self.kills} kills")
        if self.kills == 0:
            self.violation("the switch was never killed: run longer than --kill-every")

    def report(self) -> dict[str, Any]:
        """The final figures, JSON-ready."""
        return {
            "kills": self.kills,
            "switch_starts": self.switch.starts,
            "outage_seconds": {
                "max": round(max(self.outage_times, default=0.0), 3),
                "mean": round(sum(self.outage_times) / len(self.outage_times), 3)
                if self.outage_times else 0.0,
            },
            "streams": {
                s.name: {"sent": s.sent, "received": s.ledger.received,
                         "lost_in_outages": s.ledger.lost_in_windows,
                         "lost_outside_outages": s.ledger.lost_outside(s.sent),
                         "duplicates": s.ledger.duplicates, "foreign": s.foreign}
                for s in self.streams
            },
            "frontends": {n: nic.stats.as_dict() for n, nic in zip("ab", self.nics,
                                                                   strict=True)},
            "fds": {"start": self.baseline.fd_count if self.baseline else None,
                    "end": self.last.fd_count if self.last else None},
            "maps": {"start": self.baseline.maps_count if self.baseline else None,
                     "end": self.last.maps_count if self.last else None},
            "violations": self.violations,
        }


def main(argv: list[str] | None = None) -> int:
    """Run the soak; the exit status (see EPILOG)."""
    args = parse_args(argv)
    out = sys.stderr if args.json else sys.stdout
    workdir = Path(tempfile.mkdtemp(prefix="vhu-soak-", dir="/tmp"))
    log_path = workdir / "switch.log"
    status = 0
    with open(log_path, "w") as log:
        soak = Soak(args, workdir, log, out)
        try:
            soak.say(f"soak: switch log {log_path}; killing it every ~{args.kill_every:g} s, "
                     f"{args.rate:g} frames/s each way")
            try:
                soak.open()
            except (VhostUserError, OSError) as e:
                print(f"soak: the switch did not come up: {e}", file=sys.stderr)
                return 2
            soak.run()
        except VhostUserError as e:
            soak.violation(f"a front-end gave up: {e}")
        except KeyboardInterrupt:
            soak.violation("interrupted")
        finally:
            soak.close()
        report = soak.report()
    if args.json:
        print(json.dumps(report, indent=1))
    rep = report
    soak.say(f"soak: {rep['kills']} kills, outages mean {rep['outage_seconds']['mean']} s, "
             f"max {rep['outage_seconds']['max']} s; fds {rep['fds']['start']} -> "
             f"{rep['fds']['end']}, maps {rep['maps']['start']} -> {rep['maps']['end']}")
    for name, s in rep["streams"].items():
        soak.say(f"soak: {name}: sent {s['sent']}, received {s['received']}, lost in outages "
                 f"{s['lost_in_outages']}, lost outside {s['lost_outside_outages']}, "
                 f"duplicates {s['duplicates']}")
    if soak.violations:
        soak.say(f"soak: FAILED, {len(soak.violations)} violations")
        status = 1
    else:
        soak.say("soak: OK")
        for p in workdir.iterdir():
            p.unlink()
        workdir.rmdir()
    return status


if __name__ == "__main__":
    sys.exit(main())
