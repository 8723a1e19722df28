"""``vhost-user switch``: a learning Ethernet switch for VMs, DPDK and taps."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import time
from typing import Any, TextIO

from ..engine import ENGINES, ENV
from ..errors import VhostUserError
from ..io.reactor import Reactor
from ..switch import DEFAULT_AGING, Switch
from ..virtio.net import DEFAULT_MTU, parse_mac
from ._common import (
    add_verbose,
    flag_text,
    octal_mode,
    path_error,
    positive,
    setup_logging,
    stop_on_signals,
)
from .serve import add_draft_options, dialect_of

DESCRIPTION = """\
Run a learning Ethernet switch whose ports are vhost-user NICs (QEMU guests, DPDK
virtio-user, vhost-user pktgen), kernel tap interfaces and echo ports. Frames to learned
addresses go to one port; broadcast, multicast and unknown unicast are flooded. Runs until
SIGINT/SIGTERM, then closes every connection, removes the sockets it listened on and closes
its taps (a tap it created disappears).

Port options: each PATH or NAME may be followed by ,key=value options:
  name=N         port name in counters (default p0, p1, ... / the tap name / echo)
  mac=MAC        the NIC's MAC in config space (default 52:54:00:5e:00:NN)
  mtu=N          MTU offered (VIRTIO_NET_F_MTU; default --mtu)
  queues=N       queue pairs offered (VIRTIO_NET_F_MQ when N > 1; default --queue-pairs)
  offloads=on    offer checksum/TSO offloads on this port (default --offloads)
  config=on      offer the CONFIG protocol feature (GET_CONFIG: mac, status, mtu)
"""

EPILOG = """\
examples:
  # two QEMU guests on one switch, and the host through tap0
  vhost-user switch --port /tmp/vm1.sock --port /tmp/vm2.sock --tap tap0
  qemu-system-x86_64 ... -m 256M \\
      -object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem \\
      -chardev socket,id=c0,path=/tmp/vm1.sock,reconnect=1 \\
      -netdev vhost-user,id=n0,chardev=c0 -device virtio-net-pci,netdev=n0,vectors=0
  (guest RAM must be shared; vectors=0 because QEMU 7.2 under TCG crashes with MSI-X on
  vhost-user NICs; reconnect=1 lets the guest survive a restart of the switch)

  # a guest with 2 queue pairs (QEMU: -netdev ...,queues=2 -device ...,mq=on)
  vhost-user switch --port /tmp/vm1.sock,queues=2 --port /tmp/vm2.sock

  # QEMU listens (server=on) and we connect, reconnecting when it restarts
  vhost-user switch --connect /tmp/qemu.sock --port /tmp/other.sock

  # DPDK: virtio-user txonly -> switch -> virtio-user rxonly, busy-polling
  vhost-user switch --busy-poll --port /tmp/a.sock --port /tmp/b.sock

  # the same with the pure-Python burst engine (default: compiled when it was built)
  vhost-user switch --engine python --port /tmp/a.sock --port /tmp/b.sock

  # an echo port for vhost-user pktgen, counters as JSON lines every second
  vhost-user switch --echo /tmp/echo.sock --stats-json - --stats-interval 1

  # capture every port's frames, both directions, for tcpdump / Wireshark
  vhost-user switch --port /tmp/vm1.sock --port /tmp/vm2.sock --pcap /tmp/cap
  tcpdump -nn -e -r /tmp/cap/p0.pcap

  # live migration on one host: the destination QEMU connects to the SAME port socket
  # (as libvirt does) while the source runs; it stands by and takes the port when it
  # starts its rings (the source has stopped its own) or when the source quits
  qemu-system-x86_64 ... -chardev socket,id=c0,path=/tmp/vm1.sock ... -incoming unix:/tmp/mig
  (then on the source's monitor: migrate unix:/tmp/mig)

  # every vhost-user port speaks the 2014 draft (text numbering; or --draft-numbering code)
  vhost-user switch --draft --port /tmp/a.sock --echo /tmp/echo.sock
  vhost-user probe --draft /tmp/a.sock

counters (per port, from the port's side): rx = frames the attached driver sent into the
switch, tx = frames delivered to it, drops by reason: runt, oversize, bad_header,
queue_disabled, no_rx_buffer, rx_down, rx_buffer_small, offload, tap_full, ring_broken,
standby (sent by a second front-end standing by). A listening vhost-user port keeps at most
two front-ends: the active one and one standby (--stats-json shows it); a third is refused.
"""


def _on(value: str) -> bool:
    v = value.lower()
    if v in ("on", "yes", "true", "1"):
        return True
    if v in ("off", "no", "false", "0"):
        return False
    raise ValueError(f"{value!r} is not on/off")


def parse_port_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``PATH[,key=value...]`` into the path and keyword arguments for a port.

    Raises:
        ValueError: an unknown key or a bad value (the message names it).
    """
    parts = spec.split(",")
    target = parts[0]
    if not target:
        raise ValueError(f"port {spec!r}: empty path or name")
    kw: dict[str, Any] = {}
    for opt in parts[1:]:
        key, sep, value = opt.partition("=")
        if not sep:
            raise ValueError(f"port {spec!r}: option {opt!r} is not key=value")
        try:
            if key == "name":
                kw["name"] = value
            elif key == "mac":
                parse_mac(value)
                kw["mac"] = value
            elif key == "mtu":
                kw["mtu"] = int(value)
            elif key in ("queues", "queue-pairs", "qp"):
                kw["queue_pairs"] = int(value)
            elif key == "offloads":
                kw["offloads"] = _on(value)
            elif key == "config":
                kw["offer_config"] = _on(value)
            else:
                raise ValueError(f"unknown option {key!r} (name, mac, mtu, queues, offloads, "
                                 "config)")
        except ValueError as e:
            raise ValueError(f"port {spec!r}: {e}") from None
    return target, kw


def add_parser(sub: Any) -> None:
    """Register ``switch`` on the top-level subparsers."""
    p: argparse.ArgumentParser = sub.add_parser(
        "switch",
        help="run a learning Ethernet switch with vhost-user, tap and echo ports",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("ports (any number, in any mix)")
    g.add_argument("--port", action="append", default=[], metavar="PATH[,OPT=V]",
                   help="listen on PATH for a front-end (QEMU '-chardev socket,path=PATH', "
                        "DPDK 'net_virtio_user0,path=PATH')")
    g.add_argument("--connect", action="append", default=[], metavar="PATH[,OPT=V]",
                   help="connect to a front-end listening on PATH (QEMU 'server=on', DPDK "
                        "'server=1'); reconnect whenever it goes away")
    g.add_argument("--tap", action="append", default=[], metavar="NAME[,name=N]",
                   help="attach kernel tap interface NAME (created if absent, brought up; "
                        "needs root)")
    g.add_argument("--echo", action="append", default=[], metavar="PATH[,OPT=V]",
                   help="listen on PATH with a port that sends every frame back to its "
                        "sender (not connected to the other ports)")
    o = p.add_argument_group("switching")
    o.add_argument("--busy-poll", action="store_true",
                   help="spin over the transmit queues with kicks suppressed (one CPU at "
                        "100%%, highest rate) instead of sleeping until kicked")
    o.add_argument("--engine", choices=ENGINES, default=None,
                   help="burst engine: compiled (C, when built at install), python, or auto "
                        f"(compiled when built; default ${ENV} or auto)")
    o.add_argument("--aging", type=float, default=DEFAULT_AGING, metavar="SECONDS",
                   help=f"forget a MAC address after this long without traffic "
                        f"(default {DEFAULT_AGING:g})")
    o.add_argument("--max-macs", type=int, default=65536, metavar="N",
                   help="most addresses learned at once; beyond it frames are flooded "
                        "(default 65536)")
    o.add_argument("--mtu", type=int, default=DEFAULT_MTU, metavar="N",
                   help=f"MTU offered to every vhost-user port (default {DEFAULT_MTU})")
    o.add_argument("--queue-pairs", type=int, default=1, metavar="N",
                   help="queue pairs offered to every vhost-user port (default 1)")
    o.add_argument("--offloads", action="store_true",
                   help="offer checksum and TSO offloads (passed between ports that both "
                        "negotiate them; completed in software or dropped otherwise)")
    o.add_argument("--mode", type=octal_mode, default=0o600, metavar="OCTAL",
                   help="mode of the sockets we listen on (default 600)")
    add_draft_options(o)
    s = p.add_argument_group("output")
    s.add_argument("--stats-json", metavar="FILE|-",
                   help="write counters as JSON: to FILE (replaced atomically every "
                        "interval) or, with '-', one JSON line per interval on stdout")
    s.add_argument("--stats-interval", type=float, default=1.0, metavar="SECONDS",
                   help="how often counters are shown or written (default 1)")
    s.add_argument("--quiet", "-q", action="store_true",
                   help="no live counters even on a terminal")
    s.add_argument("--pcap", metavar="DIR",
                   help="capture every port's frames, both directions, into DIR/PORT.pcap "
                        "(tcpdump, tshark, Wireshark read them). A port's file holds "
                        "exactly the frames its rx/tx counters count; frames go through "
                        "the python engine while capturing, and a disk that cannot keep up "
                        "drops captured frames (counted) rather than slowing the switch")
    s.add_argument("--snaplen", type=positive(int), default=65535, metavar="BYTES",
                   help="most bytes kept of each captured frame (default 65535)")
    add_verbose(s, "connections")
    p.set_defaults(func=run)


# -- output --------------------------------------------------------------------------------


def _fmt_n(n: float) -> str:
    for unit in ("", "k", "M", "G"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}T"


def render_table(stats: dict[str, Any], prev: dict[str, Any] | None, dt: float) -> str:
    """The live counter table (one line per port, rates since ``prev``)."""
    prev_ports = {p["name"]: p for p in prev["ports"]} if prev else {}
    lines = [
        f"vhost-user switch  {stats['mode']}  {stats.get('engine', '')} engine  "
        f"up {stats['uptime']:.0f}s  "
        f"macs {stats['macs']}  flooded {stats['flooded']}",
        f"{'port':10} {'kind':10} {'link':4} {'rx pkts':>10} {'rx pps':>8} "
        f"{'tx pkts':>10} {'tx pps':>8} {'drops':>8}  detail",
    ]
    for p in stats["ports"]:
        q = prev_ports.get(p["name"])
        rxr = (p["rx_frames"] - q["rx_frames"]) / dt if q and dt > 0 else 0.0
        txr = (p["tx_frames"] - q["tx_frames"]) / dt if q and dt > 0 else 0.0
        drops = ", ".join(f"{k} {v}" for k, v in p["drops"].items() if v)
        where = p.get("path") or p.get("ifname") or ""
        detail = where + (f"  [{drops}]" if drops else "")
        if p.get("ring_errors"):
            detail += f"  ring errors {p['ring_errors']}: {p.get('last_error')}"
        standby = p.get("standby")
        if standby:
            detail += (f"  standby {standby['session']}"
                       + (" (running)" if standby.get("running") else ""))
        lines.append(
            f"{p['name'][:10]:10} {p['kind']:10} {'up' if p['link'] else 'down':4} "
            f"{p['rx_frames']:>10} {_fmt_n(rxr):>8} {p['tx_frames']:>10} {_fmt_n(txr):>8} "
            f"{p['dropped']:>8}  {detail}"
        )
    return "\n".join(lines)


class StatsOutput:
    """Periodic counters: a live table on a terminal, and/or JSON for scripts."""

    def __init__(self, switch: Switch, *, json_target: str | None, live: bool,
                 out: TextIO) -> None:
        self.switch = switch
        self.json_target = json_target
        self.live = live
        self.out = out
        self.prev: dict[str, Any] | None = None
        self.prev_t = time.monotonic()

    def tick(self) -> None:
        """Show or write the counters once."""
        stats = self.switch.stats()
        now = time.monotonic()
        if self.json_target == "-":
            self.out.write(json.dumps(stats) + "\n")
            self.out.flush()
        elif self.json_target:
            tmp = f"{self.json_target}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(stats, f, indent=1)
                f.write("\n")
            os.replace(tmp, self.json_target)
        if self.live:
            # Home the cursor and clear to the end: the table redraws in place.
            self.out.write("\x1b[H\x1b[J" + render_table(stats, self.prev, now - self.prev_t)
                           + "\n")
            self.out.flush()
        self.prev, self.prev_t = stats, now


# -- main ------------------------------------------------------------------------------------


def build_switch(reactor: Reactor, args: argparse.Namespace) -> Switch:
    """Create the switch and every port the arguments ask for.

    Raises:
        ValueError: a bad port option; OSError/VhostUserError: a port could not start.
        Ports already created are closed before the error propagates.
    """
    sw = Switch(reactor, aging=args.aging, max_macs=args.max_macs, busy_poll=args.busy_poll,
                engine=args.engine)
    common = {"mtu": args.mtu, "queue_pairs": args.queue_pairs, "offloads": args.offloads,
              "dialect": dialect_of(args)}
    try:
        if args.pcap:
            try:
                sw.start_capture(args.pcap, snaplen=args.snaplen)
            except OSError as e:
                raise ValueError(f"--pcap {path_error(args.pcap, e)}") from None
        for spec in args.port:
            path, kw = parse_port_spec(spec)
            sw.add_vhost_user_port(path, mode=args.mode, **{**common, **kw})
        for spec in args.connect:
            path, kw = parse_port_spec(spec)
            sw.add_vhost_user_port(path, connect=True, **{**common, **kw})
        for spec in args.echo:
            path, kw = parse_port_spec(spec)
            sw.add_echo_port(path, mode=args.mode, **{**common, **kw})
        for spec in args.tap:
            ifname, kw = parse_port_spec(spec)
            extra = set(kw) - {"name"}
            if extra:
                raise ValueError(f"tap {spec!r}: only name= applies to a tap")
            sw.add_tap_port(ifname, **kw)
    except BaseException:
        sw.close()
        raise
    return sw


def run(args: argparse.Namespace) -> int:
    """Entry point of ``vhost-user switch``."""
    setup_logging(args.verbose)
    if not (args.port or args.connect or args.tap or args.echo):
        print("vhost-user switch: give at least one --port, --connect, --tap or --echo",
              file=sys.stderr)
        return 2
    if args.stats_interval <= 0:
        print("vhost-user switch: --stats-interval must be positive", file=sys.stderr)
        return 2
    reactor = Reactor()
    try:
        sw = build_switch(reactor, args)
    except (ValueError, OSError, VhostUserError) as e:
        reactor.close()
        print(f"vhost-user switch: {flag_text(e)}", file=sys.stderr)
        return 2

    live = sys.stdout.isatty() and not args.quiet and args.stats_json != "-"
    output = StatsOutput(sw, json_target=args.stats_json, live=live, out=sys.stdout)

    def periodic() -> None:
        try:
            output.tick()
        except OSError as e:  # a full disk or a closed pipe must not stop the switch
            logging.getLogger(__name__).warning("stats output failed: %s", e)
        reactor.call_later(args.stats_interval, periodic)

    if live or args.stats_json:
        reactor.call_later(0 if live else args.stats_interval, periodic)
    if not live and args.stats_json != "-":
        for p in sw.ports:
            info = p.info()
            where = info.get("path") or info.get("ifname")
            mode = info.get("mode", "")
            print(f"vhost-user switch: port {p.name} ({p.kind}{' ' + mode if mode else ''}) "
                  f"{where}", flush=True)
        dialect = dialect_of(args)
        if dialect.is_draft:
            print(f"vhost-user switch: vhost-user ports speak {dialect.description}",
                  flush=True)
        print(f"vhost-user switch: {'busy-polling' if args.busy_poll else 'running'} with the "
              f"{sw.engine} engine; SIGINT/SIGTERM to stop", flush=True)
        if args.pcap:
            print(f"vhost-user switch: capturing every port's frames into {args.pcap}/"
                  "PORT.pcap (the python engine carries them meanwhile)", flush=True)
    # Our handler stays until the end: a second signal during clean-up is absorbed
    # rather than interrupting it (the sockets must be removed).
    with stop_on_signals(reactor) as got:
        try:
            reactor.run()
        finally:
            final = sw.stats()
            captured = sw.stop_capture()
            sw.close()
    reactor.close()
    if args.stats_json == "-":
        print(json.dumps(final), flush=True)
    elif args.stats_json:
        with contextlib.suppress(OSError), open(args.stats_json, "w") as f:
            json.dump(final, f, indent=1)
            f.write("\n")
    if args.stats_json != "-":
        print(render_table(final, None, 0.0), flush=True)
        for c in captured.values():
            print(f"vhost-user switch: {c['file']}: {c['written']} frames captured"
                  + (f", {c['dropped']} dropped (the disk fell behind)" if c["dropped"] else "")
                  + (f"; {c['error']}" if "error" in c else ""), flush=True)
        why = f"signal {signal.Signals(got[0]).name}" if got else "stopped"
        print(f"vhost-user switch: {why}; sockets removed", flush=True)
    return 0
