"""``vhost-user blk``: serve a raw image or block device as a vhost-user-blk back-end."""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from typing import Any, Final

from .. import engine as engines
from ..connection import events as ev
from ..devices.blk import SECTOR_SIZE, BlkDevice
from ..io.backend import BackendServer, BackendSession
from ..io.blkfile import BlkFile
from ..io.reactor import Reactor
from ._common import (
    add_verbose,
    error_text,
    flag_text,
    octal_mode,
    path_error,
    setup_logging,
    stop_on_signals,
)

EPILOG = """\
examples:
  qemu-img create -f raw disk.raw 1G
  vhost-user blk --image disk.raw --socket /tmp/blk.sock
  # guest RAM must be shared, and -m must equal the memory backend's size
  qemu-system-x86_64 ... -m 1G \\
    -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\
    -chardev socket,id=c1,path=/tmp/blk.sock,reconnect=1 \\
    -device vhost-user-blk-pci,chardev=c1,num-queues=1

  # QEMU listens (-chardev socket,...,server=on) and we connect to it
  vhost-user blk --image disk.raw --socket /tmp/qemu-blk.sock --connect

  vhost-user blkbench /tmp/blk.sock --rw randread --bs 4k --iodepth 32

  # the same with every request in the pure-Python engine
  vhost-user blk --engine python --image disk.raw --socket /tmp/blk.sock

Requests in flight when this process dies are kept in the inflight area the front-end
holds (INFLIGHT_SHMFD); a restarted back-end resubmits them when the front-end reconnects
(QEMU: chardev reconnect=1) and hands the area back. Writes go through the page cache; a
FLUSH request makes them durable (fdatasync). SIGINT or SIGTERM stops the back-end and
removes the socket.

Live migration on one host: the destination QEMU (started with -incoming) connects to the
same socket while the source still runs, so two front-ends are served at once by default
(--sessions 2), both on this one image. QEMU runs one of them at a time: the source stops
its queues (GET_VRING_BASE, after the requests this back-end still holds are completed)
before the destination starts its own. A queue started while another front-end's run is
logged as a warning (two guests writing one disk corrupt it); --sessions 1 refuses any
second front-end while one is connected.
  qemu-system-x86_64 ... -chardev socket,id=c1,path=/tmp/blk.sock \\
    -device vhost-user-blk-pci,chardev=c1,num-queues=1 -incoming unix:/tmp/mig
  (then on the source's monitor: migrate unix:/tmp/mig)

Testing a front-end's recovery: with --latency 2000 every request stays in flight for two
seconds; kill -9 this process meanwhile and start it again, and the front-end's requests
are resubmitted ("resubmitting N requests" with -v) and complete exactly once.
"""


def _latency_ms(text: str) -> float:
    """``--latency``: milliseconds (0..3600000) as seconds.

    Raises:
        argparse.ArgumentTypeError: not a number in range.
    """
    try:
        ms = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"latency {text!r} is not a number of ms") from None
    if not 0 <= ms <= 3_600_000:
        raise argparse.ArgumentTypeError(f"latency {text} ms is outside 0..3600000")
    return ms / 1000.0


MAX_SESSIONS: Final = 2
"""Front-ends served at once at most: one, and a live migration's destination."""

log = logging.getLogger("vhostuser.cli.blk")


def _sessions(text: str) -> int:
    """``--sessions``: 1 or 2.

    Raises:
        argparse.ArgumentTypeError: not an integer in 1..2.
    """
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"sessions {text!r} is not an integer") from None
    if not 1 <= n <= MAX_SESSIONS:
        raise argparse.ArgumentTypeError(
            f"sessions {n} is outside 1..{MAX_SESSIONS}: a second front-end is for a live "
            "migration's destination; more would only let more guests write one disk")
    return n


def add_parser(sub: Any) -> None:
    """Register ``blk`` on the top-level subparsers."""
    p: argparse.ArgumentParser = sub.add_parser(
        "blk",
        help="serve a raw image or block device as a vhost-user-blk back-end",
        description=(
            "Serve a raw disk image or a block device over vhost-user-blk until SIGINT or "
            "SIGTERM: requests IN, OUT, FLUSH, GET_ID, DISCARD and WRITE_ZEROES, config space "
            "through GET_CONFIG, several queues, and crash-consistent inflight tracking. By "
            "default it listens (QEMU '-chardev socket,path=PATH'); with --connect it "
            "connects to a listening front-end (QEMU 'server=on') and reconnects."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--image", required=True, metavar="FILE",
                   help="raw image file or block device (size a multiple of 512)")
    p.add_argument("--socket", required=True, metavar="PATH", help="socket path")
    p.add_argument("--connect", action="store_true",
                   help="connect to a listening front-end instead of listening")
    p.add_argument("--read-only", action="store_true",
                   help="open the image read-only and offer VIRTIO_BLK_F_RO")
    p.add_argument("--queues", type=int, default=1, metavar="N",
                   help="request queues (VIRTIO_BLK_F_MQ; default 1)")
    p.add_argument("--serial", default="", metavar="S",
                   help="device serial returned by GET_ID (ASCII, at most 20 bytes)")
    p.add_argument("--blk-size", type=int, default=SECTOR_SIZE, metavar="BYTES",
                   help="logical block size (VIRTIO_BLK_F_BLK_SIZE; default 512)")
    p.add_argument("--no-discard", action="store_true", help="do not offer DISCARD")
    p.add_argument("--no-write-zeroes", action="store_true", help="do not offer WRITE_ZEROES")
    p.add_argument("--no-inflight", action="store_true",
                   help="do not offer INFLIGHT_SHMFD (no resubmission after a crash)")
    p.add_argument("--latency", type=_latency_ms, default=0.0, metavar="MS",
                   help="carry out and complete each request MS milliseconds after it "
                        "arrives: a slow disk, for testing a front-end's timeouts and its "
                        "reconnection with requests in flight (default 0)")
    p.add_argument("--engine", choices=engines.ENGINES, default=None,
                   help="request engine: compiled (C, when built at install: reads and "
                        "writes straight between the image and guest memory), python, or "
                        f"auto (compiled when built; default ${engines.ENV} or auto)")
    p.add_argument("--sessions", type=_sessions, default=MAX_SESSIONS, metavar="N",
                   help="front-ends served at once, 1 or 2 (default 2): the second is the "
                        "destination QEMU of a live migration on this host, which connects "
                        "to the same socket while the source still runs (see below); 1 "
                        "refuses it")
    p.add_argument("--mode", type=octal_mode, default=0o600,
                   help="socket file mode in octal (default 600)")
    add_verbose(p, "sessions and recoveries")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``vhost-user blk``; returns the exit status."""
    setup_logging(args.verbose)
    try:
        engine = engines.select(args.engine)
    except engines.EngineUnavailableError as e:
        print(f"vhost-user blk: {flag_text(e)}", file=sys.stderr)
        return 2
    fast = engines.compiled() if engine == "compiled" else None
    try:
        image = BlkFile.open(args.image, read_only=args.read_only)
    except (OSError, ValueError) as e:
        print(f"vhost-user blk: cannot open image: {error_text(e)}", file=sys.stderr)
        return 2

    def make_device() -> BlkDevice:
        dev = BlkDevice(
            image, num_queues=args.queues, read_only=args.read_only, serial=args.serial,
            blk_size=args.blk_size, discard=not args.no_discard,
            write_zeroes=not args.no_write_zeroes, inflight=not args.no_inflight,
            latency=args.latency,
        )
        if fast is not None:
            dev.accelerator = fast.blk_serve
        return dev

    try:
        make_device()  # check the parameters once, before any front-end sees them
    except ValueError as e:
        image.close()
        print(f"vhost-user blk: {flag_text(e)}", file=sys.stderr)
        return 2
    reactor = Reactor()

    running: dict[BackendSession, set[int]] = {}  # live sessions -> queues started

    def on_ring(s: BackendSession, e: ev.Event) -> None:
        queues = running.get(s)
        if queues is None:
            return
        if isinstance(e, ev.VringStarted):
            others = [o.name for o, q in running.items() if o is not s and q]
            queues.add(e.index)
            if others:
                log.warning(
                    "%s started queue %d while %s runs its queues too: two drivers write "
                    "this one disk at once, which corrupts it; a live migration never "
                    "does this (its source stops its queues before the destination starts)",
                    s.name, e.index, " and ".join(others))
        elif isinstance(e, ev.VringStopped | ev.VringBroken):
            queues.discard(e.index)
        elif isinstance(e, ev.DeviceReset):
            queues.clear()

    def on_session(s: BackendSession) -> None:
        others = [o.name for o in running]
        if len(others) >= args.sessions:
            log.warning(
                "%s: refusing another front-end (%s): %s already connected (--sessions %d; "
                "the second one is for a live migration's destination)", args.socket,
                s.name, " and ".join(others), args.sessions)
            s.close(f"refused: {len(others)} front-end(s) already connected")
            return
        running[s] = set()
        original = s.on_close

        def closed(sess: BackendSession) -> None:
            running.pop(sess, None)
            if original is not None:
                original(sess)

        s.on_close = closed
        s.conn.dispatcher.subscribe(functools.partial(on_ring, s))
        if others:
            print(f"front-end connected ({s.name}) while {' and '.join(others)} is "
                  "connected: both are served, on this one image (a live migration's "
                  "destination)", flush=True)
        else:
            print(f"front-end connected ({s.name})", flush=True)

    try:
        # At most --sessions front-ends at once (see EPILOG: a migration's destination
        # beside its source); one more is accepted by the server only to be turned away
        # by on_session with a message that says why.
        server = BackendServer(reactor, args.socket, make_device, connect=args.connect,
                               mode=args.mode, on_session=on_session,
                               max_sessions=args.sessions + 1)
    except (OSError, ValueError) as e:
        image.close()
        reactor.close()
        print(f"vhost-user blk: {path_error(args.socket, e)}", file=sys.stderr)
        return 2

    where = "connecting to" if args.connect else "listening on"
    ro = ", read-only" if image.read_only or args.read_only else ""
    print(f"vhost-user blk: {args.image} ({image.size // SECTOR_SIZE} sectors{ro}, "
          f"{args.queues} queue(s), {engine} engine) {where} {args.socket}", flush=True)
    with stop_on_signals(reactor):
        try:
            reactor.run()
        finally:
            server.close()
    reactor.close()
    image.close()
    print(f"vhost-user blk: stopped after {server.closed_sessions} session(s)"
          + (f"; last: {server.last_close_reason}" if server.last_close_reason else ""),
          flush=True)
    return 0
