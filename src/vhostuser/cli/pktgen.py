"""``vhost-user pktgen``: send and count frames through any vhost-user net back-end."""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import VhostUserError
from ..frontends.net import (
    PROBE_MIN_FRAME,
    ProbeLedger,
    VirtioNetFrontend,
    probe_template,
    read_probe,
    stamp_probe,
)
from ..io.pcap import PcapWriter
from ..virtio.net import parse_mac
from ._common import add_wait, announce_wait, connect_error, path_error, positive, seconds

DESCRIPTION = """\
Connect to a vhost-user net back-end as a virtio-net driver (no VM), send UDP probe frames
(sequence number and send time inside) and count what comes back. Against an echo port,
a switch port looped back, or DPDK testpmd in macswap/io mode, every frame should return:
the summary gives the rates, the frames lost, duplicated or reordered, and the round-trip
latency. Against a sink (DPDK rxonly) use --tx-only; to only count what arrives (e.g. from
DPDK txonly through a switch) use --rx-only.

When the back-end goes away (it crashed or was restarted), pktgen keeps its guest memory
and rings and waits up to --reconnect seconds for a back-end to take them over, then goes
on. Frames that were on their way when it went away, or sent while it was gone, are lost
with it: they are counted apart (lost in outages), with the number of reconnects and the
time without a back-end.
"""

EPILOG = """\
examples:
  vhost-user pktgen /tmp/echo.sock --count 100000                 # as fast as possible
  vhost-user pktgen /tmp/echo.sock --rate 20000 --duration 10 --size 1500 --flows 8
  vhost-user pktgen /tmp/dpdk-vhost.sock --count 1000000 --json   # testpmd macswap
  vhost-user pktgen /tmp/sw-port.sock --rx-only --duration 5       # count arrivals

  vhost-user pktgen /tmp/sw-port.sock --rate 5000 --duration 60 --reconnect 10
                                  # survives restarts of the switch within 10 s each

exit status: 0 when every frame expected back came back (or --tx-only/--rx-only), or was
lost only in an outage of the back-end; 1 when frames were lost otherwise; 2 on a usage or
connection error, or when the back-end stayed away longer than --reconnect (or came back
without a feature the session was built on: the error names it).
"""


def add_parser(sub: Any) -> None:
    """Register ``pktgen`` on the top-level subparsers."""
    p: argparse.ArgumentParser = sub.add_parser(
        "pktgen",
        help="send and count frames through a vhost-user net back-end",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("socket", metavar="SOCKET", help="the back-end's vhost-user socket")
    t = p.add_argument_group("traffic")
    t.add_argument("--size", type=int, default=64, metavar="BYTES",
                   help=f"frame size without FCS, {PROBE_MIN_FRAME}..MTU+14 (default 64)")
    t.add_argument("--count", type=positive(int), default=None, metavar="N",
                   help="frames to send (default: unlimited with --duration, else 10000)")
    t.add_argument("--rate", type=positive(float), default=None, metavar="PPS",
                   help="frames per second (default: as fast as possible)")
    t.add_argument("--duration", type=positive(float), default=None, metavar="SECONDS",
                   help="stop sending after this long")
    t.add_argument("--flows", type=positive(int), default=1, metavar="N",
                   help="distinct flows (IPv4 source + UDP port), round robin (default 1)")
    t.add_argument("--burst", type=positive(int), default=32, metavar="N",
                   help="frames per kick (default 32)")
    t.add_argument("--src-mac", default="02:00:00:00:00:01", metavar="MAC",
                   help="source MAC (default 02:00:00:00:00:01)")
    t.add_argument("--dst-mac", default="02:00:00:00:00:02", metavar="MAC",
                   help="destination MAC (default 02:00:00:00:00:02)")
    t.add_argument("--drain", type=seconds, default=1.0, metavar="SECONDS",
                   help="after sending, wait this long for frames still coming (default 1)")
    m = p.add_argument_group("mode")
    x = m.add_mutually_exclusive_group()
    x.add_argument("--tx-only", action="store_true",
                   help="do not expect frames back (a sink such as DPDK rxonly)")
    x.add_argument("--rx-only", action="store_true",
                   help="send nothing; count every frame that arrives (needs --duration)")
    d = p.add_argument_group("device")
    d.add_argument("--packed", action="store_true", help="packed virtqueues")
    d.add_argument("--no-mrg-rxbuf", action="store_true",
                   help="do not negotiate mergeable receive buffers")
    d.add_argument("--no-event-idx", action="store_true", help="do not negotiate EVENT_IDX")
    d.add_argument("--queue-size", type=int, default=256, metavar="N",
                   help="descriptors per virtqueue (default 256)")
    d.add_argument("--mtu", type=int, default=1500, metavar="N", help="MTU (default 1500)")
    d.add_argument("--listen", action="store_true",
                   help="listen on SOCKET for a back-end in client mode (DPDK client=1)")
    add_wait(d)
    d.add_argument("--reconnect", type=seconds, default=30.0, metavar="SECONDS",
                   help="when the back-end goes away, wait up to SECONDS for one to take "
                        "the session over and go on (default 30; 0: end the run)")
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print the summary as JSON")
    o.add_argument("--pcap", metavar="FILE",
                   help="write every frame sent and received to FILE (pcap, for tcpdump "
                        "and Wireshark); a disk that cannot keep up drops captured frames "
                        "(counted in the summary), never the traffic")
    o.add_argument("--quiet", "-q", action="store_true", help="no live progress line")
    p.set_defaults(func=run)


@dataclass
class Result:
    """What a pktgen run measured."""

    sent: int = 0
    received: int = 0
    ours: int = 0
    foreign: int = 0
    duplicates: int = 0
    reordered: int = 0
    tx_seconds: float = 0.0
    rx_seconds: float = 0.0
    tx_bytes: int = 0
    rx_bytes: int = 0
    latencies_ns: list[int] = field(default_factory=list)
    interrupted: bool = False
    reconnects: int = 0
    outage_seconds: float = 0.0
    lost_in_outages: int = 0
    """Frames expected back that were in flight when the back-end went away, or sent
    while it was away, and never came back."""

    def summary(self, expect_back: bool) -> dict[str, Any]:
        """A JSON-ready summary."""
        tx_pps = self.sent / self.tx_seconds if self.tx_seconds > 0 else 0.0
        rx_pps = self.received / self.rx_seconds if self.rx_seconds > 0 else 0.0
        out: dict[str, Any] = {
            "sent": self.sent,
            "received": self.received,
            "received_ours": self.ours,
            "received_foreign": self.foreign,
            "tx_pps": round(tx_pps, 1),
            "rx_pps": round(rx_pps, 1),
            "tx_mbps": round(self.tx_bytes * 8 / self.tx_seconds / 1e6, 3)
            if self.tx_seconds > 0 else 0.0,
            "rx_mbps": round(self.rx_bytes * 8 / self.rx_seconds / 1e6, 3)
            if self.rx_seconds > 0 else 0.0,
            "duplicates": self.duplicates,
            "reordered": self.reordered,
            "interrupted": self.interrupted,
            "reconnects": self.reconnects,
            "outage_seconds": round(self.outage_seconds, 3),
        }
        if expect_back:
            lost = max(0, self.sent - self.ours)
            out["lost"] = lost
            out["lost_in_outages"] = min(lost, self.lost_in_outages)
            out["lost_outside_outages"] = lost - out["lost_in_outages"]
        lat = sorted(self.latencies_ns)
        if lat:
            def pct(q: float) -> float:
                return round(lat[min(len(lat) - 1, int(q * len(lat)))] / 1000, 1)
            out["latency_us"] = {
                "min": round(lat[0] / 1000, 1), "avg": round(sum(lat) / len(lat) / 1000, 1),
                "p50": pct(0.5), "p99": pct(0.99), "max": round(lat[-1] / 1000, 1),
                "samples": len(lat),
            }
        return out


class Pktgen:
    """The send/receive loop (usable from tests as well as from the command line).

    ``on_event(text)`` hears of outages as they start and end (the back-end went away, a
    new one took over).
    """

    def __init__(self, nic: VirtioNetFrontend, *, size: int, flows: int, src_mac: bytes,
                 dst_mac: bytes, magic: int | None = None,
                 on_event: Callable[[str], None] | None = None,
                 capture: PcapWriter | None = None) -> None:
        self.nic = nic
        self.capture = capture
        """Where every frame sent and received is copied (``--pcap``), or None."""
        self.magic = magic if magic is not None else random.randrange(0x100, 0xFFFF)
        self.templates = [
            probe_template(size, src_mac=src_mac, dst_mac=dst_mac, flow=k, magic=self.magic)
            for k in range(flows)
        ]
        self.result = Result()
        self.ledger = ProbeLedger()
        self.on_event = on_event
        self._last_seq = [-1] * flows
        self._lat_every = 1
        self._outage_lo: int | None = None
        # Frames that can be on their way at once: a transmit and a receive ring's worth.
        self._in_flight_cap = 2 * nic.queue_size

    def _track_outage(self) -> bool:
        """True while the back-end is away. When one goes away, the frames that may be on
        their way open an outage window; when a new one takes over, whatever of the window
        has not come back by then is written off as lost in the outage (and no longer
        holds a place among the frames on their way)."""
        nic = self.nic
        r = self.result
        if not nic.connected:
            if self._outage_lo is None:
                self._outage_lo = max(0, r.sent - self._in_flight_cap)
                if self.on_event is not None:
                    self.on_event(f"{nic.last_disconnect_reason} after {r.sent} frames; "
                                  "waiting for a back-end to take the session over")
            return True
        if self._outage_lo is not None:
            self.ledger.close_window(self._outage_lo, r.sent)
            self._outage_lo = None
            if self.on_event is not None:
                start, end = nic.outages[-1]
                took = f" after {end - start:.2f} s" if end is not None else ""
                self.on_event(f"a back-end took the session over{took} (reconnect "
                              f"{nic.reconnects})")
        return False

    def _finish_outages(self) -> None:
        """Close a window still open at the end and copy the outage figures."""
        r = self.result
        nic = self.nic
        if self._outage_lo is not None:
            self.ledger.close_window(self._outage_lo, r.sent)
            self._outage_lo = None
        r.reconnects = nic.reconnects
        r.outage_seconds = nic.stats.outage_seconds
        if nic.outages and nic.outages[-1][1] is None:
            r.outage_seconds += time.monotonic() - nic.outages[-1][0]
        r.lost_in_outages = self.ledger.lost_in_windows

    def _account(self, frames: list[bytes], now_ns: int) -> None:
        r = self.result
        flows = len(self.templates)
        for f in frames:
            r.received += 1
            r.rx_bytes += len(f)
            got = read_probe(f, self.magic)
            if got is None:
                r.foreign += 1
                continue
            seq, t = got
            if seq >= r.sent:  # carries our magic, but we never sent that number
                r.foreign += 1
                continue
            if not self.ledger.see(seq):
                r.duplicates += 1
                continue
            r.ours += 1
            k = seq % flows
            if seq < self._last_seq[k]:
                r.reordered += 1
            else:
                self._last_seq[k] = seq
            if seq % self._lat_every == 0:
                r.latencies_ns.append(now_ns - t)

    def receive(self) -> int:
        """Take whatever arrived; how many frames."""
        frames = self.nic.recv()
        if frames:
            self._account(frames, time.monotonic_ns())
            if self.capture is not None:
                for f in frames:
                    self.capture.capture(f)
        return len(frames)

    def run(self, *, count: int | None, rate: float, duration: float | None, burst: int,
            drain: float, send: bool = True, expect_back: bool = True,
            progress: Any = None) -> Result:
        """Send ``count`` frames (or for ``duration`` s) at ``rate`` pps, counting arrivals.

        ``progress(result, elapsed)`` is called about every second.

        Raises:
            PeerClosedError: the back-end went away and none took over in time.
            BackendChangedError: one took over without a bit the session was built on.
            RingError: the back-end broke a ring.
        """
        r = self.result
        if count is not None and count > 100_000:
            self._lat_every = max(1, count // 100_000)
        t0 = time.monotonic()
        pool = [bytearray(len(self.templates[0])) for _ in range(burst)]
        try:
            if send:
                self._send(count, rate, duration, burst, expect_back, progress, t0, pool)
        except KeyboardInterrupt:
            # Ctrl-C: stop sending; the summary covers the time it ran, and frames still
            # on their way get a short drain instead of being counted as lost.
            r.interrupted = True
            drain = min(drain, 0.5)
        r.tx_seconds = time.monotonic() - t0
        # Receive what is still on its way.
        end = time.monotonic() + (drain if send else (duration or 0.0))
        if r.interrupted:
            end = time.monotonic() + drain
        try:
            self._drain(end, send, expect_back, progress, t0)
        except KeyboardInterrupt:
            r.interrupted = True
        finally:
            self._finish_outages()
        r.rx_seconds = time.monotonic() - t0
        return r

    def _send(self, count: int | None, rate: float, duration: float | None, burst: int,
              expect_back: bool, progress: Any, t0: float, pool: list[bytearray]) -> None:
        r = self.result
        nic = self.nic
        templates = self.templates
        nflows = len(templates)
        size = len(templates[0])
        next_progress = t0 + 1.0
        seq = 0
        window = max(1, nic.queue_size - burst)
        blocked: float | None = None
        while True:
            now = time.monotonic()
            elapsed = now - t0
            if (count is not None and seq >= count) or (duration is not None
                                                         and elapsed >= duration):
                break
            if self._track_outage():
                # No back-end: nothing to send to. wait() is where a new one is taken up
                # (or PeerClosedError raised once --reconnect seconds have passed).
                blocked = None
                nic.wait(0.05)
                if progress is not None and now >= next_progress:
                    progress(r, now - t0)
                    next_progress = now + 1.0
                continue
            n = burst
            if count is not None:
                n = min(n, count - seq)
            if expect_back:
                # Never more frames on their way back than our receive ring holds: beyond
                # that the back-end finds no receive buffer and drops them (counted there
                # as no_rx_buffer), which would be our loss, not the back-end's.
                room = window - (seq - r.ours - r.foreign - self.ledger.lost_in_windows)
                if room <= 0:
                    if blocked is None:
                        blocked = now
                    elif now - blocked > 5.0:
                        break  # nothing comes back: stop; the summary counts the loss
                    if not self.receive():
                        nic.wait(0.001)
                    continue
                blocked = None
                n = min(n, room)
            if rate > 0:
                due = int(elapsed * rate) + 1 - seq
                if due <= 0:
                    self.receive()
                    wait = (seq + 1) / rate - elapsed
                    if wait > 0.0005:
                        nic.wait(min(wait, 0.01))
                    continue
                n = min(n, due)
            tns = time.monotonic_ns()
            for k in range(n):
                b = pool[k]
                b[:] = templates[(seq + k) % nflows]
                stamp_probe(b, seq + k, tns, self.magic)
            got = nic.send(pool[:n])
            if self.capture is not None:
                for b in pool[:got]:
                    self.capture.capture(b)
            seq += got
            r.sent = seq
            r.tx_bytes += got * size
            if got < n:
                # The ring is full: take what came back and give the back-end a moment.
                self.receive()
                nic.wait(0.001)
            if expect_back:
                self.receive()
            if progress is not None and now >= next_progress:
                progress(r, now - t0)
                next_progress = now + 1.0

    def _drain(self, end: float, send: bool, expect_back: bool, progress: Any,
               t0: float) -> None:
        r = self.result
        nic = self.nic
        last_got = time.monotonic()
        next_progress = t0 + 1.0
        while True:
            now = time.monotonic()
            if now >= end:
                break
            self._track_outage()
            if send and expect_back and r.ours + self.ledger.lost_in_windows >= r.sent \
                    and now - last_got > 0.05:
                break
            got = self.receive()
            if got:
                last_got = now
            else:
                nic.wait(min(0.05, end - now))
            if progress is not None and now >= next_progress:
                progress(r, now - t0)
                next_progress = now + 1.0


def run(args: argparse.Namespace) -> int:
    """Entry point of ``vhost-user pktgen``."""
    try:
        src = parse_mac(args.src_mac)
        dst = parse_mac(args.dst_mac)
    except ValueError as e:
        print(f"vhost-user pktgen: {e}", file=sys.stderr)
        return 2
    if args.size < PROBE_MIN_FRAME or args.size > args.mtu + 14:
        print(f"vhost-user pktgen: --size {args.size} is outside {PROBE_MIN_FRAME}.."
              f"{args.mtu + 14}", file=sys.stderr)
        return 2
    if args.flows < 1 or args.burst < 1:
        print("vhost-user pktgen: --flows and --burst must be at least 1", file=sys.stderr)
        return 2
    if args.rx_only and args.duration is None:
        print("vhost-user pktgen: --rx-only needs --duration", file=sys.stderr)
        return 2
    count = args.count
    if count is None and args.duration is None:
        count = 10000
    kw: dict[str, Any] = {
        "packed": args.packed, "mrg_rxbuf": not args.no_mrg_rxbuf,
        "event_idx": not args.no_event_idx, "queue_size": args.queue_size, "mtu": args.mtu,
        "mac": args.src_mac, "reconnect": args.reconnect > 0,
        "reconnect_timeout": args.reconnect,
    }
    if not args.listen:
        announce_wait("pktgen", args.socket, args.wait)
    try:
        nic = (VirtioNetFrontend.accept(args.socket, **kw) if args.listen
               else VirtioNetFrontend.connect(args.socket, connect_timeout=args.wait, **kw))
    except KeyboardInterrupt:
        print(f"vhost-user pktgen: interrupted ({args.socket})", file=sys.stderr)
        return 130
    except (VhostUserError, OSError, ValueError) as e:
        msg = path_error(args.socket, e) if args.listen else connect_error(args.socket, e)
        print(f"vhost-user pktgen: {msg}", file=sys.stderr)
        return 2
    live = sys.stderr.isatty() and not args.quiet

    def progress(r: Result, elapsed: float) -> None:
        if not live:
            return
        rate = r.sent / elapsed if elapsed > 0 else 0.0
        rx = r.received / elapsed if elapsed > 0 else 0.0
        again = f"  reconnects {nic.reconnects}" if nic.reconnects else ""
        sys.stderr.write(f"\r{elapsed:6.1f}s  sent {r.sent:>10}  {rate:>10.0f} pps  "
                         f"recv {r.received:>10}  {rx:>10.0f} pps  lost "
                         f"{max(0, r.sent - r.ours) if not args.tx_only else '-':>8}{again} ")
        sys.stderr.flush()

    def event(text: str) -> None:
        if not args.quiet:
            sys.stderr.write(f"{chr(10) if live else ''}vhost-user pktgen: {args.socket}: "
                             f"{text}\n")
            sys.stderr.flush()

    expect = not (args.tx_only or args.rx_only)
    capture: PcapWriter | None = None
    if args.pcap:
        try:
            capture = PcapWriter(args.pcap)
        except OSError as e:
            nic.close()
            print(f"vhost-user pktgen: --pcap {path_error(args.pcap, e)}", file=sys.stderr)
            return 2
    with nic, contextlib.ExitStack() as stack:
        if capture is not None:
            stack.callback(capture.close)
        gen = Pktgen(nic, size=args.size, flows=args.flows, src_mac=src, dst_mac=dst,
                     on_event=event, capture=capture)
        try:
            res = gen.run(count=count, rate=args.rate or 0.0, duration=args.duration,
                          burst=args.burst, drain=args.drain, send=not args.rx_only,
                          expect_back=expect, progress=progress)
        except KeyboardInterrupt:  # (between the loops; inside them run() handles it)
            res = gen.result
            res.interrupted = True
        except VhostUserError as e:
            print(f"\nvhost-user pktgen: the back-end on {args.socket} went away or broke "
                  f"the queue after {gen.result.sent} frames: {e}", file=sys.stderr)
            return 2
        summary = res.summary(expect)
        summary["device"] = {"features": hex(nic.features), "packed": nic.packed,
                             "mergeable": nic.mergeable, "header": nic.hdr_len}
        summary["frontend"] = nic.stats.as_dict()
        if capture is not None:
            capture.close()
            summary["capture"] = capture.counters()
    if live:
        sys.stderr.write("\n")
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"sent      {summary['sent']} frames of {args.size} bytes in "
              f"{res.tx_seconds:.2f} s: {summary['tx_pps']:.0f} pps, "
              f"{summary['tx_mbps']:.1f} Mbit/s")
        print(f"received  {summary['received']} frames ({summary['received_ours']} ours): "
              f"{summary['rx_pps']:.0f} pps, {summary['rx_mbps']:.1f} Mbit/s")
        if expect:
            print(f"lost      {summary['lost']}   duplicated {summary['duplicates']}   "
                  f"reordered {summary['reordered']}")
        if res.reconnects or res.outage_seconds:
            in_outages = (f"; lost in outages {summary['lost_in_outages']}, outside "
                          f"{summary['lost_outside_outages']}" if expect else "")
            print(f"outages   {res.reconnects} reconnects, {res.outage_seconds:.2f} s without "
                  f"a back-end{in_outages}")
        lat = summary.get("latency_us")
        if lat:
            print(f"latency   min {lat['min']} / avg {lat['avg']} / p50 {lat['p50']} / "
                  f"p99 {lat['p99']} / max {lat['max']} us ({lat['samples']} samples)")
        cap = summary.get("capture")
        if cap:
            print(f"pcap      {cap['file']}: {cap['written']} frames"
                  + (f", {cap['dropped']} not captured (the disk fell behind)"
                     if cap["dropped"] else ""))
        if res.interrupted:
            print("interrupted (Ctrl-C): the numbers cover the time it ran")
    if res.interrupted:
        return 130
    return 1 if expect and summary.get("lost_outside_outages") else 0
