"""``vhost-user serve``: run one of our back-ends on a socket until interrupted.

Also home of the ``--draft`` / ``--draft-numbering`` options that ``serve``, ``switch`` and
``probe`` share (:func:`add_draft_options`, :func:`dialect_of`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..connection.backend import Dialect
from ..devices.base import Device
from ..devices.net import NullNetDevice
from ..io.backend import BackendServer, BackendSession
from ..io.reactor import Reactor
from ._common import (
    add_verbose,
    flag_text,
    octal_mode,
    path_error,
    setup_logging,
    stop_on_signals,
)

DRAFT_HELP = (
    "speak the January 2014 draft of vhost-user (the v6 patches) instead of the current "
    "protocol: ECHO (its liveness probe), 24-byte memory regions, a u64 SET_LOG_BASE, only "
    "the feature bits of the time, no protocol features; numbered as the draft's text "
    "(ECHO = 1, GET_FEATURES = 2 ... "
    "SET_VRING_ERR = 15) unless --draft-numbering says otherwise"
)
NUMBERING_HELP = (
    "which numbering of the draft (implies --draft): 'text' (default; ECHO = 1) or 'code', "
    "as the patches' own code numbered it (GET_FEATURES = 1 ... SET_VRING_ERR = 14, "
    "NET_SET_BACKEND = 15, ECHO = 16)"
)
DRAFT_EXAMPLES = """\
the 2014 draft dialect (a peer speaking the other dialect is named in the log):
  vhost-user serve --socket /tmp/draft.sock --draft
  vhost-user probe --draft /tmp/draft.sock
  vhost-user serve --socket /tmp/draft.sock --draft-numbering code
  vhost-user probe --draft-numbering code /tmp/draft.sock"""


SERVE_EXAMPLES = """\
examples:
  # a net back-end for probing and handshake tests; see what it offers
  vhost-user serve --socket /tmp/null.sock &
  vhost-user probe /tmp/null.sock

  # two queue pairs, every message logged
  vhost-user serve --socket /tmp/null.sock --queue-pairs 2 -vv

  # QEMU listens (-chardev socket,...,server=on): connect to it, and again when it restarts
  vhost-user serve --socket /tmp/qemu.sock --connect

  # put it through the conformance checks
  vhost-user check 'vhost-user serve --socket {socket}' --device net

For a real NIC use 'vhost-user switch', for a disk 'vhost-user blk'."""


def add_draft_options(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Add ``--draft`` and ``--draft-numbering text|code`` (see :func:`dialect_of`)."""
    p.add_argument("--draft", action="store_true", help=DRAFT_HELP)
    p.add_argument("--draft-numbering", choices=["text", "code"], default=None,
                   help=NUMBERING_HELP)


def dialect_of(args: argparse.Namespace) -> Dialect:
    """The dialect ``--draft`` / ``--draft-numbering`` ask for (CURRENT without either)."""
    numbering = args.draft_numbering
    if numbering is None:
        return Dialect.DRAFT_TEXT if args.draft else Dialect.CURRENT
    return Dialect.DRAFT_CODE if numbering == "code" else Dialect.DRAFT_TEXT


DEVICES = {
    "null-net": "virtio-net that completes the handshake, reports link up and drops TX",
    "null": "a generic device with one queue that consumes every chain",
}


def make_device(kind: str, queue_pairs: int) -> Device:
    """Build a fresh device of the named kind (one per session).

    Raises:
        ValueError: unknown kind.
    """
    if kind == "null-net":
        return NullNetDevice(queue_pairs=queue_pairs)
    if kind == "null":
        return Device()
    raise ValueError(f"unknown device {kind!r}; choose from {', '.join(DEVICES)}")


def add_parser(sub: Any) -> None:
    """Register ``serve`` on the top-level subparsers."""
    p: argparse.ArgumentParser = sub.add_parser(
        "serve",
        help="run a back-end device on a socket",
        description=(
            "Serve a vhost-user back-end on an AF_UNIX socket until SIGINT/SIGTERM. By "
            "default it listens (point QEMU's '-chardev socket,path=PATH' or DPDK's "
            "'net_virtio_user0,path=PATH' at it); with --connect it connects to a listening "
            "front-end (QEMU 'server=on', DPDK 'server=1') and reconnects when it goes away."
        ),
        epilog="devices:\n" + "\n".join(f"  {k:10} {v}" for k, v in DEVICES.items())
        + "\n\n" + SERVE_EXAMPLES + "\n\n" + DRAFT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--socket", required=True, metavar="PATH", help="socket path")
    p.add_argument("--connect", action="store_true",
                   help="connect to a listening front-end instead of listening")
    p.add_argument("--device", choices=list(DEVICES), default="null-net")
    p.add_argument("--queue-pairs", type=int, default=1, metavar="N",
                   help="net queue pairs (default 1)")
    add_draft_options(p)
    p.add_argument("--mode", type=octal_mode, default=0o600,
                   help="socket file mode in octal (default 600)")
    add_verbose(p, "sessions")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``vhost-user serve``."""
    setup_logging(args.verbose)
    try:
        make_device(args.device, args.queue_pairs)
    except ValueError as e:
        print(f"vhost-user serve: {flag_text(e)}", file=sys.stderr)
        return 2
    reactor = Reactor()

    def on_session(s: BackendSession) -> None:
        print(f"front-end connected ({s.name})", flush=True)

    try:
        server = BackendServer(
            reactor, args.socket, lambda: make_device(args.device, args.queue_pairs),
            connect=args.connect, mode=args.mode, on_session=on_session,
            dialect=dialect_of(args),
        )
    except (OSError, ValueError) as e:
        reactor.close()
        print(f"vhost-user serve: {path_error(args.socket, e)}", file=sys.stderr)
        return 2

    where = "connecting to" if args.connect else "listening on"
    dialect = dialect_of(args)
    speaking = f", speaking {dialect.description}" if dialect.is_draft else ""
    print(f"vhost-user serve: {args.device} {where} {args.socket}{speaking}", flush=True)
    with stop_on_signals(reactor):
        try:
            reactor.run()
        finally:
            server.close()
    reactor.close()
    print(f"vhost-user serve: stopped after {server.closed_sessions} session(s)"
          + (f"; last: {server.last_close_reason}" if server.last_close_reason else ""))
    return 0
