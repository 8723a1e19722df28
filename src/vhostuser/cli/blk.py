"""``vhost-user blk``: serve a raw image or block device as a vhost-user-blk back-end."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .. import engine as engines
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

    def on_session(s: BackendSession) -> None:
        print(f"front-end connected ({s.name})", flush=True)

    try:
        # One front-end at a time, as qemu-storage-daemon's vhost-user-blk export: two
        # drivers sharing one disk would corrupt it.
        server = BackendServer(reactor, args.socket, make_device, connect=args.connect,
                               mode=args.mode, on_session=on_session, max_sessions=1)
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
